//! AMQP for one vhost: a connection pool, a pool of confirm-mode channels, an in-flight
//! bound, a supervisor that reconnects with backoff, and the publish/confirm path.

mod channel;
mod connection;
pub mod health;
pub mod poison;
pub mod publish;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use deadpool::managed::{self, PoolError, Timeouts};
use futures::future::join_all;
use lapin::ExchangeKind;
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::config::AmqpConfig;
use crate::telemetry;
use channel::{ChannelManager, Outcome, Tracked, confirm_future, return_key};
use connection::{Connections, Connector};
pub use health::{Health, HealthReport};
use publish::{AmqpFailure, classify};
pub use publish::{OutgoingMessage, PublishError, PublishResult, Published};

pub type ChannelPool = managed::Pool<ChannelManager>;

/// Internal broker-layer failures; never shown to clients as such.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Pool(String),
    #[error("no open connection to the broker")]
    NotConnected,
    #[error("every pooled channel stayed busy")]
    PoolExhausted,
}

impl BrokerError {
    fn from_pool(error: PoolError<BrokerError>) -> Self {
        match error {
            PoolError::Backend(e) => e,
            PoolError::Timeout(deadpool::managed::TimeoutType::Wait) => Self::PoolExhausted,
            PoolError::Timeout(_) => Self::Timeout("opening a channel"),
            other => Self::Pool(other.to_string()),
        }
    }
}

/// The `message_id` a publish carries (Warren always sets one).
fn message_id(message: &OutgoingMessage) -> &str {
    message
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
        .unwrap_or_default()
}

/// How often a healthy link is re-checked, so readiness follows reality even when idle.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Broker {
    vhost: String,
    health: Arc<Health>,
    connector: Connector,
    connections: Arc<Connections>,
    channels: ChannelPool,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    confirm_timeout: Duration,
    acquire_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    exchange_ttl: Duration,
    exchange_cache_max: usize,
    exchanges: Mutex<HashMap<String, Instant>>,
    /// Consumer channels open on this vhost (`amqp.max_consumer_channels`).
    consumers: Arc<Semaphore>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// Long-lived users (WebSocket consumers) that keep an idle pool from being closed.
    holds: Arc<std::sync::atomic::AtomicUsize>,
    metrics: bool,
}

/// A pool in use: derefs to the [`Broker`] and keeps it from being closed as idle.
pub struct BrokerLease {
    broker: Arc<Broker>,
    _hold: BrokerHold,
}

impl BrokerLease {
    pub fn new(broker: Arc<Broker>) -> Self {
        let hold = broker.hold();
        Self {
            broker,
            _hold: hold,
        }
    }
}

impl std::ops::Deref for BrokerLease {
    type Target = Broker;
    fn deref(&self) -> &Broker {
        &self.broker
    }
}

