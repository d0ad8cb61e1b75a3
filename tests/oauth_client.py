"""What an OAuth MCP client brings along in the tests: the official SDK's
OAuthClientProvider with in-memory storage, a loopback redirect listener (as desktop
clients run, RFC 8252), a headless Chromium driven the way a person uses the sign-in
page, an HTTPS server for client metadata documents, and a scripted (no-browser) flow
for the hostile tests."""

import base64
import hashlib
import html
import json
import re
import secrets
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import pytest
from mcp import ClientSession
from mcp.client.auth import OAuthClientProvider, TokenStorage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientMetadata

from conftest import wait_for

OAUTH_PATH = "/oauth/mcp"


class MemoryStorage(TokenStorage):
    def __init__(self):
        self.tokens = None
        self.client_info = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client_info

    async def set_client_info(self, client_info):
        self.client_info = client_info


class LoopbackRedirect:
    """http://127.0.0.1:<port>/callback, as a desktop client listens for the redirect."""

    def __init__(self):
        self.received = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if urlsplit(self.path).path == "/callback":  # not the browser's /favicon.ico
                    outer.received.append(parse_qs(urlsplit(self.path).query))
                body = b"<html><body><h1 id='done'>You can close this window.</h1></body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/callback"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count=1, timeout=30):
        wait_for(lambda: len(self.received) >= count, timeout=timeout, what="the redirect to the client")
        got = self.received[count - 1]
        return {k: v[0] for k, v in got.items()}

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Browser:
    """Headless Chromium (Debian's chromium and chromium-driver) through WebDriver."""

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
            options.add_argument(arg)
        options.set_capability("acceptInsecureCerts", True)  # nginx's self-signed certificate
        self.driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        self.visited = []

    def open(self, url):
        self.visited.append(url)
        self.driver.get(url)

    def text(self):
        """The page's text; empty while a navigation replaces the page."""
        from selenium.common.exceptions import (NoSuchElementException, StaleElementReferenceException,
                                                WebDriverException)

        try:
            return self.driver.find_element("tag name", "body").text
        except (StaleElementReferenceException, NoSuchElementException):
            return ""
        except WebDriverException as e:
            # chromedriver 156 reports a body replaced between the find and the read as an
            # inspector error, not as a stale element
            if "does not belong to the document" in str(e):
                return ""
            raise

    def wait_text(self, needle, timeout=20):
        return wait_for(lambda: needle in self.text(), timeout=timeout, what=f"{needle!r} on the page")

    def type_into(self, element_id, text):
        self.driver.find_element("id", element_id).send_keys(text)

    def click(self, css):
        self.driver.find_element("css selector", css).click()

    def quit(self):
        self.driver.quit()


@pytest.fixture()
def browser():
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.fail("chromium and chromium-driver are needed (apt-get install chromium chromium-driver)",
                    pytrace=False)
    b = Browser()
    yield b
    b.quit()


@pytest.fixture()
def loopback():
    r = LoopbackRedirect()
    yield r
    r.stop()


def paste_key_person(browser, loopback, key, expect_client=None):
    """The SDK's redirect and callback handlers, played by a person with a browser:
    the sign-in page is opened, read, the key typed and Connect pressed."""
    seen = {"pages": 0}

    async def redirect_handler(url):
        def person():
            seen["pages"] += 1
            browser.open(url)
            browser.wait_text("Connect")
            if expect_client:
                assert expect_client in browser.text()
            seen["page_text"] = browser.text()
            browser.type_into("api_key", key)
            browser.click("button[value=allow]")
            browser.wait_text("You can close this window")

        await anyio.to_thread.run_sync(person)

    async def callback_handler():
        got = loopback.wait(len(loopback.received))
        return got.get("code"), got.get("state")

    return redirect_handler, callback_handler, seen


def provider_for(url, storage, redirect_uri, redirect_handler, callback_handler, metadata_url=None,
                 auth_method="none"):
    """The SDK's OAuth client; auth_method="client_secret_post" is the SDK's own default
    (a client that registers as confidential and sends its secret)."""
    metadata = OAuthClientMetadata(
        client_name="Test Desktop Client",
        redirect_uris=[redirect_uri],
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method=auth_method,
    )
    return OAuthClientProvider(
        server_url=url + OAUTH_PATH,
        client_metadata=metadata,
        storage=storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
        client_metadata_url=metadata_url,
    )


