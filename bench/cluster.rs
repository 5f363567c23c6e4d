//! `--cluster`: direct AMQP and `POST /v1/publish` into a quorum queue on the single
//! local broker and on a cluster, side by side (issue #21).

use std::path::Path;

use lapin::options::{QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use super::http::post;
use super::publish::{direct, http_loop, publish_body};
use super::server::Warren;
use super::{AMQP_URL, Args, BODY_BYTES, declare_bench_queue};

/// Direct AMQP and `POST /v1/publish` into a quorum queue, on the single local broker
/// and on the cluster (`--cluster`), at `--levels`, side by side (issue #21).
pub(crate) async fn cluster_comparison(args: &Args, dir: &Path) -> anyhow::Result<()> {
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
