"""The OAuth front door (issue 15): MCP clients that sign in from a connector dialog.

The official SDK's OAuthClientProvider discovers the proxy's authorization server from a
401, registers (client metadata document, else RFC 7591), sends a person to the sign-in
page (headless Chromium: the page read, the key typed, Connect pressed), and then uses
the real mcp-outline as that user; refresh, revocation, a proxy restart in the middle,
Outline's own OAuth sign-in, nginx over TLS. Then the hostile cases, each refused with
nothing issued."""

import concurrent.futures
import json
import os
import time
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest

from conftest import free_port, wait_for
from oauth_client import (OAUTH_PATH, DocumentServer, MemoryStorage, authorize_params, browser, consent_form,
                          exchange, loopback, mcp_initialize, oauth_use, paste_key_person, pkce_pair, provider_for,
                          refresh, register, scripted_code, scripted_tokens)
from test_e2e_mcp import assert_sees_only_own_data

__all__ = ["browser", "loopback"]  # fixtures


def state_file(proxy):
    return proxy.state_dir / "oauth-grants.json"


@pytest.fixture()
def oauth_proxy(make_proxy, tmp_path):
    """make_proxy with a state directory for the grants (the unit's StateDirectory)."""
    def factory(real=None, **settings):
        state = tmp_path / f"state-{len(list(tmp_path.glob('state-*')))}"
        state.mkdir(mode=0o700)
        settings.setdefault("state_dir", str(state))
        if real:
            settings.setdefault("image", real)
            settings.setdefault("start_timeout", "90s")
        proxy = make_proxy(**settings)
        proxy.state_dir = state
        return proxy

    return factory


def at_rest(proxy):
    """What a restart would read: the state file, then the journal's changes in order."""
    state = json.loads(state_file(proxy).read_text()) if state_file(proxy).exists() else {"clients": [], "grants": []}
    kept = {"client": {c["id"]: c for c in state["clients"]}, "grant": {g["id"]: g for g in state["grants"]}}
    journal = proxy.state_dir / "oauth-grants.journal"
    for line in (journal.read_text().splitlines() if journal.exists() else []):
        entry = json.loads(line)
        kind = entry["op"].removesuffix("_gone")
        if entry["op"].endswith("_gone"):
            kept[kind].pop(entry["id"], None)
        else:
            kept[kind][entry[kind]["id"]] = entry[kind]
    return {"clients": list(kept["client"].values()), "grants": list(kept["grant"].values())}


def assert_nothing_secret_at_rest(proxy, *secrets_):
    files = [f for f in (state_file(proxy), proxy.state_dir / "oauth-grants.journal") if f.exists()]
    text = "".join(f.read_text() for f in files)
    for secret in secrets_:
        assert secret not in text, "a secret is in the state file or its journal in the clear"
        assert secret not in proxy.log(), "a secret is in the proxy's log"
    for f in files:
        assert (f.stat().st_mode & 0o777) == 0o600


# --- discovery ---

def test_discovery_from_the_401_and_none_at_mcp_or_the_root(oauth_proxy, outline):
    proxy = oauth_proxy()
    r = proxy.post(OAUTH_PATH, json={"jsonrpc": "2.0", "id": 1, "method": "initialize"})
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    prm_url = f"{proxy.url}/.well-known/oauth-protected-resource{OAUTH_PATH}"
    assert challenge.startswith("Bearer ") and f'resource_metadata="{prm_url}"' in challenge
    assert 'scope="mcp"' in challenge

    prm = httpx.get(prm_url).json()
    assert prm["resource"] == proxy.url + OAUTH_PATH
    assert prm["authorization_servers"] == [proxy.url + "/oauth"]
    asm = httpx.get(f"{proxy.url}/.well-known/oauth-authorization-server/oauth").json()
    assert asm["issuer"] == proxy.url + "/oauth"
    assert asm["code_challenge_methods_supported"] == ["S256"]
    assert asm["client_id_metadata_document_supported"] is True
    assert asm["grant_types_supported"] == ["authorization_code", "refresh_token"]
    for endpoint in ("authorization", "token", "registration", "revocation"):
        assert asm[f"{endpoint}_endpoint"].startswith(proxy.url + "/oauth/")

    # /mcp stays a header door: its 401 points nowhere, and the root well-known paths
    # are not OAuth documents (they are proxied like any path: a key is asked for)
    r = proxy.post("/mcp", json={})
    assert r.status_code == 401 and "resource_metadata" not in r.headers.get("www-authenticate", "")
    for root in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-authorization-server"):
        r = proxy.get(root)
        assert r.status_code == 401 and "resource_metadata" not in r.headers.get("www-authenticate", "")
        assert "authorization_servers" not in r.text and "issuer" not in r.text


