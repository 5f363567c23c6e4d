//! Pull consume (issue #29): messages per second received and acked through Warren
//! (`POST /v1/queues/{queue}/receive` then `/ack`, 16 keep-alive connections) at 1 and
//! 10 messages per receive, beside a lapin consumer with manual acks (prefetch 16 and
//! 160: the same number of messages in hand), draining the same queue of persistent
//! 256-byte messages; and the CPU per message of Warren and of the generator.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};

use super::{AMQP_URL, Args, BODY_BYTES, Http, Warren, post, procstat};

const PULL_QUEUE: &str = "warren-bench-pull";
const CONNECTIONS: usize = 16;
const MESSAGES: usize = 20_000;

async fn fill(channel: &lapin::Channel, count: usize) -> anyhow::Result<()> {
    let body = super::message_json("");
    let mut confirms = Vec::with_capacity(1000);
    for _ in 0..count {
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    PULL_QUEUE.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await?,
        );
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

/// (messages/s, generator µs CPU per message, Warren µs CPU per message)
struct Point(f64, f64, f64);

fn print_point(name: &str, batch: usize, p: &Point) {
    println!(
        "{name:<40} {batch:>5} {:>10.0} {:>10.1} {:>10.1}",
        p.0, p.1, p.2
    );
}

/// A lapin consumer with manual acks and a prefetch of `prefetch`.
async fn floor(conn: &Connection, prefetch: u16) -> anyhow::Result<Point> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let cpu = procstat::cpu_ticks("self");
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            PULL_QUEUE.into(),
            "pull-floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut n = 0;
    while n < MESSAGES {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        delivery?.acker.ack(BasicAckOptions::default()).await?;
        n += 1;
    }
    let took = started.elapsed();
    let ticks = procstat::cpu_ticks("self").saturating_sub(cpu);
    let _ = channel.close(200, "done".into()).await;
    Ok(Point(
        n as f64 / took.as_secs_f64(),
        ticks as f64 * 10_000.0 / n as f64,
        0.0,
    ))
}

/// 16 connections, each: receive `batch`, ack the receipts, until the queue is drained.
async fn through_warren(warren: &Warren, batch: usize) -> anyhow::Result<Point> {
    let auth = format!("Bearer {}", warren.token);
    let receive = post(
        &warren.addr,
        &format!("/v1/queues/{PULL_QUEUE}/receive"),
        &auth,
        &format!("{{\"max_messages\":{batch},\"wait_ms\":200,\"lease_ms\":60000}}"),
    );
    let acked = Arc::new(AtomicU64::new(0));
    let pid = warren.pid().to_string();
    let (cpu_gen, cpu_warren) = (procstat::cpu_ticks("self"), procstat::cpu_ticks(&pid));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (addr, auth, receive, acked) = (
            warren.addr.clone(),
            auth.clone(),
            receive.clone(),
            acked.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(&addr).await?;
            let deadline = Instant::now() + Duration::from_secs(300);
            while (acked.load(Ordering::Relaxed) as usize) < MESSAGES && Instant::now() < deadline {
                ensure!(http.call(&receive).await? == 200, "receive failed");
                let answer: serde_json::Value = serde_json::from_slice(http.body())?;
                let receipts: Vec<&serde_json::Value> = answer["messages"]
                    .as_array()
                    .map(|m| m.iter().map(|m| &m["receipt"]).collect())
                    .unwrap_or_default();
                if receipts.is_empty() {
                    continue;
                }
                let body = serde_json::json!({ "receipts": receipts }).to_string();
                let ack = post(&addr, &format!("/v1/queues/{PULL_QUEUE}/ack"), &auth, &body);
                ensure!(http.call(&ack).await? == 200, "ack failed");
                acked.fetch_add(receipts.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let took = started.elapsed();
    let n = acked.load(Ordering::Relaxed) as f64;
    Ok(Point(
        n / took.as_secs_f64(),
        procstat::cpu_ticks("self").saturating_sub(cpu_gen) as f64 * 10_000.0 / n,
        procstat::cpu_ticks(&pid).saturating_sub(cpu_warren) as f64 * 10_000.0 / n,
    ))
}

pub async fn run(args: &Args, conn: &Connection, dir: &Path) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let _ = channel
        .queue_delete(PULL_QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    super::declare_bench_queue(&channel, PULL_QUEUE, FieldTable::default()).await?;
    // Warren with its defaults (one runtime thread per core) and a queue grant.
    let workers = super::WARREN_WORKERS.swap(0, Ordering::Relaxed);
    let warren = Warren::start_with(
        &args.warren,
        dir,
        "warren-pull",
        &[AMQP_URL.to_owned()],
        "[tenants.bench.limits]\nmax_waiting_requests = 1000\n[pull]\nmax_leased_per_tenant = 1000\n",
    )
    .await;
    super::WARREN_WORKERS.store(workers, Ordering::Relaxed);
    let warren = warren?;
    println!(
        "\nPull consume: {MESSAGES} persistent {BODY_BYTES}-byte messages drained per row; \
         through Warren {CONNECTIONS} keep-alive connections each receive then ack (Warren with \
         its default runtime threads); the floor is one lapin consumer with manual acks and \
         the same messages in hand"
    );
    println!(
        "{:<40} {:>5} {:>10} {:>10} {:>10}",
        "path", "batch", "msg/s", "µs gen", "µs warren"
    );
    for batch in [1usize, 10] {
        let in_hand = u16::try_from(CONNECTIONS * batch).unwrap_or(u16::MAX);
        channel
            .queue_purge(PULL_QUEUE.into(), QueuePurgeOptions::default())
            .await?;
        fill(&channel, MESSAGES).await?;
        let f = floor(conn, in_hand).await?;
        print_point(&format!("lapin consumer, prefetch {in_hand}"), batch, &f);
        fill(&channel, MESSAGES).await?;
        let w = through_warren(&warren, batch).await?;
        print_point("Warren receive + ack", batch, &w);
        println!(
            "{:<40} {batch:>5} {:>9.2}x",
            "  Warren / lapin consumer",
            w.0 / f.0
        );
    }
    warren.stop();
    channel
        .queue_delete(PULL_QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    Ok(())
}
