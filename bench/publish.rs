//! Section `publish`: the four publish paths (direct AMQP with confirms,
//! `POST /v1/publish`, `POST /v1/publish/batch`, the management API) at `--levels`,
//! their ratios and the targets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use lapin::Connection;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};

use super::http::{Http, find, post};
use super::measure::{Recorder, Stat, Window, print_header, print_row, summarize};
use super::server::Warren;
use super::{
    Args, BATCH, EXCHANGE, MGMT_ADDR, QUEUE, ROUTING_KEY, delivery_mode, message_json, props,
};

pub(crate) async fn direct(
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

pub(crate) fn pacing(rate: Option<f64>, n: usize, i: usize) -> Option<(Instant, Duration)> {
    rate.map(|r| {
        let period = Duration::from_secs_f64(n as f64 / r);
        (Instant::now() + period.mul_f64(i as f64 / n as f64), period)
    })
}

/// The tasks' recorders and the window's CPU (`probe`, started with the tasks).
pub(crate) async fn collect(
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
pub(crate) async fn http_loop(
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

pub(crate) fn publish_body() -> String {
    format!(
        "{{\"exchange\":\"{EXCHANGE}\",\"routing_key\":\"{ROUTING_KEY}\",\
         \"payload\":{},\"properties\":{{\"persistent\":{}}}}}",
        message_json("\"id\":\"bench\","),
        delivery_mode() == 2
    )
}

pub(crate) fn batch_body() -> String {
    let one = publish_body();
    let items = vec![one; BATCH].join(",");
    format!("{{\"messages\":[{items}]}}")
}

pub(crate) fn mgmt_body() -> String {
    let payload =
        serde_json::to_string(&message_json("\"id\":\"bench\",")).expect("a string serializes");
    format!(
        "{{\"properties\":{{\"delivery_mode\":{},\"content_type\":\"application/json\"}},\
         \"routing_key\":\"{ROUTING_KEY}\",\"payload\":{payload},\"payload_encoding\":\"string\"}}",
        delivery_mode()
    )
}

/// The requests of the publish paths, for one Warren.
pub(crate) struct Requests {
    pub(crate) single: Vec<u8>,
    pub(crate) batch: Vec<u8>,
    pub(crate) mgmt: Vec<u8>,
}

impl Requests {
    pub(crate) fn new(warren: &Warren) -> Self {
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

pub(crate) const PUBLISH_PATHS: [&str; 4] = [
    "1 direct AMQP",
    "2 warren publish",
    "3 warren batch",
    "4 management API",
];

/// Path `k` of [`PUBLISH_PATHS`] at `n` in flight, paced at `rate` msg/s if given.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn publish_point(
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
pub(crate) async fn publish_section(
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
pub(crate) fn print_target(what: &str, measured: Option<(String, bool)>) {
    let (figure, verdict) = match measured {
        Some((figure, ok)) => (figure, if ok { "met" } else { "missed" }),
        None => ("not measured".to_owned(), "-"),
    };
    println!("  {what:<56} {figure:>22}  {verdict}");
}

/// The publish targets of the issue "Cut Warren's CPU per message" (the fan-out one is
/// printed with the fan-out lines).
pub(crate) fn print_targets(levels: &[usize], results: &[Vec<Stat>]) {
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
