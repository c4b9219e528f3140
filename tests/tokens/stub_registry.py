#!/usr/bin/env python3
"""A registry that only challenges, for tests/tests/tokens.rs: every request is answered 401
with `WWW-Authenticate: CHALLENGE` over TLS (a realm that hangs, or a header far too large).

    stub_registry.py PORT TLS_CERT TLS_KEY CHALLENGE_FILE
"""
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, TLS_CERT, TLS_KEY, CHALLENGE_FILE = sys.argv[1:5]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with open(CHALLENGE_FILE) as f:
            challenge = f.read().strip()
        self.send_response(401)
        self.send_header("WWW-Authenticate", challenge)
        self.send_header("Content-Length", "0")
        self.end_headers()


server = ThreadingHTTPServer(("127.0.0.1", int(PORT)), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(TLS_CERT, TLS_KEY)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
