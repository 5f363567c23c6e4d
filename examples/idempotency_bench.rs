//! Publish throughput with no Idempotency-Key, with the memory store and with the Redis
//! store, side by side in one run against the local RabbitMQ.
//!
//!     cargo run --release --example idempotency_bench -- [messages per mode] [concurrency]
//!
//! Needs RabbitMQ on 127.0.0.1:5672 and Redis on 127.0.0.1:6379 (scripts/ensure-services.sh).

use std::time::{Duration, Instant};

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::net::TcpListener;
use warren::auth::{TokenRequest, mint};
use warren::config::{Config, StoreKind};

/// The same allocator as the `warren` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "benchmark-secret-benchmark-secret-0123";

async fn start(store: StoreKind, exchange: &str) -> anyhow::Result<(String, String)> {
    let mut config = Config::from_toml(&format!(
        "[auth]\nhs256_secret = \"{SECRET}\"\n[tenants.bench]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n"
    ))?;
    config.idempotency.store = store;
    config.idempotency.key_prefix = format!("warren-bench:{}:", uuid::Uuid::new_v4().simple());
    let state = warren::App::start(config).await?;
    let secret = state
        .resolved
        .signing_secret
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the bench config has an HS256 secret"))?;
    let token = mint(
        &state.config.auth,
        secret,
        &TokenRequest {
            tenant: "bench",
            subject: "bench",
            scope: "publish",
            ttl: Duration::from_secs(3600),
        },
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(warren::serve(
        state.clone(),
        listener,
        None,
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok((base, token));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("warren did not become ready")
}

struct Run {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

async fn run(
    base: &str,
    token: &str,
    exchange: &str,
    keyed: bool,
    total: usize,
    clients: usize,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    for client in 0..clients {
        let http = reqwest::Client::new();
        let url = format!("{base}/v1/publish");
        let token = token.to_owned();
        let body = serde_json::json!({"exchange": exchange, "routing_key": "bench",
                                      "payload": {"pad": "x".repeat(200)}})
        .to_string();
        let run_id = run_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in (client..total).step_by(clients) {
                let mut request = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body.clone());
                if keyed {
                    request = request.header("idempotency-key", format!("{run_id}-{i}"));
                }
                let t = Instant::now();
                let response = request.send().await?;
                anyhow::ensure!(response.status() == 202, "status {}", response.status());
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Ok(Run {
        rate: total as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let total = args.first().copied().unwrap_or(20_000);
    let clients = args.get(1).copied().unwrap_or(32);

    let amqp = Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672",
        ConnectionProperties::default(),
    )
    .await?;
    let channel = amqp.create_channel().await?;
    let exchange = format!("warren-bench-{}", uuid::Uuid::new_v4().simple());
    let queue = format!("{exchange}-q");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let (memory_base, token) = start(StoreKind::Memory, &exchange).await?;
    let (redis_base, redis_token) = start(StoreKind::Redis, &exchange).await?;
    // Warm-up: connections, channels, exchange cache.
    run(&memory_base, &token, &exchange, false, 2_000, clients).await?;
    run(&redis_base, &redis_token, &exchange, true, 2_000, clients).await?;

    // Modes interleaved over several rounds, best round per mode: the machine is noisy
    // and the load generator shares it, so single back-to-back runs mislead.
    const ROUNDS: usize = 3;
    println!(
        "{total} publishes per mode in {ROUNDS} interleaved rounds, {clients} concurrent HTTP/1.1 keep-alive clients, 200-byte JSON payload"
    );
    let mut best: [Option<Run>; 3] = [None, None, None];
    for _ in 0..ROUNDS {
        let rounds = [
            run(
                &memory_base,
                &token,
                &exchange,
                false,
                total / ROUNDS,
                clients,
            )
            .await?,
            run(
                &memory_base,
                &token,
                &exchange,
                true,
                total / ROUNDS,
                clients,
            )
            .await?,
            run(
                &redis_base,
                &redis_token,
                &exchange,
                true,
                total / ROUNDS,
                clients,
            )
            .await?,
        ];
        for (slot, r) in best.iter_mut().zip(rounds) {
            if slot.as_ref().is_none_or(|b| r.rate > b.rate) {
                *slot = Some(r);
            }
        }
    }
    let [Some(none), Some(memory), Some(redis)] = best else {
        anyhow::bail!("no rounds ran")
    };
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>9}",
        "mode (best round)", "msg/s", "p50", "p99", "vs none"
    );
    for (name, r) in [
        ("no key", &none),
        ("key, memory store", &memory),
        ("key, redis store", &redis),
    ] {
        println!(
            "{name:<22} {:>10.0} {:>10.2?} {:>10.2?} {:>8.1}%",
            r.rate,
            r.p50,
            r.p99,
            (r.rate / none.rate - 1.0) * 100.0
        );
    }
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(())
}