def test_check_reports_the_front_door_and_the_outline_app(outline, tmp_path):
    from test_proxy import run_binary

    app_id, secret = outline.add_oauth_client("https://mcp.example.com/oauth/callback")
    base = {"PATH": os.environ["PATH"], "OUTLINE_URL": f"http://127.0.0.1:{outline.port}",
            "MCP_PROXY_IMAGE": "outline-mcp-proxy-test-backend:latest", "MCP_PROXY_LISTEN": "127.0.0.1:0",
            "MCP_PROXY_PUBLIC_URL": "https://mcp.example.com", "MCP_PROXY_STATE_DIR": str(tmp_path),
            "OUTLINE_OAUTH_CLIENT_ID": app_id, "OUTLINE_OAUTH_CLIENT_SECRET": secret}
    good = run_binary("check", env=base)
    assert good.returncode == 0, good.stdout
    for line in ("✓ OAuth front door at https://mcp.example.com/oauth/mcp",
                 f"✓ OAuth grants are kept in {tmp_path}",
                 "✓ Outline accepts the OAuth app's client id and secret"):
        assert line in good.stdout, good.stdout
    assert secret not in good.stdout + good.stderr
    bad = run_binary("check", env=dict(base, OUTLINE_OAUTH_CLIENT_SECRET="ol_sk_wrong"))
    assert bad.returncode == 1 and "✗ Outline refuses the OAuth app's client id or secret" in bad.stdout
    half = run_binary("check", env=dict(base, OUTLINE_OAUTH_CLIENT_SECRET=""))
    assert half.returncode == 2 and "OUTLINE_OAUTH_CLIENT_ID" in half.stderr


