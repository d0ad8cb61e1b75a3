"""Sessions that outlive containers (issue 12): one MCP client session held open the way
desktop apps hold theirs (the official SDK's ClientSession with its GET notification
stream, and the PyPI mcp-proxy stdio bridge), across the container's sleep, its removal,
a proxy restart, and a move to another host behind nginx. The real mcp-outline server
answers; the client never re-initializes and never sees a 404."""

import json
import os
import shutil
import sys

import anyio
import httpx
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from conftest import docker, wait_for
from test_e2e_mcp import MCP_PATH, assert_sees_only_own_data, http_client, raw_mcp_call, use_session
from test_nginx import Nginx

SESSION_SETTINGS = dict(idle_timeout="2s", sweep_interval="1s", sse_keepalive="1s")


def held_streams(proxy):
    return proxy.stats()["sessions"]["held_streams"]


def events_for(proxy, name):
    """The events a long-lived session goes through, each waited for by its effect."""
    def sleep():
        # the client's GET stream stays open, held by the proxy, while its container sleeps
        wait_for(lambda: proxy.state(name) == "exited", timeout=60, what="the container to sleep")
        wait_for(lambda: held_streams(proxy) >= 1, timeout=10, what="the proxy to hold the GET stream")

    def removed():
        docker("rm", "--force", name)
        assert proxy.state(name) == "missing"

    def restarted():
        proxy.restart()

    return [("sleep", sleep), ("docker rm -f", removed), ("proxy restart", restarted)]


async def one_session_across(url, key, events, verify=True):
    """Initializes once, then uses the same session after each event."""
    results = []
    async with http_client(key, verify) as client:
        async with streamable_http_client(url + MCP_PATH, http_client=client) as (read, write, get_id):
            async with ClientSession(read, write) as session:
                await session.initialize()
                results.append(("start", await use_session(session, get_id)))
                for label, event in events:
                    await anyio.to_thread.run_sync(event)
                    results.append((label, await use_session(session, get_id)))
    return results


def initialized_session(url, key, terminate_on_close):
    """Opens a session (initialize only) and leaves it, with a DELETE or without; its id."""
    async def run():
        async with http_client(key) as client:
            async with streamable_http_client(url + MCP_PATH, http_client=client,
                                              terminate_on_close=terminate_on_close) as (read, write, get_id):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    return get_id()

    return anyio.run(run)


def state_dir(tmp_path, name, session_key=None):
    """A state directory: the proxy's session ids outlive a restart through the key it
    keeps there; hosts that share a session key know each other's ids."""
    path = tmp_path / name
    path.mkdir()
    if session_key:
        (path / "session-key").write_text(session_key)
        (path / "session-key").chmod(0o600)
    return str(path)


def test_an_sdk_session_survives_sleep_removal_and_restart(real_proxy, outline, tmp_path):
    proxy = real_proxy(state_dir=state_dir(tmp_path, "state"), **SESSION_SETTINGS)
    carol, dave = outline.add_user("carol"), outline.add_user("dave")
    name = proxy.container_name(carol)
    results = anyio.run(one_session_across, proxy.url, carol, events_for(proxy, name))
    first_id = results[0][1]["session_id"]
    for label, result in results:
        assert result["session_id"] == first_id, label  # the client never saw another
        assert_sees_only_own_data(result, "carol", "dave")
    # the proxy opened upstream sessions again (after the sleep and the removal; after
    # its own restart it learns the session from the client's header)
    assert "session resurrected" in proxy.log()
    assert proxy.stats()["sessions"]["resurrections"] >= 1
    # dave, on the same proxy, is unaffected and sees only his own
    assert_sees_only_own_data(anyio.run(one_session_across, proxy.url, dave, [])[0][1], "dave", "carol")


def test_the_stdio_bridge_desktop_users_run_survives_the_same(real_proxy, outline, tmp_path):
    bridge = shutil.which("mcp-proxy") or os.path.join(os.path.dirname(sys.executable), "mcp-proxy")
    assert os.path.exists(bridge), "the mcp-proxy bridge is not installed (tests/requirements.txt)"
    proxy = real_proxy(state_dir=state_dir(tmp_path, "state"), **SESSION_SETTINGS)
    erin = outline.add_user("erin")
    name = proxy.container_name(erin)
    # the key reaches the bridge in its environment (API_ACCESS_TOKEN: Bearer), never argv
    params = StdioServerParameters(command=bridge, args=["--transport", "streamablehttp", proxy.url + MCP_PATH],
                                   env={"PATH": os.environ["PATH"], "API_ACCESS_TOKEN": erin})

    async def through_the_bridge():
        results = []
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                for label, event in [("start", lambda: None)] + events_for(proxy, name):
                    await anyio.to_thread.run_sync(event)
                    results.append((label, await use_session(session, lambda: None)))
        return results

    for label, result in anyio.run(through_the_bridge):
        assert_sees_only_own_data(result, "erin", "frank"), label
    assert "session resurrected" in proxy.log()


