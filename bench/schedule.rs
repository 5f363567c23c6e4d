//! Scheduled publish (issue #30), through Warren started with its defaults: the accept
//! throughput (`POST /v1/publish` with `delay_ms`, 16 keep-alive connections as fast as
//! they go, beside the same publishes without a delay), then 1,000 scheduled messages/s
//! paced for 10 s with delays from 1 to 3 s, and how late each fired (its arrival on a
//! bound queue minus the `scheduled_for` Warren answered), with Warren's CPU per
//! scheduled message over accept, hops and firing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::ensure;
use futures::StreamExt;
use lapin::Connection;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;

use super::{AMQP_URL, Args, BODY_BYTES, EXCHANGE, Http, Warren, percentile, post, procstat};

const QUEUE: &str = "warren-bench-scheduled";
const CONNECTIONS: usize = 16;
const RATE: u64 = 1_000;
const PACED_SECONDS: u64 = 10;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `scheduled_for` (RFC 3339 with milliseconds) as Unix ms.
fn due_ms(answer: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(answer).ok()?;
    let text = v["scheduled_for"].as_str()?;
    let secs = warren::rfc3339::parse_rfc3339(text)?;
    let millis: u64 = text
        .rsplit_once('.')?
        .1
        .trim_end_matches('Z')
        .parse()
        .ok()?;
    Some(u64::try_from(secs).ok()? * 1000 + millis)
}

/// A `POST /v1/publish` body of the bench's message, `delay_ms` after it when set.
pub(super) fn body(id: &str, delay_ms: Option<u64>) -> String {
    let delay = delay_ms.map_or(String::new(), |d| format!(",\"delay_ms\":{d}"));
    format!(
        "{{\"exchange\":\"{EXCHANGE}\",\"routing_key\":\"sched.x\",\"payload\":{},\
         \"properties\":{{\"message_id\":\"{id}\"}}{delay}}}",
        super::message_json("")
    )
}

