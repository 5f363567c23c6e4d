//! `mode: "queue"` subscriptions (SPEC §11) over real sockets against a fresh vhost
//! whose topology Warren applies at start: competing consumers, 404/403, the retry
//! path through delay queues to the DLQ and back by redrive, a quorum delivery limit,
//! priorities.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use serde_json::{Value, json};

use crate::common::*;
use crate::topology::topology_toml;
use crate::ws::{Ws, connect, recv, recv_within, send};

/// A fresh vhost for tenant `acme` with `tables` applied at start (Warren is ready
/// only once it is), and a subscribe token. Dropped in reverse: server, then vhost.
async fn setup(tables: &str) -> (Admin, Rabbit, String, TestServer, String) {
    let admin = Admin::new();
    let vhost = unique("queues");
    admin.vhost(&vhost).await;
    let grants = "subscribe = [{ queue = \"jobs\" }, { queue = \"urgent\" }, \
                  { queue = \"poisoned\" }, { queue = \"absent\" }]\n";
    let toml = topology_toml(&vhost, &format!("{grants}{tables}")).replacen(
        "[auth]",
        "[topology]\napply_on_start = true\n[auth]",
        1,
    );
    let config = warren::config::Config::from_toml(&toml).expect("config");
    let server = TestServer::start_ready(config).await;
    let token = server.token("acme", "subscribe");
    let rabbit = rabbit_in(&vhost).await;
    (admin, rabbit, vhost, server, token)
}

pub(crate) async fn publish(rabbit: &Rabbit, queue: &str, body: &str, priority: Option<u8>) {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(p) = priority {
        properties = properties.with_priority(p);
    }
    rabbit
        .channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("publish");
}

pub(crate) async fn subscribe_queue(ws: &mut Ws, id: &str, queue: &str, prefetch: u16) -> Value {
    send(
        ws,
        json!({"type": "subscribe", "id": id, "mode": "queue", "queue": queue, "prefetch": prefetch}),
    )
    .await;
    recv(ws).await
}

pub(crate) async fn settle(ws: &mut Ws, kind: &str, frame: &Value, requeue: bool) {
    let mut settle = json!({"type": kind, "subscription": frame["subscription"], "delivery_tag": frame["delivery_tag"]});
    if kind == "nack" {
        settle["requeue"] = requeue.into();
    }
    send(ws, settle).await;
}

pub(crate) fn attempt(frame: &Value) -> Option<u64> {
    frame["properties"]["headers"]["x-warren-attempt"].as_u64()
}

#[tokio::test]
async fn two_sockets_on_one_queue_split_1000_messages_none_lost_or_doubled() {
    let (_admin, rabbit, _vhost, server, token) =
        setup("[[tenants.acme.queues]]\nname = \"jobs\"\ntype = \"quorum\"\n").await;
    let mut sockets = Vec::new();
    for id in ["a", "b"] {
        let mut ws = connect(&server, &token).await;
        let answer = subscribe_queue(&mut ws, id, "jobs", 10).await;
        assert_eq!(
            answer,
            json!({"type": "subscribed", "id": id, "queue": "jobs"})
        );
        sockets.push(ws);
    }
    const N: usize = 1000;
    for i in 0..N {
        publish(&rabbit, "jobs", &i.to_string(), None).await;
    }
    let total = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let total = total.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                // Until all N arrived, and then a quiet spell: a duplicate would show.
                while tokio::time::Instant::now() < deadline {
                    let next = tokio::time::timeout(Duration::from_millis(300), async {
                        loop {
                            let frame = recv(&mut ws).await;
                            if frame["type"] == "message" {
                                return frame;
                            }
                        }
                    })
                    .await;
                    match next {
                        Ok(frame) => {
                            seen.push(frame["payload"].as_u64().expect("a number"));
                            total.fetch_add(1, Ordering::SeqCst);
                            settle(&mut ws, "ack", &frame, false).await;
                        }
                        Err(_) if total.load(Ordering::SeqCst) >= N => break,
                        Err(_) => {}
                    }
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut shares = Vec::new();
    for reader in readers {
        let seen = reader.await.unwrap();
        shares.push(seen.len());
        all.extend(seen);
    }
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        N,
        "every message exactly once (shares {shares:?})"
    );
    assert_eq!(distinct.len(), N, "no message twice");
    assert!(
        shares.iter().all(|s| *s > 0),
        "both sockets took a share: {shares:?}"
    );
    assert_eq!(rabbit.wait_count("jobs", 0).await, 0);
}

