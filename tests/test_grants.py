"""Grants are bounded, kept through a journal, and a refresh token is spent once (issue 20,
items 5 and 8).

Per user and client at most 10 live grants, per user 100; registered clients bounded
(MCP_PROXY_OAUTH_MAX_CLIENTS), unused ones dropped first; what is on disk stays bounded and
comes back after a restart without a clean stop. Two refreshes with one refresh token at
the same moment are a replay (RFC 9700 §4.14): the grant ends, the winner's new tokens too.
A request and a refresh that both find Outline's token at its end renew it once."""

import json
import socket
import threading
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from conftest import free_port
from oauth_client import (OAUTH_PATH, authorize_params, consent_form, exchange, mcp_initialize, pkce_pair, refresh,
                          register, scripted_code)
from test_oauth import oauth_proxy

__all__ = ["oauth_proxy"]  # fixture

REDIRECT = "http://127.0.0.1:9/callback"


def on_disk(proxy):
    """Everything the store keeps in its state directory, and its size in bytes."""
    files = [p for p in proxy.state_dir.iterdir() if p.name.startswith("oauth-grants")]
    return "".join(p.read_text() for p in files), sum(p.stat().st_size for p in files)


def sign_in(proxy, client_id, key):
    verifier, challenge = pkce_pair()
    code = scripted_code(proxy.url, client_id, REDIRECT, key, challenge)
    r = exchange(proxy.url, client_id, REDIRECT, code, verifier)
    assert r.status_code == 200, r.text
    return r.json()


def test_300_sign_ins_for_one_user_and_client_leave_10_live_and_the_disk_bounded(oauth_proxy, outline):
    proxy = oauth_proxy()
    carol = outline.add_user("carol")
    client_id = register(proxy.url, REDIRECT)
    issued = []
    sizes = []
    for i in range(300):
        issued.append(sign_in(proxy, client_id, carol))
        if i % 50 == 49:
            sizes.append(on_disk(proxy)[1])
    assert proxy.stats()["oauth"]["grants"] == 10
    live = [t for t in issued if mcp_initialize(proxy.url, t["access_token"]).status_code == 200]
    assert live == issued[-10:], "the ten newest are the live ones"
    assert refresh(proxy.url, client_id, issued[0]["refresh_token"]).json()["error"] == "invalid_grant"
    # the state on disk does not grow with the sign-ins: bounded by a multiple of 10 grants
    text, size = on_disk(proxy)
    one_grant = size / 10
    assert max(sizes) < 40 * one_grant + 16384, sizes
    assert sizes[-1] < 2 * sizes[0] + 16384, sizes
    for secret in (carol, issued[-1]["access_token"], issued[-1]["refresh_token"]):
        assert secret not in text
    journal = proxy.state_dir / "oauth-grants.journal"
    assert journal.exists() and (journal.stat().st_mode & 0o777) == 0o600


def test_a_user_has_at_most_100_grants_over_all_clients(oauth_proxy, outline):
    proxy = oauth_proxy(oauth_register_limit=100)
    carol, dave = outline.add_user("carol"), outline.add_user("dave")
    clients = [register(proxy.url, REDIRECT) for _ in range(11)]
    first = [sign_in(proxy, clients[0], carol) for _ in range(10)]
    daves = sign_in(proxy, clients[0], dave)
    for client_id in clients[1:]:
        for _ in range(10):
            sign_in(proxy, client_id, carol)
    assert proxy.stats()["oauth"]["grants"] == 101  # carol's 100, and dave's one
    assert all(mcp_initialize(proxy.url, t["access_token"]).status_code == 401 for t in first)
    assert mcp_initialize(proxy.url, daves["access_token"]).status_code == 200, "another user's grant stays"


