//! Warren: an HTTP/WebSocket gateway in front of RabbitMQ. `run` serves a config;
//! `App::start` + `api::router` build the application (tests use them directly).
//!
//! The app owns its background tasks: each is spawned on [`App::tasks`] and selects on
//! [`App::stop_token`], and `serve` awaits them all (and the broker pools' closes)
//! within `server.shutdown_grace_s` before it returns.

pub mod api;
pub mod auth;
pub mod broker;
pub mod cloudevents;
pub mod config;
pub mod delivery;
pub mod error;
pub mod idempotency;
mod idle;
pub mod ids;
mod linger;
pub mod otel;
pub mod publishing;
pub mod pull;
pub mod push;
pub mod rpc;
pub mod schedule;
mod sse_conn;
pub mod telemetry;
pub mod tenancy;
pub mod tls;
pub mod topology;
pub mod ws;

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Verifier;
use crate::config::{Config, Resolved};
use crate::idempotency::{Idempotency, Store};
use crate::tenancy::Tenants;

/// Everything a request needs, built once at start.
pub struct App {
    pub config: Config,
    pub resolved: Resolved,
    pub verifier: Verifier,
    pub tenants: Tenants,
    pub idempotency: Idempotency,
    pub live: delivery::live::LiveHub,
    pub sockets: ws::Sockets,
    /// `topology.apply_on_start`: what `/readyz` reports about it.
    pub topology: Arc<topology::startup::Startup>,
    /// Open server-sent event streams per tenant (`GET /v1/events`).
    pub sse: api::sse::SseConnections,
    /// Stream subscriptions held at once (`streams.max_subscriptions`).
    pub stream_slots: delivery::stream::StreamSlots,
    /// `server.max_concurrent_requests`: the `/v1` requests being worked on.
    pub work_slots: Arc<tokio::sync::Semaphore>,
    /// `server.max_waiting_requests`: requests waiting on something else than Warren.
    pub waiting: WaitingSlots,
    /// Push subscriptions running on this replica (SPEC §13).
    pub push: push::Pushes,
    /// Pull consume with leases (SPEC §14).
    pub pull: Arc<pull::Pull>,
    shutdown: watch::Sender<bool>,
    shutting_down: AtomicBool,
    in_flight: AtomicUsize,
    /// Every background task the app starts; shutdown waits for them.
    tasks: TaskTracker,
    /// Cancelled when shutdown begins; every background task selects on it.
    stop: CancellationToken,
}

/// Shared handle to the [`App`], the axum state.
#[derive(Clone)]
pub struct AppState(pub Arc<App>);

impl Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

impl App {
    /// Validates the config and starts connecting to the broker (in the background).
    pub async fn start(config: Config) -> anyhow::Result<AppState> {
        let resolved = config.resolve()?;
        for warning in config.warnings() {
            warn!(%warning, "Config warning (warren check-config shows it too).");
        }
        telemetry::prometheus();
        telemetry::poison_reasons(broker::poison::Reason::ALL.map(broker::poison::Reason::as_str));
        let verifier = Verifier::start(
            &config.auth,
            &resolved.token_keys,
            config.auth.token_cache_entries,
        )
        .await?;
        let store = Store::connect(&config.idempotency, config.tenants.len()).await?;
        let push_client = push::Pushes::client(&resolved, &config.push)
            .context("cannot set up the push client")?;
        let receipt_key = pull_receipt_key(&config, &resolved)?;
        let relay = match config.idempotency.store {
            config::StoreKind::Redis => Some(pull::relay::RelayConfig {
                client: redis::Client::open(config.idempotency.redis_url.as_str())
                    .context("idempotency.redis_url")?,
                prefix: config.idempotency.key_prefix.clone(),
                timeout: Duration::from_millis(config.pull.relay_timeout_ms),
            }),
            config::StoreKind::Memory => None,
        };
        // The pools start connecting at once, so nothing after them may fail: a start
        // that gave up would leave connection attempts running as the runtime goes.
        let tenants =
            Tenants::start(&resolved, &config.amqp).context("cannot set up the broker pools")?;
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        if let Some(dynamic) = &resolved.dynamic {
            spawn_idle_pool_closer(&tasks, &stop, &tenants, dynamic.pool_idle);
        }
        let idempotency = Idempotency::new(store, &config.idempotency);
        let startup = Arc::new(topology::startup::Startup::default());
        if config.topology.apply_on_start {
            let tenants = resolved.tenants.values().cloned().collect();
            startup.spawn(&tasks, stop.clone(), config.amqp.clone(), tenants);
        }
        let pull = pull::Pull::new(config.pull.clone(), receipt_key, relay, &tasks, &stop);
        let push = push::Pushes::start(
            &resolved,
            &config.push,
            push_client,
            &tenants,
            &tasks,
            &stop,
        );
        schedule::start(&tenants, &config.schedule, &tasks, &stop);
        let stream_slots = delivery::stream::StreamSlots::new(
            config.streams.max_subscriptions,
            config.streams.tenant_share(),
        );
        let work_slots = Arc::new(tokio::sync::Semaphore::new(
            config.server.max_concurrent_requests,
        ));
        let waiting = WaitingSlots {
            slots: Arc::new(tokio::sync::Semaphore::new(
                config.server.max_waiting_requests,
            )),
            max: config.server.max_waiting_requests,
        };
        Ok(AppState(Arc::new(App {
            config,
            resolved,
            verifier,
            tenants,
            idempotency,
            live: delivery::live::LiveHub::default(),
            sockets: ws::Sockets::default(),
            topology: startup,
            sse: api::sse::SseConnections::default(),
            stream_slots,
            work_slots,
            waiting,
            push,
            pull,
            shutdown: watch::channel(false).0,
            shutting_down: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            tasks,
            stop,
        })))
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Fires when shutdown begins (WebSocket sessions close with 1001 on it).
    pub fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// HTTP requests being served right now (what a shutdown has to drain).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a request in flight until the returned guard drops.
    pub fn track_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// The app's background tasks: spawn on this so shutdown waits for the task.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Cancelled when shutdown begins; a background task ends when it fires.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Starts the shutdown: readiness goes red, sessions and tasks are told to stop.
    fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.shutdown.send_replace(true);
        self.stop.cancel();
    }
}

