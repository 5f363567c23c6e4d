"""Contract proof: a client generated from openapi/openapi.json with openapi-python-client
publishes through a running Warren (the message is read back from RabbitMQ), and gets
typed problem bodies for 401, 403 and 422. Run by scripts/api-contract.sh, which starts
Warren and generates the `warren_client` package."""

import json
import os
import time
import uuid

import pika
import pytest
from warren_client import AuthenticatedClient
from warren_client.api.operations import readyz
from warren_client.api.publish import publish, publish_batch
from warren_client.models import (
    BatchRequest,
    BatchResponse,
    MessageProperties,
    Problem,
    ProblemCode,
    PublishAccepted,
    PublishRequest,
    Readiness,
    ReadyStatus,
)

URL = os.environ["WARREN_URL"]
TOKEN = os.environ["WARREN_TOKEN"]
SUBSCRIBE_ONLY_TOKEN = os.environ["WARREN_SUBSCRIBE_ONLY_TOKEN"]
AMQP_URL = os.environ.get("WARREN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def client(token: str = TOKEN) -> AuthenticatedClient:
    return AuthenticatedClient(base_url=URL, token=token, raise_on_unexpected_status=True)


def unique(prefix: str) -> str:
    return f"contract.{prefix}.{uuid.uuid4().hex}"


@pytest.fixture
def bound_queue():
    """A queue bound to amq.topic for a fresh routing key; yields (channel, queue, key)."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    key = unique("bound")
    channel.queue_bind(queue, "amq.topic", routing_key=key)
    yield channel, queue, key
    connection.close()


def get_message(channel, queue, deadline_s: float = 5.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            return properties, body
        time.sleep(0.05)
    pytest.fail(f"no message arrived on {queue} within {deadline_s}s")


def test_ready():
    response = readyz.sync_detailed(client=client())
    assert response.status_code == 200
    assert isinstance(response.parsed, Readiness)
    assert response.parsed.status == ReadyStatus.READY


def test_publish_reaches_rabbitmq_and_a_retry_is_replayed(bound_queue):
    channel, queue, key = bound_queue
    body = PublishRequest(
        exchange="amq.topic",
        routing_key=key,
        payload={"order": 42, "items": ["a", "b"]},
        properties=MessageProperties(correlation_id="c-1", priority=5, app_id="contract"),
    )
    idempotency_key = unique("key")
    response = publish.sync_detailed(
        client=client(), body=body, idempotency_key=idempotency_key, traceparent=TRACEPARENT
    )
    assert response.status_code == 202, response.content
    accepted = response.parsed
    assert isinstance(accepted, PublishAccepted)
    assert (accepted.exchange, accepted.routing_key, accepted.routed) == ("amq.topic", key, True)
    assert response.headers.get("x-request-id")

    properties, payload = get_message(channel, queue)
    assert json.loads(payload) == {"order": 42, "items": ["a", "b"]}
    assert properties.message_id == accepted.message_id
    assert properties.content_type == "application/json"
    assert properties.correlation_id == "c-1"
    assert properties.priority == 5
    assert properties.delivery_mode == 2
    assert properties.headers["traceparent"] == TRACEPARENT

    again = publish.sync_detailed(client=client(), body=body, idempotency_key=idempotency_key)
    assert again.status_code == 202
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.parsed == accepted
    time.sleep(0.2)
    method, _, _ = channel.basic_get(queue, auto_ack=True)
    assert method is None, "a replayed request published again"


def test_batch_of_text_and_binary_bodies(bound_queue):
    channel, queue, key = bound_queue
    body = BatchRequest(
        messages=[
            PublishRequest(exchange="amq.topic", routing_key=key, body="hello"),
            PublishRequest(exchange="amq.topic", routing_key=key, body_base64="AAH/"),
        ]
    )
    response = publish_batch.sync_detailed(client=client(), body=body)
    assert response.status_code == 200, response.content
    assert isinstance(response.parsed, BatchResponse)
    assert [r.status for r in response.parsed.results] == [202, 202]
    first, second = get_message(channel, queue), get_message(channel, queue)
    assert (first[0].content_type, first[1]) == ("text/plain; charset=utf-8", b"hello")
    assert (second[0].content_type, second[1]) == ("application/octet-stream", b"\x00\x01\xff")


def test_bad_token_is_a_typed_401():
    body = PublishRequest(exchange="amq.topic", routing_key="demo.hello", payload=1, mandatory=False)
    response = publish.sync_detailed(client=client("not-a-jwt"), body=body)
    assert response.status_code == 401
    assert isinstance(response.parsed, Problem)
    assert response.parsed.code == ProblemCode.UNAUTHORIZED
    assert response.parsed.status == 401
    assert response.parsed.type_ == "https://warren.dev/problems/unauthorized"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_missing_scope_is_a_typed_403():
    body = PublishRequest(exchange="amq.topic", routing_key="demo.hello", payload=1, mandatory=False)
    response = publish.sync_detailed(client=client(SUBSCRIBE_ONLY_TOKEN), body=body)
    assert response.status_code == 403
    assert isinstance(response.parsed, Problem)
    assert response.parsed.code == ProblemCode.FORBIDDEN
    assert "publish" in response.parsed.detail


def test_unroutable_is_a_typed_422():
    body = PublishRequest(exchange="amq.topic", routing_key=unique("nobody-listens"), body="lost?")
    response = publish.sync_detailed(client=client(), body=body)
    assert response.status_code == 422
    assert isinstance(response.parsed, Problem)
    assert response.parsed.code == ProblemCode.UNROUTABLE


def test_reused_idempotency_key_is_a_typed_422():
    key = unique("key")
    first = PublishRequest(exchange="amq.topic", routing_key="demo.a", payload=1, mandatory=False)
    second = PublishRequest(exchange="amq.topic", routing_key="demo.a", payload=2, mandatory=False)
    assert publish.sync_detailed(client=client(), body=first, idempotency_key=key).status_code == 202
    response = publish.sync_detailed(client=client(), body=second, idempotency_key=key)
    assert response.status_code == 422
    assert isinstance(response.parsed, Problem)
    assert response.parsed.code == ProblemCode.IDEMPOTENCY_KEY_MISMATCH


def test_a_generated_client_receives_and_acks_with_leases():
    """Pull consume (SPEC §14) through the generated client: receive with a lease, ack,
    and a repeated ack that is harmless. scripts/api-contract.sh grants the tenant the
    queue `contract-pull`."""
    from warren_client.api.pull import ack, receive
    from warren_client.models import AckRequest, ReceiveRequest, Received, SettleResults

    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.queue_declare("contract-pull", durable=True)
    channel.queue_purge("contract-pull")
    try:
        channel.basic_publish(
            "", "contract-pull", b'{"job": 7}',
            pika.BasicProperties(content_type="application/json", message_id="job-7"))
        pull_client = client(os.environ["WARREN_PUBSUB_TOKEN"])
        response = receive.sync_detailed(
            "contract-pull", client=pull_client,
            body=ReceiveRequest(max_messages=10, wait_ms=2000, lease_ms=30000))
        assert response.status_code == 200, response.content
        received = response.parsed
        assert isinstance(received, Received)
        assert len(received.messages) == 1
        message = received.messages[0]
        assert message.payload == {"job": 7}
        assert message.attempt == 1
        assert message.properties.message_id == "job-7"
        acked = ack.sync_detailed(
            "contract-pull", client=pull_client, body=AckRequest(receipts=[message.receipt]))
        assert acked.status_code == 200, acked.content
        assert isinstance(acked.parsed, SettleResults)
        assert [r.status for r in acked.parsed.results] == [200]
        again = ack.sync_detailed(
            "contract-pull", client=pull_client, body=AckRequest(receipts=[message.receipt]))
        assert again.status_code == 200
        assert channel.queue_declare("contract-pull", passive=True).method.message_count == 0
    finally:
        channel.queue_delete("contract-pull")
        connection.close()
