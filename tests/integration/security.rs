//! Attacks from the security review (#13), each against the real broker: a tenant tries
//! to walk around its grants or to hurt a co-tenant on the same vhost, and the co-tenant
//! keeps getting 2xx meanwhile.

use std::time::{Duration, Instant};

use lapin::ExchangeKind;
use serde_json::{Value, json};

use crate::common::*;
use crate::ws::{connect, recv, send, subscribe};

/// `mallory` may publish `eu.*` and subscribe `eu.*` on every exchange; `alice`, on the
/// same vhost, may do anything. `extra` adds keys to mallory's table.
fn shared_vhost(extra: &str) -> warren::config::Config {
    config(&format!(
        "[tenants.mallory]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"*\", routing_key = \"eu.*\" }}]\n\
         subscribe = [{{ exchange = \"*\", routing_key = \"eu.*\" }}]\n{extra}\n\
         [tenants.alice]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n\
         subscribe = [{{ exchange = \"*\", routing_key = \"#\" }}]\n"
    ))
}

fn message(exchange: &str, routing_key: &str, headers: Value) -> Value {
    json!({"exchange": exchange, "routing_key": routing_key, "body": "x",
           "properties": {"headers": headers}})
}

/// Alice's publish still answers 202 (the co-tenant is unaffected).
async fn alice_publishes(server: &TestServer, exchange: &str) {
    let alice = server.token("alice", "publish subscribe");
    let r = server
        .publish(&alice, &json!({"exchange": exchange, "routing_key": "any.key", "body": "ok", "mandatory": false}))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
}

#[tokio::test]
async fn cc_and_bcc_keys_must_each_be_granted() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let secret = rabbit.bound_queue(&exchange, "us.secret").await;
    let granted = rabbit.bound_queue(&exchange, "eu.copy").await;
    let server = TestServer::start_ready(shared_vhost("")).await;
    let token = server.token("mallory", "publish");

    for header in ["CC", "BCC"] {
        let r = server
            .publish(
                &token,
                &message(&exchange, "eu.x", json!({header: ["us.secret"]})),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden"),
            "{header}: {:?}",
            r.body
        );
    }
    // The default exchange routes by queue name: CC naming a queue is refused too.
    let r = server
        .publish(
            &token,
            &message("", "eu.x", json!({"CC": [secret.clone()]})),
        )
        .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    // A batch item and a WebSocket publish frame take the same path.
    let r = server
        .post(
            "/v1/publish/batch",
            Some(&token),
            &json!({"messages": [message(&exchange, "eu.x", json!({"BCC": ["us.secret"]}))]}),
        )
        .await;
    assert_eq!(r.body["results"][0]["code"], "forbidden", "{:?}", r.body);
    let mut ws = connect(&server, &token).await;
    let mut frame = message(&exchange, "eu.x", json!({"CC": ["us.secret"]}));
    frame["type"] = json!("publish");
    frame["id"] = json!("p1");
    send(&mut ws, frame).await;
    assert_eq!(recv(&mut ws).await["code"], "forbidden");

    // Anything but an array of strings would make the broker close the channel.
    for bad in [json!("us.secret"), json!([1]), json!({"k": "v"})] {
        let r = server
            .publish(&token, &message(&exchange, "eu.x", json!({"CC": bad})))
            .await;
        assert_problem(&r, 400, "invalid_request");
    }
    // Granted CC keys are allowed and route as RabbitMQ says.
    let r = server
        .publish(
            &token,
            &message(&exchange, "eu.x", json!({"CC": ["eu.copy"]})),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(rabbit.wait_count(&granted, 1).await, 1);
    assert_eq!(rabbit.count(&secret).await, 0, "nothing reached us.secret");
    alice_publishes(&server, &exchange).await;
}

#[tokio::test]
async fn oversized_header_tables_are_refused_before_the_broker_and_co_tenants_never_notice() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let server = TestServer::start_ready(shared_vhost("")).await;
    let mallory = server.token("mallory", "publish");
    let alice = server.token("alice", "publish subscribe");
    let mut watcher = connect(&server, &alice).await;
    assert_eq!(
        subscribe(&mut watcher, "s", &exchange, "#").await["type"],
        "subscribed"
    );

    let huge_string = json!({"big": "x".repeat(140_000)});
    let huge_array = json!({"big": vec![1; 60_000]});
    for headers in [huge_string, huge_array] {
        let r = server
            .publish(&mallory, &message(&exchange, "eu.x", headers))
            .await;
        assert_problem(&r, 400, "invalid_request");
        let detail = r.body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("server.max_headers_bytes"), "{detail}");
    }
    // The shared connection is intact: alice publishes and her subscription delivers.
    alice_publishes(&server, &exchange).await;
    let delivered = recv(&mut watcher).await;
    assert_eq!(delivered["type"], "message", "{delivered}");
    assert_eq!(delivered["routing_key"], "any.key");
}