/// The key pull receipts are sealed with: `pull.receipt_secret`, else derived from the
/// token signing secret (shared by replicas), else random for this process (one
/// replica only; check-config warns when several could share a Redis).
fn pull_receipt_key(config: &Config, resolved: &Resolved) -> anyhow::Result<pull::ReceiptKey> {
    let key = match config.pull.receipt_key_material()? {
        Some(material) => pull::ReceiptKey::derive(&material),
        None => match &resolved.signing_secret {
            Some(secret) => pull::ReceiptKey::derive(secret.secret()),
            None => pull::ReceiptKey::random(),
        },
    };
    key.map_err(|e| anyhow::anyhow!("cannot make the pull receipt key: {e}"))
}

/// Closes idle dynamic-tenant pools in the background, until shutdown (or the app is
/// gone).
fn spawn_idle_pool_closer(
    tasks: &TaskTracker,
    stop: &CancellationToken,
    tenants: &Tenants,
    idle: Duration,
) {
    let pools = Arc::downgrade(tenants.pools_handle());
    let every = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let stop = stop.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            match pools.upgrade() {
                Some(pools) => pools.close_idle(),
                None => return,
            }
        }
    });
}

/// Requests that wait on something other than Warren's own work (request/reply for its
/// reply, a pull receive for messages) hold no `server.max_concurrent_requests` slot
/// while they wait: one tenant holding thousands of them would otherwise hold every
/// slot and stall every other tenant's publishes (issue #27). Instead, each one holds
/// a waiting slot: one of the gateway's `server.max_waiting_requests` and one of its
/// tenant's `limits.max_waiting_requests`, taken without waiting (429 when either is
/// used up).
pub struct WaitingSlots {
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
}

/// One waiting request; both slots go back when dropped.
pub struct Waiting {
    _gateway: tokio::sync::OwnedSemaphorePermit,
    _tenant: tokio::sync::OwnedSemaphorePermit,
}

impl WaitingSlots {
    pub fn admit(&self, tenant: &tenancy::Tenant) -> Result<Waiting, error::ApiError> {
        let tenant = tenant.quota.admit_waiting()?;
        let gateway = self.slots.clone().try_acquire_owned().map_err(|_| {
            error::ApiError::RateLimited {
                detail: "the gateway holds as many waiting requests as it allows (server.max_waiting_requests)".to_owned(),
                retry_after: Duration::from_secs(1),
            }
        })?;
        Ok(Waiting {
            _gateway: gateway,
            _tenant: tenant,
        })
    }

    /// Requests waiting right now, across every tenant.
    pub fn in_use(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }
}

