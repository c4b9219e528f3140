#!/usr/bin/env python3
"""A small fake of the two ECR token APIs, for what moto lacks: ECR Public, tokens that
expire in the future, refresh-ahead, throttling and failures on demand, and a call counter.

It speaks the AWS JSON 1.1 protocol on 127.0.0.1 (plain HTTP, for AWS_ENDPOINT_URL):
  POST /  X-Amz-Target: AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken
  POST /  X-Amz-Target: SpencerFrontendService.GetAuthorizationToken   (ECR Public)
Control (JSON):
  POST /control  {"password": "pw-{n}", "life": 43200, "delay": 0, "throttle": 0, "fail": false}
                 password may hold {n}, the call number; throttle = how many next calls are
                 throttled (-1: all); fail = answer ServerException
  GET  /calls    {"private": N, "public": N}
With --tls CERT KEY it also answers HTTP CONNECT (as an HTTPS_PROXY) by speaking TLS with
CERT on the tunnel, so clients that ignore AWS_ENDPOINT_URL (docker-credential-ecr-login 0.6.0)
reach it through HTTPS_PROXY and AWS_CA_BUNDLE.
Signatures are not checked. Usage: fake_ecr.py PORT_FILE [--tls CERT KEY]
"""

import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"password": "fake-ecr-token-{n}", "life": 43200, "delay": 0.0, "throttle": 0, "fail": False}
CALLS = {"private": 0, "public": 0}
LOCK = threading.Lock()

PRIVATE = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"
PUBLIC = "SpencerFrontendService.GetAuthorizationToken"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: the test reads the counters instead
        pass

    def reply(self, status, body, error_type=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        if error_type:
            self.send_header("x-amzn-ErrorType", error_type)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def do_CONNECT(self):
        if TLS is None:
            self.reply(405, {"message": "no CONNECT without --tls"})
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.connection = TLS.wrap_socket(self.connection, server_side=True)
        self.rfile = self.connection.makefile("rb")
        self.wfile = self.connection.makefile("wb")
        self.close_connection = False
        self.handle()
        self.close_connection = True

    def do_GET(self):
        if self.path == "/calls":
            with LOCK:
                self.reply(200, dict(CALLS))
        else:
            self.reply(404, {"message": "no such path"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/control":
            with LOCK:
                STATE.update(json.loads(body or b"{}"))
            self.reply(200, {"ok": True})
            return
        target = self.headers.get("X-Amz-Target", "")
        if target not in (PRIVATE, PUBLIC):
            self.reply(400, {"__type": "UnknownOperationException", "message": target}, "UnknownOperationException")
            return
        kind = "private" if target == PRIVATE else "public"
        with LOCK:
            CALLS[kind] += 1
            n = CALLS["private"] + CALLS["public"]
            state = dict(STATE)
            throttled = state["throttle"] != 0
            if state["throttle"] > 0:
                STATE["throttle"] -= 1
        if state["delay"]:
            time.sleep(state["delay"])
        if throttled:
            self.reply(400, {"__type": "ThrottlingException", "message": "Rate exceeded"}, "ThrottlingException")
            return
        if state["fail"]:
            self.reply(500, {"__type": "ServerException", "message": "internal failure"}, "ServerException")
            return
        token = base64.b64encode(("AWS:" + state["password"].replace("{n}", str(n))).encode()).decode()
        data = {"authorizationToken": token, "expiresAt": time.time() + state["life"]}
        if kind == "private":
            # The registry the token is for, as real ECR names it (clients may check it).
            try:
                account = (json.loads(body or b"{}").get("registryIds") or ["123456789012"])[0]
            except ValueError:
                account = "123456789012"
            host = self.headers.get("Host", "")
            region = host.split(".")[2] if host.startswith("api.ecr.") else "us-west-2"
            data["proxyEndpoint"] = f"https://{account}.dkr.ecr.{region}.amazonaws.com"
            self.reply(200, {"authorizationData": [data]})
        else:
            self.reply(200, {"authorizationData": data})


TLS = None


def main():
    global TLS
    if len(sys.argv) == 5 and sys.argv[2] == "--tls":
        import ssl

        TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        TLS.load_cert_chain(sys.argv[3], sys.argv[4])
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os

    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
