#!/usr/bin/env python3
"""Measures the boundary numbers of issue 11 against one build's binaries (run as root):

  * the host agent's RSS before and after N guest `get`s for distinct made-up ECR regions,
    and after N `get`s for distinct real ECR registries (tokens from tests/fake_ecr.py);
  * a legitimate `get`'s latency (median and worst of 20) alone, and while another uid holds
    M silent connections on the helper socket.

Usage: tests/measure_boundary.py BIN_DIR [N] [M]
It speaks the helper socket's protocol itself (version 1, which every build answers), so the
numbers are the agents', not process start-up's. Not a test: it asserts nothing.
"""

import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def get_call(server):
    body = varint(1) + varint(0) + varint(len(server)) + server.encode()
    return struct.pack(">I", len(body)) + body


def call(path, server):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    s.sendall(get_call(server))
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            break
        head += chunk
    s.close()
    return len(head) == 4


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_for(cond, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def latencies(path, server, n=20):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call(path, server)
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out), max(out)


def main():
    bin_dir = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    m = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    work = tempfile.mkdtemp(prefix="finch-measure-")
    os.chmod(work, 0o711)
    docker = os.path.join(work, "docker")
    os.makedirs(docker)
    with open(os.path.join(docker, "config.json"), "w") as f:
        json.dump({"auths": {"reg.example": {"auth": "dTpw"}}}, f)
    key = os.path.join(work, "link.key")
    with open(key, "wb") as f:
        f.write(bytes([7]) * 32)
    os.chmod(key, 0o600)
    open(os.path.join(work, "host.toml"), "w").close()
    port_file = os.path.join(work, "ecr.port")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "fake_ecr.py"), port_file])]
    wait_for(lambda: os.path.exists(port_file))
    port = open(port_file).read().strip()
    helper = os.path.join(work, "helper.sock")
    link = os.path.join(work, "link.sock")
    log = open(os.path.join(work, "agents.log"), "w")
    procs.append(subprocess.Popen(
        [os.path.join(bin_dir, "finch-guest-agent"), "serve", "--helper-socket", helper,
         "--link-listen", f"unix://{link}", "--link-key-file", key, "--socket-group", "nogroup"],
        stdout=log, stderr=log, env={"PATH": os.environ["PATH"], "RUST_LOG": "info"}))
    wait_for(lambda: os.path.exists(link))
    env = {
        "PATH": os.environ["PATH"], "RUST_LOG": "warn", "HOME": work,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIAFAKE",
        "AWS_SECRET_ACCESS_KEY": "fake", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.path.join(work, "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(work, "aws-credentials"),
    }
    host = subprocess.Popen(
        [os.path.join(bin_dir, "finch-host-agent"), "run", "--vm", f"m=unix://{link},key={key}",
         "--docker-config", docker, "--state-dir", os.path.join(work, "state"),
         "--config", os.path.join(work, "host.toml")],
        stdout=log, stderr=log, env=env)
    procs.append(host)
    try:
        if not wait_for(lambda: "host link up" in open(os.path.join(work, "agents.log")).read()
                        or call(helper, "reg.example")):
            sys.exit("the agents did not link: " + open(os.path.join(work, "agents.log")).read())
        call(helper, "123456789012.dkr.ecr.us-west-2.amazonaws.com")
        start = rss_kib(host.pid)
        t = time.time()
        for i in range(n):
            call(helper, f"123456789012.dkr.ecr.xx-fake-{i}.amazonaws.com")
        regions = rss_kib(host.pid)
        t_regions = time.time() - t
        t = time.time()
        for i in range(n):
            call(helper, f"{100000000000 + i:012d}.dkr.ecr.us-west-2.amazonaws.com")
        registries = rss_kib(host.pid)
        t_registries = time.time() - t
        status = subprocess.run(
            [os.path.join(bin_dir, "finch-host-agent"), "status", "--json", "--state-dir",
             os.path.join(work, "state")], capture_output=True, text=True, env=env)
        cached = json.loads(status.stdout).get("cache_entries") if status.returncode == 0 else None
        print(json.dumps({"host_rss_kib": {"start": start, "after_regions": regions,
                          "after_registries": registries}, "cache_entries": cached}),
              file=sys.stderr, flush=True)
        alone = latencies(helper, "reg.example")
        flooder = subprocess.Popen(
            # The flooder runs as another uid: a python outside root's home.
            ["/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable, "-c", (
                "import socket,sys,time\n"
                "c=[]\n"
                "for _ in range(int(sys.argv[2])):\n"
                "  s=socket.socket(socket.AF_UNIX)\n"
                "  try:\n"
                "    s.connect(sys.argv[1]); c.append(s)\n"
                "  except OSError: pass\n"
                "print(len(c), flush=True)\n"
                "time.sleep(30)\n"), helper, str(m)],
            stdout=subprocess.PIPE, text=True, user=4343, group=65534)
        held = flooder.stdout.readline().strip()
        flooded = latencies(helper, "reg.example")
        guest_rss = rss_kib(procs[1].pid)
        flooder.kill()
        print(json.dumps({
            "bin_dir": bin_dir, "requests": n,
            "host_rss_kib": {"start": start, "after_regions": regions,
                             "after_registries": registries},
            "seconds": {"regions": round(t_regions, 1), "registries": round(t_registries, 1)},
            "cache_entries": cached,
            "get_ms_alone": {"median": round(alone[0], 2), "max": round(alone[1], 2)},
            "flood": {"uid": 4343, "connections_held": held,
                      "guest_rss_kib": guest_rss},
            "get_ms_flooded": {"median": round(flooded[0], 2), "max": round(flooded[1], 2)},
        }, indent=1))
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
