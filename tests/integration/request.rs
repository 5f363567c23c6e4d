//! Request/reply (SPEC §10) against the real broker: `POST /v1/request` and WebSocket
//! `request` frames, answered by a responder written with plain lapin in the test (it
//! consumes the request queue and publishes to `reply_to` with the `correlation_id`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// How the test's responder answers a request.
#[derive(Clone, Copy)]
enum Answer {
    /// The request's body and content type back, once.
    Echo,
    /// Never.
    Never,
    /// Echo, then a second reply (`"duplicate"`) with the same correlation id.
    Twice,
    /// Echo, but after this delay when the request has the header `slow: true`.
    SlowWhenAsked(Duration),
}

/// A plain AMQP responder on `queue`; stops when dropped.
struct Responder {
    /// Requests it received.
    seen: Arc<AtomicUsize>,
    task: JoinHandle<()>,
    _connection: Connection,
}

impl Responder {
    /// Answers requests on `queue` of the vhost `url` points at; every reply carries the
    /// header `responder: name`, the request's `reply_to` and `message_id`.
    async fn start(url: &str, queue: &str, answer: Answer, name: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("responder connection");
        let channel = connection
            .create_channel()
            .await
            .expect("responder channel");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "responder".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("responder consumes");
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let props = &delivery.properties;
                let text = |v: &Option<lapin::types::ShortString>| {
                    v.as_ref()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default()
                };
                let reply_to = text(props.reply_to());
                let mut headers = FieldTable::default();
                headers.insert(
                    "responder".into(),
                    AMQPValue::LongString(name.as_str().into()),
                );
                headers.insert(
                    "request_reply_to".into(),
                    AMQPValue::LongString(reply_to.as_str().into()),
                );
                headers.insert(
                    "request_message_id".into(),
                    AMQPValue::LongString(text(props.message_id()).as_str().into()),
                );
                let mut reply = BasicProperties::default()
                    .with_correlation_id(text(props.correlation_id()).as_str().into())
                    .with_type("reply".into())
                    .with_headers(headers);
                if let Some(ct) = props.content_type() {
                    reply = reply.with_content_type(ct.clone());
                }
                let slow = props
                    .headers()
                    .as_ref()
                    .is_some_and(|h| h.inner().get("slow") == Some(&AMQPValue::Boolean(true)));
                let delay = match answer {
                    Answer::Never => continue,
                    Answer::SlowWhenAsked(delay) if slow => Some(delay),
                    _ => None,
                };
                let channel = channel.clone();
                let body = delivery.data.clone();
                let twice = matches!(answer, Answer::Twice);
                tokio::spawn(async move {
                    if let Some(delay) = delay {
                        tokio::time::sleep(delay).await;
                    }
                    let send = |body: Vec<u8>, props: BasicProperties| {
                        let channel = channel.clone();
                        let reply_to = reply_to.clone();
                        async move {
                            let _ = channel
                                .basic_publish(
                                    "".into(),
                                    reply_to.as_str().into(),
                                    BasicPublishOptions::default(),
                                    &body,
                                    props,
                                )
                                .await;
                        }
                    };
                    send(body, reply.clone()).await;
                    if twice {
                        send(br#""duplicate""#.to_vec(), reply).await;
                    }
                });
            }
        });
        Self {
            seen,
            task,
            _connection: connection,
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn request(server: &TestServer, token: &str, body: &Value) -> Resp {
    server.post("/v1/request", Some(token), body).await
}

/// Requests awaiting their reply on the tenant's vhost, as Warren counts them.
async fn inflight(server: &TestServer, tenant: &str) -> usize {
    let tenant = server
        .state
        .tenants
        .get(tenant)
        .expect("a configured tenant");
    let broker = tenant.broker().await.expect("its pool");
    broker.rpc_inflight()
}

fn late_replies(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("warren_rpc_late_replies_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_round_trip_carries_json_text_and_binary_bodies_and_properties() {
    let (_rabbit, exchange, queue, _tenant, server, token) = publishing_tenant(|_| {}).await;
    let _responder = Responder::start(&broker_url(), &queue, Answer::Echo, "echo").await;

    let r = request(
        &server,
        &token,
        &json!({"exchange": exchange, "routing_key": "quote.get", "payload": {"sku": "A-1", "n": [1, 2]},
                "properties": {"correlation_id": "my-corr-1", "message_id": "m-1"}, "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["correlation_id"], "my-corr-1");
    assert_eq!(r.body["message_id"], "m-1");
    let reply = &r.body["reply"];
    assert_eq!(reply["payload"], json!({"sku": "A-1", "n": [1, 2]}));
    assert!(reply.get("body").is_none() && reply.get("body_base64").is_none());
    let props = &reply["properties"];
    assert_eq!(props["correlation_id"], "my-corr-1");
    assert_eq!(props["type"], "reply");
    assert_eq!(props["content_type"], "application/json");
    assert_eq!(props["headers"]["responder"], "echo");
    assert_eq!(props["headers"]["request_message_id"], "m-1");
    let reply_to = props["headers"]["request_reply_to"].as_str().unwrap_or("");
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to"),
        "the request was sent with direct reply-to, got {reply_to:?}"
    );

    let r = request(
        &server,
        &token,
        &json!({"exchange": exchange, "routing_key": "quote.get", "body": "héllo wörld"}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["reply"]["body"], "héllo wörld");
    let correlation_id = r.body["correlation_id"].as_str().unwrap_or("");
    assert_eq!(
        correlation_id.len(),
        36,
        "Warren made a UUID: {correlation_id:?}"
    );
    assert_eq!(
        r.body["reply"]["properties"]["correlation_id"],
        correlation_id
    );

    let r = request(
        &server,
        &token,
        &json!({"exchange": exchange, "routing_key": "quote.get", "body_base64": "AAH/gA=="}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["reply"]["body_base64"], "AAH/gA==");
    assert_eq!(
        r.body["reply"]["properties"]["content_type"],
        "application/octet-stream"
    );
    // The RPC channels and their tasks end with the pool: shutdown does not hang.
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "shut down in time: {stopped:?}"
    );
}

#[tokio::test]
async fn requests_are_checked_like_publishes_and_unroutable_ones_are_422() {
    let (_rabbit, exchange, _queue, _tenant, server, token) =
        publishing_on("bound.#", "#", |_| {}).await;
    let body = |extra: Value| {
        let mut body = json!({"exchange": exchange, "routing_key": "bound.x", "payload": 1});
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        body
    };
    let r = request(
        &server,
        &token,
        &body(json!({"routing_key": "nobody.home"})),
    )
    .await;
    assert_problem(&r, 422, "unroutable");
    let r = request(
        &server,
        &token,
        &body(json!({"properties": {"reply_to": "mine"}})),
    )
    .await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("properties.reply_to")
    );
    let r = request(&server, &token, &body(json!({"mandatory": false}))).await;
    assert_problem(&r, 400, "invalid_request");
    let r = request(&server, &token, &body(json!({"timeout_ms": 3_600_001}))).await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("rpc.max_timeout_ms")
    );
    let r = request(&server, &token, &body(json!({"colour": 1}))).await;
    assert_problem(&r, 400, "invalid_request");
    let subscriber = server.token(&_tenant, "subscribe");
    let r = request(&server, &subscriber, &body(json!({}))).await;
    assert_problem(&r, 403, "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_each_get_their_own_reply() {
    let (_rabbit, exchange, queue, tenant, server, token) = publishing_tenant(|_| {}).await;
    let _responder = Responder::start(&broker_url(), &queue, Answer::Echo, "echo").await;
    let tasks: Vec<_> = (0..1000u64)
        .map(|n| {
            let (http, base, token, exchange) = (
                server.http.clone(),
                server.base.clone(),
                token.clone(),
                exchange.clone(),
            );
            tokio::spawn(async move {
                let response = http
                    .post(format!("{base}/v1/request"))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(
                        json!({"exchange": exchange, "routing_key": "n", "payload": {"n": n}})
                            .to_string(),
                    )
                    .send()
                    .await
                    .expect("answered");
                (n, into_resp(response).await)
            })
        })
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(tasks))
        .await
        .expect("every request is answered within a minute");
    for joined in all {
        let (n, r) = joined.expect("the task ran");
        assert_eq!(r.status, 200, "request {n}: {:?}", r.body);
        assert_eq!(
            r.body["reply"]["payload"]["n"], n,
            "request {n} got another's reply"
        );
        assert_eq!(
            r.body["reply"]["properties"]["correlation_id"],
            r.body["correlation_id"]
        );
    }
    assert_eq!(inflight(&server, &tenant).await, 0);
}

#[tokio::test]
async fn a_silent_responder_times_out_in_time_and_nothing_leaks() {
    let (_rabbit, exchange, queue, tenant, server, token) = publishing_tenant(|_| {}).await;
    let silent = Responder::start(&broker_url(), &queue, Answer::Never, "silent").await;
    let started = Instant::now();
    let r = request(
        &server,
        &token,
        &json!({"exchange": exchange, "routing_key": "q", "payload": 1, "timeout_ms": 300}),
    )
    .await;
    let elapsed = started.elapsed();
    assert_problem(&r, 504, "reply_timeout");
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(1300),
        "answered after {elapsed:?}"
    );
    assert_eq!(
        silent.seen.load(Ordering::SeqCst),
        1,
        "the request was delivered"
    );
    assert_eq!(
        inflight(&server, &tenant).await,
        0,
        "nothing waits any more"
    );
}

#[tokio::test]
async fn duplicate_and_late_replies_do_not_confuse_later_requests() {
    let (_rabbit, exchange, queue, tenant, server, token) = publishing_tenant(|_| {}).await;
    let late_before = late_replies(&server.metrics().await);
    {
        let _twice = Responder::start(&broker_url(), &queue, Answer::Twice, "twice").await;
        for n in 0..20 {
            let r = request(
                &server,
                &token,
                &json!({"exchange": exchange, "routing_key": "q", "payload": {"n": n}}),
            )
            .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.body["reply"]["payload"], json!({"n": n}), "request {n}");
        }
    }
    let slow = Duration::from_millis(600);
    let _slow = Responder::start(&broker_url(), &queue, Answer::SlowWhenAsked(slow), "slow").await;
    let r = request(
        &server,
        &token,
        &json!({"exchange": exchange, "routing_key": "q", "payload": "late",
                "properties": {"headers": {"slow": true}}, "timeout_ms": 100}),
    )
    .await;
    assert_problem(&r, 504, "reply_timeout");
    // Requests sent while the late reply is on its way get their own replies.
    let until = Instant::now() + slow + Duration::from_millis(300);
    let mut n = 0;
    while Instant::now() < until {
        let r = request(
            &server,
            &token,
            &json!({"exchange": exchange, "routing_key": "q", "payload": {"after": n}}),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["reply"]["payload"], json!({"after": n}));
        n += 1;
    }
    // 20 duplicates and one late reply were dropped and counted.
    let counted = eventually(Duration::from_secs(5), || async {
        late_replies(&server.metrics().await) >= late_before + 21.0
    })
    .await;
    assert!(counted, "late and duplicate replies are counted");
    assert_eq!(inflight(&server, &tenant).await, 0);
}

#[tokio::test]
async fn tenants_on_separate_vhosts_never_see_each_others_replies() {
    let admin = Admin::new();
    let (vhost_a, vhost_b) = (unique("vh"), unique("vh"));
    admin.vhost(&vhost_a).await;
    admin.vhost(&vhost_b).await;
    let (rabbit_a, rabbit_b) = (rabbit_in(&vhost_a).await, rabbit_in(&vhost_b).await);
    let (queue_a, queue_b) = (
        rabbit_a.queue(FieldTable::default()).await,
        rabbit_b.queue(FieldTable::default()).await,
    );
    let url = |vhost: &str| format!("{}/{vhost}", broker_url().trim_end_matches('/'));
    let _responder_a = Responder::start(&url(&vhost_a), &queue_a, Answer::Echo, "a").await;
    let _responder_b = Responder::start(&url(&vhost_b), &queue_b, Answer::Echo, "b").await;
    let (tenant_a, tenant_b) = (unique("t"), unique("t"));
    let server = TestServer::start_ready(config(&format!(
        "[tenants.{tenant_a}]\nvhost = \"{vhost_a}\"\npublish = [{{ exchange = \"\", routing_key = \"#\" }}]\n\
         [tenants.{tenant_b}]\nvhost = \"{vhost_b}\"\npublish = [{{ exchange = \"\", routing_key = \"#\" }}]\n"
    )))
    .await;
    let (token_a, token_b) = (
        server.token(&tenant_a, "publish"),
        server.token(&tenant_b, "publish"),
    );
    // The same correlation ids on both vhosts, at the same time.
    let mut calls = Vec::new();
    let server = &server;
    for n in 0..50 {
        for (token, queue, who) in [(&token_a, &queue_a, "a"), (&token_b, &queue_b, "b")] {
            let body = json!({"exchange": "", "routing_key": queue, "payload": {"who": who, "n": n},
                              "properties": {"correlation_id": format!("shared-{n}")}});
            calls.push(async move { (who, n, request(server, token, &body).await) });
        }
    }
    for (who, n, r) in futures::future::join_all(calls).await {
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["reply"]["payload"], json!({"who": who, "n": n}));
        assert_eq!(r.body["reply"]["properties"]["headers"]["responder"], who);
    }
    assert_eq!(inflight(server, &tenant_a).await, 0);
    assert_eq!(inflight(server, &tenant_b).await, 0);
}

