"""CloudEvents conformance (SPEC §12) with the official CloudEvents Python SDK
(`cloudevents` on PyPI, its `core` API): events the SDK builds in HTTP binary and
structured mode are POSTed to Warren's `/v1/events/{exchange}`, read back from RabbitMQ
with pika and parsed by the SDK's RabbitMQ protocol binding
(`cloudevents.core.bindings.rabbitmq`) into equal events; a batch; every invalid
attribute answered 400 naming it; a WebSocket subscriber asking `format: "cloudevents"`
receives events the SDK's JSON format parses. Run by scripts/api-contract.sh."""

import json
import os
import time
import uuid
from datetime import datetime, timezone

import httpx
import pika
import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.bindings import rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from websockets.sync.client import connect as ws_connect

URL = os.environ["WARREN_URL"]
TOKEN = os.environ["WARREN_TOKEN"]
# publish and subscribe, for the WebSocket test
PUBSUB_TOKEN = os.environ.get("WARREN_PUBSUB_TOKEN", TOKEN)
AMQP_URL = os.environ.get("WARREN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
EXCHANGE = "amq.topic"
FORMAT = JSONFormat()


@pytest.fixture
def bound():
    """A queue bound to amq.topic for a fresh routing-key prefix; yields (channel,
    queue, prefix) and events are published under `prefix.*`."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    prefix = f"contract.ce.{uuid.uuid4().hex}"
    channel.queue_bind(queue, EXCHANGE, routing_key=f"{prefix}.#")
    yield channel, queue, prefix
    connection.close()


def read_back(channel, queue, deadline_s: float = 5.0) -> CloudEvent:
    """The next message on `queue`, parsed by the SDK's RabbitMQ binding."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            headers = {
                k: v.decode() if isinstance(v, bytes) else v
                for k, v in (properties.headers or {}).items()
            }
            message = rabbitmq.RabbitMQMessage(
                headers=headers, content_type=properties.content_type, body=body
            )
            return rabbitmq.from_rabbitmq(message, FORMAT, CloudEvent)
        time.sleep(0.05)
    pytest.fail(f"no message arrived on {queue} within {deadline_s}s")


def post(message, routing_key=None, query=None, headers=None, token=TOKEN):
    params = dict(query or {})
    if routing_key is not None:
        params["routing_key"] = routing_key
    all_headers = {"Authorization": f"Bearer {token}", **message.headers, **(headers or {})}
    return httpx.post(
        f"{URL}/v1/events/{EXCHANGE}", params=params, headers=all_headers, content=message.body
    )


def assert_same(event: CloudEvent, back: CloudEvent):
    assert back.get_attributes() == event.get_attributes()
    assert back.get_data() == event.get_data()


def events(kind: str):
    """Events with JSON, text and binary data, extensions, subject, time and schema."""
    now = datetime.now(timezone.utc)
    return [
        CloudEvent(
            attributes={
                "type": kind,
                "source": "/contract/orders",
                "subject": "order-42",
                "datacontenttype": "application/json",
                "dataschema": "https://example.com/order.json",
                "time": now,
                "tenantid": "acme",
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            },
            data={"order": 42, "items": ["a", "b"], "note": "caf\u00e9"},
        ),
        CloudEvent(
            attributes={"type": kind, "source": "urn:contract:text", "datacontenttype": "text/plain"},
            data="plain text, \u00fcnicode",
        ),
        CloudEvent(
            attributes={
                "type": kind,
                "source": "/contract/bytes",
                "datacontenttype": "application/octet-stream",
            },
            data=b"\x00\x01\xfe\xffnot utf-8",
        ),
    ]


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_sdk_events_reach_rabbitmq_in_the_rabbitmq_binding(bound, mode):
    channel, queue, prefix = bound
    for event in events(f"{prefix}.created"):
        if mode == "binary":
            message = ce_http.to_binary(event, FORMAT)
        else:
            message = ce_http.to_structured(event, FORMAT)
        response = post(message)
        assert response.status_code == 202, response.text
        assert response.json()["message_id"] == event.get_id()
        assert response.json()["routing_key"] == event.get_type()
        assert_same(event, read_back(channel, queue))


def test_binary_on_amqp_carries_ce_headers_message_id_and_timestamp(bound):
    channel, queue, prefix = bound
    event = events(f"{prefix}.created")[0]
    assert post(ce_http.to_structured(event, FORMAT)).status_code == 202
    end = time.monotonic() + 5
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert method is not None
    assert properties.message_id == event.get_id()
    assert properties.timestamp == int(event.get_time().timestamp())
    assert properties.content_type == "application/json"
    assert properties.headers["ce-id"] == event.get_id()
    assert properties.headers["ce-specversion"] == "1.0"
    assert properties.headers["ce-tenantid"] == "acme"
    assert "ce-datacontenttype" not in properties.headers
    assert json.loads(body) == event.get_data()


def test_structured_mode_on_amqp_when_asked(bound):
    channel, queue, prefix = bound
    for event in events(f"{prefix}.created"):
        response = post(ce_http.to_binary(event, FORMAT), query={"mode": "structured"})
        assert response.status_code == 202, response.text
        back = read_back(channel, queue)
        assert_same(event, back)


def test_a_batch(bound):
    channel, queue, prefix = bound
    batch = events(f"{prefix}.batch")
    body = b"[" + b",".join(FORMAT.write(e) for e in batch) + b"]"
    response = httpx.post(
        f"{URL}/v1/events/{EXCHANGE}",
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/cloudevents-batch+json",
        },
        content=body,
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["message_id"] for r in results] == [e.get_id() for e in batch]
    assert all(r["status"] == 202 and r["routed"] for r in results)
    # Published up to 8 at once, each under its own (source, id) key: any order.
    back = {e.get_id(): e for e in (read_back(channel, queue) for _ in batch)}
    for event in batch:
        assert_same(event, back[event.get_id()])


