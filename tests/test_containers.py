"""Containers v2 (issue 13): one container per Outline user, a registry that follows
Docker's own events, so no request is ever answered by another user's container."""

import concurrent.futures
import random
import secrets
import time

from conftest import docker, wait_for


def small_network():
    """A bridge network of the test's own with a /29 (five addresses): addresses come
    round again within a few cycles, as on a host whose containers are replaced."""
    name = f"t{secrets.token_hex(3)}-small"
    for _ in range(20):
        subnet = f"172.31.{random.randrange(256)}.{8 * random.randrange(32)}/29"
        created = docker("network", "create", "--driver", "bridge", "--subnet", subnet,
                         "--opt", "com.docker.network.bridge.enable_icc=false", name, check=False)
        if created.returncode == 0:
            return name
    raise AssertionError(f"no free /29 for a test network: {created.stderr}")


def answered_by(proxy, key):
    """The container that answered, by the hostname it reports, and the one that must have."""
    r = proxy.get("/echo", key=key)
    assert r.status_code == 200, r.text
    expected = proxy.inspect(proxy.container_name(key))["Config"]["Hostname"]
    return r.json()["hostname"], expected


def test_no_request_is_answered_by_another_users_container(make_proxy, outline):
    net = small_network()
    try:
        proxy = make_proxy(network=net)
        users = {outline.add_user("bob"): "bob", outline.add_user("mallory"): "mallory"}
        checked = 0
        for cycle in range(8):
            names = proxy.containers()
            if names:
                # every container removed behind the proxy's back, as an upgrade script does
                docker("rm", "--force", *names)
            for key in list(users) * 3:
                got, expected = answered_by(proxy, key)
                assert got == expected, f"cycle {cycle}: {users[key]}'s request answered by another container"
                checked += 1
        assert checked == 48
        addresses = {proxy.inspect(n)["NetworkSettings"]["Networks"][net]["IPAddress"] for n in proxy.containers()}
        assert len(addresses) == 2
        proxy.cleanup()
    finally:
        docker("network", "rm", net, check=False)


def spare_count(proxy):
    return sum(1 for c in proxy.stats()["containers"] if c.get("spare") and c["state"] == "running")


def test_a_user_without_a_container_takes_a_warm_spare_at_once(make_proxy, outline):
    proxy = make_proxy(spares=1, idle_timeout="2s", sweep_interval="1s")
    wait_for(lambda: spare_count(proxy) == 1, timeout=30, what="a spare to boot")
    spare = proxy.spares()[0]
    spare_host = proxy.inspect(spare)["Config"]["Hostname"]
    key = outline.add_user("nina")
    got, expected = answered_by(proxy, key)
    # the spare became nina's container: renamed, not restarted
    assert got == expected == spare_host
    assert proxy.containers() == [proxy.container_name(key)]
    assert "took spare" in proxy.log()
    # a new spare boots behind it
    wait_for(lambda: spare_count(proxy) == 1 and proxy.spares() and proxy.spares()[0] != spare, timeout=30,
             what="a new spare")
    # with spares on, an idle container is removed (it holds nothing of its user) and
    # the next wake takes a spare again
    wait_for(lambda: proxy.state(proxy.container_name(key)) == "missing", timeout=30, what="the idle container to go")
    got, expected = answered_by(proxy, key)
    assert got == expected
    assert proxy.log().count("took spare") == 2


def test_spares_are_adopted_after_a_restart_and_count_under_the_cap(make_proxy, outline):
    proxy = make_proxy(spares=1, max_running=2)
    wait_for(lambda: spare_count(proxy) == 1, timeout=30, what="a spare to boot")
    proxy.restart()
    assert spare_count(proxy) == 1 and len(proxy.spares()) == 1  # adopted, not doubled
    a, b = outline.add_user("olaf"), outline.add_user("paula")
    assert answered_by(proxy, a)[0]  # takes the spare: no eviction, no new slot
    wait_for(lambda: spare_count(proxy) == 1, timeout=30, what="a new spare")
    # the cap holds: two running (olaf and the spare); paula takes the spare
    assert answered_by(proxy, b)[0]
    running = [c for c in proxy.stats()["containers"] if c["state"] == "running"]
    assert len(running) <= 2


def test_spares_follow_the_image_after_a_pull(make_proxy, outline):
    tag = f"outline-mcp-proxy-test-upgrade:{secrets.token_hex(3)}"
    docker("tag", "outline-mcp-proxy-test-backend:latest", tag)
    try:
        proxy = make_proxy(spares=1, image=tag)
        wait_for(lambda: spare_count(proxy) == 1, timeout=30, what="a spare to boot")
        first = proxy.inspect(proxy.spares()[0])["Image"]
        # `docker pull` brings a new image under the same name
        docker("tag", "outline-mcp-proxy-test-backend:slow-boot", tag)
        new_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
        assert new_id != first

        def spare_of_the_new_image():
            spares = proxy.spares()
            return spares and proxy.inspect(spares[0])["Image"] == new_id and spare_count(proxy) == 1

        wait_for(spare_of_the_new_image, timeout=60, what="the spare to be replaced by one of the new image")
        key = outline.add_user("quinn")
        answered_by(proxy, key)
        assert proxy.inspect(proxy.container_name(key))["Image"] == new_id
    finally:
        docker("rmi", "--force", tag, check=False)


def asleep_on_a_new_image(proxy, outline, tag, user):
    """A user answered by a container of `tag`, the container asleep, then `tag` moved to
    another image and the proxy restarted (as after a `docker pull`). Returns the key,
    the container's name, its old id and the new image's id."""
    key = outline.add_user(user)
    answered_by(proxy, key)
    name = proxy.container_name(key)
    old = proxy.inspect(name)["Id"]
    wait_for(lambda: proxy.state(name) == "exited", timeout=30, what="sleep")
    docker("tag", "outline-mcp-proxy-test-backend:slow-boot", tag)
    new_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    proxy.restart()  # the proxy learns the new image id
    return key, name, old, new_id


