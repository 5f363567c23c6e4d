//! `POST /v1/events/{exchange}` (SPEC §12) against the real broker: binary and
//! structured mode on the RabbitMQ binding, validation naming the attribute, grants,
//! unroutable, (`source`, `id`) de-duplication, `Idempotency-Key`, batches, and
//! WebSocket subscribers asking for `format: "cloudevents"`.

use lapin::types::AMQPValue;
use serde_json::{Value, json};

use crate::common::*;
use crate::ws::{connect, recv, send};

/// POSTs `body` with `headers` (name, value) to `path`.
async fn post(
    server: &TestServer,
    token: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> Resp {
    let mut request = server
        .http
        .post(format!("{}{path}", server.base))
        .bearer_auth(token)
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    into_resp(request.send().await.expect("request")).await
}

async fn structured(server: &TestServer, token: &str, path: &str, event: &Value) -> Resp {
    post(
        server,
        token,
        path,
        &[("content-type", "application/cloudevents+json")],
        event.to_string(),
    )
    .await
}

fn event(id: &str, kind: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/tests", "type": kind,
           "datacontenttype": "application/json", "data": {"id": id}})
}

/// The string header `name` of an AMQP message.
fn header(m: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    match m
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
    {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => panic!("{name} is not a string: {other:?}"),
    }
}

