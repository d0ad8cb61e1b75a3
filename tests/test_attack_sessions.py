"""Attacks on the proxy's session ids (issue 20, item 7), over raw sockets: forged,
altered, borrowed, replayed and oddly written `Mcp-Session-Id`s, made-up ids used to hold
connection slots, and secrets that must not reach the log. Each test asserts the safe
behaviour, so it fails if the defence gives way.

The test backend stands in for mcp-outline: it echoes what it received (so the test sees
which session id reached the container) and answers every request with the upstream
session `backend-session`."""

import json
import socket
import time

from conftest import wait_for

MCP_PATH = "/mcp"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "test-attack-sessions", "version": "1"}}}
TOOLS_LIST = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
UPSTREAM = "backend-session"  # the test backend's own session id


def raw(proxy, method, headers, body=b"", timeout=20):
    """One request over a fresh socket (Connection: close): (status, head, body)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    lines = [f"{method} {MCP_PATH} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    head = head.decode(errors="replace")
    if "transfer-encoding: chunked" in head.lower():
        rest = dechunk(rest)
    return status, head, rest


def dechunk(data):
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def mcp(key, session=None, extra=()):
    headers = [("Accept", "application/json, text/event-stream"), ("Content-Type", "application/json"),
               ("MCP-Protocol-Version", "2025-06-18")]
    if key is not None:
        headers.append(("X-Outline-API-Key", key))
    if session is not None:
        headers.append(("Mcp-Session-Id", session))
    return headers + list(extra)


def session_header(head):
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "mcp-session-id":
            return value.strip()
    return None


def initialize(proxy, key):
    status, head, body = raw(proxy, "POST", mcp(key), INITIALIZE, timeout=120)
    assert status == 200, (head, body)
    session = session_header(head)
    assert session and len(session) == 64, head
    return session


def upstream_ids(body):
    """The Mcp-Session-Id values the container received (the backend echoes them)."""
    return [v for n, v in json.loads(body)["headers"] if n.lower() == "mcp-session-id"]


def refused(status, body):
    return status == 404 and json.loads(body).get("error") == "session_not_found"


def open_stream(proxy, key, session, accept="text/event-stream", timeout=10):
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    lines = [f"GET {MCP_PATH} HTTP/1.1", "Host: 127.0.0.1", f"Accept: {accept}"]
    if key is not None:
        lines.append(f"X-Outline-API-Key: {key}")
    lines.append(f"Mcp-Session-Id: {session}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return sock, status, head.decode(errors="replace")


def flip(hex_id, at):
    c = hex_id[at]
    return hex_id[:at] + ("1" if c == "0" else "0") + hex_id[at + 1:]


def test_forged_altered_and_cut_ids_are_refused_before_any_container(make_proxy, outline):
    """(a) An id not minted for the user, in any near form of a real one, gets 404 and
    wakes nothing; the user's real id still works."""
    proxy = make_proxy()
    alice, mallory = outline.add_user("alice"), outline.add_user("mallory")
    real = initialize(proxy, alice)
    forged = [
        flip(real, 0),                   # one bit of the random part
        flip(real, 63),                  # one bit of the MAC
        real[:32] + "0" * 32,            # the random part with a zero MAC
        real[:32],                       # the random part alone
        real[:62],                       # cut short by a byte
        real + "00",                     # a byte too long
        real[32:] + real[:32],           # the halves swapped
        "0" * 64, "f" * 64,
    ]
    for bad in forged:
        status, head, body = raw(proxy, "POST", mcp(alice, bad), TOOLS_LIST)
        assert refused(status, body), (bad, status, body)
    # another user presenting alice's id or its forms: refused, and their container never starts
    for bad in [real] + forged:
        status, head, body = raw(proxy, "POST", mcp(mallory, bad), TOOLS_LIST)
        assert refused(status, body), (bad, status, body)
    assert proxy.containers() == [proxy.container_name(alice)]
    status, head, body = raw(proxy, "POST", mcp(alice, real), TOOLS_LIST)
    assert status == 200 and upstream_ids(body) == [UPSTREAM], body


