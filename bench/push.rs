//! Push subscriptions (issue #28): deliveries per second (between the first and the
//! last delivery of a run) and CPU per delivery (the whole delivering process) to a
//! local HTTP receiver at `--push-levels` deliveries in flight, Warren beside the
//! floor: the least a gateway can do for the same result, a lapin consumer with a
//! prefetch that POSTs each message with reqwest and acks it on the 2xx, in a process
//! of its own. Both drain the same number of persistent 256-byte messages from one
//! queue to the same receiver (this process: it answers 204 and counts).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{AMQP_URL, Args, BODY_BYTES, Warren, procstat};

const PUSH_QUEUE: &str = "warren-bench-push";

/// A receiver of deliveries: HTTP/1.1 keep-alive, every request answered 204.
struct Receiver {
    url: String,
    received: Arc<AtomicU64>,
    /// When each delivery arrived (µs since the receiver started), for the rate
    /// between the first and the last delivery of a run (a start-up does not count).
    arrivals: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Receiver {
    async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let received = Arc::new(AtomicU64::new(0));
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let epoch = Instant::now();
        let (counter, times) = (received.clone(), arrivals.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, counter.clone(), times.clone(), epoch));
            }
        });
        Ok(Self {
            url,
            received,
            arrivals,
        })
    }

    /// Deliveries per second between the first and the last of the `n` after `from`.
    fn rate(&self, from: u64, n: u64) -> f64 {
        let times = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        let (Ok(from), Ok(n)) = (usize::try_from(from), usize::try_from(n)) else {
            return 0.0;
        };
        let run = &times[from..(from + n).min(times.len())];
        match (run.first(), run.last()) {
            (Some(first), Some(last)) if last > first => {
                (run.len() - 1) as f64 / ((last - first) as f64 / 1e6)
            }
            _ => 0.0,
        }
    }

    fn count(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Reads requests (head, then `Content-Length` bytes of body) and answers each.
async fn serve(
    mut stream: tokio::net::TcpStream,
    received: Arc<AtomicU64>,
    arrivals: Arc<std::sync::Mutex<Vec<u64>>>,
    epoch: Instant,
) {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        let at = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        arrivals.lock().unwrap_or_else(|e| e.into_inner()).push(at);
        received.fetch_add(1, Ordering::Relaxed);
        if stream
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Fills the push queue with `count` persistent messages (confirmed).
async fn fill(channel: &lapin::Channel, count: usize) -> anyhow::Result<()> {
    let body = vec![b'x'; BODY_BYTES];
    let mut confirms = Vec::with_capacity(1000);
    for i in 0..count {
        let confirm = channel
            .basic_publish(
                "".into(),
                PUSH_QUEUE.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/octet-stream".into())
                    .with_message_id(format!("m-{i}").into()),
            )
            .await?;
        confirms.push(confirm);
        if confirms.len() == 1000 {
            for c in confirms.drain(..) {
                c.await?;
            }
        }
    }
    for c in confirms {
        c.await?;
    }
    Ok(())
}

/// Waits until the receiver has `target` deliveries; the time it took.
async fn drained(receiver: &Receiver, target: u64, started: Instant) -> anyhow::Result<Duration> {
    let deadline = started + Duration::from_secs(300);
    while receiver.count() < target {
        if Instant::now() > deadline {
            bail!("only {} of {target} deliveries in 300 s", receiver.count());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

struct Point {
    rate: f64,
    us_per_delivery: f64,
}

fn print_point(name: &str, level: u16, p: &Point) {
    println!(
        "{name:<34} {level:>4} {:>12.0} {:>14.1}",
        p.rate, p.us_per_delivery
    );
}

pub async fn run(args: &Args, conn: &Connection, dir: &Path) -> anyhow::Result<()> {
    // As a user runs it: Warren's default thread count (one per core), whatever
    // `--warren-workers` says for the other sections.
    let workers = super::WARREN_WORKERS.swap(0, Ordering::Relaxed);
    let result = compare(args, conn, dir).await;
    super::WARREN_WORKERS.store(workers, Ordering::Relaxed);
    result
}

async fn compare(args: &Args, conn: &Connection, dir: &Path) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let receiver = Receiver::start().await?;
    let exe = std::env::current_exe()?;
    println!(
        "\nPush subscriptions: deliveries/s draining a queue of persistent {BODY_BYTES}-byte messages \
         into a local receiver (204), and the CPU time of the delivering process per delivery; \
         Warren with its default runtime threads (one per core)"
    );
    println!(
        "{:<34} {:>4} {:>12} {:>14}",
        "path", "in flight", "deliveries/s", "µs CPU/delivery"
    );
    let config = |level: u16| {
        format!(
            "[[tenants.bench.queues]]\nname = \"{PUSH_QUEUE}\"\nretry = {{ delays_ms = [1000] }}\n\
             [[tenants.bench.push]]\nname = \"bench\"\nqueue = \"{PUSH_QUEUE}\"\nurl = \"{}\"\n\
             secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nmax_in_flight = {level}\n\
             [topology]\napply_on_start = true\n[push]\nallow_private_networks = true\n",
            receiver.url
        )
    };
    // A first Warren declares the queue as its topology says (with its retry policy),
    // so that both paths drain the same durable queue, filled before each run.
    for name in [
        PUSH_QUEUE.to_owned(),
        format!("{PUSH_QUEUE}.retry.1"),
        format!("{PUSH_QUEUE}.dlq"),
    ] {
        channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    Warren::start_with(
        &args.warren,
        dir,
        "warren-push-declare",
        &[AMQP_URL.to_owned()],
        &config(1),
    )
    .await?
    .stop();
    for &level in &args.push_levels {
        let count = if level == 1 { 4_000 } else { 20_000 };
        // The floor, in a process of its own.
        fill(&channel, count).await?;
        let before = receiver.count();
        let started = Instant::now();
        let child = std::process::Command::new(&exe)
            .arg("--push-floor")
            .arg(&receiver.url)
            .args(["--push-floor-in-flight", &level.to_string()])
            .args(["--push-floor-count", &count.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the push floor")?;
        let took = drained(&receiver, before + count as u64, started).await?;
        let out = child.wait_with_output()?;
        let ticks: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("the floor's CPU ticks")?;
        let _ = took;
        let floor = Point {
            rate: receiver.rate(before, count as u64),
            us_per_delivery: ticks as f64 * 10_000.0 / count as f64,
        };
        // Warren, started with the queue full (its start-up counts against it).
        fill(&channel, count).await?;
        let before = receiver.count();
        let started = Instant::now();
        let warren = Warren::start_with(
            &args.warren,
            dir,
            &format!("warren-push-{level}"),
            &[AMQP_URL.to_owned()],
            &config(level),
        )
        .await?;
        let took = drained(&receiver, before + count as u64, started).await?;
        let ticks = procstat::cpu_ticks(&warren.pid().to_string());
        warren.stop();
        let _ = took;
        let warren_point = Point {
            rate: receiver.rate(before, count as u64),
            us_per_delivery: ticks as f64 * 10_000.0 / count as f64,
        };
        print_point("floor (lapin + reqwest)", level, &floor);
        print_point("Warren push subscription", level, &warren_point);
        println!(
            "{:<34} {level:>4} {:>11.2}x",
            "  Warren / floor (target >= 0.8x)",
            warren_point.rate / floor.rate
        );
    }
    channel
        .queue_delete(PUSH_QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    for suffix in [".retry.1", ".dlq"] {
        channel
            .queue_delete(
                format!("{PUSH_QUEUE}{suffix}").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await?;
    }
    Ok(())
}

/// The floor: consume the push queue with a prefetch of `in_flight`, POST each message
/// with reqwest (keep-alive) and ack it on the 2xx, until `count` are acked; prints its
/// own CPU ticks.
pub async fn floor(url: &str, in_flight: u16, count: usize) -> anyhow::Result<()> {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(in_flight, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            PUSH_QUEUE.into(),
            "push-floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let http = reqwest::Client::new();
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    while acked.load(Ordering::Relaxed) < count as u64 {
        tokio::select! {
            Some(delivery) = consumer.next() => {
                let delivery = delivery?;
                let (http, url, acked) = (http.clone(), url.to_owned(), acked.clone());
                tasks.spawn(async move {
                    let sent = http
                        .post(url)
                        .header("content-type", "application/octet-stream")
                        .body(delivery.data.clone())
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status().is_success()) {
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            Some(_) = tasks.join_next() => {}
        }
    }
    println!("{}", procstat::cpu_ticks("self"));
    Ok(())
}
