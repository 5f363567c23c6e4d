//! A fixed amount of work for profiling a running Warren (bench/profile.sh): N requests
//! of one kind at a given concurrency over keep-alive HTTP/1.1 connections, then the
//! warren process's CPU time and context switches per message. A fixed count (not a
//! fixed time) is what makes `valgrind --tool=callgrind` instruction counts comparable
//! between two builds.
//!
//!     warren-profile --addr 127.0.0.1:8080 --token T --pid 1234 --kind publish \
//!         --requests 20000 --concurrency 16
//!
//! Not a test: it never runs under `cargo test`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod procstat;
mod rpc_parts;

#[derive(Parser, Debug)]
#[command(about = "Fixed-count load for profiling Warren (see BENCHMARKS.md)")]
struct Args {
    #[arg(long)]
    addr: String,
    #[arg(long)]
    token: String,
    /// The warren process, whose CPU time and context switches are reported.
    #[arg(long)]
    pid: u32,
    /// publish (POST /v1/publish), batch (POST /v1/publish/batch, 100 messages),
    /// request (POST /v1/request, answered by a responder in this process that echoes
    /// the body to `reply_to`, as bench/rpc.rs), or lapin-batch: no Warren, this process publishes the same messages with lapin
    /// directly, 100 pipelined per round then all confirms awaited (what Warren's batch
    /// does on one channel), and reports its *own* CPU per message: the floor of the
    /// AMQP client that Warren is built on. json-batch: no broker and no Warren, this
    /// process parses the batch request with Warren's own types (`warren::wire`) and
    /// writes the batch answer, --requests times, and reports its CPU per message: the
    /// floor of reading and answering a batch in JSON.
    #[arg(long, default_value = "publish")]
    kind: String,
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value = "warren-bench")]
    exchange: String,
}

const BATCH: usize = 100;

fn message(exchange: &str) -> String {
    let pad = "x".repeat(200);
    format!(
        "{{\"exchange\":\"{exchange}\",\"routing_key\":\"bench.msg\",\
         \"payload\":{{\"id\":\"bench\",\"pad\":\"{pad}\"}},\"properties\":{{\"persistent\":true}}}}"
    )
}

/// A process's CPU ticks and context switches from `start` to `report`, and RabbitMQ's
/// (`beam.smp`) CPU ticks.
struct Measured {
    pid: String,
    ticks: (u64, u64),
    switches: u64,
    broker: Option<(String, u64)>,
    at: Instant,
}

impl Measured {
    fn start(pid: u32) -> Self {
        let pid = pid.to_string();
        let broker = procstat::find_pid("beam.smp").map(|b| {
            let ticks = procstat::cpu_ticks(&b);
            (b, ticks)
        });
        Self {
            ticks: procstat::user_system_ticks(&pid),
            switches: procstat::context_switches(&pid),
            pid,
            broker,
            at: Instant::now(),
        }
    }

    /// "{rate} msg/s; {who} CPU {µs} µs/msg, {n} context switches/msg; RabbitMQ CPU
    /// {µs} µs/msg" since `start`.
    fn report(&self, who: &str, messages: f64) -> String {
        let seconds = self.at.elapsed().as_secs_f64();
        let (user, system) = procstat::user_system_ticks(&self.pid);
        let (user, system) = (user - self.ticks.0, system - self.ticks.1);
        let per = |ticks: u64| ticks as f64 * 10_000.0 / messages;
        let switches = procstat::context_switches(&self.pid) - self.switches;
        let broker = match &self.broker {
            Some((pid, start)) => format!(
                "; RabbitMQ CPU {:.1} µs/msg",
                (procstat::cpu_ticks(pid) - start) as f64 * 10_000.0 / messages
            ),
            None => String::new(),
        };
        format!(
            "in {seconds:.2} s: {:.0} msg/s; {who} CPU {:.1} µs/msg ({:.1} user, {:.1} system), {:.2} context switches/msg{broker}",
            messages / seconds,
            per(user + system),
            per(user),
            per(system),
            switches as f64 / messages,
        )
    }
}

async fn call(stream: &mut TcpStream, buf: &mut Vec<u8>, request: &[u8]) -> anyhow::Result<u16> {
    stream.write_all(request).await?;
    buf.clear();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])?;
            let status: u16 = head.get(9..12).context("status line")?.parse()?;
            let length = head
                .split("\r\n")
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .context("no content-length")?
                .1
                .trim()
                .parse::<usize>()?;
            while buf.len() < end + 4 + length {
                read_more(stream, buf).await?;
            }
            return Ok(status);
        }
        read_more(stream, buf).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let len = buf.len();
    buf.resize(len + 8192, 0);
    let n = stream.read(&mut buf[len..]).await?;
    buf.truncate(len + n);
    ensure!(n > 0, "connection closed");
    Ok(())
}

