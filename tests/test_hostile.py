"""Hostile input and faults, against the release binary and the real Docker Engine.
Bad requests go over raw sockets (an HTTP library would refuse to send them). Each
must get a 4xx with a JSON body or a closed connection, never a 5xx or a crash, and
nothing may reach a container that the proxy did not parse as one request."""

import concurrent.futures
import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

from conftest import assert_key_kept_secret, docker, wait_for


def raw_exchange(proxy, data, timeout=5.0, shut_write=False):
    """Sends bytes as they are; returns (status or None, headers, body, closed)."""
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    try:
        try:
            s.sendall(data)
            if shut_write:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the rest was read (a 413 at once): the answer still waits

        received = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
            if b"\r\n\r\n" in received and _complete(received):
                # the answer is whole: is the connection closed after it?
                s.settimeout(1.0)
                try:
                    closed = s.recv(1) == b""
                except (socket.timeout, ConnectionResetError) as e:
                    closed = isinstance(e, ConnectionResetError)
                break
    finally:
        s.close()
    if not received:
        return None, {}, b"", closed
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    return status, headers, body, closed


def _complete(received):
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def assert_refused(result, statuses=range(400, 500)):
    """A 4xx with a JSON body, or a closed connection without an answer."""
    status, headers, body, closed = result
    if status is None:
        assert closed, "neither an answer nor a closed connection"
        return
    assert status in statuses, (status, body)
    assert headers.get("content-type", "").startswith("application/json"), headers
    parsed = json.loads(body)
    assert set(parsed) >= {"error", "message"}


def req(key, lines, body=b""):
    head = "\r\n".join(lines)
    return (head + f"\r\nX-Outline-API-Key: {key}\r\n\r\n").encode("latin-1") + body


def seen_by_backend(proxy, key):
    r = proxy.get("/seen", key=key)
    assert r.status_code == 200
    return r.json()


@pytest.fixture()
def warm(make_proxy, outline):
    """A proxy with one user's container already running."""
    proxy = make_proxy(header_timeout="2s", max_body="1m")
    key = outline.add_user("mallory")
    assert proxy.get("/echo/warm", key=key).status_code == 200
    return proxy, key


SMUGGLED = b"GET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("framing", [
    ["Content-Length: {n}", "Transfer-Encoding: chunked"],
    ["Transfer-Encoding: chunked", "Content-Length: {n}"],
    ["Content-Length: {n}", "Content-Length: 5"],
    ["Content-Length: +{n}"],
    ["Content-Length: {n}, {n}"],
    ["Transfer-Encoding: xchunked"],
    ["Transfer-Encoding: chunked, identity"],
    ["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
    ["Transfer-Encoding : chunked"],
    ["Transfer-Encoding:\x0bchunked"],
    ["X-Before: 1", " Transfer-Encoding: chunked"],
])
def test_request_smuggling_is_refused_and_nothing_reaches_the_container(warm, framing):
    proxy, key = warm
    body = b"0\r\n\r\n" + SMUGGLED
    lines = ["POST /echo/front HTTP/1.1", "Host: x"] + [f.format(n=len(body)) for f in framing]
    result = raw_exchange(proxy, req(key, lines, body))
    assert_refused(result)
    assert result[3], "the connection must be closed: the rest of the bytes are not a request"
    seen = seen_by_backend(proxy, key)
    assert not any("smuggled" in s for s in seen), seen
    assert not any("front" in s for s in seen), seen


def next_answer(sock, buffered):
    """One whole answer from a keep-alive connection, read as a client reads it (by its
    Content-Length, else its chunks): (status, body, the bytes after it)."""
    def parse(data):
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.decode("latin-1").split("\r\n")
        headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size_line, sep, rest = rest.partition(b"\r\n")
                if not sep:
                    return None
                size = int(size_line.split(b";")[0], 16)
                if len(rest) < size + 2:
                    return None
                body, rest = body + rest[:size], rest[size + 2:]
                if size == 0:
                    return int(lines[0].split()[1]), body, rest
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return None
        return int(lines[0].split()[1]), rest[:length], rest[length:]

    data = buffered
    while (answer := parse(data)) is None:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a whole answer: {data!r}"
        data += chunk
    return answer


