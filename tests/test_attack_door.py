"""Attacks on the front door (the unread-body rule, the strict chunked reader, the one
parse of MCP bodies, the client's address) over raw sockets, against the release binary.
Each test asserts the safe behaviour: no byte of a body is ever read as a request, no
second answer, bad framing refused with one answer and a close, a spoofed X-Real-IP
from an untrusted peer ignored, and the proxy keeps running."""

import json
import socket
import time

import httpx
import pytest

from test_oauth import oauth_proxy  # noqa: F401  (the fixture)

from test_smuggling import (SMUGGLED, SERVED_SMUGGLED, answers, assert_one_answer_then_close, chunked,
                            exchange, read_until_closed, warm)  # noqa: F401  (warm: the fixture)

HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
FORM = b'{"redirect_uris": ["https://claude.ai/api/mcp/auth_callback"], "client_name": "x"}'


def head(*lines):
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def register_head(*extra):
    return head("POST /oauth/register HTTP/1.1", "Host: localhost", "Content-Type: application/json", *extra)


# --- chunked bodies a lax reader would frame otherwise ---

# (what, framing headers, body bytes as sent): each carries the hidden request where a
# reader that framed the body otherwise would start the next request
MIS_FRAMED = [
    ("0x size", ["Transfer-Encoding: chunked"], b"0x10\r\n" + FORM[:16] + b"\r\n0\r\n\r\n" + SMUGGLED),
    ("plus size", ["Transfer-Encoding: chunked"], b"+5\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("LF-only lines", ["Transfer-Encoding: chunked"], b"5\nhello\n0\n\n" + SMUGGLED),
    ("size overflowing 64 bits", ["Transfer-Encoding: chunked"],
     b"10000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("space inside the size", ["Transfer-Encoding: chunked"], b"5 5\r\n" + b"h" * 0x55 + b"\r\n0\r\n\r\n" + SMUGGLED),
    ("chunk longer than its size", ["Transfer-Encoding: chunked"], b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("chunked, chunked", ["Transfer-Encoding: chunked, chunked"], chunked(FORM) + SMUGGLED),
    ("identity", ["Transfer-Encoding: identity", f"Content-Length: {len(FORM)}"], FORM + SMUGGLED),
    ("two encodings", ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], chunked(FORM) + SMUGGLED),
    ("length and chunked", ["Content-Length: 5", "Transfer-Encoding: chunked"], chunked(FORM) + SMUGGLED),
    ("obs-fold", ["Transfer-Encoding:", " chunked"], chunked(FORM) + SMUGGLED),
    ("space before the colon", ["Transfer-Encoding : chunked"], chunked(FORM) + SMUGGLED),
    ("two lengths", ["Content-Length: 3", f"Content-Length: {len(FORM)}"], FORM + SMUGGLED),
    ("signed length", [f"Content-Length: +{len(FORM)}"], FORM + SMUGGLED),
    ("hex length", ["Content-Length: 0x10"], FORM + SMUGGLED),
    ("trailer hiding a request", ["Transfer-Encoding: chunked"],
     b"5\r\nhello\r\n0\r\n" + SMUGGLED),  # the request's lines are the trailers: read as such
    ("cut short by the client", ["Transfer-Encoding: chunked"], b"ff\r\n" + SMUGGLED),
]


@pytest.mark.parametrize("what, framing, body", MIS_FRAMED, ids=[m[0] for m in MIS_FRAMED])
def test_a_body_framed_two_ways_is_never_a_request(warm, what, framing, body):
    proxy, _ = warm
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        s.sendall(register_head(*framing) + body)
        if what == "cut short by the client":
            s.shutdown(socket.SHUT_WR)
        received, closed = read_until_closed(s, 8)
    finally:
        s.close()
    found, rest = answers(received)
    assert len(found) <= 1 and rest == b"", f"{what}: {received[:800]!r}"
    assert closed, f"{what}: left open"
    time.sleep(0.2)
    assert not SERVED_SMUGGLED.search(proxy.log()), f"{what}: the hidden request was served"
    assert proxy.get("/health").status_code == 200


@pytest.mark.parametrize("size_line", [b"0010", b"10;name=value", b"10 ;x", b"10\t;x", b"000000000000010"])
def test_valid_chunk_spellings_frame_the_body_exactly(warm, size_line):
    """Leading zeros and extensions are valid: the body is read exactly, and the request
    pipelined after it is answered as the second answer, nothing between."""
    proxy, _ = warm
    form = FORM.ljust(0x10 * 6, b" ")
    wire = b"".join(size_line + b"\r\n" + form[i:i + 16] + b"\r\n" for i in range(0, len(form), 16))
    data = register_head("Transfer-Encoding: chunked") + wire + b"0\r\n\r\n" + HEALTH.replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    received, closed = exchange(proxy.port, data)
    found, rest = answers(received)
    assert [f[0] for f in found] == [201, 200] and rest == b"", received[:800]


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_a_body_on_a_bodiless_method_is_not_a_request(warm, method):
    proxy, key = warm
    for framing, body in [(["Transfer-Encoding: chunked"], chunked(SMUGGLED)),
                          ([f"Content-Length: {len(SMUGGLED)}"], SMUGGLED),
                          ([f"Content-Length: {len(SMUGGLED) + 4000}"], SMUGGLED + b"z" * 4000)]:
        data = head(f"{method} /mcp HTTP/1.1", "Host: localhost", f"X-Outline-API-Key: {key}",
                    "Accept: application/json, text/event-stream", *framing) + body
        received, closed = exchange(proxy.port, data)
        found, rest = answers(received)
        assert len(found) == 1, (method, framing, received[:600])
        time.sleep(0.1)
        assert not SERVED_SMUGGLED.search(proxy.log()), (method, framing)


def test_a_body_sent_after_a_refused_expect_is_not_a_request(warm):
    """Expect: 100-continue refused before the body (413 on the declared length): the
    client sends the body anyway; it is thrown away, never read as a request."""
    proxy, _ = warm
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        s.sendall(register_head("Expect: 100-continue", "Content-Length: 20000"))
        time.sleep(0.3)
        s.sendall(SMUGGLED * 400)
        received, closed = read_until_closed(s, 8)
    finally:
        s.close()
    found, rest = answers(received)
    statuses = [f[0] for f in found]
    assert statuses in ([413], [100, 413]) or statuses[-1] == 413, received[:600]
    assert closed
    assert not SERVED_SMUGGLED.search(proxy.log())


def test_a_connection_upgrade_header_does_not_unframe_a_body(warm):
    """nginx sends `Connection: upgrade` whenever its client sent any Upgrade header
    (curl --http2 sends `Upgrade: h2c`), with a framed body. The body ends where its
    Content-Length says: the answer comes at once (not after the header timeout,
    waiting for the rest of the connection as a body), and the pipelined request after
    it is never part of the body."""
    proxy, key = warm
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    data = head("POST /mcp HTTP/1.1", "Host: localhost", f"X-Outline-API-Key: {key}",
                "Accept: application/json, text/event-stream", "Content-Type: application/json",
                "Connection: upgrade", "Upgrade: h2c", f"Content-Length: {len(body)}") + body
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        s.sendall(data + SMUGGLED)
        started = time.monotonic()
        s.settimeout(4)  # the warm proxy's header timeout is 5 s
        first = s.recv(65536)
        took = time.monotonic() - started
    finally:
        s.close()
    assert first.startswith(b"HTTP/1.1 "), first[:300]
    assert took < 4, f"the answer waited {took:.1f}s for the connection's end"
    assert not first.startswith(b"HTTP/1.1 400"), first[:400]
    time.sleep(0.2)
    assert not SERVED_SMUGGLED.search(proxy.log())


@pytest.mark.parametrize("framing", [[], ["Content-Length: 0"]])
def test_a_connection_upgrade_header_on_an_empty_post_takes_nothing_after_it(warm, framing):
    """A POST without a body (none declared, or 0) and `Connection: upgrade`: its body
    is empty, not the rest of the connection: answered at once (a parse error closes
    the connection; the pipelined request is never read into the body)."""
    proxy, key = warm
    data = head("POST /mcp HTTP/1.1", "Host: localhost", f"X-Outline-API-Key: {key}",
                "Accept: application/json, text/event-stream", "Content-Type: application/json",
                "Connection: upgrade", "Upgrade: h2c", *framing)
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        s.sendall(data + HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        started = time.monotonic()
        received, closed = read_until_closed(s, 4)
        took = time.monotonic() - started
    finally:
        s.close()
    found, rest = answers(received)
    assert took < 4 and closed, f"waited {took:.1f}s: {received[:300]!r}"
    assert [f[0] for f in found] in ([400], [400, 200]), received[:600]
    assert b"-32700" in found[0][2] and b"GET /health" not in received


# --- the one parse of MCP bodies ---

def mcp_raw(proxy, key, body, extra=()):
    data = head("POST /mcp HTTP/1.1", "Host: localhost", f"X-Outline-API-Key: {key}",
                "Accept: application/json, text/event-stream", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close", *extra) + body
    received, _ = exchange(proxy.port, data, timeout=30)
    found, _ = answers(received)
    assert len(found) == 1, received[:600]
    return found[0]


@pytest.mark.parametrize("depth", [127, 129, 10_000, 500_000])
def test_deep_json_nesting_is_refused_and_the_proxy_lives(warm, depth):
    proxy, key = warm
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":' + \
        b"[" * depth + b"]" * depth + b"}}}"
    if len(body) > 1024 * 1024:
        pytest.skip("beyond the test proxy's body limit")
    status, _, answer = mcp_raw(proxy, key, body)
    assert status in (200, 400, 404), (status, answer[:300])
    if depth > 128:
        assert status == 400 and b"-32700" in answer, answer[:300]
    assert proxy.get("/health").status_code == 200
    assert proxy.process.poll() is None


def test_a_body_exactly_at_the_limit_is_read_and_one_past_it_refused(warm):
    proxy, key = warm
    limit = 1024 * 1024
    prefix = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"pad":"'
    suffix = b'"}}'
    at = prefix + b"p" * (limit - len(prefix) - len(suffix)) + suffix
    assert len(at) == limit
    status, _, answer = mcp_raw(proxy, key, at)
    assert status != 413, answer[:300]
    over = prefix + b"p" * (limit + 1 - len(prefix) - len(suffix)) + suffix
    status, _, answer = mcp_raw(proxy, key, over)
    assert status == 413, answer[:300]
    # the same, chunked (no declared length): at the limit read, one past refused and closed
    for body, expect in [(at, None), (over, 413)]:
        data = head("POST /mcp HTTP/1.1", "Host: localhost", f"X-Outline-API-Key: {key}",
                    "Accept: application/json, text/event-stream", "Content-Type: application/json",
                    "Transfer-Encoding: chunked") + chunked(body, 8192) + (SMUGGLED if expect else b"")
        received, closed = exchange(proxy.port, data, timeout=30)
        found, rest = answers(received)
        assert len(found) >= 1, received[:300]
        if expect:
            assert found[0][0] == expect and closed and len(found) == 1
        else:
            assert found[0][0] != 413
    assert not SERVED_SMUGGLED.search(proxy.log())


# --- the client's address ---

def raw_register(port, extra):
    data = register_head(f"Content-Length: {len(FORM)}", "Connection: close", *extra) + FORM
    received, _ = exchange(port, data)
    return answers(received)[0][0][0]


@pytest.mark.parametrize("spoof", [
    ["X-Real-IP: 203.0.113.{i}"],
    ["X-Real-IP: ::ffff:203.0.113.{i}"],
    ["X-Forwarded-For: 203.0.113.{i}"],
    ["X-Real-IP: 192.0.2.10", "X-Real-IP: 203.0.113.{i}"],
    ["X-Real-Ip: 2001:db8:{i}::1"],
])
def test_an_untrusted_peer_cannot_choose_its_address(make_proxy, outline, spoof):
    """Only 192.0.2.10 is trusted: loopback is one client whatever it writes."""
    proxy = make_proxy(oauth_register_limit="3", trusted_proxy="192.0.2.10, ::ffff:127.0.0.2")
    statuses = [raw_register(proxy.port, [h.format(i=i) for h in spoof]) for i in range(1, 6)]
    assert statuses == [201] * 3 + [429] * 2, statuses


def test_a_trusted_proxy_named_as_mapped_ipv6_is_the_same_peer(make_proxy, outline):
    """MCP_PROXY_TRUSTED_PROXY=::ffff:127.0.0.1 trusts 127.0.0.1 (a dual-stack socket's
    spelling): X-Real-IP is read; IPv4-mapped client addresses count as their IPv4."""
    proxy = make_proxy(oauth_register_limit="2", trusted_proxy="::ffff:127.0.0.1")
    assert [raw_register(proxy.port, [f"X-Real-IP: 203.0.113.{i}"]) for i in range(1, 5)] == [201] * 4
    # one client, spelled two ways, is one bucket
    statuses = [raw_register(proxy.port, [f"X-Real-IP: {ip}"])
                for ip in ["198.51.100.7", "::ffff:198.51.100.7", "::ffff:c633:6407"]]
    assert statuses == [201, 201, 429], statuses


def test_a_websocket_handshake_with_a_body_is_refused(warm):
    """A handshake is a GET without a body: one declaring a body is refused (400) and
    closed, its body never taken for the session's frames nor for a request."""
    proxy, key = warm
    for framing, body in [([f"Content-Length: {len(SMUGGLED)}"], SMUGGLED),
                          (["Transfer-Encoding: chunked"], chunked(SMUGGLED))]:
        data = head("GET /mcp HTTP/1.1", "Host: localhost", f"X-Outline-API-Key: {key}", "Connection: Upgrade",
                    "Upgrade: websocket", "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", *framing) + body
        received, closed = exchange(proxy.port, data)
        status = assert_one_answer_then_close(received, closed, f"a handshake with {framing}")
        assert status == 400, received[:400]
    time.sleep(0.2)
    assert not SERVED_SMUGGLED.search(proxy.log())


# --- the grants' journal ---

def test_a_damaged_journal_starts_and_resurrects_nothing(oauth_proxy, outline):
    """The journal, while the proxy is stopped (killed), gets a line of garbage in its
    middle and its last line cut short. The proxy starts; the revoked grant stays revoked,
    the kept one works; a revocation made after the restart is appended on a line of its
    own (not glued to the cut one) and survives another kill."""
    from test_grants import REDIRECT, sign_in
    from oauth_client import mcp_initialize, refresh, register

    proxy = oauth_proxy()
    dave = outline.add_user("dave")
    client_id = register(proxy.url, REDIRECT)
    kept, revoked, later = (sign_in(proxy, client_id, dave) for _ in range(3))
    assert httpx.post(proxy.url + "/oauth/revoke", data={"token": revoked["refresh_token"]}).status_code == 200
    proxy.stop(sig=9)
    journal = proxy.state_dir / "oauth-grants.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 4, lines
    damaged = b"".join(lines[:1]) + b'{"op":"grant_gone","id":\n' + b"".join(lines[1:]) + lines[-1][:17]
    journal.write_bytes(damaged)
    proxy.start()
    assert mcp_initialize(proxy.url, kept["access_token"]).status_code == 200
    assert mcp_initialize(proxy.url, revoked["access_token"]).status_code == 401
    assert refresh(proxy.url, client_id, revoked["refresh_token"]).json()["error"] == "invalid_grant"
    assert httpx.post(proxy.url + "/oauth/revoke", data={"token": later["refresh_token"]}).status_code == 200
    proxy.stop(sig=9)
    proxy.start()
    assert mcp_initialize(proxy.url, later["access_token"]).status_code == 401
    assert mcp_initialize(proxy.url, kept["access_token"]).status_code == 200


# --- the lingering close ---

def test_a_client_dripping_into_a_lingering_close_is_cut_off(warm):
    """The lingering close after a refused body reads and throws away for at most 5 s:
    a client that keeps sending a byte every 200 ms cannot hold the connection's
    thread longer."""
    proxy, _ = warm
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        s.sendall(register_head("Content-Length: 100000000"))
        s.settimeout(0.2)
        received, started, closed = b"", time.monotonic(), False
        while time.monotonic() - started < 12:
            try:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                received += chunk
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed = True
                break
            try:
                s.send(b"x")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        took = time.monotonic() - started
    finally:
        s.close()
    assert received.startswith(b"HTTP/1.1 413"), received[:300]
    assert closed and took < 8, f"held {took:.1f}s"


# --- redirect URIs ---

EVASIONS = [
    "https://evil.example\t.claude.ai/cb", "https://claude.ai\n@evil.example/", "https:\\\\evil.example/cb",
    "https:/evil.example/cb", "https:evil.example/cb", "https:///evil.example/cb", "JavaScript:alert(1)//",
    " javascript:alert(1)", "java\tscript:alert(1)", "http://localhost./cb", "http://127.0.0.1.evil.example/cb",
    "http://127.1/cb", "http://0x7f000001/cb", "http://2130706433/cb", "http://localhost%2eevil.example/cb",
    "http://127.0.0.1:80@evil.example/cb", "http://[::ffff:7f00:1]x/cb", "https://xn--clude-7ve.ai\u3002evil/cb",
    "https://claude.ai%40evil.example/cb", "http://evil.example#@127.0.0.1/cb", "HTTP://evil.example/cb",
    "Http://127.0.0.1.nip.io/cb", "data:text/html,x", "DATA:text/html,x", "file:///etc/passwd",
]


def test_redirect_uri_evasions_are_refused(make_proxy, outline):
    proxy = make_proxy(oauth_register_limit="1000")
    for uri in EVASIONS:
        r = httpx.post(proxy.url + "/oauth/register",
                       content=json.dumps({"client_name": "Sly", "redirect_uris": [uri]}, ensure_ascii=False).encode(),
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_redirect_uri", (uri, r.status_code, r.text)