def test_grants_survive_a_restart_from_the_journal_and_a_revoked_one_stays_revoked(oauth_proxy, outline):
    proxy = oauth_proxy()
    carol = outline.add_user("carol")
    client_id = register(proxy.url, REDIRECT)
    kept, revoked, rotated_out = (sign_in(proxy, client_id, carol) for _ in range(3))
    assert httpx.post(proxy.url + "/oauth/revoke", data={"token": revoked["refresh_token"]}).status_code == 200
    rotated = refresh(proxy.url, client_id, rotated_out["refresh_token"]).json()
    journal = (proxy.state_dir / "oauth-grants.journal").read_text()
    assert any(json.loads(line)["op"] == "grant_gone" for line in journal.splitlines()), journal[:300]
    proxy.stop(sig=9)  # no clean stop: the journal is all there is of the last changes
    proxy.start()
    assert proxy.stats()["oauth"]["grants"] == 2
    assert mcp_initialize(proxy.url, kept["access_token"]).status_code == 200
    assert mcp_initialize(proxy.url, rotated["access_token"]).status_code == 200
    assert mcp_initialize(proxy.url, revoked["access_token"]).status_code == 401
    assert refresh(proxy.url, client_id, revoked["refresh_token"]).json()["error"] == "invalid_grant"
    # the rotated-out refresh token is still known as spent after the restart: a replay
    assert refresh(proxy.url, client_id, rotated_out["refresh_token"]).json()["error"] == "invalid_grant"
    assert mcp_initialize(proxy.url, rotated["access_token"]).status_code == 401


def test_registered_clients_are_bounded_and_unused_ones_go_first(oauth_proxy, outline):
    proxy = oauth_proxy(oauth_max_clients=3, oauth_register_limit=100)
    carol = outline.add_user("carol")
    used = register(proxy.url, REDIRECT)
    sign_in(proxy, used, carol)
    unused = [register(proxy.url, REDIRECT)]
    time.sleep(1.1)  # a client's age is kept to the second: the next one is younger
    unused.append(register(proxy.url, REDIRECT))
    newer = register(proxy.url, REDIRECT)  # full: the oldest unused one goes
    assert proxy.stats()["oauth"]["registered_clients"] == 3
    page = httpx.get(proxy.url + "/oauth/authorize",
                     params=authorize_params(proxy.url, unused[0], REDIRECT, pkce_pair()[1]))
    assert page.status_code == 400, "the oldest unused client was dropped"
    for alive in (used, unused[1], newer):
        page = httpx.get(proxy.url + "/oauth/authorize",
                         params=authorize_params(proxy.url, alive, REDIRECT, pkce_pair()[1]))
        assert page.status_code == 200, page.text
    for client_id in (unused[1], newer):
        sign_in(proxy, client_id, carol)
    # every client has a live grant: a registration gets a clear 503
    r = httpx.post(proxy.url + "/oauth/register", json={"redirect_uris": [REDIRECT]})
    assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable", r.text
    assert "registered clients" in r.json()["error_description"]
    assert mcp_initialize(proxy.url, sign_in(proxy, used, carol)["access_token"]).status_code == 200