#[tokio::test]
async fn binary_mode_follows_the_rabbitmq_binding() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|_| {}).await;
    let body: &[u8] = b"\x00\x01\xffbinary";
    let r = post(
        &server,
        &token,
        &format!("/v1/events/{exchange}"),
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "evt-1"),
            ("ce-source", "%2Fsensors%2F7"),
            ("ce-type", "reading.taken"),
            ("ce-time", "2026-11-29T10:00:00Z"),
            ("ce-subject", "s-7"),
            ("ce-unit", "celsius"),
            ("content-type", "application/octet-stream"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ],
        body.to_vec(),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({"message_id": "evt-1", "exchange": exchange, "routing_key": "reading.taken", "routed": true})
    );
    let m = rabbit.get(&queue).await.expect("the event");
    let p = &m.delivery.properties;
    assert_eq!(m.delivery.data, body);
    assert_eq!(m.delivery.routing_key.as_str(), "reading.taken");
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "evt-1");
    assert_eq!(p.timestamp(), &Some(1_795_946_400));
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/octet-stream"
    );
    assert_eq!(p.delivery_mode(), &Some(2));
    for (name, value) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "evt-1"),
        ("ce-source", "/sensors/7"),
        ("ce-type", "reading.taken"),
        ("ce-time", "2026-11-29T10:00:00Z"),
        ("ce-subject", "s-7"),
        ("ce-unit", "celsius"),
    ] {
        assert_eq!(header(&m, name).as_deref(), Some(value), "{name}");
    }
    assert_eq!(header(&m, "ce-datacontenttype"), None);
    assert!(header(&m, "traceparent").is_some());
    let metrics = server.metrics().await;
    let received = metrics
        .lines()
        .find(|l| l.starts_with("warren_cloudevents_received_total{mode=\"binary\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(received.is_some_and(|n| n >= 1.0), "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn structured_mode_is_binary_on_amqp_unless_asked() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|_| {}).await;
    let path = format!("/v1/events/{exchange}");
    let r = structured(&server, &token, &path, &event("s-1", "order.created")).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let m = rabbit.get(&queue).await.expect("binary event");
    assert_eq!(m.delivery.data, br#"{"id":"s-1"}"#);
    assert_eq!(
        m.delivery
            .properties
            .content_type()
            .as_ref()
            .unwrap()
            .as_str(),
        "application/json"
    );
    assert_eq!(header(&m, "ce-id").as_deref(), Some("s-1"));

    // ?mode=structured keeps the event whole in the body; ?routing_key= overrides `type`.
    let with_b64 = json!({"specversion": "1.0", "id": "s-2", "source": "/tests",
        "type": "order.created", "count": 3, "data_base64": "AAH/"});
    let r = structured(
        &server,
        &token,
        &format!("{path}?mode=structured&routing_key=custom.key"),
        &with_b64,
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.body["routing_key"], "custom.key");
    let m = rabbit.get(&queue).await.expect("structured event");
    assert_eq!(
        m.delivery
            .properties
            .content_type()
            .as_ref()
            .unwrap()
            .as_str(),
        "application/cloudevents+json"
    );
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "s-2"
    );
    let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
    assert_eq!(body, with_b64);
    assert!(header(&m, "ce-id").is_none());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_attributes_are_400_naming_the_attribute() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|_| {}).await;
    let path = format!("/v1/events/{exchange}");
    let base = event("v-1", "t");
    let edit = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut e = base.as_object().unwrap().clone();
        f(&mut e);
        Value::Object(e)
    };
    let cases = [
        (
            edit(&|e| {
                e.remove("specversion");
            }),
            "specversion:",
        ),
        (
            edit(&|e| {
                e.insert("specversion".into(), json!("0.3"));
            }),
            "specversion:",
        ),
        (
            edit(&|e| {
                e.remove("id");
            }),
            "id:",
        ),
        (
            edit(&|e| {
                e.insert("id".into(), json!(""));
            }),
            "id:",
        ),
        (
            edit(&|e| {
                e.remove("source");
            }),
            "source:",
        ),
        (
            edit(&|e| {
                e.insert("type".into(), json!(""));
            }),
            "type:",
        ),
        (
            edit(&|e| {
                e.insert("time".into(), json!("29/11/2026"));
            }),
            "time:",
        ),
        (
            edit(&|e| {
                e.insert("Bad".into(), json!("x"));
            }),
            "\"Bad\":",
        ),
        (
            edit(&|e| {
                e.insert("averyveryverylongname1".into(), json!("x"));
            }),
            "\"averyveryverylongname1\":",
        ),
        (
            edit(&|e| {
                e.insert("ext".into(), json!(1.5));
            }),
            "ext:",
        ),
        (
            edit(&|e| {
                e.insert("data_base64".into(), json!("AA=="));
            }),
            "data_base64:",
        ),
    ];
    for (body, prefix) in cases {
        let r = structured(&server, &token, &path, &body).await;
        assert_problem(&r, 400, "invalid_request");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.starts_with(prefix), "{body}: {detail}");
    }
    // Binary mode names the attribute of the header too.
    let r = post(
        &server,
        &token,
        &path,
        &[("ce-specversion", "1.0"), ("ce-id", "b"), ("ce-type", "t")],
        "x",
    )
    .await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.body["detail"].as_str().unwrap().starts_with("source:"),
        "{:?}",
        r.body
    );
    let r = post(
        &server,
        &token,
        &path,
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "b"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-time", "now"),
        ],
        "x",
    )
    .await;
    assert!(
        r.body["detail"].as_str().unwrap().starts_with("time:"),
        "{:?}",
        r.body
    );
    // Too many extensions.
    let many = edit(&|e| {
        for i in 0..33 {
            e.insert(format!("x{i}"), json!("v"));
        }
    });
    let r = structured(&server, &token, &path, &many).await;
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .starts_with("extensions:"),
        "{:?}",
        r.body
    );
    // Other formats are not supported; a body over the limit is 413.
    let r = post(
        &server,
        &token,
        &path,
        &[("content-type", "application/cloudevents+avro")],
        "x",
    )
    .await;
    assert_problem(&r, 415, "unsupported_media_type");
    assert_eq!(rabbit.count(&queue).await, 0, "nothing was published");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn grants_cover_the_routing_key_and_mandatory_holds() {
    let (rabbit, exchange, queue, _, server, token) =
        publishing_on("order.#", "order.#", |_| {}).await;
    let path = format!("/v1/events/{exchange}");
    // The type is the routing key: not granted.
    let r = structured(&server, &token, &path, &event("g-1", "payment.done")).await;
    assert_problem(&r, 403, "forbidden");
    let r = structured(
        &server,
        &token,
        &format!("{path}?routing_key=payment.done"),
        &event("g-2", "order.x"),
    )
    .await;
    assert_problem(&r, 403, "forbidden");
    // Granted, but no queue is bound for it: 422, not a silent drop.
    let r = structured(&server, &token, &path, &event("g-3", "order")).await;
    assert_eq!(r.status, 202, "order matches order.#: {:?}", r.body);
    let r = structured(
        &server,
        &token,
        &format!("{path}?routing_key=order.nowhere.x"),
        &event("g-4", "t"),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2);
    let lonely = rabbit.topic_exchange().await;
    let server2 = TestServer::start_ready(tenant_config("lonely", "*", "#")).await;
    let r = structured(
        &server2,
        &server2.token("lonely", "publish"),
        &format!("/v1/events/{lonely}"),
        &event("g-5", "t"),
    )
    .await;
    assert_problem(&r, 422, "unroutable");
    let r = structured(
        &server2,
        &server2.token("lonely", "subscribe"),
        &format!("/v1/events/{lonely}"),
        &event("g-6", "t"),
    )
    .await;
    assert_problem(&r, 403, "forbidden");
    let r = structured(
        &server2,
        &server2.token("lonely", "publish"),
        "/v1/events/no-such-exchange-here",
        &event("g-7", "t"),
    )
    .await;
    assert_problem(&r, 404, "exchange_not_found");
    server.shutdown().await.unwrap();
    server2.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_retried_event_is_published_once_per_source_and_id() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|_| {}).await;
    let path = format!("/v1/events/{exchange}");
    let first = structured(&server, &token, &path, &event("d-1", "t")).await;
    assert_eq!(first.status, 202, "{:?}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);
    // The same event again, in binary mode this time: the first answer, replayed.
    let again = post(
        &server,
        &token,
        &path,
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "d-1"),
            ("ce-source", "/tests"),
            ("ce-type", "t"),
            ("content-type", "application/json"),
        ],
        r#"{"id":"d-1"}"#,
    )
    .await;
    assert_eq!(again.status, 202, "{:?}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    // The same pair with other content is refused; another source is another event.
    let mut changed = event("d-1", "t");
    changed["data"] = json!({"other": true});
    let r = structured(&server, &token, &path, &changed).await;
    assert_problem(&r, 422, "idempotency_key_mismatch");
    assert!(
        r.body["detail"].as_str().unwrap().contains("source and id"),
        "{:?}",
        r.body
    );
    let mut elsewhere = event("d-1", "t");
    elsewhere["source"] = json!("/elsewhere");
    let r = structured(&server, &token, &path, &elsewhere).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.header("idempotent-replayed"), None);
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2, "two distinct events");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idempotency_key_keys_the_request() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|_| {}).await;
    let path = format!("/v1/events/{exchange}");
    let key = unique("key");
    let send_with = |e: Value| {
        let (server, token, path, key) = (&server, &token, &path, &key);
        async move {
            post(
                server,
                token,
                path,
                &[
                    ("content-type", "application/cloudevents+json"),
                    ("idempotency-key", key),
                ],
                e.to_string(),
            )
            .await
        }
    };
    let r = send_with(event("k-1", "t")).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let r = send_with(event("k-1", "t")).await;
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    let r = send_with(event("k-2", "t")).await;
    assert_problem(&r, 422, "idempotency_key_mismatch");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );
    assert_eq!(rabbit.wait_count(&queue, 1).await, 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn batches_are_answered_per_event() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "ok.#").await;
    let tenant = unique("t");
    let server = TestServer::start_ready(tenant_config(&tenant, &exchange, "#")).await;
    let token = server.token(&tenant, "publish");
    let path = format!("/v1/events/{exchange}");
    let batch = |events: Vec<Value>| {
        let (server, token, path) = (&server, &token, &path);
        async move {
            post(
                server,
                token,
                path,
                &[("content-type", "application/cloudevents-batch+json")],
                Value::Array(events).to_string(),
            )
            .await
        }
    };
    let r = batch(vec![event("b-1", "ok.1"), event("b-2", "ok.2")]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["results"][1],
        json!({"status": 202, "message_id": "b-2", "routed": true})
    );
    let r = batch(vec![event("b-3", "ok.3"), event("b-4", "lost.4")]).await;
    assert_eq!(r.status, 207, "{:?}", r.body);
    assert_eq!(r.body["results"][0]["status"], 202);
    assert_eq!(r.body["results"][1]["status"], 422);
    assert_eq!(r.body["results"][1]["code"], "unroutable");
    assert_eq!(r.body["results"][1]["message_id"], "b-4");
    // Retried: the events that landed are not sent again, and the answers are the same.
    let r = batch(vec![
        event("b-3", "ok.3"),
        event("b-4", "lost.4"),
        event("b-5", "ok.5"),
    ])
    .await;
    assert_eq!(r.status, 207, "{:?}", r.body);
    assert_eq!(r.body["results"][1]["code"], "unroutable");
    assert_eq!(r.body["results"][2]["status"], 202);
    assert_eq!(
        rabbit.wait_count(&queue, 4).await,
        4,
        "b-1, b-2, b-3, b-5 once each"
    );
    // A malformed batch is refused whole, naming the event and attribute.
    let mut bad = event("b-6", "ok.6");
    bad.as_object_mut().unwrap().remove("source");
    let r = batch(vec![event("b-7", "ok.7"), bad]).await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .starts_with("[1].source:"),
        "{:?}",
        r.body
    );
    let r = batch(vec![event("b-8", "ok.8"), event("b-8", "ok.8")]).await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.body["detail"].as_str().unwrap().starts_with("[1].id:"),
        "{:?}",
        r.body
    );
    let r = batch(vec![]).await;
    assert_problem(&r, 400, "invalid_request");
    assert_eq!(rabbit.count(&queue).await, 4, "nothing more was published");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn websocket_subscribers_can_ask_for_cloudevents() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let tenant = unique("t");
    let server = TestServer::start_ready(config(&format!(
        "[tenants.{tenant}]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n\
         subscribe = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n"
    )))
    .await;
    let token = server.token(&tenant, "publish subscribe");
    let mut ce = connect(&server, &token).await;
    let mut plain = connect(&server, &token).await;
    for (ws, format) in [(&mut ce, "cloudevents"), (&mut plain, "warren")] {
        send(
            ws,
            json!({"type": "subscribe", "id": "s", "exchange": exchange,
                        "binding_key": "#", "format": format}),
        )
        .await;
        assert_eq!(recv(ws).await["type"], "subscribed");
    }
    let r = structured(
        &server,
        &token,
        &format!("/v1/events/{exchange}"),
        &event("w-1", "order.created"),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let frame = recv(&mut ce).await;
    assert_eq!(frame["type"], "message");
    assert_eq!(frame["routing_key"], "order.created");
    assert!(frame.get("payload").is_none() && frame.get("properties").is_none());
    assert_eq!(
        frame["event"],
        json!({"specversion": "1.0", "id": "w-1", "source": "/tests", "type": "order.created",
               "datacontenttype": "application/json", "data": {"id": "w-1"}})
    );
    let frame = recv(&mut plain).await;
    assert_eq!(frame["payload"], json!({"id": "w-1"}));
    assert!(frame.get("event").is_none());

    // A plain publish is synthesized into an event.
    let r = server
        .publish(
            &token,
            &json!({"exchange": exchange, "routing_key": "plain.key", "payload": [1],
                                  "properties": {"message_id": "m-9"}}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let frame = recv(&mut ce).await;
    let synthesized = &frame["event"];
    assert_eq!(synthesized["id"], "m-9");
    assert_eq!(synthesized["type"], "plain.key");
    assert_eq!(
        synthesized["source"],
        format!("/warren/{tenant}/{exchange}")
    );
    assert_eq!(synthesized["data"], json!([1]));
    assert!(synthesized["time"].as_str().unwrap().ends_with('Z'));
    let _ = recv(&mut plain).await;

    // Durable subscriptions too: the event, with a delivery tag to ack.
    let name = unique("ce");
    send(
        &mut ce,
        json!({"type": "subscribe", "id": "d", "exchange": exchange,
        "binding_key": "order.#", "mode": "durable", "queue": name, "format": "cloudevents"}),
    )
    .await;
    let answer = recv(&mut ce).await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    let queue = answer["queue"].as_str().unwrap().to_owned();
    let r = structured(
        &server,
        &token,
        &format!("/v1/events/{exchange}"),
        &event("w-2", "order.paid"),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let mut durable = None;
    for _ in 0..2 {
        let frame = recv(&mut ce).await;
        if frame["subscription"] == "d" {
            durable = Some(frame);
        }
    }
    let frame = durable.expect("a durable frame");
    assert!(frame["delivery_tag"].as_u64().unwrap() > 0);
    assert_eq!(frame["event"]["id"], "w-2");
    assert_eq!(frame["event"]["data"], json!({"id": "w-2"}));
    send(
        &mut ce,
        json!({"type": "ack", "subscription": "d", "delivery_tag": frame["delivery_tag"]}),
    )
    .await;
    drop(ce);
    server.shutdown().await.unwrap();
    rabbit.delete_queue(&queue).await;
}
