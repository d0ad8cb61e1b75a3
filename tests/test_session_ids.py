"""Session ids the proxy can verify (issue 20, item 7): the proxy mints each client's
`Mcp-Session-Id` with a MAC that binds it to the user, under a key kept in the state
directory. An id it did not issue to this user gets 404 at once, before any container is
started, and never a held notification stream; its own ids still work after a restart;
held streams per user are capped, together with the user's requests in flight.

Raw HTTP against the release binary; the real mcp-outline server where a session must
really work, the test backend where only the proxy's answer matters."""

import json
import os
import socket
import stat
import time

import httpx

from conftest import wait_for

MCP_PATH = "/mcp"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "test-session-ids", "version": "1"}}}
MADE_UP = "0123456789abcdef" * 4  # the form of the proxy's ids, but not minted by it


def mcp_headers(key, session=None):
    headers = {"X-Outline-API-Key": key, "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json", "MCP-Protocol-Version": "2025-06-18"}
    if session:
        headers["Mcp-Session-Id"] = session
    return headers


def initialize(proxy, key):
    """A client's initialize and its `initialized` notification; the id it was given."""
    r = httpx.post(proxy.url + MCP_PATH, headers=mcp_headers(key), content=json.dumps(INITIALIZE), timeout=120)
    assert r.status_code == 200, r.text
    session = r.headers["mcp-session-id"]
    note = httpx.post(proxy.url + MCP_PATH, headers=mcp_headers(key, session),
                      content=json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), timeout=60)
    assert note.status_code in (200, 202), note.text
    return session


def tools_list(proxy, key, session):
    return httpx.post(proxy.url + MCP_PATH, headers=mcp_headers(key, session), timeout=120,
                      content=json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}))