@pytest.mark.parametrize("route", ["/two-framings", "/overlong"])
def test_a_container_cannot_slip_an_answer_in_for_the_next_request(warm, route):
    """A container that frames its answer two ways (a Content-Length of 5 beside chunked,
    a whole forged answer inside the chunks), or that sends a second answer after its
    Content-Length: the client's next request, on the same connection and on a new one
    (which the container's pooled connection would serve), gets its own answer. Read over
    a raw socket: an HTTP library drops what is left in its buffer after each answer."""
    proxy, key = warm
    ask = lambda target: f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Outline-API-Key: {key}\r\n\r\n".encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        left = b""
        for _ in range(3):
            sock.sendall(ask(route))
            status, body, left = next_answer(sock, left)
            assert status == 200 and body.startswith(b"hello" if route == "/two-framings" else b"ok"), body
            time.sleep(0.2)  # anything slipped in behind the answer has arrived by now
            sock.sendall(ask("/echo/next"))
            status, body, left = next_answer(sock, left)
            assert b"FORGED" not in body, body
            assert status == 200 and json.loads(body)["target"] == "/echo/next", body
            fresh = proxy.get("/echo/fresh", key=key)
            assert fresh.status_code == 200 and fresh.json()["target"] == "/echo/fresh", fresh.text
    finally:
        sock.close()
    assert proxy.get("/health").status_code == 200


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET /echo HTTP/9.9\r\n\r\n",
    b"GET  /echo HTTP/1.1\r\n\r\n",
    b"GET /echo\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
    b"GET http://evil.example/echo HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nX-Bad: a\rb\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nX-Bad: a\nInjected: b\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nX-Bad: a\x00b\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nBad Name: a\r\n\r\n",
    b"GET /echo HTTP/1.1\r\n: empty-name\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
    b"GET /echo HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(3000)) + b"\r\n",
    b"GET /ech\x00o HTTP/1.1\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nExpect: 200-ok\r\nContent-Length: 3\r\n\r\nabc",
])
def test_malformed_requests_get_4xx_or_a_closed_connection(warm, data):
    proxy, key = warm
    result = raw_exchange(proxy, data.replace(b"\r\n\r\n", f"\r\nX-Outline-API-Key: {key}\r\n\r\n".encode(), 1))
    assert_refused(result)
    assert proxy.get("/health").status_code == 200
    assert not any(s.startswith("GET /ech") and s != "GET /echo/warm" for s in seen_by_backend(proxy, key))


def test_bodies_over_max_body_get_413_before_they_are_read(warm):
    proxy, key = warm
    t0 = time.monotonic()
    status, headers, body, _ = raw_exchange(
        proxy, req(key, ["POST /echo HTTP/1.1", "Host: x", "Content-Length: 10000000000000"], b"x" * 1000))
    assert status == 413
    assert json.loads(body)["error"] == "body_too_large"
    assert time.monotonic() - t0 < 3
    assert headers.get("connection") == "close"
    rss = int(next(l for l in open(f"/proc/{proxy.process.pid}/status") if l.startswith("VmHWM")).split()[1])
    assert rss < 64 * 1024
    # 2 MiB of body against a 1 MiB limit, sent whole
    status, *_ = raw_exchange(proxy, req(key, ["POST /echo HTTP/1.1", "Host: x", "Content-Length: 2097152"],
                                         b"y" * 2097152))
    assert status == 413
    assert proxy.get("/health").status_code == 200


def test_a_body_shorter_than_its_content_length_times_out_with_4xx(warm):
    proxy, key = warm
    t0 = time.monotonic()
    result = raw_exchange(proxy, req(key, ["POST /echo/short HTTP/1.1", "Host: x", "Content-Length: 5000"],
                                     b"z" * 2000), timeout=15)
    assert_refused(result)
    assert time.monotonic() - t0 < 12
    assert proxy.get("/health").status_code == 200


@pytest.mark.parametrize("key", ["has space", "x" * 5000, "tab\there", "caf\xe9", "日本"])
def test_implausible_keys_are_refused_without_asking_outline(warm, outline, key):
    proxy, _ = warm
    calls = outline.count("/api/auth.info")
    data = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Outline-API-Key: " + key.encode("utf-8") + b"\r\n\r\n"
    assert_refused(raw_exchange(proxy, data))
    assert outline.count("/api/auth.info") == calls


def test_hundreds_of_slow_clients_do_not_stop_others_and_are_cut(warm):
    proxy, key = warm
    slow = []
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(b"GET /echo/slow HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(s)
    t0 = time.monotonic()
    r = proxy.get("/echo", key=key)
    assert r.status_code == 200
    assert time.monotonic() - t0 < 2
    # after MCP_PROXY_HEADER_TIMEOUT (2 s here) each is cut: 408 or closed
    cut = 0
    for s in slow:
        s.settimeout(10)
        try:
            data = s.recv(4096)
            if data == b"" or data.startswith(b"HTTP/1.1 408"):
                cut += 1
        except (ConnectionResetError, socket.timeout):
            pass
        s.close()
    assert cut == 300


def test_running_out_of_file_descriptors_does_not_make_the_proxy_deaf(make_proxy, outline):
    proxy = make_proxy(start=False)
    key = outline.add_user("fd")
    limit = 64

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proxy.log_file = open(proxy.log_path, "ab")
    proxy.process = subprocess.Popen([str(__import__("conftest").BINARY)], env=proxy.env, stdout=proxy.log_file,
                                     stderr=subprocess.STDOUT, preexec_fn=low_limit)
    wait_for(proxy._answers, timeout=20, what="the proxy to listen")
    assert proxy.get("/echo", key=key).status_code == 200
    flood = []
    for _ in range(limit * 2):
        try:
            flood.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=2))
        except OSError:
            break
    time.sleep(0.5)  # let the accept loop hit EMFILE
    for s in flood:
        s.close()
    wait_for(lambda: _health(proxy) == 200, timeout=20, what="the proxy to serve again after EMFILE")
    assert proxy.get("/echo", key=key).status_code == 200
    assert "Error accepting new client" in proxy.log()


