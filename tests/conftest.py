"""Shared fixtures: the real Docker Engine, the fake Outline API, and the proxy binary
run as an operator runs it (a process with environment variables)."""

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fake_outline import FakeOutline

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(os.environ.get("PROXY_BINARY", ROOT / "target" / "release" / "outline-mcp-proxy"))
BACKEND_IMAGE = "outline-mcp-proxy-test-backend:latest"


def docker(*args, check=True, timeout=60):
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def docker_gateway():
    """The host's address on the default bridge: where containers reach the fake Outline."""
    out = docker("network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()
    return out or "172.17.0.1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout=20.0, interval=0.05, what="condition"):
    """Polls until condition() is truthy; returns its value or fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "takes_docker_away: stops the Docker daemon for a while; runs after every other test")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the tail of each proxy's log it started, so a CI
    failure can be read without the run's files (the log holds no key: see
    assert_key_kept_secret)."""
    outcome = yield
    report = outcome.get_result()
    factory = item.funcargs.get("make_proxy") if hasattr(item, "funcargs") else None
    if report.failed and factory is not None:
        for i, proxy in enumerate(getattr(factory, "started", [])):
            tail = "\n".join(proxy.log().splitlines()[-60:])
            report.sections.append((f"proxy {i} log (last 60 lines)", tail))


def pytest_collection_modifyitems(items):
    """Tests marked takes_docker_away run last (a stable sort keeps the rest in order)."""
    items.sort(key=lambda item: item.get_closest_marker("takes_docker_away") is not None)


def assert_key_kept_secret(proxy, key, env_mode=False):
    """The one list of places a key must never be: the proxy's log, and each of the
    proxy's containers' configuration, files and log. In `env` mode a container holds
    the key in its environment by design; then only its arguments are checked."""
    assert key not in proxy.log(), "the key is in the proxy's log"
    for name in proxy.containers():
        info = proxy.inspect(name)
        if env_mode:
            assert key not in " ".join(info["Args"] + [info["Path"]]), f"the key is in {name}'s arguments"
        else:
            assert key not in json.dumps(info), f"the key is in {name}'s configuration"
            exported = subprocess.run(["docker", "export", name], capture_output=True, check=True).stdout
            assert key.encode() not in exported, f"the key is in {name}'s files"
        logs = docker("logs", name)
        assert key not in logs.stdout + logs.stderr, f"the key is in {name}'s log"


@pytest.fixture(scope="session", autouse=True)
def docker_engine():
    """Every integration test needs the real Docker Engine: fail loudly without it."""
    try:
        docker("version", "--format", "{{.Server.Version}}", timeout=20)
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"Docker Engine is not reachable ({e}); start dockerd: these tests need it", pytrace=False)
    if docker("image", "inspect", BACKEND_IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {BACKEND_IMAGE} is missing: run tests/build-test-images.sh", pytrace=False)
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: run cargo build --release", pytrace=False)


@pytest.fixture(scope="session")
def gateway():
    return docker_gateway()


@pytest.fixture()
def outline():
    fake = FakeOutline(host="0.0.0.0").start()
    yield fake
    fake.stop()


class Proxy:
    """The release binary, started with the given settings, its log in a file."""

    def __init__(self, env, log_path, prefix, outline=None):
        self.env = env
        self.outline = outline
        self.log_path = log_path
        self.prefix = prefix
        self.port = int(env["MCP_PROXY_LISTEN"].rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.wrapper = []  # a command to run the binary under (prlimit, setpriv, ...)
        self.binary = BINARY

    def start(self, wait=True):
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.wrapper + [str(self.binary)], env=self.env, stdout=self.log_file,
                                        stderr=subprocess.STDOUT)
        if wait:
            wait_for(self._answers, timeout=20, what="the proxy to listen")
        return self

    def _answers(self):
        if self.process.poll() is not None:
            raise AssertionError(f"proxy exited with {self.process.returncode}:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, sig=signal.SIGTERM, timeout=40):
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.log_file.close()
        return self.process.returncode if self.process else None

    def restart(self):
        self.stop()
        return self.start()

    def log(self):
        return Path(self.log_path).read_text(errors="replace") if Path(self.log_path).exists() else ""

    def client(self, **kw):
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def request(self, method, path, key=None, headers=None, **kw):
        """One request on a fresh connection, with the key header when a key is given."""
        h = dict(headers or {})
        if key:
            h["X-Outline-API-Key"] = key
        with self.client() as c:
            return c.request(method, path, headers=h, **kw)

    def get(self, path, key=None, headers=None, **kw):
        return self.request("GET", path, key, headers, **kw)

    def post(self, path, key=None, headers=None, **kw):
        return self.request("POST", path, key, headers, **kw)

    def containers(self, all=True):
        """Names of this proxy's users' containers (by its unique prefix; spares apart)."""
        return [n for n in self._names(all) if not n.startswith(self.prefix + "spare-")]

    def spares(self):
        """Names of this proxy's warm spares, running or not."""
        return [n for n in self._names(True) if n.startswith(self.prefix + "spare-")]

    def _names(self, all):
        args = ["ps", "--format", "{{.Names}}", "--filter", f"name=^{self.prefix}"]
        if all:
            args.insert(1, "--all")
        return sorted(n for n in docker(*args).stdout.split() if n.startswith(self.prefix))

    def container_name(self, key):
        """The proxy's name for the container serving `key`: 128 bits of sha256 of the
        Outline user (team and user id) in header mode, of the key in env mode."""
        import hashlib

        if self.env.get("MCP_PROXY_KEY_MODE") == "env":
            material = key
        else:
            material = f"{self.outline.team_id}:{self.outline.users[key]['id']}"
        return self.prefix + hashlib.sha256(material.encode()).hexdigest()[:32]

    def inspect(self, name):
        return json.loads(docker("container", "inspect", name).stdout)[0]

    def believed_state(self, name):
        """The container's state as the proxy believes it (its /stats), not as Docker has it."""
        return next((c["state"] for c in self.stats()["containers"] if c["name"] == name), "missing")

    def state(self, name):
        r = docker("container", "inspect", "--format", "{{.State.Status}}", name, check=False)
        return r.stdout.strip() if r.returncode == 0 else "missing"

    def stats(self, auth=None):
        with self.client() as c:
            return c.get("/stats", auth=auth).json()

    def cleanup(self):
        """Removes this proxy's containers, spares included. A `docker run` the killed
        proxy had already asked for can still land a moment later: look again until a
        listing comes back empty twice (at most a few seconds)."""
        empty = 0
        deadline = time.monotonic() + 5
        while empty < 2 and time.monotonic() < deadline:
            names = self._names(True)
            if names:
                docker("rm", "--force", *names, check=False)
                empty = 0
            else:
                empty += 1
                time.sleep(0.5)


@pytest.fixture()
def make_proxy(outline, gateway, tmp_path):
    """make_proxy(**settings) starts a proxy for the test, with its own container prefix."""
    started = []

    def factory(start=True, **settings):
        prefix = settings.pop("prefix", f"t{secrets.token_hex(3)}-")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "MCP_PROXY_LISTEN": f"127.0.0.1:{free_port()}",
            "OUTLINE_URL": f"http://127.0.0.1:{outline.port}",
            "MCP_PROXY_CONTAINER_OUTLINE_URL": f"http://{gateway}:{outline.port}",
            "MCP_PROXY_IMAGE": BACKEND_IMAGE,
            "MCP_PROXY_CONTAINER_PREFIX": prefix,
            "MCP_PROXY_START_TIMEOUT": "20s",
            "MCP_PROXY_LOG": "info",
            # warm spares are on by default for operators; tests opt in (spares=1)
            "MCP_PROXY_SPARES": "0",
        }
        for k, v in settings.items():
            # upper case: a variable as named (OUTLINE_URL, DOCKER_HOST, SSL_CERT_FILE);
            # lower case: a proxy setting (idle_timeout -> MCP_PROXY_IDLE_TIMEOUT)
            env[k if k.isupper() else f"MCP_PROXY_{k.upper()}"] = str(v)
        proxy = Proxy(env, tmp_path / f"proxy-{len(started)}.log", prefix, outline)
        started.append(proxy)
        return proxy.start() if start else proxy

    factory.started = started  # for the failure report (pytest_runtest_makereport)
    yield factory
    for p in started:
        p.stop(sig=signal.SIGKILL)
        p.cleanup()


@pytest.fixture(scope="session")
def mcp_outline_image():
    """Built once per run (and reused across runs while the pins are the same)."""
    return build("build-mcp-outline-image.sh", "the mcp-outline image")


def build(script, what, timeout=1200):
    """Runs one of the tests' builders (tests/build-*.sh): what it prints last (a tag, a
    directory), or the test fails with the builder's complaint."""
    r = subprocess.run([str(ROOT / "tests" / script)], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"could not build {what}:\n{r.stderr[-3000:]}", pytrace=False)
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture()
def real_proxy(make_proxy, mcp_outline_image):
    def factory(**settings):
        settings.setdefault("image", mcp_outline_image)
        settings.setdefault("start_timeout", "90s")
        return make_proxy(**settings)

    return factory
