"""The deployment parts together: the real nginx with the project's nginx.conf (its
placeholders, ports and certificate paths substituted, a self-signed certificate made
here) in front of the real binary, tested through HTTPS; and the systemd unit."""

import concurrent.futures
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from conftest import ROOT, BINARY, free_port, wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def make_certificate(directory):
    crt, key = directory / "self-signed.crt", directory / "self-signed.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )
    return crt, key


def site_config(upstreams, http_port, https_port, crt, key, htpasswd, webroot):
    """nginx.conf as shipped, with this machine's ports and paths put in."""
    text = (ROOT / "nginx.conf").read_text()
    if len(upstreams) > 1:
        one = re.search(r"# --- one host \(the default\) ---\n(.*?)# --- one host: end ---", text, re.S)
        several = re.search(r"# --- several hosts: begin ---\n(.*?)# --- several hosts: end ---", text, re.S)
        block = "\n".join(l[2:] if l.startswith("# ") else l for l in several.group(1).splitlines()
                          if l.startswith("#     ") or l.startswith("# upstream") or l.startswith("# }"))
        servers = "\n".join(f"    server 127.0.0.1:{p};" for p in upstreams)
        block = re.sub(r"(\s*server 10\.0\.1\.\d+:8000[^\n]*\n?)+", "\n" + servers + "\n", block)
        text = text.replace(one.group(1), "").replace(several.group(1), block + "\n")
    else:
        text = text.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstreams[0]};")
    text = text.replace("DOMAIN_PLACEHOLDER", "localhost")
    text = text.replace("listen [::]:80;", "").replace("listen [::]:443 ssl;", "")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    text = text.replace("/etc/ssl/certs/self-signed.crt", str(crt))
    text = text.replace("/etc/ssl/private/self-signed.key", str(key))
    text = text.replace("/etc/nginx/.htpasswd", str(htpasswd))
    text = text.replace("/var/www/certbot", str(webroot))
    return text


