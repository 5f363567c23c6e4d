//! Attacks from the third isolation review (issue #27), each against the real broker:
//! what Warren republishes routes only where a grant allowed, no input closes a channel
//! other tenants share, long-held requests cannot starve other tenants, and what Warren
//! keeps for a tenant stays bounded.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use serde_json::json;

use crate::common::*;
use crate::queues::{attempt, settle, subscribe_queue};
use crate::topology::topology_toml;
use crate::ws::{connect, recv, recv_within, send};

/// A fresh vhost shared by tenant `acme` (publish `events`, consume queue `jobs` with
/// a one-delay retry policy, `jobs` bound to `events` by `#`) and a queue `victim`
/// of another tenant of the vhost, which acme has no grant for.
async fn retrying_vhost() -> (Admin, Rabbit, String, TestServer) {
    let admin = Admin::new();
    let vhost = unique("iso");
    admin.vhost(&vhost).await;
    let tables = "publish = [{ exchange = \"events\", routing_key = \"#\" }]\n\
                  subscribe = [{ queue = \"jobs\" }]\n\
                  [[tenants.acme.exchanges]]\nname = \"events\"\ntype = \"topic\"\n\
                  [[tenants.acme.queues]]\nname = \"jobs\"\n\
                  bindings = [{ exchange = \"events\", routing_key = \"#\" }]\n\
                  retry = { delays_ms = [100] }\n\
                  [[tenants.acme.queues]]\nname = \"victim\"\n";
    let toml = topology_toml(&vhost, tables).replacen(
        "[auth]",
        "[topology]\napply_on_start = true\n[auth]",
        1,
    );
    let config = warren::config::Config::from_toml(&toml).expect("config");
    let server = TestServer::start_ready(config).await;
    let rabbit = rabbit_in(&vhost).await;
    (admin, rabbit, vhost, server)
}

fn cc(queue: &str) -> AMQPValue {
    AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(queue.into())]))
}

#[tokio::test]
async fn cc_headers_never_route_a_retried_dead_lettered_or_redriven_message_to_another_queue() {
    let (_admin, rabbit, vhost, server) = retrying_vhost().await;
    // Through Warren: CC on acme's own exchange is granted (`#` covers the key), and
    // routes nowhere there.
    let publisher = server.token("acme", "publish");
    let r = server
        .publish(
            &publisher,
            &json!({"exchange": "events", "routing_key": "order.created", "payload": 1,
                    "properties": {"headers": {"CC": ["victim"], "BCC": ["victim"]}}}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    // From an AMQP producer, CC set (on `events` it names a key bound nowhere).
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), cc("victim"));
    rabbit
        .channel
        .basic_publish(
            "events".into(),
            "order.created".into(),
            BasicPublishOptions::default(),
            b"2",
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(rabbit.wait_count("jobs", 2).await, 2);
    assert_eq!(rabbit.count("victim").await, 0);

    let token = server.token("acme", "subscribe");
    let mut ws = connect(&server, &token).await;
    assert_eq!(
        subscribe_queue(&mut ws, "w", "jobs", 10).await["type"],
        "subscribed"
    );
    // Each message: nacked once (the retry hop), then again (the DLQ).
    let mut dead = 0;
    while dead < 2 {
        let frame = recv_within(&mut ws, Duration::from_secs(5)).await;
        assert_eq!(frame["type"], "message", "{frame}");
        if attempt(&frame) == Some(1) {
            dead += 1;
        }
        settle(&mut ws, "nack", &frame, false).await;
    }
    assert_eq!(rabbit.wait_count("jobs.dlq", 2).await, 2);
    assert_eq!(
        rabbit.count("victim").await,
        0,
        "a retry hop or the DLQ move delivered a copy to the queue CC names"
    );

    // Redrive moves them back through the default exchange too.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("warren.toml");
    let tables = "[[tenants.acme.queues]]\nname = \"jobs\"\nretry = { delays_ms = [100] }\n";
    std::fs::write(&path, topology_toml(&vhost, tables)).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["topology", "redrive", "--tenant", "acme", "--queue", "jobs"])
        .arg("--config")
        .arg(&path)
        .output()
        .expect("warren topology redrive");
    assert_success(&out);
    for _ in 0..2 {
        let frame = recv_within(&mut ws, Duration::from_secs(5)).await;
        assert_eq!(frame["type"], "message", "{frame}");
        assert!(
            frame["properties"]["headers"].get("CC").is_none(),
            "{frame}"
        );
        settle(&mut ws, "ack", &frame, false).await;
    }
    assert_eq!(rabbit.wait_count("jobs", 0).await, 0);
    assert_eq!(
        rabbit.count("victim").await,
        0,
        "the redrive delivered a copy to the queue CC names"
    );
}