#[tokio::test]
async fn a_missing_queue_is_queue_not_found_and_an_ungranted_one_forbidden() {
    let (_admin, _rabbit, vhost, server, token) =
        setup("[[tenants.acme.queues]]\nname = \"secret\"\n").await;
    let mut ws = connect(&server, &token).await;
    let missing = subscribe_queue(&mut ws, "m", "absent", 1).await;
    assert_eq!(missing["type"], "error");
    assert_eq!(missing["code"], "queue_not_found");
    assert!(
        !missing["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&vhost)
    );
    let denied = subscribe_queue(&mut ws, "d", "secret", 1).await;
    assert_eq!(denied["code"], "forbidden", "{denied}");
    // The socket still works after both.
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "m", "mode": "queue"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "invalid_request");
}

#[tokio::test]
async fn nacks_go_through_each_delay_then_the_dlq_with_x_death_and_redrive_brings_it_back() {
    let delays = [200u64, 400, 800];
    let (_admin, rabbit, vhost, server, token) = setup(
        "[[tenants.acme.queues]]\nname = \"jobs\"\ntype = \"quorum\"\n\
         retry = { delays_ms = [200, 400, 800] }\n",
    )
    .await;
    let mut ws = connect(&server, &token).await;
    subscribe_queue(&mut ws, "w", "jobs", 1).await;
    publish(&rabbit, "jobs", "{\"order\":42}", None).await;

    let first = recv(&mut ws).await;
    assert_eq!(first["type"], "message");
    assert_eq!(
        attempt(&first),
        None,
        "the first delivery has no attempt yet"
    );
    let mut nacked_at = Instant::now();
    settle(&mut ws, "nack", &first, false).await;
    for (i, delay) in delays.iter().enumerate() {
        let frame = recv(&mut ws).await;
        let waited = nacked_at.elapsed();
        assert_eq!(frame["payload"], json!({"order": 42}));
        assert_eq!(attempt(&frame), Some(i as u64 + 1), "{frame}");
        let deaths = frame["properties"]["headers"]["x-death"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            deaths.len(),
            i + 1,
            "one x-death entry per delay queue: {frame}"
        );
        let expected = Duration::from_millis(*delay);
        eprintln!(
            "retry {}: redelivered {waited:?} after the nack (delay {expected:?})",
            i + 1
        );
        assert!(
            waited >= expected && waited < expected + Duration::from_millis(1500),
            "retry {} after {waited:?}, configured {expected:?}",
            i + 1
        );
        nacked_at = Instant::now();
        settle(&mut ws, "nack", &frame, false).await;
    }
    // After the last delay: the DLQ, with the attempt and the history.
    assert_eq!(rabbit.wait_count("jobs.dlq", 1).await, 1);
    let dead = rabbit
        .channel
        .basic_get("jobs.dlq".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("the dead letter");
    let headers =
        warren::delivery::render::properties_json(&dead.delivery.properties)["headers"].clone();
    assert_eq!(headers["x-warren-attempt"], 3, "{headers}");
    let queues: Vec<&str> = headers["x-death"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["queue"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        queues.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from(["jobs.retry.1", "jobs.retry.2", "jobs.retry.3"]),
        "{headers}"
    );
    rabbit
        .channel
        .basic_nack(
            dead.delivery.delivery_tag,
            BasicNackOptions {
                multiple: false,
                requeue: true,
            },
        )
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), recv(&mut ws))
            .await
            .is_err(),
        "nothing more until the redrive"
    );

    // Redrive: the CLI moves it back, counted; the retry policy starts over.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warren.toml");
    std::fs::write(
        &path,
        topology_toml(
            &vhost,
            "[[tenants.acme.queues]]\nname = \"jobs\"\ntype = \"quorum\"\nretry = { delays_ms = [200, 400, 800] }\n",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "topology", "redrive", "--tenant", "acme", "--queue", "jobs", "--limit", "10",
        ])
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_success(&out);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("redriven 1 message(s)"), "{printed}");
    let back = recv_within(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(back["payload"], json!({"order": 42}));
    assert_eq!(attempt(&back), None, "redrive resets the attempt: {back}");
    assert_eq!(
        back["properties"]["headers"]["x-death"]
            .as_array()
            .map(Vec::len),
        Some(3),
        "the history stays: {back}"
    );
    settle(&mut ws, "ack", &back, false).await;
    assert_eq!(rabbit.wait_count("jobs.dlq", 0).await, 0);
}

