//! RabbitMQ itself restarted (`rabbitmqctl stop_app` / `start_app`) under load: REST
//! publishers and a durable WebSocket subscription. Every connection Warren has is
//! closed by the broker and refused until it is back, unlike the link cut in
//! `tests/integration/faults.rs` where the broker stays up behind a proxy.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::common::*;
use crate::load::FaultRun;
use crate::{rabbitmqctl, require_rabbitmqctl};

/// The broker application stopped; started again by [`StoppedBroker::start`], or on
/// drop (also when the test fails) so no later test meets a stopped broker.
pub(crate) struct StoppedBroker {
    running: bool,
}

impl StoppedBroker {
    /// Stops the broker application; returns once it has stopped.
    pub(crate) async fn stop() -> Self {
        let stopped = tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
            .await
            .expect("rabbitmqctl ran");
        let guard = Self { running: false };
        if let Err(error) = stopped {
            panic!("rabbitmqctl stop_app: {error}");
        }
        guard
    }

    /// Starts the broker application; returns once it accepts connections again.
    pub(crate) async fn start(mut self) {
        let started = tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
            .await
            .expect("rabbitmqctl ran");
        self.running = started.is_ok();
        if let Err(error) = started {
            panic!("rabbitmqctl start_app: {error}");
        }
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        if !self.running
            && let Err(error) = rabbitmqctl(&["start_app"])
        {
            eprintln!("COULD NOT START the broker again: {error}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared broker; scripts/test.sh runs it alone"]
async fn broker_restart_under_load_loses_no_acknowledged_message_and_recovers() {
    require_rabbitmqctl();
    let mut run = FaultRun::start(None).await;
    let stopping = Instant::now();
    let broker = StoppedBroker::stop().await;
    let stopped_at = Instant::now();
    run.broken(stopped_at).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.healing();
    let starting = Instant::now();
    broker.start().await;
    let started_at = Instant::now();
    run.healed(started_at).await;
    eprintln!(
        "stop_app took {:?}, start_app took {:?}",
        stopped_at - stopping,
        started_at - starting
    );
    run.rabbit.reconnect().await;
    run.check("broker-restart").await;
}

/// What the WebSocket client saw across the restart.
#[derive(Default)]
struct Seen {
    /// Payload `n` of every message delivered (redeliveries once).
    numbers: HashSet<i64>,
    deliveries: usize,
    redelivered: usize,
    /// `error` frames for a subscription, as (subscription id, code).
    errors: Vec<(String, String)>,
    /// Close codes (0: the socket ended without a close frame).
    closes: Vec<u16>,
    subscriptions: usize,
    /// When the first message after a resubscription arrived.
    resumed_at: Option<Instant>,
}

/// What the socket gave the client next.
enum Next {
    Frame(Value),
    /// Its close code (0: it ended without a close frame).
    Closed(u16),
}

/// A durable WebSocket subscriber that acks every message and, when told its
/// subscription ended (an `error` frame with `broker_unavailable`) or its socket
/// closed, subscribes again with the same queue name, as a client following the
/// SPEC would. Runs until `want` holds a set it has seen all of, or `until`.
async fn durable_client(
    base: String,
    token: String,
    exchange: String,
    queue: String,
    want: Arc<Mutex<Option<HashSet<i64>>>>,
    subscribed: tokio::sync::oneshot::Sender<()>,
    until: Instant,
) -> Seen {
    let mut seen = Seen::default();
    let mut ws = ws_connect(&base, &token).await;
    let mut current = subscribe_until_ok(&mut ws, &exchange, &queue, &mut seen, until).await;
    let _ = subscribed.send(());
    loop {
        let done = want
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|want| want.is_subset(&seen.numbers));
        if done || Instant::now() >= until {
            let _ = ws.close(None).await;
            return seen;
        }
        let next = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Err(_) | Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(text)))) => {
                Next::Frame(serde_json::from_str(text.as_str()).expect("a JSON frame"))
            }
            Ok(Some(Ok(Message::Close(close)))) => {
                Next::Closed(close.map_or(0, |CloseFrame { code, .. }| code.into()))
            }
            Ok(Some(Ok(other))) => panic!("unexpected message {other:?}"),
            Ok(None | Some(Err(_))) => Next::Closed(0),
        };
        let frame = match next {
            Next::Frame(frame) => frame,
            Next::Closed(code) => {
                // The socket is gone: a new one, subscribed again.
                seen.closes.push(code);
                ws = ws_connect(&base, &token).await;
                current = subscribe_until_ok(&mut ws, &exchange, &queue, &mut seen, until).await;
                continue;
            }
        };
        match frame["type"].as_str() {
            Some("message") => {
                if seen.subscriptions > 1 && seen.resumed_at.is_none() {
                    seen.resumed_at = Some(Instant::now());
                }
                seen.deliveries += 1;
                if frame["redelivered"] == true {
                    seen.redelivered += 1;
                }
                let n = frame["payload"]["n"].as_i64().expect("payload n");
                seen.numbers.insert(n);
                let ack = json!({"type": "ack", "subscription": frame["subscription"],
                    "delivery_tag": frame["delivery_tag"]});
                // A socket that breaks here is noticed on the next read.
                let _ = ws.send(Message::text(ack.to_string())).await;
            }
            Some("error") => {
                let id = frame["id"].as_str().unwrap_or_default().to_owned();
                let code = frame["code"].as_str().unwrap_or_default().to_owned();
                let ended = id == current && code == "broker_unavailable";
                seen.errors.push((id, code));
                if ended {
                    current =
                        subscribe_until_ok(&mut ws, &exchange, &queue, &mut seen, until).await;
                }
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

/// Subscribes (a new subscription id each time) until the broker takes it; while the
/// broker is away Warren answers `broker_unavailable` at once, and the client retries.
async fn subscribe_until_ok(
    ws: &mut WsStream,
    exchange: &str,
    queue: &str,
    seen: &mut Seen,
    until: Instant,
) -> String {
    loop {
        assert!(Instant::now() < until, "could not subscribe again in time");
        seen.subscriptions += 1;
        let id = format!("d{}", seen.subscriptions);
        let subscribe = json!({"type": "subscribe", "id": id, "exchange": exchange,
            "binding_key": "order.#", "mode": "durable", "queue": queue, "prefetch": 20});
        ws.send(Message::text(subscribe.to_string()))
            .await
            .expect("send subscribe");
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("an answer to subscribe within 10s");
            let Some(Ok(Message::Text(text))) = next else {
                match next {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        panic!("the socket closed while subscribing: {next:?}")
                    }
                    _ => continue,
                }
            };
            let frame: Value = serde_json::from_str(text.as_str()).expect("a JSON frame");
            if frame["id"] != id.as_str() {
                // Late answers to acks on the subscription that ended.
                if frame["type"] == "error" {
                    let code = frame["code"].as_str().unwrap_or_default().to_owned();
                    let id = frame["id"].as_str().unwrap_or_default().to_owned();
                    seen.errors.push((id, code));
                }
                continue;
            }
            match frame["type"].as_str() {
                Some("subscribed") => return id,
                Some("error") if frame["code"] == "broker_unavailable" => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    break;
                }
                _ => panic!("subscribe answered {frame}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared broker; scripts/test.sh runs it alone"]
async fn a_durable_websocket_subscription_survives_a_broker_restart() {
    require_rabbitmqctl();
    durable_subscription_survives(Outage::BrokerRestart).await;
}

/// How the broker goes away in [`durable_subscription_survives`].
pub(crate) enum Outage {
    /// The shared broker's application stopped for 2 s, then started.
    BrokerRestart,
    /// Node `n` of the test cluster (`scripts/cluster.sh`) killed with SIGKILL, then
    /// restarted; Warren has every node's URL and a quorum queue.
    KillNode(u8),
}

/// A durable subscriber and a REST publisher across `outage`: every message the
/// broker confirmed reaches the subscriber, which is told when its subscription ends.
pub(crate) async fn durable_subscription_survives(outage: Outage) {
    let name_of_run = match outage {
        Outage::BrokerRestart => "ws-restart",
        Outage::KillNode(_) => "ws-node-loss",
    };
    let cluster = match outage {
        Outage::BrokerRestart => None,
        Outage::KillNode(_) => Some(crate::cluster::urls()),
    };
    let mut rabbit = match &cluster {
        None => Rabbit::connect().await,
        Some(urls) => Rabbit::connect_to(urls[1].clone()).await,
    };
    let exchange = rabbit.durable_topic_exchange().await;
    let tenant = unique("t");
    let mut config = config(&format!(
        "[tenants.{tenant}]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n\
         subscribe = [{{ exchange = \"{exchange}\", routing_key = \"order.#\" }}]\n"
    ));
    if let Some(urls) = &cluster {
        config.amqp.url = None;
        config.amqp.urls = urls.clone();
        config.ws.durable_queue_type = warren::config::DurableQueueType::Quorum;
    }
    config.amqp.connect_timeout_ms = 1000;
    config.amqp.reconnect_backoff_max_ms = 500;
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish subscribe");
    let name = unique("billing");
    let deadline = Instant::now() + Duration::from_secs(90);

    let want = Arc::new(Mutex::new(None));
    let (subscribed, first_subscribe) = tokio::sync::oneshot::channel();
    let client = tokio::spawn(durable_client(
        server.base.clone(),
        token.clone(),
        exchange.clone(),
        name.clone(),
        want.clone(),
        subscribed,
        deadline,
    ));
    // The subscription exists before anything is published (the first subscribe
    // declares the queue).
    tokio::time::timeout(Duration::from_secs(10), first_subscribe)
        .await
        .expect("subscribed within 10s")
        .expect("the client subscribed");
    let queue = format!("warren.{tenant}.{name}");

    // One publisher over REST, before, during and after the restart; the ledger holds
    // every `n` the broker confirmed (202).
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let publisher = {
        let (http, base, token, exchange) = (
            server.http.clone(),
            server.base.clone(),
            token.clone(),
            exchange.clone(),
        );
        let (stop, acked) = (stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut n = 0i64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let body = json!({"exchange": exchange, "routing_key": "order.paid",
                    "payload": {"n": n}, "properties": {"persistent": true}});
                let sent = http
                    .post(format!("{base}/v1/publish"))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await;
                let r = match sent {
                    Ok(response) => into_resp(response).await,
                    Err(error) => panic!("no answer from Warren: {error}"),
                };
                if r.status == 202 {
                    acked.lock().unwrap().push(n);
                }
                statuses.push((r.status, r.code().to_owned()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            statuses
        })
    };
    let acked_count = || acked.lock().unwrap().len();
    let warm = eventually(Duration::from_secs(10), || async { acked_count() >= 50 }).await;
    assert!(warm, "no publishes before the restart");

    let before_restart = acked_count();
    let started_at = match outage {
        Outage::BrokerRestart => {
            let broker = StoppedBroker::stop().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            broker.start().await;
            Instant::now()
        }
        Outage::KillNode(n) => {
            let node = crate::cluster::KilledNode::kill(n);
            tokio::time::sleep(Duration::from_secs(5)).await;
            node.restart().await;
            Instant::now()
        }
    };
    let after = eventually(Duration::from_secs(15), || async {
        acked_count() >= before_restart + 50
    })
    .await;
    assert!(after, "publishing did not resume after the restart");
    stop.store(true, Ordering::Release);
    let statuses = tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("the publisher stopped")
        .unwrap();
    for (status, code) in &statuses {
        assert!(
            matches!(
                (*status, code.as_str()),
                (202, _)
                    | (503, "broker_unavailable" | "broker_rejected")
                    | (504, "confirm_timeout")
            ),
            "unexpected publish answer {status} {code}"
        );
    }
    let acked: HashSet<i64> = acked.lock().unwrap().iter().copied().collect();
    *want.lock().unwrap() = Some(acked.clone());

    let seen = tokio::time::timeout_at(deadline.into(), client)
        .await
        .expect("the WebSocket client finished")
        .unwrap();
    let missing: Vec<&i64> = acked.difference(&seen.numbers).collect();
    assert!(
        missing.is_empty(),
        "{} messages the broker confirmed never reached the durable subscriber: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let told = seen
        .errors
        .iter()
        .any(|(_, code)| code == "broker_unavailable")
        || !seen.closes.is_empty();
    assert!(
        told,
        "the client was never told its subscription ended: {:?}",
        seen.errors
    );
    // The outage is answered broker_unavailable (acks on the dying channel included);
    // an ack that reaches Warren after its subscription ended is refused as unknown.
    let mut ended = HashSet::new();
    for (id, code) in &seen.errors {
        match code.as_str() {
            "broker_unavailable" => {
                ended.insert(id.as_str());
            }
            "invalid_request" if ended.contains(id.as_str()) => {}
            _ => panic!("error frame {code} for {id}: {:?}", seen.errors),
        }
    }
    assert!(
        seen.subscriptions >= 2,
        "the client never had to subscribe again"
    );
    let resumed = seen
        .resumed_at
        .map(|at| at.saturating_duration_since(started_at));
    eprintln!(
        "{name_of_run} figures: publishes={} acked={} delivered={} distinct={} redelivered={} \
         subscribe_attempts={} error_frames={:?} closes={:?} first_message_after_start_app={resumed:?}",
        statuses.len(),
        acked.len(),
        seen.deliveries,
        seen.numbers.len(),
        seen.redelivered,
        seen.subscriptions,
        seen.errors,
        seen.closes,
    );
    rabbit.reconnect().await;
    let _ = rabbit
        .channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    server.shutdown().await.unwrap();
}