def test_a_retried_event_is_published_once(bound):
    channel, queue, prefix = bound
    event = events(f"{prefix}.retried")[0]
    first = post(ce_http.to_binary(event, FORMAT))
    assert first.status_code == 202, first.text
    again = post(ce_http.to_structured(event, FORMAT))
    assert again.status_code == 202, again.text
    assert again.headers.get("idempotent-replayed") == "true"
    assert_same(event, read_back(channel, queue))
    time.sleep(0.2)
    method, _, _ = channel.basic_get(queue, auto_ack=True)
    assert method is None, "the retry was published again"


VALID = {"specversion": "1.0", "id": "x-1", "source": "/contract", "type": "contract.invalid"}


def without(name):
    return {k: v for k, v in VALID.items() if k != name}


INVALID_STRUCTURED = [
    (without("specversion"), "specversion"),
    ({**VALID, "specversion": "0.3"}, "specversion"),
    (without("id"), "id"),
    ({**VALID, "id": ""}, "id"),
    (without("source"), "source"),
    ({**VALID, "source": ""}, "source"),
    (without("type"), "type"),
    ({**VALID, "type": ""}, "type"),
    ({**VALID, "time": "not a time"}, "time"),
    ({**VALID, "time": "2026-11-29T10:00:00"}, "time"),
    ({**VALID, "subject": ""}, "subject"),
    ({**VALID, "dataschema": "relative/path"}, "dataschema"),
    ({**VALID, "datacontenttype": 7}, "datacontenttype"),
    ({**VALID, "UpperCase": "x"}, '"UpperCase"'),
    ({**VALID, "under_score": "x"}, '"under_score"'),
    ({**VALID, "a" * 21: "x"}, f'"{"a" * 21}"'),
    ({**VALID, "ext": 1.5}, "ext"),
    ({**VALID, "ext": {"nested": True}}, "ext"),
    ({**VALID, "data": 1, "data_base64": "AA=="}, "data_base64"),
    ({**VALID, **{f"x{i}": "v" for i in range(33)}}, "extensions"),
]


@pytest.mark.parametrize("event,attribute", INVALID_STRUCTURED)
def test_invalid_attributes_are_400_naming_the_attribute(event, attribute):
    response = httpx.post(
        f"{URL}/v1/events/{EXCHANGE}",
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/cloudevents+json",
        },
        content=json.dumps(event),
    )
    assert response.status_code == 400, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["code"] == "invalid_request"
    assert problem["detail"].startswith(f"{attribute}:"), problem["detail"]


BINARY = {"ce-specversion": "1.0", "ce-id": "b-1", "ce-source": "/contract", "ce-type": "t"}


@pytest.mark.parametrize(
    "headers,attribute",
    [
        ({k: v for k, v in BINARY.items() if k != "ce-specversion"}, "specversion"),
        ({**BINARY, "ce-specversion": "0.3"}, "specversion"),
        ({k: v for k, v in BINARY.items() if k != "ce-id"}, "id"),
        ({k: v for k, v in BINARY.items() if k != "ce-source"}, "source"),
        ({k: v for k, v in BINARY.items() if k != "ce-type"}, "type"),
        ({**BINARY, "ce-time": "yesterday"}, "time"),
        ({**BINARY, "ce-bad_name": "x"}, '"bad_name"'),
    ],
)
def test_invalid_binary_headers_are_400_naming_the_attribute(headers, attribute):
    response = httpx.post(
        f"{URL}/v1/events/{EXCHANGE}",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain", **headers},
        content=b"data",
    )
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(f"{attribute}:"), response.text


def test_a_websocket_subscriber_receives_events_the_sdk_parses():
    prefix = f"contract.ce.{uuid.uuid4().hex}"
    ws_url = URL.replace("http://", "ws://") + "/v1/ws"
    with ws_connect(
        ws_url,
        subprotocols=["warren.v1"],
        additional_headers={"Authorization": f"Bearer {PUBSUB_TOKEN}"},
        open_timeout=10,
    ) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "subscribe",
                    "id": "ce",
                    "exchange": EXCHANGE,
                    "binding_key": f"{prefix}.#",
                    "format": "cloudevents",
                }
            )
        )
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"
        sent = events(f"{prefix}.live")
        for event in sent:
            assert post(ce_http.to_binary(event, FORMAT)).status_code == 202
        for event in sent:
            frame = json.loads(ws.recv(timeout=10))
            assert frame["type"] == "message", frame
            assert frame["subscription"] == "ce"
            back = FORMAT.read(CloudEvent, json.dumps(frame["event"]).encode())
            assert_same(event, back)

        # A message published without CloudEvents is synthesized into a valid event.
        plain = httpx.post(
            f"{URL}/v1/publish",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={
                "exchange": EXCHANGE,
                "routing_key": f"{prefix}.plain",
                "payload": {"n": 1},
                "properties": {"message_id": "plain-1"},
            },
        )
        assert plain.status_code == 202, plain.text
        frame = json.loads(ws.recv(timeout=10))
        back = FORMAT.read(CloudEvent, json.dumps(frame["event"]).encode())
        assert back.get_id() == "plain-1"
        assert back.get_type() == f"{prefix}.plain"
        assert back.get_source() == f"/warren/contract/{EXCHANGE}"
        assert back.get_datacontenttype() == "application/json"
        assert back.get_data() == {"n": 1}
