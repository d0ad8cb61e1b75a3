#!/usr/bin/env python3
"""The benchmark: what users feel, measured side by side in one run on one machine.

    python3 tests/bench.py            (after tests/run has built the binary and images)

  1. Warm path: wrk with 1 and 20 connections against a fast backend (nginx answering
     a fixed JSON body, in a container), directly, through nginx (1 worker, keepalive
     upstream) and through the proxy; req/s, p50, p99 and the proxy/nginx ratios.
  2. Wake and create with the real mcp-outline image: stopped -> first answer through
     the proxy, against `docker start` + readiness polled by hand for the same image
     and limits (the physical limit); missing -> first answer against `docker run` +
     readiness by hand; each with and without the boot burst.
  3. Memory and threads: proxy RSS idle, after the warm-path load, holding 300
     concurrent SSE streams; the RSS of an idle mcp-outline container and how many
     users fit in 2 GB.
  4. Outline calls: auth.info calls per 1,000 requests of one user.
  5. `grants` (asked by name): 10,000 OAuth grants stored (100 real sign-ins, and
     9,900 records copied from them with fresh random ids, hashes and sealed boxes of
     the same size, written into the state file while the proxy is stopped: signing in
     10,000 times takes longer than the measure), then /oauth/mcp latency p50/p99 (wrk,
     1 connection) while another thread keeps refreshing tokens and signing in, against
     the same without writes; three runs each, the worst reported.
Not part of CI: it takes minutes and its figures are for people to read.
"""

import concurrent.futures
import json
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import BINARY, ROOT, Proxy, docker, docker_gateway, free_port, wait_for  # noqa: E402
from fake_outline import FakeOutline  # noqa: E402
from oauth_client import exchange, pkce_pair, refresh, register, scripted_code, scripted_tokens  # noqa: E402

BENCH_IMAGE = "outline-mcp-proxy-bench-nginx:latest"
BACKEND_IMAGE = "outline-mcp-proxy-test-backend:latest"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
AUTH_TTL = 10  # short here, so the load spans several TTLs
WRK_SECONDS = os.environ.get("BENCH_WRK_SECONDS", "8")
RESULTS = []


def say(*a):
    print(*a, flush=True)


def build_bench_nginx_image():
    """nginx from this host, with its libraries, answering a fixed JSON body on :3000."""
    if docker("image", "inspect", BENCH_IMAGE, check=False).returncode == 0:
        return
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    root = Path(tempfile.mkdtemp())
    root.chmod(0o755)
    (root / "etc/nginx").mkdir(parents=True)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)  # Docker's tmpfs on /tmp takes the image's mode
    shutil.copy(nginx, root / "nginx")
    libs = re.findall(r"(/\S+\.so[.\d]*)", subprocess.run(["ldd", nginx], capture_output=True, text=True).stdout)
    for lib in libs:
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(lib), dest)
    (root / "etc/passwd").write_text("nobody:x:65534:65534:nobody:/tmp:/sbin/nologin\n")
    (root / "etc/group").write_text("nogroup:x:65534:\n")
    (root / "etc/nginx/bench.conf").write_text("""
worker_processes 1;
daemon off;
pid /tmp/nginx.pid;
error_log /dev/stderr warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path /tmp/b; proxy_temp_path /tmp/p; fastcgi_temp_path /tmp/f;
    uwsgi_temp_path /tmp/u; scgi_temp_path /tmp/s;
    keepalive_requests 1000000;
    server {
        listen 3000;
        location / {
            default_type application/json;
            return 200 '{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}';
        }
    }
}
""")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "--change", 'ENTRYPOINT ["/nginx","-e","/dev/stderr","-p","/tmp/","-c","/etc/nginx/bench.conf"]',
                    "-", BENCH_IMAGE], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    shutil.rmtree(root)


def start_proxy(outline, prefix, **settings):
    env = {
        "PATH": os.environ["PATH"],
        "MCP_PROXY_LISTEN": f"127.0.0.1:{free_port()}",
        "OUTLINE_URL": f"http://127.0.0.1:{outline.port}",
        "MCP_PROXY_CONTAINER_OUTLINE_URL": f"http://{docker_gateway()}:{outline.port}",
        "MCP_PROXY_CONTAINER_PREFIX": prefix,
        "MCP_PROXY_LOG": "warn",
        "MCP_PROXY_START_TIMEOUT": "120s",
        "MCP_PROXY_SPARES": "0",  # the spare benchmark turns them on
    }
    env.update({k if k.startswith(("MCP_", "OUTLINE_")) else f"MCP_PROXY_{k.upper()}": str(v)
                for k, v in settings.items()})
    return Proxy(env, Path(tempfile.mkdtemp()) / "proxy.log", prefix, outline).start()


