//! The thinnest HTTP-to-AMQP request/reply hop we know how to write with Warren's own
//! libraries (hyper, lapin as patched in vendor/lapin, tokio with as many threads as
//! Warren's default takes): a floor for `POST /v1/request`, not a product. It reads
//! each request's body, publishes it whole (mandatory, persistent, confirmed, with
//! direct reply-to and a correlation id) to `--exchange` with `--routing-key`, awaits
//! the confirm and the reply on the same channel, and answers `200` with the reply's
//! body. No authentication, no JSON, no validation, no metrics, no limits.
//!
//! `--mode publish` makes it the floor for `POST /v1/publish` instead: each body is
//! published (mandatory, persistent, confirmed) and answered `202` once the broker
//! confirmed it routed; `--mode answer` touches no broker at all (reads the body,
//! answers `202`), the floor of the HTTP half alone. bench/external.rs runs both under
//! wrk beside Warren.
//!
//! `--stack axum` serves the same relay through the HTTP stack Warren is built on
//! instead of bare hyper: an axum `Router`, hyper-util's connection builder, and
//! Warren's cross-cutting tower-http layers (request id set and propagated, the trace
//! span, panics caught), and nothing of Warren's own work. It measures what that
//! stack alone costs per call. `--work-us N` burns N µs of CPU per request on top,
//! standing in for a gateway's own work.
//!
//!     warren-thin-relay --listen 127.0.0.1:0 --exchange warren-bench --routing-key rpc.call
//!
//! prints `listening on ADDR` once it serves. bench/rpc.rs starts it as a process
//! of its own, as it does Warren, so its CPU is measured the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::oneshot;

mod rpc_parts;
use rpc_parts::{DIRECT_REPLY_TO, Waiting, lock, reply_channel};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp: String,
    #[arg(long)]
    exchange: String,
    #[arg(long)]
    routing_key: String,
    /// Channels, each with its own direct reply-to consumer (Warren's default is 4).
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// `hyper` (bare) or `axum` (Warren's HTTP stack around the same relay).
    #[arg(long, default_value = "hyper")]
    stack: Stack,
    /// Microseconds of CPU to burn on each request before relaying it: a stand-in for
    /// a gateway's own work per request (authentication, parsing, rendering), to find
    /// how much of it the machine can afford at a given ratio to direct.
    #[arg(long, default_value_t = 0)]
    work_us: u64,
    /// `request` (publish and await the reply), `publish` (publish and await the
    /// confirm) or `answer` (no broker: answer at once).
    #[arg(long, default_value = "request")]
    mode: Mode,
    /// Runtime threads; 0 = Warren's default (half the cores, at least one).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Request,
    Publish,
    Answer,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Stack {
    Hyper,
    Axum,
}

struct Relay {
    mode: Mode,
    work: Duration,
    channels: Vec<(Channel, Waiting)>,
    next: AtomicUsize,
    ids: AtomicU64,
    exchange: String,
    routing_key: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match args.threads {
        0 => cores.div_ceil(2).max(1),
        n => n,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    let mut channels = Vec::new();
    for _ in 0..args.channels.max(1) {
        channels.push(reply_channel(&conn).await?);
    }
    let relay = Arc::new(Relay {
        mode: args.mode,
        work: Duration::from_micros(args.work_us),
        channels,
        next: AtomicUsize::new(0),
        ids: AtomicU64::new(0),
        exchange: args.exchange,
        routing_key: args.routing_key,
    });
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    if let Stack::Axum = args.stack {
        return serve_axum(listener, relay).await;
    }
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let relay = relay.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let relay = relay.clone();
                async move { Ok::<_, std::convert::Infallible>(relay.call(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The relay behind an axum `Router` with Warren's cross-cutting layers (as in
/// `warren::api::router`, without CORS, which Warren leaves out when no origins are
/// configured), served as Warren serves connections: hyper-util's builder, HTTP/1.
async fn serve_axum(listener: tokio::net::TcpListener, relay: Arc<Relay>) -> anyhow::Result<()> {
    use axum::extract::State;
    use axum::response::IntoResponse;
    use tower_http::catch_panic::CatchPanicLayer;
    use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::trace::TraceLayer;

    async fn relayed(State(relay): State<Arc<Relay>>, body: Bytes) -> axum::response::Response {
        match relay.round_trip(body).await {
            Ok(None) => StatusCode::ACCEPTED.into_response(),
            Ok(Some(reply)) => reply.into_response(),
            Err(error) => (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
        }
    }

    let request_id = axum::http::HeaderName::from_static("x-request-id");
    // `/` for the bench, `/v1/request` and `/v1/publish` for `warren-profile --kind
    // request` and `--kind publish` (with `--mode publish`).
    let app = axum::Router::new()
        .route("/", axum::routing::post(relayed))
        .route("/v1/request", axum::routing::post(relayed))
        .route("/v1/publish", axum::routing::post(relayed))
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(
                    request_id.clone(),
                    warren::ids::MakeRequestUuid,
                ))
                .map_response(IntoResponse::into_response)
                .layer(TraceLayer::new_for_http())
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(CatchPanicLayer::new()),
        )
        .with_state(relay);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http1();
            let _ = builder
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Relay {
    async fn call(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let body = match request.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(error) => {
                let mut response = Response::new(Full::new(Bytes::from(error.to_string())));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                return response;
            }
        };
        match self.round_trip(body).await {
            Ok(None) => {
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::ACCEPTED;
                response
            }
            Ok(Some(reply)) => Response::new(Full::new(Bytes::from(reply))),
            Err(error) => {
                let mut response = Response::new(Full::new(Bytes::from(error.to_string())));
                *response.status_mut() = StatusCode::BAD_GATEWAY;
                response
            }
        }
    }

    /// Relays `body` as the mode says: the reply's body, or `None` where the answer is
    /// `202` with none.
    async fn round_trip(&self, body: Bytes) -> anyhow::Result<Option<Vec<u8>>> {
        if !self.work.is_zero() {
            let start = std::time::Instant::now();
            while start.elapsed() < self.work {
                std::hint::spin_loop();
            }
        }
        let (channel, waiting) =
            &self.channels[self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len()];
        match self.mode {
            Mode::Answer => return Ok(None),
            Mode::Publish => {
                let confirm = channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        self.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type("application/json".into()),
                    )
                    .await?
                    .await?;
                anyhow::ensure!(
                    matches!(confirm, lapin::Confirmation::Ack(None)),
                    "not routed"
                );
                return Ok(None);
            }
            Mode::Request => {}
        }
        let id = self.ids.fetch_add(1, Ordering::Relaxed).to_string();
        let (tx, rx) = oneshot::channel();
        lock(waiting).insert(id.clone(), tx);
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(id.as_str().into());
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                mandatory,
                &body,
                properties,
            )
            .await?
            .await?;
        anyhow::ensure!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "not routed"
        );
        let reply = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .context("no reply in 10 s")?;
        lock(waiting).remove(&id);
        Ok(Some(reply?))
    }
}
