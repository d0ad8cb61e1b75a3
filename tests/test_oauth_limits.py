"""The OAuth door's limits (issue 20, items 4, 6, 9 and 10): what one client can take.

Registrations have a ceiling over all addresses; X-Real-IP names the client only when
the peer is a trusted proxy, and IPv6 clients count by their /64. Sign-ins in progress
and client-document fetches are limited per address, and a failed fetch is remembered.
Redirect URIs are read the way a browser reads them. The PKCE verifier the proxy sends
Outline is keyed by a secret in the state directory, not derivable from the sign-in's id."""

import base64
import concurrent.futures
import hashlib
import hmac
import json
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from conftest import free_port, wait_for
from oauth_client import DocumentServer, authorize_params, consent_form, exchange, pkce_pair, register

REDIRECT = "http://127.0.0.1:9/callback"


@pytest.fixture()
def stateful_proxy(make_proxy, tmp_path):
    def factory(**settings):
        state = tmp_path / f"state-{len(list(tmp_path.glob('state-*')))}"
        state.mkdir(mode=0o700)
        proxy = make_proxy(state_dir=str(state), **settings)
        proxy.state_dir = state
        return proxy

    return factory


def registration(client, real_ip=None, redirect=REDIRECT):
    headers = {"X-Real-IP": real_ip} if real_ip else {}
    return client.post("/oauth/register", json={"client_name": "Flood", "redirect_uris": [redirect]},
                       headers=headers)


# --- item 4: registrations ---

def test_registrations_have_a_ceiling_over_all_addresses(make_proxy, outline):
    """200 registrations from loopback (nginx), each naming another client address: the
    per-address buckets all have room, the ceiling (default 100 an hour) does not."""
    proxy = make_proxy()
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        answers = [registration(c, f"198.18.{i // 250}.{i % 250 + 1}") for i in range(200)]
    statuses = [r.status_code for r in answers]
    assert statuses.count(201) == 100, statuses
    assert set(statuses[100:]) == {429}
    refused = answers[-1]
    assert refused.json()["error"] == "too_many_requests"
    assert "on this server" in refused.json()["error_description"]
    assert refused.headers["retry-after"] == "60"
    assert proxy.get("/health").status_code == 200


def test_x_real_ip_counts_only_from_a_trusted_proxy(make_proxy, outline):
    """From loopback trusted (the default), X-Real-IP names the client: ten addresses,
    ten buckets. With only another address trusted, loopback is the client itself,
    whatever X-Real-IP says: one bucket of five."""
    trusting = make_proxy(oauth_register_limit="5")
    with httpx.Client(base_url=trusting.url, timeout=30) as c:
        assert [registration(c, f"203.0.113.{i}").status_code for i in range(1, 11)] == [201] * 10
        # the sixth from one address is refused
        assert [registration(c, "203.0.113.99").status_code for _ in range(6)] == [201] * 5 + [429]

    untrusting = make_proxy(oauth_register_limit="5", trusted_proxy="192.0.2.10, 2001:db8::10")
    with httpx.Client(base_url=untrusting.url, timeout=30) as c:
        statuses = [registration(c, f"203.0.113.{i}").status_code for i in range(1, 11)]
    assert statuses == [201] * 5 + [429] * 5
    with httpx.Client(base_url=untrusting.url, timeout=30) as c:
        assert "from this address" in registration(c, "198.51.100.1").text


