//! Scale-out (issue #21) against a real 3-node RabbitMQ cluster started by
//! `scripts/cluster.sh start` (scripts/test.sh does it before the solo tests): node
//! loss and a rolling restart under publish load on a quorum queue, a durable
//! subscription across node loss, and two Warren replicas sharing Redis with one
//! killed mid-load. Each test fails, rather than skips, when the cluster is not up.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use warren::auth::{TokenRequest, mint};
use warren::config::Config;

use crate::common::*;
use crate::load::{FaultRun, drain};
use crate::restart::{Outage, durable_subscription_survives};

const NODES: [u8; 3] = [2, 3, 4];

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh")
}

/// Runs `scripts/cluster.sh` with `args`; its stdout.
fn cluster(args: &[&str]) -> Result<String, String> {
    let out = Command::new(script())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run scripts/cluster.sh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The cluster's AMQP URLs, node 2 first; panics when a node does not answer.
pub fn urls() -> Vec<String> {
    let urls: Vec<String> = cluster(&["urls"])
        .expect("scripts/cluster.sh urls")
        .split(',')
        .map(str::to_owned)
        .collect();
    for n in NODES {
        let port = 5680 + u16::from(n);
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            panic!(
                "cluster node rabbit{n} is not listening on {port}: run scripts/cluster.sh start"
            );
        }
    }
    urls
}

/// The nodes that have client connections (the tests' own broker clients use node 3,
/// so a connection to node 2 is Warren's).
fn connected_nodes() -> Vec<u8> {
    let listing = cluster(&["ctl", "3", "list_connections", "name"]).unwrap_or_default();
    NODES
        .into_iter()
        .filter(|n| listing.contains(&format!("-> 127.0.0.1:{}", 5680 + u16::from(*n))))
        .collect()
}

/// A node killed with SIGKILL; restarted by [`KilledNode::restart`] or on drop (also
/// when the test fails), so later tests find the whole cluster.
pub struct KilledNode {
    n: u8,
    running: bool,
}

impl KilledNode {
    pub fn kill(n: u8) -> Self {
        cluster(&["kill", &n.to_string()]).expect("scripts/cluster.sh kill");
        Self { n, running: false }
    }

    /// Stops the node gracefully (a rolling restart's step).
    fn stop(n: u8) -> Self {
        cluster(&["stop-node", &n.to_string()]).expect("scripts/cluster.sh stop-node");
        Self { n, running: false }
    }

    /// Starts the node again; returns once it has booted.
    pub async fn restart(mut self) {
        let n = self.n.to_string();
        let started = tokio::task::spawn_blocking(move || cluster(&["restart", &n]))
            .await
            .expect("cluster.sh ran");
        self.running = true;
        if let Err(error) = started {
            panic!("scripts/cluster.sh restart {}: {error}", self.n);
        }
    }
}

impl Drop for KilledNode {
    fn drop(&mut self) {
        if !self.running
            && let Err(error) = cluster(&["restart", &self.n.to_string()])
        {
            eprintln!("COULD NOT RESTART cluster node {}: {error}", self.n);
        }
    }
}

fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments
}

/// 20 clients publish to a quorum queue through a Warren that knows every node; the
/// node Warren is connected to is killed, and later restarted. Every 2xx is in the
/// queue, no request outlives the confirm timeout + 1 s, and publishing goes on
/// during the outage (Warren fails over to another node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test cluster (scripts/cluster.sh); scripts/test.sh runs it alone"]
async fn node_loss_under_load_loses_no_acknowledged_message() {
    let urls = urls();
    let rabbit = Rabbit::connect_to(urls[1].clone()).await;
    let run = FaultRun::start_with(rabbit, Some(urls.clone()), quorum()).await;
    assert!(
        connected_nodes().contains(&2),
        "Warren should start on the first URL's node"
    );
    let node = KilledNode::kill(2);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let restarting_at = Instant::now();
    node.restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = run.finish().await;
    let during = ledger.acked_between(killed_at + Duration::from_secs(3), restarting_at);
    eprintln!(
        "node-loss figures: {} acked_during_outage={during} first_ack_after_kill={:?}",
        ledger.summary(),
        ledger
            .log
            .iter()
            .filter(|o| o.status == 202 && o.started > killed_at)
            .map(|o| o.started + o.took - killed_at)
            .min()
    );
    assert!(during > 0, "no publish succeeded while the node was down");
}

