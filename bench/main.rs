//! Warren load generator: one run, one broker, one message (256-byte JSON, persistent,
//! durable queue), the same concurrency for every path. See BENCHMARKS.md.
//!
//!     bench/run.sh            # builds in release and runs everything (about 3 minutes)
//!
//! Measures, against a `warren` release binary started as a separate process:
//! 1. direct AMQP publish with confirms (lapin): N publishers, each awaiting its confirm;
//! 2. `POST /v1/publish`, one keep-alive HTTP/1.1 connection per publisher;
//! 3. `POST /v1/publish/batch`, 100 messages per request;
//! 4. the RabbitMQ management API publish endpoint;
//! 5. WebSocket live fan-out to many sockets on one binding key;
//! 6. Warren's RSS per idle authenticated socket holding one live subscription;
//! 7. request/reply: `POST /v1/request` vs the same RPC with lapin (`rpc.rs`);
//! 8. RabbitMQ's Web-STOMP fan-out next to Warren's at `--stomp-sockets` (`stomp.rs`).
//!
//! `--only publish,rpc,openloop,fanout,stomp,memory` runs a part (`--rpc-only` is
//! `--only rpc`). Every closed-loop, rpc and open-loop point prints the CPU time of
//! warren and of RabbitMQ per message; the fan-out points per delivery.
//!
//! Not a test: it never runs under `cargo test`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

mod otel;
mod procstat;
mod pull;
mod push;
mod rpc;
mod rpc_parts;
mod schedule;
mod stomp;

/// The same allocator as the `warren` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672";
const MGMT_ADDR: &str = "127.0.0.1:15672";
const EXCHANGE: &str = "warren-bench";
const QUEUE: &str = "warren-bench-q";
const ROUTING_KEY: &str = "bench.msg";
const FAN_KEY: &str = "fan.live";
const SECRET: &str = "warren-bench-secret-warren-bench-secret-0123";
const BODY_BYTES: usize = 256;
const BATCH: usize = 100;

#[derive(Parser, Debug)]
#[command(about = "Warren load generator (see BENCHMARKS.md)")]
struct Args {
    /// The `warren` release binary to start as a separate process.
    #[arg(long, default_value = "target/release/warren")]
    warren: PathBuf,
    /// Concurrency levels (publishers in flight) for items 1-4.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    levels: Vec<usize>,
    /// Measured seconds per point (after a warm-up of 0.5 s).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// AMQP channels for the direct publishers (publishers share them round-robin).
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Sockets in the fan-out test.
    #[arg(long, default_value_t = 1000)]
    fanout_sockets: usize,
    /// Messages per second published in the fan-out test (one run per rate).
    #[arg(long, value_delimiter = ',', default_value = "20,100")]
    fanout_rate: Vec<u64>,
    /// Idle sockets in the memory test.
    #[arg(long, default_value_t = 10_000)]
    idle_sockets: usize,
    /// Font for the plot's text (not committed; from fonts-dejavu-core).
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// Where the plot goes.
    #[arg(long, default_value = "bench/results.png")]
    plot: PathBuf,
    /// Concurrency levels (calls in flight) of the request/reply comparison.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    rpc_levels: Vec<usize>,
    /// Sections to run, comma separated (default: all of them, in this order).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "publish,rpc,openloop,fanout,stomp,memory,push,pull,schedule,otel"
    )]
    only: Vec<Section>,
    /// Run only the request/reply comparison (the same as `--only rpc`).
    #[arg(long, conflicts_with = "only")]
    rpc_only: bool,
    /// Sockets on each side of the Web-STOMP comparison (`stomp`): RabbitMQ's
    /// descriptor limit here is about 1,000 and every STOMP socket takes one.
    #[arg(long, default_value_t = 200)]
    stomp_sockets: usize,
    /// Run only a cluster comparison: direct AMQP and `POST /v1/publish` to a quorum
    /// queue at `--levels`, on the local broker and then on the cluster at these AMQP
    /// URLs (`scripts/cluster.sh urls`; Warren gets all of them, direct AMQP the first).
    #[arg(long, value_delimiter = ',')]
    cluster: Vec<String>,
    /// Publish transient messages (delivery mode 1: no disk write before the
    /// confirm) instead of persistent ones; a diagnostic, not the benchmark.
    #[arg(long)]
    transient: bool,
    /// Threads of Warren's runtime (`server.worker_threads`; 0 = one per core). 1 by
    /// default: on this 2-core machine RabbitMQ needs the other core (BENCHMARKS.md).
    #[arg(long, default_value_t = 1)]
    warren_workers: usize,
    /// Internal: run as the push floor (a consumer posting to this URL) in a process of
    /// its own, so that its CPU is measured apart from the receiver's.
    #[arg(long, hide = true)]
    push_floor: Option<String>,
    /// Internal, with `--push-floor`: deliveries in flight and messages to deliver.
    #[arg(long, hide = true, default_value_t = 1)]
    push_floor_in_flight: u16,
    #[arg(long, hide = true, default_value_t = 0)]
    push_floor_count: usize,
    /// Concurrency levels (max_in_flight) of the push comparison.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    push_levels: Vec<u16>,
}