/// Two tenants sharing one vhost (one RPC channel each, so the old shared channel would
/// hand the late reply over): tenant A's request times out; tenant B then waits on the
/// same correlation id; A's late reply must not reach B.
#[tokio::test]
async fn a_late_reply_never_reaches_another_tenant_on_the_same_vhost() {
    let rabbit = Rabbit::connect().await;
    let slow_queue = rabbit.queue(FieldTable::default()).await;
    let silent_queue = rabbit.queue(FieldTable::default()).await;
    let slow = Duration::from_millis(500);
    let _slow =
        Responder::start(&broker_url(), &slow_queue, Answer::SlowWhenAsked(slow), "a").await;
    let (tenant_a, tenant_b) = (unique("t"), unique("t"));
    let mut config = config(&format!(
        "[tenants.{tenant_a}]\nvhost = \"/\"\npublish = [{{ exchange = \"\", routing_key = \"#\" }}]\n\
         [tenants.{tenant_b}]\nvhost = \"/\"\npublish = [{{ exchange = \"\", routing_key = \"#\" }}]\n"
    ));
    config.rpc.channels_per_vhost = 1;
    let server = TestServer::start_ready(config).await;
    let (token_a, token_b) = (
        server.token(&tenant_a, "publish"),
        server.token(&tenant_b, "publish"),
    );
    let a = request(
        &server,
        &token_a,
        &json!({"exchange": "", "routing_key": slow_queue, "payload": {"secret": "of a"},
                "properties": {"correlation_id": "guessable-1", "headers": {"slow": true}},
                "timeout_ms": 100}),
    )
    .await;
    assert_problem(&a, 504, "reply_timeout");
    // B waits on the same id while A's reply is on its way (nobody answers B).
    let b = request(
        &server,
        &token_b,
        &json!({"exchange": "", "routing_key": silent_queue, "payload": "b",
                "properties": {"correlation_id": "guessable-1"}, "timeout_ms": 1500}),
    )
    .await;
    assert_problem(&b, 504, "reply_timeout");
    assert!(!b.body.to_string().contains("of a"), "{:?}", b.body);
    assert_eq!(inflight(&server, &tenant_b).await, 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_correlation_id_in_flight_on_every_channel_is_refused() {
    let (_rabbit, exchange, queue, _tenant, server, token) = publishing_tenant(|config| {
        config.rpc.channels_per_vhost = 1;
    })
    .await;
    let _silent = Responder::start(&broker_url(), &queue, Answer::Never, "silent").await;
    let body = json!({"exchange": exchange, "routing_key": "q", "payload": 1,
                      "properties": {"correlation_id": "same"}, "timeout_ms": 1500});
    let first = request(&server, &token, &body);
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        request(&server, &token, &body).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_problem(&first, 504, "reply_timeout");
    assert_problem(&second, 409, "idempotency_key_in_use");
    assert_eq!(second.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn an_idempotent_request_replays_the_stored_reply_without_sending_again() {
    let (_rabbit, exchange, queue, _tenant, server, token) = publishing_tenant(|_| {}).await;
    let responder = Responder::start(&broker_url(), &queue, Answer::Echo, "echo").await;
    let body = json!({"exchange": exchange, "routing_key": "q", "payload": {"order": 7}});
    let send = || {
        server
            .http
            .post(format!("{}/v1/request", server.base))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .header("idempotency-key", "order-7")
            .body(body.to_string())
            .send()
    };
    let first = into_resp(send().await.expect("answered")).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);
    let again = into_resp(send().await.expect("answered")).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body, "the stored reply, byte for byte");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(responder.seen.load(Ordering::SeqCst), 1, "sent once");
}

#[tokio::test]
async fn a_websocket_request_is_answered_by_a_reply_frame() {
    let (_rabbit, exchange, queue, tenant, server, _token) = publishing_tenant(|_| {}).await;
    let _responder = Responder::start(&broker_url(), &queue, Answer::Echo, "echo").await;
    let token = server.token(&tenant, "publish subscribe");
    let mut ws = ws_connect(&server.base, &token).await;
    let frame = json!({"type": "request", "id": "r1", "exchange": exchange, "routing_key": "q",
                       "payload": {"ws": true}, "properties": {"correlation_id": "ws-1"}, "timeout_ms": 5000});
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("sent");
    let silent = json!({"type": "request", "id": "r2", "exchange": exchange, "routing_key": "q",
                        "payload": 2, "properties": {"reply_to": "x"}});
    ws.send(Message::Text(silent.to_string().into()))
        .await
        .expect("sent");
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while frames.len() < 2 {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("frames in time");
        if let Some(Ok(Message::Text(text))) = next {
            frames.push(serde_json::from_str::<Value>(text.as_str()).expect("JSON frame"));
        }
    }
    let reply = frames
        .iter()
        .find(|f| f["id"] == "r1")
        .expect("a frame for r1");
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["correlation_id"], "ws-1");
    assert_eq!(reply["reply"]["payload"], json!({"ws": true}));
    assert_eq!(reply["reply"]["properties"]["headers"]["responder"], "echo");
    let error = frames
        .iter()
        .find(|f| f["id"] == "r2")
        .expect("a frame for r2");
    assert_eq!(
        (&error["type"], &error["code"]),
        (&json!("error"), &json!("invalid_request"))
    );
}

#[tokio::test]
async fn a_lost_link_fails_waiting_requests_fast_and_requests_work_again_after() {
    let proxy = ChaosProxy::start().await;
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, &exchange, "#");
    config.amqp.url = Some(proxy.url());
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish");
    let _responder = Responder::start(
        &broker_url(),
        &queue,
        Answer::SlowWhenAsked(Duration::from_secs(30)),
        "slow",
    )
    .await;
    let slow_body = json!({"exchange": exchange, "routing_key": "q", "payload": 1,
                           "properties": {"headers": {"slow": true}}, "timeout_ms": 20000});
    let waiting = request(&server, &token, &slow_body);
    let cut = async {
        let waiting = eventually(Duration::from_secs(5), || async {
            inflight(&server, &tenant).await == 1
        })
        .await;
        assert!(waiting, "the request is awaiting its reply");
        proxy.cut();
        Instant::now()
    };
    let (r, cut_at) = tokio::join!(waiting, cut);
    let failed_after = cut_at.elapsed();
    assert_problem(&r, 503, "broker_unavailable");
    assert!(r.header("retry-after").is_some());
    assert!(
        failed_after < Duration::from_secs(3),
        "failed {failed_after:?} after the cut"
    );
    assert_eq!(inflight(&server, &tenant).await, 0);
    proxy.restore();
    let recovered = eventually(Duration::from_secs(20), || async {
        request(
            &server,
            &token,
            &json!({"exchange": exchange, "routing_key": "q", "payload": "again", "timeout_ms": 2000}),
        )
        .await
        .status
            == 200
    })
    .await;
    assert!(
        recovered,
        "requests are answered again once the link is back"
    );
}