def raw_registration(port, real_ip):
    """One registration on its own connection, the head written by hand."""
    body = json.dumps({"client_name": "v6", "redirect_uris": [REDIRECT]}).encode()
    head = (f"POST /oauth/register HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Real-IP: {real_ip}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode() + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_ipv6_clients_count_by_their_64(make_proxy, outline):
    proxy = make_proxy(oauth_register_limit="3")
    same_64 = [f"2001:db8:7:1:{i:x}::{i}" for i in range(1, 6)]
    assert [raw_registration(proxy.port, ip) for ip in same_64] == [201, 201, 201, 429, 429]
    assert raw_registration(proxy.port, "2001:db8:7:2::1") == 201  # the next /64 is another client
    assert raw_registration(proxy.port, "::ffff:203.0.113.5") == 201


# --- item 6: sign-ins in progress, document fetches ---

def start_sign_in(url, client_id, real_ip):
    """GET the consent page as a browser at `real_ip` (behind nginx): (client, answer)."""
    browser_like = httpx.Client(base_url=url, timeout=30, headers={"X-Real-IP": real_ip})
    _, challenge = pkce_pair()
    return browser_like, browser_like.get("/oauth/authorize",
                                          params=authorize_params(url, client_id, REDIRECT, challenge))


def test_sign_ins_in_progress_are_limited_per_address(make_proxy, outline):
    proxy = make_proxy(oauth_signins_per_address="3")
    client_id = register(proxy.url, REDIRECT)
    started = [start_sign_in(proxy.url, client_id, "203.0.113.20") for _ in range(3)]
    assert [answer.status_code for _, answer in started] == [200] * 3
    _, fourth = start_sign_in(proxy.url, client_id, "203.0.113.20")
    assert fourth.status_code == 429 and "from this address" in fourth.text
    assert "set-cookie" not in fourth.headers
    # another address is not held up
    _, elsewhere = start_sign_in(proxy.url, client_id, "203.0.113.21")
    assert elsewhere.status_code == 200
    # a sign-in that ends (declined here) gives its slot back
    browser_like, page = started[0]
    declined = browser_like.post("/oauth/authorize", data={**consent_form(page.text), "action": "deny"})
    assert declined.status_code == 303 and "access_denied" in declined.headers["location"]
    _, again = start_sign_in(proxy.url, client_id, "203.0.113.20")
    assert again.status_code == 200
    for browser_like, _ in started:
        browser_like.close()


class SilentServer:
    """Accepts TCP connections and never answers (a TLS handshake that hangs)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def stop(self):
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def test_client_document_fetches_are_limited_per_address(make_proxy, outline, tmp_path):
    """One address asking for eight slow documents at once takes two fetch slots, not
    all eight: another address's client document is still fetched."""
    silent, docs = SilentServer(), DocumentServer(tmp_path)
    try:
        docs.documents["/c.json"] = {"client_id": docs.url("/c.json"), "redirect_uris": [REDIRECT]}
        proxy = make_proxy(SSL_CERT_FILE=str(docs.ca), oauth_client_documents="any")
        _, challenge = pkce_pair()
        returned = []

        def slow(i):
            client_id = f"https://127.0.0.1:{silent.port}/client-{i}.json"
            r = httpx.get(proxy.url + "/oauth/authorize", headers={"X-Real-IP": "203.0.113.30"}, timeout=30,
                          params=authorize_params(proxy.url, client_id, REDIRECT, challenge))
            returned.append(r)
            return r

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(slow, i) for i in range(8)]
            # every one of the eight either holds a fetch or was turned away
            wait_for(lambda: len(silent.accepted) + len(returned) >= 8, timeout=4.5,
                     what="the eight fetches to start or be refused")
            assert len(silent.accepted) <= 2
            r = httpx.get(proxy.url + "/oauth/authorize", headers={"X-Real-IP": "203.0.113.31"}, timeout=30,
                          params=authorize_params(proxy.url, docs.url("/c.json"), REDIRECT, challenge))
            assert r.status_code == 200, r.text[:300]
            answers = [f.result() for f in futures]
        refused = [a for a in answers if "for this address" in a.text]
        assert len(refused) == 6 and all(a.status_code == 400 for a in refused)
        assert docs.fetches == ["/c.json"]
    finally:
        silent.stop()
        docs.stop()


def test_a_failed_document_fetch_is_remembered(make_proxy, outline, tmp_path):
    docs = DocumentServer(tmp_path)
    try:
        proxy = make_proxy(SSL_CERT_FILE=str(docs.ca), oauth_client_documents="any")
        _, challenge = pkce_pair()
        params = authorize_params(proxy.url, docs.url("/missing.json"), REDIRECT, challenge)
        first = httpx.get(proxy.url + "/oauth/authorize", params=params)
        second = httpx.get(proxy.url + "/oauth/authorize", params=params)
        assert first.status_code == second.status_code == 400
        assert "404" in first.text and "404" in second.text
        assert docs.fetches == ["/missing.json"]  # asked once, not at once again
    finally:
        docs.stop()


# --- item 9: redirect URIs as a browser reads them ---

