"""Attacks on the wire after tiny_http's head reader became buffered (PATCHES.md rows 20
and 21: a head read a buffered piece at a time, the reader and writer handed from one
request to the next through a one-value slot), over raw sockets against the release
binary. A buffered reader that reads past a head into the body or the next request must
hand those bytes, once and in order, to the request they belong to: each test pipelines
requests with distinct targets, splits them across writes at every byte, crosses the
reader's 1 KiB buffer, drips, and streams, and asserts exactly the answers that should
come, in order, each the answer to its own request (the test backend's /echo says which
target and which body bytes it received), and that no byte of a body was ever a request
(the backend's /seen lists every target it received). Then two redemptions of one OAuth
code at the same instant: never both, and the replay revokes what the first was given."""

import hashlib
import json
import socket
import threading
import time

import pytest

from conftest import wait_for
from test_smuggling import read_until_closed, warm  # noqa: F401  (warm: the fixture)

# bytes that would be a request if a body were ever read as one: the backend records
# every target it receives, so a target with HIDDEN in it must never appear at /seen
HIDDEN = "hidden"


def hidden_request(tag):
    return f"GET /echo/{HIDDEN}-{tag} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def request(method, path, key=None, body=None, chunks=None, extra=(), close=False):
    """One request's bytes: a Content-Length body, or `chunks` as a chunked body."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if key:
        lines.append(f"X-Outline-API-Key: {key}")
    lines += list(extra)
    if close:
        lines.append("Connection: close")
    tail = b""
    if chunks is not None:
        lines.append("Transfer-Encoding: chunked")
        tail = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"
    elif body is not None:
        lines.append(f"Content-Length: {len(body)}")
        tail = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + tail


class Expect:
    """An answer expected: its status, and for /echo the target and body the backend
    must have received (its length and sha256)."""

    def __init__(self, method, status=200, target=None, body=b""):
        self.method, self.status, self.target, self.body = method, status, target, body


def echo(tag, key, body=None, chunks=None, **kw):
    """A request to the backend's /echo and the answer it must get."""
    path = f"/echo/{tag}"
    method = "POST" if body is not None or chunks is not None else "GET"
    sent = body if body is not None else b"".join(chunks or [])
    return request(method, path, key, body=body, chunks=chunks, **kw), Expect(method, target=path, body=sent)


def health(method="GET", **kw):
    return request(method, "/health", **kw), Expect(method)


def parse_answers(data, methods):
    """The answers in `data` in order, each (status, headers, body); interim 1xx answers
    are returned too (their method is the next final answer's). What follows the last
    whole answer is returned as the rest."""
    found, i = [], 0
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.1 "):
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        method = methods[i] if i < len(methods) else "GET"
        if 100 <= status < 200 or method == "HEAD" or status in (204, 304):
            body, data = b"", rest
        elif "content-length" in headers:
            n = int(headers["content-length"][0])
            if len(rest) < n:
                break
            body, data = rest[:n], rest[n:]
        elif "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
            body, data, whole = b"", rest, False
            while True:
                size_line, sep, after = data.partition(b"\r\n")
                if not sep:
                    break
                n = int(size_line.split(b";")[0], 16)
                if n == 0:
                    if after.startswith(b"\r\n"):
                        data, whole = after[2:], True
                    break
                if len(after) < n + 2:
                    break
                body, data = body + after[:n], after[n + 2:]
            if not whole:
                break
        else:
            body, data = rest, b""
        found.append((status, headers, body))
        if not 100 <= status < 200:
            i += 1
    return found, data


def check_answers(received, expected, what, interim=()):
    """Exactly the expected answers, in order, each its own request's; nothing after."""
    found, rest = parse_answers(received, [e.method for e in expected])
    finals = [f for f in found if not 100 <= f[0] < 200]
    assert [f[0] for f in found if 100 <= f[0] < 200] == list(interim), f"{what}: {received[:400]!r}"
    assert rest == b"", f"{what}: bytes after the last answer: {rest[:300]!r}"
    assert [f[0] for f in finals] == [e.status for e in expected], f"{what}: {received[:1500]!r}"
    for (status, headers, body), e in zip(finals, expected):
        if e.target is None:
            continue
        seen = json.loads(body)
        assert seen["target"] == e.target, f"{what}: the answer to {e.target} was {seen['target']}'s"
        assert seen["method"] == e.method, f"{what}: {seen}"
        assert (seen["body_len"], seen["body_sha256"]) == (len(e.body), hashlib.sha256(e.body).hexdigest()), \
            f"{what}: {e.target} received another body ({seen['body_len']} bytes)"
    return finals