def rss_kib(pid):
    return int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")).split()[1])


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def wrk(url, connections, headers=()):
    args = ["wrk", "-t", "1" if connections == 1 else "2", "-c", str(connections), "-d", f"{WRK_SECONDS}s",
            "--latency"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert not errors, out
    return {"rps": rps, "p50": pct(50), "p99": pct(99)}


def host_nginx(upstream):
    d = Path(tempfile.mkdtemp())
    port = free_port()
    for sub in ("b", "p", "f", "u", "s"):
        (d / sub).mkdir()
    (d / "nginx.conf").write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;
    uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
    keepalive_requests 1000000;
    upstream backend {{ server {upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    p = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(d / "nginx.conf")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _connects(port), timeout=10, what="bench nginx")
    return p, port


def _connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def bench_warm_path(outline):
    say("\n== 1. warm path (wrk, fixed JSON body from nginx in a container) ==")
    build_bench_nginx_image()
    key = outline.add_user("bench")
    proxy = start_proxy(outline, "bench-warm-", image=BENCH_IMAGE, auth_ttl=f"{AUTH_TTL}s", max_body="10m")
    pid = proxy.process.pid
    rss_idle = rss_kib(pid)
    r = httpx.get(proxy.url + "/x", headers={"X-Outline-API-Key": key})
    assert r.status_code == 200, r.text
    name = proxy.container_name(key)
    ip = container_ip(name)
    nginx, nginx_port = host_nginx(f"{ip}:3000")
    # the OAuth door: the same user's container, reached with the proxy's own token
    # (its grant opened per request: two HKDF-keyed AEAD opens, then the key cache)
    _, tokens = scripted_tokens(proxy.url, key)
    rows = {}
    calls_before = outline.auth_calls_for(key)
    started = time.monotonic()
    try:
        for conns in (1, 20):
            rows[("direct", conns)] = wrk(f"http://{ip}:3000/mcp", conns)
            rows[("nginx", conns)] = wrk(f"http://127.0.0.1:{nginx_port}/mcp", conns)
            rows[("proxy", conns)] = wrk(f"{proxy.url}/mcp", conns, [f"X-Outline-API-Key: {key}"])
            rows[("oauth", conns)] = wrk(f"{proxy.url}/oauth/mcp", conns,
                                         [f"Authorization: Bearer {tokens['access_token']}"])
    finally:
        nginx.terminate()
    rss_after = rss_kib(pid)
    say(f"{'path':8} {'conns':>5} {'req/s':>10} {'p50 µs':>8} {'p99 µs':>8}")
    for (path, conns), r in rows.items():
        say(f"{path:8} {conns:>5} {r['rps']:>10.0f} {r['p50']:>8.0f} {r['p99']:>8.0f}")
    for conns in (1, 20):
        p, o = rows[("proxy", conns)], rows[("oauth", conns)]
        say(f"{conns:>2} conn: /oauth/mcp against /mcp: throughput {o['rps'] / p['rps']:.2f}, "
            f"p50 {o['p50'] - p['p50']:+.0f} µs")
        RESULTS.append((f"OAuth door, {conns} connection(s)",
                        f"/oauth/mcp {o['rps']:.0f} req/s p50 {o['p50']:.0f} µs p99 {o['p99']:.0f} µs; "
                        f"/mcp {p['rps']:.0f} req/s p50 {p['p50']:.0f} µs: throughput "
                        f"{o['rps'] / p['rps']:.2f} ×, p50 {o['p50'] - p['p50']:+.0f} µs"))
    for conns in (1, 20):
        d, n, p = rows[("direct", conns)], rows[("nginx", conns)], rows[("proxy", conns)]
        say(f"{conns:>2} conn: proxy/nginx throughput {p['rps'] / n['rps']:.2f}; p50 added over direct: "
            f"nginx {n['p50'] - d['p50']:.0f} µs, proxy {p['p50'] - d['p50']:.0f} µs "
            f"(difference {(p['p50'] - d['p50']) - (n['p50'] - d['p50']):+.0f} µs)")
        RESULTS.append((f"warm path, {conns} connection(s)", f"direct {d['rps']:.0f} req/s p50 {d['p50']:.0f} µs; "
                        f"nginx {n['rps']:.0f} req/s p50 {n['p50']:.0f} µs p99 {n['p99']:.0f} µs; "
                        f"proxy {p['rps']:.0f} req/s p50 {p['p50']:.0f} µs p99 {p['p99']:.0f} µs; "
                        f"proxy/nginx throughput {p['rps'] / n['rps']:.2f}, p50 added: nginx "
                        f"{n['p50'] - d['p50']:.0f} µs, proxy {p['p50'] - d['p50']:.0f} µs"))
    total = sum(r["rps"] for (path, _), r in rows.items() if path in ("proxy", "oauth")) * float(WRK_SECONDS)
    calls = outline.auth_calls_for(key) - calls_before
    window = time.monotonic() - started
    say(f"Outline auth.info calls during ~{total:.0f} proxied requests over {window:.0f} s: {calls} "
        f"({calls / total * 1000:.4f} per 1,000 requests; AUTH_TTL {AUTH_TTL}s: at most {window / AUTH_TTL + 1:.0f})")
    RESULTS.append(("Outline calls", f"{calls} auth.info call(s) for ~{total:.0f} requests of one user over "
                    f"{window:.0f} s with AUTH_TTL {AUTH_TTL}s ({calls / total * 1000:.4f} per 1,000 requests; "
                    f"one per TTL at most)"))
    RESULTS.append(("proxy memory", f"RSS idle {rss_idle} KiB, after the warm-path load {rss_after} KiB, "
                    f"threads {threads(pid)}"))
    say(f"proxy RSS idle {rss_idle} KiB, after the load {rss_after} KiB")
    proxy.stop()
    proxy.cleanup()


def poll_ready(ip, timeout=120):
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as c:
        while time.monotonic() < deadline:
            try:
                if c.get(f"http://{ip}:3000/health").status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.025)
    raise AssertionError("never ready")


def container_ip(name):
    """The container's address on whichever network it is on (the proxy's own, or bridge)."""
    networks = json.loads(docker("container", "inspect", name).stdout)[0]["NetworkSettings"]["Networks"]
    return next(n["IPAddress"] for n in networks.values() if n.get("IPAddress"))


def bench_wake_and_create(outline, image):
    say(f"\n== 2. wake and create with the real mcp-outline ({image}) ==")
    for burst in ("1", "0"):
        label = "with boot burst (1 CPU)" if burst == "1" else "without burst (0.3 CPU)"
        key = outline.add_user(f"wake{burst}")
        proxy = start_proxy(outline, f"bench-wake{burst}-", image=image, boot_cpus=burst, idle_timeout="1h")
        name = proxy.container_name(key)
        headers = {"X-Outline-API-Key": key}
        creates, wakes, phys_wake, phys_create = [], [], [], []
        run_args = None
        for i in range(ROUNDS):
            docker("rm", "-f", name, check=False)
            proxy.restart()  # forgets nothing it should not: the registry is rebuilt from Docker
            t0 = time.monotonic()
            r = httpx.get(proxy.url + "/health", headers=headers)  # warm the auth cache, not the container
            assert r.status_code == 200
            t0 = time.monotonic()
            assert httpx.get(proxy.url + "/ready", headers=headers, timeout=120).status_code == 200
            creates.append(time.monotonic() - t0)
            info = proxy.inspect(name)
            # stop it as the sleeper would, re-armed for the next wake
            docker("stop", name)
            if burst == "1":
                docker("update", "--cpus", "1", name)
            proxy.restart()
            httpx.get(proxy.url + "/health", headers=headers)
            t0 = time.monotonic()
            assert httpx.get(proxy.url + "/ready", headers=headers, timeout=120).status_code == 200
            wakes.append(time.monotonic() - t0)
            # the physical limit for the same container: docker start + readiness by hand
            docker("stop", name)
            if burst == "1":
                docker("update", "--cpus", "1", name)
            t0 = time.monotonic()
            docker("start", name)
            poll_ready(container_ip(name))
            phys_wake.append(time.monotonic() - t0)
            run_args = info
        # the physical limit for a create: docker run with the proxy's own flags, by hand
        hc = run_args["HostConfig"]
        for i in range(ROUNDS):
            tmp = f"bench-phys-create-{burst}-{i}"
            cpus = "1" if burst == "1" else "0.3"
            t0 = time.monotonic()
            docker("run", "--detach", "--init", "--read-only", "--name", tmp, "--memory", str(hc["Memory"]),
                   "--memory-swap", str(hc["MemorySwap"]), "--cpus", cpus, "--pids-limit", "128", "--cap-drop", "ALL",
                   "--security-opt", "no-new-privileges", "--tmpfs", "/tmp:rw,noexec,nosuid,size=64m",
                   "--user", "65534:65534", "--env", "HOME=/tmp", "--env",
                   f"OUTLINE_API_URL=http://{docker_gateway()}:{outline.port}/api", image)
            poll_ready(container_ip(tmp))
            phys_create.append(time.monotonic() - t0)
            docker("rm", "-f", tmp)
        med = statistics.median
        say(f"{label}: wake {med(wakes) * 1000:.0f} ms vs physical {med(phys_wake) * 1000:.0f} ms "
            f"(ratio {med(wakes) / med(phys_wake):.2f}); create {med(creates) * 1000:.0f} ms vs physical "
            f"{med(phys_create) * 1000:.0f} ms (ratio {med(creates) / med(phys_create):.2f}); medians of {ROUNDS}")
        RESULTS.append((f"wake, {label}", f"{med(wakes) * 1000:.0f} ms through the proxy; docker start + readiness "
                        f"by hand {med(phys_wake) * 1000:.0f} ms; ratio {med(wakes) / med(phys_wake):.2f}"))
        RESULTS.append((f"create, {label}", f"{med(creates) * 1000:.0f} ms through the proxy; docker run + "
                        f"readiness by hand {med(phys_create) * 1000:.0f} ms; ratio "
                        f"{med(creates) / med(phys_create):.2f}"))
        if burst == "0":
            # per-container memory of an idle mcp-outline, settled
            time.sleep(3)
            stats = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", name).stdout.strip()
            used = stats.split("/")[0].strip()
            mib = float(re.match(r"([\d.]+)", used).group(1)) * (1 / 1024 if used.endswith("KiB") else
                                                                    1024 if used.endswith("GiB") else 1)
            fits = int((2048 - 600) // mib)
            say(f"idle mcp-outline container: {used} -> about {fits} users in 2 GB "
                f"(leaving 600 MiB for the OS, Docker, nginx and the proxy); MCP_PROXY_MEMORY caps each at 256 MiB")
            RESULTS.append(("idle mcp-outline container", f"{used}; about {fits} running users fit in 2 GB "
                            f"(600 MiB kept for the OS, Docker, nginx, the proxy)"))
        proxy.stop()
        proxy.cleanup()


def mcp_post(url, key, message, session=None):
    headers = {"X-Outline-API-Key": key, "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json", "MCP-Protocol-Version": "2025-06-18"}
    if session:
        headers["Mcp-Session-Id"] = session
    return httpx.post(url + "/mcp", headers=headers, content=json.dumps(message), timeout=120)


def bench_resurrection(outline, image):
    """The first call in a session after a wake pays one extra initialize (the proxy
    opens a new upstream session for the client): measured next to a plain wake."""
    say(f"\n== 2b. wake with a session held open, real mcp-outline ({image}) ==")
    key = outline.add_user("resurrect")
    proxy = start_proxy(outline, "bench-resurrect-", image=image, idle_timeout="1h", log="info")
    name = proxy.container_name(key)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "bench", "version": "1"}}}
    r = mcp_post(proxy.url, key, init)
    session = r.headers["mcp-session-id"]
    mcp_post(proxy.url, key, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    assert mcp_post(proxy.url, key, call, session).status_code == 200
    resurrected, plain = [], []
    for _ in range(ROUNDS):
        for sample, request in ((resurrected, lambda: mcp_post(proxy.url, key, call, session)),
                                (plain, lambda: httpx.get(proxy.url + "/ready", timeout=120,
                                                          headers={"X-Outline-API-Key": key}))):
            docker("stop", name)
            docker("update", "--cpus", "1", name)
            t0 = time.monotonic()
            assert request().status_code == 200
            sample.append(time.monotonic() - t0)
    med = statistics.median
    # the new upstream session's handshake (initialize + initialized), as the proxy logs it
    handshakes = [int(m) for m in re.findall(r"session resurrected container=\S+ (\d+)ms", proxy.log())]
    assert len(handshakes) >= ROUNDS, proxy.log()[-2000:]
    say(f"wake + the client's old session answered: {med(resurrected) * 1000:.0f} ms; plain wake: "
        f"{med(plain) * 1000:.0f} ms; the new upstream session's handshake: {med(handshakes)} ms; medians of {ROUNDS}")
    RESULTS.append(("wake with a session held open", f"{med(resurrected) * 1000:.0f} ms to the first answer in the "
                    f"client's old session; plain wake {med(plain) * 1000:.0f} ms; the extra initialize round trip "
                    f"{med(handshakes)} ms"))
    proxy.stop()
    proxy.cleanup()


def spares_ready(proxy):
    return sum(1 for c in proxy.stats()["containers"] if c.get("spare") and c["state"] == "running")


def memory_mib(name):
    used = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", name).stdout.strip().split("/")[0].strip()
    scale = 1 / 1024 if used.endswith("KiB") else 1024 if used.endswith("GiB") else 1
    return float(re.match(r"([\d.]+)", used).group(1)) * scale


def bench_spares(outline, image):
    """Create and wake with a warm spare ready, real mcp-outline: through the proxy
    (auth cached), against the physical limit measured by hand in the same run: a
    rename of a booted container plus the first MCP round trip to it."""
    say(f"\n== 2c. create and wake with a warm spare ready, real mcp-outline ({image}) ==")
    proxy = start_proxy(outline, "bench-spare-", image=image, spares="1", idle_timeout="1h")
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "bench", "version": "1"}}}
    creates, wakes, physical = [], [], []
    for i in range(ROUNDS):
        key = outline.add_user(f"spare{i}")
        name = proxy.container_name(key)
        for sample in (creates, wakes):
            wait_for(lambda: spares_ready(proxy) == 1, timeout=120, what="a spare")
            assert httpx.get(proxy.url + "/health", headers={"X-Outline-API-Key": key}).status_code == 200
            t0 = time.monotonic()
            assert mcp_post(proxy.url, key, init).status_code == 200
            sample.append(time.monotonic() - t0)
            # asleep as the sleeper leaves it with spares on: removed
            docker("rm", "--force", name)
            wait_for(lambda: next((c["state"] for c in proxy.stats()["containers"] if c["name"] == name), "missing")
                     == "missing", timeout=10, what="the registry to see the removal")
    # by hand: a booted container of the same image, renamed, then the first MCP round trip
    for i in range(ROUNDS):
        tmp = f"bench-phys-spare-{i}"
        docker("run", "--detach", "--init", "--read-only", "--name", tmp, "--memory", "268435456",
               "--cpus", "0.3", "--tmpfs", "/tmp:rw,noexec,nosuid,size=64m", "--user", "65534:65534",
               "--env", "HOME=/tmp", "--env", f"OUTLINE_API_URL=http://{docker_gateway()}:{outline.port}/api", image)
        ip = container_ip(tmp)
        poll_ready(ip)
        t0 = time.monotonic()
        docker("rename", tmp, tmp + "-taken")
        r = httpx.post(f"http://{ip}:3000/mcp", content=json.dumps(init), timeout=60,
                       headers={"Accept": "application/json, text/event-stream", "Content-Type": "application/json"})
        assert r.status_code == 200
        physical.append(time.monotonic() - t0)
        docker("rm", "-f", tmp + "-taken")
    med = statistics.median
    say(f"create with a spare: {med(creates) * 1000:.0f} ms; wake with a spare: {med(wakes) * 1000:.0f} ms; "
        f"by hand (rename + first MCP round trip): {med(physical) * 1000:.0f} ms; medians of {ROUNDS}")
    RESULTS.append(("create with a warm spare", f"{med(creates) * 1000:.0f} ms through the proxy (first MCP round "
                    f"trip answered); rename + round trip by hand {med(physical) * 1000:.0f} ms"))
    RESULTS.append(("wake with a warm spare", f"{med(wakes) * 1000:.0f} ms through the proxy"))
    wait_for(lambda: spares_ready(proxy) == 1, timeout=120, what="a spare")
    time.sleep(3)  # let the spare settle before its memory is read
    spare_mib = memory_mib(proxy.spares()[0])
    usable = 2048 - 600
    say(f"one spare: {spare_mib:.0f} MiB; running users per 2 GB: about {int(usable // spare_mib)} without spares, "
        f"{int((usable - spare_mib) // spare_mib)} with one")
    RESULTS.append(("one warm spare", f"{spare_mib:.0f} MiB; about {int(usable // spare_mib)} running users per 2 GB "
                    f"without spares, {int((usable - spare_mib) // spare_mib)} with one (600 MiB kept for the OS, "
                    f"Docker, nginx, the proxy)"))
    proxy.stop()
    proxy.cleanup()


