//! Stream replay over WebSocket (SPEC §9) against real RabbitMQ streams: replay from
//! `first`, an offset and a timestamp, exactly; resume after a cut with nothing missed
//! or doubled; grants, filters, missing streams, and queues that are not streams.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::ws::{Ws, connect, recv, send};

/// A vhost of its own (deleted on drop, with its streams) with a tenant on it whose
/// subscribe grants are `grants` (TOML inline tables), and Warren serving it.
pub(crate) struct StreamWorld {
    pub rabbit: Rabbit,
    pub tenant: String,
    pub server: TestServer,
    pub token: String,
    // Last: the vhost goes after the connections into it.
    pub admin: Admin,
}

impl StreamWorld {
    pub async fn start(grants: &str, extra: &str) -> Self {
        Self::start_with(grants, extra, |_| {}).await
    }

    /// Like [`StreamWorld::start`], with the config edited before Warren starts.
    pub async fn start_with(
        grants: &str,
        extra: &str,
        edit: impl FnOnce(&mut warren::config::Config),
    ) -> Self {
        let admin = Admin::new();
        let vhost = unique("vh");
        admin.vhost(&vhost).await;
        let rabbit = rabbit_in(&vhost).await;
        let tenant = unique("t");
        let mut config = config(&format!(
            "{extra}\n[tenants.{tenant}]\nvhost = \"{vhost}\"\nsubscribe = [{grants}]\n"
        ));
        edit(&mut config);
        let server = TestServer::start_ready(config).await;
        let token = server.token(&tenant, "subscribe");
        Self {
            rabbit,
            tenant,
            server,
            token,
            admin,
        }
    }

    /// Declares the stream `name` (the vhost's deletion removes it).
    pub async fn stream(&self, name: &str) {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        self.rabbit
            .channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("declare stream");
    }

    /// Publishes `{"n": i}` for each `i` in `range` to `exchange` with `routing_key`,
    /// and waits for every confirm.
    pub async fn publish(&self, exchange: &str, routing_key: &str, range: std::ops::Range<u64>) {
        self.publish_padded(exchange, routing_key, range, "").await;
    }

    /// [`Self::publish`] with `{"n": i, "filler": filler}` (large messages) when
    /// `filler` is not empty.
    pub async fn publish_padded(
        &self,
        exchange: &str,
        routing_key: &str,
        range: std::ops::Range<u64>,
        filler: &str,
    ) {
        let channel = self.rabbit.channel.clone();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let mut confirms = Vec::new();
        for n in range {
            let body = if filler.is_empty() {
                json!({"n": n})
            } else {
                json!({"n": n, "filler": filler})
            }
            .to_string();
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(format!("m-{n}").into());
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack());
        }
    }
}

/// A TCP connection to `address` whose receive buffer stays small (no autotuning): a
/// reader that stalls on it stalls the sender soon.
pub(crate) async fn small_buffer_tcp(address: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    let address = address.parse().expect("a socket address");
    socket.connect(address).await.expect("connect")
}

/// Like `ws::connect`, over [`small_buffer_tcp`].
async fn connect_small_buffer(
    server: &TestServer,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut request = format!("ws://{address}/v1/ws")
        .into_client_request()
        .expect("a WebSocket URL");
    let headers = request.headers_mut();
    let bearer = format!("Bearer {token}").parse().expect("a header value");
    headers.insert("authorization", bearer);
    headers.insert(
        "sec-websocket-protocol",
        "warren.v1".parse().expect("a header value"),
    );
    let stream = small_buffer_tcp(&address).await;
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("ws connect");
    ws
}

/// Subscribes `id` to `stream` with `extra` members; returns the answer frame.
async fn subscribe_stream(ws: &mut Ws, id: &str, stream: &str, extra: Value) -> Value {
    let mut frame = json!({"type": "subscribe", "id": id, "mode": "stream", "stream": stream});
    if let (Some(frame), Some(extra)) = (frame.as_object_mut(), extra.as_object()) {
        frame.extend(extra.clone());
    }
    send(ws, frame).await;
    recv(ws).await
}

/// Reads `count` message frames of subscription `id`: (offset, n) each.
async fn read_messages(ws: &mut Ws, id: &str, count: usize) -> Vec<(u64, u64)> {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let frame = recv(ws).await;
        assert_eq!(frame["type"], "message", "{frame}");
        assert_eq!(frame["subscription"], id);
        let offset = frame["offset"].as_u64().expect("an offset");
        let n = frame["payload"]["n"].as_u64().expect("a payload");
        seen.push((offset, n));
    }
    seen
}

