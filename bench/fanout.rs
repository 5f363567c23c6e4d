//! Section `fanout`: WebSocket live fan-out to many sockets on one binding key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use futures::{SinkExt, StreamExt};
use lapin::Connection;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::measure::{CpuProbe, fmt_cpu, percentile};
use super::server::Warren;
use super::{EXCHANGE, FAN_KEY, message_json, now_us, props};

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub(crate) async fn ws_subscribe(addr: &str, token: &str) -> anyhow::Result<Ws> {
    let mut req = format!("ws://{addr}/v1/ws").into_client_request()?;
    req.headers_mut()
        .insert("sec-websocket-protocol", "warren.v1".parse()?);
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    ws.send(Message::text(format!(
        "{{\"type\":\"subscribe\",\"id\":\"s1\",\"exchange\":\"{EXCHANGE}\",\
         \"binding_key\":\"{FAN_KEY}\",\"mode\":\"live\"}}"
    )))
    .await?;
    while let Some(frame) = ws.next().await {
        if let Message::Text(t) = frame? {
            ensure!(t.contains("\"subscribed\""), "subscribe answered {t}");
            return Ok(ws);
        }
    }
    bail!("socket closed before subscribed")
}

pub(crate) async fn open_sockets(addr: &str, token: &str, n: usize) -> anyhow::Result<Vec<Ws>> {
    let results: Vec<anyhow::Result<Ws>> = futures::stream::iter(0..n)
        .map(|_| ws_subscribe(addr, token))
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

pub(crate) struct Fanout {
    pub(crate) sockets: usize,
    pub(crate) published: u64,
    pub(crate) delivered: u64,
    pub(crate) deliveries_per_s: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) cpu: [f64; 4],
    /// Warren's CPU time (utime + stime) over the point divided by the deliveries.
    pub(crate) warren_us_per_delivery: f64,
    /// RabbitMQ's (beam.smp) likewise.
    pub(crate) rabbitmq_us_per_delivery: f64,
}

impl Fanout {
    /// Prints the point under `title` (which names the sockets).
    pub(crate) fn print(&self, title: &str, rate: u64) {
        let expected = self.published * self.sockets as u64;
        println!(
            "\n{title}: {} sockets on one binding key, one AMQP publisher at {rate} msg/s\n  \
             published {} -> delivered {} of {expected} ({:.1}%), {:.0} deliveries/s, \
             publish-to-receive p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms   CPU {}\n  \
             CPU per delivery: Warren {:.2} µs, RabbitMQ {:.2} µs",
            self.sockets,
            self.published,
            self.delivered,
            self.delivered as f64 * 100.0 / expected.max(1) as f64,
            self.deliveries_per_s,
            self.p50,
            self.p99,
            self.p999,
            fmt_cpu(self.cpu),
            self.warren_us_per_delivery,
            self.rabbitmq_us_per_delivery
        );
    }
}

/// What one socket of a fan-out receives: the texts that carry a message (a Warren
/// frame, a STOMP MESSAGE body); it ends when the socket does.
pub(crate) type Texts = futures::stream::BoxStream<'static, String>;

/// Warren's live fan-out to `sockets` new sockets.
pub(crate) async fn warren_fanout(
    warren: &Warren,
    conn: &Connection,
    sockets: usize,
    rate: u64,
    seconds: f64,
) -> anyhow::Result<Fanout> {
    let wss = open_sockets(&warren.addr, &warren.token, sockets).await?;
    let texts = wss
        .into_iter()
        .map(|ws| {
            ws.take_while(|frame| std::future::ready(frame.is_ok()))
                .filter_map(|frame| {
                    std::future::ready(match frame {
                        Ok(Message::Text(t)) => Some(t.as_str().to_owned()),
                        _ => None,
                    })
                })
                .boxed()
        })
        .collect();
    fan_out(conn, texts, rate, seconds).await
}

/// Publishes `rate` msg/s for `seconds` to EXCHANGE with FAN_KEY, each message carrying
/// its send time (`"t":µs`), and measures what `sockets` receive until deliveries stop.
pub(crate) async fn fan_out(
    conn: &Connection,
    sockets: Vec<Texts>,
    rate: u64,
    seconds: f64,
) -> anyhow::Result<Fanout> {
    let n = sockets.len();
    let delivered = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for mut texts in sockets {
        let delivered = delivered.clone();
        let last = last.clone();
        let mut done = done_rx.clone();
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let text = tokio::select! {
                    t = texts.next() => t,
                    _ = done.changed() => break,
                };
                let Some(t) = text else { break };
                let now = now_us();
                if let Some(i) = t.find("\"t\":") {
                    let digits: String = t[i + 4..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit())
                        .collect();
                    if let Ok(sent) = digits.parse::<u64>() {
                        lat.push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
                        delivered.fetch_add(1, Ordering::Relaxed);
                        last.fetch_max(now, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    // Let the subscriptions' broker queues settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe = CpuProbe::start();
    let total = (rate as f64 * seconds) as u64;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let first = now_us();
    let start = Instant::now();
    for k in 0..total {
        tokio::time::sleep_until((start + period.mul_f64(k as f64)).into()).await;
        let body = message_json(&format!("\"t\":{},", now_us()));
        ch.basic_publish(
            EXCHANGE.into(),
            FAN_KEY.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props(),
        )
        .await?
        .await?;
    }
    // Wait until deliveries stop arriving.
    let mut seen = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now == seen || now == total * n as u64 {
            break;
        }
        seen = now;
    }
    // Every delivery of the point happened inside the probe, so its CPU over all of them.
    let window = probe.t0.elapsed().as_secs_f64();
    let cpu = probe.stop();
    let _ = ch.close(200, "bye".into()).await;
    let _ = done_tx.send(true);
    let mut lat = Vec::new();
    for r in readers {
        lat.extend(r.await?);
    }
    let delivered = delivered.load(Ordering::Relaxed);
    let span = (last.load(Ordering::Relaxed).saturating_sub(first)) as f64 / 1e6;
    let per_delivery = |pct: f64| pct / 100.0 * window * 1e6 / delivered.max(1) as f64;
    lat.sort_unstable();
    Ok(Fanout {
        sockets: n,
        published: total,
        delivered,
        deliveries_per_s: delivered as f64 / span.max(1e-9),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        p999: percentile(&lat, 0.999),
        cpu,
        warren_us_per_delivery: per_delivery(cpu[1]),
        rabbitmq_us_per_delivery: per_delivery(cpu[2]),
    })
}