def bench_streams(outline):
    say("\n== 3. memory and threads holding 300 SSE streams ==")
    key = outline.add_user("streams")
    proxy = start_proxy(outline, "bench-sse-", image=BACKEND_IMAGE, pids_limit="2048")
    pid = proxy.process.pid
    assert httpx.get(proxy.url + "/echo", headers={"X-Outline-API-Key": key}).status_code == 200
    idle = rss_kib(pid)
    n = 300
    opened = threading.Semaphore(0)
    release = threading.Event()

    def hold():
        with httpx.Client(timeout=120) as c:
            with c.stream("GET", proxy.url + "/sse?n=2&interval_ms=60000", headers={"X-Outline-API-Key": key}) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data:"):
                        break
                opened.release()
                release.wait()

    pool = concurrent.futures.ThreadPoolExecutor(n)
    futures = [pool.submit(hold) for _ in range(n)]
    for _ in range(n):
        assert opened.acquire(timeout=120)
    held, held_threads = rss_kib(pid), threads(pid)
    release.set()
    say(f"proxy RSS idle {idle} KiB; holding {n} open SSE streams {held} KiB, {held_threads} threads")
    RESULTS.append((f"proxy holding {n} SSE streams", f"RSS {held} KiB ({held / 1024:.1f} MiB), "
                    f"{held_threads} threads"))
    proxy.stop(sig=9)
    pool.shutdown(wait=False, cancel_futures=True)
    proxy.cleanup()


