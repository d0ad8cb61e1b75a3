"""Every MCP client generation on one container (issue 22), with the real mcp-outline
(which speaks only the handshake era) behind the proxy:

- a connector-like client that never echoes Mcp-Session-Id (Claude's custom
  connectors), each request on a new connection;
- the MCP Python SDK 2.x, pinned to 2026-07-28 and in its default mode (which must
  settle on 2026-07-28: the proxy answers server/discover), from its own virtualenv;
- raw 2026-07-28 requests for the answers the specification demands (header mismatch,
  unknown version, 405, the listen stream);
- sessions that outlive their container in all three generations (sleep, removal,
  proxy restart); the per-method audit line and /metrics; /oauth/mcp; nginx.
The SDK 1.x and the mcp-proxy bridge are covered unchanged by test_e2e_mcp and
test_sessions."""

import base64
import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import docker, wait_for
from oauth_client import OAUTH_PATH, scripted_tokens
from test_nginx import Nginx

ROOT = Path(__file__).resolve().parent.parent
MODERN = "2026-07-28"
SDK2_PYTHON = os.environ.get("MCP_SDK2_PYTHON", str(ROOT / "target" / "sdk2-venv" / "bin" / "python"))


@pytest.fixture()
def sdk2():
    """Runs tests/sdk2_client.py with the SDK 2.x interpreter (tests/run makes it)."""
    if not Path(SDK2_PYTHON).exists():
        pytest.fail(f"no MCP SDK 2.x interpreter at {SDK2_PYTHON}: tests/run makes target/sdk2-venv "
                    "from tests/requirements-sdk2.txt", pytrace=False)

    def run(url, key, mode, header="X-Outline-API-Key"):
        r = subprocess.run([SDK2_PYTHON, str(ROOT / "tests" / "sdk2_client.py"), url, mode, header],
                           input=key + "\n", capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"SDK 2.x client failed:\n{r.stderr[-3000:]}"
        return json.loads(r.stdout.strip().splitlines()[-1])

    return run


# --- a raw connector-like client: no session id ever echoed, a new connection each time ---

def rpc(method, params=None, id_=1):
    message = {"jsonrpc": "2.0", "method": method}
    if id_ is not None:
        message["id"] = id_
    if params is not None:
        message["params"] = params
    return message


INIT = {"protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "connector-like", "version": "1.0"}}


def connector_post(url, key, message, header="X-Outline-API-Key", path="/mcp", headers=None, verify=True):
    """One POST on its own connection, as a connector's stateless backend sends it."""
    h = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
         "Connection": "close", **(headers or {})}
    h[header] = f"Bearer {key}" if header == "Authorization" else key
    with httpx.Client(timeout=120, verify=verify) as c:
        return c.post(url + path, headers=h, json=message)


def answer(r):
    """The JSON-RPC message of an answer: a JSON body, or the SSE event that carries it."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if "id" in message:
                    return message
        raise AssertionError(f"no response event in {r.text!r}")
    return r.json()


def connector_round(url, key, **kw):
    """initialize, notifications/initialized, tools/list, tools/call: no id echoed."""
    init = connector_post(url, key, rpc("initialize", INIT), **kw)
    assert init.status_code == 200, init.text
    assert init.headers.get("mcp-session-id"), "initialize names a session (the connector drops it)"
    note = connector_post(url, key, rpc("notifications/initialized", id_=None), **kw)
    assert note.status_code == 202, note.text
    listed = connector_post(url, key, rpc("tools/list", id_=2), **kw)
    assert listed.status_code == 200, listed.text
    assert "mcp-session-id" not in listed.headers, "a client that sent no id is given none"
    tools = sorted(t["name"] for t in answer(listed)["result"]["tools"])
    called = connector_post(url, key, rpc("tools/call", {"name": "search_documents",
                                                          "arguments": {"query": "note"}}, id_=3), **kw)
    assert called.status_code == 200, called.text
    text = "\n".join(c.get("text", "") for c in answer(called)["result"]["content"])
    return tools, text


# --- raw 2026-07-28 requests ---

def meta():
    return {"io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientInfo": {"name": "raw-2026", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {}}


def modern_post(url, key, method, params=None, id_=1, headers=None, name=None, **kw):
    params = {**(params or {}), "_meta": meta()}
    h = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if name is not None:
        h["Mcp-Name"] = name
    h.update(headers or {})
    return connector_post(url, key, rpc(method, params, id_), headers=h, **kw)


def modern_search(url, key, **kw):
    r = modern_post(url, key, "tools/call", {"name": "search_documents", "arguments": {"query": "note"}},
                    name="search_documents", **kw)
    assert r.status_code == 200, r.text
    assert "mcp-session-id" not in r.headers, "2026-07-28 never mints a session id"
    result = answer(r)["result"]
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "results name the server"
    return "\n".join(c.get("text", "") for c in result["content"])


def audit_lines(proxy):
    return [line for line in proxy.log().splitlines() if "POST /mcp " in line and " method=" in line]


# --- the tests ---

def test_a_connector_that_never_echoes_the_session_id(real_proxy, outline):
    """Each request on a new connection, the id never sent back: served on the user's
    own default session (this failed with 400 "Missing session ID" before)."""
    proxy = real_proxy()
    carol, dave = outline.add_user("carol"), outline.add_user("dave")
    tools, text = connector_round(proxy.url, carol)
    assert "search_documents" in tools
    assert "Carol's note" in text and "Dave" not in text
    _, text = connector_round(proxy.url, dave)
    assert "Dave's note" in text and "Carol" not in text
    # a call without any initialize first works too (the proxy's own initialize)
    eve = outline.add_user("eve")
    r = connector_post(proxy.url, eve, rpc("tools/list"))
    assert r.status_code == 200 and "search_documents" in r.text


def test_a_client_that_initializes_before_every_call_leaks_nothing(real_proxy, outline):
    """#583: every call preceded by a new initialize. The sessions per user stay bounded
    (64), and the oldest upstream sessions are closed in the container with DELETE."""
    proxy = real_proxy()
    carol = outline.add_user("carol")
    name = proxy.container_name(carol)
    for i in range(70):
        assert connector_post(proxy.url, carol, rpc("initialize", INIT)).status_code == 200
        assert connector_post(proxy.url, carol, rpc("tools/list", id_=i + 2)).status_code == 200
    closed = re.findall(rf"closed an upstream session over the bound container={name} status=(\d+)", proxy.log())
    assert len(closed) >= 6 and set(closed) == {"200"}, closed
    mine = [c for c in proxy.stats()["containers"] if c["name"] == name][0]
    assert mine["sessions"] <= 65  # 64 client sessions and the default one


def test_sdk2_pinned_and_in_its_default_mode_settle_on_2026(real_proxy, outline, sdk2):
    proxy = real_proxy()
    carol = outline.add_user("carol")
    pinned = sdk2(proxy.url + "/mcp", carol, MODERN)
    assert pinned["protocol_version"] == MODERN
    assert "search_documents" in pinned["tools"]
    assert "Carol's note" in pinned["search"] and not pinned["is_error"]
    before = len(audit_lines(proxy))
    auto = sdk2(proxy.url + "/mcp", carol, "auto")
    assert auto["protocol_version"] == MODERN, "the default mode settles on 2026-07-28, no fallback"
    assert auto["server_name"], "the container's serverInfo, from discover"  # pinned mode synthesizes none
    assert "Carol's note" in auto["search"]
    lines = audit_lines(proxy)[before:]
    assert any('method="server/discover"' in line and " 200 " in line and "generation=2026-07-28" in line
               for line in lines), lines
    assert not any('method="initialize"' in line for line in lines), "no fallback to the handshake"


def test_2026_headers_are_checked_against_the_body(real_proxy, outline):
    proxy = real_proxy()
    carol = outline.add_user("carol")
    url = proxy.url

    def error_of(r, status, code):
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code, r.text
        return r.json()

    search = {"name": "search_documents", "arguments": {"query": "note"}}
    error_of(modern_post(url, carol, "tools/call", search, name="list_collections"), 400, -32020)
    error_of(modern_post(url, carol, "tools/call", search), 400, -32020)  # Mcp-Name missing
    error_of(modern_post(url, carol, "tools/list", headers={"Mcp-Method": "tools/call"}), 400, -32020)
    error_of(connector_post(url, carol, rpc("tools/list", {"_meta": meta()}),
                            headers={"MCP-Protocol-Version": MODERN}), 400, -32020)  # Mcp-Method missing
    # the body's version and the header's differ
    error_of(modern_post(url, carol, "tools/list", headers={"MCP-Protocol-Version": "2025-06-18"}), 400, -32020)
    # an unknown version: -32022 and the list of those supported
    unknown = {**meta(), "io.modelcontextprotocol/protocolVersion": "2099-01-01"}
    body = error_of(connector_post(url, carol, rpc("tools/list", {"_meta": unknown}),
                                   headers={"MCP-Protocol-Version": "2099-01-01", "Mcp-Method": "tools/list"}),
                    400, -32022)
    assert body["error"]["data"]["supported"][0] == MODERN and "2025-06-18" in body["error"]["data"]["supported"]
    # the base64 form of Mcp-Name is decoded before the comparison
    encoded = "=?base64?" + base64.b64encode(b"search_documents").decode() + "?="
    r = modern_post(url, carol, "tools/call", search, name=encoded)
    assert r.status_code == 200 and "Carol's note" in r.text, r.text
    # GET and DELETE have no place in 2026-07-28; a session id sent is ignored, none minted
    for method in ("GET", "DELETE"):
        with httpx.Client(timeout=30) as c:
            r = c.request(method, url + "/mcp", headers={"X-Outline-API-Key": carol, "MCP-Protocol-Version": MODERN,
                                                         "Accept": "text/event-stream"})
        assert r.status_code == 405 and r.headers["allow"] == "POST", (method, r.text)
    assert "Carol's note" in modern_search(url, carol, headers={"Mcp-Session-Id": "made-up"})
    # not one JSON-RPC message: parse error, batch
    with httpx.Client(timeout=30) as c:
        h = {"X-Outline-API-Key": carol, "Content-Type": "application/json"}
        error_of(c.post(url + "/mcp", headers=h, content=b"{nope"), 400, -32700)
        error_of(c.post(url + "/mcp", headers=h, json=[rpc("tools/list")]), 400, -32600)
    # a notification is accepted and goes nowhere
    r = connector_post(url, carol, rpc("notifications/cancelled", {"_meta": meta()}, id_=None),
                       headers={"MCP-Protocol-Version": MODERN, "Mcp-Method": "notifications/cancelled"})
    assert r.status_code == 202
    # discover: the container's identity and every version the proxy speaks
    r = modern_post(url, carol, "server/discover")
    result = r.json()["result"]
    assert result["supportedVersions"][0] == MODERN and "2025-03-26" in result["supportedVersions"]
    assert "tools" in result["capabilities"]
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"]


def test_subscriptions_listen_is_a_held_stream_with_keepalives(real_proxy, outline):
    proxy = real_proxy(sse_keepalive="1s")
    carol = outline.add_user("carol")
    params = {"notifications": {"toolsListChanged": True}, "_meta": meta()}
    h = {"X-Outline-API-Key": carol, "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": MODERN,
         "Mcp-Method": "subscriptions/listen"}
    seen = []
    with httpx.Client(timeout=httpx.Timeout(60, read=30)) as c:
        with c.stream("POST", proxy.url + "/mcp", headers=h, json=rpc("subscriptions/listen", params, id_=7)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                seen.append(line)
                if line.startswith(":"):
                    break
    ack = json.loads(seen[0][5:])
    assert ack["method"] == "notifications/subscriptions/acknowledged"
    assert ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == 7
    assert isinstance(ack["params"]["notifications"], dict)
    assert seen[-1].startswith(": keepalive")


def test_sessions_outlive_containers_in_all_three_generations(real_proxy, outline, tmp_path):
    """A handshake client that echoes its id, a connector that never does, and a 2026
    client: each keeps working across the container's sleep, its removal, and a
    restart of the proxy (whose session key lives in its state directory, as systemd's
    StateDirectory gives the service)."""
    proxy = real_proxy(idle_timeout="2s", sweep_interval="1s", state_dir=str(tmp_path))
    carol = outline.add_user("carol")
    name = proxy.container_name(carol)
    init = connector_post(proxy.url, carol, rpc("initialize", INIT))
    sid = init.headers["mcp-session-id"]
    connector_post(proxy.url, carol, rpc("notifications/initialized", id_=None), headers={"Mcp-Session-Id": sid})

    def all_three(when):
        echoed = connector_post(proxy.url, carol, rpc("tools/list", id_=5), headers={"Mcp-Session-Id": sid})
        assert echoed.status_code == 200 and echoed.headers["mcp-session-id"] == sid, (when, echoed.text)
        _, text = connector_round(proxy.url, carol)
        assert "Carol's note" in text, when
        assert "Carol's note" in modern_search(proxy.url, carol), when

    all_three("first")
    wait_for(lambda: proxy.state(name) == "exited", timeout=90, what="sleep")
    all_three("after sleep")
    docker("rm", "--force", name)
    all_three("after removal")
    proxy.env["MCP_PROXY_IDLE_TIMEOUT"] = "15m"
    proxy.restart()
    all_three("after a proxy restart")


def test_audit_line_and_metrics_per_method_and_tool(real_proxy, outline):
    proxy = real_proxy()
    carol = outline.add_user("carol", display_name='Carol "the" admin\nfake=1')
    connector_round(proxy.url, carol)
    modern_search(proxy.url, carol)
    lines = audit_lines(proxy)
    calls = [line for line in lines if 'method="tools/call"' in line]
    assert any('tool="search_documents" generation=handshake' in line for line in calls), lines
    assert any('tool="search_documents" generation=2026-07-28' in line for line in calls), lines
    assert all(re.search(r" 200 \d+ms user=\S", line) for line in calls), calls
    log = proxy.log()
    assert carol not in log, "never a key"
    assert '"query"' not in log and "arguments" not in log, "never arguments"
    assert '\nfake=1' not in log, "the user's name is escaped"
    metrics = proxy.get("/metrics").text
    assert re.search(r'mcp_proxy_mcp_calls_total\{method="tools/call"\} 2\b', metrics), metrics
    assert re.search(r'mcp_proxy_mcp_calls_total\{method="initialize"\} 1\b', metrics), metrics
    assert re.search(r'mcp_proxy_mcp_tool_calls_total\{tool="search_documents"\} 2\b', metrics), metrics


def test_the_same_at_the_oauth_resource(real_proxy, outline, sdk2):
    proxy = real_proxy()
    carol = outline.add_user("carol")
    _, tokens = scripted_tokens(proxy.url, carol)
    token = tokens["access_token"]
    _, text = connector_round(proxy.url, token, header="Authorization", path=OAUTH_PATH)
    assert "Carol's note" in text
    assert "Carol's note" in modern_search(proxy.url, token, header="Authorization", path=OAUTH_PATH)
    auto = sdk2(proxy.url + OAUTH_PATH, token, "auto", header="Authorization")
    assert auto["protocol_version"] == MODERN and "Carol's note" in auto["search"]
    with httpx.Client(timeout=30) as c:
        r = c.get(proxy.url + OAUTH_PATH, headers={"Authorization": f"Bearer {token}", "MCP-Protocol-Version": MODERN})
    assert r.status_code == 405


def test_every_generation_through_nginx(real_proxy, outline, sdk2, tmp_path):
    proxy = real_proxy()
    nginx = Nginx(tmp_path / "nginx-gen", [proxy.port])
    try:
        carol = outline.add_user("carol")
        _, text = connector_round(nginx.url, carol, verify=nginx.ssl)
        assert "Carol's note" in text
        assert "Carol's note" in modern_search(nginx.url, carol, verify=nginx.ssl)
        auto = sdk2(nginx.url + "/mcp", carol, "auto")
        assert auto["protocol_version"] == MODERN and "Carol's note" in auto["search"]
    finally:
        nginx.stop()
