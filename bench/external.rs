//! What a user measures (issue #32): Warren started with its defaults — a config that
//! names only the listener, the broker, the token secret and one tenant — and load from
//! an ordinary external generator: `wrk` (HTTP/1.1 keep-alive connections, a closed
//! loop per connection) and, for HTTP/2 without TLS, `h2load` (many streams on one
//! connection). CPU is the `warren` process's utime + stime over the whole generator
//! run (all its threads, lapin's included) divided by the messages it completed, as
//! `/proc` tells it; direct lapin publishing with confirms runs in the same run at the
//! same concurrency. The tuned configurations are extra rows, never the headline.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use lapin::Connection;
use lapin::options::QueuePurgeOptions;

use super::measure::{CpuProbe, print_header, print_row};
use super::publish::{batch_body, direct, publish_body};
use super::server::ThinRelay;
use super::{
    AMQP_URL, Args, BATCH, EXCHANGE, QUEUE, ROUTING_KEY, SECRET, Stat, Warren, message_json,
    print_target,
};

/// The floor rows' names (bench/relay.rs under the same wrk load).
const FLOOR_HYPER: &str = "floor: hyper+lapin relay";
const FLOOR_AXUM: &str = "floor: relay on axum stack";
const FLOOR_HTTP: &str = "floor: hyper, no broker";

/// A configuration of Warren for this section: its name and what it adds to the
/// defaults (TOML; a `[server]` table first if any).
struct Variant {
    name: String,
    extra: String,
}

/// The tuned rows: what an operator could set, one key each.
fn tuned() -> Vec<Variant> {
    let cores = available_cores();
    vec![
        Variant {
            name: format!("worker_threads={cores}"),
            extra: format!("[server]\nworker_threads = {cores}\n"),
        },
        Variant {
            name: "log.access=true".to_owned(),
            extra: "[log]\naccess = true\n".to_owned(),
        },
        Variant {
            name: "log.level=warn".to_owned(),
            extra: "[log]\nlevel = \"warn\"\n".to_owned(),
        },
    ]
}

/// Starts Warren with the defaults plus `variant`'s keys.
async fn start(args: &Args, dir: &Path, variant: &Variant) -> anyhow::Result<Warren> {
    // `[server]` must precede its keys; a variant's table comes first, then the rest.
    let (server, rest) = match variant.extra.strip_prefix("[server]\n") {
        Some(after) => match after.split_once('[') {
            Some((keys, tail)) => (keys.to_owned(), format!("[{tail}")),
            None => (after.to_owned(), String::new()),
        },
        None => (String::new(), variant.extra.to_owned()),
    };
    Warren::launch(&args.warren, dir, "external", |addr| {
        format!(
            "[server]\nlisten = \"{addr}\"\n{server}\
             [amqp]\nurls = [\"{AMQP_URL}\"]\n\
             [auth]\nhs256_secret = \"{SECRET}\"\n\
             {rest}\
             [tenants.bench]\nvhost = \"/\"\n\
             publish = [{{ exchange = \"{EXCHANGE}\", routing_key = \"#\" }}]\n\
             subscribe = [{{ exchange = \"{EXCHANGE}\", routing_key = \"#\" }}]\n"
        )
    })
    .await
}

/// The wrk script: the request, and one line of figures when the run is done
/// (requests, µs, p50/p99/p99.9 latency in µs, errors of any kind incl. non-2xx).
fn wrk_script(token: &str, path: &str, body: &str) -> String {
    format!(
        "wrk.method = \"POST\"\n\
         wrk.path = \"{path}\"\n\
         wrk.body = [==[{body}]==]\n\
         wrk.headers[\"Content-Type\"] = \"application/json\"\n\
         wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n\
         done = function(s, latency, requests)\n\
           local e = s.errors\n\
           io.write(string.format(\"WARREN-BENCH %d %d %d %d %d %d\\n\", s.requests, s.duration,\n\
             latency:percentile(50), latency:percentile(99), latency:percentile(99.9),\n\
             e.connect + e.read + e.write + e.status + e.timeout))\n\
         end\n"
    )
}

