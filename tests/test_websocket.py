"""WebSocket upgrades relayed through the real binary to the test backend's echo,
with a real WebSocket client (the `websockets` package)."""

import os
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import docker, wait_for


def ws_url(proxy, path="/ws"):
    return proxy.url.replace("http://", "ws://") + path


def open_ws(proxy, key, path="/ws", **kw):
    headers = {"X-Outline-API-Key": key} if key else {}
    return connect(ws_url(proxy, path), additional_headers=headers, max_size=None, open_timeout=30, **kw)


def thread_count(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def test_text_and_binary_messages_echo_unchanged(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("alice")
    with open_ws(proxy, key, subprotocols=["mcp", "other"]) as ws:
        assert ws.subprotocol == "mcp"
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send("é ü 日本")
        assert ws.recv() == "é ü 日本"
        blob = os.urandom(3 * 1024 * 1024 + 7)
        ws.send(blob)
        assert ws.recv() == blob
        ws.ping(b"are you there").wait(timeout=5)
    assert proxy.containers() == [proxy.container_name(key)]


def test_a_burst_of_a_thousand_messages_arrives_in_order(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("bob")
    with open_ws(proxy, key) as ws:
        for i in range(1000):
            ws.send(f"m{i}")
        got = [ws.recv(timeout=10) for _ in range(1000)]
    assert got == [f"m{i}" for i in range(1000)]


def test_a_close_from_the_client_reaches_the_container_with_its_code(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("carol")
    ws = open_ws(proxy, key)
    ws.send("x")
    ws.recv()
    ws.close(code=4001, reason="client says bye")
    # the container answered the close with the same code: the handshake completed
    assert ws.protocol.close_rcvd is not None
    assert ws.protocol.close_rcvd.code == 4001
    assert ws.protocol.close_rcvd.reason == "client says bye"


def test_a_close_from_the_container_reaches_the_client_with_its_code(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("dave")
    ws = open_ws(proxy, key)
    ws.send("close:4002:server says bye")
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd.code == 4002
    assert closed.value.rcvd.reason == "server says bye"


def test_killing_the_container_ends_the_clients_session_within_seconds(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("erin")
    ws = open_ws(proxy, key)
    ws.send("ping")
    assert ws.recv() == "ping"
    threads_open = thread_count(proxy.process.pid)
    docker("kill", proxy.container_name(key))
    t0 = time.monotonic()
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    assert time.monotonic() - t0 < 5
    # the relay's threads are freed
    wait_for(lambda: thread_count(proxy.process.pid) < threads_open, timeout=10, what="relay threads to end")
    wait_for(lambda: proxy.stats()["containers"][0]["websockets"] == 0, timeout=10, what="the session to be counted closed")


def test_an_open_session_keeps_its_container_awake(make_proxy, outline):
    proxy = make_proxy(idle_timeout="1s", sweep_interval="1s")
    key = outline.add_user("fay")
    name = proxy.container_name(key)
    with open_ws(proxy, key) as ws:
        assert proxy.stats()["containers"][0]["websockets"] == 1
        assert proxy.stats()["containers"][0]["active_requests"] == 1
        time.sleep(3.5)  # well past IDLE_TIMEOUT with three sweeps: the session must survive them
        assert proxy.state(name) == "running"
        ws.send("still here")
        assert ws.recv() == "still here"
    # idle time counts from the session's end
    wait_for(lambda: proxy.state(name) == "exited", timeout=20, what="the container to sleep after the session")


def test_an_unauthenticated_upgrade_gets_401_without_touching_docker(make_proxy, outline):
    proxy = make_proxy()
    with pytest.raises(InvalidStatus) as refused:
        open_ws(proxy, None)
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        open_ws(proxy, "ol_api_unknown_123")
    assert refused.value.response.status_code == 401
    assert proxy.containers() == []
    assert "created" not in proxy.log()


def test_a_refused_upgrade_returns_the_containers_status(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("gus")
    with pytest.raises(InvalidStatus) as refused:
        open_ws(proxy, key, "/ws-refuse")
    assert refused.value.response.status_code == 403
    # and the proxy still serves WebSockets afterwards
    with open_ws(proxy, key) as ws:
        ws.send("ok")
        assert ws.recv() == "ok"


def test_idle_sessions_cost_no_cpu_and_few_threads(make_proxy, outline):
    # the backend spends a thread per session: let it have more than 128
    proxy = make_proxy(pids_limit="1024")
    key = outline.add_user("hal")
    pid = proxy.process.pid
    with open_ws(proxy, key) as ws:
        ws.send("warm")
        ws.recv()
    base_threads, base_rss = thread_count(pid), rss_kib(pid)
    n = 200
    sessions = [open_ws(proxy, key) for _ in range(n)]
    try:
        wait_for(lambda: proxy.stats()["containers"][0]["websockets"] == n, timeout=20, what="all sessions open")
        threads, rss = thread_count(pid), rss_kib(pid)
        cpu0 = sum(int(x) for x in open(f"/proc/{pid}/stat").read().split(")")[1].split()[11:13])
        time.sleep(2)
        cpu1 = sum(int(x) for x in open(f"/proc/{pid}/stat").read().split(")")[1].split()[11:13])
        print(f"\n{n} idle WebSocket sessions: {threads - base_threads} extra threads "
              f"({(threads - base_threads) / n:.1f} per session), RSS {base_rss} -> {rss} KiB "
              f"({(rss - base_rss) / n:.1f} KiB per session), CPU over 2 s idle: {cpu1 - cpu0} ticks")
        # per session: two threads, one a direction (one of them the connection's own)
        assert (threads - base_threads) <= 2 * n + 8
        assert cpu1 - cpu0 <= 5, "idle sessions are burning CPU (busy-waiting?)"
        sessions[-1].send("alive")
        assert sessions[-1].recv() == "alive"
    finally:
        for s in sessions:
            s.close()
    wait_for(lambda: thread_count(pid) <= base_threads + 8, timeout=20, what="session threads to end")
