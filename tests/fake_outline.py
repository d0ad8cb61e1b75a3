"""A fake Outline API: the only stand-in in the tests.

It answers what the proxy and mcp-outline call, shaped like Outline's answers:
  POST /api/auth.info         the key's user, or 401 authentication_required
  POST /api/documents.search  the user's documents matching "query"
  POST /api/documents.info    one of the user's documents by "id" (404 not_found else)
  POST /api/documents.update  "id", and "text" (replaced, or appended with "append": true)
                              and "title": the document as it now is (server/routes/api/
                              documents: {data: presentDocument, policies}); tests read
                              what was saved in `updates`
  POST /api/collections.list  the user's collections
  HEAD /  and  GET /          200 (mcp-outline's /ready probes the base URL)
and Outline's OAuth provider (server/routes/oauth, @node-oauth/oauth2-server):
  GET  /oauth/authorize       the consent page of the signed-in user (Outline's app page)
  POST /oauth/authorize       consent given: 302 to the registered redirect_uri with code
                              and state (state required; PKCE S256 when a challenge came)
  POST /oauth/token           authorization_code / refresh_token, the client's secret in
                              the body or Basic; access tokens (ol_at_) of expires_in
                              seconds, refresh tokens (ol_rt_) rotated on use (the old
                              pair dies); errors as Outline words them: 400
                              invalid_request "Invalid grant: ...", 401 invalid_client
  POST /oauth/revoke          the token (access or refresh) and its pair die; always 200
An OAuth access token is accepted by the API as a Bearer token, like an API key.
Each user's data differs (titles carry the user's name), so a test can tell whose
container answered. Tests register users, count calls, and can make it slow or down.
"""

import base64
import hashlib
import html
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit


class FakeOutline:
    def __init__(self, host="0.0.0.0", port=0, tls=None):
        self.users = {}  # key -> user dict
        self.calls = {}  # endpoint -> count
        self.keys_seen = []  # the keys each auth.info call carried (to count per key)
        self.updates = []  # (document id, text) of each documents.update, in order
        self.delay = 0.0  # seconds before answering
        self.status_override = None  # e.g. 500 to make it fail
        self.team_id = "team-1"
        self.lock = threading.Lock()
        self.oauth_clients = {}  # client_id -> {"secret", "redirect_uris"}
        self.oauth_codes = {}  # code -> {client_id, redirect_uri, user_key, challenge, expires}
        self.oauth_tokens = {}  # access or refresh token -> the pair's record
        self.oauth_verifiers = []  # the code_verifier of each code exchange at /oauth/token
        self.oauth_access_ttl = 3600  # seconds; tests shorten it to see renewals
        self.oauth_refresh_delay = 0.0  # seconds a refresh_token grant takes (to overlap two)
        self.oauth_refreshes = []  # each refresh_token grant asked: (refresh token, answer status)
        self.signed_in_key = None  # the browser's Outline session: whose consent page
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self._send(200, {"ok": True})

            def do_GET(self):
                if self.path.startswith("/oauth/authorize"):
                    return self._send_page(*outer.consent_page(self.path))
                self._send(200, {"ok": True})

            def _send_page(self, status, text, location=None):
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                if location:
                    self.send_header("Location", location)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                endpoint = self.path.split("?")[0]
                if endpoint.startswith("/oauth/"):
                    with outer.lock:
                        outer.calls[endpoint] = outer.calls.get(endpoint, 0) + 1
                    if outer.status_override:
                        return self._send(outer.status_override, {"error": "server_error"})
                    form = outer.parse_body(self.headers.get("Content-Type", ""), raw)
                    if endpoint == "/oauth/authorize":
                        return self._send_page(*outer.authorize(form))
                    if endpoint == "/oauth/token":
                        return self._send(*outer.token(form, self.headers.get("Authorization", "")))
                    if endpoint == "/oauth/revoke":
                        return self._send(*outer.revoke(form))
                try:
                    args = json.loads(raw or b"{}")
                except ValueError:
                    args = {}
                endpoint = self.path.split("?")[0]
                with outer.lock:
                    outer.calls[endpoint] = outer.calls.get(endpoint, 0) + 1
                if outer.delay:
                    time.sleep(outer.delay)
                if outer.status_override:
                    return self._send(outer.status_override, {"ok": False, "error": "internal_error"})
                auth = self.headers.get("Authorization", "")
                key = auth[7:] if auth.lower().startswith("bearer ") else ""
                if endpoint == "/api/auth.info":
                    with outer.lock:
                        outer.keys_seen.append(key)
                user = outer.users.get(key) if outer.auth_ok(key) else None
                if user is None:
                    return self._send(
                        401,
                        {"ok": False, "error": "authentication_required", "status": 401,
                         "message": "Authentication required"},
                    )
                answer = outer.answer(endpoint, user, args)
                self._send(answer.get("status", 200), answer)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        if tls:  # (certificate file, key file): serve HTTPS
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def add_user(self, name, display_name=None):
        """Registers a user (shown as display_name, else the name capitalised); returns
        its fresh API key."""
        key = f"ol_api_{name}_{secrets.token_hex(16)}"
        uid = secrets.token_hex(8)
        self.users[key] = {
            "id": uid,
            "name": display_name if display_name is not None else name.capitalize(),
            "email": f"{name}@example.com",
            "documents": [
                {"id": f"doc-{name}-{i}", "title": f"{name.capitalize()}'s note {i}",
                 "text": f"Private text of {name}, number {i}.", "collectionId": f"col-{name}"}
                for i in range(2)
            ],
            "collections": [{"id": f"col-{name}", "name": f"{name.capitalize()}'s collection",
                             "description": "", "color": "#4E5C6E"}],
        }
        return key

    def add_key(self, key):
        """Another API key of the user who has `key` (Outline users make keys freely)."""
        user = self.users[key]
        new = f"ol_api_{user['email'].split('@')[0]}_{secrets.token_hex(16)}"
        self.users[new] = user
        return new

    # --- Outline as an OAuth provider ---

    def add_oauth_client(self, redirect_uri):
        """An OAuth app an admin made in Outline's settings: (client_id, client_secret)."""
        client_id = secrets.token_hex(10)
        secret = f"ol_sk_{secrets.token_hex(16)}"
        self.oauth_clients[client_id] = {"secret": secret, "redirect_uris": [redirect_uri]}
        return client_id, secret

    def sign_in_as(self, key):
        """The browser's Outline session belongs to the user who has `key`."""
        self.signed_in_key = key

    def revoke_user(self, key):
        """The user's key, and every OAuth token of theirs, stop working (an admin
        revoked them, or the user was suspended)."""
        user = self.users.pop(key, None)
        for token in [t for t, u in self.users.items() if u is user]:
            del self.users[token]

    @staticmethod
    def parse_body(content_type, raw):
        if "json" in content_type:
            try:
                return {k: str(v) for k, v in json.loads(raw or b"{}").items()}
            except (ValueError, AttributeError):
                return {}
        return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))

    @staticmethod
    def oauth_error(status, error, description):
        return status, {"error": error, "error_description": description}

    def consent_page(self, path):
        query = dict(parse_qsl(urlsplit(path).query, keep_blank_values=True))
        client = self.oauth_clients.get(query.get("client_id", ""))
        if self.signed_in_key not in self.users:
            return 200, "<html><body><h1>Sign in to Outline</h1></body></html>"
        if client is None:
            return 400, "<html><body><h1>Unknown application</h1></body></html>"
        user = self.users[self.signed_in_key]
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in query.items())
        return 200, (
            "<html><body><h1>Outline</h1>"
            f"<p id=\"who\">Signed in as {html.escape(user['name'])}</p>"
            f'<form method="post" action="/oauth/authorize">{hidden}'
            '<button id="authorize" type="submit">Authorize</button></form></body></html>')

    def authorize(self, form):
        """Outline's POST /oauth/authorize: the signed-in user consents."""
        client = self.oauth_clients.get(form.get("client_id", ""))
        if self.signed_in_key not in self.users:
            return 401, "authentication required"
        if client is None or form.get("redirect_uri") not in client["redirect_uris"]:
            return 400, "Invalid client or redirect_uri"
        if not form.get("state"):
            return 400, "Missing parameter: `state`"
        if form.get("response_type") != "code":
            return 400, "Unsupported response type"
        code = secrets.token_hex(16)
        self.oauth_codes[code] = {
            "client_id": form["client_id"], "redirect_uri": form["redirect_uri"],
            "user_key": self.signed_in_key, "challenge": form.get("code_challenge"),
            "method": form.get("code_challenge_method"), "expires": time.time() + 300}
        sep = "&" if "?" in form["redirect_uri"] else "?"
        location = form["redirect_uri"] + sep + urlencode({"code": code, "state": form["state"]})
        return 302, "", location

    def _client_auth(self, form, authorization):
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if authorization.lower().startswith("basic "):
            decoded = base64.b64decode(authorization[6:]).decode()
            client_id, _, secret = decoded.partition(":")
        client = self.oauth_clients.get(client_id or "")
        if client is None or not secret or not secrets.compare_digest(client["secret"], secret):
            return None
        return client_id

    def _issue(self, client_id, user_key):
        user = self.users[user_key]
        access, refresh = f"ol_at_{secrets.token_hex(20)}", f"ol_rt_{secrets.token_hex(20)}"
        record = {"client_id": client_id, "access": access, "refresh": refresh, "user_key": user_key,
                  "expires": time.time() + self.oauth_access_ttl}
        self.oauth_tokens[access] = self.oauth_tokens[refresh] = record
        self.users[access] = user
        return 200, {"access_token": access, "refresh_token": refresh, "expires_in": self.oauth_access_ttl,
                     "token_type": "Bearer", "scope": "read write"}

    def _destroy(self, record):
        self.oauth_tokens.pop(record["access"], None)
        self.oauth_tokens.pop(record["refresh"], None)
        self.users.pop(record["access"], None)

    def token(self, form, authorization):
        with self.lock:
            client_id = self._client_auth(form, authorization)
            if client_id is None:
                return self.oauth_error(401, "invalid_client", "Invalid client: client is invalid")
            grant = form.get("grant_type")
            if grant == "authorization_code":
                code = self.oauth_codes.pop(form.get("code", ""), None)
                if code is None or code["expires"] < time.time() or code["client_id"] != client_id:
                    return self.oauth_error(400, "invalid_request", "Invalid grant: authorization code is invalid")
                if form.get("redirect_uri") != code["redirect_uri"]:
                    return self.oauth_error(400, "invalid_request", "Invalid request: `redirect_uri` is invalid")
                self.oauth_verifiers.append(form.get("code_verifier", ""))
                if code["challenge"]:
                    verifier = form.get("code_verifier", "")
                    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
                    if digest.decode() != code["challenge"]:
                        return self.oauth_error(400, "invalid_request", "Invalid grant: code verifier is invalid")
                if code["user_key"] not in self.users:
                    return self.oauth_error(400, "invalid_request", "Invalid grant: user is invalid")
                return self._issue(client_id, code["user_key"])
            if grant == "refresh_token":
                if self.oauth_refresh_delay:
                    self.lock.release()
                    try:
                        time.sleep(self.oauth_refresh_delay)
                    finally:
                        self.lock.acquire()
                answer = self._refresh(client_id, form)
                self.oauth_refreshes.append((form.get("refresh_token", ""), answer[0]))
                return answer
            return self.oauth_error(400, "invalid_request", "Unsupported grant type: `grant_type` is invalid")

    def _refresh(self, client_id, form):
        """Outline rotates refresh tokens: the used one is destroyed with its pair (its
        revokeToken), so presented again it is unknown: 400 "Invalid grant"."""
        record = self.oauth_tokens.get(form.get("refresh_token", ""))
        if record is None or record["refresh"] != form.get("refresh_token") \
                or record["client_id"] != client_id or record["user_key"] not in self.users:
            return self.oauth_error(400, "invalid_request", "Invalid grant: refresh token is invalid")
        self._destroy(record)
        return self._issue(client_id, record["user_key"])

    def revoke(self, form):
        with self.lock:
            record = self.oauth_tokens.get(form.get("token", ""))
            if record is not None:
                self._destroy(record)
        return 200, {"success": True}

    def auth_ok(self, token):
        """Whether the API accepts this credential now (an OAuth token may have expired)."""
        record = self.oauth_tokens.get(token)
        if record is not None and record["access"] == token and record["expires"] < time.time():
            return False
        return token in self.users

    def count(self, endpoint):
        with self.lock:
            return self.calls.get(endpoint, 0)

    def auth_calls_for(self, key):
        with self.lock:
            return sum(1 for k in self.keys_seen if k == key)

    def answer(self, endpoint, user, args):
        public = {k: user[k] for k in ("id", "name", "email")}
        if endpoint == "/api/auth.info":
            return {"ok": True, "status": 200,
                    "data": {"user": public, "team": {"id": self.team_id, "name": "Test team"}}}
        if endpoint == "/api/documents.search":
            query = str(args.get("query", "")).lower()
            hits = [d for d in user["documents"] if query in (d["title"] + d["text"]).lower()]
            data = [{"ranking": 1.0, "context": d["text"], "document": dict(d, url=f"/doc/{d['id']}")}
                    for d in hits]
            return {"ok": True, "status": 200, "data": data,
                    "pagination": {"limit": 25, "offset": 0}}
        if endpoint in ("/api/documents.info", "/api/documents.update"):
            doc = next((d for d in user["documents"] if d["id"] == args.get("id")), None)
            if doc is None:
                return {"ok": False, "status": 404, "error": "not_found", "message": "Resource not found"}
            if endpoint == "/api/documents.update":
                with self.lock:
                    if "title" in args:
                        doc["title"] = str(args["title"])
                    if "text" in args:
                        text = str(args["text"])
                        doc["text"] = doc["text"] + "\n\n" + text if args.get("append") else text
                    doc["updatedAt"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
                    self.updates.append((doc["id"], doc["text"]))
            return {"ok": True, "status": 200, "data": dict(doc, url=f"/doc/{doc['id']}"),
                    "policies": [{"id": doc["id"], "abilities": {"read": True, "update": True}}]}
        if endpoint == "/api/collections.list":
            return {"ok": True, "status": 200, "data": user["collections"],
                    "pagination": {"limit": 25, "offset": 0}}
        return {"ok": True, "status": 200, "data": [], "pagination": {"limit": 25, "offset": 0}}


if __name__ == "__main__":
    import sys

    fake = FakeOutline(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8099).start()
    print(f"fake Outline on :{fake.port}; demo key: {fake.add_user('demo')}", flush=True)
    fake.thread.join()