/// Marks one request in flight; see [`App::track_request`].
pub struct InFlight(Arc<App>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `state` on `listener` (and metrics on `metrics_listener`) until `shutdown`
/// resolves. Then, within `server.shutdown_grace_s` of the signal: stop accepting, let
/// in-flight requests and WebSocket sessions finish, close the broker pools (awaiting
/// each connection's close), and await every background task the app started.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = Duration::from_secs(state.config.server.shutdown_grace_s);
    let stop = state.stop_token();
    let signal_state = state.clone();
    state.tasks.spawn(async move {
        tokio::select! {
            () = shutdown => signal_state.begin_shutdown(),
            // `serve` failed and cancelled the token itself.
            () = signal_state.stop.cancelled() => {}
        }
    });

    if let Some(metrics_listener) = metrics_listener {
        let app = api::metrics_router(state.clone());
        let stop = stop.clone();
        state.tasks.spawn(async move {
            let served = axum::serve(metrics_listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                warn!(%error, "Metrics listener failed.");
            }
        });
    }

    let app = api::router(state.clone());
    let timeouts = ConnTimeouts {
        header_read: Duration::from_secs(state.config.server.header_read_timeout_s),
        event_write: Duration::from_millis(state.config.sse.slow_reader_timeout_ms),
    };
    let server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
        match &state.config.server.tls {
            Some(tls) => {
                let listener = tls::TlsListener::start(
                    listener,
                    tls.cert_file.clone(),
                    tls.key_file.clone(),
                    Duration::from_secs(tls.reload_s),
                    &state.tasks,
                    stop.clone(),
                );
                let listener = match listener {
                    Ok(listener) => listener,
                    Err(error) => {
                        stop.cancel();
                        return Err(std::io::Error::other(error));
                    }
                };
                Box::pin(serve_http(
                    listener,
                    app,
                    stop.clone().cancelled_owned(),
                    timeouts,
                ))
            }
            None => Box::pin(serve_http(
                axum::serve::ListenerExt::tap_io(listener, |tcp: &mut TcpStream| no_delay(tcp)),
                app,
                stop.clone().cancelled_owned(),
                timeouts,
            )),
        };
    let sockets_state = state.clone();
    let drained = async move {
        let served = server.await;
        // Upgraded WebSockets are not hyper's connections any more: wait for their
        // sessions to close (they do so with 1001 on the shutdown signal).
        sockets_state.sockets.all_closed().await;
        served
    };
    let mut drained = std::pin::pin!(drained);
    let result = tokio::select! {
        served = &mut drained => served,
        () = stop.cancelled() => {
            info!(
                grace_s = grace.as_secs(),
                in_flight = state.in_flight(),
                "Shutting down: draining in-flight requests."
            );
            let deadline = Instant::now() + grace;
            let result = match tokio::time::timeout_at(deadline, drained).await {
                Ok(served) => served,
                Err(_) => {
                    warn!("Shutdown grace period expired with requests still in flight.");
                    Ok(())
                }
            };
            stop_background(&state, deadline).await;
            info!("Stopped.");
            return result;
        }
    };
    // The server ended by itself (an error): still stop and await everything.
    stop.cancel();
    stop_background(&state, Instant::now() + grace).await;
    result
}

/// The least time broker closes get when the drain used up the whole grace period:
/// closing a connection is one round trip, and an unclosed one lingers on the broker.
const CLOSE_FLOOR: Duration = Duration::from_secs(1);

/// Closes the broker pools and awaits every background task, until `deadline` (but
/// at least [`CLOSE_FLOOR`] for the pools).
async fn stop_background(state: &App, deadline: Instant) {
    let close_by = deadline.max(Instant::now() + CLOSE_FLOOR);
    if tokio::time::timeout_at(close_by, state.tenants.close())
        .await
        .is_err()
    {
        warn!("Shutdown grace period expired while closing broker connections.");
    }
    state.tasks.close();
    if tokio::time::timeout_at(close_by, state.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = state.tasks.len(),
            "Shutdown grace period expired with background tasks still running."
        );
    }
}

/// The time limits of one client connection.
#[derive(Clone, Copy)]
struct ConnTimeouts {
    /// A request head (and an idle connection) gets this long.
    header_read: Duration,
    /// An event stream's write may take this long (`sse.slow_reader_timeout_ms`).
    event_write: Duration,
}

/// Every accepted connection is written without Nagle's delay: a WebSocket frame or
/// server-sent event written while the peer still delays its ACK of the previous one
/// would otherwise wait for that ACK (up to 40 ms on Linux) before it leaves.
pub(crate) fn no_delay(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "Cannot set TCP_NODELAY on an accepted connection.");
    }
}

/// How long open connections keep serving after the listener closed on shutdown.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(250);