/// `--kind lapin-batch`: rounds of 100 pipelined publishes (persistent, mandatory, the
/// same body and properties Warren sets) on `--concurrency` confirm-mode channels of one
/// connection, each round's confirms awaited together; this process's CPU per message.
async fn lapin_batch(args: &Args, conn: &Connection) -> anyhow::Result<()> {
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let body =
        Arc::new(format!("{{\"id\":\"bench\",\"pad\":\"{}\"}}", "x".repeat(200)).into_bytes());
    let remaining = Arc::new(AtomicU64::new(args.requests));
    let mut channels = Vec::new();
    for _ in 0..args.concurrency {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(ch);
    }
    let me = std::process::id();
    let measured = Measured::start(me);
    let mut tasks = Vec::new();
    for ch in channels {
        let (body, remaining, exchange) = (body.clone(), remaining.clone(), args.exchange.clone());
        tasks.push(tokio::spawn(async move {
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let mut confirms = Vec::with_capacity(BATCH);
                for _ in 0..BATCH {
                    let properties = BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_message_id(uuid::Uuid::new_v4().to_string().into())
                        .with_delivery_mode(2)
                        .with_timestamp(0);
                    let options = BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    };
                    confirms.push(
                        ch.basic_publish(
                            exchange.as_str().into(),
                            "bench.msg".into(),
                            options,
                            &body,
                            properties,
                        )
                        .await?,
                    );
                }
                for confirm in confirms {
                    ensure!(
                        matches!(confirm.await?, lapin::Confirmation::Ack(None)),
                        "not acked"
                    );
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let messages = (args.requests * BATCH as u64) as f64;
    println!(
        "lapin alone: {} rounds of {BATCH} pipelined publishes on {} channels {}",
        args.requests,
        args.concurrency,
        measured.report("this process's", messages),
    );
    Ok(())
}

/// `--kind request`'s queue (bound `rpc.#`) and its responder, which echoes every
/// request's body to its `reply_to` with its correlation id.
async fn responder(conn: &Connection, exchange: &str) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    let queue = format!("{exchange}-rpc");
    let auto_delete = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    rpc_parts::declare_bound(&ch, &queue, auto_delete, exchange, "rpc.#").await?;
    rpc_parts::echo_responder(conn, &queue).await?;
    Ok(())
}

/// The exchange and durable queue every message goes to (as in bench/main.rs), purged.
async fn topology(conn: &Connection, exchange: &str) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    let queue = format!("{exchange}-q");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    rpc_parts::declare_bound(&ch, &queue, durable, exchange, "bench.#").await?;
    ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let _ = ch.close(200, "bye".into()).await;
    Ok(())
}

/// `--kind json-batch`: the batch body parsed into `warren::wire::BatchRequest` and
/// the `200` answer (one accepted result per message) written, as Warren's batch
/// endpoint does around the broker.
fn json_batch(args: &Args) -> anyhow::Result<()> {
    let items = vec![message(&args.exchange); BATCH].join(",");
    let body = format!("{{\"messages\":[{items}]}}").into_bytes();
    let measured = Measured::start(std::process::id());
    let mut answered = 0usize;
    for i in 0..args.requests {
        let batch: warren::wire::BatchRequest = warren::wire::parse_json(&body)
            .map_err(|e| anyhow::anyhow!("the bench batch does not parse: {e:?}"))?;
        let results = batch
            .messages
            .iter()
            .enumerate()
            .map(|(k, m)| warren::wire::BatchItemResult {
                status: 202,
                message_id: Some(format!("{i}-{k}-{}", m.routing_key.len())),
                routed: Some(true),
                scheduled_for: None,
                code: None,
                detail: None,
            })
            .collect();
        let answer = serde_json::to_vec(&warren::wire::BatchResponse { results })?;
        answered += std::hint::black_box(answer).len();
    }
    ensure!(answered > 0, "nothing answered");
    println!(
        "JSON alone: {} batches of {BATCH} parsed and answered {}",
        args.requests,
        measured.report("this process's", (args.requests * BATCH as u64) as f64),
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.kind == "json-batch" {
        return json_batch(&args);
    }
    let conn = Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672",
        ConnectionProperties::default(),
    )
    .await?;
    topology(&conn, &args.exchange).await?;
    if args.kind == "lapin-batch" {
        let published = lapin_batch(&args, &conn).await;
        let _ = conn.close(200, "bye".into()).await;
        return published;
    }
    if args.kind == "request" {
        responder(&conn, &args.exchange).await?;
    } else {
        let _ = conn.close(200, "bye".into()).await;
    }
    let (path, body, per_request, expect) = match args.kind.as_str() {
        "publish" => ("/v1/publish", message(&args.exchange), 1, 202),
        "request" => (
            "/v1/request",
            message(&args.exchange)
                .replacen("bench.msg", "rpc.call", 1)
                .replacen('{', "{\"timeout_ms\":10000,", 1),
            1,
            200,
        ),
        "batch" => {
            let items = vec![message(&args.exchange); BATCH].join(",");
            (
                "/v1/publish/batch",
                format!("{{\"messages\":[{items}]}}"),
                BATCH as u64,
                200,
            )
        }
        other => bail!("unknown --kind {other}"),
    };
    let request = Arc::new(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            args.addr,
            args.token,
            body.len()
        )
        .into_bytes(),
    );
    let remaining = Arc::new(AtomicU64::new(args.requests));
    let mut streams = Vec::new();
    for _ in 0..args.concurrency {
        let stream = TcpStream::connect(&args.addr).await?;
        stream.set_nodelay(true)?;
        streams.push(stream);
    }
    let measured = Measured::start(args.pid);
    let mut tasks = Vec::new();
    for mut stream in streams {
        let (request, remaining) = (request.clone(), remaining.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(8192);
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let status = call(&mut stream, &mut buf, &request).await?;
                ensure!(status == expect, "status {status}");
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let messages = (args.requests * per_request) as f64;
    println!(
        "{} requests ({messages} messages) at {} in flight {}",
        args.requests,
        args.concurrency,
        measured.report("warren", messages),
    );
    Ok(())
}