def pipeline(*pairs):
    return b"".join(p[0] for p in pairs), [p[1] for p in pairs]


def connect(proxy, timeout=10):
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def send_in_pieces(proxy, pieces, pause=0.002, timeout=10):
    """The pieces as separate writes (a pause between, so that each is its own read),
    then everything the proxy sends until it closes."""
    s = connect(proxy, timeout)
    try:
        for n, piece in enumerate(pieces):
            if n:
                time.sleep(pause)
            s.sendall(piece)
        received, closed = read_until_closed(s, timeout)
    finally:
        s.close()
    assert closed, f"the connection was left open: {received[-300:]!r}"
    return received


def assert_nothing_hidden_was_served(proxy, key):
    seen = proxy.get("/seen", key=key)
    assert seen.status_code == 200, seen.text
    assert not [t for t in seen.json() if HIDDEN in t], seen.json()
    assert HIDDEN not in proxy.log()


def mixed_pipeline(key, tag):
    """Every way a body is framed and read, each body holding a whole request."""
    return pipeline(
        echo(f"{tag}-get", key),
        echo(f"{tag}-small", key, body=hidden_request(f"{tag}-a").ljust(1024, b"s")),  # read while parsing
        echo(f"{tag}-large", key, body=hidden_request(f"{tag}-b").ljust(1025, b"l")),  # read by the relay
        echo(f"{tag}-chunked", key, chunks=[hidden_request(f"{tag}-c"), b"x" * 700, hidden_request(f"{tag}-d")]),
        health("HEAD"),
        echo(f"{tag}-empty", key, body=b""),
        health(),
        echo(f"{tag}-last", key, body=hidden_request(f"{tag}-e") * 40, close=True),
    )


def test_pipelined_requests_in_one_write_get_their_own_answers_in_order(warm):
    proxy, key = warm
    data, expected = mixed_pipeline(key, "one")
    check_answers(send_in_pieces(proxy, [data]), expected, "one write")
    # and in writes of sizes that cross every framing point somewhere
    for size in (1, 2, 3, 7, 64, 1023, 1024, 1025, 4096):
        data, expected = mixed_pipeline(key, f"size{size}")
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        check_answers(send_in_pieces(proxy, pieces, pause=0 if size < 64 else 0.001), expected, f"writes of {size}")
    assert_nothing_hidden_was_served(proxy, key)


def test_a_pipeline_split_at_every_byte_is_framed_the_same(warm):
    """Two writes, split at every byte of three requests: the head's CRLFs, the head/body
    boundary, a chunk-size line and its CRLF, the last chunk, the next request's start."""
    proxy, key = warm
    data, expected = pipeline(
        echo("split-a", key, body=b"0123456789" + hidden_request("split-1")),
        echo("split-b", key, chunks=[b"abc", hidden_request("split-2")], extra=["X-Trailer-Follows: no"]),
        echo("split-c", key, close=True),
    )
    for k in range(1, len(data)):
        check_answers(send_in_pieces(proxy, [data[:k], data[k:]], pause=0.003), expected, f"split at {k}")
    assert_nothing_hidden_was_served(proxy, key)


def test_a_slow_drip_of_a_pipeline_is_framed_the_same(warm):
    proxy, key = warm
    data, expected = pipeline(
        echo("drip-a", key, body=hidden_request("drip-1")),
        echo("drip-b", key, chunks=[b"12", hidden_request("drip-2")]),
        health("HEAD"),
        echo("drip-c", key, close=True),
    )
    check_answers(send_in_pieces(proxy, [bytes([b]) for b in data], pause=0.001, timeout=20), expected, "a drip")
    assert_nothing_hidden_was_served(proxy, key)


@pytest.mark.parametrize("shift", range(-5, 6))
def test_a_head_ending_across_the_read_buffer_is_framed_the_same(warm, shift):
    """The first request's head made to end (its last CRLFs) at byte 1024 + shift of the
    connection, where the reader's 1 KiB buffer ends, then its body and a second request."""
    proxy, key = warm
    body = hidden_request("edge")
    bare = echo("edge-a", key, body=body, extra=["X-Pad: "])[0]
    head_len = len(bare) - len(body)
    pad = 1024 + shift - head_len
    first = echo("edge-a", key, body=body, extra=["X-Pad: " + "p" * pad])
    assert first[0].index(b"\r\n\r\n") + 4 == 1024 + shift
    data, expected = pipeline(first, echo("edge-b", key, body=b"b" * 3000), echo("edge-c", key, close=True))
    check_answers(send_in_pieces(proxy, [data]), expected, f"head ending at {1024 + shift}")
    # and a header line's CRLF split across the buffer's end, with the rest of the head after it
    crlf_at = 1023 + shift
    pad_at = echo("edge-d", key, extra=["X-Pad: ", "X-After: 1"])[0].index(b"X-Pad: ") + len("X-Pad: ")
    second = echo("edge-d", key, extra=["X-Pad: " + "q" * (crlf_at - pad_at), "X-After: 1"])
    assert second[0][crlf_at:crlf_at + 2] == b"\r\n"
    data, expected = pipeline(second, echo("edge-e", key, close=True))
    check_answers(send_in_pieces(proxy, [data]), expected, f"a CRLF at {crlf_at}")
    assert_nothing_hidden_was_served(proxy, key)