def test_browser_clients_may_call_the_token_endpoints_across_origins(oauth_proxy, outline):
    proxy = oauth_proxy()
    for path in ("/oauth/token", "/oauth/register", "/oauth/revoke",
                 f"/.well-known/oauth-protected-resource{OAUTH_PATH}"):
        r = httpx.options(proxy.url + path, headers={"Origin": "https://inspector.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*", path
    # the metadata is readable from a browser page of another origin
    r = httpx.get(f"{proxy.url}/.well-known/oauth-authorization-server/oauth",
                  headers={"Origin": "https://inspector.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    # but the resource keeps the proxy's Origin rule (MCP_PROXY_ALLOWED_ORIGINS)
    r = httpx.post(proxy.url + OAUTH_PATH, json={}, headers={"Origin": "https://inspector.example"})
    assert r.status_code == 403


def test_the_front_door_can_be_renamed_or_turned_off(oauth_proxy, outline):
    renamed = oauth_proxy(oauth_path="/connect/outline")
    assert renamed.post("/connect/outline", json={}).headers["www-authenticate"].count("/connect/outline") == 1
    assert httpx.get(f"{renamed.url}/.well-known/oauth-protected-resource/connect/outline").json()["resource"] \
        == renamed.url + "/connect/outline"
    off = oauth_proxy(oauth_path="")
    r = off.get(f"/.well-known/oauth-protected-resource{OAUTH_PATH}")
    assert r.status_code == 401 and "resource_metadata" not in r.headers.get("www-authenticate", "")


# --- the SDK, a person with a browser, the real mcp-outline ---

def test_sdk_registers_and_a_person_pastes_a_key_then_works_as_that_user(
        oauth_proxy, outline, mcp_outline_image, browser, loopback):
    proxy = oauth_proxy(real=mcp_outline_image)
    carol, dave = outline.add_user("carol"), outline.add_user("dave")
    redirect, callback, seen = paste_key_person(browser, loopback, carol, expect_client="Test Desktop Client")
    storage = MemoryStorage()
    provider = provider_for(proxy.url, storage, loopback.uri, redirect, callback)
    [result] = anyio.run(oauth_use, proxy.url, provider)

    assert_sees_only_own_data(result, "carol", "dave")
    assert seen["pages"] == 1 and "127.0.0.1" in seen["page_text"]  # the redirect host is shown
    assert storage.client_info.client_id.startswith("omp_client_")  # registered by DCR
    tokens = storage.tokens
    assert tokens.access_token.startswith("omp_at_") and tokens.refresh_token.startswith("omp_rt_")
    # the same container as carol's header requests: one per user, whatever the door
    assert proxy.containers() == [proxy.container_name(carol)]
    # the key went nowhere it should not: not in a URL the browser opened, the log,
    # the state file, or the container; the proxy's tokens never reach the container
    assert not any(carol in url for url in browser.visited + [str(q) for q in loopback.received])
    assert_nothing_secret_at_rest(proxy, carol, tokens.access_token, tokens.refresh_token)
    from conftest import assert_key_kept_secret
    assert_key_kept_secret(proxy, carol)
    assert_key_kept_secret(proxy, tokens.access_token)


def test_sdk_with_a_client_metadata_document(oauth_proxy, outline, mcp_outline_image, browser, loopback, tmp_path):
    docs = DocumentServer(tmp_path)
    try:
        # the document server is on this host: allowed here (the default takes public addresses only)
        proxy = oauth_proxy(real=mcp_outline_image, SSL_CERT_FILE=str(docs.ca), oauth_client_documents="any")
        erin, frank = outline.add_user("erin"), outline.add_user("frank")
        docs.documents["/clients/desktop.json"] = {
            "client_id": docs.url("/clients/desktop.json"), "client_name": "Metadata Desktop",
            "redirect_uris": ["http://127.0.0.1/callback"],  # any loopback port will do (RFC 8252)
            "grant_types": ["authorization_code", "refresh_token"], "token_endpoint_auth_method": "none"}
        redirect, callback, seen = paste_key_person(browser, loopback, erin, expect_client="Metadata Desktop")
        storage = MemoryStorage()
        provider = provider_for(proxy.url, storage, loopback.uri, redirect, callback,
                                metadata_url=docs.url("/clients/desktop.json"))
        [result] = anyio.run(oauth_use, proxy.url, provider)
        assert_sees_only_own_data(result, "erin", "frank")
        assert storage.client_info.client_id == docs.url("/clients/desktop.json")
        assert "/clients/desktop.json" in docs.fetches
        assert "OAuth client registered" not in proxy.log()  # no registration was needed
    finally:
        docs.stop()


def test_refresh_rotation_revocation_and_a_restart_in_the_middle(
        oauth_proxy, outline, mcp_outline_image, browser, loopback):
    # the access token outlives a container's first start on a loaded machine (3-4 s seen)
    proxy = oauth_proxy(real=mcp_outline_image, oauth_access_ttl="10s", auth_ttl="0")
    carol, dave = outline.add_user("carol"), outline.add_user("dave")
    redirect, callback, seen = paste_key_person(browser, loopback, carol)
    storage = MemoryStorage()
    provider = provider_for(proxy.url, storage, loopback.uri, redirect, callback)
    issued = []

    def note_tokens():
        issued.append((storage.tokens.access_token, storage.tokens.refresh_token))

    def restart():
        note_tokens()
        proxy.restart()

    def let_the_access_token_expire():
        note_tokens()
        time.sleep(10.5)

    results = anyio.run(oauth_use, proxy.url, provider, True, [restart, let_the_access_token_expire, note_tokens])
    for result in results:
        assert_sees_only_own_data(result, "carol", "dave")
    assert len({r["session_id"] for r in results}) == 1  # one MCP session throughout
    assert seen["pages"] == 1  # the person signed in once: the restart and the expiry asked nothing
    (access_1, refresh_1), _, (access_2, refresh_2) = issued
    assert access_2 != access_1 and refresh_2 != refresh_1  # refreshed, and the refresh token rotated
    client_id = storage.client_info.client_id

    # the expired access token is refused; the new one works
    assert mcp_initialize(proxy.url, access_1).status_code == 401
    assert mcp_initialize(proxy.url, access_2).status_code == 200
    # revocation (RFC 7009) of the refresh token ends the whole grant
    r = httpx.post(proxy.url + "/oauth/revoke", data={"token": refresh_2, "client_id": client_id})
    assert r.status_code == 200
    after = mcp_initialize(proxy.url, access_2)
    assert after.status_code == 401 and 'error="invalid_token"' in after.headers["www-authenticate"]
    assert refresh(proxy.url, client_id, refresh_2).json()["error"] == "invalid_grant"


def test_a_key_revoked_in_outline_ends_the_grant(oauth_proxy, outline):
    proxy = oauth_proxy(auth_ttl="0")
    carol = outline.add_user("carol")
    client_id, tokens = scripted_tokens(proxy.url, carol)
    assert mcp_initialize(proxy.url, tokens["access_token"]).status_code == 200
    assert proxy.stats()["oauth"] == {"grants": 1, "registered_clients": 1}
    outline.revoke_user(carol)
    r = mcp_initialize(proxy.url, tokens["access_token"])
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    r = refresh(proxy.url, client_id, tokens["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert at_rest(proxy)["grants"] == []
    assert "mcp_proxy_oauth_grants 0" in proxy.get("/metrics").text


def test_a_sign_in_left_open_across_a_restart_still_works(oauth_proxy, outline):
    """A deploy while a person has the sign-in page open, and again between the
    redirect and the client's token request: neither notices."""
    proxy = oauth_proxy()
    carol = outline.add_user("carol")
    client_id = register(proxy.url, REDIRECT)
    verifier, challenge = pkce_pair()
    with httpx.Client(base_url=proxy.url, timeout=30) as person:
        page = person.get("/oauth/authorize", params=authorize_params(proxy.url, client_id, REDIRECT, challenge))
        proxy.restart()
        answer = person.post("/oauth/authorize", data={**consent_form(page.text), "api_key": carol,
                                                       "action": "allow"})
        assert answer.status_code == 303, answer.text
    code = parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]
    proxy.restart()
    assert "sign-in(s) in progress" in proxy.log()
    r = exchange(proxy.url, client_id, REDIRECT, code, verifier)
    assert r.status_code == 200, r.text
    assert mcp_initialize(proxy.url, r.json()["access_token"]).status_code == 200
    assert_nothing_secret_at_rest(proxy, carol, code)


def test_grants_survive_a_restart_sealed_and_refresh_tokens_rotate(oauth_proxy, outline):
    proxy = oauth_proxy()
    carol = outline.add_user("carol")
    client_id, tokens = scripted_tokens(proxy.url, carol)
    proxy.restart()
    echoed = mcp_initialize(proxy.url, tokens["access_token"]).json()
    # the container got carol's key, at its own /mcp, and never the proxy's token
    assert echoed["target"] == "/mcp"
    headers = {k.lower(): v for k, v in echoed["headers"]}
    assert headers["x-outline-api-key"] == carol and "authorization" not in headers
    new = refresh(proxy.url, client_id, tokens["refresh_token"]).json()
    assert new["refresh_token"] != tokens["refresh_token"] and new["expires_in"] == 3600
    assert_nothing_secret_at_rest(proxy, carol, tokens["refresh_token"], new["refresh_token"], new["access_token"])
    # an old refresh token presented again means it leaked: the grant is revoked
    replay = refresh(proxy.url, client_id, tokens["refresh_token"])
    assert replay.json()["error"] == "invalid_grant"
    assert mcp_initialize(proxy.url, new["access_token"]).status_code == 401


# --- Outline's own OAuth as the sign-in ---

def test_sign_in_with_outline_oauth_and_its_token_renewed(
        oauth_proxy, outline, mcp_outline_image, browser, loopback):
    carol, dave = outline.add_user("carol"), outline.add_user("dave")
    port = free_port()  # the Outline app's redirect URI names the proxy's address
    app_id, app_secret = outline.add_oauth_client(f"http://127.0.0.1:{port}/oauth/callback")
    outline.oauth_access_ttl = 302  # renewed by the proxy once under 300 s are left
    proxy = oauth_proxy(real=mcp_outline_image, listen=f"127.0.0.1:{port}", auth_ttl="0",
                        OUTLINE_OAUTH_CLIENT_ID=app_id, OUTLINE_OAUTH_CLIENT_SECRET=app_secret)
    outline.sign_in_as(carol)
    seen = {}

    async def redirect_handler(url):
        def person():
            browser.open(url)
            browser.wait_text("Continue with Outline")
            seen["proxy_page"] = browser.text()
            browser.click("button[value=allow]")
            browser.wait_text("Signed in as Carol")  # Outline's own consent page
            browser.click("#authorize")
            browser.wait_text("You can close this window")

        await anyio.to_thread.run_sync(person)

    async def callback_handler():
        got = loopback.wait(1)
        return got.get("code"), got.get("state")

    storage = MemoryStorage()
    provider = provider_for(proxy.url, storage, loopback.uri, redirect_handler, callback_handler)
    first_outline_tokens = {}

    def wait_for_renewal():
        first_outline_tokens.update({t: r for t, r in outline.oauth_tokens.items()})
        time.sleep(2.5)

    results = anyio.run(oauth_use, proxy.url, provider, True, [wait_for_renewal])
    for result in results:
        assert_sees_only_own_data(result, "carol", "dave")
    assert "Test Desktop Client" in seen["proxy_page"]
    assert outline.count("/oauth/token") >= 2  # the code exchange, then a renewal
    # the container now works with Outline's new token: the first one is dead at Outline
    assert not any(t in outline.oauth_tokens for t in first_outline_tokens)
    assert_nothing_secret_at_rest(proxy, app_secret, *first_outline_tokens)
    assert app_secret not in json.dumps(proxy.inspect(proxy.containers()[0]))
    # revoking at the proxy revokes at Outline too
    rt = storage.tokens.refresh_token
    httpx.post(proxy.url + "/oauth/revoke", data={"token": rt})
    assert outline.count("/oauth/revoke") == 1 and not outline.oauth_tokens


def test_outline_revoking_its_tokens_ends_the_grant(oauth_proxy, outline):
    """Outline sign-in scripted (no browser): then the user is suspended in Outline."""
    carol = outline.add_user("carol")
    port = free_port()
    app_id, app_secret = outline.add_oauth_client(f"http://127.0.0.1:{port}/oauth/callback")
    proxy = oauth_proxy(listen=f"127.0.0.1:{port}", auth_ttl="0",
                        OUTLINE_OAUTH_CLIENT_ID=app_id, OUTLINE_OAUTH_CLIENT_SECRET=app_secret)
    outline.sign_in_as(carol)
    client_id = register(proxy.url, REDIRECT)
    verifier, challenge = pkce_pair()
    with httpx.Client(timeout=30) as browser_like:
        page = browser_like.get(proxy.url + "/oauth/authorize",
                                params=authorize_params(proxy.url, client_id, REDIRECT, challenge))
        to_outline = browser_like.post(proxy.url + "/oauth/authorize",
                                       data={**consent_form(page.text), "action": "allow"})
        assert to_outline.status_code == 303
        outline_query = dict(parse_qs(urlsplit(to_outline.headers["location"]).query))
        assert outline_query["code_challenge_method"] == ["S256"] and app_secret not in to_outline.headers["location"]
        consent = {k: v[0] for k, v in outline_query.items()}
        back = browser_like.post(f"http://127.0.0.1:{outline.port}/oauth/authorize", data=consent)
        assert back.status_code == 302
        to_client = browser_like.get(back.headers["location"])
        assert to_client.status_code == 303, to_client.text
        code = parse_qs(urlsplit(to_client.headers["location"]).query)["code"][0]
    tokens = exchange(proxy.url, client_id, REDIRECT, code, verifier).json()
    echoed = mcp_initialize(proxy.url, tokens["access_token"]).json()
    forwarded = dict((k.lower(), v) for k, v in echoed["headers"])["x-outline-api-key"]
    assert forwarded.startswith("ol_at_") and forwarded in outline.oauth_tokens  # Outline's own token
    outline.revoke_user(carol)
    r = mcp_initialize(proxy.url, tokens["access_token"])
    assert r.status_code == 401 and "resource_metadata=" in r.headers["www-authenticate"]
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    r = refresh(proxy.url, client_id, tokens["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert at_rest(proxy)["grants"] == []


# --- through nginx over TLS ---

def test_the_same_through_nginx_over_tls(oauth_proxy, outline, mcp_outline_image, browser, loopback, tmp_path):
    from test_nginx import Nginx

    proxy = oauth_proxy(real=mcp_outline_image, start=False)
    nginx = Nginx(tmp_path / "n", [proxy.port])
    proxy.env["MCP_PROXY_PUBLIC_URL"] = nginx.url
    proxy.start()
    try:
        carol, dave = outline.add_user("carol"), outline.add_user("dave")
        redirect, callback, seen = paste_key_person(browser, loopback, carol)
        storage = MemoryStorage()
        # this client registers as confidential (the SDK's default) and sends its secret
        provider = provider_for(nginx.url, storage, loopback.uri, redirect, callback,
                                auth_method="client_secret_post")
        [result] = anyio.run(oauth_use, nginx.url, provider, nginx.ssl)
        assert_sees_only_own_data(result, "carol", "dave")
        assert storage.client_info.client_secret.startswith("omp_secret_")
        assert storage.client_info.client_secret not in state_file(proxy).read_text()
        assert all(url.startswith(nginx.url) for url in browser.visited)
        access_log = (nginx.dir / "access.log").read_text()
        assert "/oauth/token" in access_log and "/oauth/authorize" in access_log
        assert carol not in access_log and "omp_at_" not in access_log
    finally:
        nginx.stop()


# --- hostile ---

REDIRECT = "http://127.0.0.1:9/callback"


def test_a_wrong_verifier_or_a_reused_code_gets_nothing(oauth_proxy, outline):
    proxy = oauth_proxy()
    carol = outline.add_user("carol")
    client_id = register(proxy.url, REDIRECT)
    verifier, challenge = pkce_pair()
    code = scripted_code(proxy.url, client_id, REDIRECT, carol, challenge)
    wrong = exchange(proxy.url, client_id, REDIRECT, code, pkce_pair()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    spent = exchange(proxy.url, client_id, REDIRECT, code, verifier)  # the code died with the wrong try
    assert spent.status_code == 400 and spent.json()["error"] == "invalid_grant"

    code = scripted_code(proxy.url, client_id, REDIRECT, carol, challenge)
    first = exchange(proxy.url, client_id, REDIRECT, code, verifier)
    assert first.status_code == 200
    again = exchange(proxy.url, client_id, REDIRECT, code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # a code used twice was intercepted: what the first use got is revoked too
    assert mcp_initialize(proxy.url, first.json()["access_token"]).status_code == 401
    assert at_rest(proxy)["grants"] == []


def test_foreign_redirect_uris_and_missing_pkce_or_resource(oauth_proxy, outline):
    proxy = oauth_proxy()
    client_id = register(proxy.url, REDIRECT)
    _, challenge = pkce_pair()
    base = authorize_params(proxy.url, client_id, REDIRECT, challenge)
    # a redirect URI the client did not register gets a page, never a redirect
    for foreign in ("https://evil.example/cb", "http://127.0.0.1:9/other", "http://10.0.0.1:9/callback"):
        r = httpx.get(proxy.url + "/oauth/authorize", params={**base, "redirect_uri": foreign})
        assert r.status_code == 400 and "location" not in r.headers and "set-cookie" not in r.headers
    # the same path on another loopback port is the same desktop client (RFC 8252)
    r = httpx.get(proxy.url + "/oauth/authorize", params={**base, "redirect_uri": "http://127.0.0.1:5555/callback"})
    assert r.status_code == 200
    # registration refuses script and non-loopback http redirect URIs
    for bad in ("javascript:alert(1)", "http://evil.example/cb", "https://x.example/cb#frag"):
        r = httpx.post(proxy.url + "/oauth/register", json={"redirect_uris": [bad]})
        assert r.status_code == 400 and r.json()["error"] == "invalid_redirect_uri"
    # errors after the redirect URI is trusted go back to it, with the state
    for change, error in (({"code_challenge_method": "plain"}, "invalid_request"),
                          ({"code_challenge": ""}, "invalid_request"),
                          ({"resource": ""}, "invalid_target"),
                          ({"resource": "https://other.example/mcp"}, "invalid_target"),
                          ({"response_type": "token"}, "unsupported_response_type")):
        r = httpx.get(proxy.url + "/oauth/authorize", params={**base, **change})
        assert r.status_code == 303, change
        query = parse_qs(urlsplit(r.headers["location"]).query)
        assert query["error"] == [error] and query["state"] == ["st-1"], change
        assert "code" not in query


def test_a_confidential_client_must_show_its_secret(oauth_proxy, outline):
    proxy = oauth_proxy()
    carol = outline.add_user("carol")
    r = httpx.post(proxy.url + "/oauth/register", json={
        "client_name": "Server-side client", "redirect_uris": ["https://app.example/cb"],
        "token_endpoint_auth_method": "client_secret_basic"})
    assert r.status_code == 201
    client_id, secret = r.json()["client_id"], r.json()["client_secret"]
    assert r.json()["token_endpoint_auth_method"] == "client_secret_basic"
    assert secret not in state_file(proxy).read_text() and secret not in proxy.log()
    verifier, challenge = pkce_pair()

    def code():
        return scripted_code(proxy.url, client_id, "https://app.example/cb", carol, challenge)

    for auth in (None, (client_id, "omp_secret_wrong")):
        r = httpx.post(proxy.url + "/oauth/token", auth=auth, data={
            "grant_type": "authorization_code", "code": code(), "client_id": client_id,
            "redirect_uri": "https://app.example/cb", "code_verifier": verifier})
        assert r.status_code == 401 and r.json()["error"] == "invalid_client", auth
    r = httpx.post(proxy.url + "/oauth/token", auth=(client_id, secret), data={
        "grant_type": "authorization_code", "code": code(), "redirect_uri": "https://app.example/cb",
        "code_verifier": verifier})
    assert r.status_code == 200, r.text
    tokens = r.json()
    # its refresh and revocation need the secret too
    r = httpx.post(proxy.url + "/oauth/token", data={"grant_type": "refresh_token", "client_id": client_id,
                                                     "refresh_token": tokens["refresh_token"]})
    assert r.status_code == 401
    r = httpx.post(proxy.url + "/oauth/revoke", data={"token": tokens["access_token"], "client_id": client_id})
    assert r.status_code == 401 and mcp_initialize(proxy.url, tokens["access_token"]).status_code == 200
    r = httpx.post(proxy.url + "/oauth/revoke", auth=(client_id, secret), data={"token": tokens["access_token"]})
    assert r.status_code == 200 and mcp_initialize(proxy.url, tokens["access_token"]).status_code == 401


def test_a_token_for_one_resource_is_refused_at_another(oauth_proxy, outline):
    proxy = oauth_proxy()
    carol = outline.add_user("carol")
    _, tokens = scripted_tokens(proxy.url, carol)
    token = tokens["access_token"]
    assert mcp_initialize(proxy.url, token).status_code == 200
    # the same proxy reached as another host is another resource (RFC 8707 audience)
    r = mcp_initialize(proxy.url, token, host=f"localhost:{proxy.port}")
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    # at /mcp the proxy's token is refused without being shown to Outline
    calls = outline.count("/api/auth.info")
    r = proxy.post("/mcp", headers={"Authorization": f"Bearer {token}"}, json={})
    assert r.status_code == 401 and outline.count("/api/auth.info") == calls
    # and a code cannot be exchanged for another resource
    client_id = register(proxy.url, REDIRECT)
    verifier, challenge = pkce_pair()
    code = scripted_code(proxy.url, client_id, REDIRECT, carol, challenge)
    r = exchange(proxy.url, client_id, REDIRECT, code, verifier, resource="https://other.example/oauth/mcp")
    assert r.status_code == 400 and r.json()["error"] == "invalid_target"


def test_hostile_client_metadata_documents_are_refused(oauth_proxy, outline, tmp_path):
    docs = DocumentServer(tmp_path)
    try:
        proxy = oauth_proxy(SSL_CERT_FILE=str(docs.ca), oauth_client_documents="any")
        docs.documents["/wrong-id.json"] = {"client_id": "https://someone.else/c.json",
                                            "redirect_uris": [REDIRECT]}
        _, challenge = pkce_pair()
        for path, why in (("/huge.json", "larger than 5 KiB"), ("/redirect.json", "redirects"),
                          ("/wrong-id.json", "not its own URL"), ("/missing.json", "404"),
                          ("/slow.json", "timed out")):
            t0 = time.monotonic()
            r = httpx.get(proxy.url + "/oauth/authorize",
                          params=authorize_params(proxy.url, docs.url(path), REDIRECT, challenge), timeout=30)
            took = time.monotonic() - t0
            assert r.status_code == 400 and why in r.text, (path, r.text[:300])
            assert "set-cookie" not in r.headers and "location" not in r.headers
            assert took < 7, f"{path} held the sign-in {took:.1f}s"
        # an http (not https) client_id is not fetched at all
        r = httpx.get(proxy.url + "/oauth/authorize",
                      params=authorize_params(proxy.url, f"http://localhost:{docs.port}/c.json", REDIRECT, challenge))
        assert r.status_code == 400
        assert proxy.get("/health").status_code == 200
    finally:
        docs.stop()


def test_client_documents_come_from_public_addresses_unless_the_operator_says(oauth_proxy, outline, tmp_path):
    docs = DocumentServer(tmp_path)
    try:
        docs.documents["/c.json"] = {"client_id": docs.url("/c.json"), "redirect_uris": [REDIRECT]}
        _, challenge = pkce_pair()
        default = oauth_proxy(SSL_CERT_FILE=str(docs.ca))
        r = httpx.get(default.url + "/oauth/authorize",
                      params=authorize_params(default.url, docs.url("/c.json"), REDIRECT, challenge))
        assert r.status_code == 400 and "not at a public address" in r.text
        assert docs.fetches == []  # not even a connection was made
        off = oauth_proxy(SSL_CERT_FILE=str(docs.ca), oauth_client_documents="off")
        asm = httpx.get(f"{off.url}/.well-known/oauth-authorization-server/oauth").json()
        assert asm["client_id_metadata_document_supported"] is False
        r = httpx.get(off.url + "/oauth/authorize",
                      params=authorize_params(off.url, docs.url("/c.json"), REDIRECT, challenge))
        assert r.status_code == 400 and "must register" in r.text and docs.fetches == []
        allowed = oauth_proxy(SSL_CERT_FILE=str(docs.ca), oauth_client_documents="any")
        r = httpx.get(allowed.url + "/oauth/authorize",
                      params=authorize_params(allowed.url, docs.url("/c.json"), REDIRECT, challenge))
        assert r.status_code == 200 and docs.fetches == ["/c.json"]
    finally:
        docs.stop()


def test_a_thousand_registrations_are_rate_limited(oauth_proxy, outline):
    proxy = oauth_proxy(oauth_register_limit="20")
    body = {"client_name": "flood", "redirect_uris": [REDIRECT]}

    def one(_):
        return httpx.post(proxy.url + "/oauth/register", json=body, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(one, range(1000)))
    assert statuses.count(201) == 20 and statuses.count(429) == 980
    assert len(at_rest(proxy)["clients"]) == 20
    assert proxy.get("/health").status_code == 200


def test_the_sign_in_page_resists_csrf_and_framing(oauth_proxy, outline):
    proxy = oauth_proxy()
    carol = outline.add_user("carol")
    client_id = register(proxy.url, REDIRECT, name="<script>alert(1)</script>Evil")
    _, challenge = pkce_pair()
    with httpx.Client(base_url=proxy.url) as browser_like:
        page = browser_like.get("/oauth/authorize", params=authorize_params(proxy.url, client_id, REDIRECT, challenge))
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        assert "<script>" not in page.text and "&lt;script&gt;" in page.text  # the name is escaped
        form = consent_form(page.text)
        cookie = page.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        answer = {**form, "api_key": carol, "action": "allow"}
        # another site posting the form (its Origin), or a post without the cookie
        r = browser_like.post("/oauth/authorize", data=answer, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        r = httpx.post(proxy.url + "/oauth/authorize", data=answer)
        assert r.status_code == 403
        # a wrong key is refused on the page (not echoed), and the right one then works
        r = browser_like.post("/oauth/authorize", data={**answer, "api_key": "ol_api_wrong"})
        assert r.status_code == 400 and "does not accept" in r.text and "ol_api_wrong" not in r.text
        r = browser_like.post("/oauth/authorize", data=answer, headers={"Origin": proxy.url})
        assert r.status_code == 303 and "code=" in r.headers["location"]
    assert carol not in proxy.log()


def test_bad_token_requests_get_oauth_errors_and_the_proxy_keeps_serving(oauth_proxy, outline):
    proxy = oauth_proxy()
    cases = [
        ({}, 400, "invalid_request"),
        ({"grant_type": "password", "username": "a"}, 400, "unsupported_grant_type"),
        ({"grant_type": "authorization_code", "code": "x"}, 400, "invalid_request"),
        ({"grant_type": "refresh_token", "refresh_token": "omp_rt_nothing", "client_id": "c"}, 400, "invalid_grant"),
    ]
    for data, status, error in cases:
        r = httpx.post(proxy.url + "/oauth/token", data=data)
        assert (r.status_code, r.json()["error"]) == (status, error), data
    r = httpx.post(proxy.url + "/oauth/token", content=b"a=" + b"x" * 20000,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    r = httpx.post(proxy.url + "/oauth/register", content=b"not json")
    assert r.status_code == 400 and r.json()["error"] == "invalid_client_metadata"
    r = mcp_initialize(proxy.url, "omp_at_forged")
    assert r.status_code == 401
    assert proxy.get("/health").status_code == 200