/// Serves `app` on `listener` like `axum::serve(..).with_graceful_shutdown(..)`, plus
/// an HTTP/1 header read timeout, which `axum::serve` does not expose (hyper only
/// applies one when a timer is set): a connection that does not deliver a request's
/// headers in time (slowloris) is closed instead of held forever, and so is one that
/// is idle that long (nothing in flight, no byte moved; see [`idle`]).
/// On `stop` the listener closes, each connection finishes its request and closes,
/// and this returns once all have. A connection that opens with `GET /v1/events` is
/// served by [`sse_conn`] instead of hyper.
async fn serve_http<L>(
    mut listener: L,
    app: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
    timeouts: ConnTimeouts,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    // `stopping` tells connections to wind down; every connection task holds a
    // `done` receiver, so `done_tx.closed()` resolves when the last one has ended.
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(());
    let mut stop = std::pin::pin!(stop);
    loop {
        // Stop first: once shutdown has begun, a connection waiting in the backlog is
        // refused, never served. (Unbiased, `select!` could pick it when both are
        // ready, e.g. a WebSocket client reconnecting after its 1001 close, and that
        // client would connect to a gateway that is going away.)
        let (io, _) = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let activity = idle::Activity::new();
        let service = idle::Serve::new(app.clone(), activity.clone());
        let mut stopping = stopping_rx.clone();
        let done = done_rx.clone();
        let events_app = app.clone();
        let ConnTimeouts {
            header_read: header_read_timeout,
            event_write,
        } = timeouts;
        tokio::spawn(async move {
            let io = idle::Watched::new(linger::Lingering::new(io), activity.clone());
            // The first request's start decides who serves the connection; a connection
            // that has sent nothing when shutdown comes is closed, as hyper closes idle ones.
            let opening = tokio::select! {
                opening = sse_conn::sniff(io, header_read_timeout) => opening,
                _ = stopping.wait_for(|stop| *stop) => sse_conn::Opening::Gone,
            };
            let io = match opening {
                sse_conn::Opening::Events(io, request) => {
                    let in_flight = activity.request();
                    sse_conn::serve(io, *request, events_app, event_write).await;
                    drop(in_flight);
                    drop(done);
                    return;
                }
                sse_conn::Opening::Other(io) => io,
                sse_conn::Opening::Gone => {
                    drop(done);
                    return;
                }
            };
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let mut connection =
                std::pin::pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
            let mut signalled = false;
            let check = tokio::time::sleep(header_read_timeout);
            let mut check = std::pin::pin!(check);
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::trace!(%error, "Connection ended with an error.");
                        }
                        break;
                    }
                    _ = stopping.wait_for(|stop| *stop), if !signalled => {
                        signalled = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    () = check.as_mut() => {
                        // Idle: nothing in flight and no byte for the timeout (a new
                        // connection that never sends, or a keep-alive one nobody uses).
                        let now = tokio::time::Instant::now();
                        match activity.idle_deadline(header_read_timeout) {
                            Some(deadline) if deadline <= now => {
                                tracing::debug!("Closing an idle connection.");
                                break;
                            }
                            Some(deadline) => check.as_mut().reset(deadline),
                            None => check.as_mut().reset(now + header_read_timeout),
                        }
                    }
                }
            }
            drop(done);
        });
    }
    drop(listener);
    // Keep-alive connections go on serving for a moment first: a request a client sent
    // just before the signal may still be on the wire, and closing its idle-looking
    // connection now would lose it (the client sees the connection close, no answer).
    tokio::time::sleep(SHUTDOWN_LINGER).await;
    stopping_tx.send_replace(true);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// The configured listeners, bound before anything else starts: a port already in use
/// ends `warren serve` with one line and nothing to tear down.
pub struct Listeners {
    listener: TcpListener,
    metrics: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(server: &config::ServerConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(server.listen)
            .await
            .with_context(|| format!("cannot listen on {} (server.listen)", server.listen))?;
        let metrics = match server.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (server.metrics_listen)"))?,
            ),
            None => None,
        };
        Ok(Self { listener, metrics })
    }
}

/// Serves `state` on `listeners` until SIGTERM or Ctrl-C.
pub async fn run(state: AppState, listeners: Listeners) -> anyhow::Result<()> {
    let signal = shutdown_signal();
    info!(listen = %listeners.listener.local_addr()?, "Warren is listening.");
    serve(state, listeners.listener, listeners.metrics, signal).await?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not
/// when the future is first polled, so a signal right after start is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    warn!("Cannot install signal handlers; stop Warren by killing it.");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
