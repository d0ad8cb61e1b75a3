"""One memory budget for all user containers (issue 24): the containers run under one
parent cgroup that the kernel holds to MCP_PROXY_MEMORY_BUDGET; when a start would go over
it, the least recently used idle container sleeps first (never one holding staged edits),
and only when none can, the new user gets 503 with Retry-After. The real mcp-outline, the
real Docker Engine (this host: cgroup v1, Docker's cgroupfs driver); each test has its own
parent cgroup, removed after it."""

import os
import secrets
import threading
import time

import anyio
import pytest

from conftest import docker, wait_for
from test_e2e_mcp import raw_mcp_call, run_session
from test_proxy import run_binary
from test_staged_edits import STAGED_TEXT, saved_text, session_across

CGROUP = "/sys/fs/cgroup"
MIB = 1 << 20
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "budget-test", "version": "1"}}}


def remove_cgroup(name):
    """The parent cgroup in every controller Docker made it in (emptied once the
    containers are gone)."""
    def removed():
        left = [c for c in os.listdir(CGROUP) if os.path.isdir(f"{CGROUP}/{c}/{name}")]
        for controller in left:
            try:
                os.rmdir(f"{CGROUP}/{controller}/{name}")
            except OSError:
                pass
        return all(not os.path.isdir(f"{CGROUP}/{c}/{name}") for c in os.listdir(CGROUP))
    wait_for(removed, timeout=20, interval=0.2, what=f"the cgroup {name} to be removed")


@pytest.fixture()
def cgroup_parent():
    """A parent cgroup of the test's own (set up before the proxies, so removed after
    their containers)."""
    name = f"omp_test_{secrets.token_hex(3)}"
    yield name
    remove_cgroup(name)


def memory(proxy):
    return proxy.stats()["memory"]


def limit_of(parent):
    return int(open(f"{CGROUP}/memory/{parent}/memory.limit_in_bytes").read())


def fit_is(proxy, n):
    """Polls until the budget's measured fit is n (the parent is read once a second, and
    a container just started still grows)."""
    wait_for(lambda: memory(proxy)["containers_fit"] == n, timeout=45, interval=0.5,
             what=f"{n} containers to fit the budget (now {memory(proxy)})")


def answered(proxy, key):
    result = run_session(proxy.url, key, terminate_on_close=False)
    assert result["session_id"] and "search_documents" in result["tools"], result
    return result["session_id"]


def test_a_budget_below_one_container_or_above_the_host_stops_start_up():
    base = {"PATH": os.environ["PATH"]}
    for budget in ("100m", "100000g", "lots"):
        r = run_binary(env=dict(base, MCP_PROXY_MEMORY_BUDGET=budget))
        assert r.returncode == 2 and "MCP_PROXY_MEMORY_BUDGET" in r.stderr, (budget, r.stderr)
    assert "MCP_PROXY_MEMORY_BUDGET [auto]" in run_binary("--help").stdout


