"""Contract proof: push deliveries (SPEC §13) verify with the Standard Webhooks
reference library (PyPI `standardwebhooks`), in both formats, and a CloudEvents
delivery parses with the CloudEvents SDK's HTTP binary mode. This test runs a Warren of
its own (WARREN_BIN) whose push subscriptions target a receiver on loopback, and
publishes with pika. Run by scripts/api-contract.sh."""

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import pika
from cloudevents.core.bindings import http as ce_http
from standardwebhooks import Webhook

AMQP_URL = os.environ.get("WARREN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
BROKER = AMQP_URL.rsplit("/", 1)[0]
BIN = os.environ["WARREN_BIN"]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ROTATED = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"


class Received(BaseHTTPRequestHandler):
    hits = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        Received.hits.append((self.path, dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_deliveries_verify_with_the_reference_library():
    receiver = HTTPServer(("127.0.0.1", 0), Received)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}"
    queue = f"contract.push.{uuid.uuid4().hex}"
    port = free_port()
    config = f"""
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_s = 2
[amqp]
url = "{BROKER}"
[auth]
hs256_secret = "{uuid.uuid4().hex}"
[topology]
apply_on_start = true
[push]
allow_private_networks = true
[tenants.contract]
vhost = "/"
[[tenants.contract.queues]]
name = "{queue}"
retry = {{ delays_ms = [1000] }}
[[tenants.contract.queues]]
name = "{queue}.ce"
retry = {{ delays_ms = [1000] }}
[[tenants.contract.push]]
name = "frames"
queue = "{queue}"
url = "{hook}/frames"
secrets = ["{SECRET}", "{ROTATED}"]
[[tenants.contract.push]]
name = "events"
queue = "{queue}.ce"
url = "{hook}/events"
format = "cloudevents"
secrets = ["{SECRET}"]
"""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "warren.toml")
        with open(path, "w") as f:
            f.write(config)
        log = open(os.path.join(work, "warren.log"), "w")
        warren = subprocess.Popen([BIN, "serve", "--config", path], stderr=log, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "Warren was not ready"
                time.sleep(0.2)
            channel.basic_publish("", queue, b'{"order": 42}', pika.BasicProperties(
                content_type="application/json", message_id="order-42"))
            channel.basic_publish("", f"{queue}.ce", b'{"t": 21.5}', pika.BasicProperties(
                content_type="application/json", headers={
                    "ce-specversion": "1.0", "ce-id": "reading-1", "ce-source": "/sensors/7",
                    "ce-type": "reading.taken"}))
            deadline = time.monotonic() + 20
            while len(Received.hits) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(Received.hits) == 2, Received.hits
        finally:
            warren.terminate()
            warren.wait(timeout=10)
            for name in (queue, f"{queue}.ce"):
                for suffix in ("", ".retry.1", ".dlq"):
                    channel.queue_delete(name + suffix)
            connection.close()
    hits = {path: (headers, body) for path, headers, body in Received.hits}

    headers, body = hits["/frames"]
    # Each secret signs; the library verifies with either (key rotation).
    for secret in (SECRET, ROTATED):
        Webhook(secret).verify(body, headers)
    frame = json.loads(body)
    assert headers["webhook-id"] == "order-42"
    assert frame["type"] == "message" and frame["payload"] == {"order": 42}
    tampered = body.replace(b"42", b"43")
    try:
        Webhook(SECRET).verify(tampered, headers)
        raise AssertionError("a tampered body verified")
    except Exception as error:  # the library raises WebhookVerificationError
        assert "verif" in type(error).__name__.lower() or "signature" in str(error).lower()

    headers, body = hits["/events"]
    Webhook(SECRET).verify(body, headers)
    # The SDK reads header names in lower case, as HTTP/2 and most frameworks give them.
    message = ce_http.HTTPMessage(headers={k.lower(): v for k, v in headers.items()}, body=body)
    event = ce_http.from_binary_event(message)
    attributes = event.get_attributes()
    assert attributes["id"] == "reading-1"
    assert attributes["source"] == "/sensors/7"
    assert attributes["type"] == "reading.taken"
    assert event.get_data() == {"t": 21.5}
