#!/usr/bin/env python3
"""Memory per idle server-sent event stream (BENCHMARKS.md, "SSE memory").

Starts the given `warren` binary with a temporary config (random port, tenant `bench` on
vhost `/`, granted the exchange `amq.topic` and the stream `warren-bench-sse`), opens one
event stream, reads Warren's RSS (`VmRSS` of /proc/<pid>/status), then opens N more and
reads it again 2 s later: KiB per stream = ΔRSS / N. Each stream is a raw HTTP/1.1
connection that sends `GET /v1/events` and reads only the response head; `--mode live`
(default) subscribes each to the same binding key of `amq.topic` (one shared broker
queue), `--mode stream` gives each its own stream consumer (one AMQP channel each; the
stream is declared and deleted through the management API).

    bench/sse_memory.py --warren target/release/warren [--streams 10000] [--mode live]
"""
import argparse
import base64
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

STREAM = "warren-bench-sse"
MANAGEMENT = os.environ.get("WARREN_TEST_MANAGEMENT_URL", "http://127.0.0.1:15672")
AMQP = os.environ.get("WARREN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def management(method, path, body=None):
    request = urllib.request.Request(f"{MANAGEMENT}/api/{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
    request.add_header("authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def open_streams(port, token, query, count):
    """Opens `count` event streams and returns their sockets once every head arrived."""
    selector = selectors.DefaultSelector()
    sockets = []
    pending = {}
    request = (f"GET /v1/events?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n").encode()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request)
        s.setblocking(False)
        selector.register(s, selectors.EVENT_READ)
        pending[s] = b""
        sockets.append(s)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            s = key.fileobj
            data = s.recv(65536)
            if not data:
                raise RuntimeError(f"a stream closed before its head: {pending[s]!r}")
            pending[s] += data
            if b"\r\n\r\n" in pending[s]:
                head = pending.pop(s)
                if not head.startswith(b"HTTP/1.1 200"):
                    s.setblocking(True)
                    body = head + s.recv(65536)
                    raise RuntimeError(f"not 200: {body[-400:]!r}")
                selector.unregister(s)
    if pending:
        raise RuntimeError(f"{len(pending)} streams did not answer")
    return sockets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warren", required=True)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--mode", choices=["live", "stream"], default="live")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    work = tempfile.mkdtemp()
    config = os.path.join(work, "warren.toml")
    secret = os.urandom(32).hex()
    # Stream mode: one consumer channel per stream, and connections for them (a broker
    # connection takes at most 2000 channels).
    channels = ""
    if args.mode == "stream":
        channels = (f"max_consumer_channels = {args.streams + 100}\n"
                    f"connections_per_vhost = {(args.streams + 132) // 2000 + 1}\n")
    with open(config, "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:{port}"
[amqp]
url = "{AMQP}"
{channels}[auth]
hs256_secret = "{secret}"
[log]
level = "warn"
[sse]
max_connections_per_tenant = {args.streams + 100}
[tenants.bench]
vhost = "/"
subscribe = [{{ exchange = "amq.topic", routing_key = "#" }}, {{ stream = "{STREAM}" }}]
limits = {{ max_consumers = {args.streams + 100} }}
""")
    if args.mode == "stream":
        management("PUT", f"queues/%2F/{STREAM}", {"durable": True, "arguments": {"x-queue-type": "stream"}})
    check = subprocess.run([args.warren, "check-config", config], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"config: {check.stderr.strip()}")
    log = open(os.path.join(work, "warren.log"), "w")
    print(f"Warren log: {log.name}", file=sys.stderr)
    warren = subprocess.Popen([args.warren, "serve", "--config", config], stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("warren did not become ready")
            time.sleep(0.1)
        token = subprocess.run([args.warren, "token", "--config", config, "--tenant", "bench",
                                "--sub", "bench", "--scope", "subscribe", "--ttl", "1h"],
                               check=True, capture_output=True, text=True).stdout.strip()
        query = (f"stream={STREAM}&offset=next" if args.mode == "stream"
                 else "exchange=amq.topic&binding_key=warren.bench.sse.idle")
        first = open_streams(port, token, query, 1)
        time.sleep(1)
        before = rss_kib(warren.pid)
        started = time.monotonic()
        streams = open_streams(port, token, query, args.streams)
        opened = time.monotonic() - started
        time.sleep(2)
        after = rss_kib(warren.pid)
        per = (after - before) / args.streams
        print(f"idle SSE streams ({args.mode}): {args.streams} opened in {opened:.1f} s; "
              f"Warren RSS {before:,} KiB before, {after:,} KiB with them: {per:.1f} KiB per stream")
        for s in streams + first:
            s.close()
    finally:
        warren.terminate()
        warren.wait(timeout=30)
        if args.mode == "stream":
            management("DELETE", f"queues/%2F/{STREAM}")


if __name__ == "__main__":
    main()
