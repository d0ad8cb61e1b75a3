"""The memory budget on a Debian 12 host as the cloud gives it (issue 24): cgroup v2 and
Docker's systemd cgroup driver, which this machine (cgroup v1, cgroupfs) cannot show.

A QEMU guest (tests/build-vm-image.sh; emulated, TCG: this machine's /dev/kvm is
PVM, which runs only kernels built for it) with Debian's kernel, systemd as init, Debian's
docker.io and nginx, and 2 GiB of memory, a t3.small's. systemd/install.sh runs in it as an
operator would, from the repository shared read-only; the fake Outline runs here and the
guest reaches it at QEMU's 10.0.2.2. Then: the unit's ExecStartPre set the budget as
MemoryMax on outline_mcp_proxy.slice; the kernel holds that slice to it; the user's
container runs in it, answered by the real mcp-outline through the guest's nginx; /stats
reads the slice's v2 files; the proxy and nginx are out of the OOM killer's reach, read
back from the running processes (a real VM: nothing withholds CAP_SYS_RESOURCE here)."""

import os
import re
import secrets
import shutil
import ssl
import subprocess

import anyio
import httpx
import pytest

from conftest import ROOT, build, docker, free_port, wait_for
from test_e2e_mcp import assert_sees_only_own_data, mcp_session

MIB = 1 << 20
RESERVE = 640 * MIB  # memory::RESERVE


@pytest.fixture(scope="module")
def vm_image():
    return build("build-vm-image.sh", "the Debian 12 guest", timeout=1800)