/// The parts of a run (`--only`).
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    /// Items 1-4 at `--levels`, their ratios and the targets.
    Publish,
    /// Request/reply (`rpc.rs`).
    Rpc,
    /// Direct AMQP and `POST /v1/publish` paced at half of Warren's max.
    Openloop,
    /// WebSocket live fan-out to `--fanout-sockets`.
    Fanout,
    /// RabbitMQ's Web-STOMP fan-out next to Warren's, at `--stomp-sockets`.
    Stomp,
    /// Warren's RSS per idle subscribed socket.
    Memory,
    /// Push subscriptions (`push.rs`): deliveries/s and CPU per delivery beside the
    /// floor (a lapin consumer with an HTTP client).
    Push,
    /// Pull consume with leases (`pull.rs`): received and acked per second beside a
    /// lapin consumer with manual acks.
    Pull,
    /// Scheduled publish (`schedule.rs`): accept throughput, and firing lag at 1,000
    /// scheduled messages/s.
    Schedule,
    /// Tracing (`otel.rs`): CPU per publish with traces exported at 100 % and 1 %,
    /// beside off.
    Otel,
}

impl Args {
    fn runs(&self, section: Section) -> bool {
        if self.rpc_only {
            section == Section::Rpc
        } else {
            self.only.contains(&section)
        }
    }
}

/// AMQP delivery mode of every message: 2 (persistent) unless `--transient`.
static DELIVERY_MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

fn delivery_mode() -> u8 {
    DELIVERY_MODE.load(std::sync::atomic::Ordering::Relaxed)
}

/// `server.worker_threads` of every Warren the bench starts (`--warren-workers`).
static WARREN_WORKERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

// ---------------------------------------------------------------- measurement window

/// Latencies (µs) of operations that ended inside the measured window.
struct Recorder {
    warm_end: Instant,
    end: Instant,
    lat: Vec<u32>,
    msgs: u64,
    /// Open-loop pacing: the next send time and the interval between sends.
    pace: Option<(Instant, Duration)>,
}

impl Recorder {
    fn new(w: Window, pace: Option<(Instant, Duration)>) -> Self {
        Recorder {
            warm_end: w.warm_end,
            end: w.end,
            lat: Vec::with_capacity(4096),
            msgs: 0,
            pace,
        }
    }
    /// Waits for the next paced send time, if paced.
    async fn wait_turn(&mut self) {
        if let Some((next, period)) = self.pace.as_mut() {
            tokio::time::sleep_until((*next).into()).await;
            *next += *period;
        }
    }
    /// Records one operation started at `t0` carrying `msgs` messages; false once over.
    /// An operation counts when it *completes* inside the window, wherever it started:
    /// counting only those that also started inside it would drop up to two
    /// latencies' worth of the window per publisher, which for 100-message batches
    /// taking 0.5 s (N = 64) is most of a 2 s window.
    fn record(&mut self, t0: Instant, msgs: u64) -> bool {
        let now = Instant::now();
        if now >= self.warm_end && now <= self.end {
            self.lat
                .push((now - t0).as_micros().min(u32::MAX as u128) as u32);
            self.msgs += msgs;
        }
        now < self.end
    }
}

#[derive(Clone, Copy)]
struct Window {
    warm_end: Instant,
    end: Instant,
    measured: Duration,
}

impl Window {
    fn new(seconds: f64) -> Self {
        let warm_end = Instant::now() + Duration::from_millis(500);
        let measured = Duration::from_secs_f64(seconds);
        Window {
            warm_end,
            end: warm_end + measured,
            measured,
        }
    }
}

impl Window {
    /// Samples the CPU of the processes over exactly this window, on a thread of its
    /// own so that a busy runtime cannot delay the samples.
    ///
    /// The CPU per message divides this by the operations that completed inside the
    /// same window (`Recorder::record`). That is more accurate than a probe around the
    /// whole point divided by every operation it completed: such a probe also charges
    /// the messages with the connections' set-up and teardown (channels, confirm mode,
    /// consumers, TCP accepts) and the cold start of the warm-up, whereas here the only
    /// error is the operations straddling the two edges, which cancel out in a steady
    /// state.
    fn probe(&self) -> std::thread::JoinHandle<[f64; 4]> {
        let (warm_end, end) = (self.warm_end, self.end);
        let pids = CpuProbe::pids();
        std::thread::spawn(move || {
            std::thread::sleep(warm_end.saturating_duration_since(Instant::now()));
            let probe = CpuProbe::start_with(pids);
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            probe.stop()
        })
    }
}

#[derive(Clone, Copy, Default, Debug)]
struct Stat {
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    /// Percent of one core over the measured window: generator, warren, RabbitMQ, other.
    cpu: [f64; 4],
}

impl Stat {
    /// CPU time in µs per message of process `i` of `cpu` (1 warren, 2 RabbitMQ): CPU
    /// seconds over the window divided by the messages completed in it.
    fn us_per_msg(&self, i: usize) -> f64 {
        self.cpu[i] / 100.0 * 1e6 / self.rate
    }