#[tokio::test]
async fn exchanges_that_ignore_binding_keys_leak_nothing() {
    let rabbit = Rabbit::connect().await;
    let fanout = rabbit.exchange(ExchangeKind::Fanout).await;
    let server = TestServer::start_ready(shared_vhost("")).await;
    let token = server.token("mallory", "subscribe");
    let mut ws = connect(&server, &token).await;
    for (i, known) in ["amq.fanout", "amq.headers", "amq.match"]
        .iter()
        .enumerate()
    {
        let answer = subscribe(&mut ws, &format!("k{i}"), known, "eu.x").await;
        assert_eq!(answer["code"], "forbidden", "{known}: {answer}");
    }
    // A fanout exchange of another name: Warren filters by the binding key.
    assert_eq!(
        subscribe(&mut ws, "f", &fanout, "eu.x").await["type"],
        "subscribed"
    );
    for key in ["us.secret", "eu.y", "eu.x"] {
        rabbit
            .channel
            .basic_publish(
                fanout.as_str().into(),
                key.into(),
                Default::default(),
                key.as_bytes(),
                Default::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("published");
    }
    let first = recv(&mut ws).await;
    assert_eq!(first["routing_key"], "eu.x", "only the bound key: {first}");
    let after = tokio::time::timeout(Duration::from_millis(500), recv(&mut ws)).await;
    assert!(after.is_err(), "nothing else arrives: {after:?}");
}

#[tokio::test]
async fn a_pathological_binding_key_is_decided_at_once_and_right() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let server = TestServer::start_ready(shared_vhost("")).await;
    // ~160 bytes of `#`, `*` and literal words: exponential for the old check.
    let binding: String = (0..30)
        .map(|i| format!("#.*.w{i}"))
        .collect::<Vec<_>>()
        .join(".")[..160]
        .trim_end_matches('.')
        .to_owned();
    let started = Instant::now();
    let mut mallory = connect(&server, &server.token("mallory", "subscribe")).await;
    let refused = subscribe(&mut mallory, "m", &exchange, &binding).await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    // A tenant granted `#` may bind it: the answer is right, not only fast.
    let mut alice = connect(&server, &server.token("alice", "subscribe")).await;
    let allowed = subscribe(&mut alice, "a", &exchange, &binding).await;
    assert_eq!(allowed["type"], "subscribed", "{allowed}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(server.get("/healthz").await.status, 200);
}

#[tokio::test]
async fn one_tenant_cannot_take_a_shared_vhosts_consumers() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let server = TestServer::start_ready(shared_vhost("limits = { max_consumers = 3 }")).await;
    let mut mallory = connect(&server, &server.token("mallory", "subscribe")).await;
    for i in 0..3 {
        let answer = subscribe(
            &mut mallory,
            &format!("s{i}"),
            &exchange,
            &format!("eu.k{i}"),
        )
        .await;
        assert_eq!(answer["type"], "subscribed", "{answer}");
    }
    let refused = subscribe(&mut mallory, "s3", &exchange, "eu.k3").await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    // Joining a topic that already exists takes no new consumer.
    let shared = subscribe(&mut mallory, "again", &exchange, "eu.k0").await;
    assert_eq!(shared["type"], "subscribed", "{shared}");
    // The co-tenant subscribes and publishes as usual.
    let mut alice = connect(&server, &server.token("alice", "publish subscribe")).await;
    assert_eq!(
        subscribe(&mut alice, "a", &exchange, "#").await["type"],
        "subscribed"
    );
    alice_publishes(&server, &exchange).await;
    // Unsubscribing gives the consumer back.
    send(&mut mallory, json!({"type": "unsubscribe", "id": "s1"})).await;
    assert_eq!(recv(&mut mallory).await["type"], "unsubscribed");
    let answer = subscribe(&mut mallory, "s4", &exchange, "eu.k4").await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
}