def _health(proxy):
    try:
        return httpx.get(proxy.url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


# ---------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------

def test_a_container_killed_mid_stream_ends_the_clients_stream(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("kat")
    got = []
    with proxy.client() as c:
        with c.stream("GET", "/sse?n=100&interval_ms=200", headers={"X-Outline-API-Key": key}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    got.append(line)
                    break
            docker("kill", proxy.container_name(key))
            t0 = time.monotonic()
            with pytest.raises(httpx.HTTPError):
                for line in lines:
                    got.append(line)
            assert time.monotonic() - t0 < 5
    assert len(got) < 100
    # the next request starts the container again
    assert proxy.get("/echo", key=key).status_code == 200
    assert len(proxy.containers()) == 1


def test_slow_outline_holds_up_only_its_own_key(make_proxy, outline):
    proxy = make_proxy()
    fast, slow = outline.add_user("fast"), outline.add_user("slow")
    assert proxy.get("/echo", key=fast).status_code == 200
    outline.delay = 4
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pending = pool.submit(proxy.get, "/echo", slow)
        time.sleep(0.3)
        t0 = time.monotonic()
        assert proxy.get("/echo", key=fast).status_code == 200  # cached verdict
        assert time.monotonic() - t0 < 1
        assert pending.result().status_code == 200


def test_outline_down_fails_new_keys_and_cached_keys_work_until_their_ttl(make_proxy, outline):
    proxy = make_proxy(auth_ttl="3s")
    cached, fresh = outline.add_user("cached"), outline.add_user("fresh")
    assert proxy.get("/echo", key=cached).status_code == 200
    t_cached = time.monotonic()
    outline.status_override = 503
    assert proxy.get("/echo", key=fresh).status_code == 502
    assert proxy.get("/echo", key=cached).status_code == 200
    assert time.monotonic() - t_cached < 3
    wait_for(lambda: proxy.get("/echo", key=cached).status_code == 502, timeout=10, what="the TTL to pass")
    outline.status_override = None
    assert proxy.get("/echo", key=fresh).status_code == 200


def test_sigkill_during_a_start_leaves_no_duplicate(make_proxy, outline):
    proxy = make_proxy(image="outline-mcp-proxy-test-backend:slow-boot")
    key = outline.add_user("ken")
    name = proxy.container_name(key)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: proxy.get("/echo", key=key))
        wait_for(lambda: proxy.state(name) == "running", timeout=20, what="the container to be created")
        proxy.process.kill()
        proxy.process.wait()
        with pytest.raises(httpx.HTTPError):
            pending.result()
    proxy.log_file.close()
    proxy.start()
    r = proxy.get("/echo", key=key)
    assert r.status_code == 200
    assert proxy.containers() == [name]


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("tom")
    assert proxy.get("/echo", key=key).status_code == 200

    def open_ended_stream():
        with proxy.client() as c:
            with c.stream("GET", "/sse?n=1000&interval_ms=1000", headers={"X-Outline-API-Key": key}) as r:
                try:
                    for _ in r.iter_lines():
                        pass
                except httpx.HTTPError:
                    pass

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pool.submit(open_ended_stream)
        pending = pool.submit(lambda: proxy.get("/slow?ms=2500", key=key))
        wait_for(lambda: proxy.stats()["containers"][0]["active_requests"] == 2, timeout=10, what="both in flight")
        t0 = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        r = pending.result()
        assert r.status_code == 200 and r.json() == {"slow": True}
        # the request finished; the open-ended stream does not hold the exit up
        assert proxy.process.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 10
    assert "SIGTERM" in proxy.log()


def test_no_key_is_written_anywhere_during_a_whole_session(make_proxy, outline):
    """Capture every process's command line while a container is created, then look
    for the key there, in the log, in docker inspect and in the container's files."""
    proxy = make_proxy(log="trace", stats_password="pw")
    key = outline.add_user("secret")
    cmdlines = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        cmdlines.add(open(f"/proc/{pid}/cmdline", "rb").read())
                    except OSError:
                        pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert proxy.get("/echo", key=key).status_code == 200
        with proxy.client() as c:
            assert c.get("/stats", auth=("admin", "pw")).status_code == 200
            c.get("/sse?n=2&interval_ms=10", headers={"Authorization": f"Bearer {key}"})
    finally:
        stop.set()
        watcher.join()
    assert any(b"docker\x00run" in c or b"run\x00--detach" in c for c in cmdlines), "creation not observed"
    assert not any(key.encode() in c for c in cmdlines)
    assert proxy.containers(), "no container was made"
    assert_key_kept_secret(proxy, key)
    with proxy.client() as c:
        for wrong in ["pw ", "PW", "p", "pw" * 50, ""]:
            assert c.get("/stats", auth=("admin", wrong)).status_code == 401
            assert c.get("/metrics", auth=("admin", wrong)).status_code == 401
        assert c.get("/stats", auth=("other", "pw")).status_code == 401
