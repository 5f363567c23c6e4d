//! Topology as code (SPEC §11) through the `warren topology` CLI against a fresh vhost:
//! every argument applied, plan clean afterwards, apply idempotent, a conflicting
//! argument reported and refused without applying anything; apply_on_start readiness.

use std::process::{Command, Output};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_warren");

/// A config with tenant `acme` on `vhost` and the given topology tables.
pub fn topology_toml(vhost: &str, tables: &str) -> String {
    format!(
        "[auth]\nhs256_secret = \"{SECRET}\"\n[amqp]\nurl = \"{}\"\n\
         [tenants.acme]\nvhost = \"{vhost}\"\n{tables}",
        broker_url()
    )
}

fn run(dir: &tempfile::TempDir, toml: &str, args: &[&str]) -> Output {
    let path = dir.path().join("warren.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    eprintln!(
        "warren {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether `queue` exists in `vhost` (a passive declare on a connection of its own:
/// a failed one closes the channel).
async fn queue_exists(vhost: &str, queue: &str) -> bool {
    let rabbit = rabbit_in(vhost).await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    rabbit
        .channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every argument SPEC §11 and issue #17 name, on each kind of object.
const EVERYTHING: &str = r##"
[[tenants.acme.exchanges]]
name = "events"
type = "topic"
alternate_exchange = "unrouted"
[[tenants.acme.exchanges]]
name = "unrouted"
type = "fanout"
[[tenants.acme.exchanges]]
name = "audit"
type = "headers"
internal = true
bindings = [{ exchange = "events", routing_key = "#" }]
[[tenants.acme.exchanges]]
name = "scratch"
type = "direct"
durable = false
auto_delete = true
[[tenants.acme.queues]]
name = "billing"
type = "quorum"
message_ttl_ms = 60000
expires_ms = 3600000
max_length = 1000
max_length_bytes = 1000000
overflow = "reject-publish"
dead_letter_exchange = ""
dead_letter_routing_key = "billing.poison"
delivery_limit = 5
single_active_consumer = true
bindings = [{ exchange = "events", routing_key = "order.#" }]
retry = { delays_ms = [200, 400, 800] }
[[tenants.acme.queues]]
name = "billing.poison"
[[tenants.acme.queues]]
name = "pdfs"
durable = false
max_priority = 10
overflow = "reject-publish-dlx"
bindings = [{ exchange = "audit", arguments = { "x-match" = "all", format = "pdf" } }]
[[tenants.acme.queues]]
name = "lost"
bindings = [{ exchange = "unrouted" }]
[[tenants.acme.queues]]
name = "order-log"
type = "stream"
max_age = "7D"
max_length_bytes = 100000000
stream_max_segment_size_bytes = 1000000
bindings = [{ exchange = "events", routing_key = "#" }]
"##;

#[tokio::test]
async fn every_argument_applies_to_an_empty_vhost_then_plan_is_clean_and_apply_a_no_op() {
    let admin = Admin::new();
    let vhost = unique("topo");
    admin.vhost(&vhost).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = topology_toml(&vhost, EVERYTHING);

    let before = run(&dir, &toml, &["topology", "plan"]);
    assert_success(&before);
    assert!(stdout(&before).contains("0 exist, 13 missing, 0 conflicting"));

    let applied = run(&dir, &toml, &["topology", "apply"]);
    assert_success(&applied);
    assert!(stdout(&applied).contains("13 declared, 0 unchanged"));

    let after = run(&dir, &toml, &["topology", "plan"]);
    assert_success(&after);
    let text = stdout(&after);
    assert!(
        text.contains("13 exist, 0 missing, 0 conflicting, 5 bindings"),
        "{text}"
    );
    assert!(
        !text.contains("CONFLICT") && !text.contains("missing "),
        "{text}"
    );

    let again = run(&dir, &toml, &["topology", "apply"]);
    assert_success(&again);
    assert!(stdout(&again).contains("0 declared, 13 unchanged"));

    // What was declared works: the bindings route, the headers binding matches on its
    // arguments, the alternate exchange takes what nothing else does.
    let rabbit = rabbit_in(&vhost).await;
    let publish = |key: &'static str, headers: Option<(&'static str, &'static str)>| {
        let channel = rabbit.channel.clone();
        async move {
            let mut table = FieldTable::default();
            if let Some((k, v)) = headers {
                table.insert(k.into(), AMQPValue::LongString(v.into()));
            }
            channel
                .basic_publish(
                    "events".into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    b"x",
                    BasicProperties::default().with_headers(table),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish("order.created", Some(("format", "pdf"))).await;
    publish("order.created", Some(("format", "txt"))).await;
    assert_eq!(rabbit.wait_count("billing", 2).await, 2);
    assert_eq!(rabbit.wait_count("pdfs", 1).await, 1);
    // Everything goes to the stream and audit, so nothing reaches the alternate exchange.
    assert_eq!(rabbit.count("lost").await, 0);
}

#[tokio::test]
async fn a_conflicting_queue_argument_is_reported_by_plan_and_refused_by_apply() {
    let admin = Admin::new();
    let vhost = unique("topo");
    admin.vhost(&vhost).await;
    let rabbit = rabbit_in(&vhost).await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-priority".into(), AMQPValue::LongInt(5));
    rabbit
        .channel
        .queue_declare(
            "jobs".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = topology_toml(
        &vhost,
        "[[tenants.acme.queues]]\nname = \"fresh\"\n\
         [[tenants.acme.queues]]\nname = \"jobs\"\nmax_priority = 10\n",
    );

    let plan = run(&dir, &toml, &["topology", "plan"]);
    assert_eq!(plan.status.code(), Some(2), "conflicts exit 2");
    let text = stdout(&plan);
    assert!(
        text.contains("CONFLICT   queue \"jobs\": argument x-max-priority differs"),
        "{text}"
    );
    assert!(text.contains("missing    queue \"fresh\""), "{text}");

    let apply = run(&dir, &toml, &["topology", "apply"]);
    assert_eq!(apply.status.code(), Some(2));
    let text = stdout(&apply);
    assert!(
        text.contains("queue \"jobs\": argument x-max-priority differs"),
        "{text}"
    );
    assert!(text.contains("nothing was applied"), "{text}");
    // Not half-applied: the queue that was missing still is.
    assert!(
        !queue_exists(&vhost, "fresh").await,
        "apply declared `fresh` despite the conflict"
    );
}

#[tokio::test]
async fn apply_on_start_with_a_conflict_keeps_warren_unready_without_naming_the_vhost() {
    let admin = Admin::new();
    let vhost = unique("topo");
    admin.vhost(&vhost).await;
    let rabbit = rabbit_in(&vhost).await;
    rabbit
        .channel
        .queue_declare(
            "jobs".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let config = config(&format!(
        "[topology]\napply_on_start = true\n[tenants.acme]\nvhost = \"{vhost}\"\n\
         [[tenants.acme.queues]]\nname = \"jobs\"\nmessage_ttl_ms = 1000\n"
    ));
    let server = TestServer::start_with_metrics_listener(config).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let r = server.operator_get("/readyz").await;
        let reported = r.body["topology"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("x-message-ttl"));
        if r.status == 503 && reported {
            break r.body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = body["topology"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("queue \"jobs\""), "{error}");
    assert!(
        !error.contains(&vhost),
        "the reason names the vhost: {error}"
    );
    assert_eq!(body["status"], "not_ready");
    // The public view says the topology is not applied, not why.
    let public = server.get("/readyz").await;
    assert_eq!(
        public.body["topology"],
        serde_json::json!({"applied": false})
    );
}

#[tokio::test]
async fn a_binding_to_an_exchange_that_nothing_declares_blocks_apply() {
    let admin = Admin::new();
    let vhost = unique("topo");
    admin.vhost(&vhost).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = topology_toml(
        &vhost,
        "[[tenants.acme.queues]]\nname = \"jobs\"\nbindings = [{ exchange = \"ghost\", routing_key = \"k\" }]\n",
    );
    let plan = run(&dir, &toml, &["topology", "plan"]);
    assert_eq!(plan.status.code(), Some(2));
    assert!(stdout(&plan).contains("UNRESOLVED"), "{}", stdout(&plan));
    let apply = run(&dir, &toml, &["topology", "apply"]);
    assert_eq!(apply.status.code(), Some(2));
    assert!(
        !queue_exists(&vhost, "jobs").await,
        "apply declared `jobs` despite the unresolved binding"
    );
    let unknown = run(&dir, &toml, &["topology", "plan", "--tenant", "nobody"]);
    assert_failure_mentions(&unknown, "not configured");
}

#[tokio::test]
async fn a_retry_queue_an_earlier_warren_declared_is_outdated_not_a_conflict() {
    let admin = Admin::new();
    let vhost = unique("topo");
    admin.vhost(&vhost).await;
    // As Warren declared a queue with a retry policy before it dead-lettered to the DLQ.
    let rabbit = rabbit_in(&vhost).await;
    rabbit
        .channel
        .queue_declare(
            "jobs".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = topology_toml(
        &vhost,
        "[[tenants.acme.queues]]\nname = \"jobs\"\nretry = { delays_ms = [100] }\n",
    );
    let plan = run(&dir, &toml, &["topology", "plan"]);
    assert_success(&plan);
    let printed = stdout(&plan);
    assert!(
        printed.contains("outdated   queue \"jobs\"") && printed.contains("recreate"),
        "{printed}"
    );
    assert!(!printed.contains("CONFLICT"), "{printed}");
    // apply declares the rest and leaves the queue as it is.
    assert_success(&run(&dir, &toml, &["topology", "apply"]));
    assert!(queue_exists(&vhost, "jobs.dlq").await);
    // Any other difference is still a conflict.
    let other = topology_toml(
        &vhost,
        "[[tenants.acme.queues]]\nname = \"jobs\"\nmessage_ttl_ms = 5\nretry = { delays_ms = [100] }\n",
    );
    let plan = run(&dir, &other, &["topology", "plan"]);
    assert_eq!(plan.status.code(), Some(2), "{}", stdout(&plan));
}

#[tokio::test]
async fn redrive_moves_at_most_the_limit_and_restarts_the_attempts() {
    let admin = Admin::new();
    let vhost = unique("topo");
    admin.vhost(&vhost).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = topology_toml(
        &vhost,
        "[[tenants.acme.queues]]\nname = \"jobs\"\nretry = { delays_ms = [100] }\n",
    );
    assert_success(&run(&dir, &toml, &["topology", "apply"]));
    let rabbit = rabbit_in(&vhost).await;
    for i in 0..3u8 {
        let mut headers = FieldTable::default();
        headers.insert("x-warren-attempt".into(), AMQPValue::LongInt(1));
        rabbit
            .channel
            .basic_publish(
                "".into(),
                "jobs.dlq".into(),
                BasicPublishOptions::default(),
                &[i],
                BasicProperties::default().with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert_eq!(rabbit.wait_count("jobs.dlq", 3).await, 3);
    let out = run(
        &dir,
        &toml,
        &[
            "topology", "redrive", "--tenant", "acme", "--queue", "jobs", "--limit", "2",
        ],
    );
    assert_success(&out);
    assert!(stdout(&out).contains("redriven 2 message(s)"));
    assert_eq!(rabbit.wait_count("jobs", 2).await, 2);
    assert_eq!(rabbit.count("jobs.dlq").await, 1);
    let moved = rabbit.get("jobs").await.expect("a redriven message");
    assert_eq!(moved.delivery.data, [0]);
    let headers = moved
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert!(
        !headers.inner().contains_key("x-warren-attempt"),
        "the attempt restarts: {headers:?}"
    );
}