/// `mallory` and `alice` on vhost `/`, each granted every exchange and key.
fn co_tenants(extra: &str) -> warren::config::Config {
    config(&format!(
        "[tenants.mallory]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n\
         [tenants.alice]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n{extra}"
    ))
}

/// Publishes to `exchange` as `token`, 16 at a time, until `stop` fires; returns
/// (publishes answered 202, the other answers' statuses and bodies).
fn publish_until(
    server: &TestServer,
    token: String,
    exchange: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let (http, url) = (server.http.clone(), format!("{}/v1/publish", server.base));
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0, Vec::new());
        let body = json!({"exchange": exchange, "routing_key": "co.tenant", "payload": 1, "mandatory": false})
            .to_string();
        while !*stop.borrow() {
            let round = (0..16).map(|_| {
                http.post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
            });
            for answer in futures::future::join_all(round).await {
                match answer {
                    Ok(r) if r.status() == 202 => ok += 1,
                    Ok(r) => failed.push(format!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
            }
        }
        (ok, failed)
    })
}

#[tokio::test]
async fn inputs_the_broker_answers_with_a_channel_close_never_reach_the_shared_channel() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let _queue = rabbit.bound_queue(&exchange, "#").await;
    let internal = rabbit.internal_exchange().await;
    let mut config = co_tenants("");
    // One pooled channel: every publish of the vhost goes through it.
    config.amqp.channels_per_vhost = 1;
    config.amqp.max_message_bytes = 4096;
    let server = TestServer::start_ready(config).await;
    let mallory = server.token("mallory", "publish");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let alice = publish_until(
        &server,
        server.token("alice", "publish"),
        exchange.clone(),
        stopped,
    );

    let reply_to = json!({"exchange": exchange, "routing_key": "a", "payload": 1,
                          "properties": {"reply_to": "amq.rabbitmq.reply-to"}});
    let to_internal = json!({"exchange": internal, "routing_key": "a", "payload": 1});
    let too_large = json!({"exchange": exchange, "routing_key": "a", "body": "x".repeat(5000)});
    for round in 0..10 {
        for (body, status, code, says) in [
            (&reply_to, 400, "invalid_request", "reply_to"),
            (&to_internal, 400, "invalid_request", "internal"),
            (
                &too_large,
                413,
                "payload_too_large",
                "amqp.max_message_bytes",
            ),
        ] {
            let r = server.publish(&mallory, body).await;
            assert_problem(&r, status, code);
            let detail = r.body["detail"].as_str().unwrap_or_default();
            assert!(detail.contains(says), "round {round}: {detail}");
            assert!(!detail.contains("vhost"), "{detail}");
        }
        // The same through a batch and a request (its own channel, the same rule).
        let r = server
            .post(
                "/v1/publish/batch",
                Some(&mallory),
                &json!({"messages": [to_internal]}),
            )
            .await;
        assert_eq!(
            r.body["results"][0]["code"], "invalid_request",
            "{:?}",
            r.body
        );
        let r = server
            .post(
                "/v1/request",
                Some(&mallory),
                &json!({"exchange": internal, "routing_key": "a", "payload": 1, "timeout_ms": 500}),
            )
            .await;
        assert_problem(&r, 400, "invalid_request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send_replace(true);
    let (ok, failed) = alice.await.expect("alice's publisher");
    assert!(ok > 0, "alice published nothing");
    assert!(
        failed.is_empty(),
        "{} of alice's publishes failed while mallory sent channel-closing input: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("warren_publish_total{tenant=\"mallory\",outcome=\"refused\"}"),
        "refusals are counted"
    );
}

#[tokio::test]
async fn an_exchange_the_gateways_credentials_may_not_write_is_403_and_closes_nothing() {
    let admin = Admin::new();
    let vhost = unique("perm");
    admin.vhost(&vhost).await;
    let user = unique("user");
    // May write only exchanges whose names start with `wt-ok`.
    admin
        .user(&user, "pw", &vhost, [".*", "^wt-ok", ".*"])
        .await;
    let rabbit = rabbit_in(&vhost).await;
    let open = format!("wt-ok-{}", unique("x"));
    rabbit
        .channel
        .exchange_declare(
            open.as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange_declare");
    let closed = rabbit.topic_exchange().await;
    let url = broker_url();
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let host = host.split(['/', '?']).next().unwrap_or(host);
    let mut config = config(&format!(
        "[tenants.acme]\nvhost = \"{vhost}\"\namqp_url = \"{scheme}://{user}:pw@{host}/\"\n\
         publish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n"
    ));
    config.amqp.channels_per_vhost = 1;
    let server = TestServer::start_ready(config).await;
    let token = server.token("acme", "publish");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let fine = publish_until(&server, token.clone(), open.clone(), stopped);
    for _ in 0..10 {
        let r = server
            .publish(
                &token,
                &json!({"exchange": closed, "routing_key": "a", "payload": 1, "mandatory": false}),
            )
            .await;
        assert_problem(&r, 403, "forbidden");
        let detail = r.body["detail"].as_str().unwrap_or_default();
        assert!(
            !detail.contains(&vhost) && !detail.contains(&user),
            "{detail}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send_replace(true);
    let (ok, failed) = fine.await.expect("publisher");
    assert!(
        ok > 0 && failed.is_empty(),
        "{ok} ok, {} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
}

#[tokio::test]
async fn requests_waiting_for_replies_hold_no_work_slot_another_tenant_needs() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    // Bound, so requests route; nothing ever answers them.
    let _silent = rabbit.bound_queue(&exchange, "#").await;
    let admin = Admin::new();
    let other_vhost = unique("iso-other");
    admin.vhost(&other_vhost).await;
    let mut config = config(&format!(
        "[tenants.mallory]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n\
         [tenants.mallory.limits]\nmax_waiting_requests = 40\n\
         [tenants.alice]\nvhost = \"{other_vhost}\"\n\
         publish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n"
    ));
    // Fewer work slots than mallory may hold requests waiting.
    config.server.max_concurrent_requests = 20;
    let server = TestServer::start_ready(config).await;
    let mallory = server.token("mallory", "publish");
    let held: Vec<_> = (0..40)
        .map(|_| {
            let (http, url) = (server.http.clone(), format!("{}/v1/request", server.base));
            let (token, exchange) = (mallory.clone(), exchange.clone());
            tokio::spawn(async move {
                http.post(url)
                    .bearer_auth(token)
                    .json(
                        &json!({"exchange": exchange, "routing_key": "rpc", "payload": 1,
                                  "timeout_ms": 8000}),
                    )
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    let all_waiting = eventually(Duration::from_secs(10), || async {
        server.state.waiting.in_use() == 40
    })
    .await;
    assert!(all_waiting, "mallory's 40 requests are waiting");
    // Mallory's share is used up: the next one is refused at once.
    let started = std::time::Instant::now();
    let r = server
        .post(
            "/v1/request",
            Some(&mallory),
            &json!({"exchange": exchange, "routing_key": "rpc", "payload": 1, "timeout_ms": 8000}),
        )
        .await;
    assert_problem(&r, 429, "rate_limited");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        server
            .metrics()
            .await
            .contains("warren_http_waiting_requests 40")
    );
    // Alice, on another vhost, publishes at once, however many work slots there are.
    let alice = server.token("alice", "publish");
    for _ in 0..30 {
        let started = std::time::Instant::now();
        let r = server
            .publish(
                &alice,
                &json!({"exchange": "amq.topic", "routing_key": "a", "payload": 1, "mandatory": false}),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "alice's publish waited {:?} behind mallory's requests",
            started.elapsed()
        );
    }
    for request in held {
        request.abort();
    }
}

#[tokio::test]
async fn bodies_over_the_delivery_bound_are_never_assembled_or_forwarded() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let dlq = rabbit.queue(FieldTable::default()).await;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.as_str().into()),
    );
    let queue = rabbit.queue(arguments).await;
    rabbit.bind(&queue, &exchange, "#").await;
    let tenant = unique("t");
    let mut config = config(&format!(
        "[tenants.{tenant}]\nvhost = \"/\"\n\
         subscribe = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}, {{ queue = \"{queue}\" }}]\n"
    ));
    config.amqp.max_delivery_bytes = 64 * 1024;
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "subscribe");
    let mut ws = connect(&server, &token).await;
    assert_eq!(
        subscribe_queue(&mut ws, "q", &queue, 10).await["type"],
        "subscribed"
    );
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "l", "exchange": exchange, "binding_key": "#", "mode": "live"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    let poisoned = || async {
        server
            .metrics()
            .await
            .lines()
            .filter(|l| {
                l.starts_with("warren_poison_messages_total") && l.contains("body_too_large")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let before = poisoned().await;
    for body in [vec![b'x'; 200 * 1024], b"\"small\"".to_vec()] {
        rabbit
            .channel
            .basic_publish(
                exchange.as_str().into(),
                "k".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    // Only the small message reaches either subscription.
    let mut got = Vec::new();
    for _ in 0..2 {
        let frame = recv_within(&mut ws, Duration::from_secs(5)).await;
        assert_eq!(frame["payload"], "small", "{frame}");
        got.push(
            frame["subscription"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        if frame["subscription"] == "q" {
            settle(&mut ws, "ack", &frame, false).await;
        }
    }
    got.sort();
    assert_eq!(got, ["l", "q"]);
    // The large one was rejected by the queue subscription: dead-lettered, not lost.
    assert_eq!(rabbit.wait_count(&dlq, 1).await, 1);
    let counted = eventually(Duration::from_secs(5), || async {
        poisoned().await >= before + 2
    })
    .await;
    assert!(counted, "both refusals are counted as body_too_large");
}

#[tokio::test]
async fn a_few_dynamic_tenants_cannot_fill_the_idempotency_store_for_a_new_one() {
    let admin = Admin::new();
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut rabbits = Vec::new();
    for t in ["a", "b", "newcomer"] {
        let vhost = format!("wtidem-{run}-{t}");
        admin.vhost(&vhost).await;
        let rabbit = rabbit_in(&vhost).await;
        rabbit.bound_queue("amq.topic", "#").await;
        rabbits.push(rabbit);
    }
    let mut config = config(&format!(
        "[dynamic_tenants]\nenabled = true\nvhost_template = \"wtidem-{run}-{{tenant}}\"\n\
         publish = [{{ exchange = \"amq.topic\", routing_key = \"#\" }}]\n"
    ));
    config.idempotency.max_entries = 40;
    assert!(
        config
            .warnings()
            .iter()
            .any(|w| w.contains("idempotency.max_entries")),
        "check-config warns that 40 entries cannot give each of up to 1,000 tenants a useful share"
    );
    let server = TestServer::start_ready(config).await;
    let event = |token: &str, id: String| {
        server
            .http
            .post(format!("{}/v1/events/amq.topic", server.base))
            .bearer_auth(token.to_owned())
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "/isolation")
            .header("ce-type", "t")
            .header("content-type", "application/json")
            .body("1")
            .send()
    };
    // Two tenants fill the store with CloudEvents (each takes an entry).
    for tenant in ["a", "b"] {
        let token = server.token(tenant, "publish");
        for i in 0..40 {
            let r = into_resp(event(&token, format!("{tenant}-{i}")).await.expect("event")).await;
            assert_eq!(r.status, 202, "{tenant} {i}: {:?}", r.body);
        }
    }
    // A new tenant still gets its events and keyed publishes through.
    let token = server.token("newcomer", "publish");
    for i in 0..10 {
        let r = into_resp(event(&token, format!("n-{i}")).await.expect("event")).await;
        assert_eq!(r.status, 202, "newcomer event {i}: {:?}", r.body);
    }
    let r = server
        .http
        .post(format!("{}/v1/publish", server.base))
        .bearer_auth(&token)
        .header("idempotency-key", "k1")
        .json(
            &json!({"exchange": "amq.topic", "routing_key": "x", "payload": 1, "mandatory": false}),
        )
        .send()
        .await
        .expect("publish");
    assert_eq!(r.status(), 202);
    // An event already seen is still recognised for the tenants that filled it: each
    // keeps at least its share (40 / 3).
    let a = server.token("a", "publish");
    let replay = into_resp(event(&a, "a-39".into()).await.expect("event")).await;
    assert_eq!(
        replay.header("idempotent-replayed"),
        Some("true"),
        "{:?}",
        replay.body
    );
}

#[tokio::test]
async fn the_public_readiness_answer_names_no_vhost_and_quotes_no_error() {
    let port = closed_port().await;
    let vhost = unique("secret-vhost");
    let mut config = config(&format!(
        "[tenants.acme]\nvhost = \"{vhost}\"\npublish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n\
         [idempotency]\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}\"\n"
    ));
    config.amqp.url = Some(format!("amqp://guest:guest@127.0.0.1:{port}"));
    let server = TestServer::start_with_metrics_listener(config).await;
    // Operators see why, once the first attempts have failed.
    let explained = eventually(Duration::from_secs(10), || async {
        let r = server.operator_get("/readyz").await;
        r.body["brokers"][0]["error"].is_string() && r.body["idempotency"]["error"].is_string()
    })
    .await;
    assert!(explained, "{:?}", server.operator_get("/readyz").await.body);
    let operator = server.operator_get("/readyz").await;
    assert_eq!(operator.body["brokers"][0]["vhost"], vhost.as_str());
    // Anyone who reaches the API port sees the verdict and which part is down only.
    let public = server.get("/readyz").await;
    assert_eq!(public.status, 503);
    assert_eq!(
        public.body,
        json!({"status": "not_ready",
               "brokers": [{"connected": false, "blocked": false}],
               "idempotency": {"store": "redis", "ok": false}})
    );
    let text = public.body.to_string();
    assert!(
        !text.contains(&vhost) && !text.contains(&port.to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn a_publisher_cannot_set_warren_headers_to_skip_retry_delays() {
    let (_rabbit, exchange, _queue, _tenant, server, token) = publishing_tenant(|_| {}).await;
    for name in ["x-warren-attempt", "X-Warren-Attempt", "x-warren-anything"] {
        let r = server
            .publish(
                &token,
                &json!({"exchange": exchange, "routing_key": "a", "payload": 1,
                        "properties": {"headers": {name: 1}}}),
            )
            .await;
        assert_problem(&r, 400, "invalid_request");
        assert!(
            r.body["detail"].as_str().unwrap_or_default().contains(name),
            "{:?}",
            r.body
        );
    }
    // The same rule for a batch item and a WebSocket publish frame.
    let r = server
        .post(
            "/v1/publish/batch",
            Some(&token),
            &json!({"messages": [{"exchange": exchange, "routing_key": "a", "payload": 1,
                                  "properties": {"headers": {"x-warren-attempt": 1}}}]}),
        )
        .await;
    assert_problem(&r, 400, "invalid_request");
    let mut ws = connect(&server, &token).await;
    send(
        &mut ws,
        json!({"type": "publish", "id": "p", "exchange": exchange, "routing_key": "a",
               "payload": 1, "properties": {"headers": {"x-warren-attempt": 1}}}),
    )
    .await;
    let answer = recv(&mut ws).await;
    assert_eq!(answer["code"], "invalid_request", "{answer}");
    // Headers that merely look alike are the publisher's.
    let r = server
        .publish(
            &token,
            &json!({"exchange": exchange, "routing_key": "a", "payload": 1,
                    "properties": {"headers": {"x-warrenish": 1, "warren-attempt": 1}}}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
}