class Nginx:
    def __init__(self, tmp_path, upstreams):
        self.dir = tmp_path / "nginx"
        self.dir.mkdir(parents=True)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "www/.well-known/acme-challenge"):
            (self.dir / sub).mkdir(parents=True)
        (self.dir / "www/.well-known/acme-challenge/token123").write_text("challenge-answer")
        self.crt, key = make_certificate(self.dir)
        hashed = subprocess.run(["openssl", "passwd", "-apr1", "opspass"], capture_output=True, text=True,
                                check=True).stdout.strip()
        htpasswd = self.dir / "htpasswd"
        htpasswd.write_text(f"ops:{hashed}\n")
        self.http_port, self.https_port = free_port(), free_port()
        site = site_config(upstreams, self.http_port, self.https_port, self.crt, key, htpasswd, self.dir / "www")
        (self.dir / "mcp.conf").write_text(site)
        d = self.dir
        (d / "nginx-main.conf").write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/mcp.conf;
}}
""")
        test = subprocess.run([NGINX, "-t", "-c", str(d / "nginx-main.conf")], capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        self.process = subprocess.Popen([NGINX, "-c", str(d / "nginx-main.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._listening, timeout=10, what="nginx to listen")
        self.url = f"https://localhost:{self.https_port}"
        self.ssl = ssl.create_default_context(cafile=str(self.crt))

    def _listening(self):
        try:
            httpx.get(f"http://127.0.0.1:{self.http_port}/", timeout=0.5)
            return True
        except httpx.HTTPError:
            return False

    def client(self, **kw):
        return httpx.Client(base_url=self.url, verify=self.ssl, timeout=60, **kw)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture()
def nginx_factory(tmp_path):
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed (apt-get install nginx): the deployment tests need it", pytrace=False)
    started = []

    def factory(*upstreams):
        n = Nginx(tmp_path / f"n{len(started)}", list(upstreams))
        started.append(n)
        return n

    (tmp_path).mkdir(exist_ok=True)
    yield factory
    for n in started:
        n.stop()


def test_http_redirects_to_https_except_the_acme_challenge(make_proxy, nginx_factory):
    proxy = make_proxy()
    nginx = nginx_factory(proxy.port)
    r = httpx.get(f"http://127.0.0.1:{nginx.http_port}/mcp?x=1", headers={"Host": "localhost"})
    assert r.status_code == 301
    assert r.headers["location"] == "https://localhost/mcp?x=1"
    r = httpx.get(f"http://127.0.0.1:{nginx.http_port}/.well-known/acme-challenge/token123",
                  headers={"Host": "localhost"})
    assert r.status_code == 200 and r.text == "challenge-answer"


def test_an_mcp_request_through_https(make_proxy, nginx_factory, outline):
    proxy = make_proxy()
    nginx = nginx_factory(proxy.port)
    key = outline.add_user("alice")
    with nginx.client() as c:
        r = c.post("/echo?via=nginx", headers={"X-Outline-API-Key": key},
                   content=b'{"jsonrpc":"2.0"}')
        health = c.get("/health")
    assert r.status_code == 200
    assert "max-age=63072000" in r.headers["strict-transport-security"]
    got = r.json()
    headers = {k.lower(): v for k, v in got["headers"]}
    assert got["target"] == "/echo?via=nginx"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-outline-api-key"] == key
    # the session the container opened reaches the client as an id the proxy minted
    assert r.headers["mcp-session-id"] != "backend-session" and len(r.headers["mcp-session-id"]) == 64
    assert health.json()["status"] == "healthy"


def test_an_event_stream_arrives_event_by_event_through_nginx(make_proxy, nginx_factory, outline):
    proxy = make_proxy()
    nginx = nginx_factory(proxy.port)
    key = outline.add_user("bob")
    arrivals = []
    t0 = time.monotonic()
    with nginx.client() as c:
        with c.stream("GET", "/sse?n=5&interval_ms=600", headers={"X-Outline-API-Key": key,
                                                                     "Accept-Encoding": "gzip"}) as r:
            assert r.status_code == 200
            assert "content-encoding" not in r.headers  # never compressed
            for line in r.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 5
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps) > 0.3, f"events arrived together (buffered): {arrivals}"


def test_a_websocket_echo_through_nginx(make_proxy, nginx_factory, outline):
    proxy = make_proxy()
    nginx = nginx_factory(proxy.port)
    key = outline.add_user("carol")
    url = f"wss://localhost:{nginx.https_port}/ws"
    with connect(url, ssl=nginx.ssl, additional_headers={"X-Outline-API-Key": key}, max_size=None) as ws:
        ws.send("through nginx")
        assert ws.recv() == "through nginx"
        blob = os.urandom(2 * 1024 * 1024)
        ws.send(blob)
        assert ws.recv() == blob


def test_a_burst_gets_429(make_proxy, nginx_factory):
    proxy = make_proxy()
    nginx = nginx_factory(proxy.port)
    with nginx.client() as c:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda _: c.get("/health").status_code, range(120)))
    assert statuses.count(429) > 0, statuses
    assert statuses.count(200) >= 20, statuses


def test_stats_need_the_operators_credentials(make_proxy, nginx_factory, outline):
    proxy = make_proxy()
    nginx = nginx_factory(proxy.port)
    with nginx.client() as c:
        assert c.get("/stats").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/stats", auth=("ops", "wrong")).status_code == 401
        r = c.get("/stats", auth=("ops", "opspass"))
        assert r.status_code == 200
        assert "total_containers" in r.json()
        assert c.get("/metrics", auth=("ops", "opspass")).status_code == 200


def test_two_hosts_behind_the_consistent_hash_pin_each_key(make_proxy, nginx_factory, outline):
    one, two = make_proxy(), make_proxy()
    nginx = nginx_factory(one.port, two.port)
    # keys are random: with 16 of them, all landing on one host has odds of 2^-15
    keys = [outline.add_user(f"user{i}") for i in range(16)]
    homes = {}
    with nginx.client() as c:
        for _ in range(3):
            for key in keys:
                time.sleep(0.06)  # stay under nginx's 20 r/s per address: this test is not about 429
                r = c.get("/echo", headers={"X-Outline-API-Key": key})
                assert r.status_code == 200
                homes.setdefault(key, set()).add(r.json()["hostname"])
    assert all(len(h) == 1 for h in homes.values()), homes  # each key always lands on one host
    on_one, on_two = set(one.containers()), set(two.containers())
    assert not on_one & on_two
    for key in keys:  # each user's container exists on exactly one of the two hosts
        assert (one.container_name(key) in on_one) != (two.container_name(key) in on_two)
    assert on_one and on_two, "sixteen keys should spread over both hosts"


def test_the_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.fail("systemd-analyze is missing (apt-get install systemd)", pytrace=False)
    unit = (ROOT / "systemd" / "mcp-proxy.service").read_text()
    assert "EnvironmentFile=-/etc/outline-mcp-proxy.env" in unit
    # Wants, not Requires: the service outlives a Docker restart (tests/test_install.py)
    assert "Wants=network-online.target docker.service" in unit and "Requires=" not in unit
    assert "SupplementaryGroups=docker" in unit
    local = tmp_path / "mcp-proxy.service"
    local.write_text(unit.replace("/usr/local/bin/outline-mcp-proxy", str(BINARY)))
    r = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "mcp-proxy.service" not in r.stderr, r.stderr
    sec = subprocess.run([analyze, "security", "--offline=true", str(local)], capture_output=True, text=True)
    score = re.search(r"Overall exposure level for mcp-proxy.service: ([\d.]+)", sec.stdout)
    assert score, sec.stdout + sec.stderr
    print(f"\nsystemd-analyze security: {score.group(1)}")
    assert float(score.group(1)) <= 2.5
