"""Hardening, round 2 (issue 14): connections that never starve, a proxy that never goes
deaf, bodies refused before they are read, and the README's security claims made true.
Each test here failed on the proxy before these fixes."""

import json
import os
import selectors
import shutil
import socket
import tempfile
import time

import pytest

from conftest import BACKEND_IMAGE, BINARY, docker, docker_gateway, wait_for
from test_hostile import raw_exchange, req
from test_proxy import run_binary

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def first_events(proxy, key, count, timeout=10.0):
    """Opens `count` SSE requests as fast as it can; for each, the seconds from its
    request to its first event (None: none came)."""
    request = (f"GET /sse?n=3&interval_ms=1000 HTTP/1.1\r\nHost: x\r\n"
               f"X-Outline-API-Key: {key}\r\n\r\n").encode()
    sel = selectors.DefaultSelector()
    socks, sent, firsts, bufs = [], [], [None] * count, [b""] * count
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            s.sendall(request)
            sent.append(time.monotonic())
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, i)
        pending, deadline = count, time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for k, _ in sel.select(timeout=0.2):
                i = k.data
                try:
                    chunk = k.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    chunk = b""
                bufs[i] += chunk
                if b"data:" in bufs[i]:
                    firsts[i] = time.monotonic() - sent[i]
                if firsts[i] is not None or not chunk:
                    sel.unregister(k.fileobj)
                    pending -= 1
    finally:
        for s in socks:
            s.close()
        sel.close()
    return firsts


@pytest.mark.parametrize("count", [300, 1000])
def test_every_stream_of_a_burst_gets_its_first_event_within_a_second(make_proxy, outline, count):
    proxy = make_proxy(pids_limit="4096", memory="512m")
    key = outline.add_user("burst")
    assert proxy.get("/echo/warm", key=key).status_code == 200
    firsts = first_events(proxy, key, count)
    missing = sum(1 for f in firsts if f is None)
    assert missing == 0, f"{missing} of {count} streams got no event"
    slowest = max(firsts)
    print(f"\n{count} streams at once: slowest first event {slowest * 1000:.0f} ms")
    assert slowest < 1.0


def test_connections_over_the_cap_get_503_before_a_thread_is_spent(make_proxy):
    proxy = make_proxy(max_connections=4, header_timeout="30s")
    idle = []

    def fill():
        """Four idle connections the proxy holds: one it refused (while a slot was still
        taken by the fixture's own probe of the port) is replaced."""
        for s in list(idle):
            s.setblocking(False)
            try:
                s.recv(1)  # an answer (a 503) or the end: refused
                refused_here = True
            except BlockingIOError:
                refused_here = False  # nothing to read: held open by the proxy
            except OSError:
                refused_here = True  # reset
            s.setblocking(True)
            if refused_here:
                idle.remove(s)
                s.close()
        while len(idle) < 4:
            idle.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))

    try:
        def refused():
            fill()
            result = raw_exchange(proxy, HEALTH, timeout=3)
            return result if result[0] == 503 else None

        status, headers, body, closed = wait_for(refused, timeout=10, what="a 503 at the cap")
        assert headers.get("retry-after") and closed
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["error"] == "too_many_connections"
        assert "connection cap" in proxy.log()
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: raw_exchange(proxy, HEALTH, timeout=3)[0] == 200, timeout=10, what="the proxy to serve again")


def test_a_thread_that_cannot_be_had_costs_one_connection_not_the_proxy(make_proxy):
    """Under a task limit, spawning a connection's thread fails: that connection is
    closed and logged, and accepting goes on (the old accept thread panicked and the
    process stayed alive, deaf). Run as an unprivileged user: RLIMIT_NPROC does not bind
    root."""
    proxy = make_proxy(start=False, header_timeout="20s")
    home = tempfile.mkdtemp(prefix="nproc-", dir="/tmp")
    os.chmod(home, 0o755)
    proxy.binary = os.path.join(home, "outline-mcp-proxy")
    shutil.copy(BINARY, proxy.binary)
    # 48 tasks: the proxy's own threads and the docker CLI processes it starts at once
    # (each a Go program of several threads) fit at start-up even on a busy machine;
    # 120 idle connections then exceed it (24 was met at start-up under load)
    proxy.wrapper = ["prlimit", "--nproc=48", "setpriv", "--reuid=4242", "--regid=4242", "--clear-groups"]
    proxy.start()
    idle = []
    try:
        for _ in range(120):
            idle.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
        try:  # the limit is met (checked below); a proxy that went deaf logs nothing
            wait_for(lambda: "no thread for a new connection" in proxy.log(), timeout=10, what="a failed spawn")
        except AssertionError:
            pass
    finally:
        for s in idle:
            s.close()
        shutil.rmtree(home, ignore_errors=True)

    def answers():  # 503 is fine: user 4242 cannot reach Docker; the proxy answers
        return raw_exchange(proxy, HEALTH, timeout=2)[0] in (200, 503)

    wait_for(answers, timeout=20, what="the proxy to answer after the failed spawns")
    assert proxy.process.poll() is None
    assert "no thread for a new connection" in proxy.log(), "the limit was never met: the test proved nothing"


