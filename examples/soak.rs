//! Soak load for a running Warren: REST publishes, batches, idempotent retries and
//! WebSocket subscribers at a steady rate; reports errors (there must be none) and the
//! gateway's RSS over time. Driven by scripts/soak.sh, which starts Warren and mints
//! the token; by hand:
//!
//!     WARREN_URL=http://127.0.0.1:8080 WARREN_TOKEN=... WARREN_PID=1234 \
//!       cargo run --release --example soak -- <seconds> <requests per second>
//!
//! Declares its own exchange and a bounded queue on the local RabbitMQ
//! (`SOAK_AMQP_URL`, default guest on 127.0.0.1:5672) and deletes them at the end.
//! Exits non-zero when any error was seen.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Default)]
struct Counters {
    publishes: AtomicU64,
    batches: AtomicU64,
    retries: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    saturated: AtomicU64,
    ws_messages: AtomicU64,
}

fn error(counters: &Counters, what: String) {
    let n = counters.errors.fetch_add(1, Ordering::Relaxed);
    if n < 20 {
        eprintln!("error: {what}");
    }
}

fn rss_kib(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".to_owned())
}

async fn one(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    exchange: &str,
    n: u64,
    counters: &Counters,
) {
    let key = uuid::Uuid::new_v4().to_string();
    let single = json!({"exchange": exchange, "routing_key": format!("soak.{}", n % 7),
                        "payload": {"n": n, "pad": "x".repeat(200)}});
    let send = |path: &str, body: &serde_json::Value, key: Option<&str>| {
        let mut request = http
            .post(format!("{base}{path}"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send()
    };
    let kind = n % 20;
    let outcome = if kind < 14 {
        counters.publishes.fetch_add(1, Ordering::Relaxed);
        match send("/v1/publish", &single, Some(&key)).await {
            Ok(r) if r.status() == 202 => Ok(()),
            Ok(r) => Err(format!(
                "publish: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Err(e) => Err(format!("publish: {e}")),
        }
    } else if kind < 17 {
        counters.batches.fetch_add(1, Ordering::Relaxed);
        let messages: Vec<_> = (0..10)
            .map(|i| json!({"exchange": exchange, "routing_key": format!("soak.batch.{i}"), "payload": i}))
            .collect();
        match send(
            "/v1/publish/batch",
            &json!({"messages": messages}),
            Some(&key),
        )
        .await
        {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(format!(
                "batch: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Err(e) => Err(format!("batch: {e}")),
        }
    } else {
        // An idempotent retry: the same key and body twice; the second is a replay.
        counters.retries.fetch_add(1, Ordering::Relaxed);
        let first = send("/v1/publish", &single, Some(&key)).await;
        let second = send("/v1/publish", &single, Some(&key)).await;
        match (first, second) {
            (Ok(a), Ok(b))
                if a.status() == 202
                    && b.status() == 202
                    && b.headers().get("idempotent-replayed").is_some() =>
            {
                Ok(())
            }
            (Ok(a), Ok(b)) => Err(format!("retry: {} then {}", a.status(), b.status())),
            (Err(e), _) | (_, Err(e)) => Err(format!("retry: {e}")),
        }
    };
    match outcome {
        Ok(()) => {
            counters.ok.fetch_add(1, Ordering::Relaxed);
        }
        Err(what) => error(counters, what),
    }
}

async fn subscriber(
    base: String,
    token: String,
    exchange: String,
    id: usize,
    counters: Arc<Counters>,
    until: Instant,
) {
    let url = format!("{}/v1/ws", base.replace("http://", "ws://"));
    let mut request = url.into_client_request().expect("ws url");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "warren.v1".parse().expect("header"),
    );
    let mut ws = match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => ws,
        Err(e) => return error(&counters, format!("ws connect: {e}")),
    };
    let subscribe = json!({"type": "subscribe", "id": format!("s{id}"), "exchange": exchange,
                           "binding_key": "soak.#", "mode": "live"});
    if let Err(e) = ws.send(Message::text(subscribe.to_string())).await {
        return error(&counters, format!("ws subscribe: {e}"));
    }
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(Message::Text(text)))) => {
                if text.as_str().contains("\"type\":\"message\"") {
                    counters.ws_messages.fetch_add(1, Ordering::Relaxed);
                } else if text.as_str().contains("\"type\":\"error\"") {
                    error(&counters, format!("ws error frame: {}", text.as_str()));
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => return error(&counters, format!("ws ended: {other:?}")),
        }
    }
    let _ = ws.close(None).await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).map_or(Ok(600), |s| s.parse())?;
    let rate: u64 = args.get(2).map_or(Ok(1200), |s| s.parse())?;
    let base = std::env::var("WARREN_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let token = std::env::var("WARREN_TOKEN")?;
    let pid = std::env::var("WARREN_PID").unwrap_or_default();
    let every: u64 = std::env::var("SOAK_REPORT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let amqp = std::env::var("SOAK_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());

    let connection = Connection::connect(&amqp, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let exchange = format!("soak-{suffix}");
    let queue = format!("soak-{suffix}");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Every publish routes (mandatory), and the queue stays bounded by dropping its head.
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(10_000));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let mut subscribers = Vec::new();
    for id in 0..4 {
        subscribers.push(tokio::spawn(subscriber(
            base.clone(),
            token.clone(),
            exchange.clone(),
            id,
            counters.clone(),
            until,
        )));
    }
    println!(
        "soak: {seconds}s at {rate} req/s against {base} (70% publishes, 15% batches of 10, \
         15% idempotent retries; 4 WebSocket subscribers)"
    );
    println!("elapsed_s requests ok errors saturated ws_messages warren_rss_kib");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let permits = Arc::new(Semaphore::new(256));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut next_report = start + Duration::from_secs(every);
    let mut n = 0u64;
    let report = |counters: &Counters| {
        println!(
            "{:>9} {:>8} {:>8} {:>6} {:>9} {:>11} {:>14}",
            start.elapsed().as_secs(),
            counters.publishes.load(Ordering::Relaxed)
                + counters.batches.load(Ordering::Relaxed)
                + counters.retries.load(Ordering::Relaxed),
            counters.ok.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed),
            counters.saturated.load(Ordering::Relaxed),
            counters.ws_messages.load(Ordering::Relaxed),
            rss_kib(&pid),
        );
    };
    while Instant::now() < until {
        tick.tick().await;
        n += 1;
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let (http, base, token, exchange, counters) = (
                    http.clone(),
                    base.clone(),
                    token.clone(),
                    exchange.clone(),
                    counters.clone(),
                );
                tokio::spawn(async move {
                    one(&http, &base, &token, &exchange, n, &counters).await;
                    drop(permit);
                });
            }
            Err(_) => {
                counters.saturated.fetch_add(1, Ordering::Relaxed);
            }
        }
        if Instant::now() >= next_report {
            report(&counters);
            next_report += Duration::from_secs(every);
        }
    }
    let _ = permits.acquire_many(256).await;
    for s in subscribers {
        let _ = s.await;
    }
    report(&counters);
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let errors = counters.errors.load(Ordering::Relaxed);
    let ws = counters.ws_messages.load(Ordering::Relaxed);
    if ws == 0 {
        eprintln!("error: the WebSocket subscribers received nothing");
    }
    println!(
        "soak done: {} requests, {errors} errors, {ws} WebSocket messages",
        counters.ok.load(Ordering::Relaxed) + errors
    );
    if errors > 0 || ws == 0 {
        std::process::exit(1);
    }
    Ok(())
}