/// Keeps a broker pool open while held; see [`Broker::hold`].
pub struct BrokerHold(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for BrokerHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A consumer's own channel; counts against `amqp.max_consumer_channels` until dropped.
pub struct ConsumerChannel {
    channel: lapin::Channel,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for ConsumerChannel {
    type Target = lapin::Channel;
    fn deref(&self) -> &lapin::Channel {
        &self.channel
    }
}

/// Pool sizes and use, read at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    pub connections: usize,
    pub channels_open: usize,
    pub channels_idle: usize,
    pub inflight_confirms: usize,
}

impl Broker {
    /// Builds the pools for `vhost` and starts the supervisor, which connects in the
    /// background; until then publishes answer 503.
    /// `metrics`: export per-vhost series (only for configured tenants' vhosts, so the
    /// label set stays bounded).
    pub fn start(
        urls: &[String],
        vhost: &str,
        amqp: &AmqpConfig,
        metrics: bool,
    ) -> Result<Arc<Self>, BrokerError> {
        let health = Arc::new(Health::new(vhost, metrics));
        if metrics {
            telemetry::broker_registered(vhost);
        }
        let connect_timeout = Duration::from_millis(amqp.connect_timeout_ms);
        let acquire_timeout = Duration::from_millis(amqp.acquire_timeout_ms);
        let connections = Arc::new(Connections::new(amqp.connections_per_vhost));
        let connector = Connector::new(urls, vhost, amqp, health.clone(), connections.clone())?;
        let channels = managed::Pool::builder(ChannelManager::new(connections.clone()))
            .max_size(amqp.channels_per_vhost)
            .timeouts(Timeouts {
                wait: Some(acquire_timeout),
                create: Some(connect_timeout),
                recycle: Some(connect_timeout),
            })
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| BrokerError::Config(e.to_string()))?;
        let broker = Arc::new(Self {
            vhost: vhost.to_owned(),
            health,
            connector,
            connections,
            channels,
            inflight: Arc::new(Semaphore::new(amqp.max_inflight_confirms)),
            max_inflight: amqp.max_inflight_confirms,
            confirm_timeout: amqp.confirm_timeout(),
            acquire_timeout,
            backoff_min: Duration::from_millis(amqp.reconnect_backoff_min_ms),
            backoff_max: Duration::from_millis(amqp.reconnect_backoff_max_ms),
            exchange_ttl: Duration::from_secs(amqp.exchange_cache_ttl_s),
            exchange_cache_max: amqp.exchange_cache_max_entries,
            exchanges: Mutex::new(HashMap::new()),
            consumers: Arc::new(Semaphore::new(amqp.max_consumer_channels)),
            supervisor: Mutex::new(None),
            holds: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            metrics,
        });
        let handle = tokio::spawn(supervise(Arc::downgrade(&broker)));
        *broker.supervisor.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(broker)
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Marks a long-lived user of this pool (a consumer) until the guard drops.
    pub fn hold(&self) -> BrokerHold {
        self.holds.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        BrokerHold(self.holds.clone())
    }

    /// Nothing in flight and nobody holding it: safe to close.
    pub fn is_idle(&self) -> bool {
        self.holds.load(std::sync::atomic::Ordering::Acquire) == 0
            && self.inflight.available_permits() == self.max_inflight
    }

    /// Whether this pool exports per-vhost metrics.
    pub fn has_metrics(&self) -> bool {
        self.metrics
    }

    pub fn stats(&self) -> PoolStats {
        let channels = self.channels.status();
        PoolStats {
            connections: self.connections.len(),
            channels_open: channels.size,
            channels_idle: channels.available,
            inflight_confirms: self
                .max_inflight
                .saturating_sub(self.inflight.available_permits()),
        }
    }

    /// Stops reconnecting and closes every pooled channel and connection.
    pub fn close(&self) {
        self.health
            .mark_closed("the pool was closed (shutdown, or an idle dynamic tenant)");
        if let Some(handle) = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            handle.abort();
        }
        self.channels.close();
        for connection in self.connections.drain() {
            tokio::spawn(async move {
                let _ = connection.close(200, "warren shutting down".into()).await;
            });
        }
    }

    /// A fresh channel for consuming (not from the publish pool, not in confirm mode).
    /// The caller owns it and closes it; closing requeues its unacked deliveries. At
    /// most `amqp.max_consumer_channels` are open at once on a vhost, so consumers can
    /// never take the channels the publish pool needs.
    pub async fn consumer_channel(&self) -> Result<ConsumerChannel, PublishError> {
        if let Err(unavailable) = self.health.check() {
            return Err(PublishError::unavailable(
                unavailable.reason,
                unavailable.retry_after,
            ));
        }
        let Ok(permit) = self.consumers.clone().try_acquire_owned() else {
            return Err(PublishError::unavailable(
                "this vhost has as many subscriptions open as the gateway allows (amqp.max_consumer_channels)",
                Duration::from_secs(5),
            ));
        };
        let Some(connection) = self.connections.pick() else {
            return Err(self.acquire_failed(&BrokerError::NotConnected));
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|error| self.failure(&error, ""))?;
        Ok(ConsumerChannel {
            channel,
            _permit: permit,
        })
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: &OutgoingMessage) -> PublishResult {
        self.publish_all(std::slice::from_ref(message))
            .await
            .pop()
            .unwrap_or_else(|| Err(PublishError::LostBeforeConfirm("no result".to_owned())))
    }

    /// Publishes `messages` pipelined on one pooled channel, then waits for all
    /// confirms together. Results are in input order.
    #[tracing::instrument(name = "publish", skip_all, fields(vhost = %self.vhost, messages = messages.len()))]
    pub async fn publish_all(&self, messages: &[OutgoingMessage]) -> Vec<PublishResult> {
        if let Err(unavailable) = self.health.check() {
            let error = PublishError::unavailable(unavailable.reason, unavailable.retry_after);
            return vec![Err(error); messages.len()];
        }
        let mut results: Vec<Option<PublishResult>> = vec![None; messages.len()];
        self.check_exchanges(messages, &mut results).await;

        let acquire_deadline = tokio::time::Instant::now() + self.acquire_timeout;
        let mut pending: Vec<Pending> = Vec::with_capacity(messages.len());
        let mut channel: Option<managed::Object<ChannelManager>> = None;
        for (index, message) in messages.iter().enumerate() {
            if results[index].is_some() {
                continue;
            }
            let permit = match tokio::time::timeout_at(
                acquire_deadline,
                self.inflight.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(permit)) => permit,
                _ => {
                    results[index] = Some(Err(PublishError::unavailable(
                        format!(
                            "{} publishes are already awaiting broker confirms on this vhost (amqp.max_inflight_confirms)",
                            self.max_inflight
                        ),
                        Duration::from_secs(1),
                    )));
                    continue;
                }
            };
            // The in-flight slot and the channel share one acquisition deadline, so a
            // publish waits at most acquire_timeout_ms + confirm_timeout_ms in all
            // (the pool's own wait and create timeouts would otherwise add up).
            let ch = match channel.take() {
                Some(ch) => ch,
                None => {
                    match tokio::time::timeout_at(acquire_deadline, self.channels.get()).await {
                        Ok(Ok(ch)) => ch,
                        Ok(Err(error)) => {
                            let error = BrokerError::from_pool(error);
                            results[index] = Some(Err(self.acquire_failed(&error)));
                            continue;
                        }
                        Err(_) => {
                            results[index] = Some(Err(PublishError::unavailable(
                                "no broker channel became available within amqp.acquire_timeout_ms",
                                Duration::from_secs(1),
                            )));
                            continue;
                        }
                    }
                }
            };
            let started = Instant::now();
            // basic_publish registers the confirm and queues the frames on its first
            // poll; only the write itself is awaited after that. So the pooled channel
            // is needed for one poll, and the confirm goes to the channel's sequencer
            // (in publish order, which is why the channel is still held while sending).
            let lapin_channel = ch.channel.clone();
            let on_channel = lapin_channel.clone();
            let (exchange, routing_key) = (message.exchange.clone(), message.routing_key.clone());
            let (body, properties) = (message.body.clone(), message.properties.clone());
            let options = BasicPublishOptions {
                mandatory: message.mandatory,
                immediate: false,
            };
            let mut write = Box::pin(async move {
                on_channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        options,
                        &body,
                        properties,
                    )
                    .await
            });
            let first = futures::poll!(write.as_mut());
            let confirm = match first {
                std::task::Poll::Ready(Err(error)) => {
                    // Refused before anything was queued: nothing was published.
                    let _ = managed::Object::take(ch);
                    results[index] = Some(Err(self.failure(&error, &message.exchange)));
                    continue;
                }
                std::task::Poll::Ready(Ok(confirm)) => {
                    confirm_future(std::future::ready(Ok(confirm)))
                }
                std::task::Poll::Pending => confirm_future(write),
            };
            let (reply, outcome) = oneshot::channel();
            let key = return_key(message_id(message), &message.exchange, &message.routing_key);
            if ch
                .sequencer
                .send(Tracked {
                    key,
                    confirm,
                    reply,
                })
                .is_err()
            {
                let _ = managed::Object::take(ch);
                results[index] = Some(Err(PublishError::LostBeforeConfirm(
                    "the channel's confirm tracking stopped".to_owned(),
                )));
                continue;
            }
            pending.push(Pending {
                index,
                outcome,
                _permit: permit,
                channel: lapin_channel,
                started,
            });
            channel = Some(ch);
        }
        // Back to the pool before awaiting writes and confirms: others publish on it.
        drop(channel);

        let confirm_deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let confirmed = join_all(pending.into_iter().map(|p| {
            let message = &messages[p.index];
            async move {
                let result = match tokio::time::timeout_at(confirm_deadline, p.outcome).await {
                    Ok(Ok((outcome, _))) => self.judge(outcome, message),
                    Ok(Err(_)) => Err(PublishError::LostBeforeConfirm(
                        "the channel's confirm tracking stopped".to_owned(),
                    )),
                    Err(_) => {
                        // The channel is suspect: close it so the pool replaces it and
                        // lapin drops its bookkeeping for this message.
                        let channel = p.channel;
                        tokio::spawn(async move {
                            let _ = channel.close(200, "confirm timeout".into()).await;
                        });
                        Err(PublishError::ConfirmTimeout(self.confirm_timeout))
                    }
                };
                telemetry::confirm_latency(p.started.elapsed());
                (p.index, result)
            }
        }))
        .await;
        for (index, result) in confirmed {
            results[index] = Some(result);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(PublishError::LostBeforeConfirm("not attempted".into())))
            })
            .collect()
    }

    /// The answer for one message from what its channel's sequencer saw.
    fn judge(&self, outcome: Outcome, message: &OutgoingMessage) -> PublishResult {
        match outcome {
            Outcome::Acked => Ok(Published {
                routed: message.mandatory,
            }),
            Outcome::Returned(reply_text) => Err(PublishError::Unroutable(reply_text)),
            Outcome::Nacked => Err(PublishError::Rejected),
            Outcome::NotConfirmed => Err(PublishError::LostBeforeConfirm(
                "channel was not in confirm mode".to_owned(),
            )),
            Outcome::Failed(error) => Err(self.failure(&error, &message.exchange)),
        }
    }

    /// Makes sure each exchange exists before publishing, so a typo costs a cached
    /// lookup rather than a channel (the broker closes a channel on a missing exchange,
    /// failing every confirm pending on it).
    async fn check_exchanges(
        &self,
        messages: &[OutgoingMessage],
        results: &mut [Option<PublishResult>],
    ) {
        let mut checked: HashMap<&str, Result<(), PublishError>> = HashMap::new();
        for (index, message) in messages.iter().enumerate() {
            let exchange = message.exchange.as_str();
            if !checked.contains_key(exchange) {
                let outcome = self.ensure_exchange(exchange).await;
                checked.insert(exchange, outcome);
            }
            if let Some(Err(error)) = checked.get(exchange) {
                results[index] = Some(Err(error.clone()));
            }
        }
    }

    async fn ensure_exchange(&self, exchange: &str) -> Result<(), PublishError> {
        if exchange.is_empty() {
            return Ok(()); // the default exchange always exists
        }
        {
            let cache = self.exchanges.lock().unwrap_or_else(|e| e.into_inner());
            if cache
                .get(exchange)
                .is_some_and(|checked| checked.elapsed() < self.exchange_ttl)
            {
                return Ok(());
            }
        }
        let check = async {
            let connection = self.connections.pick().ok_or(BrokerError::NotConnected)?;
            let channel = connection.create_channel().await?;
            drop(connection);
            let declared = channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if declared.is_ok() {
                tokio::spawn(async move {
                    let _ = channel.close(200, "OK".into()).await;
                });
            }
            declared.map_err(BrokerError::Amqp)
        };
        match tokio::time::timeout(self.confirm_timeout, check).await {
            Ok(Ok(())) => {
                let mut cache = self.exchanges.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= self.exchange_cache_max {
                    let ttl = self.exchange_ttl;
                    cache.retain(|_, checked| checked.elapsed() < ttl);
                    if cache.len() >= self.exchange_cache_max {
                        cache.clear();
                    }
                }
                cache.insert(exchange.to_owned(), Instant::now());
                Ok(())
            }
            Ok(Err(BrokerError::Amqp(error))) if publish::is_not_found(&error) => {
                Err(PublishError::ExchangeNotFound(exchange.to_owned()))
            }
            Ok(Err(BrokerError::Amqp(error))) => Err(self.failure(&error, exchange)),
            Ok(Err(error)) => Err(self.acquire_failed(&error)),
            Err(_) => Err(PublishError::unavailable(
                "the broker did not answer an exchange check in time",
                Duration::from_secs(1),
            )),
        }
    }

    /// No channel could be had: the link is down (or the pool is exhausted).
    fn acquire_failed(&self, error: &BrokerError) -> PublishError {
        match error {
            BrokerError::PoolExhausted => PublishError::unavailable(
                "all broker channels are busy (amqp.channels_per_vhost)",
                Duration::from_secs(1),
            ),
            _ => {
                self.health.mark_down(&error.to_string());
                match self.health.check() {
                    Err(u) => PublishError::unavailable(u.reason, u.retry_after),
                    Ok(()) => PublishError::unavailable(error.to_string(), Duration::from_secs(1)),
                }
            }
        }
    }

    /// Maps an AMQP error seen while working with `exchange` to an outcome, and takes
    /// the link down when the connection itself is gone.
    pub fn failure(&self, error: &lapin::Error, exchange: &str) -> PublishError {
        match classify(error, exchange) {
            AmqpFailure::ExchangeNotFound => {
                self.exchanges
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(exchange);
                PublishError::ExchangeNotFound(exchange.to_owned())
            }
            AmqpFailure::AccessRefused(detail) => {
                tracing::info!(vhost = %self.vhost, %detail, "The broker refused access.");
                PublishError::AccessRefused(detail)
            }
            AmqpFailure::Lost { connection, detail } => {
                if connection {
                    self.health.mark_down(&detail);
                } else {
                    tracing::info!(vhost = %self.vhost, %detail, "The broker closed a channel.");
                }
                PublishError::LostBeforeConfirm(detail)
            }
        }
    }

    /// One probe: drop dead connections and open missing ones. Up while at least one
    /// connection is; the error of the last failed attempt otherwise.
    async fn probe(&self) -> Result<(), BrokerError> {
        let mut live = self.connections.prune();
        let mut last_error = None;
        while live < self.connections.target {
            match self.connector.connect().await {
                Ok(connection) => {
                    self.connections.add(connection);
                    live += 1;
                }
                Err(error) => {
                    last_error = Some(error);
                    break;
                }
            }
        }
        match (live, last_error) {
            (0, Some(error)) => Err(error),
            (0, None) => Err(BrokerError::NotConnected),
            _ => Ok(()),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_min
            .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
            .min(self.backoff_max);
        // Equal jitter: half fixed, half random, so replicas don't reconnect in lockstep.
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

struct Pending {
    index: usize,
    outcome: oneshot::Receiver<(Outcome, Instant)>,
    _permit: OwnedSemaphorePermit,
    channel: lapin::Channel,
    started: Instant,
}

/// Keeps the link up: probes while healthy, reconnects with backoff while not.
async fn supervise(broker: Weak<Broker>) {
    let mut attempt: u32 = 0;
    let mut ever_connected = false;
    loop {
        let Some(b) = broker.upgrade() else { return };
        match b.probe().await {
            Ok(()) => {
                if ever_connected && !b.health.is_connected() && b.metrics {
                    telemetry::broker_reconnected(&b.vhost);
                }
                ever_connected = true;
                attempt = 0;
                b.health.mark_up();
                let health = b.health.clone();
                drop(b);
                tokio::select! {
                    _ = health.kick.notified() => {}
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                }
            }
            Err(error) => {
                b.health.mark_down(&error.to_string());
                let delay = b.backoff(attempt);
                attempt = attempt.saturating_add(1);
                b.health.schedule_retry(Instant::now() + delay);
                debug!(vhost = %b.vhost, ?delay, %error, "Broker reconnect scheduled.");
                if attempt == 1 {
                    warn!(vhost = %b.vhost, %error, "Cannot reach the broker; retrying with backoff.");
                }
                drop(b);
                tokio::time::sleep(delay).await;
            }
        }
    }
}
