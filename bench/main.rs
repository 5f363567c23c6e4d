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
//! Each section is a file: `publish.rs`, `rpc.rs`, `openloop.rs`, `fanout.rs`,
//! `stomp.rs`, `memory.rs`, `push.rs`, `pull.rs`, `schedule.rs`, `otel.rs`, and
//! `cluster.rs` for `--cluster`; what they share is `measure.rs` (the window, latency
//! percentiles, CPU per process), `http.rs` (the HTTP/1.1 client), `server.rs` (Warren
//! as a process) and, here, the message. This file parses the arguments and runs the
//! sections in order.
//!
//! Not a test: it never runs under `cargo test`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

mod cluster;
mod external;
mod fanout;
mod http;
mod measure;
mod memory;
mod openloop;
mod otel;
mod plot;
mod procstat;
mod publish;
mod pull;
mod push;
mod rpc;
mod rpc_parts;
mod schedule;
mod server;
mod stomp;

use cluster::cluster_comparison;
use fanout::{Fanout, Texts, Ws, fan_out, warren_fanout};
use http::{Http, post};
use measure::{Recorder, Stat, WARREN_PID, Window, fmt_cpu, percentile};
use memory::memory;
use openloop::open_loop;
use plot::plot;
use publish::{Requests, collect, http_loop, print_target, publish_section};
use server::Warren;

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
        default_value = "external,publish,rpc,openloop,fanout,stomp,memory,push,pull,schedule,otel"
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
    /// What a user measures (`external.rs`): wrk and h2load against Warren started
    /// with its defaults, beside direct lapin; the tuned configurations as extra rows.
    External,
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

    if args.runs(Section::External) {
        external::run(&args, &conn, &admin, dir.path()).await?;
    }
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
