//! Publish load while the broker link breaks, and the checks that follow it: every
//! 2xx is in the durable queue (by a `message_id` ledger), no request outlived the
//! confirm timeout by more than 1 s, faults were answered 503/504 with their codes,
//! readiness went red within 2 s and green within 5 s, and throughput came back
//! without a restart. Shared by the link-cut test (`faults.rs`) and the broker
//! restart test (`tests/solo`), which differ only in how they break the link.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::common::*;

/// A durable queue bound to `exchange` with `#`, expiring two minutes after last use.
pub async fn durable_queue(rabbit: &Rabbit, exchange: &str, arguments: FieldTable) -> String {
    let name = rabbit.durable_queue(arguments).await;
    rabbit.bind(&name, exchange, "#").await;
    name
}

/// Empties `queue` (every message it held when called) and returns the message ids
/// it held (with repeats counted once; `duplicates` says how many ids came more than
/// once). Consumes with a large prefetch: one basic.get per message is too slow for a
/// quorum queue whose leader is on another cluster node.
pub async fn drain(rabbit: &Rabbit, queue: &str) -> (HashSet<String>, usize) {
    let held = rabbit.count(queue).await;
    let mut ids = HashSet::new();
    let mut duplicates = 0;
    let channel = &rabbit.channel;
    channel
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("basic_qos");
    let tag = unique("drain");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("basic_consume");
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut received = 0u32;
    while received < held {
        let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(end, consumer.next()).await else {
            break;
        };
        received += 1;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        if !ids.insert(id) {
            duplicates += 1;
        }
    }
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    (ids, duplicates)
}

/// One request's fate, as the client saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub started: Instant,
    pub took: Duration,
    /// 0: no HTTP answer (transport error).
    pub status: u16,
    pub code: String,
    pub retry_after: bool,
    pub message_id: String,
    pub error: Option<String>,
}

/// A publish body with a client-chosen message id, persistent.
pub fn load_body(exchange: &str, message_id: &str, n: u64) -> Value {
    json!({
        "exchange": exchange,
        "routing_key": "load.item",
        "payload": {"n": n, "pad": "x".repeat(64)},
        "properties": {"message_id": message_id, "persistent": true},
    })
}

/// `clients` tasks publishing (each with an Idempotency-Key) until `stop`, every
/// outcome logged.
pub fn spawn_load(
    base: &str,
    token: &str,
    exchange: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Outcome>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            let (base, token, exchange) = (base.to_owned(), token.to_owned(), exchange.to_owned());
            let (stop, log) = (stop.clone(), log.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(15))
                    .build()
                    .unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let message_id = unique("m");
                    let started = Instant::now();
                    let sent = http
                        .post(format!("{base}/v1/publish"))
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .header("idempotency-key", unique("k"))
                        .body(load_body(&exchange, &message_id, n).to_string())
                        .send()
                        .await;
                    let outcome = match sent {
                        Ok(response) => {
                            let r = into_resp(response).await;
                            Outcome {
                                started,
                                took: started.elapsed(),
                                status: r.status,
                                code: r.code().to_owned(),
                                retry_after: r.header("retry-after").is_some(),
                                message_id,
                                error: None,
                            }
                        }
                        Err(error) => Outcome {
                            started,
                            took: started.elapsed(),
                            status: 0,
                            code: String::new(),
                            retry_after: false,
                            message_id,
                            error: Some(format!("{error:?}")),
                        },
                    };
                    let failed = outcome.status != 202;
                    log.lock().unwrap().push(outcome);
                    if failed {
                        // Fast 503s would otherwise spin; a real client backs off too.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect()
}

pub fn count_ok_since(log: &Mutex<Vec<Outcome>>, since: Instant) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|o| o.status == 202 && o.started >= since)
        .count()
}

/// 20 clients publishing through a Warren whose broker link the test breaks:
/// [`FaultRun::broken`] once the broker is certainly unreachable,
/// [`FaultRun::healing`] right before it is given back, [`FaultRun::healed`] once it
/// is, then [`FaultRun::check`].
pub struct FaultRun {
    pub rabbit: Rabbit,
    pub server: TestServer,
    queue: String,
    confirm_timeout: Duration,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Outcome>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
    broken_at: Option<Instant>,
    red_after: Duration,
    healing_at: Option<Instant>,
    green_after: Duration,
    back_after: Duration,
}