    /// The `µs/msg gen/war/rmq` column (for direct AMQP the generator is the AMQP
    /// client, lapin: its CPU per message is the floor of a client built on it).
    fn fmt_us(&self) -> String {
        format!(
            "{:>6.1} {:>6.1} {:>6.1}",
            self.us_per_msg(0),
            self.us_per_msg(1),
            self.us_per_msg(2)
        )
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn summarize(recs: Vec<Recorder>, measured: Duration) -> Stat {
    let msgs: u64 = recs.iter().map(|r| r.msgs).sum();
    let mut lat: Vec<u32> = recs.into_iter().flat_map(|r| r.lat).collect();
    lat.sort_unstable();
    Stat {
        rate: msgs as f64 / measured.as_secs_f64(),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        p999: percentile(&lat, 0.999),
        cpu: [0.0; 4],
    }
}

// ---------------------------------------------------------------- CPU per process

/// Busy clock ticks of the whole machine (all CPUs; not idle, not iowait).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    v.iter().take(8).sum::<u64>() - v.get(3).unwrap_or(&0) - v.get(4).unwrap_or(&0)
}

/// CPU used by the load generator, Warren, RabbitMQ and everything else over an interval.
struct CpuProbe {
    pids: [String; 3],
    start: [u64; 3],
    machine: u64,
    t0: Instant,
}

/// The running Warren, whose CPU the probes measure (set by `Warren::start_on`).
static WARREN_PID: AtomicU32 = AtomicU32::new(0);

impl CpuProbe {
    fn start() -> Self {
        Self::start_with(Self::pids())
    }

    /// The generator, the current Warren and RabbitMQ (looked up once: a scan of /proc).
    fn pids() -> [String; 3] {
        [
            "self".to_owned(),
            WARREN_PID.load(Ordering::Relaxed).to_string(),
            procstat::find_pid("beam.smp").unwrap_or_else(|| "0".to_owned()),
        ]
    }

    fn start_with(pids: [String; 3]) -> Self {
        let start = [
            procstat::cpu_ticks(&pids[0]),
            procstat::cpu_ticks(&pids[1]),
            procstat::cpu_ticks(&pids[2]),
        ];
        CpuProbe {
            pids,
            start,
            machine: machine_busy_ticks(),
            t0: Instant::now(),
        }
    }
    /// Percent of one core for (generator, warren, rabbitmq, other processes).
    fn stop(&self) -> [f64; 4] {
        let secs = self.t0.elapsed().as_secs_f64();
        let pct = |ticks: u64| ticks as f64 / 100.0 / secs * 100.0; // USER_HZ = 100
        let mut out = [0.0; 4];
        for (o, (pid, start)) in out.iter_mut().zip(self.pids.iter().zip(self.start)) {
            *o = pct(procstat::cpu_ticks(pid).saturating_sub(start));
        }
        let all = pct(machine_busy_ticks().saturating_sub(self.machine));
        out[3] = (all - out[0] - out[1] - out[2]).max(0.0);
        out
    }
}

// ---------------------------------------------------------------- tiny HTTP/1.1 client

/// One keep-alive HTTP/1.1 connection; the cheapest client, so the generator's CPU goes
/// to the measurement, not to a client library.
struct Http {
    addr: String,
    /// The server said `Connection: close` (cowboy does after `max_keepalive` requests).
    closing: bool,
    stream: TcpStream,
    buf: Vec<u8>,
    body: std::ops::Range<usize>,
}

impl Http {
    async fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            addr: addr.to_owned(),
            closing: false,
            stream,
            buf: Vec::with_capacity(8192),
            body: 0..0,
        })
    }

    /// Sends a complete request and reads one response; returns the status.
    async fn call(&mut self, request: &[u8]) -> anyhow::Result<u16> {
        self.buf.drain(..self.body.end);
        self.body = 0..0;
        if self.closing {
            *self = Http::connect(&self.addr).await?;
        }
        self.stream.write_all(request).await?;
        loop {
            if let Some(head_end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..head_end])?;
                let status: u16 = head.get(9..12).context("status line")?.parse()?;
                let mut length = None;
                for line in head.split("\r\n").skip(1) {
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            length = Some(v.trim().parse::<usize>()?);
                        } else if k.eq_ignore_ascii_case("connection") {
                            self.closing |= v.trim().eq_ignore_ascii_case("close");
                        } else if k.eq_ignore_ascii_case("transfer-encoding") {
                            bail!("chunked responses are not supported by the bench client");
                        }
                    }
                }
                let start = head_end + 4;
                let end = start + length.context("no content-length")?;
                while self.buf.len() < end {
                    self.read_more().await?;
                }
                self.body = start..end;
                return Ok(status);
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> anyhow::Result<()> {
        let len = self.buf.len();
        self.buf.resize(len + 8192, 0);
        let n = self.stream.read(&mut self.buf[len..]).await?;
        self.buf.truncate(len + n);
        ensure!(n > 0, "connection closed");
        Ok(())
    }

    fn body(&self) -> &[u8] {
        &self.buf[self.body.clone()]
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn post(addr: &str, path: &str, auth: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------- the message

/// A compact JSON object of exactly BODY_BYTES bytes, starting with `prefix` members.
fn message_json(prefix: &str) -> String {
    let head = format!("{{{prefix}\"pad\":\"");
    let pad = BODY_BYTES - head.len() - 2;
    let s = format!("{head}{}\"}}", "x".repeat(pad));
    assert_eq!(s.len(), BODY_BYTES);
    s
}

fn props() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(delivery_mode())
        .with_content_type("application/json".into())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

// ---------------------------------------------------------------- the four publish paths

async fn direct(
    conn: &Connection,
    n: usize,
    channels: usize,
    seconds: f64,
    rate: Option<f64>,
) -> anyhow::Result<Stat> {
    let mut chans = Vec::new();
    for _ in 0..channels.min(n).max(1) {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        chans.push(ch);
    }
    let body = Arc::new(message_json("\"id\":\"bench\",").into_bytes());
    let w = Window::new(seconds);
    let probe = w.probe();
    let mut tasks = Vec::new();
    for i in 0..n {
        let ch = chans[i % chans.len()].clone();
        let body = body.clone();
        let pace = pacing(rate, n, i);
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::new(w, pace);
            loop {
                rec.wait_turn().await;
                let t0 = Instant::now();
                let confirm = ch
                    .basic_publish(
                        EXCHANGE.into(),
                        ROUTING_KEY.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        props(),
                    )
                    .await?
                    .await?;
                ensure!(
                    matches!(confirm, lapin::Confirmation::Ack(None)),
                    "not acked: {confirm:?}"
                );
                if !rec.record(t0, 1) {
                    break;
                }
            }
            anyhow::Ok(rec)
        }));
    }
    let stat = collect(tasks, w, probe).await?;
    for ch in chans {
        let _ = ch.close(200, "bye".into()).await;
    }
    Ok(stat)
}