class Guest:
    """A Debian 12 guest: 2 vCPUs, 2 GiB; sshd and nginx's 443 forwarded to loopback."""

    def __init__(self, image_dir, work, share):
        self.work, self.ssh_port, self.https_port = work, free_port(), free_port()
        self.key = work / "id_ed25519"
        shutil.copy(f"{image_dir}/id_ed25519", self.key)
        os.chmod(self.key, 0o600)
        overlay = work / "disk.qcow2"  # the built disk stays as it is: each run starts fresh
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", f"{image_dir}/disk.img",
                        str(overlay)], check=True)
        self.console = work / "console.log"
        forwards = f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,hostfwd=tcp:127.0.0.1:{self.https_port}-:443"
        self.qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-smp", "2", "-m", "2048", "-no-reboot",
             "-display", "none", "-monitor", "none", "-serial", f"file:{self.console}",
             "-kernel", f"{image_dir}/vmlinuz", "-initrd", f"{image_dir}/initrd.img",
             "-append", "root=/dev/vda rw console=ttyS0 quiet",
             "-drive", f"file={overlay},if=virtio,format=qcow2",
             "-netdev", f"user,id=n0,{forwards}", "-device", "virtio-net-pci,netdev=n0",
             "-virtfs", f"local,path={ROOT},mount_tag=src,security_model=none,readonly=on",
             "-virtfs", f"local,path={share},mount_tag=share,security_model=none"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self._booted, timeout=180, interval=1, what=f"the guest to boot (console: {self.console})")

    def _booted(self):
        if self.qemu.poll() is not None:
            raise AssertionError(f"qemu exited: {self.qemu.stderr.read().decode()[-2000:]}")
        r = self.sh("systemctl is-system-running --wait", check=False, timeout=60)
        return r.stdout.strip() in ("running", "degraded")

    def sh(self, command, check=True, timeout=300):
        r = subprocess.run(["ssh", "-q", "-i", str(self.key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "-o", "ConnectTimeout=5", "root@127.0.0.1", "bash", "-s"],
                           input=command, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{command!r} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def stop(self):
        self.sh("systemctl poweroff", check=False, timeout=30)
        try:
            self.qemu.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.qemu.kill()
            self.qemu.wait()


@pytest.fixture()
def guest(vm_image, mcp_outline_image, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    docker("save", "-o", str(share / "image.tar"), mcp_outline_image, timeout=600)
    g = Guest(vm_image, tmp_path, share)
    yield g
    # shown when the test fails: what the proxy said
    print(g.sh("journalctl -u mcp-proxy --no-pager | tail -60", check=False).stdout)
    g.stop()
    shutil.rmtree(share)  # the image's copy, and the guest's disk: hundreds of MiB
    (tmp_path / "disk.qcow2").unlink(missing_ok=True)


def stats(guest, verify):
    password = guest.sh("sed -n 's/^MCP_PROXY_STATS_PASSWORD=//p' /etc/outline-mcp-proxy.env").stdout.strip()
    r = httpx.get(f"https://localhost:{guest.https_port}/stats", auth=("admin", password), timeout=10, verify=verify)
    assert r.status_code == 200, r.text
    return r.json()


def budget_served(guest, verify):
    """The budget /stats reports, or None while the proxy does not answer (restarting)."""
    try:
        return stats(guest, verify)["memory"]["budget_bytes"]
    except (AssertionError, httpx.HTTPError):
        return None


def slice_limit(guest):
    """What systemd and the kernel hold the containers' slice to (bytes, bytes)."""
    systemd = guest.sh("systemctl show -p MemoryMax --value outline_mcp_proxy.slice").stdout.strip()
    kernel = guest.sh("cat /sys/fs/cgroup/outline_mcp_proxy.slice/memory.max").stdout.strip()
    return int(systemd), int(kernel)


def test_debian12_cgroup_v2_systemd_driver_holds_the_containers_to_the_budget(guest, outline, mcp_outline_image,
                                                                              tmp_path):
    guest.sh("docker load -q -i /share/image.tar", timeout=600)
    # the host the issue names: cgroup v2, and Docker's systemd driver
    assert guest.sh("docker info -f '{{.CgroupDriver}} {{.CgroupVersion}}'").stdout.split() == ["systemd", "2"]
    assert guest.sh("stat -f -c %T /sys/fs/cgroup").stdout.strip() == "cgroup2fs"

    install = (f"/src/systemd/install.sh --domain localhost --outline-url http://10.0.2.2:{outline.port} "
               f"--image {mcp_outline_image} --no-pull --set MCP_PROXY_START_TIMEOUT=300s")
    first = guest.sh(install, check=False, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "✗" not in first.stdout, first.stdout
    held = re.search(r"✓ the kernel holds the containers \(outline_mcp_proxy\.slice\) to the memory budget, (\d+) MiB",
                     first.stdout)
    assert held, first.stdout

    # the budget's default on a 2 GiB host: its memory less the reserve, in whole pages,
    # set by the unit's ExecStartPre as the slice's MemoryMax, and held by the kernel
    host_memory = int(guest.sh("awk '/^MemTotal:/ {print $2 * 1024}' /proc/meminfo").stdout)
    assert 1900 * MIB < host_memory <= 2048 * MIB
    cafile = tmp_path / "guest.crt"
    cafile.write_text(guest.sh("cat /etc/ssl/certs/self-signed.crt").stdout)
    verify = ssl.create_default_context(cafile=str(cafile))
    budget = stats(guest, verify)["memory"]["budget_bytes"]
    assert budget == (host_memory - RESERVE) & ~4095, (budget, host_memory)
    assert int(held.group(1)) == budget >> 20
    assert slice_limit(guest) == (budget, budget)
    assert stats(guest, verify)["memory"]["kernel_limit_bytes"] == budget

    # a real client from outside, through the guest's nginx, answered by the real mcp-outline
    key = outline.add_user("alice")
    outline.add_user("bob")
    result = anyio.run(lambda: mcp_session(f"https://localhost:{guest.https_port}", key, verify=verify))
    assert_sees_only_own_data(result, "alice", "bob")

    # alice's container is in the slice: Docker was told so, and the kernel agrees
    names = guest.sh("docker ps --format '{{.Names}} {{.ID}}'").stdout.split("\n")
    alices = [line.split() for line in names if line.startswith("mcp-") and not line.startswith("mcp-spare-")]
    assert len(alices) == 1, names
    name, short_id = alices[0]
    assert guest.sh(f"docker inspect -f '{{{{.HostConfig.CgroupParent}}}}' {name}").stdout.strip() == \
        "outline_mcp_proxy.slice"
    pid = guest.sh(f"docker inspect -f '{{{{.State.Pid}}}}' {name}").stdout.strip()
    cgroup = guest.sh(f"cat /proc/{pid}/cgroup").stdout.strip()
    assert re.fullmatch(rf"0::/outline_mcp_proxy\.slice/docker-{short_id}[0-9a-f]*\.scope", cgroup), cgroup

    # /stats reads the slice's v2 files: its usage less inactive file pages
    memory = wait_for(lambda: (m := stats(guest, verify)["memory"])["in_use_bytes"] > 20 * MIB and m,
                      timeout=30, what="the proxy's reading of the slice")
    current = int(guest.sh("cat /sys/fs/cgroup/outline_mcp_proxy.slice/memory.current").stdout)
    assert memory["in_use_bytes"] <= budget and current <= budget, (memory, current)
    assert 1 <= memory["containers_fit"] <= budget // (48 * MIB) + 1, memory

    # neither the proxy nor nginx is the OOM killer's choice: read back from the running
    # processes, on a host where systemd may lower a score
    proxy_pid = guest.sh("systemctl show -p MainPID --value mcp-proxy").stdout.strip()
    nginx_pid = guest.sh("systemctl show -p MainPID --value nginx").stdout.strip()
    for process in (proxy_pid, nginx_pid):
        assert guest.sh(f"cat /proc/{process}/oom_score_adj").stdout.strip() == "-900", process
    workers = guest.sh("pgrep -f 'nginx: worker'").stdout.split()
    assert workers and all(guest.sh(f"cat /proc/{w}/oom_score_adj").stdout.strip() == "-900" for w in workers)

    # the budget follows the env file at each start: set smaller, the slice follows
    guest.sh("sed -i '/^MCP_PROXY_MEMORY_BUDGET=/d' /etc/outline-mcp-proxy.env && "
             "echo MCP_PROXY_MEMORY_BUDGET=600m >> /etc/outline-mcp-proxy.env && systemctl restart mcp-proxy")
    wait_for(lambda: budget_served(guest, verify) == 600 * MIB, timeout=120, interval=1,
             what="the proxy to restart with the smaller budget")
    assert slice_limit(guest) == (600 * MIB, 600 * MIB)
    assert stats(guest, verify)["memory"]["kernel_limit_bytes"] == 600 * MIB
    # and alice is answered again, her container adopted under the new limit
    result = anyio.run(lambda: mcp_session(f"https://localhost:{guest.https_port}", key, verify=verify))
    assert_sees_only_own_data(result, "alice", "bob")