/// Closed loop for `seconds`: accepted per second and Warren µs CPU per publish.
pub(super) async fn accept_rate(
    warren: &Warren,
    delay_ms: Option<u64>,
    seconds: f64,
) -> anyhow::Result<(f64, f64)> {
    let auth = format!("Bearer {}", warren.token);
    let pid = warren.pid().to_string();
    let cpu = procstat::cpu_ticks(&pid);
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let (addr, auth) = (warren.addr.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(&addr).await?;
            let mut n = 0u64;
            while Instant::now() < until {
                let request = post(
                    &addr,
                    "/v1/publish",
                    &auth,
                    &body(&format!("a-{c}-{n}"), delay_ms),
                );
                ensure!(http.call(&request).await? == 202, "publish refused");
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut n = 0;
    for task in tasks {
        n += task.await??;
    }
    let took = started.elapsed().as_secs_f64();
    let ticks = procstat::cpu_ticks(&pid).saturating_sub(cpu);
    Ok((n as f64 / took, ticks as f64 * 10_000.0 / n as f64))
}

pub async fn run(args: &Args, conn: &Connection, dir: &Path) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    let _ = channel
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    super::declare_bench_queue(&channel, QUEUE, FieldTable::default()).await?;
    // Its own routing keys: the other bench queues take `bench.#`.
    channel
        .queue_bind(
            QUEUE.into(),
            EXCHANGE.into(),
            "sched.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    delete_ladder(&channel).await?;
    let workers = super::WARREN_WORKERS.swap(0, Ordering::Relaxed);
    let warren = Warren::start_with(
        &args.warren,
        dir,
        "warren-schedule",
        &[AMQP_URL.to_owned()],
        "",
    )
    .await;
    super::WARREN_WORKERS.store(workers, Ordering::Relaxed);
    let warren = warren?;
    println!(
        "\nScheduled publish: {BODY_BYTES}-byte persistent JSON through Warren with its defaults; \
         accept = POST /v1/publish on {CONNECTIONS} keep-alive connections, closed loop"
    );
    println!("{:<44} {:>10} {:>12}", "path", "msg/s", "µs warren");
    // The first scheduled publish declares the ladder: not measured.
    let mut http = Http::connect(&warren.addr).await?;
    let auth = format!("Bearer {}", warren.token);
    ensure!(
        http.call(&post(
            &warren.addr,
            "/v1/publish",
            &auth,
            &body("warm", Some(1))
        ))
        .await?
            == 202,
        "a scheduled publish was refused"
    );
    let (rate, us) = accept_rate(&warren, None, args.seconds).await?;
    println!("{:<44} {rate:>10.0} {us:>12.1}", "publish now");
    let (rate, us) = accept_rate(&warren, Some(3_600_000), args.seconds).await?;
    println!(
        "{:<44} {rate:>10.0} {us:>12.1}",
        "publish with delay_ms (accept only)"
    );
    channel
        .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await?;

    // Paced: RATE messages/s, delays 1-3 s, each arrival timed.
    let arrived: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let mut consumer = channel
        .basic_consume(
            QUEUE.into(),
            "schedule-bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let sink = arrived.clone();
    let consuming = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = now_ms();
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default();
            sink.lock().map(|mut s| s.push((id, at))).ok();
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
    });
    let pid = warren.pid().to_string();
    let cpu = procstat::cpu_ticks(&pid);
    let due: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let per_connection = RATE / CONNECTIONS as u64;
    let interval = Duration::from_micros(1_000_000 / per_connection);
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let (addr, auth, due) = (warren.addr.clone(), auth.clone(), due.clone());
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(&addr).await?;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for n in 0..per_connection * PACED_SECONDS {
                tick.tick().await;
                let id = format!("s-{c}-{n}");
                let delay = 1_000 + (n * 7919 + c as u64 * 104_729) % 2_001;
                let request = post(&addr, "/v1/publish", &auth, &body(&id, Some(delay)));
                ensure!(
                    http.call(&request).await? == 202,
                    "scheduled publish refused"
                );
                let at = due_ms(http.body()).ok_or_else(|| anyhow::anyhow!("no scheduled_for"))?;
                due.lock().map(|mut d| d.insert(id, at)).ok();
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let expected = due.lock().map(|d| d.len()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrived.lock().map(|a| a.len()).unwrap_or(0) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ticks = procstat::cpu_ticks(&pid).saturating_sub(cpu);
    consuming.abort();
    let arrived = arrived.lock().map(|a| a.clone()).unwrap_or_default();
    let due = due.lock().map(|d| d.clone()).unwrap_or_default();
    let mut lag_us: Vec<u32> = arrived
        .iter()
        .filter_map(|(id, at)| due.get(id).map(|d| (at.saturating_sub(*d) * 1000) as u32))
        .collect();
    lag_us.sort_unstable();
    let early = arrived
        .iter()
        .filter(|(id, at)| due.get(id).is_some_and(|d| at + 1 < *d))
        .count();
    println!(
        "paced {}/s for {PACED_SECONDS} s, delays 1-3 s: {} accepted, {} fired ({early} early), \
         lag p50 {:.0} ms p99 {:.0} ms max {:.0} ms, Warren {:.1} µs CPU per scheduled message \
         (accept, hops and firing)",
        per_connection * CONNECTIONS as u64,
        expected,
        arrived.len(),
        percentile(&lag_us, 0.50),
        percentile(&lag_us, 0.99),
        lag_us.last().map_or(f64::NAN, |l| f64::from(*l) / 1000.0),
        ticks as f64 * 10_000.0 / expected.max(1) as f64,
    );
    warren.stop();
    channel
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    // The hour-long messages of the accept run go with the ladder.
    delete_ladder(&channel).await
}

/// Removes the ladder Warren declared on the bench's vhost.
async fn delete_ladder(channel: &lapin::Channel) -> anyhow::Result<()> {
    for (queue, _) in warren::schedule::ladder(40) {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    Ok(())
}