fn pacing(rate: Option<f64>, n: usize, i: usize) -> Option<(Instant, Duration)> {
    rate.map(|r| {
        let period = Duration::from_secs_f64(n as f64 / r);
        (Instant::now() + period.mul_f64(i as f64 / n as f64), period)
    })
}

/// The tasks' recorders and the window's CPU (`probe`, started with the tasks).
async fn collect(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Recorder>>>,
    w: Window,
    probe: std::thread::JoinHandle<[f64; 4]>,
) -> anyhow::Result<Stat> {
    let mut recs = Vec::new();
    for t in tasks {
        recs.push(t.await??);
    }
    let cpu = tokio::task::spawn_blocking(move || probe.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the CPU probe panicked"))?;
    Ok(Stat {
        cpu,
        ..summarize(recs, w.measured)
    })
}

/// Closed (or paced) loop of HTTP requests, one connection per publisher.
#[allow(clippy::too_many_arguments)]
async fn http_loop(
    addr: &str,
    request: Vec<u8>,
    expect: u16,
    msgs_per_request: u64,
    check: Option<&'static [u8]>,
    n: usize,
    seconds: f64,
    rate: Option<f64>,
) -> anyhow::Result<Stat> {
    let request = Arc::new(request);
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(Http::connect(addr).await?);
    }
    let w = Window::new(seconds);
    let probe = w.probe();
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let request = request.clone();
        let pace = pacing(rate.map(|r| r / msgs_per_request as f64), n, i);
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::new(w, pace);
            loop {
                rec.wait_turn().await;
                let t0 = Instant::now();
                let status = conn.call(&request).await?;
                if status != expect || check.is_some_and(|c| find(conn.body(), c).is_none()) {
                    bail!("status {status}: {}", String::from_utf8_lossy(conn.body()));
                }
                if !rec.record(t0, msgs_per_request) {
                    break;
                }
            }
            anyhow::Ok(rec)
        }));
    }
    collect(tasks, w, probe).await
}

fn publish_body() -> String {
    format!(
        "{{\"exchange\":\"{EXCHANGE}\",\"routing_key\":\"{ROUTING_KEY}\",\
         \"payload\":{},\"properties\":{{\"persistent\":{}}}}}",
        message_json("\"id\":\"bench\","),
        delivery_mode() == 2
    )
}

fn batch_body() -> String {
    let one = publish_body();
    let items = vec![one; BATCH].join(",");
    format!("{{\"messages\":[{items}]}}")
}

fn mgmt_body() -> String {
    let payload =
        serde_json::to_string(&message_json("\"id\":\"bench\",")).expect("a string serializes");
    format!(
        "{{\"properties\":{{\"delivery_mode\":{},\"content_type\":\"application/json\"}},\
         \"routing_key\":\"{ROUTING_KEY}\",\"payload\":{payload},\"payload_encoding\":\"string\"}}",
        delivery_mode()
    )
}

// ---------------------------------------------------------------- Warren as a process

struct Warren {
    child: Child,
    addr: String,
    token: String,
    log: PathBuf,
}

impl Warren {
    async fn start(bin: &Path, dir: &Path, name: &str) -> anyhow::Result<Self> {
        Self::start_on(bin, dir, name, &[AMQP_URL.to_owned()]).await
    }