/// Every node stopped and started again in turn under load: nothing acknowledged is
/// lost, and Warren needs no manual step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test cluster (scripts/cluster.sh); scripts/test.sh runs it alone"]
async fn a_rolling_restart_under_load_loses_no_acknowledged_message() {
    let urls = urls();
    let rabbit = Rabbit::connect_to(urls[1].clone()).await;
    let mut run = FaultRun::start_with(rabbit, Some(urls.clone()), quorum()).await;
    let mut steps = Vec::new();
    for n in NODES {
        let stopping = Instant::now();
        let node = tokio::task::spawn_blocking(move || KilledNode::stop(n))
            .await
            .expect("stop ran");
        let stopped = stopping.elapsed();
        node.restart().await;
        // Let the quorum queue's member on `n` catch up before the next node goes.
        tokio::time::sleep(Duration::from_secs(3)).await;
        steps.push((n, stopped, stopping.elapsed()));
    }
    // The ledger client's node (3) restarted too.
    run.rabbit.reconnect().await;
    let ledger = run.finish().await;
    eprintln!(
        "rolling-restart figures: {} steps={steps:?}",
        ledger.summary()
    );
    assert!(ledger.acked > 0);
}

/// A durable WebSocket subscription on a quorum queue resumes on another node when the
/// node under it is killed: every confirmed message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test cluster (scripts/cluster.sh); scripts/test.sh runs it alone"]
async fn a_durable_subscription_survives_node_loss() {
    urls();
    durable_subscription_survives(Outage::KillNode(2)).await;
}

/// A round-robin TCP proxy over two upstreams, skipping one that refuses.
async fn round_robin(upstreams: [u16; 2]) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let mut next = 0usize;
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            next += 1;
            let order = [upstreams[next % 2], upstreams[(next + 1) % 2]];
            tokio::spawn(async move {
                for port in order {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                }
            });
        }
    });
    (port, task)
}

/// A `warren serve` process, killed on drop.
struct Replica(Child);