def test_without_spares_a_stopped_container_of_an_older_image_is_replaced_not_woken(make_proxy, outline):
    tag = f"outline-mcp-proxy-test-upgrade:{secrets.token_hex(3)}"
    docker("tag", "outline-mcp-proxy-test-backend:latest", tag)
    try:
        proxy = make_proxy(image=tag, idle_timeout="1s", sweep_interval="1s")
        key, name, old, new_id = asleep_on_a_new_image(proxy, outline, tag, "rosa")
        got, expected = answered_by(proxy, key)
        assert got == expected
        info = proxy.inspect(name)
        assert info["Id"] != old and info["Image"] == new_id
    finally:
        docker("rmi", "--force", tag, check=False)


def test_a_failed_removal_never_wakes_the_container_of_the_old_image(make_proxy, outline, tmp_path):
    """Docker refusing to remove the outdated container fails the request (and is said);
    the old image's container is not started in its place. Once Docker removes it, the
    next request is served by the new image."""
    tag = f"outline-mcp-proxy-test-upgrade:{secrets.token_hex(3)}"
    docker("tag", "outline-mcp-proxy-test-backend:latest", tag)
    refuse = tmp_path / "refuse-rm"
    wrapper = tmp_path / "docker"
    wrapper.write_text(f"""#!/bin/sh
if [ "$1" = rm ] && [ -e {refuse} ]; then echo "Error response from daemon: removal refused" >&2; exit 1; fi
exec docker "$@"
""")
    wrapper.chmod(0o755)
    try:
        proxy = make_proxy(image=tag, idle_timeout="1s", sweep_interval="1s", docker=str(wrapper))
        key, name, old, new_id = asleep_on_a_new_image(proxy, outline, tag, "ursula")
        refuse.touch()
        refused = proxy.get("/echo", key=key)
        assert refused.status_code >= 500, refused.text
        assert proxy.inspect(name)["Id"] == old and proxy.state(name) == "exited"
        assert "remove outdated container" in proxy.log()
        refuse.unlink()
        got, expected = answered_by(proxy, key)
        assert got == expected
        assert proxy.inspect(name)["Image"] == new_id
    finally:
        docker("rmi", "--force", tag, check=False)


def test_one_user_cannot_hold_every_slot(make_proxy, outline):
    import concurrent.futures

    proxy = make_proxy(user_max_inflight=2)
    greedy, other = outline.add_user("sam"), outline.add_user("tina")
    answered_by(proxy, greedy)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(proxy.get, "/slow?ms=3000", key=greedy) for _ in range(2)]
        wait_for(lambda: any(c["active_requests"] == 2 for c in proxy.stats()["containers"]), timeout=10,
                 what="two requests in flight")
        refused = proxy.get("/echo", key=greedy)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "too_many_requests"
        assert proxy.get("/echo", key=other).status_code == 200  # others are not held up
        assert all(f.result().status_code == 200 for f in slow)
    assert proxy.get("/echo", key=greedy).status_code == 200


def restarted_by_docker(proxy, name):
    """`docker restart`, then waits until the proxy has seen the start (its event)."""
    docker("restart", "--time", "0", name)
    wait_for(lambda: proxy.believed_state(name) == "running", timeout=20, what="the proxy to see the start")


def auth_hits(proxy):
    text = proxy.get("/metrics").text
    return int(float(next(l.split()[-1] for l in text.splitlines() if l.startswith("mcp_proxy_auth_cache_hits_total"))))


def test_a_container_docker_started_that_never_answers_is_waited_for_once(make_proxy, outline):
    """A container Docker started is waited for until it answers, at most START_TIMEOUT:
    when it never does, the request gets a 503 then, not after a second wait."""
    proxy = make_proxy(image="outline-mcp-proxy-test-backend:never-ready", start_timeout="4s")
    key = outline.add_user("nora")
    name = proxy.container_name(key)
    first = proxy.get("/echo", key=key)
    assert first.status_code == 503 and first.json()["error"] == "start_timeout", first.text
    restarted_by_docker(proxy, name)
    began = time.monotonic()
    r = proxy.get("/echo", key=key)
    took = time.monotonic() - began
    assert r.status_code == 503 and r.json()["error"] == "start_timeout", r.text
    assert took < 6.5, f"waited {took:.1f}s for a 4s START_TIMEOUT (twice?)"
    assert proxy.get("/health").status_code == 200


def test_a_container_docker_started_and_removed_while_awaited_is_made_again(make_proxy, outline):
    """Removed while the first request waits for it to answer: the wait ends at the next
    look (within a second), and the container is made again for the request."""
    proxy = make_proxy(image="outline-mcp-proxy-test-backend:slow-boot", start_timeout="20s")
    key = outline.add_user("otto")
    name = proxy.container_name(key)
    assert proxy.get("/echo", key=key).status_code == 200
    restarted_by_docker(proxy, name)  # it listens 3 s after it starts
    before = auth_hits(proxy)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        began = time.monotonic()
        pending = pool.submit(proxy.get, "/echo", key)
        # the request is past its key check, and waits for the container
        wait_for(lambda: auth_hits(proxy) > before, timeout=10, interval=0.02, what="the request to arrive")
        docker("rm", "--force", name)
        r = pending.result()
        took = time.monotonic() - began
    assert r.status_code == 200, r.text
    assert took < 12, f"took {took:.1f}s: the removed container was waited for until START_TIMEOUT"
    assert r.json()["hostname"] == proxy.inspect(name)["Config"]["Hostname"]
