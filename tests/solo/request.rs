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
            let _ = channel
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
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