async def oauth_use(url, provider, verify=True, steps=()):
    """One SDK session at the OAuth resource: initialize, then list tools and search
    (from test_e2e_mcp.use_session) before and after each step."""
    from test_e2e_mcp import use_session

    results = []
    async with httpx.AsyncClient(auth=provider, verify=verify, timeout=httpx.Timeout(60, read=300)) as client:
        async with streamable_http_client(url + OAUTH_PATH, http_client=client) as (read, write, get_id):
            async with ClientSession(read, write) as session:
                await session.initialize()
                results.append(await use_session(session, get_id))
                for step in steps:
                    await anyio.to_thread.run_sync(step)
                    results.append(await use_session(session, get_id))
    return results


def make_ca_and_cert(directory, host="localhost"):
    """A test CA and a server certificate it signed, for an HTTPS document server the
    proxy trusts through SSL_CERT_FILE (how an operator adds a company CA)."""
    d = directory
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}",
        "-keyout", str(d / "doc.key"), "-out", str(d / "doc.csr"))
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{host}\n")
    run("openssl", "x509", "-req", "-in", str(d / "doc.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
        "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext.cnf"), "-out", str(d / "doc.crt"))
    return d / "ca.crt", d / "doc.crt", d / "doc.key"


class DocumentServer:
    """HTTPS server of client metadata documents, good and hostile."""

    def __init__(self, directory):
        self.ca, crt, key = make_ca_and_cert(directory)
        self.documents = {}  # path -> dict (served as JSON)
        self.fetches = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.fetches.append(self.path)
                if self.path == "/huge.json":
                    body = json.dumps({"client_id": outer.url("/huge.json"), "redirect_uris": ["https://x.example/cb"],
                                       "client_name": "x" * 20000}).encode()
                elif self.path == "/slow.json":
                    time.sleep(12)
                    body = b"{}"
                elif self.path == "/redirect.json":
                    self.send_response(302)
                    self.send_header("Location", outer.url("/client.json"))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                elif self.path in outer.documents:
                    body = json.dumps(outer.documents[self.path]).encode()
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(crt), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"https://localhost:{self.port}{path}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# --- the flow without a browser, for the hostile tests ---

def pkce_pair():
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def register(url, redirect_uri, name="Scripted client", **kw):
    r = httpx.post(url + "/oauth/register", json={"client_name": name, "redirect_uris": [redirect_uri],
                                                   "token_endpoint_auth_method": "none"}, **kw)
    assert r.status_code == 201, r.text
    return r.json()["client_id"]


def authorize_params(url, client_id, redirect_uri, challenge, state="st-1", resource=None):
    return {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
            "code_challenge": challenge, "code_challenge_method": "S256", "state": state,
            "resource": resource or url + OAUTH_PATH, "scope": "mcp"}


def consent_form(page_html):
    """The hidden fields of the consent page."""
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page_html))
    return {k: html.unescape(v) for k, v in fields.items()}


def scripted_code(url, client_id, redirect_uri, key, challenge, state="st-1", headers=None, verify=True):
    """GET the consent page, POST the key with its cookie: the code from the redirect."""
    with httpx.Client(base_url=url, timeout=30, headers=headers or {}, verify=verify) as c:
        page = c.get("/oauth/authorize", params=authorize_params(url, client_id, redirect_uri, challenge, state))
        assert page.status_code == 200, page.text
        form = consent_form(page.text)
        answer = c.post("/oauth/authorize", data={**form, "api_key": key, "action": "allow"},
                        headers={"Origin": url})
        assert answer.status_code == 303, answer.text
        query = parse_qs(urlsplit(answer.headers["location"]).query)
        assert query["state"] == [state]
        return query["code"][0]


def exchange(url, client_id, redirect_uri, code, verifier, verify=True, **extra):
    data = {"grant_type": "authorization_code", "code": code, "client_id": client_id,
            "redirect_uri": redirect_uri, "code_verifier": verifier, "resource": url + OAUTH_PATH, **extra}
    return httpx.post(url + "/oauth/token", data=data, timeout=30, verify=verify)


def refresh(url, client_id, refresh_token):
    return httpx.post(url + "/oauth/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token,
                                                  "client_id": client_id, "resource": url + OAUTH_PATH}, timeout=30)


def scripted_tokens(url, key, redirect_uri="http://127.0.0.1:9/callback", verify=True):
    """A registered client's tokens for the user of `key`: (client_id, token JSON)."""
    client_id = register(url, redirect_uri, verify=verify)
    verifier, challenge = pkce_pair()
    code = scripted_code(url, client_id, redirect_uri, key, challenge, verify=verify)
    r = exchange(url, client_id, redirect_uri, code, verifier, verify=verify)
    assert r.status_code == 200, r.text
    return client_id, r.json()


def mcp_initialize(url, access_token, host=None, verify=True):
    headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json", "MCP-Protocol-Version": "2025-06-18"}
    if host:
        headers["Host"] = host
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}}
    return httpx.post(url + OAUTH_PATH, json=body, headers=headers, timeout=60, verify=verify)