def open_stream(proxy, key, session, timeout=10):
    """A raw GET notification stream: the socket (left open) and the answer's head."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.sendall((f"GET {MCP_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                  f"X-Outline-API-Key: {key}\r\nMcp-Session-Id: {session}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return sock, status, head.decode(errors="replace")


def held_streams(proxy):
    return proxy.stats()["sessions"]["held_streams"]


def test_a_made_up_id_gets_404_at_once_and_starts_no_container(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("nina")
    for made_up in (MADE_UP, "made-up-session"):
        t0 = time.monotonic()
        r = tools_list(proxy, key, made_up)
        took = time.monotonic() - t0
        assert r.status_code == 404, r.text
        assert r.json()["error"] == "session_not_found"
        assert took < 2, f"a made-up id took {took:.2f}s"
    # a GET with a made-up id is answered 404 too, never held as a stream
    sock, status, head = open_stream(proxy, key, MADE_UP)
    sock.close()
    assert status == 404, head
    assert held_streams(proxy) == 0
    assert proxy.containers() == [], "a made-up session id started a container"


def test_another_users_real_id_gets_404_and_wakes_nothing_of_theirs(make_proxy, outline):
    proxy = make_proxy()
    olga, mallory = outline.add_user("olga"), outline.add_user("mallory")
    olgas = initialize(proxy, olga)
    stolen = tools_list(proxy, mallory, olgas)
    assert stolen.status_code == 404 and stolen.json()["error"] == "session_not_found", stolen.text
    sock, status, head = open_stream(proxy, mallory, olgas)
    sock.close()
    assert status == 404, head
    assert proxy.containers() == [proxy.container_name(olga)], "mallory's container was started"
    assert tools_list(proxy, olga, olgas).status_code == 200
    assert olgas != "backend-session", "the client sees the proxy's id, never the container's"


def test_own_id_survives_a_restart_and_is_not_anyone_elses_then(real_proxy, outline, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    proxy = real_proxy(state_dir=str(state))
    paula, mallory = outline.add_user("paula"), outline.add_user("mallory")
    session = initialize(proxy, paula)
    assert "search_documents" in tools_list(proxy, paula, session).text

    proxy.restart()
    # after the restart, the first to present the id is another user: not theirs
    stolen = tools_list(proxy, mallory, session)
    assert stolen.status_code == 404, stolen.text
    assert "Paula" not in stolen.text
    # the id's owner goes on in the same session (the proxy opens one upstream for it)
    again = tools_list(proxy, paula, session)
    assert again.status_code == 200 and "search_documents" in again.text, again.text
    assert again.headers.get("mcp-session-id", session) == session
    assert proxy.containers() == [proxy.container_name(paula)]
    # the key: made once, readable by the proxy alone, never logged
    key_file = state / "session-key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert "made a new session key" in proxy.log() and proxy.log().count("made a new session key") == 1
    assert key_file.read_text().strip() not in proxy.log()


def test_held_streams_are_capped_per_user_and_freed_when_they_close(make_proxy, outline):
    proxy = make_proxy(user_max_streams=2, sse_keepalive="1s")
    key, other = outline.add_user("quinn"), outline.add_user("rosa")
    session = initialize(proxy, key)
    streams = []
    try:
        for _ in range(2):
            sock, status, head = open_stream(proxy, key, session)
            streams.append(sock)
            assert status == 200, head
        sock, status, head = open_stream(proxy, key, session)
        sock.close()
        assert status == 429, head
        assert "too_many_streams" in head and "Retry-After:" in head
        # the cap is the user's own: another user still gets a stream
        sock, status, head = open_stream(proxy, other, initialize(proxy, other))
        streams.append(sock)
        assert status == 200, head
        # a stream that closes frees its slot (the proxy notices at its next keep-alive)
        streams.pop(0).close()

        def slot_free():
            sock, status, _ = open_stream(proxy, key, session)
            if status == 200:
                streams.append(sock)
                return True
            sock.close()
            return False

        wait_for(slot_free, timeout=15, interval=0.5, what="the closed stream's slot to be freed")
    finally:
        for sock in streams:
            sock.close()


def test_held_streams_count_with_requests_in_flight(make_proxy, outline):
    proxy = make_proxy(user_max_inflight=2, user_max_streams=10, sse_keepalive="1s")
    key = outline.add_user("sam")
    session = initialize(proxy, key)
    streams = []
    try:
        for _ in range(2):
            sock, status, head = open_stream(proxy, key, session)
            streams.append(sock)
            assert status == 200, head
        busy = tools_list(proxy, key, session)
        assert busy.status_code == 429 and busy.json()["error"] == "too_many_requests", busy.text
        sock, status, head = open_stream(proxy, key, session)
        sock.close()
        assert status == 429, head
        streams.pop().close()
        wait_for(lambda: tools_list(proxy, key, session).status_code == 200, timeout=15, interval=0.5,
                 what="the closed stream's slot to be freed")
    finally:
        for sock in streams:
            sock.close()


def asleep(proxy, name):
    """Stopped, as the proxy knows it (not only as Docker says it)."""
    states = {c["name"]: c["state"] for c in proxy.stats()["containers"]}
    return states.get(name) == "stopped" and proxy.state(name) == "exited"


def test_a_session_ended_while_its_container_sleeps_wakes_nothing(make_proxy, outline):
    """A desktop app quitting DELETEs its session; when the container sleeps, the upstream
    session died with it: the proxy ends the client's session itself, at once, and does
    not boot the container to say goodbye."""
    proxy = make_proxy(idle_timeout="1s", sweep_interval="1s", spares="0")
    key = outline.add_user("quentin")
    name = proxy.container_name(key)
    session = initialize(proxy, key)
    wait_for(lambda: asleep(proxy, name), timeout=30, what="the idle container to sleep")
    t0 = time.monotonic()
    r = httpx.delete(proxy.url + MCP_PATH, headers=mcp_headers(key, session), timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert took < 1, f"the DELETE took {took:.2f}s"
    assert proxy.state(name) == "exited", "the DELETE woke the container"
    # another user's id is still theirs alone: a DELETE with it wakes nothing and ends nothing
    rita = outline.add_user("rita")
    ritas = initialize(proxy, rita)
    wait_for(lambda: asleep(proxy, proxy.container_name(rita)), timeout=30, what="rita's container to sleep")
    stolen = httpx.delete(proxy.url + MCP_PATH, headers=mcp_headers(key, ritas), timeout=30)
    assert stolen.status_code == 404, stolen.text
    assert proxy.state(proxy.container_name(rita)) == "exited"
    # and rita's own goodbye is hers to say
    assert httpx.delete(proxy.url + MCP_PATH, headers=mcp_headers(rita, ritas), timeout=30).status_code == 200
