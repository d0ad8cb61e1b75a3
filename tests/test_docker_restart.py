"""The Docker daemon stopped and started again under a running proxy. Marked
takes_docker_away, so it runs after every other test (conftest orders it last): it
takes the daemon away from everything else for a few seconds."""

import os
import signal
import subprocess
import time

import pytest

from conftest import wait_for

pytestmark = pytest.mark.takes_docker_away


def dockerd_pid():
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if open(f"/proc/{pid}/comm").read().strip() == "dockerd":
                    return int(pid)
            except OSError:
                pass
    return None


def docker_answers():
    return subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                          timeout=20).returncode == 0


def test_the_docker_daemon_stopped_and_restarted_under_the_proxy(make_proxy, outline):
    proxy = make_proxy()
    key = outline.add_user("dora")
    name = proxy.container_name(key)
    assert proxy.get("/echo", key=key).status_code == 200

    pid = dockerd_pid()
    assert pid, "dockerd is not running on this machine"
    cmdline = [a.decode() for a in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0") if a]
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: dockerd_pid() is None and not docker_answers(), timeout=60, what="dockerd to stop")
        r = proxy.get("/echo", key=key)
        assert r.status_code in (502, 503), r.text
        assert r.json()["error"] in ("docker_unavailable", "container_unreachable")
        wait_for(lambda: proxy.get("/health").status_code == 503, timeout=20, what="/health to report Docker down")
        assert proxy.get("/health").json()["docker"] == "unreachable"
    finally:
        # a service manager may bring it back by itself; else start it as it was
        time.sleep(3)
        if dockerd_pid() is None:
            subprocess.Popen(cmdline, stdin=subprocess.DEVNULL, stdout=open("/tmp/dockerd-restarted.log", "ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(docker_answers, timeout=90, interval=0.5, what="dockerd to answer again")

    wait_for(lambda: proxy.get("/health").status_code == 200, timeout=30, what="/health to recover")
    r = proxy.get("/echo", key=key)
    assert r.status_code == 200, r.text
    assert proxy.containers() == [name]
    assert proxy.process.poll() is None
