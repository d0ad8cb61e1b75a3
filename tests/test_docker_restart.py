"""The Docker daemon stopped and started again under a running proxy. Marked
takes_docker_away, so it runs after every other test (conftest orders it last): it
takes the daemon away from everything else for a few seconds."""

import os
import signal
import subprocess
import time

import anyio
import pytest

from conftest import docker, wait_for
from test_e2e_mcp import assert_sees_only_own_data
from test_sessions import one_session_across

pytestmark = pytest.mark.takes_docker_away


def dockerd_pid():
    """The running dockerd (a zombie left by an earlier stop does not count)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if open(f"/proc/{pid}/comm").read().strip() != "dockerd":
                    continue
                state = next(l for l in open(f"/proc/{pid}/status") if l.startswith("State:"))
                if "Z" not in state.split()[1]:
                    return int(pid)
            except (OSError, StopIteration):
                pass
    return None


def docker_answers():
    return subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                          timeout=20).returncode == 0


def restart_dockerd(while_down=lambda: None):
    """Stops the daemon (SIGTERM, as systemctl does), runs while_down, starts it again
    as it was (unless a service manager already did), and waits until it answers."""
    pid = dockerd_pid()
    assert pid, "dockerd is not running on this machine"
    cmdline = [a.decode() for a in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0") if a]
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: dockerd_pid() is None and not docker_answers(), timeout=60, what="dockerd to stop")
        while_down()
    finally:
        # a service manager may bring it back by itself; else start it as it was
        time.sleep(3)
        if dockerd_pid() is None:
            # detached (the shell exits at once): never a child of the tests, so a later
            # stop leaves no zombie behind
            subprocess.run(["sh", "-c", 'setsid "$@" </dev/null >>/tmp/dockerd-restarted.log 2>&1 &', "sh",
                            *cmdline], check=True)
        wait_for(docker_answers, timeout=90, interval=0.5, what="dockerd to answer again")


def test_the_docker_daemon_stopped_and_restarted_under_the_proxy(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("dora")
    name = proxy.container_name(key)
    assert proxy.get("/echo", key=key).status_code == 200

    def while_down():
        r = proxy.get("/echo", key=key)
        assert r.status_code in (502, 503), r.text
        assert r.json()["error"] in ("docker_unavailable", "container_unreachable")
        wait_for(lambda: proxy.get("/health").status_code == 503, timeout=20, what="/health to report Docker down")
        assert proxy.get("/health").json()["docker"] == "unreachable"

    restart_dockerd(while_down)
    wait_for(lambda: proxy.get("/health").status_code == 200, timeout=30, what="/health to recover")
    r = proxy.get("/echo", key=key)
    assert r.status_code == 200, r.text
    assert proxy.containers() == [name]
    assert proxy.process.poll() is None


def test_an_sdk_session_survives_a_docker_daemon_restart(real_proxy, outline):
    """The same session before and after the daemon restarts (its containers restart
    with it, at new addresses and without their sessions)."""
    proxy = real_proxy()
    key = outline.add_user("olga")

    def daemon_restart():
        restart_dockerd()
        wait_for(lambda: proxy.get("/health").status_code == 200, timeout=30, what="/health to recover")

    results = anyio.run(one_session_across, proxy.url, key, [("daemon restart", daemon_restart)])
    for label, result in results:
        assert result["session_id"] == results[0][1]["session_id"], label
        assert_sees_only_own_data(result, "olga", "pete")
    assert "session resurrected" in proxy.log()


def test_after_a_daemon_restart_no_user_is_answered_by_anothers_container(make_proxy, outline):
    """Two users active; the daemon restarts (their containers come back with it, at
    addresses that may have swapped): every answer comes from the user's own container."""
    from test_containers import answered_by, small_network

    net = small_network()
    try:
        proxy = make_proxy(network=net)
        users = [outline.add_user("ulla"), outline.add_user("viktor")]
        for key in users:
            got, expected = answered_by(proxy, key)
            assert got == expected
        restart_dockerd()
        wait_for(lambda: proxy.get("/health").status_code == 200, timeout=30, what="/health to recover")
        for key in users * 3:
            got, expected = answered_by(proxy, key)
            assert got == expected, "a request was answered by another user's container"
        proxy.cleanup()
    finally:
        docker("network", "rm", net, check=False)