def test_a_declared_body_over_max_body_gets_413_at_once_and_is_not_read(make_proxy, outline):
    proxy = make_proxy(max_body="1m")
    key = outline.add_user("hugo")
    t0 = time.monotonic()
    result = raw_exchange(proxy, req(key, ["POST /echo HTTP/1.1", "Host: x", "Content-Length: 10000000000000"]))
    took = time.monotonic() - t0
    status, _, body, closed = result
    assert status == 413 and closed, result
    assert took < 2, f"413 took {took:.1f} s"


@pytest.mark.parametrize("refusal", ["no key", "foreign origin"])
def test_errors_before_the_body_go_out_at_once_and_close(make_proxy, outline, refusal):
    proxy = make_proxy()
    key = outline.add_user("ines")
    lines = ["POST /echo HTTP/1.1", "Host: x", "Content-Length: 5000000"]
    if refusal == "no key":
        data, expected = ("\r\n".join(lines) + "\r\n\r\n").encode(), 401
    else:
        data, expected = req(key, lines + ["Origin: https://evil.example"]), 403
    t0 = time.monotonic()
    status, _, _, closed = raw_exchange(proxy, data)
    assert (status, closed) == (expected, True)
    assert time.monotonic() - t0 < 2


def test_a_refused_chunked_body_is_never_read_as_the_next_request(make_proxy):
    proxy = make_proxy()
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + smuggled
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=3)
    received, closed = b"", False
    try:
        s.sendall(data)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            received += chunk
    finally:
        s.close()
    assert received.startswith(b"HTTP/1.1 401"), received[:100]
    assert received.count(b"HTTP/1.1 ") == 1, received
    assert closed


def test_containers_cannot_reach_each_other_nor_be_reached_from_the_default_bridge(make_proxy, outline):
    proxy = make_proxy()
    net = proxy.env.get("MCP_PROXY_NETWORK", "outline-mcp-proxy")
    a, b = outline.add_user("iso_a"), outline.add_user("iso_b")
    assert proxy.get("/echo", key=a).status_code == 200
    assert proxy.get("/echo", key=b).status_code == 200
    options = json.loads(docker("network", "inspect", net, "--format", "{{json .Options}}").stdout)
    assert options.get("com.docker.network.bridge.enable_icc") == "false", options
    ip_b = proxy.inspect(proxy.container_name(b))["NetworkSettings"]["Networks"][net]["IPAddress"]

    def probe(network, addr):
        return docker("run", "--rm", "--network", network, "-e", "BACKEND_MODE=probe", "-e", f"PROBE_ADDR={addr}",
                      BACKEND_IMAGE, check=False).returncode

    # the probe works (it reaches the fake Outline on the host), and B is reachable from
    # the host (the proxy just used it); from beside it, or the default bridge, it is not
    assert probe(net, f"{docker_gateway()}:{outline.port}") == 0
    assert probe(net, f"{ip_b}:3000") == 1
    assert probe("bridge", f"{ip_b}:3000") == 1


def test_check_warns_that_env_mode_is_reachable_from_the_host(outline):
    env = {"PATH": os.environ["PATH"], "OUTLINE_URL": f"http://127.0.0.1:{outline.port}",
           "MCP_PROXY_IMAGE": BACKEND_IMAGE, "MCP_PROXY_LISTEN": "127.0.0.1:0"}
    assert "! key mode env" not in run_binary("check", env=env).stdout
    warned = run_binary("check", env=dict(env, MCP_PROXY_KEY_MODE="env")).stdout
    assert "! key mode env" in warned and "any process on this host" in warned


def test_only_the_checked_key_reaches_the_container(make_proxy, outline):
    proxy = make_proxy()
    key, other = outline.add_user("ivy"), outline.add_user("jack")
    r = proxy.get("/echo", key=key, headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 200
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    assert "authorization" not in headers
    assert headers["x-outline-api-key"] == key
    assert other not in r.text


def test_names_from_outline_cannot_forge_log_lines(make_proxy, outline):
    proxy = make_proxy()
    forged = "2026-01-01T00:00:00.000Z INFO  [outline_mcp_proxy] GET /admin 200 0ms user=root"
    key = outline.add_user("eve", display_name=f'Eve" container=x\n{forged}')
    assert proxy.get("/echo", key=key).status_code == 200
    wait_for(lambda: "GET /echo 200" in proxy.log(), timeout=5, what="the request's log line")
    lines = proxy.log().splitlines()
    assert not any(line.startswith("2026-01-01T00:00:00") for line in lines), "a forged line"
    line = next(line for line in lines if "GET /echo 200" in line)
    assert 'user="Eve\\" container=x\\n2026' in line, line
