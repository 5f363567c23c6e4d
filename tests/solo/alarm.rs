//! The broker's memory alarm (connection.blocked) under publish load.
//!
//! This test sets the shared broker's memory watermark so low that RabbitMQ blocks every
//! publisher, which would break any other test publishing at the same time (see
//! `main.rs` for how it runs). The original watermark is restored by a guard, also
//! when the test fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::{rabbitmqctl, require_rabbitmqctl};

/// Sets the memory watermark for its lifetime; the original comes back on drop.
struct Watermark {
    original: Vec<String>,
}

impl Watermark {
    fn set(value: &str) -> Self {
        let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .expect("read the memory watermark");
        // `0.4` (relative) or `{absolute,1073741824}`; anything else: RabbitMQ's default.
        let current = current.lines().last().unwrap_or_default().trim().to_owned();
        let original = if current.parse::<f64>().is_ok() {
            vec![current]
        } else if let Some(bytes) = current
            .strip_prefix("{absolute,")
            .and_then(|s| s.strip_suffix('}'))
        {
            vec!["absolute".to_owned(), bytes.to_owned()]
        } else {
            vec!["0.4".to_owned()]
        };
        let guard = Self { original };
        rabbitmqctl(&["set_vm_memory_high_watermark", value]).expect("set the watermark");
        guard
    }
}

impl Drop for Watermark {
    fn drop(&mut self) {
        let mut args = vec!["set_vm_memory_high_watermark"];
        args.extend(self.original.iter().map(String::as_str));
        if let Err(error) = rabbitmqctl(&args) {
            eprintln!("COULD NOT RESTORE the memory watermark ({args:?}): {error}");
        }
    }
}

/// Resident memory of this process (the in-process Warren included), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "changes the shared broker (memory alarm); scripts/test.sh runs it alone"]
async fn memory_alarm_blocks_publishes_fast_without_growth_then_recovers() {
    require_rabbitmqctl();
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, &exchange, "#");
    config.amqp.confirm_timeout_ms = 2000;
    let confirm_timeout = Duration::from_millis(config.amqp.confirm_timeout_ms);
    let server = Arc::new(TestServer::start_ready(config).await);
    let token = server.token(&tenant, "publish");
    let body =
        json!({"exchange": exchange, "routing_key": "k", "payload": {"pad": "x".repeat(512)}});
    let r = server.publish(&token, &body).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let rss_before = rss_kib();

    let alarm = Watermark::set("0.0000001");
    let alarm_at = Instant::now();
    // The first publish after the alarm may be the one that meets the block (RabbitMQ
    // announces connection.blocked to a publishing connection): 504 after the confirm
    // timeout, or 503 once the block is known.
    let first = server.publish(&token, &body).await;
    let first_took = alarm_at.elapsed();
    assert!(
        matches!(
            (first.status, first.code()),
            (503, "broker_unavailable") | (504, "confirm_timeout")
        ),
        "first publish under the alarm: {} {:?}",
        first.status,
        first.body
    );
    let blocked = eventually(Duration::from_secs(10), || async {
        server.get("/readyz").await.body["brokers"][0]["blocked"] == true
    })
    .await;
    assert!(blocked, "readyz never reported the broker blocked");

    // Load while blocked: every publish answers 503 quickly, memory stays flat.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (server, token, body) = (server.clone(), token.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..50 {
                let started = Instant::now();
                let r = server.publish(&token, &body).await;
                answers.push((r.status, r.code().to_owned(), started.elapsed()));
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.unwrap());
    }
    let rss_during = rss_kib();
    let slowest = answers.iter().map(|a| a.2).max().unwrap_or_default();
    for (status, code, took) in &answers {
        assert_eq!(
            (*status, code.as_str()),
            (503, "broker_unavailable"),
            "a publish while blocked"
        );
        assert!(*took < Duration::from_millis(500), "took {took:?}");
    }
    assert!(slowest < confirm_timeout);
    let inflight: usize = server
        .state
        .tenants
        .brokers()
        .iter()
        .map(|b| b.stats().inflight_confirms)
        .sum();
    assert!(
        inflight <= 1,
        "confirms still pending while blocked: {inflight}"
    );
    let grew = rss_during.saturating_sub(rss_before);
    assert!(
        grew < 32 * 1024,
        "memory grew by {grew} KiB during 1000 blocked publishes"
    );

    drop(alarm);
    let restored_at = Instant::now();
    let recovered = eventually(Duration::from_secs(15), || async {
        server.publish(&token, &body).await.status == 202
    })
    .await;
    let recovered_after = restored_at.elapsed();
    assert!(
        recovered,
        "publishes did not succeed after the alarm cleared"
    );
    assert_eq!(
        server.get("/readyz").await.body["brokers"][0]["blocked"],
        false
    );
    eprintln!(
        "alarm figures: first publish {} after {first_took:?}; 1000 blocked publishes, \
         slowest {slowest:?}; RSS {rss_before} -> {rss_during} KiB; \
         publishing again {recovered_after:?} after the watermark was restored",
        first.status
    );
    let _ = rabbit.count(&queue).await;
    if let Ok(server) = Arc::try_unwrap(server) {
        server.shutdown().await.unwrap();
    }
}