/// Nothing more arrives for a moment.
async fn assert_quiet(ws: &mut Ws) {
    let extra = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => return t,
                Some(Ok(_)) => continue,
                _ => std::future::pending().await,
            }
        }
    })
    .await;
    assert!(extra.is_err(), "nothing more: {extra:?}");
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Waits until the wall clock has passed the next whole second (plus a margin) and
/// returns that second as RFC 3339: what the broker stores after it is newer.
async fn next_second() -> (u64, String) {
    let second = unix_seconds().floor() as u64 + 1;
    let wait = (second as f64 + 0.2 - unix_seconds()).max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    let text = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(second));
    (second, text.to_string())
}

#[tokio::test]
async fn ten_thousand_messages_replay_exactly_from_first_an_offset_and_a_timestamp() {
    let world = StreamWorld::start(r#"{ stream = "order-log" }"#, "").await;
    world.stream("order-log").await;
    world.publish("", "order-log", 0..5_000).await;
    let (_, since) = next_second().await;
    world.publish("", "order-log", 5_000..10_000).await;

    let mut ws = connect(&world.server, &world.token).await;
    let cases: [(&str, Value, u64); 3] = [
        ("from-first", json!("first"), 0),
        ("from-offset", json!(7_500), 7_500),
        ("from-time", json!({"timestamp": since}), 5_000),
    ];
    for (id, offset, start) in cases {
        let answer = subscribe_stream(&mut ws, id, "order-log", json!({"offset": offset})).await;
        assert_eq!(answer, json!({"type": "subscribed", "id": id}));
        let seen = read_messages(&mut ws, id, (10_000 - start) as usize).await;
        let expected: Vec<(u64, u64)> = (start..10_000).map(|n| (n, n)).collect();
        assert!(
            seen == expected,
            "{id}: exactly offsets {start}..10000, in order"
        );
        assert_quiet(&mut ws).await;
        send(&mut ws, json!({"type": "unsubscribe", "id": id})).await;
        assert_eq!(
            recv(&mut ws).await,
            json!({"type": "unsubscribed", "id": id})
        );
    }
    // A message frame carries the usual members besides its offset.
    let answer = subscribe_stream(&mut ws, "last", "order-log", json!({"offset": "last"})).await;
    assert_eq!(answer["type"], "subscribed");
    let frame = recv(&mut ws).await;
    assert_eq!(frame["routing_key"], "order-log");
    assert_eq!(frame["properties"]["content_type"], "application/json");
    assert!(frame["offset"].as_u64().is_some_and(|o| o <= 9_999));
    let metrics = world.server.metrics().await;
    assert!(metrics.contains("warren_stream_resumes_total{kind=\"timestamp\"}"));
}

#[tokio::test]
async fn a_consumer_cut_mid_stream_resumes_with_nothing_missed_or_doubled() {
    let world = StreamWorld::start(r#"{ stream = "audit" }"#, "").await;
    world.stream("audit").await;
    world.publish("", "audit", 0..2_000).await;

    let mut ws = connect(&world.server, &world.token).await;
    let answer = subscribe_stream(&mut ws, "a", "audit", json!({"offset": "first"})).await;
    assert_eq!(answer["type"], "subscribed");
    let first = read_messages(&mut ws, "a", 700).await;
    // The connection drops without a goodbye, mid-stream.
    drop(ws);
    // More is written meanwhile.
    world.publish("", "audit", 2_000..2_500).await;

    let last = first.last().map(|(offset, _)| *offset).expect("some");
    let mut ws = connect(&world.server, &world.token).await;
    let answer = subscribe_stream(&mut ws, "a", "audit", json!({"offset": last + 1})).await;
    assert_eq!(answer["type"], "subscribed");
    let rest = read_messages(&mut ws, "a", (2_500 - 700) as usize).await;
    assert_quiet(&mut ws).await;
    let all: Vec<u64> = first.iter().chain(rest.iter()).map(|(_, n)| *n).collect();
    assert_eq!(
        all,
        (0..2_500).collect::<Vec<_>>(),
        "none missed, none twice"
    );
    let unique: BTreeSet<u64> = first.iter().chain(rest.iter()).map(|(o, _)| *o).collect();
    assert_eq!(unique.len(), 2_500);
}

#[tokio::test]
async fn grants_filters_missing_streams_and_queues_that_are_not_streams() {
    let grants = r#"{ stream = "orders", routing_key = "order.eu.*" }, { stream = "ghost" }, { stream = "plain" }"#;
    let world = StreamWorld::start(grants, "").await;
    world.stream("orders").await;
    world.stream("secret").await;
    let exchange = world.rabbit.exchange(ExchangeKind::Topic).await;
    world
        .rabbit
        .channel
        .queue_bind(
            "orders".into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let mut ws = connect(&world.server, &world.token).await;

    // Not granted at all, and a filter wider than the grant.
    let answer = subscribe_stream(&mut ws, "x", "secret", json!({"offset": "first"})).await;
    assert_eq!(
        (answer["type"].as_str(), answer["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{answer}"
    );
    let answer = subscribe_stream(&mut ws, "x", "orders", json!({})).await;
    assert_eq!(
        answer["code"], "forbidden",
        "no binding_key means all of it: {answer}"
    );
    let answer = subscribe_stream(&mut ws, "x", "orders", json!({"binding_key": "order.#"})).await;
    assert_eq!(answer["code"], "forbidden", "{answer}");
    // Granted but missing: 404, without quoting the broker.
    let answer = subscribe_stream(&mut ws, "x", "ghost", json!({})).await;
    assert_eq!(answer["code"], "stream_not_found", "{answer}");
    assert!(
        !answer["detail"].as_str().unwrap_or("").contains("vhost '"),
        "{answer}"
    );

    // A classic queue named as a stream is refused, and keeps every message.
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    world
        .rabbit
        .channel
        .queue_declare("plain".into(), QueueDeclareOptions::default(), arguments)
        .await
        .expect("classic queue");
    world.publish("", "plain", 0..5).await;
    let answer = subscribe_stream(&mut ws, "x", "plain", json!({"offset": "first"})).await;
    assert_eq!(answer["code"], "stream_not_found", "{answer}");
    assert_eq!(
        world.rabbit.wait_count("plain", 5).await,
        5,
        "nothing consumed"
    );

    // Within the grant: only the matching routing keys arrive, each with its offset.
    world.publish(&exchange, "order.eu.created", 0..3).await;
    world.publish(&exchange, "order.us.created", 3..6).await;
    world.publish(&exchange, "order.eu.paid", 6..9).await;
    let answer = subscribe_stream(
        &mut ws,
        "eu",
        "orders",
        json!({"binding_key": "order.eu.*", "offset": "first"}),
    )
    .await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    let seen = read_messages(&mut ws, "eu", 6).await;
    assert_eq!(
        seen,
        vec![(0, 0), (1, 1), (2, 2), (6, 6), (7, 7), (8, 8)],
        "the us messages are filtered out; offsets are the stream's"
    );
    assert_quiet(&mut ws).await;
    // Streams are acknowledged by Warren, not the client.
    send(
        &mut ws,
        json!({"type": "ack", "subscription": "eu", "delivery_tag": 1}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "invalid_request");
    // A bad offset is the client's error.
    let answer = subscribe_stream(&mut ws, "y", "orders", json!({"offset": "bogus"})).await;
    assert_eq!(answer["code"], "invalid_request", "{answer}");
    // A refreshed token without the subscribe scope ends the stream subscription.
    let publish_only = world.server.token(&world.tenant, "publish");
    send(&mut ws, json!({"type": "auth", "token": publish_only})).await;
    let ended = recv(&mut ws).await;
    assert_eq!(
        (ended["id"].as_str(), ended["code"].as_str()),
        (Some("eu"), Some("forbidden")),
        "{ended}"
    );
}

#[tokio::test]
async fn a_lost_broker_link_ends_stream_subscriptions_with_where_to_resume() {
    let proxy = ChaosProxy::start().await;
    let world = StreamWorld::start_with(r#"{ stream = "log" }"#, "", |config| {
        config.amqp.url = Some(proxy.url());
    })
    .await;
    world.stream("log").await;
    world.publish("", "log", 0..10).await;
    let mut ws = connect(&world.server, &world.token).await;
    let answer = subscribe_stream(&mut ws, "s", "log", json!({"offset": "first"})).await;
    assert_eq!(answer["type"], "subscribed");
    assert_eq!(read_messages(&mut ws, "s", 10).await.len(), 10);
    let events = world
        .server
        .http
        .get(format!(
            "{}/v1/events?stream=log&offset=first&access_token={}",
            world.server.base, world.token
        ))
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), 200);
    let mut body = events.bytes_stream();
    let mut text = String::new();
    // All ten arrive before the link is cut.
    while text.matches("event: message").count() < 10 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("events within 10 s")
            .expect("the stream goes on")
            .expect("a chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }

    proxy.cut();
    let ended = recv(&mut ws).await;
    assert_eq!(ended["type"], "error", "{ended}");
    assert_eq!(ended["id"], "s");
    assert_eq!(ended["code"], "broker_unavailable");
    assert!(
        ended["detail"].as_str().unwrap_or("").contains("offset 10"),
        "says where to resume: {ended}"
    );
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(chunk)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(rest.is_ok(), "the event stream ends");
    let last = text.trim_end().rsplit("\n\n").next().unwrap_or("");
    assert!(last.starts_with("event: error\ndata: "), "{last}");
    assert!(last.contains("\"code\":\"broker_unavailable\""), "{last}");
    assert!(last.contains("offset 10"), "says where to resume: {last}");
    assert_eq!(text.matches("event: message").count(), 10, "{text}");
}

#[tokio::test]
async fn a_slow_websocket_stream_reader_is_closed_while_a_fast_one_keeps_up() {
    let extra =
        "[ws]\nslow_consumer_timeout_ms = 2000\nmax_buffered_bytes = 65536\nsend_buffer = 16\n";
    let world = StreamWorld::start(r#"{ stream = "big" }"#, extra).await;
    world.stream("big").await;
    const TOTAL: usize = 8_000;
    // ~4 KiB per message: far more than the socket buffers hold for a stalled reader.
    let filler = "x".repeat(4096);
    world
        .publish_padded("", "big", 0..TOTAL as u64, &filler)
        .await;

    // A small receive buffer: the kernel would otherwise grow it (tcp_rmem, up to
    // 32 MiB here) until it held the whole stream.
    let mut slow = connect_small_buffer(&world.server, &world.token).await;
    let subscribe = json!({"type": "subscribe", "id": "s", "mode": "stream", "stream": "big", "offset": "first"});
    slow.send(Message::text(subscribe.to_string()))
        .await
        .expect("send");
    let answer = loop {
        match slow.next().await.expect("open").expect("frame") {
            Message::Text(text) => {
                break serde_json::from_str::<Value>(text.as_str()).expect("JSON");
            }
            _ => continue,
        }
    };
    assert_eq!(answer["type"], "subscribed");
    // The slow socket now reads nothing; the fast one reads everything meanwhile.
    let mut fast = connect(&world.server, &world.token).await;
    let answer = subscribe_stream(&mut fast, "f", "big", json!({"offset": "first"})).await;
    assert_eq!(answer["type"], "subscribed");
    let seen = read_messages(&mut fast, "f", TOTAL).await;
    assert!(
        seen.iter()
            .enumerate()
            .all(|(i, (o, n))| *o == i as u64 && *n == i as u64)
    );

    // The stalled socket is closed (4408) once its buffers are full; under load the
    // broker may feed it later than the fast one, so wait for Warren to let it go.
    let cut = eventually(Duration::from_secs(60), || async {
        world.server.state.sockets.open() == 1
    })
    .await;
    assert!(cut, "the stalled socket was closed; the fast one stays");
    let mut messages = 0;
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(frame)) = slow.next().await {
            if let Message::Text(text) = frame
                && text.as_str().contains("\"type\":\"message\"")
            {
                messages += 1;
            }
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "the slow socket ends (after {messages} of {TOTAL} messages)"
    );
    assert!(
        messages < TOTAL,
        "cut before the end: {messages} of {TOTAL}"
    );
}

#[tokio::test]
async fn stream_subscriptions_are_bounded_per_gateway() {
    let world = StreamWorld::start(
        r#"{ stream = "log" }"#,
        "[streams]\nmax_subscriptions = 1\n",
    )
    .await;
    world.stream("log").await;
    let mut ws = connect(&world.server, &world.token).await;
    let answer = subscribe_stream(&mut ws, "a", "log", json!({})).await;
    assert_eq!(answer["type"], "subscribed");
    let answer = subscribe_stream(&mut ws, "b", "log", json!({})).await;
    assert_eq!(answer["code"], "broker_unavailable", "{answer}");
    let r = world
        .server
        .http
        .get(format!("{}/v1/events?stream=log", world.server.base))
        .bearer_auth(&world.token)
        .send()
        .await
        .expect("events");
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    send(&mut ws, json!({"type": "unsubscribe", "id": "a"})).await;
    assert_eq!(recv(&mut ws).await["type"], "unsubscribed");
    let answer = subscribe_stream(&mut ws, "b", "log", json!({})).await;
    assert_eq!(answer["type"], "subscribed", "the slot was given back");
}
