//! Request/reply: Warren's `POST /v1/request` round trip against the same RPC done with
//! lapin directly (direct reply-to on confirm-mode channels, mandatory, a reply
//! consumer per channel and a correlation-id map), both answered by one lapin
//! responder that echoes the request body to `reply_to`; and, as a floor for any HTTP
//! hop, the same HTTP requests through the thinnest relay we can write with Warren's
//! libraries (`relay.rs`, a process of its own like Warren), and through that relay
//! served by Warren's HTTP stack (axum and its tower-http layers; `--stack axum`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, ensure};
use lapin::Connection;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use tokio::sync::oneshot;

use crate::rpc_parts::{DIRECT_REPLY_TO, declare_bound, echo_responder, lock, reply_channel};
use crate::server::ThinRelay;
use crate::{
    EXCHANGE, Recorder, Stat, Window, collect, fmt_cpu, http_loop, message_json, post, props,
};

const RPC_QUEUE: &str = "warren-bench-rpc";
const RPC_KEY: &str = "rpc.call";

/// Runs the comparison at each level and prints a table and the ratios.
pub async fn run(
    conn: &Connection,
    addr: &str,
    bearer: &str,
    levels: &[usize],
    seconds: f64,
    channels: usize,
) -> anyhow::Result<()> {
    let admin = conn.create_channel().await?;
    let auto_delete = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    declare_bound(&admin, RPC_QUEUE, auto_delete, EXCHANGE, "rpc.#").await?;
    // The responder is a service of its own, with its own connection, as it is beside
    // Warren; sharing the direct client's connection would let the broker batch the
    // direct path's requests and replies into the same socket reads and writes.
    let responder_conn =
        Connection::connect(crate::AMQP_URL, lapin::ConnectionProperties::default()).await?;
    let responder = echo_responder(&responder_conn, RPC_QUEUE).await?;
    let body = message_json("\"id\":\"rpc\",");
    let request = post(
        addr,
        "/v1/request",
        bearer,
        &format!(
            "{{\"exchange\":\"{EXCHANGE}\",\"routing_key\":\"{RPC_KEY}\",\"payload\":{body},\
             \"properties\":{{\"persistent\":{}}},\"timeout_ms\":10000}}",
            crate::delivery_mode() == 2
        ),
    );
    println!(
        "\nrequest/reply: {}-byte JSON echoed by one lapin responder; direct = lapin with \
         direct reply-to on {channels} confirm-mode channels, mandatory",
        body.len()
    );
    println!(
        "{:<22} {:>5} {:>10} {:>9} {:>9} {:>9}   {:>23}  {:>20}",
        "path",
        "conc",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU gen/war/rmq/other",
        "µs/call gen/war/rmq"
    );
    // RELAY_WORK_US=N: the relay on axum burns N µs of CPU per request (its --work-us).
    let work_us = std::env::var("RELAY_WORK_US").unwrap_or_else(|_| "0".to_owned());
    // The relays get the runtime threads Warren gets here (0: the default, as Warren's).
    let threads = crate::WARREN_WORKERS.load(Ordering::Relaxed).to_string();
    let relays = [
        ThinRelay::start(RPC_KEY, &["--stack", "hyper", "--threads", &threads]).await?,
        ThinRelay::start(
            RPC_KEY,
            &[
                "--stack",
                "axum",
                "--work-us",
                &work_us,
                "--threads",
                &threads,
            ],
        )
        .await?,
    ];
    let axum_name = match work_us.as_str() {
        "0" => "4 relay on axum".to_owned(),
        us => format!("4 axum relay +{us} µs"),
    };
    let relay_body = String::from_utf8_lossy(&body_of(&request)).into_owned();
    let mut rows = Vec::new();
    for &n in levels {
        let mut four = [Stat::default(); 4];
        for (k, name) in [
            "1 direct RPC (lapin)",
            "2 warren request",
            "3 thin relay",
            axum_name.as_str(),
        ]
        .iter()
        .enumerate()
        {
            let stat = match k {
                0 => direct_rpc(conn, n, channels, seconds, body.as_bytes()).await,
                1 => http_loop(addr, request.clone(), 200, 1, None, n, seconds, None).await,
                _ => {
                    let relay = &relays[k - 2];
                    let relay_request = post(&relay.addr, "/", bearer, &relay_body);
                    let warren = crate::WARREN_PID.swap(relay.child.id(), Ordering::Relaxed);
                    let stat =
                        http_loop(&relay.addr, relay_request, 200, 1, None, n, seconds, None).await;
                    crate::WARREN_PID.store(warren, Ordering::Relaxed);
                    stat
                }
            }
            .with_context(|| format!("{name} at {n}"))?;
            println!(
                "{name:<22} {n:>5} {:>10.0} {:>9.2} {:>9.2} {:>9.2}   {}  {}",
                stat.rate,
                stat.p50,
                stat.p99,
                stat.p999,
                fmt_cpu(stat.cpu),
                stat.fmt_us()
            );
            four[k] = stat;
        }
        rows.push((n, four));
    }
    println!(
        "\nrequest/reply: Warren and the two relays vs direct at equal concurrency \
         (the war CPU column of a relay's rows is the relay's)"
    );
    println!(
        "{:>5} {:>11} {:>9} {:>11} {:>9} {:>15} {:>9}",
        "conc", "warren", "p50 +ms", "thin relay", "p50 +ms", "relay on axum", "p50 +ms"
    );
    for (n, [direct, warren, thin, axum]) in rows {
        println!(
            "{n:>5} {:>10.2}x {:>9.2} {:>10.2}x {:>9.2} {:>14.2}x {:>9.2}",
            warren.rate / direct.rate,
            warren.p50 - direct.p50,
            thin.rate / direct.rate,
            thin.p50 - direct.p50,
            axum.rate / direct.rate,
            axum.p50 - direct.p50
        );
    }
    drop(relays);
    responder.abort();
    let _ = responder_conn.close(200, "bye".into()).await;
    let _ = admin
        .queue_delete(RPC_QUEUE.into(), QueueDeleteOptions::default())
        .await;
    Ok(())
}

