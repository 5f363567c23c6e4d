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
pub mod edge;
pub mod error;
pub mod idempotency;
pub mod ids;
pub mod otel;
pub mod publishing;
pub mod pull;
pub mod push;
pub mod rfc3339;
pub mod rpc;
pub mod schedule;
pub mod telemetry;
pub mod tenancy;
pub mod topology;
pub mod wire;
pub mod ws;

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::auth::Verifier;
use crate::config::{Config, Resolved};
use crate::idempotency::{Idempotency, Store};
use crate::tenancy::Tenants;
pub use edge::{Listeners, run, serve, shutdown_signal};

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