def test_heads_larger_than_the_read_buffer_and_the_line_limit(warm):
    """Lines of 8 KiB less one byte are read whole (across eight buffers), with the next
    request after them; a line one byte longer is a 431 and the connection closes, the
    request after it never read."""
    proxy, key = warm
    longest = "X-Long: " + "l" * (8191 - len("X-Long: "))
    data, expected = pipeline(
        echo("big-a", key, extra=[longest] + [f"X-Many-{i}: " + "m" * 900 for i in range(20)]),
        echo("big-b", key, body=b"z" * 5000, extra=[longest]),
        echo("big-c", key, close=True),
    )
    finals = check_answers(send_in_pieces(proxy, [data], timeout=20), expected, "long lines")
    seen = json.loads(finals[0][2])
    assert ["x-long", longest[len("X-Long: "):]] in [[n.lower(), v] for n, v in seen["headers"]]
    data = echo("big-d", key, extra=[longest + "l"])[0] + echo("big-e", key)[0]
    received = send_in_pieces(proxy, [data])
    found, rest = parse_answers(received, ["GET"])
    assert [f[0] for f in found] == [431] and rest == b"", received[:400]
    assert found[0][1].get("connection") == ["close"]
    seen = proxy.get("/seen", key=key).json()
    assert not [t for t in seen if "big-d" in t or "big-e" in t], seen


def test_expect_100_continue_with_pipelined_requests(warm):
    """The body sent after the 100, and sent at once without waiting for it: either way
    the body is the request's, and the request after it is answered second."""
    proxy, key = warm
    body = hidden_request("expect") * 60  # over 1 KiB: read by the relay, not while parsing
    first = echo("expect-a", key, body=body, extra=["Expect: 100-continue"])
    head_end = first[0].index(b"\r\n\r\n") + 4
    after = echo("expect-b", key, body=b"after", close=True)
    s = connect(proxy)
    try:
        s.sendall(first[0][:head_end])
        interim = s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        s.sendall(first[0][head_end:] + after[0])
        received, closed = read_until_closed(s, 10)
    finally:
        s.close()
    found, rest = parse_answers(interim, ["POST"])
    assert [f[0] for f in found] == [100] and rest == b"", interim
    check_answers(received, [first[1], after[1]], "body after the 100")
    for small in (b"tiny", b""):
        data, expected = pipeline(echo("expect-c", key, body=small, extra=["Expect: 100-continue"]),
                                  echo("expect-d", key, body=hidden_request("expect-2")), health(close=True))
        received = send_in_pieces(proxy, [data])
        check_answers(received, expected, f"a body of {len(small)} sent at once",
                      interim=[100] if small else [])
    assert_nothing_hidden_was_served(proxy, key)


def test_a_request_sent_while_the_answer_before_it_streams(warm):
    """The second request arrives while the first answer is still being written (a
    server-sent stream, a large body): each answer whole and in order."""
    proxy, key = warm
    stream = request("GET", "/sse?n=4&interval_ms=150", key)
    after = echo("stream-after", key, body=hidden_request("stream"), close=True)
    s = connect(proxy, timeout=15)
    try:
        s.sendall(stream)
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:300]
        s.sendall(after[0])
        received, closed = read_until_closed(s, 15)
    finally:
        s.close()
    finals = check_answers(first + received, [Expect("GET"), after[1]], "a request during a stream")
    assert finals[0][2].count(b"data: ") == 4, finals[0][2]
    # a large answer with requests pipelined behind it, in one write
    data, expected = pipeline((request("GET", "/big?bytes=300000", key), Expect("GET")),
                              echo("big-after", key, body=b"q" * 2000),
                              (request("GET", "/slow?ms=200", key), Expect("GET")), health(close=True))
    finals = check_answers(send_in_pieces(proxy, [data], timeout=20), expected, "behind a large answer")
    assert finals[0][2] == b"x" * 300000
    assert_nothing_hidden_was_served(proxy, key)


