"""No staged edit lost (issue 23): mcp-outline's `edit_document` with `save: false` keeps
the edit in the container's memory only, until a `save: true` pushes it to Outline. The
proxy marks such a container and does not put it to sleep, remove or replace it (the idle
sweep, an image upgrade with warm spares on, a restart of the proxy itself) until the edit
is saved, or MCP_PROXY_STAGED_EDITS_TIMEOUT passes. The real mcp-outline server, driven by
the official MCP Python SDK in one session held open throughout; the fake Outline records
what documents.update received."""

import json
import os
import secrets
import signal
import stat
import time

import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from conftest import docker, wait_for
from test_e2e_mcp import MCP_PATH, http_client, use_session

IDLE = dict(idle_timeout="2s", sweep_interval="1s", sse_keepalive="1s")
STAGED_TEXT = "Staged text"


def text_of(result):
    return "\n".join(c.text for c in result.content if hasattr(c, "text"))


async def stage(session, document_id):
    result = await session.call_tool("edit_document", {
        "document_id": document_id,
        "edits": [{"old_string": "Private text", "new_string": STAGED_TEXT}],
        "save": False,
    })
    assert "unsaved changes" in text_of(result), text_of(result)


async def save(session, document_id):
    result = await session.call_tool("edit_document", {"document_id": document_id, "edits": [], "save": True})
    return text_of(result)


def container_stats(proxy, name):
    return next((c for c in proxy.stats()["containers"] if c["name"] == name), None)


def outlives_idle(proxy, name, times=4):
    """Waits until the container has been idle `times` idle timeouts (several sweeps
    have looked at it), then asserts it still runs and says it holds staged edits."""
    idle = int(proxy.env["MCP_PROXY_IDLE_TIMEOUT"].rstrip("s"))

    def long_idle():
        c = container_stats(proxy, name)
        return c is not None and (c["idle_seconds"] >= times * idle or c["state"] != "running")

    wait_for(long_idle, timeout=60, what=f"{name} to be idle {times} idle timeouts")
    assert proxy.state(name) == "running", proxy.log()[-3000:]
    c = container_stats(proxy, name)
    assert c["state"] == "running" and c["staged_documents"] == 1, c
    assert c["staged_seconds"] >= times * idle - 1, c


def sleeps_on_time(proxy, name, since, gone=("exited", "missing")):
    """The container sleeps within the idle timeout plus two sweeps (and some slack)."""
    wait_for(lambda: proxy.state(name) in gone, timeout=20, what=f"{name} to sleep")
    return time.monotonic() - since


async def session_across(url, key, document_id, between):
    """Stages an edit, runs `between` (in a thread), saves in the same session; the
    save's answer."""
    async with http_client(key) as client:
        async with streamable_http_client(url + MCP_PATH, http_client=client) as (read, write, get_id):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await stage(session, document_id)
                await anyio.to_thread.run_sync(between)
                return await save(session, document_id)


def saved_text(outline, document_id):
    return [text for doc, text in outline.updates if doc == document_id]


def test_staged_edits_outlive_the_idle_timeout_and_a_save_lets_it_sleep(real_proxy, outline, tmp_path):
    proxy = real_proxy(state_dir=str(tmp_path), **IDLE)
    alice, bob = outline.add_user("alice"), outline.add_user("bob")
    name, bobs = proxy.container_name(alice), proxy.container_name(bob)

    def idle_a_while():
        # bob, with nothing staged, sleeps on time meanwhile
        anyio.run(lambda: quick_session(proxy.url, bob))
        sleeps_on_time(proxy, bobs, time.monotonic())
        outlives_idle(proxy, name)
        state = json.loads((tmp_path / "staged-edits.json").read_text())
        assert list(state["containers"][name]["documents"]) == ["doc-alice-0"]
        assert alice not in (tmp_path / "staged-edits.json").read_text()
        assert stat.S_IMODE(os.stat(tmp_path / "staged-edits.json").st_mode) == 0o600
        metrics = proxy.get("/metrics").text
        assert "mcp_proxy_containers_holding_staged_edits 1" in metrics
        assert f'mcp_proxy_container_staged_documents{{container="{name}"}} 1' in metrics
        assert proxy.stats()["holding_staged_edits"] == 1

    answer = anyio.run(session_across, proxy.url, alice, "doc-alice-0", idle_a_while)
    saved_at = time.monotonic()
    assert "Saved to Outline" in answer, answer
    assert saved_text(outline, "doc-alice-0") == [f"{STAGED_TEXT} of alice, number 0."]
    # saved: nothing is held, and it sleeps on time again
    assert sleeps_on_time(proxy, name, saved_at) < 15
    assert proxy.stats()["holding_staged_edits"] == 0
    assert json.loads((tmp_path / "staged-edits.json").read_text())["containers"] == {}