def test_no_key_with_a_real_id_gets_401_and_no_stream(make_proxy, outline):
    """(a) A real id without the user's key is nothing: 401, not held, no container."""
    proxy = make_proxy()
    alice = outline.add_user("alice")
    real = initialize(proxy, alice)
    proxy_containers = proxy.containers()
    for key in (None, "ol_api_not_a_real_key_000000000000"):
        status, head, body = raw(proxy, "POST", mcp(key, real), TOOLS_LIST)
        assert status == 401, (status, body)
        sock, status, head = open_stream(proxy, key, real)
        sock.close()
        assert status == 401, head
    assert proxy.stats()["sessions"]["held_streams"] == 0
    assert proxy.containers() == proxy_containers


def test_only_the_minted_form_of_an_id_is_accepted(make_proxy, outline):
    """(c) Upper or mixed case hex decodes to the same bytes as a real id: it must not
    pass for it (it would be a second session entry for one id)."""
    proxy = make_proxy()
    alice = outline.add_user("alice")
    real = initialize(proxy, alice)
    assert real == real.lower()
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(real))
    for variant in (real.upper(), mixed):
        assert variant != real
        status, head, body = raw(proxy, "POST", mcp(alice, variant), TOOLS_LIST)
        assert refused(status, body), (variant, status, body)
        sock, status, head = open_stream(proxy, alice, variant)
        sock.close()
        assert status == 404, head


def test_an_ended_session_stays_ended_whatever_its_spelling(make_proxy, outline):
    """(a) replay: after the client's DELETE, its id never gets an upstream session again,
    neither as written nor as another spelling of the same bytes."""
    proxy = make_proxy()
    alice = outline.add_user("alice")
    real = initialize(proxy, alice)
    status, head, body = raw(proxy, "DELETE", mcp(alice, real))
    assert status == 200, body
    for replay in (real, real.upper()):
        status, head, body = raw(proxy, "POST", mcp(alice, replay), TOOLS_LIST)
        if status == 200:
            assert UPSTREAM not in upstream_ids(body), f"ended session {replay} was opened again: {body}"
        else:
            assert status == 404, (status, body)


def test_odd_session_headers_confuse_neither_the_check_nor_the_container(make_proxy, outline):
    """(c) Duplicate headers, lists, separators, long and non-hex ids."""
    proxy = make_proxy()
    alice, mallory = outline.add_user("alice"), outline.add_user("mallory")
    real, theirs = initialize(proxy, alice), initialize(proxy, mallory)
    # a made-up or foreign id first, the real one second: the first decides, refused
    for first in ("0" * 64, theirs):
        status, head, body = raw(proxy, "POST", mcp(alice, first, [("mcp-session-id", real)]), TOOLS_LIST)
        assert refused(status, body), (status, body)
    # the real id first, another user's second: the container sees only the upstream id
    status, head, body = raw(proxy, "POST", mcp(alice, real, [("MCP-SESSION-ID", theirs)]), TOOLS_LIST)
    if status == 200:
        assert set(upstream_ids(body)) == {UPSTREAM}, body
    else:
        assert status in (400, 404), (status, body)
    # lists and separators around a real id, non-hex, embedded whitespace
    for odd in (f"{real},{real}", f"{real}, {theirs}", f"{real};x", f"{real[:32]} {real[32:]}",
                f"{real[:32]}-{real[32:]}", "g" * 64, real.replace(real[0], "z"), "0x" + real[2:],
                "../" + real, "%30" * 32):
        status, head, body = raw(proxy, "POST", mcp(alice, odd), TOOLS_LIST)
        assert refused(status, body), (odd, status, body)
    # very long ids: refused cleanly, not echoed in full, the log holds none of it
    for size in (4096, 60000):
        long_id = ("ab" * size)[:size]
        status, head, body = raw(proxy, "POST", mcp(alice, long_id), TOOLS_LIST)
        assert status in (400, 404, 413, 431), (status, body[:200])
        assert long_id.encode() not in body and long_id not in head
        assert long_id[:200] not in proxy.log()
    # control characters and a bare CR: 400, never a split header
    status, head, body = raw(proxy, "POST", mcp(alice, real + "\x0bX-Injected: 1"), TOOLS_LIST)
    assert status in (400, 404), (status, body)
    # the proxy goes on serving
    status, head, body = raw(proxy, "POST", mcp(alice, real), TOOLS_LIST)
    assert status == 200 and upstream_ids(body) == [UPSTREAM], body