def test_a_head_request_then_pipelined_requests(warm):
    proxy, key = warm
    data, expected = pipeline(health("HEAD"), health("HEAD"), echo("after-head", key, body=b"1"),
                              health("GET"), echo("after-get", key, close=True))
    found = check_answers(send_in_pieces(proxy, [data]), expected, "HEAD pipelined")
    assert found[0][1]["content-length"] == found[3][1]["content-length"]  # HEAD says GET's length


def test_an_unread_body_closes_even_with_a_request_buffered_behind_it(warm):
    """A body refused unread (over the limit, declared) with a whole request already in
    the same read behind the head: one answer, the close, the buffered request never read."""
    proxy, key = warm
    data = (request("POST", "/echo/refused", key, extra=["Content-Length: 2000000"])
            + hidden_request("buffered") + b"x" * 100)
    received = send_in_pieces(proxy, [data])
    found, rest = parse_answers(received, ["POST"])
    assert [f[0] for f in found] == [413] and rest == b"", received[:400]
    assert found[0][1].get("connection") == ["close"]
    assert_nothing_hidden_was_served(proxy, key)


# --- one code redeemed twice at the same instant ---

def test_one_code_redeemed_twice_at_the_same_instant(make_proxy, outline, tmp_path):
    """Two token requests with one code, sent whole at one instant on two connections,
    many times over: never both get tokens, and whenever one is refused as a replay, the
    tokens the other was given are revoked (RFC 6749 §4.1.2), whichever came first."""
    from oauth_client import mcp_initialize, pkce_pair, refresh, register, scripted_code
    from test_grants import REDIRECT, concurrently, raw_post

    state = tmp_path / "state-race"
    state.mkdir(mode=0o700)
    proxy = make_proxy(state_dir=str(state))
    key = outline.add_user("racer")
    client_id = register(proxy.url, REDIRECT)
    outcomes, revoked_access = [], []
    for _ in range(12):
        verifier, challenge = pkce_pair()
        code = scripted_code(proxy.url, client_id, REDIRECT, key, challenge)
        form = {"grant_type": "authorization_code", "code": code, "client_id": client_id,
                "redirect_uri": REDIRECT, "code_verifier": verifier, "resource": proxy.url + "/oauth/mcp"}
        answers = concurrently(proxy.port, [raw_post(proxy.port, "/oauth/token", form)] * 2)
        statuses = sorted(status for status, _ in answers)
        # the second use is refused; the first is too when the replay came before its
        # tokens were issued (they are revoked as they are made)
        assert statuses in ([200, 400], [400, 400]), answers
        assert all(json.loads(body)["error"] == "invalid_grant" for status, body in answers if status == 400)
        outcomes.append(statuses)
        for won in (json.loads(body) for status, body in answers if status == 200):
            # the replay was seen: the first use's grant must be gone, however the two interleaved
            r = refresh(proxy.url, client_id, won["refresh_token"])
            assert r.status_code == 400 and r.json()["error"] == "invalid_grant", \
                f"a replayed code left its grant alive ({outcomes})"
            revoked_access.append(won["access_token"])
    for access in revoked_access[-1:]:
        r = mcp_initialize(proxy.url, access)
        assert r.status_code == 401, r.text
    wait_for(lambda: proxy.get("/health").status_code == 200, timeout=5, what="the proxy to answer")


