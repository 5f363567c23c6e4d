//! What the scheduled-publish tests share (SPEC §15): a vhost of their own with an
//! exchange and a queue bound to it, replicas configured for it, and a consumer that
//! records when each message arrives. The integration and solo suites both use it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;

use crate::common::*;

/// A fresh vhost (deleted when the test ends) with a topic exchange `events` and a
/// queue bound to all of it, and a tenant of its own (metrics are per process, and
/// labelled by tenant) that may publish there.
pub struct Scheduling {
    pub _admin: Admin,
    pub vhost: String,
    pub rabbit: Rabbit,
    pub exchange: String,
    pub queue: String,
    pub tenant: String,
}

pub async fn scheduling() -> Scheduling {
    let admin = Admin::new();
    let vhost = unique("sched");
    admin.vhost(&vhost).await;
    let rabbit = rabbit_in(&vhost).await;
    let exchange = rabbit.durable_topic_exchange().await;
    let queue = rabbit.durable_queue(FieldTable::default()).await;
    rabbit.bind(&queue, &exchange, "#").await;
    Scheduling {
        _admin: admin,
        vhost,
        rabbit,
        exchange,
        queue,
        tenant: unique("acme"),
    }
}

impl Scheduling {
    /// The config of a replica: the tenant may publish anything on the exchange, on
    /// `gone` (a name the tests leave undeclared) and on `more`.
    pub fn toml(&self, more: &[&str]) -> String {
        let grants: Vec<String> = [self.exchange.as_str(), "gone"]
            .iter()
            .chain(more)
            .map(|e| format!("{{ exchange = \"{e}\", routing_key = \"#\" }}"))
            .collect();
        format!(
            "[auth]\nhs256_secret = \"{SECRET}\"\n[amqp]\nurl = \"{}\"\n\
             [tenants.{}]\nvhost = \"{}\"\npublish = [{}]\n",
            broker_url(),
            self.tenant,
            self.vhost,
            grants.join(", ")
        )
    }

    pub async fn server(&self) -> TestServer {
        self.server_granting(&[]).await
    }

    pub async fn server_granting(&self, more: &[&str]) -> TestServer {
        let config = warren::config::Config::from_toml(&self.toml(more)).expect("config");
        TestServer::start_ready(config).await
    }

    /// A publish token for the tenant.
    pub fn token(&self, server: &TestServer) -> String {
        server.token(&self.tenant, "publish")
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every message a queue receives: its `message_id` and when it arrived (Unix ms),
/// acked as it comes; the consumer ends when the returned handle is dropped with the
/// connection.
pub async fn arrivals(rabbit: &Rabbit, queue: &str) -> Arc<Mutex<Vec<(String, u64)>>> {
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let mut consumer = rabbit
        .channel
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let out = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = now_ms();
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default();
            out.lock().unwrap().push((id, at));
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
    });
    seen
}

/// Waits until `expected` messages arrived, then a second more for duplicates.
pub async fn settle(seen: &Arc<Mutex<Vec<(String, u64)>>>, expected: usize, deadline: Duration) {
    let done = eventually(deadline, || async {
        seen.lock().unwrap().len() >= expected
    })
    .await;
    assert!(
        done,
        "{} of {expected} messages fired",
        seen.lock().unwrap().len()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// `POST /v1/publish/batch` of `messages`, asserted all accepted.
pub async fn schedule_batch(
    server: &TestServer,
    token: &str,
    messages: Vec<serde_json::Value>,
) -> Resp {
    let r = server
        .post(
            "/v1/publish/batch",
            Some(token),
            &serde_json::json!({ "messages": messages }),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r
}

/// The distinct message ids among `seen`.
pub fn distinct_ids(seen: &[(String, u64)]) -> usize {
    let mut ids: Vec<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}

/// A passive declare of the vhost's due queue (on `rabbit`'s channel, which a missing
/// queue closes: use a connection of its own).
pub async fn due_queue(rabbit: &Rabbit) -> Result<lapin::Queue, lapin::Error> {
    rabbit
        .channel
        .queue_declare(
            warren::schedule::DUE_QUEUE.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// `scheduled_for` of an accepted publish, as Unix milliseconds.
pub fn scheduled_for_ms(r: &Resp) -> u64 {
    let text = r.body["scheduled_for"].as_str().expect("scheduled_for");
    let secs = warren::rfc3339::parse_rfc3339(text).expect("RFC 3339") as u64;
    let millis: u64 = text
        .rsplit_once('.')
        .and_then(|(_, f)| f.trim_end_matches('Z').parse().ok())
        .unwrap_or(0);
    secs * 1000 + millis
}
