"""Contract proof: a queue Warren declares with a retry policy never loses a message a
plain AMQP consumer rejects. pika (not Warren) consumes the queue and rejects without
requeue, as the amqplib and pika guides do; the broker dead-letters the message to
`<queue>.dlq`, with the reason in `x-death`. Run by scripts/api-contract.sh, which sets
WARREN_BIN to the warren binary."""

import os
import subprocess
import tempfile
import time
import uuid

import pika

AMQP_URL = os.environ.get("WARREN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
BROKER = AMQP_URL.rsplit("/", 1)[0]
BIN = os.environ["WARREN_BIN"]


def test_a_plain_reject_dead_letters_to_the_dlq():
    queue = f"contract.retry.{uuid.uuid4().hex}"
    config = f"""
[amqp]
url = "{BROKER}"
[auth]
hs256_secret = "{uuid.uuid4().hex}"
[tenants.contract]
vhost = "/"
[[tenants.contract.queues]]
name = "{queue}"
retry = {{ delays_ms = [1000] }}
"""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as file:
            file.write(config)
            file.flush()
            applied = subprocess.run(
                [BIN, "topology", "apply", "--config", file.name],
                capture_output=True, text=True, timeout=60,
            )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        channel.basic_publish("", queue, b'{"order": 42}')
        method = None
        end = time.monotonic() + 10
        while method is None and time.monotonic() < end:
            method, _, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                time.sleep(0.05)
        assert method is not None, "the message reached the queue"
        assert body == b'{"order": 42}'
        channel.basic_nack(method.delivery_tag, requeue=False)

        dead = None
        end = time.monotonic() + 10
        while dead is None and time.monotonic() < end:
            dead, properties, body = channel.basic_get(f"{queue}.dlq", auto_ack=True)
            if dead is None:
                time.sleep(0.05)
        assert dead is not None, "the rejected message is in the DLQ, not gone"
        assert body == b'{"order": 42}'
        deaths = properties.headers["x-death"]
        assert deaths[0]["queue"] == queue
        assert deaths[0]["reason"] == "rejected"
    finally:
        for name in (queue, f"{queue}.retry.1", f"{queue}.dlq"):
            channel.queue_delete(name)
        connection.close()