/// Runs a load generator to its end and measures the CPU of it, Warren and RabbitMQ
/// over its whole run; returns its stdout and the CPU (percent of one core).
fn run_generator(mut command: Command, gateway: u32) -> anyhow::Result<(String, [f64; 4])> {
    let program = command.get_program().to_string_lossy().into_owned();
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} (apt-get install wrk nghttp2-client)"))?;
    let mut pids = CpuProbe::pids();
    pids[0] = child.id().to_string();
    pids[1] = gateway.to_string();
    let probe = CpuProbe::start_with(pids);
    // Read the CPU while the generator is a zombie, before it is reaped.
    let stat_path = format!("/proc/{}/stat", child.id());
    loop {
        let stat = std::fs::read_to_string(&stat_path).unwrap_or_default();
        let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
        if matches!(state, Some('Z') | None) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let cpu = probe.stop();
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{program}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((String::from_utf8(out.stdout)?, cpu))
}

/// Where wrk sends its load: an address, the token to present, and the pid whose CPU
/// is measured as the gateway's.
struct Target<'a> {
    addr: &'a str,
    token: &'a str,
    pid: u32,
}

impl<'a> From<&'a Warren> for Target<'a> {
    fn from(warren: &'a Warren) -> Self {
        Self {
            addr: &warren.addr,
            token: &warren.token,
            pid: warren.child.id(),
        }
    }
}

/// `wrk` with `n` keep-alive connections for `seconds`, posting `body` to `path`.
fn wrk(
    target: Target<'_>,
    dir: &Path,
    path: &str,
    body: &str,
    msgs_per_request: u64,
    n: usize,
    seconds: u64,
) -> anyhow::Result<Stat> {
    let script = dir.join("wrk.lua");
    std::fs::write(&script, wrk_script(target.token, path, body))?;
    let mut command = Command::new("wrk");
    command
        .args(["-t", &n.min(2).to_string(), "-c", &n.to_string()])
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(&script)
        .arg(format!("http://{}", target.addr));
    let (out, cpu) = run_generator(command, target.pid)?;
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("WARREN-BENCH "))
        .with_context(|| format!("no figures in wrk's output: {out}"))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(f.len() == 6, "wrk figures: {line}");
    if f[5] > 0.0 {
        bail!("wrk: {} errors or non-2xx answers: {out}", f[5]);
    }
    Ok(Stat {
        rate: f[0] * msgs_per_request as f64 / (f[1] / 1e6),
        p50: f[2] / 1000.0,
        p99: f[3] / 1000.0,
        p999: f[4] / 1000.0,
        cpu,
    })
}

