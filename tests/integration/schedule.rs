//! Scheduled publish (SPEC §15) against the real broker (the timing of 500 messages in
//! due order is in tests/solo/schedule.rs, run alone): a long delay never holds back a
//! short one, a gateway
//! restart or a second replica changes nothing, failures at fire time land in the
//! scheduled DLQ, and the accept checks are a publish's.

use std::collections::HashMap;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use rand::Rng;
use serde_json::{Value, json};

use crate::common::*;
use crate::schedule_support::*;
use crate::ws::{recv, send};

#[tokio::test]
async fn a_message_due_in_an_hour_never_holds_back_one_due_in_a_second() {
    let s = scheduling().await;
    let server = s.server().await;
    let token = s.token(&server);
    let seen = arrivals(&s.rabbit, &s.queue).await;
    for (id, delay) in [("hour", 3_600_000), ("second", 1_000)] {
        let r = server
            .publish(
                &token,
                &json!({"exchange": s.exchange, "routing_key": "r", "payload": 1,
                        "properties": {"message_id": id}, "delay_ms": delay}),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    let accepted = now_ms();
    settle(&seen, 1, Duration::from_secs(5)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "second");
    assert!(seen[0].1 <= accepted + 2_000, "{} ms", seen[0].1 - accepted);
    // The hour-long one waits on the ladder, persistent, in a rung of its own.
    let rung = (0..=22)
        .rev()
        .map(warren::schedule::rung_queue)
        .find(|q| {
            100u64
                << q.trim_start_matches("warren.scheduled.l")
                    .parse::<u32>()
                    .unwrap()
                <= 3_600_000
        })
        .unwrap();
    assert_eq!(s.rabbit.count(&rung).await, 1, "{rung}");
}

#[tokio::test]
async fn the_accept_checks_are_a_publishs_and_an_idempotent_retry_schedules_once() {
    let s = scheduling().await;
    let server = s.server().await;
    let token = s.token(&server);
    let body = |extra: Value| {
        let mut b = json!({"exchange": s.exchange, "routing_key": "r", "payload": 1});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let cases = [
        (json!({"delay_ms": 604_800_001u64}), 400, "invalid_request"),
        (json!({"delay_ms": -1}), 400, "invalid_request"),
        (
            json!({"delay_ms": 10, "not_before": "2026-12-07T10:00:00Z"}),
            400,
            "invalid_request",
        ),
        (json!({"not_before": "tomorrow"}), 400, "invalid_request"),
        (
            json!({"not_before": "2999-01-01T00:00:00Z"}),
            400,
            "invalid_request",
        ),
        (
            json!({"delay_ms": 10, "exchange": "not-granted"}),
            403,
            "forbidden",
        ),
        (
            json!({"delay_ms": 10, "exchange": "gone"}),
            404,
            "exchange_not_found",
        ),
        (
            json!({"delay_ms": 10, "properties": {"headers": {"CC": ["x"]}}, "exchange": "gone"}),
            404,
            "exchange_not_found",
        ),
        (
            json!({"delay_ms": 10, "properties": {"headers": {"x-warren-schedule-exchange": "x"}}}),
            400,
            "invalid_request",
        ),
        (
            json!({"delay_ms": 10, "properties": {"reply_to": "amq.rabbitmq.reply-to"}}),
            400,
            "invalid_request",
        ),
    ];
    for (extra, status, code) in cases {
        let r = server.publish(&token, &body(extra.clone())).await;
        assert_problem(&r, status, code);
        assert!(
            !r.body["detail"].as_str().unwrap_or("").contains(&s.vhost),
            "{extra}"
        );
    }
    // A request cannot be scheduled.
    let r = server
        .post("/v1/request", Some(&token), &body(json!({"delay_ms": 10})))
        .await;
    assert_problem(&r, 400, "invalid_request");

    // A retry with the same key gets the same answer, and only one message fires.
    let seen = arrivals(&s.rabbit, &s.queue).await;
    let keyed = |server: &TestServer| {
        server
            .http
            .post(format!("{}/v1/publish", server.base))
            .bearer_auth(&token)
            .header("idempotency-key", "k-1")
            .json(&body(json!({"delay_ms": 500})))
            .send()
    };
    let first = into_resp(keyed(&server).await.unwrap()).await;
    let second = into_resp(keyed(&server).await.unwrap()).await;
    assert_eq!(first.status, 202, "{:?}", first.body);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.body, second.body);
    // A not_before already past is due now.
    let r = server
        .publish(&token, &body(json!({"not_before": "2020-01-01T00:00:00Z"})))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert!(scheduled_for_ms(&r) + 1000 >= now_ms());
    settle(&seen, 2, Duration::from_secs(5)).await;
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn websocket_and_cloudevents_publishes_schedule_too() {
    let s = scheduling().await;
    let server = s.server().await;
    let token = s.token(&server);
    let seen = arrivals(&s.rabbit, &s.queue).await;
    let mut ws = ws_connect(&server.base, &token).await;
    send(
        &mut ws,
        json!({"type": "publish", "id": "p1", "exchange": s.exchange, "routing_key": "r",
                "payload": 1, "properties": {"message_id": "ws"}, "delay_ms": 300}),
    )
    .await;
    let confirm = recv(&mut ws).await;
    assert_eq!(confirm["type"], "confirm", "{confirm}");
    assert_eq!(confirm["routed"], false);
    assert!(confirm["scheduled_for"].as_str().is_some(), "{confirm}");
    let r = server
        .http
        .post(format!(
            "{}/v1/events/{}?routing_key=r&delay_ms=300",
            server.base, s.exchange
        ))
        .bearer_auth(&token)
        .header("ce-specversion", "1.0")
        .header("ce-id", "ce")
        .header("ce-source", "/test")
        .header("ce-type", "t")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let r = into_resp(r).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert!(r.body["scheduled_for"].as_str().is_some(), "{:?}", r.body);
    settle(&seen, 2, Duration::from_secs(5)).await;
    let mut ids: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["ce", "ws"]);
}

#[tokio::test]
async fn what_cannot_fire_lands_in_the_scheduled_dlq_saying_why() {
    let s = scheduling().await;
    // Unroutable then: an exchange with no queue bound; gone by then: an exchange
    // deleted after the accept.
    let lonely = s.rabbit.durable_topic_exchange().await;
    let doomed = s.rabbit.durable_topic_exchange().await;
    let server = s.server_granting(&[&lonely, &doomed]).await;
    let token = s.token(&server);
    for (id, exchange, delay) in [("unroutable", &lonely, 200), ("gone", &doomed, 1500)] {
        let r = server
            .publish(
                &token,
                &json!({"exchange": exchange, "routing_key": "r", "payload": 1,
                        "properties": {"message_id": id}, "delay_ms": delay}),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    s.rabbit.delete_exchange(&doomed).await;
    // Forged: another producer on the vhost puts a message naming acme and an exchange
    // acme may not publish to straight on the due queue.
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("x-warren-schedule-tenant", s.tenant.as_str()),
        ("x-warren-schedule-exchange", "amq.topic"),
        ("x-warren-schedule-routing-key", "r"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    headers.insert(
        "x-warren-schedule-due".into(),
        AMQPValue::LongLongInt(now_ms() as i64),
    );
    s.rabbit
        .channel
        .basic_publish(
            "".into(),
            warren::schedule::DUE_QUEUE.into(),
            BasicPublishOptions::default(),
            b"forged",
            BasicProperties::default()
                .with_message_id("forged".into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let dlq = warren::schedule::DLQ;
    assert_eq!(s.rabbit.wait_count(dlq, 3).await, 3);
    let mut why = HashMap::new();
    for _ in 0..3 {
        let m = s.rabbit.get(dlq).await.expect("a dead-lettered message");
        let headers = m.delivery.properties.headers().clone().unwrap();
        let error = match headers.inner().get("x-warren-schedule-error") {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("{other:?}"),
        };
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .to_string();
        why.insert(id, error);
    }
    assert_eq!(why["unroutable"], "unroutable");
    assert_eq!(why["gone"], "exchange_not_found");
    assert_eq!(why["forged"], "forbidden");
    let metrics = server.metrics().await;
    for error in ["unroutable", "exchange_not_found"] {
        assert!(
            metrics.contains(&format!("warren_schedule_fired_total{{tenant=\"{}\",outcome=\"dead_lettered\",error=\"{error}\"}} 1", s.tenant)),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains(&format!("warren_schedule_fired_total{{tenant=\"{}\",outcome=\"dead_lettered\",error=\"forbidden\"}} 1", s.tenant)),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_gateway_restart_between_accept_and_fire_loses_nothing_and_two_replicas_fire_once() {
    let s = scheduling().await;
    let seen = arrivals(&s.rabbit, &s.queue).await;
    let first = s.server().await;
    let token = s.token(&first);
    let batch = |from: usize, delay: std::ops::RangeInclusive<u64>| {
        let mut rng = rand::rng();
        (from..from + 100)
            .map(|i| {
                json!({"exchange": s.exchange, "routing_key": "r", "payload": i,
                       "properties": {"message_id": format!("m-{i}")},
                       "delay_ms": rng.random_range(delay.clone())})
            })
            .collect::<Vec<Value>>()
    };
    schedule_batch(&first, &token, batch(0, 1500..=2500)).await;
    first.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Two replicas now; each takes new messages too.
    let a = s.server().await;
    let b = s.server().await;
    for (i, server) in [&a, &b].into_iter().enumerate() {
        let token = s.token(server);
        schedule_batch(server, &token, batch(100 * (i + 1), 500..=2000)).await;
    }
    settle(&seen, 300, Duration::from_secs(15)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(distinct_ids(&seen), 300, "every message fired");
    assert_eq!(seen.len(), 300, "and only once");
    // Both replicas' routers share the due queue.
    let due = due_queue(&s.rabbit).await.expect("the due queue");
    assert_eq!(due.consumer_count(), 2);
    drop((a, b));
}

#[tokio::test]
async fn a_dynamic_tenant_is_told_it_cannot_schedule_and_nothing_is_published() {
    let admin = Admin::new();
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    admin.vhost(&format!("wtdyn-{run}-d1")).await;
    let server = TestServer::start_ready(config(&format!(
        "[dynamic_tenants]\nenabled = true\nvhost_template = \"wtdyn-{run}-{{tenant}}\"\n\
         publish = [{{ exchange = \"amq.topic\", routing_key = \"#\" }}]\n"
    )))
    .await;
    let token = server.token("d1", "publish");
    let r = server
        .publish(
            &token,
            &json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1, "delay_ms": 100}),
        )
        .await;
    assert_problem(&r, 400, "invalid_request");
    let detail = r.body["detail"].as_str().unwrap_or("");
    assert!(detail.contains("dynamic"), "{detail}");
    assert!(!detail.contains("wtdyn"), "no vhost name: {detail}");
    // Nothing was declared on the tenant's vhost.
    let rabbit = rabbit_in(&format!("wtdyn-{run}-d1")).await;
    assert!(
        due_queue(&rabbit).await.is_err(),
        "no ladder on a dynamic tenant's vhost"
    );
}
