//! Tracing (issue #31): Warren's CPU per `POST /v1/publish` with traces exported to a
//! local OTLP/HTTP sink, sampled at 100 % and at 1 %, beside tracing off; Warren with
//! its defaults otherwise, 16 keep-alive connections in a closed loop, the same
//! 256-byte persistent message as the schedule section.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lapin::Connection;
use lapin::options::{QueueBindOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;

use super::{AMQP_URL, Args, EXCHANGE, Warren};

const QUEUE: &str = "warren-bench-otel";

/// An OTLP/HTTP sink: answers every export 200 and counts the bytes it was sent.
async fn sink() -> anyhow::Result<(String, Arc<AtomicU64>)> {
    let received = Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            counted.fetch_add(body.len() as u64, Ordering::Relaxed);
            async {
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, received))
}

pub async fn run(args: &Args, conn: &Connection, dir: &Path) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    super::declare_bench_queue(&channel, QUEUE, FieldTable::default()).await?;
    channel
        .queue_bind(
            QUEUE.into(),
            EXCHANGE.into(),
            "sched.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (url, received) = sink().await?;
    println!(
        "\nTracing: POST /v1/publish on 16 keep-alive connections, closed loop, Warren with its \
         defaults; traces to a local OTLP/HTTP sink"
    );
    println!(
        "{:<44} {:>10} {:>12} {:>12}",
        "tracing", "msg/s", "µs warren", "KiB/s sent"
    );
    for (name, telemetry) in [
        ("off", String::new()),
        (
            "on, sampled 100 %",
            format!("[telemetry]\notlp_endpoint = \"{url}\"\nsampler = \"always_on\"\n"),
        ),
        (
            "on, sampled 1 %",
            format!(
                "[telemetry]\notlp_endpoint = \"{url}\"\nsampler = \"traceidratio\"\nsampler_arg = 0.01\n"
            ),
        ),
    ] {
        let workers = super::WARREN_WORKERS.swap(0, Ordering::Relaxed);
        let warren = Warren::start_with(
            &args.warren,
            dir,
            "warren-otel",
            &[AMQP_URL.to_owned()],
            &telemetry,
        )
        .await;
        super::WARREN_WORKERS.store(workers, Ordering::Relaxed);
        let warren = warren?;
        let before = received.load(Ordering::Relaxed);
        let (rate, us) = super::schedule::accept_rate(&warren, None, args.seconds).await?;
        let sent = received.load(Ordering::Relaxed).saturating_sub(before) as f64;
        println!(
            "{name:<44} {rate:>10.0} {us:>12.1} {:>12.0}",
            sent / 1024.0 / args.seconds
        );
        warren.stop();
        channel
            .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
            .await?;
    }
    channel
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    Ok(())
}