/// The body of an HTTP/1.1 request made by [`post`].
fn body_of(request: &[u8]) -> Vec<u8> {
    request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|end| request[end + 4..].to_vec())
        .unwrap_or_default()
}

async fn direct_rpc(
    conn: &Connection,
    n: usize,
    channels: usize,
    seconds: f64,
    body: &[u8],
) -> anyhow::Result<Stat> {
    let mut chans = Vec::new();
    for _ in 0..channels.min(n).max(1) {
        chans.push(reply_channel(conn).await?);
    }
    let body = Arc::new(body.to_vec());
    let w = Window::new(seconds);
    let probe = w.probe();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (channel, waiting) = chans[i % chans.len()].clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::new(w, None);
            let mut call = 0u64;
            loop {
                let t0 = Instant::now();
                let id = format!("{i}-{call}");
                call += 1;
                let (tx, rx) = oneshot::channel();
                lock(&waiting).insert(id.clone(), tx);
                let confirm = channel
                    .basic_publish(
                        EXCHANGE.into(),
                        RPC_KEY.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        props()
                            .with_reply_to(DIRECT_REPLY_TO.into())
                            .with_correlation_id(id.as_str().into()),
                    )
                    .await?
                    .await?;
                ensure!(
                    matches!(confirm, lapin::Confirmation::Ack(None)),
                    "not acked: {confirm:?}"
                );
                let reply = tokio::time::timeout(std::time::Duration::from_secs(10), rx)
                    .await
                    .context("no reply in 10 s")??;
                ensure!(reply == *body, "another call's reply");
                if !rec.record(t0, 1) {
                    break;
                }
            }
            anyhow::Ok(rec)
        }));
    }
    let stat = collect(tasks, w, probe).await?;
    for (channel, _) in chans {
        let _ = channel.close(200, "bye".into()).await;
    }
    Ok(stat)
}
