#!/usr/bin/env python3
"""A token server for distribution's `auth: token`, for tests/tests/tokens.rs.

It issues RS256 JWTs with an `x5c` header (the signing certificate, which the registry
trusts through `rootcertbundle`), granting each requested `repository:NAME:ACTIONS` scope
only the actions the user's grants in USERS (JSON: {"user": {"password": "...",
"grants": {"repo": ["pull", "push"]}}}) allow; an anonymous request gets nothing. Each
request adds one JSON line to LOG: the peer address, whether it carried the right password,
the user and the scopes asked for and granted. Never a password or a token.

    token_server.py PORT TLS_CERT TLS_KEY SIGNING_KEY SIGNING_CERT USERS LOG ISSUER EXPIRES_IN
"""

import base64
import json
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

(PORT, TLS_CERT, TLS_KEY, SIGNING_KEY, SIGNING_CERT, USERS, LOG, ISSUER, EXPIRES_IN) = sys.argv[1:10]

with open(SIGNING_KEY, "rb") as f:
    KEY = serialization.load_pem_private_key(f.read(), password=None)
with open(SIGNING_CERT, "rb") as f:
    CERT_DER = x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)
LOCK = threading.Lock()


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims):
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(CERT_DER).decode()]}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = KEY.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        """The OAuth2 refresh-token grant: the user whose refresh_token the form names."""
        with open(USERS) as f:
            users = json.load(f)
        length = int(self.headers.get("Content-Length", "0"))
        form = parse_qs(self.rfile.read(min(length, 65536)).decode())
        refresh = form.get("refresh_token", [""])[0]
        user = next((u for u, e in users.items() if refresh and e.get("refresh_token") == refresh), None)
        if form.get("grant_type") != ["refresh_token"] or user is None:
            self.answer(401, {"error": "invalid_grant"})
            self.log(None, False, form, [], "refresh_token")
            return
        access = self.grant(users[user]["grants"], form)
        token = self.issue(user, form, access)
        self.answer(200, {"access_token": token, "expires_in": int(EXPIRES_IN)})
        self.log(user, True, form, access, "refresh_token")

    def do_GET(self):
        with open(USERS) as f:
            users = json.load(f)
        query = parse_qs(urlparse(self.path).query)
        user, password_ok = None, False
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            entry = users.get(name)
            if entry is None or entry["password"] != password:
                self.answer(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                self.log(name, False, query, [])
                return
            user, password_ok = name, True
        access = self.grant(users[user]["grants"] if user else {}, query)
        token = self.issue(user, query, access)
        self.answer(200, {"token": token, "access_token": token, "expires_in": int(EXPIRES_IN)})
        self.log(user, password_ok, query, access, "basic" if user else "anonymous")

    def grant(self, grants, query):
        access = []
        for scope in (s for q in query.get("scope", []) for s in q.split(" ")):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = [a for a in actions.split(",") if a in grants.get(name, [])]
            if kind == "repository" and allowed:
                access.append({"type": "repository", "name": name, "actions": allowed})
        return access

    def issue(self, user, query, access):
        now = int(time.time())
        return jwt({
            "iss": ISSUER,
            "sub": user or "",
            "aud": query.get("service", [""])[0],
            "exp": now + int(EXPIRES_IN),
            "nbf": now - 1,
            "iat": now,
            "jti": str(uuid.uuid4()),
            "access": access,
        })

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log(self, user, password_ok, query, access, how="basic"):
        line = {
            "peer": self.client_address[0],
            "how": how,
            "password": password_ok,
            "user": user,
            "asked": query.get("scope", []),
            "granted": access,
        }
        with LOCK, open(LOG, "a") as f:
            f.write(json.dumps(line) + "\n")


server = ThreadingHTTPServer(("127.0.0.1", int(PORT)), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(TLS_CERT, TLS_KEY)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