    /// [`Warren::start`] against the broker (or cluster) at `urls`.
    async fn start_on(bin: &Path, dir: &Path, name: &str, urls: &[String]) -> anyhow::Result<Self> {
        Self::start_with(bin, dir, name, urls, "").await
    }

    /// [`Warren::start_on`] with `extra` TOML appended to the config (more tables of
    /// the `bench` tenant, e.g. a push subscription).
    async fn start_with(
        bin: &Path,
        dir: &Path,
        name: &str,
        urls: &[String],
        extra: &str,
    ) -> anyhow::Result<Self> {
        let urls = urls
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let workers = WARREN_WORKERS.load(Ordering::Relaxed);
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"{addr}\"\nmax_concurrent_requests = 100000\n\
                 worker_threads = {workers}\n\
                 [amqp]\nurls = [{urls}]\n\
                 [auth]\nhs256_secret = \"{SECRET}\"\n\
                 [log]\nlevel = \"warn\"\n\
                 [ws]\nmax_sockets_per_tenant = 100000\n\
                 [tenants.bench]\nvhost = \"/\"\n\
                 publish = [{{ exchange = \"{EXCHANGE}\", routing_key = \"#\" }}]\n\
                 subscribe = [{{ exchange = \"{EXCHANGE}\", routing_key = \"#\" }}, {{ queue = \"warren-bench-pull\" }}]\n{extra}"
            ),
        )?;
        let out = Command::new(bin)
            .args(["token", "--config"])
            .arg(&config)
            .args(["--tenant", "bench", "--sub", "bench", "--scope"])
            .arg("publish subscribe")
            .args(["--ttl", "2h"])
            .output()
            .with_context(|| format!("running {} token", bin.display()))?;
        ensure!(
            out.status.success(),
            "warren token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout)?.trim().to_owned();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join(format!("{name}.err")))?)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        WARREN_PID.store(child.id(), Ordering::Relaxed);
        let mut warren = Warren {
            child,
            addr,
            token,
            log,
        };
        let ready = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n";
        for _ in 0..200 {
            if let Ok(mut c) = Http::connect(&warren.addr).await
                && c.call(ready).await.ok() == Some(200)
            {
                return Ok(warren);
            }
            if let Some(status) = warren.child.try_wait()? {
                bail!("warren exited with {status}; see {}", warren.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("warren did not become ready; see {}", warren.log.display())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A run that ends in an error still stops its Warren (otherwise it would keep the
/// port and the CPU for the next run).
impl Drop for Warren {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------- WebSocket

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_subscribe(addr: &str, token: &str) -> anyhow::Result<Ws> {
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

async fn open_sockets(addr: &str, token: &str, n: usize) -> anyhow::Result<Vec<Ws>> {
    let results: Vec<anyhow::Result<Ws>> = futures::stream::iter(0..n)
        .map(|_| ws_subscribe(addr, token))
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

struct Fanout {
    sockets: usize,
    published: u64,
    delivered: u64,
    deliveries_per_s: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    cpu: [f64; 4],
    /// Warren's CPU time (utime + stime) over the point divided by the deliveries.
    warren_us_per_delivery: f64,
    /// RabbitMQ's (beam.smp) likewise.
    rabbitmq_us_per_delivery: f64,
}

impl Fanout {
    /// Prints the point under `title` (which names the sockets).
    fn print(&self, title: &str, rate: u64) {
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
type Texts = futures::stream::BoxStream<'static, String>;

/// Warren's live fan-out to `sockets` new sockets.
async fn warren_fanout(
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
async fn fan_out(
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

// ---------------------------------------------------------------- plot

fn plot(
    path: &Path,
    font: &Path,
    levels: &[usize],
    series: &[(&str, Vec<Stat>)],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(font)
            .with_context(|| format!("reading font {}", font.display()))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable font", font.display()))?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let xmax = *levels.iter().max().unwrap_or(&64) as f64;
    let colors = [RED, BLUE, GREEN, MAGENTA];
    for (area, title, is_rate) in [
        (&left, "throughput (msg/s)", true),
        (&right, "p99 latency (ms)", false),
    ] {
        let value = |s: &Stat| if is_rate { s.rate } else { s.p99 };
        let all: Vec<f64> = series
            .iter()
            .flat_map(|(_, v)| v.iter().map(value))
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let lo = all.iter().cloned().fold(f64::MAX, f64::min) / 1.5;
        let hi = all.iter().cloned().fold(0.0, f64::max) * 1.5;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{title} vs concurrency"),
                ("sans-serif", 22).into_font(),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((0.8..xmax * 1.25).log_scale(), (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 10.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.1}")
                }
            })
            .x_desc("concurrent publishers")
            .y_desc(title)
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, (name, stats)) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            let points: Vec<(f64, f64)> = levels
                .iter()
                .zip(stats)
                .map(|(l, s)| (*l as f64, value(s)))
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(if is_rate {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperLeft
            })
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------- main

fn fmt_cpu(c: [f64; 4]) -> String {
    format!(
        "{:>4.0}% {:>4.0}% {:>4.0}% {:>4.0}%",
        c[0], c[1], c[2], c[3]
    )
}

/// The header of a table of closed-loop points (`unit`: msg/s, calls/s).
fn print_header(unit: &str, per: &str) {
    println!(
        "{:<22} {:>5} {:>10} {:>9} {:>9} {:>9}   {:>23}  {:>20}",
        "path",
        "conc",
        unit,
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU gen/war/rmq/other",
        format!("µs/{per} gen/war/rmq")
    );
}

fn print_row(name: &str, n: usize, s: &Stat) {
    println!(
        "{name:<22} {n:>5} {:>10.0} {:>9.2} {:>9.2} {:>9.2}   {}  {}",
        s.rate,
        s.p50,
        s.p99,
        s.p999,
        fmt_cpu(s.cpu),
        s.fmt_us()
    );
}

/// The requests of the publish paths, for one Warren.
struct Requests {
    single: Vec<u8>,
    batch: Vec<u8>,
    mgmt: Vec<u8>,
}

impl Requests {
    fn new(warren: &Warren) -> Self {
        let bearer = format!("Bearer {}", warren.token);
        Requests {
            single: post(&warren.addr, "/v1/publish", &bearer, &publish_body()),
            batch: post(&warren.addr, "/v1/publish/batch", &bearer, &batch_body()),
            mgmt: post(
                MGMT_ADDR,
                &format!("/api/exchanges/%2F/{EXCHANGE}/publish"),
                "Basic Z3Vlc3Q6Z3Vlc3Q=",
                &mgmt_body(),
            ),
        }
    }
}

const PUBLISH_PATHS: [&str; 4] = [
    "1 direct AMQP",
    "2 warren publish",
    "3 warren batch",
    "4 management API",
];

/// Path `k` of [`PUBLISH_PATHS`] at `n` in flight, paced at `rate` msg/s if given.
#[allow(clippy::too_many_arguments)]
async fn publish_point(
    args: &Args,
    conn: &Connection,
    warren: &Warren,
    req: &Requests,
    k: usize,
    n: usize,
    seconds: f64,
    rate: Option<f64>,
) -> anyhow::Result<Stat> {
    let (addr, request, expect, msgs, check) = match k {
        0 => return direct(conn, n, args.channels, seconds, rate).await,
        1 => (warren.addr.as_str(), &req.single, 202, 1, None),
        2 => (warren.addr.as_str(), &req.batch, 200, BATCH as u64, None),
        _ => (MGMT_ADDR, &req.mgmt, 200, 1, Some(&b"\"routed\":true"[..])),
    };
    http_loop(addr, request.clone(), expect, msgs, check, n, seconds, rate).await
}

/// Items 1-4 at every level, the ratios and the targets; `results[k][level]`.
async fn publish_section(
    args: &Args,
    conn: &Connection,
    admin: &lapin::Channel,
    warren: &Warren,
    req: &Requests,
) -> anyhow::Result<Vec<Vec<Stat>>> {
    println!();
    print_header("msg/s", "msg");
    let mut results: Vec<Vec<Stat>> = vec![Vec::new(); 4];
    for &n in &args.levels {
        for (k, name) in PUBLISH_PATHS.iter().enumerate() {
            let s = publish_point(args, conn, warren, req, k, n, args.seconds, None)
                .await
                .with_context(|| format!("{name} at {n}"))?;
            print_row(name, n, &s);
            results[k].push(s);
            admin
                .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
                .await?;
        }
    }

    println!("\nratios at equal concurrency");
    println!(
        "{:>5} {:>12} {:>12} {:>12}",
        "conc", "2/1 http", "3/1 batch", "2/4 vs mgmt"
    );
    for (i, n) in args.levels.iter().enumerate() {
        println!(
            "{n:>5} {:>12.2} {:>12.2} {:>12.1}",
            results[1][i].rate / results[0][i].rate,
            results[2][i].rate / results[0][i].rate,
            results[1][i].rate / results[3][i].rate
        );
    }
    print_targets(&args.levels, &results);
    Ok(results)
}

/// One target of the issue: the measured figure and whether it is met.
fn print_target(what: &str, measured: Option<(String, bool)>) {
    let (figure, verdict) = match measured {
        Some((figure, ok)) => (figure, if ok { "met" } else { "missed" }),
        None => ("not measured".to_owned(), "-"),
    };
    println!("  {what:<56} {figure:>22}  {verdict}");
}

/// The publish targets of the issue "Cut Warren's CPU per message" (the fan-out one is
/// printed with the fan-out lines).
fn print_targets(levels: &[usize], results: &[Vec<Stat>]) {
    let at = |k: usize, n: usize| -> Option<&Stat> {
        levels.iter().position(|&l| l == n).map(|i| &results[k][i])
    };
    println!("\ntargets (issue: Cut Warren's CPU per message)");
    for n in [16, 64] {
        print_target(
            &format!("Warren CPU per single publish <= 40 µs at {n} in flight"),
            at(1, n).map(|s| {
                let us = s.us_per_msg(1);
                (format!("{us:.1} µs"), us <= 40.0)
            }),
        );
    }
    for n in [16, 64] {
        print_target(
            &format!("Warren CPU per message in batches of {BATCH} <= 5 µs at {n}"),
            at(2, n).map(|s| {
                let us = s.us_per_msg(1);
                (format!("{us:.2} µs"), us <= 5.0)
            }),
        );
    }
    print_target(
        "POST /v1/publish >= 0.8x direct AMQP msg/s at 16",
        at(1, 16).zip(at(0, 16)).map(|(w, d)| {
            let r = w.rate / d.rate;
            (format!("{r:.2}x"), r >= 0.8)
        }),
    );
    for n in [16, 64] {
        print_target(
            &format!("POST /v1/publish >= 15x management API msg/s at {n}"),
            at(1, n).zip(at(3, n)).map(|(w, m)| {
                let r = w.rate / m.rate;
                (format!("{r:.1}x"), r >= 15.0)
            }),
        );
    }
    for n in [16, 64] {
        print_target(
            &format!("POST /v1/publish p99 <= 1.5x direct AMQP p99 at {n}"),
            at(1, n).zip(at(0, n)).map(|(w, d)| {
                let r = w.p99 / d.p99;
                (format!("{:.2}/{:.2} ms {r:.2}x", w.p99, d.p99), r <= 1.5)
            }),
        );
    }
}

/// Direct AMQP and `POST /v1/publish` paced at half of Warren's max single-publish rate:
/// `max` from the publish section, or else measured here at the highest level.
async fn open_loop(
    args: &Args,
    conn: &Connection,
    admin: &lapin::Channel,
    warren: &Warren,
    req: &Requests,
    max: Option<f64>,
) -> anyhow::Result<()> {
    let (max, from) = match max {
        Some(max) => (max, "Warren's max single-publish rate".to_owned()),
        None => {
            let n = args.levels.iter().copied().max().unwrap_or(64);
            let s = publish_point(args, conn, warren, req, 1, n, args.seconds, None).await?;
            admin
                .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
                .await?;
            (
                s.rate,
                format!(
                    "Warren's single-publish rate at {n} in flight, measured just now as the \
                     publish section did not run"
                ),
            )
        }
    };
    let half = max / 2.0;
    let paced_n = 64;
    println!(
        "\nopen loop at half of {from}: {max:.0} msg/s / 2 = {half:.0} msg/s from {paced_n} \
         paced publishers"
    );
    for (k, name) in PUBLISH_PATHS.iter().enumerate().take(2) {
        let s = publish_point(
            args,
            conn,
            warren,
            req,
            k,
            paced_n,
            args.seconds * 1.5,
            Some(half),
        )
        .await
        .with_context(|| format!("{name} paced"))?;
        println!(
            "{:<22} {:>10.0} msg/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms   CPU {}   \
             µs/msg gen/war/rmq {}",
            name,
            s.rate,
            s.p50,
            s.p99,
            s.p999,
            fmt_cpu(s.cpu),
            s.fmt_us()
        );
        admin
            .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
            .await?;
    }
    Ok(())
}

/// Warren's RSS before and with `n` idle subscribed sockets, on a fresh Warren.
async fn memory(args: &Args, dir: &Path) -> anyhow::Result<()> {
    let warren = Warren::start(&args.warren, dir, "warren-mem").await?;
    // One socket first so the vhost pool and the live topic exist in the baseline too.
    let first = open_sockets(&warren.addr, &warren.token, 1).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = warren.rss_kib()?;
    let t = Instant::now();
    let sockets = open_sockets(&warren.addr, &warren.token, args.idle_sockets).await?;
    let opened = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with = warren.rss_kib()?;
    println!(
        "\nidle sockets: {} authenticated sockets each with one live subscription (opened in {:.1} s)\n  \
         Warren RSS {} KiB before, {} KiB with them: {:.1} KiB per socket",
        sockets.len(),
        opened.as_secs_f64(),
        before,
        with,
        (with as f64 - before as f64) / sockets.len() as f64
    );
    drop(sockets);
    drop(first);
    warren.stop();
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.push_floor {
        return push::floor(url, args.push_floor_in_flight, args.push_floor_count).await;
    }
    if args.transient {
        DELIVERY_MODE.store(1, std::sync::atomic::Ordering::Relaxed);
    }
    WARREN_WORKERS.store(args.warren_workers, Ordering::Relaxed);
    let dir = tempfile::tempdir()?;
    if !args.cluster.is_empty() {
        return cluster_comparison(&args, dir.path()).await;
    }
    if args.runs(Section::Stomp) {
        stomp::check().await?;
    }
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let admin = conn.create_channel().await?;
    declare_bench_queue(&admin, QUEUE, FieldTable::default()).await?;
    admin
        .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await?;

    println!(
        "Warren load generator: {BODY_BYTES}-byte JSON, {}, durable queue, \
         mandatory; {:.1} s measured per point after 0.5 s warm-up; batch = {BATCH} msgs/request",
        if args.transient {
            "transient"
        } else {
            "persistent"
        },
        args.seconds
    );
    println!(
        "CPU columns: percent of one core (the machine has {} cores) used by load generator / \
         warren / RabbitMQ / all other processes over the measured window; µs/msg: CPU time \
         of the generator / warren / RabbitMQ per message completed in that window; \
         Warren runs {} (server.worker_threads)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        match args.warren_workers {
            0 => "one runtime thread per core".to_owned(),
            1 => "1 runtime thread".to_owned(),
            n => format!("{n} runtime threads"),
        }
    );

    let warren = Warren::start(&args.warren, dir.path(), "warren").await?;
    let req = Requests::new(&warren);
    let mut results = None;
    if args.runs(Section::Publish) {
        results = Some(publish_section(&args, &conn, &admin, &warren, &req).await?);
    }
    if args.runs(Section::Rpc) {
        rpc::run(
            &conn,
            &warren.addr,
            &format!("Bearer {}", warren.token),
            &args.rpc_levels,
            args.seconds,
            args.channels,
        )
        .await?;
    }
    if args.runs(Section::Openloop) {
        let max = results
            .as_ref()
            .map(|r| r[1].iter().map(|s| s.rate).fold(0.0, f64::max));
        open_loop(&args, &conn, &admin, &warren, &req, max).await?;
    }
    if args.runs(Section::Fanout) {
        for &rate in &args.fanout_rate {
            let f = warren_fanout(&warren, &conn, args.fanout_sockets, rate, 3.0).await?;
            f.print("WebSocket live fan-out", rate);
            print_target(
                "Warren CPU per delivery <= 2 µs at 1,000 sockets",
                (f.sockets == 1000).then(|| {
                    let us = f.warren_us_per_delivery;
                    (format!("{us:.2} µs"), us <= 2.0)
                }),
            );
        }
    }
    if args.runs(Section::Stomp) {
        stomp::run(&warren, &conn, args.stomp_sockets, &args.fanout_rate, 3.0).await?;
    }
    warren.stop();

    if args.runs(Section::Memory) {
        memory(&args, dir.path()).await?;
    }
    if args.runs(Section::Push) {
        push::run(&args, &conn, dir.path()).await?;
    }
    if args.runs(Section::Pull) {
        pull::run(&args, &conn, dir.path()).await?;
    }
    if args.runs(Section::Schedule) {
        schedule::run(&args, &conn, dir.path()).await?;
    }
    if args.runs(Section::Otel) {
        otel::run(&args, &conn, dir.path()).await?;
    }

    admin
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    admin
        .exchange_delete(EXCHANGE.into(), ExchangeDeleteOptions::default())
        .await?;

    if let Some(results) = results {
        plot(
            &args.plot,
            &args.font,
            &args.levels,
            &[
                ("1 direct AMQP + confirms", results[0].clone()),
                ("2 Warren POST /v1/publish", results[1].clone()),
                ("4 management API", results[3].clone()),
            ],
        )?;
        println!("\nplot: {}", args.plot.display());
    }
    Ok(())
}

/// The durable topic exchange every path publishes to and a durable queue (with
/// `arguments`) bound to it with `bench.#`.
async fn declare_bench_queue(
    admin: &lapin::Channel,
    queue: &str,
    arguments: FieldTable,
) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    admin
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    admin
        .queue_declare(queue.into(), durable, arguments)
        .await?;
    admin
        .queue_bind(
            queue.into(),
            EXCHANGE.into(),
            "bench.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

// ---------------------------------------------------------------- cluster comparison

/// Direct AMQP and `POST /v1/publish` into a quorum queue, on the single local broker
/// and on the cluster (`--cluster`), at `--levels`, side by side (issue #21).
async fn cluster_comparison(args: &Args, dir: &Path) -> anyhow::Result<()> {
    let queue = "warren-bench-quorum";
    println!(
        "Cluster comparison: {BODY_BYTES}-byte JSON, persistent, mandatory, into the quorum \
         queue {queue}; {:.1} s measured per point",
        args.seconds
    );
    println!(
        "{:<10} {:<22} {:>5} {:>10} {:>9} {:>9} {:>9}",
        "broker", "path", "conc", "msg/s", "p50 ms", "p99 ms", "p99.9 ms"
    );
    let single = vec![AMQP_URL.to_owned()];
    for (label, urls) in [("1 node", &single), ("3 nodes", &args.cluster)] {
        let conn = Connection::connect(&urls[0], ConnectionProperties::default()).await?;
        let admin = conn.create_channel().await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        declare_bench_queue(&admin, queue, arguments).await?;
        let warren =
            Warren::start_on(&args.warren, dir, &format!("warren-{}", urls.len()), urls).await?;
        let bearer = format!("Bearer {}", warren.token);
        let single_publish = post(&warren.addr, "/v1/publish", &bearer, &publish_body());
        for &n in &args.levels {
            for path in ["1 direct AMQP", "2 warren publish"] {
                let s = if path.starts_with('1') {
                    direct(&conn, n, args.channels, args.seconds, None).await?
                } else {
                    http_loop(
                        &warren.addr,
                        single_publish.clone(),
                        202,
                        1,
                        None,
                        n,
                        args.seconds,
                        None,
                    )
                    .await?
                };
                println!(
                    "{label:<10} {path:<22} {n:>5} {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
                    s.rate, s.p50, s.p99, s.p999
                );
                admin
                    .queue_purge(queue.into(), QueuePurgeOptions::default())
                    .await?;
            }
        }
        warren.stop();
        admin
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    Ok(())
}
