//! Request/reply (SPEC §10) across a broker restart (`rabbitmqctl stop_app` /
//! `start_app`): a request awaiting its reply fails fast with 503 when the broker goes,
//! and requests are answered again once it is back, with no restart of Warren.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::common::*;
use crate::load::durable_queue;
use crate::require_rabbitmqctl;
use crate::restart::StoppedBroker;

/// Echoes every request on `queue` to its `reply_to`, with its correlation id.
async fn echo(queue: &str) -> (Connection, JoinHandle<()>) {
    respond(queue, None).await
}

/// Answers every request on `queue` at its `reply_to` with its correlation id and
/// `reply` as the body (the request's own body when `None`).
async fn respond(queue: &str, reply: Option<Vec<u8>>) -> (Connection, JoinHandle<()>) {
    let connection = Connection::connect(&broker_url(), ConnectionProperties::default())
        .await
        .expect("responder connection");
    let channel = connection.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "echo".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let reply_body = reply;
    let task = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let props = &delivery.properties;
            let (Some(reply_to), Some(correlation_id)) = (props.reply_to(), props.correlation_id())
            else {
                continue;
            };
            let reply = BasicProperties::default()
                .with_correlation_id(correlation_id.clone())
                .with_content_type("application/json".into());
            let body = reply_body.as_deref().unwrap_or(&delivery.data);
            let _ = channel
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    reply,
                )
                .await;
        }
    });
    (connection, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared broker; scripts/test.sh runs it alone"]
async fn a_broker_restart_fails_waiting_requests_fast_and_requests_recover() {
    require_rabbitmqctl();
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.durable_topic_exchange().await;
    let queue = durable_queue(&rabbit, &exchange, FieldTable::default()).await;
    let tenant = unique("t");
    let server = TestServer::start_ready(tenant_config(&tenant, &exchange, "#")).await;
    let token = server.token(&tenant, "publish");
    let body = |timeout_ms: u64| json!({"exchange": exchange, "routing_key": "rpc", "payload": {"hello": 1}, "timeout_ms": timeout_ms});

    // Before: answered.
    let (_responder, task) = echo(&queue).await;
    let r = server.post("/v1/request", Some(&token), &body(5000)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    task.abort();
    drop(_responder);

    // A request nobody answers is waiting when the broker stops: it fails fast.
    let waiting_body = body(60_000);
    let waiting = server.post("/v1/request", Some(&token), &waiting_body);
    let stop = async {
        let tenant = server.state.tenants.get(&tenant).expect("tenant");
        let broker = tenant.broker().await.expect("pool");
        let deadline = Instant::now() + Duration::from_secs(10);
        while broker.rpc_inflight() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(broker.rpc_inflight(), 1, "the request awaits its reply");
        let broker = StoppedBroker::stop().await;
        (broker, Instant::now())
    };
    let (r, (stopped, stopped_at)) = tokio::join!(waiting, stop);
    assert_problem(&r, 503, "broker_unavailable");
    assert!(r.header("retry-after").is_some());
    eprintln!(
        "the waiting request failed {:?} after stop_app returned",
        stopped_at.elapsed()
    );
    assert!(
        stopped_at.elapsed() < Duration::from_secs(1),
        "answered by the time stop_app returned (it closes every connection first)"
    );

    // While down: fast 503s.
    let started = Instant::now();
    let r = server.post("/v1/request", Some(&token), &body(5000)).await;
    assert_problem(&r, 503, "broker_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // Back: answered again, without restarting Warren.
    stopped.start().await;
    let back_at = Instant::now();
    let (_responder, _task) = echo(&queue).await;
    let recovered = eventually(Duration::from_secs(30), || async {
        server
            .post("/v1/request", Some(&token), &body(2000))
            .await
            .status
            == 200
    })
    .await;
    assert!(
        recovered,
        "requests are answered again once the broker is back"
    );
    eprintln!(
        "requests answered again {:?} after start_app",
        back_at.elapsed()
    );
    let tenant = server.state.tenants.get(&tenant).expect("tenant");
    assert_eq!(tenant.broker().await.expect("pool").rpc_inflight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "sends 64 MiB replies through the shared broker and reads a process's peak memory; scripts/test.sh runs it alone"]
async fn replies_over_the_bound_are_dropped_as_they_arrive_not_assembled() {
    const REPLY: usize = 64 << 20;
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "rpc").await;
    let port = closed_port().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_s = 5\n\
         [amqp]\nurl = \"{}\"\n[auth]\nhs256_secret = \"{SECRET}\"\n\
         [rpc]\nmax_reply_bytes = 1048576\n\
         [tenants.acme]\nvhost = \"/\"\npublish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n",
        broker_url()
    );
    let warren = WarrenProcess::start(&dir, &config, "acme", port, 200).await;
    let (_responder, _task) = respond(&queue, Some(vec![b'x'; REPLY])).await;
    let request = || {
        warren
            .http
            .post(format!("{}/v1/request", warren.base))
            .bearer_auth(&warren.token)
            .json(&json!({"exchange": exchange, "routing_key": "rpc", "payload": 1, "timeout_ms": 30000}))
            .send()
    };
    let before = warren.peak_rss_kib();
    for i in 0..4 {
        let r = into_resp(request().await.expect("request")).await;
        assert_problem(&r, 502, "reply_too_large");
        eprintln!(
            "reply {i}: {}; peak RSS {} KiB (was {before} KiB)",
            r.body["detail"],
            warren.peak_rss_kib()
        );
    }
    let grown = warren.peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "peak RSS grew by {grown} KiB over four {REPLY}-byte replies: a reply over the bound was held in memory"
    );
}