/// `h2load` over HTTP/2 without TLS (prior knowledge): `connections` connections with
/// `streams` concurrent streams each. h2load prints no percentiles: p50 is the mean,
/// p99 and p99.9 the max.
fn h2load(
    warren: &Warren,
    dir: &Path,
    connections: usize,
    streams: usize,
    seconds: u64,
) -> anyhow::Result<Stat> {
    let body = dir.join("h2.json");
    std::fs::write(&body, publish_body())?;
    let mut command = Command::new("h2load");
    command
        .args(["-c", &connections.to_string(), "-m", &streams.to_string()])
        .args(["-D", &seconds.to_string(), "--warm-up-time", "1s"])
        .arg("-d")
        .arg(&body)
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("authorization: Bearer {}", warren.token)])
        .arg(format!("http://{}/v1/publish", warren.addr));
    let (out, cpu) = run_generator(command, warren.child.id())?;
    let number = |line: &str, after: &str| -> Option<f64> {
        let rest = &line[line.find(after)? + after.len()..];
        rest.split_whitespace()
            .next()?
            .trim_end_matches(',')
            .parse()
            .ok()
    };
    let line = |prefix: &str| out.lines().find(|l| l.trim_start().starts_with(prefix));
    let rate = line("finished in")
        .and_then(|l| number(l, "s, "))
        .with_context(|| format!("no rate in h2load's output: {out}"))?;
    let requests = line("requests:").context("no requests line")?;
    let succeeded = number(requests, "done, ").context("succeeded")?;
    let done = number(requests, "started, ").context("done")?;
    ensure!(succeeded == done, "h2load: {requests}");
    let two = line("status codes:").and_then(|l| number(l, "status codes: "));
    ensure!(two == Some(done), "h2load: not every answer was 2xx: {out}");
    let times = line("time for request:").context("no latency line")?;
    let ms = |v: &str| -> Option<f64> {
        if let Some(us) = v.strip_suffix("us") {
            us.parse::<f64>().ok().map(|x| x / 1000.0)
        } else if let Some(ms) = v.strip_suffix("ms") {
            ms.parse().ok()
        } else {
            v.strip_suffix('s')?.parse::<f64>().ok().map(|x| x * 1000.0)
        }
    };
    let t: Vec<&str> = times.split_whitespace().skip(3).collect();
    let (max, mean) = (t.get(1).and_then(|v| ms(v)), t.get(2).and_then(|v| ms(v)));
    Ok(Stat {
        rate,
        p50: mean.unwrap_or(f64::NAN),
        p99: max.unwrap_or(f64::NAN),
        p999: max.unwrap_or(f64::NAN),
        cpu,
    })
}