def test_the_budget_holds_least_recently_used_first_staged_edits_kept_503_when_all_busy(
        cgroup_parent, real_proxy, outline, tmp_path):
    prefix = f"t{secrets.token_hex(3)}-"
    settings = dict(prefix=prefix, cgroup_parent=cgroup_parent, memory="192m", state_dir=str(tmp_path),
                    auth_ttl="10m")
    alice, bob, carol = outline.add_user("alice"), outline.add_user("bob"), outline.add_user("carol")

    # 1. with room for all: the containers run in the parent, held to the budget
    first = real_proxy(memory_budget="1g", **settings)
    sessions = {alice: answered(first, alice), bob: answered(first, bob)}
    names = {key: first.container_name(key) for key in (alice, bob, carol)}
    for key in (alice, bob):
        info = first.inspect(names[key])
        assert info["HostConfig"]["CgroupParent"] == f"/{cgroup_parent}"
        assert os.path.isdir(f"{CGROUP}/memory/{cgroup_parent}/{info['Id']}")
    assert limit_of(cgroup_parent) == 1 << 30
    figures = memory(first)
    assert figures["budget_bytes"] == 1 << 30 and figures["budget_sleeps"] == 0
    assert figures["kernel_limit_bytes"] == 1 << 30
    metrics = first.get("/metrics").text
    for name in ("mcp_proxy_memory_budget_bytes 1073741824", "mcp_proxy_memory_in_use_bytes ",
                 "mcp_proxy_memory_kernel_limit_bytes 1073741824", "mcp_proxy_budget_sleeps_total 0"):
        assert name in metrics, metrics
    # a limit that is no longer the budget is seen, and said; and again when it is held
    limit_file = f"{CGROUP}/memory/{cgroup_parent}/memory.limit_in_bytes"
    with open(limit_file, "w") as f:
        f.write(str(2 << 30))
    wait_for(lambda: memory(first)["kernel_limit_bytes"] == 2 << 30, what="the kernel's new limit in /stats")
    assert "is no longer the memory budget" in first.log()
    with open(limit_file, "w") as f:
        f.write(str(1 << 30))
    wait_for(lambda: memory(first)["kernel_limit_bytes"] == 1 << 30, what="the budget held again")
    assert "to the memory budget again" in first.log()
    # what two settled containers use, measured
    time.sleep(2)
    each = wait_for(lambda: memory(first)["in_use_bytes"], what="a reading") // 2
    assert 20 * MIB < each < 192 * MIB, each
    first.stop()

    # 2. a budget for about two and a half: the restarted proxy adopts both
    budget = int(each * 2.5) // 4096 * 4096  # whole pages, as the kernel keeps it
    second = real_proxy(memory_budget=str(budget), **dict(settings, memory=str(min(192 * MIB, budget))))
    budget = memory(second)["budget_bytes"]  # in whole pages
    assert limit_of(cgroup_parent) == budget, "the proxy, as root here, sets the kernel's limit itself"
    answered(second, alice)
    answered(second, bob)  # alice is now the least recently used
    fit_is(second, 2)
    answered(second, carol)
    assert second.state(names[alice]) == "exited", second.log()[-3000:]
    assert second.state(names[bob]) == "running" and second.state(names[carol]) == "running"
    assert memory(second)["budget_sleeps"] == 1
    assert "at the memory budget (2 containers fit): stopping least recently used" in second.log()
    assert memory(second)["in_use_bytes"] <= budget

    def with_bobs_edit_staged():
        # bob holds a staged edit and, once carol is served, is the least recently used:
        # carol goes instead, and alice's session, kept across her sleep, is answered again
        answered(second, carol)
        assert next(c for c in second.stats()["containers"] if c["name"] == names[bob])["staged_documents"] == 1
        fit_is(second, 2)
        assert raw_mcp_call(second.url, alice, sessions[alice]).status_code == 200
        assert second.state(names[carol]) == "exited", second.log()[-3000:]
        assert second.state(names[bob]) == "running"
        assert memory(second)["budget_sleeps"] == 2

        # every container busy (alice's call held by a slow Outline, bob's edit staged):
        # carol gets 503 with Retry-After, and nobody is put to sleep
        fit_is(second, 2)
        outline.delay = 8
        held = threading.Thread(target=lambda: run_session(second.url, alice))
        held.start()
        try:
            wait_for(lambda: any(c["name"] == names[alice] and c["active_requests"] > 0
                                 for c in second.stats()["containers"]), what="alice's call in flight")
            refused = second.post("/mcp", key=carol, json=INITIALIZE,
                                  headers={"Accept": "application/json, text/event-stream"})
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0, refused.text
        finally:
            outline.delay = 0
            held.join(timeout=120)
        assert not held.is_alive()
        assert second.state(names[alice]) == "running" and second.state(names[bob]) == "running"
        assert memory(second)["budget_sleeps"] == 2

    answer = anyio.run(session_across, second.url, bob, "doc-bob-0", with_bobs_edit_staged)
    assert "Saved to Outline" in answer, answer
    assert saved_text(outline, "doc-bob-0") == [f"{STAGED_TEXT} of bob, number 0."]
    # nothing escaped the parent
    ours = [n for n in docker("ps", "--format", "{{.Names}}").stdout.split() if n.startswith(prefix)]
    for name in ours:
        assert second.inspect(name)["HostConfig"]["CgroupParent"] == f"/{cgroup_parent}"