impl FaultRun {
    /// Starts Warren (against `amqp_url`, or the test broker) and the load, and waits
    /// for it to be steady. The exchange and queue are durable, so they outlive a
    /// broker restart.
    pub async fn start(amqp_url: Option<String>) -> Self {
        Self::start_with(
            Rabbit::connect().await,
            amqp_url.map(|url| vec![url]),
            FieldTable::default(),
        )
        .await
    }

    /// [`FaultRun::start`] with the test's own broker client (the ledger is read
    /// through it), Warren's broker URLs (`None`: the test broker) and the queue's
    /// arguments (e.g. a quorum queue on a cluster).
    pub async fn start_with(
        rabbit: Rabbit,
        amqp_urls: Option<Vec<String>>,
        queue_arguments: FieldTable,
    ) -> Self {
        let exchange = rabbit.durable_topic_exchange().await;
        let queue = durable_queue(&rabbit, &exchange, queue_arguments).await;
        let tenant = unique("t");
        let mut config = tenant_config(&tenant, &exchange, "#");
        if let Some(urls) = amqp_urls {
            config.amqp.url = None;
            config.amqp.urls = urls;
        }
        config.amqp.confirm_timeout_ms = 2000;
        config.amqp.connect_timeout_ms = 1000;
        config.amqp.reconnect_backoff_max_ms = 500;
        // A publish waits at most acquire + confirm timeout; the acquisition share is
        // kept under the 1 s margin the test allows above the confirm timeout.
        config.amqp.acquire_timeout_ms = 500;
        let confirm_timeout = Duration::from_millis(config.amqp.confirm_timeout_ms);
        let server = TestServer::start_ready(config).await;
        let token = server.token(&tenant, "publish");
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let clients = spawn_load(
            &server.base,
            &token,
            &exchange,
            20,
            stop.clone(),
            log.clone(),
        );
        let warm = eventually(Duration::from_secs(10), || async {
            count_ok_since(&log, started) >= 100
        })
        .await;
        assert!(warm, "no steady load before the fault");
        Self {
            rabbit,
            server,
            queue,
            confirm_timeout,
            stop,
            log,
            clients,
            broken_at: None,
            red_after: Duration::ZERO,
            healing_at: None,
            green_after: Duration::ZERO,
            back_after: Duration::ZERO,
        }
    }

    /// The link is broken (from `at` at the latest): readiness must go red within 2 s.
    pub async fn broken(&mut self, at: Instant) {
        let server = &self.server;
        let red = eventually(Duration::from_secs(2), || async {
            server.get("/readyz").await.status == 503
        })
        .await;
        self.broken_at = Some(at);
        self.red_after = at.elapsed();
        assert!(red, "readiness did not go red within 2s of the fault");
    }

    /// The fault is about to end: publishes started before this had no broker.
    pub fn healing(&mut self) {
        self.healing_at = Some(Instant::now());
    }

    /// The broker is reachable again (from `at`): readiness must go green within 5 s,
    /// and 100 publishes succeed within 10 s more, with the same Warren.
    pub async fn healed(&mut self, at: Instant) {
        let server = &self.server;
        let green = eventually(Duration::from_secs(5), || async {
            server.get("/readyz").await.status == 200
        })
        .await;
        self.green_after = at.elapsed();
        assert!(green, "readiness did not go green within 5s of recovery");
        let green_at = Instant::now();
        let log = &self.log;
        let back = eventually(Duration::from_secs(10), || async {
            count_ok_since(log, green_at) >= 100
        })
        .await;
        self.back_after = green_at.elapsed();
        assert!(back, "throughput did not come back without a restart");
    }

