//! Section `openloop`: direct AMQP and `POST /v1/publish` paced at half of Warren's
//! max.

use anyhow::Context;
use lapin::Connection;
use lapin::options::QueuePurgeOptions;

use super::measure::fmt_cpu;
use super::publish::{PUBLISH_PATHS, Requests, publish_point};
use super::server::Warren;
use super::{Args, QUEUE};

/// Direct AMQP and `POST /v1/publish` paced at half of Warren's max single-publish rate:
/// `max` from the publish section, or else measured here at the highest level.
pub(crate) async fn open_loop(
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