def test_one_code_redeemed_twice_as_it_expires(make_proxy, outline, tmp_path):
    """Codes live 60 s: pairs of redemptions of one code fired at once around that mark
    (59.7 s to 60.3 s after it was issued). Whichever way each pair falls (before the end,
    after it, or one each side), no tokens outlive it; a lone redemption after 61 s is
    refused as expired."""
    from oauth_client import pkce_pair, refresh, register, scripted_code
    from test_grants import REDIRECT, concurrently, raw_post

    state = tmp_path / "state-expiry"
    state.mkdir(mode=0o700)
    proxy = make_proxy(state_dir=str(state))
    key = outline.add_user("late")
    client_id = register(proxy.url, REDIRECT)
    forms = []
    for _ in range(5):
        verifier, challenge = pkce_pair()
        issued_at = time.monotonic()
        code = scripted_code(proxy.url, client_id, REDIRECT, key, challenge)
        forms.append((issued_at, {"grant_type": "authorization_code", "code": code, "client_id": client_id,
                                  "redirect_uri": REDIRECT, "code_verifier": verifier,
                                  "resource": proxy.url + "/oauth/mcp"}))
    lone_at, lone = forms.pop()
    for (issued_at, form), at in zip(forms, (59.7, 59.9, 60.1, 60.3)):
        time.sleep(max(0.0, issued_at + at - time.monotonic()))
        answers = concurrently(proxy.port, [raw_post(proxy.port, "/oauth/token", form)] * 2)
        assert sorted(s for s, _ in answers) in ([200, 400], [400, 400]), (at, answers)
        for status, body in answers:
            if status == 200:
                r = refresh(proxy.url, client_id, json.loads(body)["refresh_token"])
                assert r.status_code == 400, (at, "a code used twice as it expired left tokens alive")
            else:
                assert json.loads(body)["error"] == "invalid_grant", (at, body)
    time.sleep(max(0.0, lone_at + 61.5 - time.monotonic()))
    answer = concurrently(proxy.port, [raw_post(proxy.port, "/oauth/token", lone)])[0]
    # refused as expired, or as unknown once the sleeper's sweep has forgotten it
    assert answer[0] == 400 and json.loads(answer[1])["error"] == "invalid_grant", answer
    assert b"expired" in answer[1] or b"unknown" in answer[1], answer


def test_a_get_with_connection_upgrade_to_the_relay_takes_nothing_after_it(warm):
    """nginx passes `Connection: upgrade` for any Upgrade header (h2c too): a GET that is
    not a WebSocket handshake is relayed without a body, answered at once with a close
    (the rest of the connection was its body by tiny_http's rule), and the request sent
    after it is never read."""
    proxy, key = warm
    data = request("GET", "/echo/upgrade-a", key, extra=["Connection: upgrade", "Upgrade: h2c"]) + \
        hidden_request("upgrade")
    started = time.monotonic()
    received = send_in_pieces(proxy, [data], timeout=4)  # the warm proxy's header timeout is 5 s
    assert time.monotonic() - started < 4
    found, rest = parse_answers(received, ["GET"])
    assert [f[0] for f in found] == [200] and rest == b"", received[:400]
    assert found[0][1].get("connection") == ["close"]
    assert json.loads(found[0][2])["target"] == "/echo/upgrade-a"
    assert_nothing_hidden_was_served(proxy, key)


@pytest.mark.parametrize("hider", [b"X-A: a\nContent-Length: %d\r\n", b"X-A: a\rContent-Length: %d\r\n",
                                   b"X-A: a\r\n Content-Length: %d\r\n", b"Content-Length:\x0b%d\r\n"])
def test_a_length_hidden_behind_a_bare_lf_or_cr_is_refused_and_closed(warm, hider):
    """A head whose framing a lax reader would find (a Content-Length after a bare LF or
    CR, folded, or after a vertical tab): one 400, the close, and the bytes a lax reader
    would take for the body never read as a request."""
    proxy, key = warm
    hidden = hidden_request("bare")
    data = (b"GET /echo/bare-a HTTP/1.1\r\nHost: localhost\r\nX-Outline-API-Key: " + key.encode() + b"\r\n"
            + hider % len(hidden) + b"\r\n" + hidden)
    received = send_in_pieces(proxy, [data])
    found, rest = parse_answers(received, ["GET"])
    assert [f[0] for f in found] == [400] and rest == b"", received[:400]
    assert found[0][1].get("connection") == ["close"]
    assert_nothing_hidden_was_served(proxy, key)


def test_keep_alive_http_1_0_and_trailers_pipelined(warm):
    """HTTP/1.0 with keep-alive, and a chunked body with trailers, each with a request
    right after it in the same write."""
    proxy, key = warm
    ten = (f"GET /echo/ten-a HTTP/1.0\r\nHost: localhost\r\nX-Outline-API-Key: {key}\r\n"
           "Connection: keep-alive\r\n\r\n").encode()
    trailers = (f"POST /echo/trailer-a HTTP/1.1\r\nHost: localhost\r\nX-Outline-API-Key: {key}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode() + \
        b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nX-Other: " + hidden_request("trailer")[:30].replace(b"\r\n", b" ") + \
        b"\r\n\r\n"
    data, expected = pipeline((ten, Expect("GET", target="/echo/ten-a")),
                              (trailers, Expect("POST", target="/echo/trailer-a", body=b"hello")),
                              echo("trailer-b", key, body=hidden_request("trailer-2"), close=True))
    check_answers(send_in_pieces(proxy, [data]), expected, "HTTP/1.0 keep-alive and trailers")
    assert_nothing_hidden_was_served(proxy, key)
