"""A fake Outline API: the only stand-in in the tests.

It answers what the proxy and mcp-outline call, shaped like Outline's answers:
  POST /api/auth.info         the key's user, or 401 authentication_required
  POST /api/documents.search  the user's documents matching "query"
  POST /api/documents.info    one of the user's documents by "id"
  POST /api/collections.list  the user's collections
  HEAD /  and  GET /          200 (mcp-outline's /ready probes the base URL)
Each user's data differs (titles carry the user's name), so a test can tell whose
container answered. Tests register users, count calls, and can make it slow or down.
"""

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOutline:
    def __init__(self, host="0.0.0.0", port=0, tls=None):
        self.users = {}  # key -> user dict
        self.calls = {}  # endpoint -> count
        self.keys_seen = []  # the keys each auth.info call carried (to count per key)
        self.delay = 0.0  # seconds before answering
        self.status_override = None  # e.g. 500 to make it fail
        self.team_id = "team-1"
        self.lock = threading.Lock()
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
                self._send(200, {"ok": True})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
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
                user = outer.users.get(key)
                if user is None:
                    return self._send(
                        401,
                        {"ok": False, "error": "authentication_required", "status": 401,
                         "message": "Authentication required"},
                    )
                self._send(200, outer.answer(endpoint, user, args))

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
        if endpoint == "/api/documents.info":
            for d in user["documents"]:
                if d["id"] == args.get("id"):
                    return {"ok": True, "status": 200, "data": dict(d, url=f"/doc/{d['id']}")}
            return {"ok": False, "status": 404, "error": "not_found"}
        if endpoint == "/api/collections.list":
            return {"ok": True, "status": 200, "data": user["collections"],
                    "pagination": {"limit": 25, "offset": 0}}
        return {"ok": True, "status": 200, "data": [], "pagination": {"limit": 25, "offset": 0}}


if __name__ == "__main__":
    import sys

    fake = FakeOutline(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8099).start()
    print(f"fake Outline on :{fake.port}; demo key: {fake.add_user('demo')}", flush=True)
    fake.thread.join()