pub async fn run(
    args: &Args,
    conn: &Connection,
    admin: &lapin::Channel,
    dir: &Path,
) -> anyhow::Result<()> {
    let seconds = args.seconds.ceil().max(1.0) as u64;
    let levels: Vec<usize> = args
        .levels
        .iter()
        .copied()
        .filter(|n| [16, 64].contains(n))
        .collect();
    let levels = if levels.is_empty() {
        vec![16, 64]
    } else {
        levels
    };
    println!(
        "\nAs a user measures it: Warren with its defaults ({} cores here, so {} runtime \
         thread(s)), load from {}; CPU over each whole generator run",
        available_cores(),
        available_cores().div_ceil(2),
        which_version("wrk", "-v"),
    );
    print_header("msg/s", "msg");
    let purge = || admin.queue_purge(QUEUE.into(), QueuePurgeOptions::default());
    let mut rows: Vec<(String, usize, Stat)> = Vec::new();
    let defaults = Variant {
        name: "defaults".to_owned(),
        extra: String::new(),
    };
    let mut warren = start(args, dir, &defaults).await?;
    let single = publish_body();
    let batch = batch_body();
    // The floors (bench/relay.rs as processes of their own, same thread count as
    // Warren's default): the same wrk load through the thinnest publish hop hyper and
    // lapin make, through it on Warren's HTTP stack, and hyper answering alone.
    let raw = message_json("\"id\":\"bench\",");
    let floors = [
        (
            FLOOR_HYPER,
            ThinRelay::start(ROUTING_KEY, &["--mode", "publish", "--stack", "hyper"]).await?,
        ),
        (
            FLOOR_AXUM,
            ThinRelay::start(ROUTING_KEY, &["--mode", "publish", "--stack", "axum"]).await?,
        ),
        (
            FLOOR_HTTP,
            ThinRelay::start(ROUTING_KEY, &["--mode", "answer", "--stack", "hyper"]).await?,
        ),
    ];
    for &n in &levels {
        let d = direct(conn, n, args.channels, seconds as f64, None).await?;
        print_row("direct AMQP (lapin)", n, &d);
        rows.push(("direct".to_owned(), n, d));
        purge().await?;
        let s = wrk((&warren).into(), dir, "/v1/publish", &single, 1, n, seconds)?;
        print_row("publish, defaults", n, &s);
        rows.push(("single defaults".to_owned(), n, s));
        purge().await?;
        for (name, relay) in &floors {
            let target = Target {
                addr: &relay.addr,
                token: "-",
                pid: relay.child.id(),
            };
            let f = wrk(target, dir, "/", &raw, 1, n, seconds)?;
            print_row(name, n, &f);
            rows.push((name.to_string(), n, f));
            purge().await?;
        }
        let b = wrk(
            (&warren).into(),
            dir,
            "/v1/publish/batch",
            &batch,
            BATCH as u64,
            n,
            seconds,
        )?;
        print_row("batch, defaults", n, &b);
        rows.push(("batch defaults".to_owned(), n, b));
        purge().await?;
    }
    for (connections, streams) in [(1, 16), (1, 64), (4, 16)] {
        match h2load(&warren, dir, connections, streams, seconds) {
            Ok(s) => print_row(
                &format!("h2c {connections} conn x {streams}"),
                connections * streams,
                &s,
            ),
            Err(e) => println!("h2c {connections} conn x {streams}: {e:#}"),
        }
        purge().await?;
    }
    warren.stop();
    drop(floors);
    println!("(h2c rows: p50 is the mean, p99 and p99.9 the maximum; h2load gives no percentiles)");

    println!("\ntuned rows (not the headline): the same wrk runs, Warren with one key set");
    for variant in &tuned() {
        warren = start(args, dir, variant).await?;
        for &n in &levels {
            let s = wrk((&warren).into(), dir, "/v1/publish", &single, 1, n, seconds)?;
            print_row(&format!("publish, {}", variant.name), n, &s);
            purge().await?;
        }
        warren.stop();
    }

    let find = |what: &str, n: usize| {
        rows.iter()
            .find(|(w, l, _)| w == what && *l == n)
            .map(|(_, _, s)| *s)
    };
    println!("\ntargets (issue #32, from outside with the defaults)");
    for n in [16, 64] {
        print_target(
            &format!("Warren CPU per single publish <= 40 µs at {n}"),
            find("single defaults", n).map(|s| {
                let us = s.us_per_msg(1);
                (format!("{us:.1} µs"), us <= 40.0)
            }),
        );
    }
    for n in [16, 64] {
        print_target(
            &format!("Warren CPU per batched message <= 5 µs at {n}"),
            find("batch defaults", n).map(|s| {
                let us = s.us_per_msg(1);
                (format!("{us:.2} µs"), us <= 5.0)
            }),
        );
    }
    for (n, floor) in [(16, 0.8), (64, 0.7)] {
        print_target(
            &format!("publish msg/s >= {floor}x direct at {n}"),
            find("single defaults", n)
                .zip(find("direct", n))
                .map(|(w, d)| {
                    let r = w.rate / d.rate;
                    (format!("{r:.2}x"), r >= floor)
                }),
        );
    }
    for n in [16, 64] {
        print_target(
            &format!("publish p99 <= 1.5x direct's at {n}"),
            find("single defaults", n)
                .zip(find("direct", n))
                .map(|(w, d)| {
                    let r = w.p99 / d.p99;
                    (format!("{:.2}/{:.2} ms {r:.2}x", w.p99, d.p99), r <= 1.5)
                }),
        );
    }
    println!(
        "\nthe floors beside the same targets: what a hop of the same libraries costs \
         with nothing of Warren's (gateway CPU per publish, msg/s and p99 vs direct)"
    );
    for name in [FLOOR_HYPER, FLOOR_AXUM, FLOOR_HTTP] {
        for n in &levels {
            let (Some(f), Some(d)) = (find(name, *n), find("direct", *n)) else {
                continue;
            };
            println!(
                "  {name:<28} at {n:>2}: {:>6.1} µs  {:>5.2}x msg/s  {:>5.2}x p99",
                f.us_per_msg(1),
                f.rate / d.rate,
                f.p99 / d.p99
            );
        }
    }
    Ok(())
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The first line a tool prints of its version, for the header.
fn which_version(tool: &str, flag: &str) -> String {
    Command::new(tool)
        .arg(flag)
        .output()
        .ok()
        .and_then(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| format!("({tool} not found)"))
}