#[tokio::test]
async fn a_reply_over_the_size_bound_is_dropped_and_answered_502() {
    let (_rabbit, exchange, queue, tenant, server, token) = publishing_tenant(|config| {
        config.rpc.max_reply_bytes = 64;
    })
    .await;
    let _responder = Responder::start(&broker_url(), &queue, Answer::Echo, "echo").await;
    let body = |text: String| json!({"exchange": exchange, "routing_key": "q", "body": text});
    let r = request(&server, &token, &body("x".repeat(65))).await;
    assert_problem(&r, 502, "reply_too_large");
    assert!(
        !r.body["detail"].as_str().unwrap_or("").contains("65"),
        "the size is not quoted"
    );
    let r = request(&server, &token, &body("x".repeat(64))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(inflight(&server, &tenant).await, 0);
}

#[tokio::test]
async fn past_rpc_max_inflight_a_request_is_refused_at_once_with_503() {
    let (_rabbit, exchange, queue, tenant, server, token) = publishing_tenant(|config| {
        config.rpc.max_inflight = 1;
    })
    .await;
    let _silent = Responder::start(&broker_url(), &queue, Answer::Never, "silent").await;
    let waiting_body =
        json!({"exchange": exchange, "routing_key": "q", "payload": 1, "timeout_ms": 2000});
    let waiting = request(&server, &token, &waiting_body);
    let refused = async {
        let full = eventually(Duration::from_secs(5), || async {
            inflight(&server, &tenant).await == 1
        })
        .await;
        assert!(full, "the first request awaits its reply");
        let started = Instant::now();
        let r = request(&server, &token, &waiting_body).await;
        (r, started.elapsed())
    };
    let (first, (second, took)) = tokio::join!(waiting, refused);
    assert_problem(&first, 504, "reply_timeout");
    assert_problem(&second, 503, "broker_unavailable");
    assert!(second.header("retry-after").is_some());
    assert!(
        second.body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("rpc.max_inflight"),
        "{:?}",
        second.body
    );
    assert!(
        took < Duration::from_millis(500),
        "refused at once, not after {took:?}"
    );
    assert_eq!(inflight(&server, &tenant).await, 0);
}
