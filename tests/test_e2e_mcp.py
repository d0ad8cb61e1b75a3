"""End to end with the real parts: the official MCP Python SDK as the client, the real
mcp-outline server (from PyPI, in an image built by tests/build-mcp-outline-image.sh)
in containers started by the release binary, and the fake Outline API as the only
stand-in. Also through the real nginx over HTTPS."""

import anyio
import json
import time

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from conftest import assert_key_kept_secret, wait_for
from test_nginx import Nginx

MCP_PATH = "/mcp"


def http_client(key, verify=True, header="X-Outline-API-Key"):
    value = key if header != "Authorization" else f"Bearer {key}"
    return httpx.AsyncClient(headers={header: value}, verify=verify, timeout=httpx.Timeout(60, read=300))


async def use_session(session, get_session_id):
    """list tools, call search_documents and list_collections in an initialized session."""
    tools = await session.list_tools()
    t0 = time.monotonic()
    search = await session.call_tool("search_documents", {"query": "note"})
    took = time.monotonic() - t0
    collections = await session.call_tool("list_collections", {})
    return {
        "tools": sorted(t.name for t in tools.tools),
        "search": "\n".join(c.text for c in search.content if hasattr(c, "text")),
        "collections": "\n".join(c.text for c in collections.content if hasattr(c, "text")),
        "session_id": get_session_id(),
        "search_seconds": took,
    }


async def mcp_session(url, key, verify=True, header="X-Outline-API-Key", terminate_on_close=True):
    """A whole session: initialize, list tools, call search_documents and list_collections."""
    async with http_client(key, verify, header) as client:
        async with streamable_http_client(url + MCP_PATH, http_client=client,
                                          terminate_on_close=terminate_on_close) as (read, write, get_id):
            async with ClientSession(read, write) as session:
                t0 = time.monotonic()
                await session.initialize()
                initialized = time.monotonic() - t0
                result = await use_session(session, get_id)
                result["initialize_seconds"] = initialized
                return result


def run_session(url, key, **kw):
    return anyio.run(lambda: mcp_session(url, key, **kw))


def raw_mcp_call(url, key, session_id, verify=True):
    """A tools/list in an existing session, as the SDK would send it."""
    return httpx.post(
        url + MCP_PATH,
        headers={"Mcp-Session-Id": session_id, "Accept": "application/json, text/event-stream",
                 "Content-Type": "application/json", "MCP-Protocol-Version": "2025-06-18",
                 "X-Outline-API-Key": key},
        content=json.dumps({"jsonrpc": "2.0", "id": 99, "method": "tools/list"}),
        timeout=60, verify=verify,
    )


def assert_sees_only_own_data(result, name, other):
    assert "search_documents" in result["tools"] and "list_collections" in result["tools"]
    assert f"{name.capitalize()}'s note" in result["search"]
    assert f"{name.capitalize()}'s collection" in result["collections"]
    assert other.capitalize() not in result["search"] + result["collections"]


def test_two_users_through_the_proxy_with_the_real_server(real_proxy, outline):
    proxy = real_proxy(key_mode="header")
    alice, bob = outline.add_user("alice"), outline.add_user("bob")

    t0 = time.monotonic()
    a = run_session(proxy.url, alice)
    first = time.monotonic() - t0
    b = run_session(proxy.url, bob)
    assert_sees_only_own_data(a, "alice", "bob")
    assert_sees_only_own_data(b, "bob", "alice")
    names = proxy.containers()
    assert names == sorted([proxy.container_name(alice), proxy.container_name(bob)])

    # warm: the container is running
    t0 = time.monotonic()
    warm = run_session(proxy.url, alice)
    warm_total = time.monotonic() - t0
    assert_sees_only_own_data(warm, "alice", "bob")

    # neither key is in the log, or in any container's configuration, files or log
    assert_key_kept_secret(proxy, alice)
    assert_key_kept_secret(proxy, bob)
    print(f"\nreal mcp-outline: first session (create + boot) {first * 1000:.0f} ms, "
          f"warm session {warm_total * 1000:.0f} ms (initialize {warm['initialize_seconds'] * 1000:.0f} ms, "
          f"search_documents {warm['search_seconds'] * 1000:.0f} ms)")


