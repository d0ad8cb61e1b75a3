"""The request path end to end: the release binary, the real Docker Engine, the test
backend image in real containers, and the fake Outline API."""

import concurrent.futures
import json
import os
import re
import subprocess
import time

import httpx
import pytest

from conftest import BINARY, ROOT, assert_key_kept_secret, docker, wait_for


def echo(proxy, key, path="/echo", **kw):
    r = proxy.get(path, key=key, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def test_first_request_creates_the_container_and_the_next_reuses_it(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("alice")
    first = echo(proxy, key, "/echo/first?x=1&y=two")
    assert proxy.containers() == [proxy.container_name(key)]
    container_id = proxy.inspect(proxy.container_name(key))["Id"]
    assert first["hostname"] == container_id[:12]
    assert first["target"] == "/echo/first?x=1&y=two"
    second = echo(proxy, key)
    assert second["hostname"] == first["hostname"]
    assert proxy.containers() == [proxy.container_name(key)]
    assert proxy.log().count("created and ready") == 1


def test_method_headers_and_body_reach_the_container_and_the_answer_comes_back(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("alice")
    body = os.urandom(300_000)
    with proxy.client() as c:
        r = c.request(
            "PATCH",
            "/echo/path?q=1",
            content=body,
            headers={
                "X-Outline-API-Key": key,
                "MCP-Protocol-Version": "2025-06-18",
                "Last-Event-ID": "42",
                "Accept": "application/json, text/event-stream",
                "Content-Type": "application/octet-stream",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "must-not-pass",
                "X-Custom": "passes",
                "X-Forwarded-Proto": "https",
            },
        )
    assert r.status_code == 200
    got = r.json()
    headers = {k.lower(): v for k, v in got["headers"]}
    import hashlib

    assert got["method"] == "PATCH"
    assert got["body_len"] == len(body)
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "mcp-session-id" not in headers
    assert headers["mcp-protocol-version"] == "2025-06-18"
    assert headers["last-event-id"] == "42"
    assert headers["accept"] == "application/json, text/event-stream"
    assert headers["x-custom"] == "passes"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-outline-api-key"] == key  # header key mode: per request
    assert "x-hop" not in headers and "connection" not in headers
    # the container's headers come back; a session it opens reaches the client as an id
    # the proxy minted (it owns the session and maps it onto the container's)
    assert r.headers["x-backend"] == "test"
    minted = r.headers["mcp-session-id"]
    assert minted != "backend-session" and re.fullmatch(r"[0-9a-f]{64}", minted)
    again = proxy.get("/echo", key=key, headers={"Mcp-Session-Id": minted})
    assert again.status_code == 200 and again.headers["mcp-session-id"] == minted
    sent = {k.lower(): v for k, v in again.json()["headers"]}
    assert sent["mcp-session-id"] == "backend-session"  # the container sees its own id


def test_an_empty_answer_arrives_at_once_on_a_kept_alive_connection(make_proxy, outline):
    """MCP answers a notification with 202 and no body: it must not wait in a buffer."""
    proxy = make_proxy()
    key = outline.add_user("alice")
    with proxy.client(timeout=5) as c:
        # the container is started first: its boot is not what is timed
        assert c.post("/echo", headers={"X-Outline-API-Key": key}, json={}).status_code == 200
        for _ in range(3):
            t0 = time.monotonic()
            r = c.post("/empty", headers={"X-Outline-API-Key": key}, json={"jsonrpc": "2.0", "method": "x"})
            assert r.status_code == 202 and r.content == b""
            assert time.monotonic() - t0 < 1


def test_chunked_request_bodies_stream_through(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("alice")

    def chunks():
        for i in range(50):
            yield bytes([i]) * 10_000

    with proxy.client() as c:
        r = c.post("/echo", content=chunks(), headers={"X-Outline-API-Key": key})
    assert r.status_code == 200
    assert r.json()["body_len"] == 500_000


def test_the_containers_status_passes_unchanged(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("alice")
    for status in (404, 405, 400, 500):
        r = proxy.get(f"/status/{status}", key=key)
        assert r.status_code == status
        assert r.json() == {"status": status}


def test_two_users_get_two_isolated_containers(make_proxy, outline):
    proxy = make_proxy()
    alice, bob = outline.add_user("alice"), outline.add_user("bob")
    a, b = echo(proxy, alice), echo(proxy, bob)
    assert a["hostname"] != b["hostname"]
    assert sorted(proxy.containers()) == sorted([proxy.container_name(alice), proxy.container_name(bob)])
    a_headers = dict((k.lower(), v) for k, v in a["headers"])
    b_headers = dict((k.lower(), v) for k, v in b["headers"])
    assert a_headers["x-outline-api-key"] == alice
    assert b_headers["x-outline-api-key"] == bob
    stats = proxy.stats()
    users = sorted(c["user"] for c in stats["containers"])
    assert users == ["Alice", "Bob"]


def test_ten_concurrent_first_requests_start_one_container(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("carol")
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: proxy.get("/echo", key=key), range(10)))
    assert [r.status_code for r in results] == [200] * 10
    assert len({r.json()["hostname"] for r in results}) == 1
    assert proxy.containers() == [proxy.container_name(key)]
    assert proxy.log().count("created and ready") == 1
    # ten concurrent misses made one Outline call
    assert outline.auth_calls_for(key) == 1


def test_users_do_not_wait_on_each_other(make_proxy, outline):
    """A slow start for one user does not hold up another user's warm requests."""
    proxy = make_proxy()
    warm, cold = outline.add_user("warm"), outline.add_user("cold")
    echo(proxy, warm)
    outline.delay = 0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(lambda: proxy.get("/slow?ms=3000", key=cold))
        time.sleep(0.2)
        t0 = time.monotonic()
        fast = proxy.get("/echo", key=warm)
        elapsed = time.monotonic() - t0
        assert fast.status_code == 200
        assert slow.result().status_code == 200
    assert elapsed < 1.5, f"warm request waited {elapsed:.2f}s behind another user's"


def test_idle_container_is_stopped_and_woken(make_proxy, outline):
    proxy = make_proxy(idle_timeout="2s", sweep_interval="1s")
    key = outline.add_user("dave")
    name = proxy.container_name(key)
    first = echo(proxy, key)
    wait_for(lambda: proxy.stats()["containers"][0]["state"] == "stopped", timeout=20,
             what="the idle container to stop")
    assert proxy.state(name) == "exited"
    t0 = time.monotonic()
    again = echo(proxy, key)
    wake = time.monotonic() - t0
    assert again["hostname"] == first["hostname"]  # the same container, woken
    assert proxy.state(name) == "running"
    print(f"\nwake (stopped -> first answer through the proxy): {wake * 1000:.0f} ms")


def test_a_stream_longer_than_the_idle_timeout_is_not_cut(make_proxy, outline):
    proxy = make_proxy(idle_timeout="1s", sweep_interval="1s")
    key = outline.add_user("erin")
    name = proxy.container_name(key)
    arrivals = []
    t0 = time.monotonic()
    with proxy.client() as c:
        with c.stream("GET", "/sse?n=8&interval_ms=500", headers={"X-Outline-API-Key": key}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-accel-buffering"] == "no"
            for line in r.iter_lines():
                if line.startswith("data:"):
                    arrivals.append((time.monotonic() - t0, json.loads(line[5:])))
    assert [a[1]["event"] for a in arrivals] == list(range(8))
    # event by event: the first arrived long before the last (not all at the end)
    assert arrivals[-1][0] - arrivals[0][0] > 2.5, arrivals
    assert proxy.state(name) == "running"  # 3.5 s of stream, idle timeout 1 s: not stopped
    wait_for(lambda: proxy.state(name) == "exited", timeout=20, what="the container to stop after the stream")


def test_large_answers_stream_without_being_held(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("frank")
    total = 0
    with proxy.client() as c:
        with c.stream("GET", "/big?bytes=50000000", headers={"X-Outline-API-Key": key}) as r:
            for chunk in r.iter_bytes():
                total += len(chunk)
    assert total == 50_000_000
    rss_kb = int(
        next(l for l in open(f"/proc/{proxy.process.pid}/status") if l.startswith("VmHWM")).split()[1]
    )
    assert rss_kb < 64 * 1024, f"peak RSS {rss_kb} KiB: the 50 MB answer was held in memory"


def test_a_restarted_proxy_rediscovers_and_reuses_containers(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("gina")
    first = echo(proxy, key)
    proxy.restart()
    stats = proxy.stats()
    assert stats["total_containers"] == 1 and stats["running_count"] == 1
    assert stats["containers"][0]["user"] == "Gina"  # from the container's label
    again = echo(proxy, key)
    assert again["hostname"] == first["hostname"]
    assert proxy.containers() == [proxy.container_name(key)]
    assert "found 1 existing container" in proxy.log()


def test_proxies_with_other_prefixes_leave_each_others_containers_alone(make_proxy, outline):
    import secrets

    base = f"t{secrets.token_hex(3)}-"
    # the other proxy's prefix is the start of this one's: names alone would confuse them
    mine = make_proxy(prefix=base + "staging-", idle_timeout="1s", sweep_interval="1s", remove_after="1s")
    key = outline.add_user("gina")
    echo(mine, key)
    other = make_proxy(prefix=base, idle_timeout="1s", sweep_interval="1s", remove_after="1s")
    assert other.stats()["total_containers"] == 0
    wait_for(lambda: mine.state(mine.container_name(key)) == "exited", timeout=20, what="sleep")
    assert "stopped idle container" not in other.log()
    other.restart()  # adopts nothing of mine at start-up either
    assert other.stats()["total_containers"] == 0
    r = run_binary("cleanup", env=dict(other.env, MCP_PROXY_REMOVE_AFTER="1s"))
    assert r.returncode == 0 and "0 container(s) removed" in r.stdout, r.stdout
    assert mine.state(mine.container_name(key)) == "exited"


def test_every_key_of_a_user_reaches_one_container(make_proxy, outline):
    proxy = make_proxy()
    first = outline.add_user("hugo")
    second = outline.add_key(first)
    a, b = echo(proxy, first), echo(proxy, second)
    assert a["hostname"] == b["hostname"]
    assert proxy.containers() == [proxy.container_name(first)] == [proxy.container_name(second)]
    # 128 bits of the user's hash in the name
    assert len(proxy.container_name(first)) == len(proxy.prefix) + 32
    labels = proxy.inspect(proxy.container_name(first))["Config"]["Labels"]
    assert labels["outline-mcp-proxy.prefix"] == proxy.prefix
    assert proxy.container_name(first) == proxy.prefix + labels["outline-mcp-proxy.owner"]


def test_in_env_mode_each_key_has_its_own_container(make_proxy, outline):
    proxy = make_proxy(key_mode="env")
    first = outline.add_user("ines")
    second = outline.add_key(first)
    assert echo(proxy, first, "/env")["OUTLINE_API_KEY_set"]
    echo(proxy, second, "/env")
    assert proxy.containers() == sorted([proxy.container_name(first), proxy.container_name(second)])


def test_docker_unavailable_gives_503(make_proxy, outline):
    proxy = make_proxy(DOCKER_HOST="unix:///nonexistent/docker.sock")
    key = outline.add_user("hank")
    r = proxy.get("/echo", key=key)
    assert r.status_code == 503
    assert r.json()["error"] == "docker_unavailable"
    assert "retry-after" in r.headers
    r = proxy.get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "unhealthy"
    assert proxy.get("/health").status_code == 503  # and the proxy still serves


def test_outline_down_gives_502_and_creates_nothing(make_proxy, outline):
    proxy = make_proxy(OUTLINE_URL="http://127.0.0.1:9")
    key = outline.add_user("ivy")
    r = proxy.get("/echo", key=key)
    assert r.status_code == 502
    assert r.json()["error"] == "outline_unreachable"
    assert proxy.containers() == []


def test_outline_errors_give_502(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("ivy")
    outline.status_override = 500
    r = proxy.get("/echo", key=key)
    assert r.status_code == 502
    outline.status_override = None
    assert proxy.get("/echo", key=key).status_code == 200  # a 5xx verdict is not cached


def make_ca_and_server_cert(d):
    """A private CA, and a certificate it signs for 127.0.0.1 (a company CA, say)."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test Company CA",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(d / "srv.key"),
            "-out", str(d / "srv.csr"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(d / "srv.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"), "-out", str(d / "srv.pem"))
    return d / "ca.pem", d / "srv.pem", d / "srv.key"


def test_https_to_outline_is_verified_against_the_hosts_ca_store(make_proxy, tmp_path):
    from fake_outline import FakeOutline

    ca, cert, key_file = make_ca_and_server_cert(tmp_path)
    secure = FakeOutline(host="127.0.0.1", tls=(str(cert), str(key_file))).start()
    try:
        key = secure.add_user("sue")
        url = f"https://127.0.0.1:{secure.port}"
        trusting = make_proxy(OUTLINE_URL=url, SSL_CERT_FILE=str(ca))  # the CA in the host's store
        assert trusting.get("/echo", key=key).status_code == 200
        strict = make_proxy(OUTLINE_URL=url)  # the host's own store, without that CA
        r = strict.get("/echo", key=key)
        assert r.status_code == 502 and r.json()["error"] == "outline_unreachable"
        assert strict.containers() == []
    finally:
        secure.stop()


def test_bad_keys_get_401_and_no_container(make_proxy, outline):
    proxy = make_proxy()
    r = proxy.get("/echo", key="ol_api_nobody_1234")
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"
    assert proxy.get("/echo").status_code == 401  # no key at all
    calls = outline.count("/api/auth.info")
    for bad in ["has space", "x" * 600, ""]:
        assert proxy.get("/echo", headers={"X-Outline-API-Key": bad}).status_code == 401
    # a non-ASCII byte in a header is refused while the request is parsed
    assert proxy.get("/echo", headers={"X-Outline-API-Key": "caf\xe9".encode("latin-1")}).status_code in (400, 401)
    assert outline.count("/api/auth.info") == calls  # refused without asking Outline
    assert proxy.containers() == []


def test_bearer_authorization_is_accepted(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("jack")
    r = proxy.get("/echo", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    assert "authorization" not in headers  # the key travels only as x-outline-api-key
    assert headers["x-outline-api-key"] == key


def test_outline_verdicts_are_cached_by_ttl(make_proxy, outline):
    proxy = make_proxy(auth_ttl="60s")
    key = outline.add_user("kim")
    for _ in range(20):
        echo(proxy, key)
    assert outline.auth_calls_for(key) == 1
    proxy0 = make_proxy(auth_ttl="0")
    for _ in range(3):
        echo(proxy0, key)
    assert outline.auth_calls_for(key) == 4  # TTL 0: asked every time, as the seed did
    stats = proxy.stats()
    assert stats["auth"]["misses"] == 1 and stats["auth"]["hits"] == 19


def test_containers_are_hardened_and_limited(make_proxy, outline):
    proxy = make_proxy(boot_cpus="0")
    key = outline.add_user("lena")
    echo(proxy, key)
    info = proxy.inspect(proxy.container_name(key))
    host = info["HostConfig"]
    assert host["Memory"] == 192 * 1024 * 1024
    assert host["MemorySwap"] == host["Memory"]
    assert host["NanoCpus"] == 300_000_000
    assert host["PidsLimit"] == 128
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["ReadonlyRootfs"] is True
    assert "/tmp" in host["Tmpfs"]
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["LogConfig"]["Config"]["max-size"] == "5m"
    assert host["NetworkMode"] == "outline-mcp-proxy"  # its own network, inter-container traffic off
    assert not host.get("PortBindings")
    assert info["Config"]["User"] == "65534:65534"
    assert info["Config"]["Labels"]["outline-mcp-proxy.managed"] == "true"
    env = echo(proxy, key, "/env")
    assert env["uid"].split()[1] == "65534"


def test_boot_burst_is_brought_down_once_ready(make_proxy, outline):
    proxy = make_proxy(boot_cpus="1", cpus="0.3")
    key = outline.add_user("mo")
    echo(proxy, key)
    name = proxy.container_name(key)
    wait_for(lambda: proxy.inspect(name)["HostConfig"]["NanoCpus"] == 300_000_000, timeout=10,
             what="the CPU limit to come down to 0.3")
    # asleep, it is armed with the burst again for its next wake
    proxy2 = make_proxy(boot_cpus="1", cpus="0.3", idle_timeout="1s", sweep_interval="1s")
    key2 = outline.add_user("mo2")
    echo(proxy2, key2)
    name2 = proxy2.container_name(key2)
    wait_for(lambda: proxy2.state(name2) == "exited", timeout=20, what="sleep")
    wait_for(lambda: proxy2.inspect(name2)["HostConfig"]["NanoCpus"] == 1_000_000_000, timeout=10,
             what="the burst to be re-armed")


def test_the_key_is_in_no_container_config_file_or_log(make_proxy, outline, tmp_path):
    proxy = make_proxy(log="debug")
    key = outline.add_user("nora")
    echo(proxy, key)
    assert proxy.containers() == [proxy.container_name(key)]
    assert_key_kept_secret(proxy, key)
    env = echo(proxy, key, "/env")
    assert env["OUTLINE_API_KEY_set"] is False


def test_env_key_mode_sets_the_key_only_in_the_containers_environment(make_proxy, outline):
    import hashlib

    proxy = make_proxy(key_mode="env")
    key = outline.add_user("olga")
    got = echo(proxy, key, "/env")
    assert got["OUTLINE_API_KEY_set"] is True
    assert got["OUTLINE_API_KEY_sha256"] == hashlib.sha256(key.encode()).hexdigest()
    headers = {k.lower(): v for k, v in echo(proxy, key)["headers"]}
    assert "x-outline-api-key" not in headers
    assert_key_kept_secret(proxy, key, env_mode=True)


def test_body_over_max_body_gets_413(make_proxy, outline):
    proxy = make_proxy(max_body="1m")
    key = outline.add_user("pat")
    r = proxy.post("/echo", key=key, content=b"x" * (1024 * 1024 + 1))
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large"

    def chunks():
        for _ in range(20):
            yield b"y" * 100_000

    r = proxy.post("/echo", key=key, content=chunks())
    assert r.status_code == 413
    assert proxy.post("/echo", key=key, content=b"z" * 1000).status_code == 200


def test_foreign_origins_get_403(make_proxy, outline):
    proxy = make_proxy(allowed_origins="https://app.example.com")
    key = outline.add_user("quinn")
    assert proxy.get("/echo", key=key, headers={"Origin": "https://evil.example"}).status_code == 403
    assert proxy.get("/echo", key=key, headers={"Origin": "https://app.example.com"}).status_code == 200
    assert proxy.get("/echo", key=key).status_code == 200


def test_health_stats_and_metrics(make_proxy, outline):
    proxy = make_proxy(stats_password="s3cret")
    key = outline.add_user("rita")
    echo(proxy, key)
    health = proxy.get("/health").json()
    assert health == {"status": "healthy", "containers_tracked": 1, "containers_running": 1, "docker": "ok"}
    mine = proxy.get("/health", key=key).json()
    assert mine["user"]["name"] == "Rita"
    assert mine["container"] == {"name": proxy.container_name(key), "state": "running"}
    with proxy.client() as c:
        assert c.get("/stats").status_code == 401
        assert c.get("/stats", auth=("admin", "wrong")).status_code == 401
        assert c.get("/metrics", auth=("admin", "s3cret-")).status_code == 401
        stats = c.get("/stats", auth=("admin", "s3cret")).json()
        metrics = c.get("/metrics", auth=("admin", "s3cret")).text
    c0 = stats["containers"][0]
    for field in ("name", "state", "user", "created_at", "last_used", "idle_seconds", "active_requests",
                  "requests_total", "address", "websockets"):
        assert field in c0
    assert c0["requests_total"] == 1 and c0["active_requests"] == 0
    assert stats["auth"]["misses"] == 1
    assert "mcp_proxy_containers_running 1" in metrics
    assert f'mcp_proxy_container_requests_total{{container="{c0["name"]}"}} 1' in metrics


def test_max_running_stops_the_least_recently_used_idle_container(make_proxy, outline):
    proxy = make_proxy(max_running="1")
    a, b = outline.add_user("sam"), outline.add_user("tess")
    echo(proxy, a)
    echo(proxy, b)
    assert proxy.state(proxy.container_name(a)) == "exited"
    assert proxy.state(proxy.container_name(b)) == "running"
    # with the only slot busy (a stream in flight), the next user gets 503 + Retry-After
    with proxy.client() as c:
        with c.stream("GET", "/sse?n=4&interval_ms=500", headers={"X-Outline-API-Key": b}) as r:
            lines = r.iter_lines()
            next(lines)
            refused = proxy.get("/echo", key=a)
            assert refused.status_code == 503
            assert refused.json()["error"] == "at_capacity"
            assert refused.headers["retry-after"] == "30"
            for _ in lines:
                pass
    assert echo(proxy, a)


def test_long_stopped_containers_are_removed(make_proxy, outline):
    proxy = make_proxy(idle_timeout="1s", sweep_interval="1s", remove_after="2s")
    key = outline.add_user("uma")
    echo(proxy, key)
    name = proxy.container_name(key)
    wait_for(lambda: proxy.state(name) == "exited", timeout=20, what="sleep")
    wait_for(lambda: proxy.state(name) == "missing", timeout=20, what="removal")
    assert echo(proxy, key)  # and the next request creates it again
    assert proxy.state(name) == "running"


def test_start_timeout_gives_503(make_proxy, outline):
    proxy = make_proxy(image="outline-mcp-proxy-test-backend:never-ready", start_timeout="2s")
    key = outline.add_user("vic")
    t0 = time.monotonic()
    r = proxy.get("/echo", key=key)
    assert r.status_code == 503
    assert r.json()["error"] == "start_timeout"
    assert time.monotonic() - t0 < 10
    assert proxy.get("/health").status_code == 200


def test_a_container_that_exits_at_start_gives_503_quickly(make_proxy, outline):
    proxy = make_proxy(image="outline-mcp-proxy-test-backend:exits", start_timeout="30s")
    key = outline.add_user("walt")
    t0 = time.monotonic()
    r = proxy.get("/echo", key=key)
    assert r.status_code == 503
    assert r.json()["error"] in ("container_failed", "start_timeout")
    assert time.monotonic() - t0 < 10, "an exited container should not wait for START_TIMEOUT"
    assert len(proxy.containers()) == 1  # no duplicate after a failed start


def test_missing_image_gives_a_clear_503(make_proxy, outline):
    proxy = make_proxy(image="outline-mcp-proxy-no-such-image:1")
    key = outline.add_user("xena")
    r = proxy.get("/echo", key=key)
    assert r.status_code == 503
    assert r.json()["error"] == "container_failed"
    assert proxy.get("/health").status_code == 200


def run_binary(*args, env=None):
    return subprocess.run([str(BINARY), *args], capture_output=True, text=True, env=env, timeout=60)


def test_help_lists_every_setting_with_its_default():
    out = run_binary("--help").stdout
    for name, default in [("MCP_PROXY_LISTEN", "127.0.0.1:8000"), ("OUTLINE_URL", "https://app.getoutline.com"),
                          ("MCP_PROXY_IDLE_TIMEOUT", "5m"), ("MCP_PROXY_MEMORY", "192m"),
                          ("MCP_PROXY_KEY_MODE", "header"), ("MCP_PROXY_MAX_BODY", "10m"),
                          ("MCP_PROXY_DOCKER", "docker"), ("MCP_PROXY_ALLOWED_ORIGINS", "")]:
        assert f"{name} [{default}]" in out
    assert run_binary("--version").stdout.startswith("outline-mcp-proxy ")


def test_every_setting_in_help_is_in_the_readme_table():
    import re

    names = re.findall(r"^  ([A-Z][A-Z_]+) \[", run_binary("--help").stdout, re.M)
    assert len(names) > 30
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Settings"):readme.index("## How it works")]
    rows = "\n".join(line for line in table.splitlines() if line.startswith("| "))
    assert [n for n in names if n not in rows] == []


def test_a_bad_setting_stops_start_up_naming_the_variable():
    r = run_binary(env={"PATH": os.environ["PATH"], "MCP_PROXY_IDLE_TIMEOUT": "soon"})
    assert r.returncode == 2
    assert "MCP_PROXY_IDLE_TIMEOUT" in r.stderr


def test_check_reports_each_item(outline, gateway):
    base = {"PATH": os.environ["PATH"], "OUTLINE_URL": f"http://127.0.0.1:{outline.port}",
            "MCP_PROXY_IMAGE": "outline-mcp-proxy-test-backend:latest", "MCP_PROXY_LISTEN": "127.0.0.1:0"}
    good = run_binary("check", env=base)
    assert good.returncode == 0, good.stdout
    assert "Docker daemon answers" in good.stdout and "All checks passed" in good.stdout
    bad = run_binary("check", env=dict(base, MCP_PROXY_IMAGE="outline-mcp-proxy-no-such-image:1"))
    assert bad.returncode == 1
    assert "✗ image outline-mcp-proxy-no-such-image:1 is missing" in bad.stdout
    down = run_binary("check", env=dict(base, OUTLINE_URL="http://127.0.0.1:9"))
    assert down.returncode == 1


def test_cleanup_removes_only_long_stopped_containers_of_this_proxy(make_proxy, outline):
    proxy = make_proxy()
    a, b = outline.add_user("yara"), outline.add_user("zed")
    echo(proxy, a)
    echo(proxy, b)
    name_a, name_b = proxy.container_name(a), proxy.container_name(b)
    docker("stop", "--time", "1", name_a)
    time.sleep(1.1)  # the container must have been stopped longer than REMOVE_AFTER=1s
    env = dict(proxy.env, MCP_PROXY_REMOVE_AFTER="1s")
    r = run_binary("cleanup", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"removed {name_a}" in r.stdout
    assert proxy.state(name_a) == "missing"
    assert proxy.state(name_b) == "running"
    assert echo(proxy, a)  # the proxy recreates a removed container on the next request