@pytest.mark.parametrize("uri, why", [
    ("https://attacker.example\\.claude.ai/cb", "backslash"),
    ("https://claude.ai@attacker.example/cb", "user info"),
    ("https://claude.ai:pw@attacker.example/cb", "user info"),
    ("https://cl\u0430ude.ai/cb", "ASCII"),  # a Cyrillic a
    ("https://attacker.example%2f.claude.ai/cb", "letters, digits"),
    ("https://0x7f.1/cb", "a.b.c.d"),
])
def test_registration_refuses_a_redirect_uri_a_browser_reads_otherwise(make_proxy, outline, uri, why):
    proxy = make_proxy()
    r = httpx.post(proxy.url + "/oauth/register",
                   content=json.dumps({"client_name": "Sly", "redirect_uris": [uri]}, ensure_ascii=False).encode(),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_redirect_uri"
    assert why in r.json()["error_description"]


def test_the_consent_page_names_the_host_the_browser_goes_to(make_proxy, outline, tmp_path):
    docs = DocumentServer(tmp_path)
    try:
        sly = "https://attacker.example\\.claude.ai/cb"
        docs.documents["/sly.json"] = {"client_id": docs.url("/sly.json"), "client_name": "Claude",
                                       "redirect_uris": [sly]}
        proxy = make_proxy(SSL_CERT_FILE=str(docs.ca), oauth_client_documents="any")
        _, challenge = pkce_pair()
        # a client document is held to the same reading as a registration
        r = httpx.get(proxy.url + "/oauth/authorize",
                      params=authorize_params(proxy.url, docs.url("/sly.json"), sly, challenge))
        assert r.status_code == 400 and "backslash" in r.text and "claude.ai</strong>" not in r.text
        assert "set-cookie" not in r.headers
        # an honest one is named by the host its redirect URI really goes to
        honest = "https://App.Example.com:8443/oauth/cb?x=1"
        client_id = register(proxy.url, honest)
        page = httpx.get(proxy.url + "/oauth/authorize",
                         params=authorize_params(proxy.url, client_id, honest, challenge))
        assert page.status_code == 200
        assert '<strong id="redirect-host">app.example.com</strong>' in page.text
    finally:
        docs.stop()


# --- item 10: the PKCE verifier sent to Outline ---

def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def old_verifier(request_id):
    """The derivation from the request id alone (HKDF-SHA256, as before issue 20)."""
    prk = hmac.new(b"outline-mcp-proxy grant key v1", request_id.encode(), hashlib.sha256).digest()
    return b64url(hmac.new(prk, b"outline pkce verifier\x01", hashlib.sha256).digest())


def test_the_verifier_sent_to_outline_is_keyed_by_a_secret(stateful_proxy, outline):
    """Outline's sign-in, scripted, with a restart between the trip to Outline and the
    callback: the key is in the state directory (0600), kept across the restart, and
    the verifier Outline receives is not what the request id alone gives."""
    carol = outline.add_user("carol")
    port = free_port()
    app_id, app_secret = outline.add_oauth_client(f"http://127.0.0.1:{port}/oauth/callback")
    proxy = stateful_proxy(listen=f"127.0.0.1:{port}", OUTLINE_OAUTH_CLIENT_ID=app_id,
                           OUTLINE_OAUTH_CLIENT_SECRET=app_secret)
    key_file = proxy.state_dir / "oauth-signin.key"
    outline.sign_in_as(carol)
    client_id = register(proxy.url, REDIRECT)
    verifier, challenge = pkce_pair()
    with httpx.Client(timeout=30) as browser_like:
        page = browser_like.get(proxy.url + "/oauth/authorize",
                                params=authorize_params(proxy.url, client_id, REDIRECT, challenge))
        form = consent_form(page.text)
        request_id = form["request"]
        to_outline = browser_like.post(proxy.url + "/oauth/authorize", data={**form, "action": "allow"})
        assert to_outline.status_code == 303
        assert key_file.exists() and (key_file.stat().st_mode & 0o777) == 0o600
        key = key_file.read_bytes()
        assert len(key) == 32
        outline_query = {k: v[0] for k, v in parse_qs(urlsplit(to_outline.headers["location"]).query).items()}
        assert request_id not in key.hex() and b64url(key) not in to_outline.headers["location"]
        back = browser_like.post(f"http://127.0.0.1:{outline.port}/oauth/authorize", data=outline_query)
        assert back.status_code == 302
        proxy.restart()  # the sign-in in progress and the key outlive it
        to_client = browser_like.get(back.headers["location"])
        assert to_client.status_code == 303, to_client.text
        code = parse_qs(urlsplit(to_client.headers["location"]).query)["code"][0]
    assert exchange(proxy.url, client_id, REDIRECT, code, verifier).status_code == 200
    assert key_file.read_bytes() == key
    sent = outline.oauth_verifiers[-1]
    assert sent != old_verifier(request_id)
    assert sent == b64url(hmac.new(key, request_id.encode(), hashlib.sha256).digest())
    assert outline_query["code_challenge"] == b64url(hashlib.sha256(sent.encode()).digest())
    assert b64url(key) not in proxy.log() and key.hex() not in proxy.log()
