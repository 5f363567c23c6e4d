//! Pull consume with leases (SPEC §14) against the real broker, with two replicas
//! sharing Redis: drains with acks at the other replica, lease expiry and extension,
//! long polls, receipts that are forged, another tenant's or expired, bounds.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::push::fill;
use crate::topology::topology_toml;

/// A fresh vhost shared by tenants `acme` (may consume `jobs`, a queue with a retry
/// policy) and `globex` (may consume `jobs` too: the same name, to try acme's
/// receipts), the idempotency store in Redis (so replicas relay settles), short leases
/// allowed, and `extra` config.
fn pull_toml(vhost: &str, extra: &str) -> String {
    let tables = "subscribe = [{ queue = \"jobs\" }]\n\
                  [[tenants.acme.queues]]\nname = \"jobs\"\nretry = { delays_ms = [100] }\n";
    let redis =
        std::env::var("WARREN_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    topology_toml(vhost, tables)
        .replacen(
            "[auth]",
            &format!(
                "[topology]\napply_on_start = true\n\
                 [idempotency]\nstore = \"redis\"\nredis_url = \"{redis}\"\nkey_prefix = \"{}:\"\n\
                 [pull]\nmin_lease_ms = 100\n{extra}\n[auth]",
                unique("pull")
            ),
            1,
        )
        .replacen(
            "[tenants.acme]",
            &format!("[tenants.globex]\nvhost = \"{vhost}\"\nsubscribe = [{{ queue = \"jobs\" }}]\n[tenants.acme]"),
            1,
        )
}

struct Pulling {
    _admin: Admin,
    rabbit: Rabbit,
    replicas: Vec<TestServer>,
    token: String,
}

async fn pulling(replicas: usize, extra: &str) -> Pulling {
    let admin = Admin::new();
    let vhost = unique("pull");
    admin.vhost(&vhost).await;
    let toml = pull_toml(&vhost, extra);
    let mut servers = Vec::new();
    for _ in 0..replicas {
        let config = warren::config::Config::from_toml(&toml).expect("config");
        servers.push(TestServer::start_ready(config).await);
    }
    let token = servers[0].token("acme", "subscribe");
    let rabbit = rabbit_in(&vhost).await;
    Pulling {
        _admin: admin,
        rabbit,
        replicas: servers,
        token,
    }
}

async fn call(server: &TestServer, token: &str, op: &str, body: Value) -> Resp {
    server
        .post(&format!("/v1/queues/jobs/{op}"), Some(token), &body)
        .await
}

fn receipts(r: &Resp) -> Vec<String> {
    r.body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["receipt"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn receive_renders_the_message_and_ack_removes_it_for_good() {
    let p = pulling(1, "").await;
    fill(&p.rabbit, "jobs", 0..3).await;
    let server = &p.replicas[0];
    let r = call(
        server,
        &p.token,
        "receive",
        json!({"max_messages": 10, "lease_ms": 30000}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let messages = r.body["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(messages.len(), 3, "{:?}", r.body);
    let first = &messages[0];
    assert_eq!(first["payload"], json!({"n": 0}));
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["routing_key"], "jobs");
    assert_eq!(first["redelivered"], false);
    assert_eq!(first["properties"]["message_id"], "m-0");
    assert!(
        first["lease_expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(first["receipt"].as_str().map(str::len), Some(64));
    // Nothing else to receive while they are leased.
    let again = call(server, &p.token, "receive", json!({"max_messages": 10})).await;
    assert_eq!(again.body["messages"], json!([]));
    let all = receipts(&r);
    let acked = call(server, &p.token, "ack", json!({"receipts": all})).await;
    assert_eq!(acked.status, 200, "{:?}", acked.body);
    assert!(
        acked.body["results"]
            .as_array()
            .is_some_and(|r| r.iter().all(|x| x["status"] == 200))
    );
    assert_eq!(p.rabbit.wait_count("jobs", 0).await, 0);
    // A repeated ack is harmless.
    let repeated = call(server, &p.token, "ack", json!({"receipts": all})).await;
    assert_eq!(repeated.status, 200, "{:?}", repeated.body);
    assert_eq!(p.rabbit.count("jobs").await, 0);
}

#[tokio::test]
async fn eight_pullers_over_two_replicas_acking_at_the_other_drain_1000_messages_exactly_once() {
    let p = Arc::new(pulling(2, "").await);
    fill(&p.rabbit, "jobs", 0..1000).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let pullers: Vec<_> = (0..8)
        .map(|i| {
            let (p, acked) = (p.clone(), acked.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(90);
                while acked.load(Ordering::SeqCst) < 1000 && Instant::now() < deadline {
                    // Receive at one replica, ack at the other: a plain load balancer.
                    let (here, there) = (&p.replicas[i % 2], &p.replicas[(i + 1) % 2]);
                    let r = call(
                        here,
                        &p.token,
                        "receive",
                        json!({"max_messages": 10, "wait_ms": 500}),
                    )
                    .await;
                    assert_eq!(r.status, 200, "{:?}", r.body);
                    let batch = r.body["messages"].as_array().cloned().unwrap_or_default();
                    if batch.is_empty() {
                        continue;
                    }
                    let receipts: Vec<Value> = batch.iter().map(|m| m["receipt"].clone()).collect();
                    let a = call(there, &p.token, "ack", json!({"receipts": receipts})).await;
                    assert_eq!(a.status, 200, "cross-replica ack: {:?}", a.body);
                    for m in &batch {
                        seen.push(m["payload"]["n"].as_u64().unwrap_or(u64::MAX));
                    }
                    acked.fetch_add(batch.len(), Ordering::SeqCst);
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut shares = Vec::new();
    for puller in pullers {
        let seen = puller.await.expect("a puller");
        shares.push(seen.len());
        all.extend(seen);
    }
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), 1000, "each acked once (shares {shares:?})");
    assert_eq!(distinct.len(), 1000, "none twice, none lost");
    assert!(
        shares.iter().all(|s| *s > 0),
        "every puller took some: {shares:?}"
    );
    assert_eq!(p.rabbit.wait_count("jobs", 0).await, 0);
}

#[tokio::test]
async fn an_expired_lease_redelivers_with_the_attempt_counted_and_extend_keeps_a_lease() {
    let p = pulling(2, "").await;
    fill(&p.rabbit, "jobs", 0..2).await;
    let (a, b) = (&p.replicas[0], &p.replicas[1]);
    let r = call(
        a,
        &p.token,
        "receive",
        json!({"max_messages": 2, "lease_ms": 400}),
    )
    .await;
    let leased = receipts(&r);
    assert_eq!(leased.len(), 2, "{:?}", r.body);
    // Keep the second one (at the other replica); let the first run out.
    let e = call(
        b,
        &p.token,
        "extend",
        json!({"receipts": [leased[1]], "lease_ms": 3000}),
    )
    .await;
    assert_eq!(e.status, 200, "{:?}", e.body);
    assert!(e.body["results"][0]["lease_expires_at"].is_string());
    let started = Instant::now();
    let back = loop {
        let r = call(
            b,
            &p.token,
            "receive",
            json!({"max_messages": 10, "wait_ms": 1000}),
        )
        .await;
        if !receipts(&r).is_empty() {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never came back"
        );
    };
    let messages = back.body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(messages.len(), 1, "only the expired one: {:?}", back.body);
    assert_eq!(messages[0]["payload"], json!({"n": 0}));
    assert_eq!(messages[0]["attempt"], 2, "{:?}", messages[0]);
    // The first receipt is gone; the extended one is still good past its first end.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = call(
        a,
        &p.token,
        "ack",
        json!({"receipts": [leased[0], leased[1]]}),
    )
    .await;
    assert_eq!(late.status, 207, "{:?}", late.body);
    assert_eq!(late.body["results"][0]["status"], 410);
    assert_eq!(late.body["results"][0]["code"], "lease_expired");
    assert_eq!(
        late.body["results"][1]["status"], 200,
        "extended past its first deadline"
    );
    let rest = receipts(&back);
    assert_eq!(
        call(a, &p.token, "ack", json!({"receipts": rest}))
            .await
            .status,
        200
    );
    assert_eq!(p.rabbit.wait_count("jobs", 0).await, 0);
}

#[tokio::test]
async fn forged_edited_and_another_tenants_receipts_are_refused() {
    let p = pulling(1, "").await;
    fill(&p.rabbit, "jobs", 0..1).await;
    let server = &p.replicas[0];
    let r = call(server, &p.token, "receive", json!({})).await;
    let receipt = receipts(&r).pop().expect("a receipt");
    // Another tenant with a grant on a queue of the same name.
    let globex = server.token("globex", "subscribe");
    let other = call(server, &globex, "ack", json!({"receipts": [receipt]})).await;
    assert_eq!(other.status, 207, "{:?}", other.body);
    assert_eq!(other.body["results"][0]["code"], "invalid_request");
    let mut edited = receipt.clone().into_bytes();
    edited[30] = if edited[30] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).expect("ascii");
    for forged in [edited.as_str(), "not-a-receipt", ""] {
        let r = call(server, &p.token, "ack", json!({"receipts": [forged]})).await;
        assert_eq!(
            r.body["results"][0]["status"], 400,
            "{forged:?}: {:?}",
            r.body
        );
    }
    // Still leased for acme: nothing was settled by those.
    assert_eq!(
        call(server, &p.token, "ack", json!({"receipts": [receipt]}))
            .await
            .status,
        200
    );
    // Bounds and grants.
    for (body, code) in [
        (json!({"max_messages": 101}), "invalid_request"),
        (json!({"wait_ms": 20001}), "invalid_request"),
        (json!({"lease_ms": 10}), "invalid_request"),
        (json!({"bogus": 1}), "invalid_request"),
    ] {
        let r = call(server, &p.token, "receive", body.clone()).await;
        assert_problem(&r, 400, code);
    }
    let r = server
        .post("/v1/queues/secret/receive", Some(&p.token), &json!({}))
        .await;
    assert_problem(&r, 403, "forbidden");
    let publisher = server.token("acme", "publish");
    let r = call(server, &publisher, "receive", json!({})).await;
    assert_problem(&r, 403, "forbidden");
    let r = call(server, &p.token, "ack", json!({"receipts": []})).await;
    assert_problem(&r, 400, "invalid_request");
}

#[tokio::test]
async fn a_long_poll_answers_when_a_message_arrives_or_when_its_wait_ends() {
    let p = pulling(1, "").await;
    let server = &p.replicas[0];
    let started = Instant::now();
    let r = call(server, &p.token, "receive", json!({"wait_ms": 600})).await;
    assert_eq!(r.body["messages"], json!([]));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // A message that arrives mid-poll is answered at once.
    let poll = call(
        server,
        &p.token,
        "receive",
        json!({"wait_ms": 10000, "max_messages": 5}),
    );
    let publish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        fill(&p.rabbit, "jobs", 0..1).await;
        Instant::now()
    };
    let (r, published) = tokio::join!(poll, publish);
    assert_eq!(receipts(&r).len(), 1, "{:?}", r.body);
    assert!(published.elapsed() < Duration::from_secs(2));
    // A client that goes away mid-poll leaves nothing leased.
    let gone = tokio::time::timeout(
        Duration::from_millis(200),
        call(server, &p.token, "receive", json!({"wait_ms": 10000})),
    )
    .await;
    assert!(gone.is_err(), "the client gave up");
    fill(&p.rabbit, "jobs", 1..2).await;
    let next = call(server, &p.token, "receive", json!({"wait_ms": 3000})).await;
    assert_eq!(
        receipts(&next).len(),
        1,
        "not stuck in the abandoned poll: {:?}",
        next.body
    );
}

#[tokio::test]
async fn nacks_requeue_or_take_the_retry_policy_and_leases_are_bounded() {
    let p = pulling(1, "max_leased_per_tenant = 3").await;
    fill(&p.rabbit, "jobs", 0..5).await;
    let server = &p.replicas[0];
    let r = call(server, &p.token, "receive", json!({"max_messages": 10})).await;
    let leased = receipts(&r);
    assert_eq!(
        leased.len(),
        3,
        "bounded by max_leased_per_tenant: {:?}",
        r.body
    );
    let full = call(server, &p.token, "receive", json!({})).await;
    assert_problem(&full, 429, "rate_limited");
    // requeue: true puts it straight back; false takes the retry policy.
    let n = call(
        server,
        &p.token,
        "nack",
        json!({"receipts": [leased[0]], "requeue": true}),
    )
    .await;
    assert_eq!(n.status, 200, "{:?}", n.body);
    let n = call(
        server,
        &p.token,
        "nack",
        json!({"receipts": [leased[1]], "requeue": false}),
    )
    .await;
    assert_eq!(n.status, 200, "{:?}", n.body);
    assert_eq!(
        p.rabbit.wait_count("jobs.retry.1", 0).await,
        0,
        "through the delay"
    );
    let ack = call(server, &p.token, "ack", json!({"receipts": [leased[2]]})).await;
    assert_eq!(ack.status, 200);
    // Four left: the requeued one, the retried one (back after its delay), two unread.
    let mut left = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while left.len() < 4 && Instant::now() < deadline {
        let r = call(
            server,
            &p.token,
            "receive",
            json!({"max_messages": 3, "wait_ms": 500}),
        )
        .await;
        for m in r.body["messages"].as_array().cloned().unwrap_or_default() {
            left.insert(m["payload"]["n"].as_u64().unwrap_or(99));
            if m["payload"]["n"] == 1 {
                assert_eq!(m["properties"]["headers"]["x-warren-attempt"], 1, "{m}");
            }
        }
        let all = receipts(&r);
        if !all.is_empty() {
            call(server, &p.token, "ack", json!({"receipts": all})).await;
        }
    }
    assert_eq!(left, BTreeSet::from([0, 1, 3, 4]));
}

#[tokio::test]
async fn a_sigkilled_leasing_replica_gives_its_messages_back() {
    let admin = Admin::new();
    let vhost = unique("pull");
    admin.vhost(&vhost).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let port = closed_port().await;
        let toml = pull_toml(&vhost, "").replacen(
            "[auth]",
            &format!("[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_s = 2\n[auth]"),
            1,
        );
        replicas.push(WarrenProcess::start(&dir, &toml, "acme", port, 200).await);
    }
    let rabbit = rabbit_in(&vhost).await;
    fill(&rabbit, "jobs", 0..5).await;
    let post = |replica: &WarrenProcess, op: &str, body: Value| {
        let request = replica
            .http
            .post(format!("{}/v1/queues/jobs/{op}", replica.base))
            .bearer_auth(&replica.token)
            .json(&body)
            .send();
        async move { into_resp(request.await.expect("request")).await }
    };
    let r = post(
        &replicas[0],
        "receive",
        json!({"max_messages": 5, "lease_ms": 60000}),
    )
    .await;
    let leased = receipts(&r);
    assert_eq!(leased.len(), 5, "{:?}", r.body);
    replicas[0].kill();
    // Back in the queue at once (not after the lease), redelivered.
    let started = Instant::now();
    let mut back = BTreeSet::new();
    while back.len() < 5 && started.elapsed() < Duration::from_secs(10) {
        let r = post(
            &replicas[1],
            "receive",
            json!({"max_messages": 5, "wait_ms": 1000}),
        )
        .await;
        for m in r.body["messages"].as_array().cloned().unwrap_or_default() {
            assert_eq!(m["redelivered"], true, "{m}");
            back.insert(m["payload"]["n"].as_u64().unwrap_or(99));
        }
        let all = receipts(&r);
        if !all.is_empty() {
            assert_eq!(
                post(&replicas[1], "ack", json!({"receipts": all}))
                    .await
                    .status,
                200
            );
        }
    }
    assert_eq!(back, (0..5).collect(), "every message came back");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The dead replica's receipts are answered at the living one: the leases are gone.
    let stale = post(&replicas[1], "ack", json!({"receipts": [leased[0]]})).await;
    assert_eq!(
        stale.body["results"][0]["code"], "lease_expired",
        "{:?}",
        stale.body
    );
    assert_eq!(rabbit.wait_count("jobs", 0).await, 0);
}