def seed_grant_copies(path, total):
    """Copies of the real grants in a stopped proxy's state file, each with its own
    random id, token hashes, user hash and sealed boxes of the real sizes, up to `total`."""
    state = json.loads(path.read_text())
    real = state["grants"]

    def rand_hex(like):
        return secrets.token_hex(len(like) // 2)

    for i in range(total - len(real)):
        grant = json.loads(json.dumps(real[i % len(real)]))
        grant["id"] = secrets.token_urlsafe(32)
        grant["user"] = rand_hex(grant["user"])
        grant["sealed"] = rand_hex(grant["sealed"])
        for token in [grant["refresh"], *grant["access"]]:
            token["hash"], token["wrapped_key"] = rand_hex(token["hash"]), rand_hex(token["wrapped_key"])
        grant["retired_refresh"] = [rand_hex(h) for h in grant["retired_refresh"]]
        state["grants"].append(grant)
    path.write_text(json.dumps(state))


def bench_grants(outline):
    say("\n== 5. /oauth/mcp latency with 10,000 grants stored, while grants are written ==")
    build_bench_nginx_image()
    state = Path(tempfile.mkdtemp())
    proxy = start_proxy(outline, "bench-grants-", image=BENCH_IMAGE, state_dir=str(state),
                        oauth_register_limit="100000", auth_ttl="60s")
    redirect = "http://127.0.0.1:9/callback"
    users = [outline.add_user(f"grants{i}") for i in range(100)]
    clients = [register(proxy.url, redirect) for _ in range(10)]

    def sign_in(key, client_id):
        verifier, challenge = pkce_pair()
        code = scripted_code(proxy.url, client_id, redirect, key, challenge)
        r = exchange(proxy.url, client_id, redirect, code, verifier)
        assert r.status_code == 200, r.text
        return client_id, r.json()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        issued = list(pool.map(lambda job: sign_in(*job), [(key, clients[i % 10]) for i, key in enumerate(users)]))
    proxy.stop()  # the state file written whole: then the copies are added to it
    seed_grant_copies(state / "oauth-grants.json", 10_000)
    proxy.start()
    grants = proxy.stats()["oauth"]["grants"]
    on_disk = sum(p.stat().st_size for p in state.iterdir())
    say(f"seeded {grants} grants in {time.monotonic() - started:.0f} s; state on disk {on_disk / 2**20:.1f} MiB")
    assert grants == 10_000, grants
    watched = issued[0][1]["access_token"]
    assert httpx.get(proxy.url + "/oauth/mcp", headers={"Authorization": f"Bearer {watched}"}).status_code == 200
    # the writer refreshes other users' grants (each a journal write) and signs in anew
    # (a new grant that ends its user's oldest): as fast as one thread can
    stop = threading.Event()
    writes = []

    tokens = dict(enumerate(issued[1:]))  # refreshed in turn, across the runs
    newcomer = outline.add_user("grants-writer")  # signs in again and again (its oldest go)

    def keep_writing():
        n = 0
        while not stop.is_set():
            n += 1
            if n % 10 == 0:
                sign_in(newcomer, clients[n % 10])
            else:
                i = list(tokens)[n % len(tokens)]
                client_id, t = tokens[i]
                r = refresh(proxy.url, client_id, t["refresh_token"])
                assert r.status_code == 200, r.text
                tokens[i] = (client_id, r.json())
            writes.append(time.monotonic())

    rows = {"quiet": [], "writing": []}
    for _ in range(3):
        rows["quiet"].append(wrk(f"{proxy.url}/oauth/mcp", 1, [f"Authorization: Bearer {watched}"]))
        stop.clear()
        writer = concurrent.futures.ThreadPoolExecutor(1).submit(keep_writing)
        before = len(writes)
        rows["writing"].append(wrk(f"{proxy.url}/oauth/mcp", 1, [f"Authorization: Bearer {watched}"]))
        stop.set()
        writer.result(timeout=60)  # a failed write is an error of the benchmark
        rows.setdefault("writes", []).append((len(writes) - before) / float(WRK_SECONDS))
    worst = {k: {"p50": max(r["p50"] for r in v), "p99": max(r["p99"] for r in v), "rps": min(r["rps"] for r in v)}
             for k, v in rows.items() if k != "writes"}
    q, w = worst["quiet"], worst["writing"]
    on_disk = sum(p.stat().st_size for p in state.iterdir())
    say(f"{'':8} {'req/s':>8} {'p50 µs':>8} {'p99 µs':>8}   (worst of 3 runs each)")
    for name in ("quiet", "writing"):
        say(f"{name:8} {worst[name]['rps']:>8.0f} {worst[name]['p50']:>8.0f} {worst[name]['p99']:>8.0f}")
    say(f"writes (refreshes and sign-ins) per second meanwhile: {min(rows['writes']):.0f} at least; "
        f"grants {proxy.stats()['oauth']['grants']}, state on disk {on_disk / 2**20:.1f} MiB")
    RESULTS.append(("/oauth/mcp with 10,000 grants, writes meanwhile",
                    f"without writes p50 {q['p50']:.0f} µs p99 {q['p99']:.0f} µs; with "
                    f"{min(rows['writes']):.0f}+ writes/s p50 {w['p50']:.0f} µs p99 {w['p99']:.0f} µs "
                    f"(p99 {w['p99'] - q['p99']:+.0f} µs; worst of 3 runs each)"))
    proxy.stop()
    proxy.cleanup()


def main():
    machine = (f"{platform.node()}: {os.cpu_count()} CPUs "
               f"({next((l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')}), "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
               f"kernel {platform.release()}, Docker {docker('version', '--format', '{{.Server.Version}}').stdout.strip()}")
    say(f"machine: {machine}")
    outline = FakeOutline(host="0.0.0.0").start()
    image = subprocess.run([str(ROOT / "tests" / "build-mcp-outline-image.sh")], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    only = sys.argv[1:] or ["warm", "wake", "streams"]
    if "warm" in only:
        bench_warm_path(outline)
    if "wake" in only:
        bench_wake_and_create(outline, image)
        bench_resurrection(outline, image)
        bench_spares(outline, image)
    if "streams" in only:
        bench_streams(outline)
    if "grants" in only:
        bench_grants(outline)
    say("\n| measure | result |\n|---|---|")
    for what, result in RESULTS:
        say(f"| {what} | {result} |")
    say(f"\nmachine: {machine}")


if __name__ == "__main__":
    main()