#[tokio::test]
async fn a_quorum_queue_with_a_delivery_limit_dead_letters_a_poison_message() {
    let (_admin, rabbit, _vhost, server, token) = setup(
        "[[tenants.acme.queues]]\nname = \"poisoned\"\ntype = \"quorum\"\ndelivery_limit = 2\n\
         dead_letter_exchange = \"\"\ndead_letter_routing_key = \"poisoned.dead\"\n\
         [[tenants.acme.queues]]\nname = \"poisoned.dead\"\n",
    )
    .await;
    let mut ws = connect(&server, &token).await;
    subscribe_queue(&mut ws, "p", "poisoned", 1).await;
    publish(&rabbit, "poisoned", "\"poison\"", None).await;
    let mut deliveries = 0;
    while let Ok(frame) = tokio::time::timeout(Duration::from_secs(2), recv(&mut ws)).await {
        assert_eq!(frame["payload"], "poison");
        deliveries += 1;
        assert!(deliveries <= 10, "the delivery limit never applied");
        settle(&mut ws, "nack", &frame, true).await;
    }
    assert!(deliveries >= 2, "redelivered up to the limit: {deliveries}");
    assert_eq!(rabbit.wait_count("poisoned.dead", 1).await, 1);
    assert_eq!(rabbit.count("poisoned").await, 0);
}

#[tokio::test]
async fn a_priority_queue_delivers_higher_priorities_first_to_a_slow_consumer() {
    let (_admin, rabbit, _vhost, server, token) = setup(
        "publish = [{ exchange = \"work\", routing_key = \"#\" }]\n\
         [[tenants.acme.exchanges]]\nname = \"work\"\ntype = \"direct\"\n\
         [[tenants.acme.queues]]\nname = \"urgent\"\nmax_priority = 10\n\
         bindings = [{ exchange = \"work\", routing_key = \"urgent\" }]\n",
    )
    .await;
    // Published through Warren, low priorities first.
    let publisher = server.token("acme", "publish");
    for (priority, n) in [(1, 0), (1, 1), (1, 2), (9, 3), (9, 4), (9, 5)] {
        let r = server
            .publish(
                &publisher,
                &json!({"exchange": "work", "routing_key": "urgent", "payload": n,
                        "properties": {"priority": priority}}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    assert_eq!(rabbit.wait_count("urgent", 6).await, 6);
    let mut ws = connect(&server, &token).await;
    subscribe_queue(&mut ws, "u", "urgent", 1).await;
    let mut order = Vec::new();
    for _ in 0..6 {
        let frame = recv(&mut ws).await;
        order.push(frame["payload"].as_u64().unwrap_or(99));
        settle(&mut ws, "ack", &frame, false).await;
    }
    assert_eq!(
        order,
        [3, 4, 5, 0, 1, 2],
        "high priorities first, FIFO within one"
    );
}

#[tokio::test]
async fn queue_subscriptions_count_as_consumers_and_unsubscribing_keeps_the_queue() {
    let (_admin, rabbit, _vhost, server, token) = setup(
        "[tenants.acme.limits]\nmax_consumers = 1\n\
         [[tenants.acme.queues]]\nname = \"jobs\"\n",
    )
    .await;
    publish(&rabbit, "jobs", "1", None).await;
    let mut ws = connect(&server, &token).await;
    assert_eq!(
        subscribe_queue(&mut ws, "one", "jobs", 5).await["type"],
        "subscribed"
    );
    let second = subscribe_queue(&mut ws, "two", "jobs", 5).await;
    // The first delivery may come before the answer to the second subscribe.
    let (delivery, refused) = if second["type"] == "message" {
        (second, recv(&mut ws).await)
    } else {
        (recv(&mut ws).await, second)
    };
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert_eq!(delivery["payload"], 1);
    send(&mut ws, json!({"type": "unsubscribe", "id": "one"})).await;
    assert_eq!(recv(&mut ws).await["type"], "unsubscribed");
    // Not acked: back in the queue, which is still there.
    assert_eq!(rabbit.wait_count("jobs", 1).await, 1);
    assert_eq!(
        subscribe_queue(&mut ws, "two", "jobs", 5).await["type"],
        "subscribed"
    );
    let again = recv(&mut ws).await;
    assert_eq!(again["redelivered"], true, "{again}");
}