impl Replica {
    fn start(config: &std::path::Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start warren");
        Self(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Two Warren processes share Redis behind one address; one is killed with SIGKILL
/// mid-load. Clients retry each message with its Idempotency-Key (new connection each
/// time) until it is acknowledged. Every message is acknowledged and in the queue;
/// a message is in the queue twice only if the killed replica had published it and
/// died before recording the outcome (the broker kept it; the retry published it
/// again), so duplicates are bounded by the requests in flight at the kill and carry
/// the same message id (consumers can drop them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test cluster (scripts/cluster.sh); scripts/test.sh runs it alone"]
async fn a_replica_killed_mid_load_loses_nothing_and_retries_publish_once() {
    let urls = urls();
    let rabbit = Rabbit::connect_to(urls[1].clone()).await;
    let exchange = rabbit.durable_topic_exchange().await;
    let queue = crate::load::durable_queue(&rabbit, &exchange, quorum()).await;
    let tenant = unique("t");
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = [free_port(), free_port()];
    let prefix = format!("{}:", unique("idem"));
    let redis =
        std::env::var("WARREN_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let url_list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let toml = |port: u16| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [amqp]\nurls = [{url_list}]\nconfirm_timeout_ms = 2000\n\
             [auth]\nhs256_secret = \"{SECRET}\"\n\
             [idempotency]\nstore = \"redis\"\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\"\nlock_timeout_s = 3\n\
             [tenants.{tenant}]\nvhost = \"/\"\n\
             publish = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n"
        )
    };
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let path = dir.path().join(format!("warren-{i}.toml"));
        std::fs::write(&path, toml(*port)).expect("write config");
        replicas.push(Replica::start(&path));
    }
    let config = Config::from_toml(&toml(ports[0])).expect("config");
    let secret = config
        .resolve()
        .expect("resolves")
        .signing_secret
        .expect("secret");
    let token = mint(
        &config.auth,
        &secret,
        &TokenRequest {
            tenant: &tenant,
            subject: "replicas",
            scope: "publish",
            ttl: Duration::from_secs(600),
        },
    )
    .expect("mint");
    let http = reqwest::Client::new();
    for port in ports {
        let ready = eventually(Duration::from_secs(20), || async {
            http.get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(ready, "replica on {port} never got ready");
    }
    let (proxy, proxy_task) = round_robin(ports).await;

    // Each client sends its messages one after another; each message is retried with
    // the same key and body until it is acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let (token, exchange, stop, acked) =
                (token.clone(), exchange.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                // No pooled connections: each attempt goes through the proxy afresh.
                let http = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let id = format!("c{c}-m{n}");
                    let body = json!({"exchange": exchange, "routing_key": "k",
                        "payload": {"id": id}, "properties": {"persistent": true, "message_id": id}});
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        let sent = http
                            .post(format!("http://127.0.0.1:{proxy}/v1/publish"))
                            .bearer_auth(&token)
                            .header("idempotency-key", format!("key-{id}"))
                            .json(&body)
                            .send()
                            .await;
                        if let Ok(r) = sent {
                            let status = r.status().as_u16();
                            if status == 202 {
                                acked.lock().unwrap().insert(id.clone(), attempts);
                                break;
                            }
                            assert!(
                                matches!(status, 409 | 503 | 504),
                                "unexpected status {status} for {id}"
                            );
                        }
                        assert!(Instant::now() < deadline, "{id} never acknowledged");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    let count = || acked.lock().unwrap().len();
    assert!(eventually(Duration::from_secs(20), || async { count() >= 200 }).await);
    replicas[0].kill();
    let killed_at_count = count();
    assert!(
        eventually(Duration::from_secs(30), || async {
            count() >= killed_at_count + 300
        })
        .await,
        "publishing did not go on through the surviving replica"
    );
    stop.store(true, Ordering::Release);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(40), client)
            .await
            .expect("client finished")
            .expect("client succeeded");
    }
    proxy_task.abort();
    let acked = acked.lock().unwrap().clone();
    let retried = acked.values().filter(|a| **a > 1).count();
    let expected = u32::try_from(acked.len()).expect("fits");
    rabbit.wait_count(&queue, expected).await;
    let (in_queue, duplicates) = drain(&rabbit, &queue).await;
    let missing: Vec<&String> = acked.keys().filter(|id| !in_queue.contains(*id)).collect();
    eprintln!(
        "replica-kill figures: acked={} retried={retried} in_queue={} duplicates={duplicates}",
        acked.len(),
        in_queue.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged but not in the queue: {missing:?}"
    );
    let unknown: HashSet<&String> = in_queue
        .iter()
        .filter(|id| !acked.contains_key(*id))
        .collect();
    assert!(
        unknown.is_empty(),
        "in the queue but never sent: {unknown:?}"
    );
    assert!(
        duplicates <= 16,
        "{duplicates} duplicates: more than the requests in flight when the replica died"
    );
}

/// Issue #21's recovery time against a real node: Warren (on node 4 only) is ready
/// within 2 s of the node accepting AMQP connections again, for outages from 1 s to a
/// minute. Prints each recovery time (the distribution in docs/src/operations/scale-out.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test cluster (scripts/cluster.sh); scripts/test.sh runs it alone"]
async fn readiness_returns_within_two_seconds_of_a_restarted_node() {
    let urls = urls();
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "amq.topic", "#");
    config.amqp.url = Some(urls[2].clone());
    let server = TestServer::start_ready(config).await;
    let mut recoveries = Vec::new();
    for outage in [1u64, 1, 5, 5, 20, 60] {
        let node = tokio::task::spawn_blocking(|| KilledNode::stop(4))
            .await
            .expect("stop ran");
        let stopped_at = Instant::now();
        assert!(
            eventually(Duration::from_secs(5), || async {
                server.get("/readyz").await.status == 503
            })
            .await,
            "readiness stayed green with its only node stopped"
        );
        tokio::time::sleep_until((stopped_at + Duration::from_secs(outage)).into()).await;
        let restart = tokio::spawn(node.restart());
        // When the node accepts AMQP connections again (polled every 20 ms).
        let accepting_at = loop {
            let open = lapin::Connection::connect(&urls[2], lapin::ConnectionProperties::default());
            if let Ok(Ok(connection)) = tokio::time::timeout(Duration::from_secs(1), open).await {
                let _ = connection.close(200, "probe".into()).await;
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let ready = eventually(Duration::from_secs(10), || async {
            server.get("/readyz").await.status == 200
        })
        .await;
        assert!(ready, "not ready 10 s after the node came back");
        let recovery = accepting_at.elapsed();
        restart.await.expect("restart finished");
        eprintln!("outage {outage} s: ready {recovery:?} after the node accepted connections");
        recoveries.push((outage, recovery));
    }
    eprintln!("recovery figures: {recoveries:?}");
    for (outage, recovery) in recoveries {
        assert!(
            recovery <= Duration::from_secs(2),
            "ready {recovery:?} after a {outage} s outage (limit 2 s)"
        );
    }
    server.shutdown().await.unwrap();
}

/// A WebSocket stream subscription through the node that is killed: it is told
/// `broker_unavailable`, subscribes again from the offset after the last one it saw
/// (Warren now reads through another node; the stream is replicated on all three), and
/// gets every confirmed message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test cluster (scripts/cluster.sh); scripts/test.sh runs it alone"]
async fn a_stream_subscription_resumes_after_node_loss_with_nothing_missed_or_doubled() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let urls = urls();
    let rabbit = Rabbit::connect_to(urls[1].clone()).await;
    let stream = unique("log");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    rabbit
        .channel
        .queue_declare(
            stream.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("declare the stream");
    let tenant = unique("t");
    let mut config = config(&format!(
        "[tenants.{tenant}]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"\", routing_key = \"{stream}\" }}]\n\
         subscribe = [{{ stream = \"{stream}\" }}]\n"
    ));
    config.amqp.url = None;
    config.amqp.urls = urls.clone();
    config.amqp.connect_timeout_ms = 1000;
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish subscribe");
    assert!(
        connected_nodes().contains(&2),
        "Warren should read through node 2"
    );

    // The publisher: REST, one message per `n`, never retried; the acked ones are the
    // ledger.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let publisher = {
        let (http, base, token, stream) = (
            server.http.clone(),
            server.base.clone(),
            token.clone(),
            stream.clone(),
        );
        let (stop, acked) = (stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let body = json!({"exchange": "", "routing_key": stream, "payload": {"n": n}});
                let sent = http
                    .post(format!("{base}/v1/publish"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status() == 202) {
                    acked.lock().unwrap().insert(n);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // The reader: subscribes from `first`, and again from the next offset whenever its
    // subscription ends.
    let mut ws = ws_connect(&server.base, &token).await;
    let mut seen: Vec<u64> = Vec::new();
    let mut last_offset: Option<u64> = None;
    let mut subscriptions = 0;
    let mut told = 0;
    let subscribe = |offset: Option<u64>, id: String| {
        let offset = offset.map_or(json!("first"), |o| json!(o + 1));
        json!({"type": "subscribe", "id": id, "mode": "stream", "stream": stream, "offset": offset})
            .to_string()
    };
    subscriptions += 1;
    ws.send(Message::text(subscribe(None, format!("s{subscriptions}"))))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut killed: Option<KilledNode> = None;
    let mut killed_at = None;
    let mut finished_at = None;
    loop {
        assert!(Instant::now() < deadline, "the test ran out of time");
        let acked_now = acked.lock().unwrap().len();
        if killed.is_none() && killed_at.is_none() && seen.len() >= 100 {
            killed = Some(KilledNode::kill(2));
            killed_at = Some(Instant::now());
        }
        if let (Some(at), Some(_)) = (killed_at, killed.as_ref())
            && at.elapsed() > Duration::from_secs(5)
        {
            if let Some(node) = killed.take() {
                node.restart().await;
            }
            finished_at = Some(acked_now + 100);
        }
        if let Some(target) = finished_at
            && acked_now >= target
            && !stop.load(Ordering::Acquire)
        {
            stop.store(true, Ordering::Release);
        }
        if stop.load(Ordering::Acquire) && publisher.is_finished() {
            let want = acked.lock().unwrap().clone();
            if want.iter().all(|n| seen.contains(n)) {
                break;
            }
        }
        let next = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else {
            if let Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) = next {
                panic!("the socket closed: {next:?}");
            }
            continue;
        };
        let frame: Value = serde_json::from_str(text.as_str()).expect("JSON");
        match frame["type"].as_str() {
            Some("message") => {
                let offset = frame["offset"].as_u64().expect("offset");
                if let Some(last) = last_offset {
                    assert!(offset > last, "offset {offset} after {last}");
                }
                last_offset = Some(offset);
                seen.push(frame["payload"]["n"].as_u64().expect("n"));
            }
            Some("error") if frame["code"] == "broker_unavailable" => {
                told += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
                subscriptions += 1;
                ws.send(Message::text(subscribe(
                    last_offset,
                    format!("s{subscriptions}"),
                )))
                .await
                .unwrap();
            }
            Some("subscribed") | Some("unsubscribed") => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
    let _ = publisher.await;
    let distinct: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "a message came twice");
    let acked = acked.lock().unwrap().clone();
    assert!(told >= 1, "the subscription was never told it ended");
    eprintln!(
        "stream-node-loss figures: acked={} seen={} subscriptions={subscriptions} told={told}",
        acked.len(),
        seen.len()
    );
    let _ = rabbit
        .channel
        .queue_delete(stream.as_str().into(), Default::default())
        .await;
    server.shutdown().await.unwrap();
}
