//! Section `memory`: Warren's RSS per idle authenticated socket holding one live
//! subscription.

use std::path::Path;
use std::time::{Duration, Instant};

use super::Args;
use super::fanout::open_sockets;
use super::server::Warren;

/// Warren's RSS before and with `n` idle subscribed sockets, on a fresh Warren.
pub(crate) async fn memory(args: &Args, dir: &Path) -> anyhow::Result<()> {
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