def test_sleep_wake_and_proxy_restart_with_the_real_server(real_proxy, outline, tmp_path):
    # a state directory, as systemd gives the service: its session key lets the proxy
    # know its session ids again after the restarts below
    proxy = real_proxy(idle_timeout="2s", sweep_interval="1s", state_dir=str(tmp_path))
    key = outline.add_user("carol")
    # dave is a real user with his own data, active on the same proxy: what carol
    # sees must hold none of it
    dave = outline.add_user("dave")
    name = proxy.container_name(key)
    assert_sees_only_own_data(run_session(proxy.url, dave), "dave", "carol")
    # a session the client leaves open (no DELETE at the end)
    first = run_session(proxy.url, key, terminate_on_close=False)
    assert_sees_only_own_data(first, "carol", "dave")

    # asleep: the next request wakes it, and the session the client left open still
    # works: the old process took it along, so the proxy opens a new upstream session
    # with the client's own recorded initialize and maps the client's id onto it
    wait_for(lambda: proxy.state(name) == "exited", timeout=90, what="sleep")
    t0 = time.monotonic()
    stale = raw_mcp_call(proxy.url, key, first["session_id"])
    wake = time.monotonic() - t0
    assert stale.status_code == 200, stale.text
    assert stale.headers["mcp-session-id"] == first["session_id"]
    assert "search_documents" in stale.text
    woken = run_session(proxy.url, key)
    assert_sees_only_own_data(woken, "carol", "dave")

    # the proxy restarts under a live session: the container holds the session, so
    # the client's next request in it just works; a fresh initialize works too
    proxy.env["MCP_PROXY_IDLE_TIMEOUT"] = "15m"
    proxy.restart()

    async def live_session_across_restart():
        async with http_client(key) as client:
            async with streamable_http_client(proxy.url + MCP_PATH, http_client=client) as (read, write, get_id):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    before = await use_session(session, get_id)
                    await anyio.to_thread.run_sync(proxy.restart)
                    after = await use_session(session, get_id)
                    return before, after

    before, after = anyio.run(live_session_across_restart)
    assert before["session_id"] == after["session_id"]
    assert_sees_only_own_data(after, "carol", "dave")
    assert_sees_only_own_data(run_session(proxy.url, key), "carol", "dave")
    assert_sees_only_own_data(run_session(proxy.url, dave), "dave", "carol")
    assert proxy.containers() == sorted([name, proxy.container_name(dave)])
    print(f"\nreal mcp-outline: wake and resurrection (stopped -> first answer in the old session) "
          f"{wake * 1000:.0f} ms")


def test_env_key_mode_with_the_real_server(real_proxy, outline):
    proxy = real_proxy(key_mode="env")
    key = outline.add_user("erin")
    # frank is a real user whose container holds his own key (env mode): erin's
    # requests must never reach it
    frank = outline.add_user("frank")
    assert_sees_only_own_data(run_session(proxy.url, frank), "frank", "erin")
    result = run_session(proxy.url, key, header="Authorization")
    assert_sees_only_own_data(result, "erin", "frank")
    assert_sees_only_own_data(run_session(proxy.url, frank), "frank", "erin")
    assert proxy.containers() == sorted([proxy.container_name(key), proxy.container_name(frank)])
    for k in (key, frank):  # in its environment, never its arguments
        assert_key_kept_secret(proxy, k, env_mode=True)


def test_the_real_server_through_nginx_over_https(real_proxy, outline, tmp_path):
    proxy = real_proxy()
    nginx = Nginx(tmp_path / "nginx-e2e", [proxy.port])
    try:
        alice, bob = outline.add_user("alice"), outline.add_user("bob")
        a = run_session(nginx.url, alice, verify=nginx.ssl)
        b = run_session(nginx.url, bob, verify=nginx.ssl, header="Authorization")
        assert_sees_only_own_data(a, "alice", "bob")
        assert_sees_only_own_data(b, "bob", "alice")
    finally:
        nginx.stop()
