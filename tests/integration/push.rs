//! Push subscriptions (SPEC §13) against real HTTP receivers the tests start (port 0)
//! and the real broker: exactly-once delivery to a healthy receiver with signatures
//! verified, retries with a stable webhook-id, the DLQ at once for a 4xx, per-attempt
//! timeouts that cost only their own subscription, ordered delivery under retries,
//! pause and resume.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use serde_json::Value;
use sha2::Sha256;

use crate::common::*;
use crate::topology::topology_toml;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Hit {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    pub fn id(&self) -> &str {
        self.header("webhook-id")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Checks the Standard Webhooks signature against `secret`.
    pub fn signed_with(&self, secret: &str) -> bool {
        let key = BASE64
            .decode(secret.trim_start_matches("whsec_"))
            .expect("a base64 secret");
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
        mac.update(format!("{}.{}.", self.id(), self.header("webhook-timestamp")).as_bytes());
        mac.update(&self.body);
        let expected = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
        self.header("webhook-signature")
            .split(' ')
            .any(|s| s == expected)
    }
}

/// How a receiver answers: from the hit and how many earlier hits had its webhook-id,
/// a status and how long to take first.
pub type Script = Arc<dyn Fn(&Hit, usize) -> (u16, Duration) + Send + Sync>;

#[derive(Clone)]
struct Shared {
    hits: Arc<Mutex<Vec<Hit>>>,
    script: Arc<Mutex<Script>>,
}

/// An HTTP receiver on 127.0.0.1:0 that records every request and answers by script.
pub struct Receiver {
    pub url: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(script: Script) -> Self {
        let shared = Shared {
            hits: Arc::default(),
            script: Arc::new(Mutex::new(script)),
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, shared, task }
    }

    /// Answers 200 at once.
    pub async fn healthy() -> Self {
        Self::start(Arc::new(|_, _| (200, Duration::ZERO))).await
    }

    pub fn set_script(&self, script: Script) {
        *self.shared.script.lock().unwrap_or_else(|e| e.into_inner()) = script;
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.shared
            .hits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let hit = Hit {
        headers,
        body,
        at: Instant::now(),
    };
    let (status, wait) = {
        let mut hits = shared.hits.lock().unwrap_or_else(|e| e.into_inner());
        let earlier = hits.iter().filter(|h| h.id() == hit.id()).count();
        hits.push(hit.clone());
        let script = shared
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        script(&hit, earlier)
    };
    tokio::time::sleep(wait).await;
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The push part of a config: tenant `acme` on `vhost`, its queue `jobs` (with
/// `queue_extra` and a retry policy of `delays`) and a push subscription `hook` to
/// `url` with `push_extra`; applied at start, private networks allowed (the receivers
/// are on loopback).
pub fn push_toml(
    vhost: &str,
    name: &str,
    url: &str,
    delays: &str,
    queue_extra: &str,
    push_extra: &str,
) -> String {
    let tables = format!(
        "[[tenants.acme.queues]]\nname = \"jobs\"\nretry = {{ delays_ms = [{delays}] }}\n{queue_extra}\n\
         [[tenants.acme.push]]\nname = \"{name}\"\nqueue = \"jobs\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\n{push_extra}\n"
    );
    topology_toml(vhost, &tables).replacen(
        "[auth]",
        "[topology]\napply_on_start = true\n[push]\nallow_private_networks = true\n[auth]",
        1,
    )
}

/// A fresh vhost, Warren started (ready: the topology applied) with [`push_toml`] and
/// a fresh subscription name; the last is the `subscription` label of its metrics.
pub async fn pushing(
    url: &str,
    delays: &str,
    queue_extra: &str,
    push_extra: &str,
) -> (Admin, Rabbit, TestServer, String) {
    let admin = Admin::new();
    let vhost = unique("push");
    admin.vhost(&vhost).await;
    let name = unique("hook");
    let toml = push_toml(&vhost, &name, url, delays, queue_extra, push_extra);
    let config = warren::config::Config::from_toml(&toml).expect("config");
    let server = TestServer::start_ready_with_metrics_listener(config).await;
    let rabbit = rabbit_in(&vhost).await;
    (admin, rabbit, server, format!("acme/{name}"))
}

/// Publishes `{"n": i}` for each i with message id `m-i` straight into `queue`.
pub async fn fill(rabbit: &Rabbit, queue: &str, range: std::ops::Range<u32>) {
    let mut confirms = Vec::new();
    for n in range {
        let confirm = rabbit
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("{{\"n\":{n}}}").as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(format!("m-{n}").into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        confirm.await.expect("confirm");
    }
}

/// Waits until `check` holds for the receiver's hits (or the deadline).
async fn hits_until(
    receiver: &Receiver,
    within: Duration,
    check: impl Fn(&[Hit]) -> bool,
) -> Vec<Hit> {
    let end = Instant::now() + within;
    loop {
        let hits = receiver.hits();
        if check(&hits) || Instant::now() >= end {
            return hits;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The payload `n` of each hit answered with a 2xx (by `ok`), in arrival order.
fn numbers(hits: &[Hit]) -> Vec<u64> {
    hits.iter()
        .filter_map(|h| h.json()["payload"]["n"].as_u64())
        .collect()
}

async fn metric(server: &TestServer, prefix: &str) -> f64 {
    server
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_healthy_receiver_gets_1000_messages_exactly_once_each_signed() {
    let receiver = Receiver::healthy().await;
    let (_admin, rabbit, server, label) =
        pushing(&receiver.url, "200", "", "max_in_flight = 16").await;
    fill(&rabbit, "jobs", 0..1000).await;
    hits_until(&receiver, Duration::from_secs(60), |h| h.len() >= 1000).await;
    assert_eq!(rabbit.wait_count("jobs", 0).await, 0, "every message acked");
    // A quiet spell: a duplicate would show now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), 1000, "each exactly once");
    let ids: BTreeSet<&str> = hits.iter().map(Hit::id).collect();
    assert_eq!(ids.len(), 1000);
    assert!(
        ids.contains("m-0") && ids.contains("m-999"),
        "webhook-id is the message id"
    );
    for hit in &hits {
        assert!(
            hit.signed_with(SECRET),
            "a valid signature: {:?}",
            hit.headers
        );
        assert_eq!(hit.header("content-type"), "application/json");
        let frame = hit.json();
        assert_eq!(frame["type"], "message");
        assert_eq!(
            Some(frame["subscription"].as_str().unwrap_or_default()),
            label.strip_prefix("acme/")
        );
        assert!(frame["payload"]["n"].is_u64(), "{frame}");
    }
    let numbers: BTreeSet<u64> = numbers(&hits).into_iter().collect();
    assert_eq!(numbers.len(), 1000);
    assert_eq!(
        metric(
            &server,
            &format!(
                "warren_push_deliveries_total{{subscription=\"{label}\",outcome=\"delivered\"}}"
            )
        )
        .await,
        1000.0
    );
    assert_eq!(rabbit.count("jobs.dlq").await, 0);
}

#[tokio::test]
async fn a_receiver_failing_twice_with_503_gets_the_third_attempt_with_the_same_webhook_id() {
    let receiver = Receiver::start(Arc::new(|_, earlier| {
        (if earlier < 2 { 503 } else { 200 }, Duration::ZERO)
    }))
    .await;
    let (_admin, rabbit, server, label) = pushing(&receiver.url, "100, 200, 300", "", "").await;
    fill(&rabbit, "jobs", 0..1).await;
    let hits = hits_until(&receiver, Duration::from_secs(15), |h| h.len() >= 3).await;
    assert_eq!(hits.len(), 3, "{hits:?}");
    assert!(
        hits.iter().all(|h| h.id() == "m-0"),
        "one webhook-id across retries"
    );
    assert!(hits.iter().all(|h| h.signed_with(SECRET)));
    // Each retry waited its delay, and shows its attempt.
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(100));
    assert!(hits[2].at - hits[1].at >= Duration::from_millis(200));
    let attempts: Vec<Value> = hits
        .iter()
        .map(|h| h.json()["properties"]["headers"]["x-warren-attempt"].clone())
        .collect();
    assert_eq!(attempts, [Value::Null, 1.into(), 2.into()]);
    assert_eq!(
        hits[1].json()["properties"]["headers"]["x-warren-push-status"],
        "503"
    );
    assert_eq!(rabbit.wait_count("jobs", 0).await, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.hits().len(), 3, "no more attempts after the 2xx");
    assert_eq!(rabbit.count("jobs.dlq").await, 0);
    assert_eq!(
        metric(
            &server,
            &format!(
                "warren_push_deliveries_total{{subscription=\"{label}\",outcome=\"retried\"}}"
            )
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn a_4xx_goes_to_the_dlq_at_once_and_the_last_retry_there_with_its_status() {
    let receiver = Receiver::start(Arc::new(|hit, _| {
        let n = hit.json()["payload"]["n"].as_u64().unwrap_or(0);
        (if n == 0 { 400 } else { 500 }, Duration::ZERO)
    }))
    .await;
    let (_admin, rabbit, _server, _label) = pushing(&receiver.url, "100", "", "").await;
    fill(&rabbit, "jobs", 0..2).await;
    assert_eq!(rabbit.wait_count("jobs.dlq", 2).await, 2);
    let mut dead = BTreeMap::new();
    while let Some(m) = rabbit
        .channel
        .basic_get("jobs.dlq".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
    {
        let headers =
            warren::delivery::render::properties_json(&m.delivery.properties)["headers"].clone();
        let n: Value = serde_json::from_slice(&m.delivery.data).expect("json");
        dead.insert(n["n"].as_u64().unwrap_or(99), headers);
    }
    // 400: once, straight to the DLQ; 500: the first attempt and its one retry.
    assert_eq!(dead[&0]["x-warren-push-status"], "400", "{dead:?}");
    assert_eq!(dead[&1]["x-warren-push-status"], "500", "{dead:?}");
    assert_eq!(dead[&1]["x-warren-attempt"], 1, "{dead:?}");
    let hits = receiver.hits();
    assert_eq!(hits.iter().filter(|h| h.id() == "m-0").count(), 1);
    assert_eq!(hits.iter().filter(|h| h.id() == "m-1").count(), 2);
}

#[tokio::test]
async fn a_hanging_receiver_times_out_per_attempt_and_slows_only_its_own_subscription() {
    let hanging = Receiver::start(Arc::new(|_, _| (200, Duration::from_secs(3600)))).await;
    let healthy = Receiver::healthy().await;
    let admin = Admin::new();
    let vhost = unique("push");
    admin.vhost(&vhost).await;
    let (slow_name, fast_name) = (unique("slow"), unique("fast"));
    let tables = format!(
        "[[tenants.acme.queues]]\nname = \"slow\"\nretry = {{ delays_ms = [100] }}\n\
         [[tenants.acme.queues]]\nname = \"fast\"\nretry = {{ delays_ms = [100] }}\n\
         [[tenants.acme.push]]\nname = \"{slow_name}\"\nqueue = \"slow\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\ntimeout_ms = 300\nmax_in_flight = 2\n\
         [[tenants.acme.push]]\nname = \"{fast_name}\"\nqueue = \"fast\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\"]\n",
        hanging.url, healthy.url
    );
    let toml = topology_toml(&vhost, &tables).replacen(
        "[auth]",
        "[topology]\napply_on_start = true\n[push]\nallow_private_networks = true\npause_after_failures = 1000\n[auth]",
        1,
    );
    let server = TestServer::start_ready_with_metrics_listener(
        warren::config::Config::from_toml(&toml).expect("config"),
    )
    .await;
    let rabbit = rabbit_in(&vhost).await;
    fill(&rabbit, "slow", 0..10).await;
    fill(&rabbit, "fast", 0..200).await;
    let started = Instant::now();
    let fast = hits_until(&healthy, Duration::from_secs(20), |h| h.len() >= 200).await;
    let took = started.elapsed();
    assert_eq!(fast.len(), 200, "the healthy subscription got everything");
    eprintln!("200 deliveries beside a hanging receiver in {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Each attempt on the hanging one gives up at its timeout; after the one retry the
    // messages are in the DLQ, marked `timeout`.
    assert_eq!(rabbit.wait_count("slow.dlq", 10).await, 10);
    let dead = rabbit.get("slow.dlq").await.expect("a dead letter");
    let headers =
        warren::delivery::render::properties_json(&dead.delivery.properties)["headers"].clone();
    assert_eq!(headers["x-warren-push-status"], "timeout");
    let slow_hits = hanging.hits();
    assert_eq!(slow_hits.len(), 20, "two attempts each");
    assert!(
        metric(
            &server,
            &format!(
                "warren_push_attempts_total{{subscription=\"acme/{slow_name}\",result=\"timeout\"}}"
            )
        )
        .await
            >= 20.0
    );
}

#[tokio::test]
async fn ordered_delivery_stays_in_queue_order_under_retries() {
    // Every third attempt fails with 503 (retried in place) or 429 with Retry-After.
    let count = Arc::new(Mutex::new(0u32));
    let counter = count.clone();
    let receiver = Receiver::start(Arc::new(move |_, _| {
        let mut c = counter.lock().unwrap_or_else(|e| e.into_inner());
        *c += 1;
        (if c.is_multiple_of(3) { 503 } else { 200 }, Duration::ZERO)
    }))
    .await;
    let (_admin, rabbit, _server, _label) = pushing(
        &receiver.url,
        "50, 50, 50",
        "single_active_consumer = true",
        "ordered = true",
    )
    .await;
    fill(&rabbit, "jobs", 0..40).await;
    assert_eq!(rabbit.wait_count("jobs", 0).await, 0);
    let hits = hits_until(&receiver, Duration::from_secs(30), |h| {
        numbers(h).iter().collect::<BTreeSet<_>>().len() >= 40
    })
    .await;
    // In arrival order, each message's attempts come before the next message's first.
    let order: Vec<u64> = numbers(&hits);
    let mut firsts = Vec::new();
    for n in &order {
        if firsts.last() != Some(n) {
            firsts.push(*n);
        }
    }
    assert_eq!(firsts, (0..40).collect::<Vec<u64>>(), "in order: {order:?}");
    assert!(order.len() > 40, "some were retried: {order:?}");
    assert_eq!(rabbit.count("jobs.dlq").await, 0);
}

#[tokio::test]
async fn a_failing_endpoint_pauses_its_subscription_which_resumes_by_itself() {
    let receiver = Receiver::start(Arc::new(|_, _| (503, Duration::ZERO))).await;
    let admin = Admin::new();
    let vhost = unique("push");
    admin.vhost(&vhost).await;
    let name = unique("hook");
    let toml = push_toml(
        &vhost,
        &name,
        &receiver.url,
        "60000",
        "",
        "max_in_flight = 1",
    )
    .replacen(
        "allow_private_networks = true",
        "allow_private_networks = true\npause_after_failures = 3",
        1,
    );
    let server = TestServer::start_ready_with_metrics_listener(
        warren::config::Config::from_toml(&toml).expect("config"),
    )
    .await;
    let rabbit = rabbit_in(&vhost).await;
    fill(&rabbit, "jobs", 0..20).await;
    let state = || async {
        server.operator_get("/readyz").await.body["push"][0]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let paused = eventually(Duration::from_secs(15), || async {
        state().await == "paused"
    })
    .await;
    assert!(paused, "paused after three failures: {}", state().await);
    assert_eq!(
        metric(
            &server,
            &format!("warren_push_paused{{subscription=\"acme/{name}\"}}")
        )
        .await,
        1.0
    );
    // Paused: nothing more is taken; the rest waits in the queue.
    let attempts = receiver.hits().len();
    assert!((3..=4).contains(&attempts), "{attempts} attempts");
    assert_eq!(
        rabbit.count("jobs").await,
        20 - 3,
        "three went to their retry delay"
    );
    let public = server.get("/readyz").await;
    assert_eq!(
        public.status, 200,
        "a paused subscription leaves the gateway ready"
    );
    assert!(public.body.get("push").is_none());
    // The endpoint recovers: the next probe succeeds and the subscription drains.
    receiver.set_script(Arc::new(|_, _| (200, Duration::ZERO)));
    let resumed = eventually(Duration::from_secs(20), || async {
        rabbit.count("jobs").await == 0
    })
    .await;
    assert!(resumed, "resumed by itself: {}", state().await);
    assert_eq!(state().await, "active");
    assert_eq!(
        metric(
            &server,
            &format!("warren_push_paused{{subscription=\"acme/{name}\"}}")
        )
        .await,
        0.0
    );
}

#[test]
fn check_config_names_the_push_key_at_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = |push: &str, queue: &str| {
        format!(
            "[auth]\nhs256_secret = \"{}\"\n[tenants.acme]\nvhost = \"/\"\n\
             [[tenants.acme.queues]]\nname = \"jobs\"\n{queue}\n\
             [[tenants.acme.push]]\nname = \"hook\"\nqueue = \"jobs\"\n{push}\n",
            crate::common::SECRET
        )
    };
    let retry = "retry = { delays_ms = [100] }";
    let ok_push = format!("url = \"https://hooks.example/x\"\nsecrets = [\"{SECRET}\"]");
    for (config, says) in [
        (
            base(&ok_push, ""),
            "tenants.acme.push[0].queue: queue \"jobs\" needs a retry policy",
        ),
        (
            base(
                &format!("url = \"http://127.0.0.1:9/x\"\nsecrets = [\"{SECRET}\"]"),
                retry,
            ),
            "tenants.acme.push[0].url: is on a loopback, private",
        ),
        (
            base(
                &format!("url = \"http://169.254.169.254/latest\"\nsecrets = [\"{SECRET}\"]"),
                retry,
            ),
            "tenants.acme.push[0].url:",
        ),
        (
            base("url = \"https://hooks.example/x\"", retry),
            "tenants.acme.push[0].secrets:",
        ),
        (
            base(
                "url = \"https://hooks.example/x\"\nsecrets = [\"plain\"]",
                retry,
            ),
            "tenants.acme.push[0].secrets[0]:",
        ),
        (
            base(&format!("{ok_push}\nordered = true"), retry),
            "tenants.acme.push[0].ordered:",
        ),
        (
            base(
                &format!("{ok_push}\nheaders = {{ \"webhook-id\" = \"x\" }}"),
                retry,
            ),
            "tenants.acme.push[0].headers.webhook-id:",
        ),
    ] {
        let path = dir.path().join("warren.toml");
        std::fs::write(&path, &config).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("check-config");
        assert_failure_mentions(&out, says);
    }
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, base(&ok_push, retry)).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("check-config");
    assert_success(&out);
}

#[tokio::test]
async fn sigkill_of_the_delivering_replica_loses_nothing() {
    // The first attempt of m-0 hangs, so it is in flight when its replica is killed.
    let receiver = Receiver::start(Arc::new(|hit, earlier| {
        let hang = hit.id() == "m-0" && earlier == 0;
        (
            200,
            if hang {
                Duration::from_secs(60)
            } else {
                Duration::ZERO
            },
        )
    }))
    .await;
    let admin = Admin::new();
    let vhost = unique("push");
    admin.vhost(&vhost).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut replicas = BTreeMap::new();
    for replica in ["a", "b"] {
        let port = closed_port().await;
        let toml = push_toml(
            &vhost,
            "hook",
            &receiver.url,
            "100",
            "",
            &format!("timeout_ms = 30000\nheaders = {{ \"X-Replica\" = \"{replica}\" }}"),
        )
        .replacen(
            "[auth]",
            &format!("[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_s = 2\n[auth]"),
            1,
        );
        let process = WarrenProcess::start(&dir, &toml, "acme", port, 200).await;
        replicas.insert(replica.to_owned(), process);
    }
    let rabbit = rabbit_in(&vhost).await;
    fill(&rabbit, "jobs", 0..20).await;
    let hung = hits_until(&receiver, Duration::from_secs(15), |h| {
        h.iter().any(|h| h.id() == "m-0")
    })
    .await;
    let first = hung.iter().find(|h| h.id() == "m-0").expect("m-0 was sent");
    let delivering = first.header("x-replica").to_owned();
    replicas.get_mut(&delivering).expect("a replica").kill();
    // The broker gives the unacked message back; the other replica delivers it.
    let all = hits_until(&receiver, Duration::from_secs(30), |h| {
        h.iter().filter(|h| h.id() == "m-0").count() >= 2
    })
    .await;
    let again = all
        .iter()
        .filter(|h| h.id() == "m-0")
        .nth(1)
        .expect("m-0 again");
    assert_ne!(
        again.header("x-replica"),
        delivering,
        "redelivered by the other replica"
    );
    assert_eq!(rabbit.wait_count("jobs", 0).await, 0, "nothing left behind");
    let ids: BTreeSet<String> = receiver.hits().iter().map(|h| h.id().to_owned()).collect();
    assert_eq!(ids.len(), 20, "every message reached the receiver: {ids:?}");
    assert_eq!(rabbit.count("jobs.dlq").await, 0);
}

#[tokio::test]
async fn topology_plan_shows_the_push_subscriptions() {
    let admin = Admin::new();
    let vhost = unique("push");
    admin.vhost(&vhost).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("warren.toml");
    let url = "http://127.0.0.1:9/hook?token=secret";
    std::fs::write(
        &path,
        push_toml(&vhost, "hook", url, "100, 200", "", "max_in_flight = 4"),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["topology", "plan", "--config"])
        .arg(&path)
        .output()
        .expect("plan");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(
            "push       \"hook\": queue \"jobs\" -> http://127.0.0.1:9/hook (warren frames, 4 in flight, retries [100, 200] ms then \"jobs.dlq\")"
        ),
        "{printed}"
    );
    assert!(!printed.contains("secret"), "{printed}");
}