def raw_post(port, path, form):
    body = urlencode(form).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def read_answer(sock):
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def concurrently(port, requests_):
    """Each request on its own connection, sent whole at one instant (a barrier)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in requests_]
    barrier = threading.Barrier(len(requests_))
    answers = [None] * len(requests_)
    errors = []

    def one(i):
        try:
            barrier.wait()
            socks[i].sendall(requests_[i])
            answers[i] = read_answer(socks[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            socks[i].close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests_))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and all(a is not None for a in answers), errors
    return answers


def test_a_refresh_token_presented_twice_at_the_same_moment_revokes_the_grant(oauth_proxy, outline):
    proxy = oauth_proxy()
    carol = outline.add_user("carol")
    client_id = register(proxy.url, REDIRECT)
    tokens = sign_in(proxy, client_id, carol)
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id,
            "resource": proxy.url + OAUTH_PATH}
    answers = concurrently(proxy.port, [raw_post(proxy.port, "/oauth/token", form)] * 2)
    assert sorted(status for status, _ in answers) == [200, 400], answers
    won = next(json.loads(body) for status, body in answers if status == 200)
    lost = next(json.loads(body) for status, body in answers if status == 400)
    assert lost["error"] == "invalid_grant" and "revoked" in lost["error_description"]
    # the grant is gone: the winner's new tokens and the old access token all stop working
    for access in (won["access_token"], tokens["access_token"]):
        r = mcp_initialize(proxy.url, access)
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert refresh(proxy.url, client_id, won["refresh_token"]).json()["error"] == "invalid_grant"


def outline_sign_in(proxy, outline, client_id):
    """The Outline-OAuth sign-in, scripted: the proxy's tokens for it."""
    verifier, challenge = pkce_pair()
    with httpx.Client(timeout=30) as browser_like:
        page = browser_like.get(proxy.url + "/oauth/authorize",
                                params=authorize_params(proxy.url, client_id, REDIRECT, challenge))
        to_outline = browser_like.post(proxy.url + "/oauth/authorize", data={**consent_form(page.text),
                                                                              "action": "allow"})
        assert to_outline.status_code == 303, to_outline.text
        consent = {k: v[0] for k, v in parse_qs(urlsplit(to_outline.headers["location"]).query).items()}
        back = browser_like.post(f"http://127.0.0.1:{outline.port}/oauth/authorize", data=consent)
        to_client = browser_like.get(back.headers["location"])
        assert to_client.status_code == 303, to_client.text
        code = parse_qs(urlsplit(to_client.headers["location"]).query)["code"][0]
    r = exchange(proxy.url, client_id, REDIRECT, code, verifier)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_request_and_a_refresh_at_expiry_renew_outlines_token_once(oauth_proxy, outline):
    carol = outline.add_user("carol")
    port = free_port()
    app_id, app_secret = outline.add_oauth_client(f"http://127.0.0.1:{port}/oauth/callback")
    proxy = oauth_proxy(listen=f"127.0.0.1:{port}", auth_ttl="0",
                        OUTLINE_OAUTH_CLIENT_ID=app_id, OUTLINE_OAUTH_CLIENT_SECRET=app_secret)
    outline.sign_in_as(carol)
    outline.oauth_access_ttl = 200  # within the proxy's renewal window from the start
    client_id = register(proxy.url, REDIRECT)
    tokens = outline_sign_in(proxy, outline, client_id)
    assert mcp_initialize(proxy.url, tokens["access_token"]).status_code == 200  # the container is up
    # Outline's access token is near its end, and Outline's refresh is slow: the
    # request and the client's refresh both find it so, at the same moment
    outline.oauth_access_ttl = 3600
    outline.oauth_refresh_delay = 1.0
    spent = next(r["refresh"] for r in outline.oauth_tokens.values())
    before = len(outline.oauth_refreshes)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                       "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                  "clientInfo": {"name": "t", "version": "1"}}}).encode()
    mcp = (f"POST {OAUTH_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {tokens['access_token']}"
           f"\r\nAccept: application/json, text/event-stream\r\nContent-Type: application/json\r\n"
           f"MCP-Protocol-Version: 2025-06-18\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
           ).encode() + body
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id,
            "resource": proxy.url + OAUTH_PATH}
    (mcp_status, _), (refresh_status, refreshed) = concurrently(port, [mcp, raw_post(port, "/oauth/token", form)])
    refreshed = json.loads(refreshed)
    assert outline.oauth_refreshes[before:] == [(spent, 200)], outline.oauth_refreshes[before:]
    assert mcp_status == 200 and refresh_status == 200, refreshed
    assert mcp_initialize(proxy.url, refreshed["access_token"]).status_code == 200
    # the fake refuses a spent Outline refresh token as Outline does
    again = httpx.post(f"http://127.0.0.1:{outline.port}/oauth/token",
                       data={"grant_type": "refresh_token", "refresh_token": spent, "client_id": app_id,
                             "client_secret": app_secret})
    assert again.status_code == 400 and "Invalid grant" in again.text
