//! Scheduled messages survive RabbitMQ itself restarting between their accept and
//! their time (SPEC §15): the ladder is quorum queues, dead-lettering at least once.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::require_rabbitmqctl;
use crate::restart::StoppedBroker;
use crate::schedule_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared broker; scripts/test.sh runs it alone"]
async fn a_broker_restart_between_accept_and_fire_loses_no_scheduled_message() {
    require_rabbitmqctl();
    let s = scheduling().await;
    let server = s.server().await;
    let token = s.token(&server);
    // Due from 2 s (during the outage) to 12 s (after it).
    let messages: Vec<Value> = (0..100u64)
        .map(|i| {
            json!({"exchange": s.exchange, "routing_key": "r", "payload": i,
                   "properties": {"message_id": format!("m-{i}")},
                   "delay_ms": 2_000 + i * 100})
        })
        .collect();
    schedule_batch(&server, &token, messages).await;
    let broker = StoppedBroker::stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.start().await;
    // The test's own connection went with the broker.
    let rabbit = rabbit_in(&s.vhost).await;
    let seen = arrivals(&rabbit, &s.queue).await;
    settle(&seen, 100, Duration::from_secs(60)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(distinct_ids(&seen), 100, "every scheduled message fired");
    assert!(seen.len() >= 100);
    eprintln!("{} deliveries for 100 messages", seen.len());
}
