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
  6. `day` (asked by name; options: `bench.py day --help`): a team's working day,
     compressed: N users, each a real SDK session held open, making seeded bursts of
     tool calls; the idle and budget policy replayed on the same schedule; latency,
     wakes, budget sleeps, awake containers, their cgroups' memory, errors, OOM kills;
     an SVG plot (docs/day.svg).
  7. `memory` (asked by name): one mcp-outline container's settled PSS and cgroup memory
     after a session of tool calls, and a large document's peak, for each environment
     setting and limit tried.
Not part of CI: it takes minutes and its figures are for people to read.
"""

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import BINARY, ROOT, Proxy, docker, docker_gateway, free_port, wait_for  # noqa: E402
from fake_outline import FakeOutline  # noqa: E402
from oauth_client import exchange, pkce_pair, refresh, register, scripted_code, scripted_tokens  # noqa: E402

BENCH_IMAGE = "outline-mcp-proxy-bench-nginx:latest"
BACKEND_IMAGE = "outline-mcp-proxy-test-backend:latest"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
AUTH_TTL = 10  # short here, so the load spans several TTLs
WRK_SECONDS = os.environ.get("BENCH_WRK_SECONDS", "8")
WARM_ROUNDS = int(os.environ.get("BENCH_WARM_ROUNDS", "3"))  # wrk runs per path in `warm`, taking turns
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


def in_turns(paths, conns):
    """Each path's figures at `conns` connections: the median of WARM_ROUNDS wrk runs. The
    paths take turns, in reverse order every other round, so that a machine that drifts
    during the benchmark (this VM's neighbours) weighs on each of them alike, not on
    whichever ran last."""
    runs = {name: [] for name in paths}
    for round_ in range(WARM_ROUNDS):
        for name in (list(paths) if round_ % 2 == 0 else list(reversed(paths))):
            url, headers = paths[name]
            runs[name].append(wrk(url, conns, headers))
    return {name: {k: statistics.median(r[k] for r in taken) for k in ("rps", "p50", "p99")}
            | {"p50s": [r["p50"] for r in taken]} for name, taken in runs.items()}


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
    say(f"\n== 1. warm path (wrk, fixed JSON body from nginx in a container; medians of {WARM_ROUNDS} "
        f"{WRK_SECONDS} s runs per path, the paths taking turns) ==")
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
    paths = {
        "direct": (f"http://{ip}:3000/mcp", []),
        "nginx": (f"http://127.0.0.1:{nginx_port}/mcp", []),
        "proxy": (f"{proxy.url}/mcp", [f"X-Outline-API-Key: {key}"]),
        "oauth": (f"{proxy.url}/oauth/mcp", [f"Authorization: Bearer {tokens['access_token']}"]),
    }
    calls_before = outline.auth_calls_for(key)
    started = time.monotonic()
    try:
        rows = {(path, conns): figures for conns in (1, 20) for path, figures in in_turns(paths, conns).items()}
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
            f"(difference {(p['p50'] - d['p50']) - (n['p50'] - d['p50']):+.0f} µs; "
            f"each round's p50 direct {d['p50s']}, nginx {n['p50s']}, proxy {p['p50s']})")
        RESULTS.append((f"warm path, {conns} connection(s)", f"direct {d['rps']:.0f} req/s p50 {d['p50']:.0f} µs; "
                        f"nginx {n['rps']:.0f} req/s p50 {n['p50']:.0f} µs p99 {n['p99']:.0f} µs; "
                        f"proxy {p['rps']:.0f} req/s p50 {p['p50']:.0f} µs p99 {p['p99']:.0f} µs; "
                        f"proxy/nginx throughput {p['rps'] / n['rps']:.2f}, p50 added: nginx "
                        f"{n['p50'] - d['p50']:.0f} µs, proxy {p['p50'] - d['p50']:.0f} µs"))
    total = sum(r["rps"] for (path, _), r in rows.items() if path in ("proxy", "oauth")) * float(WRK_SECONDS) \
        * WARM_ROUNDS
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
            wait_for(lambda: proxy.believed_state(name) == "missing", timeout=10, what="the registry to see the removal")
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


# --- `bench.py day`: a working day of a team, compressed -------------------------------

DAY_HOURS = 8.0
TOOLS = (("search_documents", 0.5), ("read_document", 0.35), ("list_collections", 0.15))


def day_model(args):
    """The model of use, in day-time seconds (before compression), as words and numbers."""
    return (f"a day of {args.hours:g} h; each user has {args.periods} working periods a day starting at "
            f"moments drawn uniformly over the day; the user's desktop app opens at the first (one MCP session, "
            f"initialize) and stays open to the day's end; each period a burst of {args.calls} tool "
            f"calls (search_documents 50 %, read_document 35 %, list_collections 15 %) with think times between "
            f"calls from a lognormal of median {args.think_median:g} s and sigma {args.think_sigma:g} "
            f"(mean {args.think_median * math.exp(args.think_sigma ** 2 / 2):.0f} s); seed {args.seed}")


def day_schedules(args):
    """Per user: (app open moment, [[(think before, tool) ...] per period], period starts), day seconds."""
    rng = random.Random(args.seed)
    day = args.hours * 3600
    schedules = []
    for _ in range(args.users):
        starts = sorted(rng.uniform(0, day) for _ in range(args.periods))
        opens = starts[0]
        periods = []
        for _ in starts:
            calls = []
            for i in range(args.calls):
                think = 0.0 if i == 0 else rng.lognormvariate(math.log(args.think_median), args.think_sigma)
                tool = rng.choices([t for t, _ in TOOLS], [w for _, w in TOOLS])[0]
                calls.append((think, tool))
            periods.append(calls)
        schedules.append((opens, starts, periods))
    return schedules


def scheduled_activity(schedules, day, step=60.0):
    """Users inside a working period (first call to last, as scheduled), minute by minute: (peak, mean)."""
    counts = [0] * (int(day // step) + 1)
    for _, starts, periods in schedules:
        for start, calls in zip(starts, periods):
            end = min(day, start + sum(t for t, _ in calls))
            for m in range(int(start // step), int(end // step) + 1):
                counts[m] += 1
    return max(counts), statistics.mean(counts)


def tool_arguments(tool, user_index):
    if tool == "search_documents":
        return {"query": random.Random(user_index).choice(["note", "private", "number", "text"])}
    if tool == "read_document":
        return {"document_id": f"doc-day{user_index}-{random.Random().randrange(DAY_DOCUMENTS)}"}
    return {}


DAY_DOCUMENTS = 12


def add_day_user(outline, i):
    """A user of the fake Outline with a dozen documents of a few KiB each."""
    key = outline.add_user(f"day{i}")
    user = outline.users[key]
    user["documents"] = [
        {"id": f"doc-day{i}-{n}", "title": f"Day{i}'s note {n}",
         "text": f"Private text of day{i}, number {n}.\n\n" + ("A line of meeting notes and decisions. " * 80),
         "collectionId": f"col-day{i}"}
        for n in range(DAY_DOCUMENTS)]
    return key


class DayClock:
    """Day-time to real time: real seconds = day seconds / compression."""

    def __init__(self, compress):
        self.compress = compress
        self.t0 = time.monotonic()

    def real(self, day_seconds):
        return day_seconds / self.compress

    def day_now(self):
        return (time.monotonic() - self.t0) * self.compress

    async def until(self, day_seconds):
        delay = self.t0 + day_seconds / self.compress - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def day_user(i, key, schedule, url, clock, record):
    """One user's day: one SDK session held open, its bursts of tool calls; a failed
    session counts as an error and a new one is opened for the rest of the day."""
    opens, starts, periods = schedule
    await clock.until(opens)
    todo = [(start, calls) for start, calls in zip(starts, periods)]
    while True:
        try:
            async with httpx.AsyncClient(headers={"X-Outline-API-Key": key},
                                         timeout=httpx.Timeout(120, read=300)) as client:
                async with streamable_http_client(url + "/mcp", http_client=client) as (read, write, _):
                    async with ClientSession(read, write, read_timeout_seconds=datetime.timedelta(seconds=300)) \
                            as session:
                        t0 = time.monotonic()
                        await session.initialize()
                        record["initialize"].append(time.monotonic() - t0)
                        while todo:
                            start, calls = todo[0]
                            await clock.until(start)
                            while calls:
                                think, tool = calls[0]
                                await asyncio.sleep(clock.real(think))
                                if clock.day_now() > record["cutoff"]:
                                    record["not_made"] += sum(len(c) for _, c in todo)
                                    todo.clear()
                                    break
                                t0 = time.monotonic()
                                result = await session.call_tool(tool, tool_arguments(tool, i))
                                took = time.monotonic() - t0
                                calls = calls[1:]
                                todo[0] = (start, calls)
                                record["calls"].append((clock.day_now(), took))
                                if result.isError:
                                    text = " ".join(getattr(c, "text", "") for c in result.content)[:200]
                                    record["errors"].append(f"user {i} {tool}: tool error: {text}")
                            if todo:
                                todo.pop(0)
                        await clock.until(record["day_end"])
            return
        except Exception as e:  # noqa: BLE001 (every failure is counted, then the day goes on)
            record["errors"].append(f"user {i}: session failed: {type(e).__name__}: {str(e)[:200]}")
            if todo and todo[0][1]:
                start, calls = todo[0]
                todo[0] = (start, calls[1:])  # the call that failed is not made again
            if not todo or clock.day_now() >= record["day_end"]:
                return
            await asyncio.sleep(1)


def cgroup_dir(container_id, known=[]):  # noqa: B006 (a cache of parents found)
    """The container's memory cgroup directory: cgroup v1 (cgroupfs or systemd driver, any
    --cgroup-parent) or v2; the parent found once is tried first for the next one."""
    names = (container_id, f"docker-{container_id}.scope")
    for parent in known:
        for n in names:
            if os.path.isdir(os.path.join(parent, n)):
                return os.path.join(parent, n)
    root = "/sys/fs/cgroup/memory" if os.path.isdir("/sys/fs/cgroup/memory") else "/sys/fs/cgroup"
    for dirpath, dirnames, _ in os.walk(root):
        for n in names:
            if n in dirnames:
                known.append(dirpath)
                return os.path.join(dirpath, n)
    return None


def read_int(path, default=0):
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def cgroup_memory(d):
    """(usage, working set = usage less inactive file pages, OOM kills so far) of one cgroup."""
    v1 = os.path.exists(os.path.join(d, "memory.usage_in_bytes"))
    usage = read_int(os.path.join(d, "memory.usage_in_bytes" if v1 else "memory.current"))
    inactive, kills = 0, 0
    try:
        for line in Path(d, "memory.stat").read_text().splitlines():
            k, v = line.split()
            if k == ("total_inactive_file" if v1 else "inactive_file"):
                inactive = int(v)
        for line in Path(d, "memory.oom_control" if v1 else "memory.events").read_text().splitlines():
            k, v = line.split()
            if k == "oom_kill":
                kills = int(v)
    except (OSError, ValueError):
        pass
    return usage, max(0, usage - inactive), kills


class DaySampler(threading.Thread):
    """Every `interval` s: the prefix's running containers (users and spares), their
    cgroups' memory summed, the proxy's own memory figures when /stats has them; OOM
    kills seen in any of their cgroups; `docker events` followed for `oom`."""

    def __init__(self, proxy, clock, interval):
        super().__init__(daemon=True)
        self.proxy, self.clock, self.interval = proxy, clock, interval
        self.samples = []  # (day seconds, users awake, spares awake, usage, working set, proxy in_use or None)
        self.oom_kills = {}  # container id -> kills seen in its cgroup
        self.oom_events = []
        self.stop = threading.Event()
        self.dirs = {}
        label = f"label=outline-mcp-proxy.prefix={proxy.prefix}"
        self.events = subprocess.Popen(["docker", "events", "--format", "{{json .}}", "--filter", label,
                                        "--filter", "event=oom"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._follow_events, daemon=True).start()

    def _follow_events(self):
        for line in self.events.stdout:
            self.oom_events.append(line.strip())

    def run(self):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 (a failed sample is skipped, said once)
                say(f"sample failed: {e}")
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def sample(self):
        out = docker("ps", "--no-trunc", "--format", "{{.ID}} {{.Names}}", "--filter",
                     f"label=outline-mcp-proxy.prefix={self.proxy.prefix}").stdout.split("\n")
        users = spares = usage = working = 0
        for line in filter(None, out):
            cid, name = line.split()
            if cid not in self.dirs:
                self.dirs[cid] = cgroup_dir(cid)
            if self.dirs[cid] is None:
                continue
            u, w, kills = cgroup_memory(self.dirs[cid])
            usage, working = usage + u, working + w
            if kills:
                self.oom_kills[cid] = kills
            if name.startswith(self.proxy.prefix + "spare-"):
                spares += 1
            else:
                users += 1
        in_use = None
        try:
            memory = self.proxy.stats().get("memory")
            in_use = memory.get("in_use_bytes") if isinstance(memory, dict) else None
        except (httpx.HTTPError, ValueError):
            pass
        self.samples.append((self.clock.day_now(), users, spares, usage, working, in_use))

    def finish(self):
        self.stop.set()
        self.join(timeout=30)
        self.events.terminate()


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def proxy_has_budget():
    return "MCP_PROXY_MEMORY_BUDGET" in subprocess.run([str(BINARY), "--help"], capture_output=True,
                                                       text=True).stdout


def run_day(outline, image, args, idle_minutes, keys, schedules, label):
    """One compressed day against a fresh proxy; returns its figures and samples."""
    day = args.hours * 3600
    idle = idle_minutes * 60 / args.compress
    settings = dict(image=image, idle_timeout=f"{max(1, round(idle * 1000))}ms",
                    sweep_interval=f"{max(100, round(60 / args.compress * 1000))}ms", spares=str(args.spares),
                    log="info", start_timeout="120s", memory=args.memory)
    budget = parse_size(args.budget)
    prefix = f"bday{secrets.token_hex(2)}-"
    if proxy_has_budget():
        settings["memory_budget"] = args.budget
        settings["cgroup_parent"] = prefix.rstrip("-") + "_budget"  # its own parent: no other proxy's
        limit = f"MCP_PROXY_MEMORY_BUDGET={args.budget}"
    else:
        # as the budget counts a container: its working set, but at least a quarter of its limit
        cost = max(parse_size(args.working_set), parse_size(args.memory) // 4)
        cap = max(1, budget // cost)
        settings["max_running"] = str(cap)
        limit = (f"MCP_PROXY_MAX_RUNNING={cap} (stand-in for a budget of {args.budget}: the proxy has no "
                 f"MCP_PROXY_MEMORY_BUDGET; {cost >> 20} MiB a container)")
    proxy = start_proxy(outline, prefix, **settings)
    sampler = None
    try:
        clock = DayClock(args.compress)
        # calls still waiting a quarter of a day after its end are not made, and counted
        record = {"calls": [], "initialize": [], "errors": [], "day_end": day, "cutoff": day * 1.25, "not_made": 0}
        sampler = DaySampler(proxy, clock, args.sample)
        sampler.start()
        say(f"-- {label}: {args.users} users, idle timeout {idle_minutes:g} min ({idle:.2f} s real), {limit}; "
            f"{day / args.compress / 60:.1f} min real; load {os.getloadavg()[0]:.1f}")
        loads = []

        async def everyone():
            tasks = [asyncio.create_task(day_user(i, k, s, proxy.url, clock, record))
                     for i, (k, s) in enumerate(zip(keys, schedules))]
            ticks = 0
            while not all(t.done() for t in tasks):
                loads.append(os.getloadavg()[0])
                await asyncio.sleep(5)
                ticks += 1
                if ticks % 6 == 0 and sampler.samples:
                    _, u, sp, usage, *_ = sampler.samples[-1]
                    say(f"   {clock.day_now() / 3600:.1f} h: {len(record['calls'])} calls, {len(record['errors'])} "
                        f"errors; awake {u} + {sp} spare(s), {usage >> 20} MiB; load {loads[-1]:.0f}")
            await asyncio.gather(*tasks)

        asyncio.run(everyone())
        sampler.finish()
        stats = proxy.stats()
        log = proxy.log()
        ups = re.findall(r"container (\S+) (?:took spare|woken and ready|created and ready)", log)
        firsts = len(set(ups))
        memory = stats.get("memory") if isinstance(stats.get("memory"), dict) else None
        budget_sleeps = memory.get("budget_sleeps") if memory else len(re.findall(r"at MCP_PROXY_MAX_RUNNING=", log))
        idle_sleeps = len(re.findall(r"(?:removed|stopped) idle container", log))
        survivors = proxy._names(True)
        oom_flagged = [n for n in survivors if proxy.inspect(n)["State"].get("OOMKilled")]
        latencies = [t for _, t in record["calls"]]
        s = sampler.samples
        awake = [u + sp for _, u, sp, *_ in s] or [0]
        result = {
            "label": label, "users": args.users, "idle_minutes": idle_minutes, "limit": limit,
            "calls": len(latencies), "initializes": len(record["initialize"]),
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
            "init_p95": percentile(record["initialize"], 95),
            "wakes": len(ups) - firsts, "creates": firsts, "budget_sleeps": budget_sleeps, "idle_sleeps": idle_sleeps,
            "peak_awake": max(awake), "mean_awake": statistics.mean(awake),
            "peak_users_awake": max((u for _, u, *_ in s), default=0),
            "peak_usage": max((x[3] for x in s), default=0), "peak_working": max((x[4] for x in s), default=0),
            "peak_in_use": max((x[5] for x in s if x[5] is not None), default=None),
            "errors": len(record["errors"]) + record["not_made"], "not_made": record["not_made"],
            "error_samples": record["errors"][:5],
            "oom_kills": sum(sampler.oom_kills.values()), "oom_events": len(sampler.oom_events),
            "oom_flagged": len(oom_flagged), "samples": s, "budget": budget,
            "load": (min(loads, default=0), max(loads, default=0), statistics.mean(loads) if loads else 0),
        }
        return result
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.finish()
        proxy.stop()
        proxy.cleanup()
        remove_cgroup_parent(settings.get("cgroup_parent"))


def remove_cgroup_parent(name):
    """The budget's parent cgroup, made for this run, removed once its containers are gone
    (cgroupfs: a directory per controller; systemd: a slice, left to systemd)."""
    if not name:
        return
    for d in Path("/sys/fs/cgroup").glob(f"*/{name}"):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        Path("/sys/fs/cgroup", name).rmdir()
    except OSError:
        pass


def parse_size(text):
    m = re.fullmatch(r"(\d+)([kmg]?)b?", text.strip().lower())
    if not m:
        raise SystemExit(f"not a size: {text}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2)]


def say_day(r, args):
    mib = 2 ** 20
    in_use = f", proxy's in_use {r['peak_in_use'] / mib:.0f} MiB" if r["peak_in_use"] is not None else ""
    say(f"{r['label']}: users {r['users']}, tool calls {r['calls']} (+{r['initializes']} initialize), latency "
        f"p50 {r['p50'] * 1000:.0f} ms p95 {r['p95'] * 1000:.0f} ms p99 {r['p99'] * 1000:.0f} ms max "
        f"{r['max'] * 1000:.0f} ms (initialize p95 {r['init_p95'] * 1000:.0f} ms); first starts {r['creates']}, "
        f"wakes {r['wakes']} ({r['wakes'] / r['users']:.1f} per user per day), idle sleeps {r['idle_sleeps']}, "
        f"budget sleeps {r['budget_sleeps']}; awake containers peak {r['peak_awake']} mean {r['mean_awake']:.1f}; "
        f"peak memory {r['peak_usage'] / mib:.0f} MiB cgroup usage ({r['peak_working'] / mib:.0f} MiB less "
        f"inactive file pages){in_use}; errors {r['errors']} ({r['not_made']} calls not made by the day's end + 25 %); OOM kills {r['oom_kills']} (events "
        f"{r['oom_events']}, OOMKilled {r['oom_flagged']}); load {r['load'][0]:.1f}–{r['load'][1]:.1f} "
        f"(mean {r['load'][2]:.1f})")
    for e in r["error_samples"]:
        say(f"   error: {e}")


def day_svg(r, args, path):
    """Awake containers and memory over the day, drawn by hand: two lines on one time axis."""
    w, h, left, right, top, bottom = 820, 320, 56, 64, 34, 40
    s = r["samples"]
    # the axis runs to the last sample: calls that ran late go on after the day's end
    day = max([args.hours * 3600] + [x[0] for x in s])
    pw, ph = w - left - right, h - top - bottom
    max_awake = max([x[1] + x[2] for x in s] + [1])
    awake_top = max(5, math.ceil(max_awake / 5) * 5)
    mib = [x[3] / 2 ** 20 for x in s]
    mem_top = max(256, math.ceil(max(mib + [r["budget"] / 2 ** 20]) / 256) * 256)

    def x_of(t):
        return left + pw * min(t, day) / day

    def line(values, top_value, color, width=1.5):
        pts = " ".join(f"{x_of(t):.1f},{top + ph * (1 - v / top_value):.1f}" for t, v in values)
        return f'<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{pts}"/>'

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{left}" y="16" font-size="12">{r["users"]} users, idle {r["idle_minutes"]:g} min: awake '
             f'containers (blue, left axis); their memory in MiB (right axis): working set (red), cgroup usage '
             f'(pale)</text>']
    for i in range(0, int(day // 3600) + 1):
        x = x_of(i * 3600)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{i} h</text>')
    for k in range(6):
        y = top + ph * (1 - k / 5)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#1f5fbf">'
                     f'{awake_top * k / 5:g}</text>')
        parts.append(f'<text x="{left + pw + 6}" y="{y + 4:.1f}" fill="#c0392b">{mem_top * k / 5:.0f}</text>')
    yb = top + ph * (1 - r["budget"] / 2 ** 20 / mem_top)
    parts.append(f'<line x1="{left}" y1="{yb:.1f}" x2="{left + pw}" y2="{yb:.1f}" stroke="#c0392b" '
                 f'stroke-dasharray="5,4"/>')
    parts.append(f'<text x="{left + pw - 4}" y="{yb - 4:.1f}" text-anchor="end" fill="#c0392b">budget '
                 f'{r["budget"] / 2 ** 20:.0f} MiB</text>')
    parts.append(line([(x[0], x[1] + x[2]) for x in s], awake_top, "#1f5fbf"))
    parts.append(line([(x[0], m) for x, m in zip(s, mib)], mem_top, "#e6a09a", 1))
    parts.append(line([(x[0], x[4] / 2 ** 20) for x in s], mem_top, "#c0392b"))
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle">time of the working day '
                 f'(compressed {args.compress:g}×); p95 {r["p95"] * 1000:.0f} ms, wakes {r["wakes"]}, '
                 f'errors {r["errors"]}, OOM kills {r["oom_kills"]}</text>')
    parts.append("</svg>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(parts) + "\n")
    say(f"plot written to {path}")


def bench_day(outline, image, argv):
    p = argparse.ArgumentParser(prog="bench.py day", description="a working day of a team, compressed")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--hours", type=float, default=DAY_HOURS, help="length of the working day")
    p.add_argument("--periods", type=int, default=8, help="working periods per user per day")
    p.add_argument("--calls", type=int, default=12, help="tool calls per working period")
    p.add_argument("--think-median", type=float, default=40.0, help="seconds (day time)")
    p.add_argument("--think-sigma", type=float, default=1.0)
    p.add_argument("--compress", default="auto",
                   help="day time / real time (96: 8 h in 5 min); auto: the most that keeps the containers' boots, "
                        "which do not compress, within --boot-share of the machine")
    p.add_argument("--boot-cpu", type=float, default=1.5, help="CPU seconds of one mcp-outline boot (measured)")
    p.add_argument("--boot-share", type=float, default=0.5, help="cores the compressed boots may take (auto)")
    p.add_argument("--idle", default="15", help="idle timeouts in minutes of day time, comma-separated")
    p.add_argument("--budget", default="1400m", help="MCP_PROXY_MEMORY_BUDGET (2 GB host)")
    p.add_argument("--working-set", default="48m",
                   help="for the MAX_RUNNING stand-in without a budget: a container's working set (bench.py "
                        "memory); the budget counts a container as this, but at least a quarter of MCP_PROXY_MEMORY")
    p.add_argument("--memory", default="192m", help="MCP_PROXY_MEMORY")
    p.add_argument("--spares", type=int, default=1)
    p.add_argument("--runs", type=int, default=1, help="runs per idle timeout; the worst is reported")
    p.add_argument("--sample", type=float, default=1.0, help="seconds (real) between samples")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--replay", action="store_true", help="only replay the policy on the schedule (no containers)")
    p.add_argument("--svg", default=str(ROOT / "docs" / "day.svg"))
    args = p.parse_args(argv)
    schedules = day_schedules(args)
    cap = max(1, parse_size(args.budget) // max(parse_size(args.working_set), parse_size(args.memory) // 4))
    if args.compress == "auto":
        # every create and wake boots a container (the user's, or the spare that replaces
        # the one taken): as many boots as the replay of the first idle timeout predicts
        r = replay_day(schedules, args.hours * 3600, float(args.idle.split(",")[0]), cap, args.spares)
        boots = r["creates"] + r["wakes_per_user"] * args.users + args.spares
        args.compress = max(1.0, min(480.0, round(args.boot_share * args.hours * 3600 / (boots * args.boot_cpu))))
        say(f"compression: {boots:.0f} boots predicted x {args.boot_cpu} CPU-s within {args.boot_share} core(s): "
            f"{args.compress:g}x")
    else:
        args.compress = float(args.compress)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # the proxy and containers still cleaned up
    logging.getLogger("mcp").setLevel(logging.CRITICAL)  # a failed call is counted (and sampled) by the bench
    say(f"\n== day: {day_model(args)}; compressed {args.compress:g}× ({args.hours * 60 / args.compress:.1f} min "
        f"real), idle timeout and sweep interval compressed the same ==")
    peak, mean = scheduled_activity(schedules, args.hours * 3600)
    calls = args.users * args.periods * args.calls
    say(f"scheduled: {calls} tool calls; users inside a working period at once: peak {peak}, mean {mean:.1f}")
    say_replay(schedules, args, None)
    say_replay(schedules, args, cap)
    if args.replay:
        return
    keys = [add_day_user(outline, i) for i in range(args.users)]
    # the fake Outline in a process of its own (forked with its users): not sharing a GIL
    # with 200 SDK sessions
    server = multiprocessing.get_context("fork").Process(target=outline.server.serve_forever, daemon=True)
    server.start()
    try:
        bench_day_runs(outline, image, args, keys, schedules)
    finally:
        server.terminate()


def replay_day(schedules, day, idle_minutes, cap, spares=1, boot=1.5, sweep=60.0):
    """The proxy's idle and budget policy replayed on the schedule in day time, without
    containers (calls take no time): a container wakes at a user's call when asleep,
    sleeps at the first sweep `idle` after its last call, and at `cap` running (spares
    included) the least recently used sleeps first. A wake finds a spare ready unless
    `spares` wakes came in the `boot` seconds before it (a spare's boot, uncompressed).
    Returns awake peak and mean (per sweep), wakes per user, the share of calls that
    wake, budget sleeps, and the wakes that find no spare ready."""
    idle = idle_minutes * 60
    events = []
    for u, (opens, starts, periods) in enumerate(schedules):
        events.append((opens, u, False))
        for start, calls in zip(starts, periods):
            t = start
            for think, _ in calls:
                t += think
                events.append((t, u, True))
    events.sort()
    awake, seen = {}, set()
    counts, tick = [], 0.0
    wakes = creates = budget_sleeps = calls = waking_calls = cold = 0
    recent = []
    users_cap = max(1, cap - spares) if cap else None
    for t, u, is_call in events:
        while tick <= t:
            for v in [v for v, last in awake.items() if last + idle <= tick]:
                del awake[v]
            counts.append(len(awake))
            tick += sweep
        calls += is_call
        if u not in awake:
            if u in seen:
                wakes += 1
            else:
                creates += 1
                seen.add(u)
            waking_calls += is_call
            recent = [r for r in recent if r > t - boot]
            cold += len(recent) >= spares
            recent.append(t)
            if users_cap and len(awake) >= users_cap:
                del awake[min(awake, key=awake.get)]
                budget_sleeps += 1
        awake[u] = t
    n = len(schedules)
    return {"idle_minutes": idle_minutes, "peak": max(counts) + spares, "mean": statistics.mean(counts) + spares,
            "wakes_per_user": wakes / n, "waking_share": waking_calls / max(1, calls), "budget_sleeps": budget_sleeps,
            "cold": cold, "calls": calls, "creates": creates}


def say_replay(schedules, args, cap):
    say(f"replayed on the schedule ({len(schedules)} users, day time, no containers; "
        f"{'at most ' + str(cap) + ' running, spares included' if cap else 'no budget'}; {args.spares} spare(s)):")
    say("| idle timeout | awake peak | awake mean | wakes per user per day | calls that wake | budget sleeps "
        "| wakes with no spare ready |\n|---|---|---|---|---|---|---|")
    for idle in (15, 10, 5, 2, 1):
        r = replay_day(schedules, args.hours * 3600, idle, cap, args.spares)
        say(f"| {idle} min | {r['peak']} | {r['mean']:.1f} | {r['wakes_per_user']:.1f} | {r['waking_share']:.1%} | "
            f"{r['budget_sleeps']} | {r['cold']} |")


def bench_day_runs(outline, image, args, keys, schedules):
    worst = []
    for idle in [float(x) for x in args.idle.split(",")]:
        runs = []
        for n in range(args.runs):
            r = run_day(outline, image, args, idle, keys, schedules, f"idle {idle:g} min, run {n + 1}")
            say_day(r, args)
            runs.append(r)
        w = max(runs, key=lambda r: (r["errors"] + r["oom_kills"], r["p95"]))
        worst.append(w)
        if len(runs) > 1:
            p95s = ", ".join(f"{r['p95'] * 1000:.0f}" for r in runs)
            say(f"runs' p95: {p95s} ms; worst: {w['label']}")
    say(f"\n| idle timeout | awake peak | awake mean | wakes per user per day | p50 | p95 | p99 | budget sleeps "
        f"| peak memory | errors | OOM kills |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in worst:
        say(f"| {r['idle_minutes']:g} min | {r['peak_awake']} | {r['mean_awake']:.1f} | "
            f"{r['wakes'] / r['users']:.1f} | {r['p50'] * 1000:.0f} ms | {r['p95'] * 1000:.0f} ms | "
            f"{r['p99'] * 1000:.0f} ms | {r['budget_sleeps']} | {r['peak_usage'] / 2 ** 20:.0f} MiB | {r['errors']} | "
            f"{r['oom_kills'] + r['oom_events'] + r['oom_flagged']} |")
    if args.svg:
        day_svg(worst[0], args, args.svg)
    RESULTS.append(("day", f"{args.users} users: " + "; ".join(
        f"idle {r['idle_minutes']:g} min p95 {r['p95'] * 1000:.0f} ms, errors {r['errors']}" for r in worst)))


# --- `bench.py memory`: a container's settled memory, and what changes it --------------

MEMORY_VARIANTS = (
    ("baseline (as the proxy runs it)", {}, None, True),
    ("spare: booted, never served", {}, None, False),
    ("MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"}, None, True),
    ("MALLOC_ARENA_MAX=1", {"MALLOC_ARENA_MAX": "1"}, None, True),
    ("PYTHONMALLOC=malloc, MALLOC_ARENA_MAX=1", {"PYTHONMALLOC": "malloc", "MALLOC_ARENA_MAX": "1"}, None, True),
    ("MALLOC_ARENA_MAX=2, MALLOC_TRIM_THRESHOLD_=131072",
     {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072"}, None, True),
    ("PYTHONDONTWRITEBYTECODE=1", {"PYTHONDONTWRITEBYTECODE": "1"}, None, True),
    ("PYTHONNODEBUGRANGES=1 (-X no_debug_ranges)", {"PYTHONNODEBUGRANGES": "1"}, None, True),
    ("--memory 128m", {}, "128m", True),
    ("--memory 192m", {}, "192m", True),
)


def container_pids(d):
    return [int(p) for p in Path(d, "cgroup.procs").read_text().split()] if d else []


def pss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def peak_file(d):
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


def reset_peak(d):
    """cgroup v1 and v2 (kernel 6.12+) take a write to start the peak anew; False when not."""
    f = peak_file(d)
    try:
        Path(f).write_text("0")
        return True
    except (OSError, TypeError):
        return False


def mcp_session_calls(ip, key, rounds, big=False):
    """initialize, tools/list, then `rounds` of search_documents, read_document, list_collections
    (with `big`: and a read of a large document, the largest answer of the day)."""
    url = f"http://{ip}:3000/mcp"
    headers = {"X-Outline-API-Key": key, "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    with httpx.Client(timeout=60) as c:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "bench-memory", "version": "1"}}}
        r = c.post(url, headers=headers, json=init)
        assert r.status_code == 200, r.text
        headers["Mcp-Session-Id"] = r.headers["mcp-session-id"]
        headers["MCP-Protocol-Version"] = "2025-06-18"
        c.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        calls = [("tools/list", None)] + [
            (tool, args) for n in range(rounds) for tool, args in (
                ("search_documents", {"query": "note"}), ("read_document", {"document_id": f"doc-day0-{n % 12}"}),
                ("list_collections", {}))] + ([("read_document", {"document_id": "doc-day0-big"})] if big else [])
        for i, (tool, args) in enumerate(calls):
            body = ({"jsonrpc": "2.0", "id": i + 2, "method": "tools/list"} if args is None else
                    {"jsonrpc": "2.0", "id": i + 2, "method": "tools/call", "params": {"name": tool, "arguments": args}})
            r = c.post(url, headers=headers, json=body)
            assert r.status_code == 200 and '"isError":true' not in r.text, r.text[:300]


def bench_memory(outline, image, argv):
    p = argparse.ArgumentParser(prog="bench.py memory", description="a container's settled memory, by variant")
    p.add_argument("--reps", type=int, default=3, help="containers per variant (the median is reported)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the calls before measuring")
    p.add_argument("--rounds", type=int, default=4, help="rounds of three tool calls before settling")
    p.add_argument("--big-mib", type=float, default=1.0, help="size of the large document read at the peak")
    p.add_argument("--only", default="", help="variants whose label contains this (baseline always)")
    args = p.parse_args(argv)
    variants = [v for i, v in enumerate(MEMORY_VARIANTS) if i == 0 or args.only in v[0]]
    say(f"\n== memory: the real mcp-outline ({image}), run by hand with the proxy's flags; each variant "
        f"{args.reps} containers; measured {args.settle:g} s after a session of {args.rounds * 3} tool calls ==")
    key = add_day_user(outline, 0)
    outline.users[key]["documents"].append(
        {"id": "doc-day0-big", "title": "Day0's big handbook", "collectionId": "col-day0",
         "text": "".join(f"## Section {n}\n\n" + "A paragraph of the handbook, long enough to matter. " * 40 + "\n\n"
                         for n in range(int(512 * args.big_mib)))})
    gw = docker_gateway()
    made = []
    try:
        for vi, (label, env, limit, served) in enumerate(variants):
            for rep in range(args.reps):
                name = f"bmem{os.getpid()}-{vi}-{rep}"
                memory = str(parse_size(limit or "256m"))
                cmd = ["run", "--detach", "--init", "--read-only", "--name", name, "--memory", memory,
                       "--memory-swap", memory, "--cpus", "1", "--pids-limit", "128", "--cap-drop", "ALL",
                       "--security-opt", "no-new-privileges", "--tmpfs", "/tmp:rw,noexec,nosuid,size=64m,mode=1777",
                       "--user", "65534:65534", "--env", "HOME=/tmp", "--env", f"OUTLINE_API_URL=http://{gw}:{outline.port}/api",
                       "--env", "MCP_TRANSPORT=streamable-http", "--env", "MCP_HOST=0.0.0.0", "--env", "MCP_PORT=3000"]
                for k, v in env.items():
                    cmd += ["--env", f"{k}={v}"]
                docker(*cmd, image)
                made.append((name, label, served))
        info = {}
        for name, label, served in made:
            ip = container_ip(name)
            poll_ready(ip)
            cid = docker("inspect", "--format", "{{.Id}}", name).stdout.strip()
            info[name] = (ip, cgroup_dir(cid))
        boot_peaks = {}
        for name, label, served in made:
            ip, d = info[name]
            if served:
                mcp_session_calls(ip, key, args.rounds)
        time.sleep(args.settle)
        rows = {}
        for name, label, served in made:
            ip, d = info[name]
            usage, working, kills = cgroup_memory(d)
            boot_peaks[name] = read_int(peak_file(d)) if peak_file(d) else 0
            rows.setdefault(label, []).append({"name": name, "pss": pss_bytes(container_pids(d)), "usage": usage,
                                               "working": working, "peak_life": boot_peaks[name], "kills": kills})
        # a tool call's peak: the peak counter reset once settled, then a session of calls
        for name, label, served in made:
            ip, d = info[name]
            row = next(r for r in rows[label] if r["name"] == name)
            if reset_peak(d):
                try:
                    mcp_session_calls(ip, key, args.rounds, big=True)
                except (httpx.HTTPError, AssertionError) as e:
                    row["failed"] = f"{type(e).__name__}: {str(e)[:100]}"
                    say(f"{label}: the session with the large document failed: {row['failed']}")
                row["call_peak"] = read_int(peak_file(d))
        for name, label, served in made:
            row = next(r for r in rows[label] if r["name"] == name)
            row["oom_killed"] = oom_killed_or_gone(name) or "failed" in row
            row["kills"] = max(row["kills"], cgroup_memory(info[name][1])[2])
        mib = 2 ** 20
        med = statistics.median
        say(f"{'variant':52} {'PSS':>7} {'cgroup':>7} {'less inactive file':>19} {'life peak':>9} "
            f"{'call peak':>9} {'OOM':>4}   (MiB, medians of {args.reps})")
        base = med(r["pss"] for r in rows[MEMORY_VARIANTS[0][0]])
        for label, *_ in variants:
            rs = rows[label]
            call_peaks = [r["call_peak"] for r in rs if "call_peak" in r]
            pss = med(r["pss"] for r in rs)
            say(f"{label:52} {pss / mib:7.1f} {med(r['usage'] for r in rs) / mib:7.1f} "
                f"{med(r['working'] for r in rs) / mib:19.1f} {max(r['peak_life'] for r in rs) / mib:9.1f} "
                f"{(max(call_peaks) / mib if call_peaks else float('nan')):9.1f} "
                f"{sum(r['kills'] for r in rs) + sum(r['oom_killed'] for r in rs):4}   PSS {pss / base - 1:+.1%}")
            RESULTS.append((f"memory: {label}", f"PSS {pss / mib:.1f} MiB ({pss / base - 1:+.1%}), cgroup "
                            f"{med(r['usage'] for r in rs) / mib:.1f} MiB, peak over its life "
                            f"{max(r['peak_life'] for r in rs) / mib:.1f} MiB, a session's peak with a {args.big_mib:g} MiB "
                            f"document {(max(call_peaks) / mib if call_peaks else float('nan')):.1f} MiB"))
        say(f"load: {os.getloadavg()}")
    finally:
        names = [n for n, *_ in made]
        if names:
            docker("rm", "--force", *names, check=False)


def oom_killed_or_gone(name):
    state = json.loads(docker("container", "inspect", name).stdout)[0]["State"]
    return bool(state.get("OOMKilled")) or state.get("Status") != "running"


def main():
    machine = (f"{platform.node()}: {os.cpu_count()} CPUs "
               f"({next((l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')}), "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
               f"kernel {platform.release()}, Docker {docker('version', '--format', '{{.Server.Version}}').stdout.strip()}")
    say(f"machine: {machine}")
    outline = FakeOutline(host="0.0.0.0")
    outline.server.socket.listen(1024)  # hundreds of clients at once: a backlog of 5 resets them
    if sys.argv[1:2] != ["day"]:
        outline.start()  # `day` serves it from a process of its own, once its users are made
    image = subprocess.run([str(ROOT / "tests" / "build-mcp-outline-image.sh")], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    only = sys.argv[1:] or ["warm", "wake", "streams"]
    if only[0] in ("day", "memory"):
        (bench_day if only[0] == "day" else bench_memory)(outline, image, only[1:])
        only = []
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