def test_made_up_ids_hold_no_slots_and_wake_nothing(make_proxy, outline):
    """(b) Many GET streams and POSTs with made-up ids from a user with no container:
    each answered at once, no stream held, no container started, and others unaffected."""
    proxy = make_proxy(user_max_streams=2)
    mallory, bob = outline.add_user("mallory"), outline.add_user("bob")
    t0 = time.monotonic()
    for i in range(60):
        sock, status, head = open_stream(proxy, mallory, f"{i:064x}")
        sock.close()
        assert status == 404, head
        status, head, body = raw(proxy, "POST", mcp(mallory, f"{i:064x}"), TOOLS_LIST)
        assert refused(status, body), (status, body)
    took = time.monotonic() - t0
    assert took < 30, f"120 made-up ids took {took:.1f}s"
    assert proxy.stats()["sessions"]["held_streams"] == 0
    assert proxy.containers() == []
    # the refusals took no stream slot another user needs
    real = initialize(proxy, bob)
    sock, status, head = open_stream(proxy, bob, real)
    sock.close()
    assert status == 200, head


def test_the_stream_cap_holds_whatever_the_accept_header_says(make_proxy, outline):
    """(b) Accept written otherwise (case, parameters, lists) is still a held stream and
    still counted; it never reaches the container as an uncounted GET."""
    proxy = make_proxy(user_max_streams=2, sse_keepalive="1s")
    alice = outline.add_user("alice")
    real = initialize(proxy, alice)
    streams = []
    try:
        for accept in ("TEXT/EVENT-STREAM", "application/json, text/event-stream;q=0.9"):
            sock, status, head = open_stream(proxy, alice, real, accept=accept)
            streams.append(sock)
            assert status == 200, head
        for accept in ("text/event-stream", " text/event-stream ", "*/*, Text/Event-Stream"):
            sock, status, head = open_stream(proxy, alice, real, accept=accept)
            sock.close()
            assert status == 429, (accept, head)
        assert proxy.stats()["sessions"]["held_streams"] == 2
    finally:
        for sock in streams:
            sock.close()


def test_one_users_held_streams_do_not_starve_another(make_proxy, outline):
    """(b)/(e) One user at their stream cap, hammering: another user still initializes,
    calls and holds a stream."""
    proxy = make_proxy(user_max_streams=3, sse_keepalive="1s")
    mallory, bob = outline.add_user("mallory"), outline.add_user("bob")
    theirs = initialize(proxy, mallory)
    streams = []
    try:
        for _ in range(3):
            sock, status, head = open_stream(proxy, mallory, theirs)
            streams.append(sock)
            assert status == 200, head
        for _ in range(20):
            sock, status, head = open_stream(proxy, mallory, theirs)
            sock.close()
            assert status == 429, head
        real = initialize(proxy, bob)
        sock, status, head = open_stream(proxy, bob, real)
        streams.append(sock)
        assert status == 200, head
        status, head, body = raw(proxy, "POST", mcp(bob, real), TOOLS_LIST)
        assert status == 200 and upstream_ids(body) == [UPSTREAM], body
    finally:
        for sock in streams:
            sock.close()
    # closed streams give their slots back
    wait_for(lambda: proxy.stats()["sessions"]["held_streams"] == 0, timeout=15, interval=0.5,
             what="the held streams to be let go")


def test_session_key_and_ids_stay_out_of_log_stats_and_arguments(make_proxy, outline, tmp_path):
    """(d) The session key file is the proxy's alone; neither it nor the ids it mints
    appear in the log, /stats, /metrics or the process's arguments."""
    import os
    import stat

    state = tmp_path / "state"
    state.mkdir()
    proxy = make_proxy(state_dir=str(state))
    alice = outline.add_user("alice")
    real = initialize(proxy, alice)
    raw(proxy, "POST", mcp(alice, real), TOOLS_LIST)
    raw(proxy, "POST", mcp(alice, flip(real, 5)), TOOLS_LIST)
    key_file = state / "session-key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    secret = key_file.read_text().strip()
    assert len(secret) == 64
    pid = proxy.process.pid
    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    log = proxy.log()
    stats = json.dumps(proxy.stats())
    with proxy.client() as c:
        metrics = c.get("/metrics").text
    for where, text in (("log", log), ("cmdline", cmdline), ("stats", stats), ("metrics", metrics)):
        assert secret not in text, f"the session key is in the {where}"
        assert real not in text and real[:32] not in text, f"a session id is in the {where}"