async def quick_session(url, key):
    async with http_client(key) as client:
        async with streamable_http_client(url + MCP_PATH, http_client=client) as (read, write, get_id):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await use_session(session, get_id)


def test_staged_edits_outlive_an_image_upgrade_with_spares_on(real_proxy, outline, mcp_outline_image):
    tag = f"outline-mcp-proxy-test-staged:{secrets.token_hex(3)}"
    docker("tag", mcp_outline_image, tag)
    try:
        # with spares on, an idle container is removed rather than stopped, and one of an
        # older image is never kept
        proxy = real_proxy(image=tag, spares=1, **IDLE)
        carol = outline.add_user("carol")
        name = proxy.container_name(carol)

        def upgrade():
            old = proxy.inspect(name)
            # `docker pull` brings a new image under the same name
            docker("tag", "outline-mcp-proxy-test-backend:latest", tag)
            new_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
            assert new_id != old["Image"]

            def image_of(container):  # (a spare may be removed while we look)
                r = docker("container", "inspect", "--format", "{{.Image}}", container, check=False)
                return r.stdout.strip() if r.returncode == 0 else None

            def spare_of_the_new_image():
                images = [image_of(s) for s in proxy.spares()]
                return new_id in images and all(i in (new_id, None) for i in images)

            wait_for(spare_of_the_new_image, timeout=60, what="the proxy to see the new image")
            outlives_idle(proxy, name)
            assert proxy.inspect(name)["Id"] == old["Id"]  # the same container, not replaced

        answer = anyio.run(session_across, proxy.url, carol, "doc-carol-0", upgrade)
        assert "Saved to Outline" in answer, answer
        assert saved_text(outline, "doc-carol-0") == [f"{STAGED_TEXT} of carol, number 0."]
        # saved: the container of the older image goes on time
        sleeps_on_time(proxy, name, time.monotonic())
    finally:
        docker("rmi", "--force", tag, check=False)


def test_staged_edits_outlive_a_proxy_killed_and_restarted(real_proxy, outline, tmp_path):
    proxy = real_proxy(state_dir=str(tmp_path), **IDLE)
    dora = outline.add_user("dora")
    name = proxy.container_name(dora)

    def killed_and_restarted():
        proxy.stop(sig=signal.SIGKILL)
        proxy.start()
        outlives_idle(proxy, name)

    answer = anyio.run(session_across, proxy.url, dora, "doc-dora-0", killed_and_restarted)
    assert "Saved to Outline" in answer, answer
    assert saved_text(outline, "doc-dora-0") == [f"{STAGED_TEXT} of dora, number 0."]
    sleeps_on_time(proxy, name, time.monotonic())


def test_the_limit_ends_the_hold_with_a_warning_naming_the_user_and_documents(real_proxy, outline, tmp_path):
    proxy = real_proxy(state_dir=str(tmp_path), staged_edits_timeout="8s", **IDLE)
    erin = outline.add_user("erin", display_name='Erin "E" O\'Neil')
    name = proxy.container_name(erin)
    staged_at = []

    def held_to_the_limit():
        staged_at.append(time.monotonic())
        wait_for(lambda: proxy.state(name) == "exited", timeout=60, what="the limit to end the hold")

    answer = anyio.run(session_across, proxy.url, erin, "doc-erin-1", held_to_the_limit)
    # held for the limit, not the idle timeout; then lost, and said so
    assert time.monotonic() - staged_at[0] >= 7
    assert "No edits provided and no staged changes" in answer, answer
    assert saved_text(outline, "doc-erin-1") == []
    warning = [line for line in proxy.log().splitlines() if "staged edits lost" in line]
    assert len(warning) == 1, proxy.log()[-3000:]
    assert "WARN" in warning[0] and f"container={name}" in warning[0] and "documents=doc-erin-1" in warning[0]
    assert 'user="Erin \\"E\\" O\'Neil"' in warning[0], warning[0]
    assert erin not in proxy.log()
    assert proxy.stats()["holding_staged_edits"] == 0