    /// Stops the load and checks the ledger against the queue; prints the figures
    /// under `name`.
    pub async fn check(self, name: &str) {
        let (Some(broken_at), Some(healing_at)) = (self.broken_at, self.healing_at) else {
            panic!("FaultRun::check before broken() and healing()");
        };
        let (red_after, green_after, back_after) =
            (self.red_after, self.green_after, self.back_after);
        let ledger = self.finish().await;
        let log = &ledger.log;
        for o in log {
            if o.started >= broken_at && o.started < healing_at {
                assert_ne!(o.status, 202, "a publish during the fault was acked: {o:?}");
            }
        }
        // Once readiness is red, publishes fail fast (not after a confirm timeout).
        let red_at = broken_at + red_after;
        let fast_fail = log
            .iter()
            .filter(|o| o.started >= red_at && o.started < healing_at)
            .map(|o| o.took)
            .max()
            .unwrap_or_default();
        assert!(
            fast_fail < Duration::from_millis(500),
            "a publish during the fault took {fast_fail:?}"
        );
        eprintln!(
            "{name} figures: {} readyz_red_after={red_after:?} readyz_green_after={green_after:?} \
             100_acks_after_green={back_after:?} fault_slowest={fast_fail:?}",
            ledger.summary(),
        );
    }

    /// Stops the load and checks what holds whatever the fault: every acknowledged
    /// message is in the queue, the queue holds nothing nobody sent, no request
    /// outlived the confirm timeout by more than 1 s, and every failure was a 503 with
    /// `Retry-After` or a 504. Deletes the queue and stops Warren.
    pub async fn finish(self) -> Ledger {
        self.stop.store(true, Ordering::Release);
        for client in self.clients {
            tokio::time::timeout(Duration::from_secs(20), client)
                .await
                .expect("a client stopped in time")
                .unwrap();
        }
        let log = self.log.lock().unwrap().clone();
        let held = self.rabbit.count(&self.queue).await;
        let (in_queue, duplicates) = drain(&self.rabbit, &self.queue).await;
        let acked: HashSet<&str> = log
            .iter()
            .filter(|o| o.status == 202)
            .map(|o| o.message_id.as_str())
            .collect();
        let lost: Vec<&&str> = acked.iter().filter(|id| !in_queue.contains(**id)).collect();
        assert!(
            lost.is_empty(),
            "{} acknowledged messages are not in the queue (it held {held}, {} drained): {:?}",
            lost.len(),
            in_queue.len(),
            &lost[..lost.len().min(5)]
        );
        let sent: HashSet<&str> = log.iter().map(|o| o.message_id.as_str()).collect();
        assert!(
            in_queue.iter().all(|id| sent.contains(id.as_str())),
            "the queue holds a message nobody sent"
        );

        let limit = self.confirm_timeout + Duration::from_secs(1);
        let slowest = log.iter().map(|o| o.took).max().unwrap_or_default();
        assert!(slowest <= limit, "a request took {slowest:?} (> {limit:?})");
        for o in &log {
            match (o.status, o.code.as_str()) {
                (202, _) => {}
                // A quorum queue nacks (broker_rejected) while it has no leader.
                (503, "broker_unavailable" | "broker_rejected") | (504, "confirm_timeout") => {}
                other => panic!("unexpected answer {other:?} ({:?}): {o:?}", o.error),
            }
            if o.status == 503 {
                assert!(o.retry_after, "503 without Retry-After: {o:?}");
            }
        }
        let acked = acked.len();
        let _ = self
            .rabbit
            .channel
            .queue_delete(self.queue.as_str().into(), Default::default())
            .await;
        self.server.shutdown().await.unwrap();
        Ledger {
            log,
            acked,
            in_queue: in_queue.len(),
            duplicates,
            slowest,
        }
    }
}

/// What a [`FaultRun`] did, once checked.
pub struct Ledger {
    pub log: Vec<Outcome>,
    pub acked: usize,
    pub in_queue: usize,
    pub duplicates: usize,
    pub slowest: Duration,
}

impl Ledger {
    /// Acknowledged publishes that started in `[from, to)`.
    #[allow(dead_code)] // tests/solo/cluster.rs
    pub fn acked_between(&self, from: Instant, to: Instant) -> usize {
        self.log
            .iter()
            .filter(|o| o.status == 202 && o.started >= from && o.started < to)
            .count()
    }

    pub fn summary(&self) -> String {
        let count = |status: u16| self.log.iter().filter(|o| o.status == status).count();
        format!(
            "requests={} acked={} 503={} 504={} in_queue={} duplicates={} slowest={:?}",
            self.log.len(),
            self.acked,
            count(503),
            count(504),
            self.in_queue,
            self.duplicates,
            self.slowest
        )
    }
}