#[tokio::test]
async fn a_tenant_whose_broker_hangs_does_not_hold_up_anyone_elses_subscribe() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    // Dynamic tenants whose vhosts do not exist: opening their pool waits the whole
    // connect timeout.
    let extra = "[dynamic_tenants]\nenabled = true\nvhost_template = \"wt-missing-{tenant}\"\n\
                 subscribe = [{ exchange = \"*\", routing_key = \"#\" }]\n";
    let mut cfg = shared_vhost("");
    let dynamic = config(extra);
    cfg.dynamic_tenants = dynamic.dynamic_tenants;
    cfg.amqp.connect_timeout_ms = 4000;
    let server = TestServer::start_ready(cfg).await;
    let mut stuck = Vec::new();
    for i in 0..3 {
        let token = server.token(&format!("ghost{i}"), "subscribe");
        let mut ws = connect(&server, &token).await;
        send(
            &mut ws,
            json!({"type": "subscribe", "id": "g", "exchange": exchange, "binding_key": "#", "mode": "live"}),
        )
        .await;
        stuck.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // let them reach the broker
    let started = Instant::now();
    let mut alice = connect(&server, &server.token("alice", "subscribe")).await;
    let answer = subscribe(&mut alice, "a", &exchange, "#").await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "alice waited {:?}",
        started.elapsed()
    );
    for mut ws in stuck {
        let answer = recv(&mut ws).await;
        assert_eq!(answer["code"], "broker_unavailable", "{answer}");
        let detail = answer["detail"].as_str().unwrap_or_default();
        assert!(!detail.contains("wt-missing"), "no vhost names: {detail}");
        assert!(
            !detail.contains("Idempotency"),
            "no publish wording: {detail}"
        );
    }
}

#[tokio::test]
async fn an_ack_for_a_tag_never_delivered_is_refused_and_the_subscription_lives_on() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let server = TestServer::start_ready(shared_vhost("")).await;
    let token = server.token("alice", "publish subscribe");
    let mut ws = connect(&server, &token).await;
    let queue = unique("dq");
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "d", "exchange": exchange, "binding_key": "#",
               "mode": "durable", "queue": queue}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    send(
        &mut ws,
        json!({"type": "ack", "subscription": "d", "delivery_tag": 4242}),
    )
    .await;
    let refused = recv(&mut ws).await;
    assert_eq!(refused["code"], "invalid_request", "{refused}");
    alice_publishes(&server, &exchange).await;
    let delivered = recv(&mut ws).await;
    assert_eq!(delivered["type"], "message", "{delivered}");
    let tag = delivered["delivery_tag"].clone();
    send(
        &mut ws,
        json!({"type": "ack", "subscription": "d", "delivery_tag": tag}),
    )
    .await;
    // A second ack of the same tag is refused too (the broker would close the channel).
    send(
        &mut ws,
        json!({"type": "ack", "subscription": "d", "delivery_tag": tag}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "invalid_request");
    alice_publishes(&server, &exchange).await;
    assert_eq!(recv(&mut ws).await["type"], "message");
    let _ = rabbit
        .channel
        .queue_delete(
            format!("warren.alice.{queue}").as_str().into(),
            Default::default(),
        )
        .await;
}

#[tokio::test]
async fn a_slow_durable_reader_pins_about_its_byte_budget_not_its_prefetch() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let mut cfg = shared_vhost("");
    cfg.ws.max_buffered_bytes = 2 * 1024 * 1024;
    cfg.server.max_body_bytes = 4 * 1024 * 1024;
    let server = TestServer::start_ready(cfg).await;
    let token = server.token("alice", "publish subscribe");
    let name = unique("big");
    let queue = format!("warren.alice.{name}");
    let frame = json!({"type": "subscribe", "id": "d", "exchange": exchange, "binding_key": "#",
                       "mode": "durable", "queue": name, "prefetch": 1000});
    let mut ws = connect(&server, &token).await;
    send(&mut ws, frame).await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    let body = "x".repeat(600 * 1024);
    for _ in 0..20 {
        let r = server
            .publish(
                &token,
                &json!({"exchange": exchange, "routing_key": "big", "body": body}),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    // 2 MiB over 600 KiB bodies: a window of 3, so the broker keeps the other 17
    // instead of pushing all 20 (the prefetch allows 1000) into Warren's memory.
    assert_eq!(rabbit.wait_count(&queue, 17).await, 17);
    for _ in 0..3 {
        assert_eq!(recv(&mut ws).await["type"], "message");
    }
    let more = tokio::time::timeout(Duration::from_millis(300), recv(&mut ws)).await;
    assert!(more.is_err(), "nothing beyond the window until acked");
    let _ = rabbit
        .channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

#[tokio::test]
async fn a_fractional_exp_keeps_its_websocket_open() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let server = TestServer::start_ready(shared_vhost("")).await;
    // NumericDate allows fractions; the token is valid for ten more minutes.
    let claims = json!({"sub": "s", "tenant": "alice", "scope": "publish subscribe",
                        "exp": crate::auth::now() as f64 + 600.5});
    let token = crate::auth::sign(&claims, SECRET.as_bytes());
    let mut ws = connect(&server, &token).await;
    let answer = subscribe(&mut ws, "s", &exchange, "#").await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    alice_publishes(&server, &exchange).await;
    assert_eq!(
        recv(&mut ws).await["type"],
        "message",
        "still open and delivering"
    );
}