def test_a_session_survives_docker_starting_its_container_by_itself(real_proxy, outline):
    """Docker starts the user's container without the proxy (its restart policy after a
    crash or an OOM kill, an operator's `docker start`): Docker says "running" as soon as
    the process is launched, a second or more before mcp-outline listens. The first
    request after the proxy has seen the start waits for the container to answer; it is
    never refused (a session opened again on a container not yet listening was a 502)."""
    proxy = real_proxy()
    key = outline.add_user("olga")
    name = proxy.container_name(key)

    def stopped_and_started_by_docker():
        docker("stop", "--time", "2", name)
        wait_for(lambda: proxy.believed_state(name) != "running", timeout=20, what="the proxy to see the stop")
        docker("start", name)
        # the proxy has seen the start (its event): the next request is sent at once,
        # while the server in the container is still booting
        wait_for(lambda: proxy.believed_state(name) == "running", timeout=20, what="the proxy to see the start")

    results = anyio.run(one_session_across, proxy.url, key, [("started by docker", stopped_and_started_by_docker)] * 2)
    for label, result in results:
        assert result["session_id"] == results[0][1]["session_id"], label
        assert_sees_only_own_data(result, "olga", "pete")
    assert "(started by Docker) ready in" in proxy.log()
    assert "session resurrected" in proxy.log()


def test_a_session_id_replayed_with_another_users_key_gets_404(real_proxy, outline):
    proxy = real_proxy()
    alice, mallory = outline.add_user("alice"), outline.add_user("mallory")

    alice_session = initialized_session(proxy.url, alice, terminate_on_close=False)
    stolen = raw_mcp_call(proxy.url, mallory, alice_session)
    assert stolen.status_code == 404, stolen.text
    assert "Alice" not in stolen.text
    # a notification stream with alice's id and mallory's key is not held for her either
    with httpx.stream("GET", proxy.url + MCP_PATH, timeout=30,
                      headers={"Mcp-Session-Id": alice_session, "Accept": "text/event-stream",
                               "X-Outline-API-Key": mallory}) as r:
        assert r.status_code == 404
    # and alice's own session still works
    mine = raw_mcp_call(proxy.url, alice, alice_session)
    assert mine.status_code == 200 and "search_documents" in mine.text


def test_a_client_that_ended_its_session_reinitializes_by_itself(real_proxy, outline):
    proxy = real_proxy()
    key = outline.add_user("ivan")

    ended = initialized_session(proxy.url, key, terminate_on_close=True)
    # the ended session is not opened again behind the client's back: the container's 404
    gone = raw_mcp_call(proxy.url, key, ended)
    assert gone.status_code == 404, gone.text
    # a client that initializes again on its own works
    again = anyio.run(one_session_across, proxy.url, key, [])[0][1]
    assert again["session_id"] != ended
    assert_sees_only_own_data(again, "ivan", "judy")


def test_a_session_moves_to_another_host_behind_nginx(real_proxy, outline, tmp_path):
    shared_key = os.urandom(32).hex()
    a = real_proxy(state_dir=state_dir(tmp_path, "state-a", shared_key))
    b = real_proxy(state_dir=state_dir(tmp_path, "state-b", shared_key))
    nginx = Nginx(tmp_path / "nginx-move", [a.port, b.port])
    key = outline.add_user("kate")
    try:
        def pinned():
            return a if a.containers() else b

        def host_down():
            pinned().stop()

        results = anyio.run(lambda: one_session_across(nginx.url, key, [("host down", host_down)],
                                                       verify=nginx.ssl))
        for label, result in results:
            assert result["session_id"] == results[0][1]["session_id"], label
            assert_sees_only_own_data(result, "kate", "liam")
        survivor = b if a.process.poll() is not None else a
        assert survivor.containers(), "the other host took the user"
        assert "session resurrected" in survivor.log()
    finally:
        nginx.stop()


def test_stats_count_sessions_per_container(real_proxy, outline):
    proxy = real_proxy()
    key = outline.add_user("mona")

    async def open_and_look():
        async with http_client(key) as client:
            async with streamable_http_client(proxy.url + MCP_PATH, http_client=client) as (read, write, get_id):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    await session.list_tools()
                    return await anyio.to_thread.run_sync(proxy.stats)

    stats = anyio.run(open_and_look)
    container = next(c for c in stats["containers"] if c["name"] == proxy.container_name(key))
    assert container["sessions"] == 1
    metrics = httpx.get(proxy.url + "/metrics").text
    assert "mcp_proxy_session_resurrections_total" in metrics and "mcp_proxy_held_streams" in metrics
    assert json.dumps(stats["sessions"])
