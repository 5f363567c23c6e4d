//! AMQP for one vhost: the [`Broker`] that owns a connection pool, a pool of
//! confirm-mode channels, an in-flight bound, a supervisor that reconnects with
//! backoff, and every background task it starts (closed and awaited by
//! [`Broker::close`]).
//!
//! Layout: `connection` (connections, failover, watcher), `channel` (channel pool and
//! confirm sequencer), `pipeline` (publish/confirm), `exchanges` (exchange cache),
//! `publish` (outcomes), `rpc` (request/reply over direct reply-to), `health`, `poison`,
//! `error`.

mod channel;
mod connection;
mod error;
mod exchanges;
pub mod health;
mod pipeline;
pub mod poison;
pub mod publish;
mod rpc;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Timeouts};
use futures::future::join_all;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::AmqpConfig;
use crate::telemetry;
use channel::ChannelManager;
pub use connection::connect_once;
use connection::{Connections, Connector};
pub use error::BrokerError;
use exchanges::ExchangeCache;
pub use health::{Health, HealthReport};
use publish::{AmqpFailure, classify};
pub use publish::{DIRECT_REPLY_TO, OutgoingMessage, PublishError, PublishResult, Published};
pub use rpc::{Reply, RpcError, RpcSettings};

pub type ChannelPool = managed::Pool<ChannelManager>;

/// How long [`Broker::close`] waits for consumer channels to be released.
const CONSUMERS_CLOSE_WAIT: Duration = Duration::from_secs(2);

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
    exchanges: ExchangeCache,
    /// The largest body the broker accepts (`amqp.max_message_bytes`).
    max_message_bytes: usize,
    /// The largest body a consumer channel keeps (`amqp.max_delivery_bytes`).
    max_delivery_bytes: u64,
    /// Consumer channels open on this vhost (`amqp.max_consumer_channels`).
    consumers: Arc<Semaphore>,
    max_consumers: u32,
    /// The supervisor, connection watchers, confirm sequencers and channel closes.
    tasks: TaskTracker,
    /// Cancelled by [`Broker::close`]: the supervisor and the watchers end on it.
    stop: CancellationToken,
    /// Long-lived users (WebSocket consumers) that keep an idle pool from being closed.
    holds: Arc<std::sync::atomic::AtomicUsize>,
    metrics: bool,
    /// Request/reply channels of each tenant on this vhost, made on its first request
    /// (`rpc.rs`). Per tenant: a direct reply-to address belongs to a channel, so
    /// tenants sharing a vhost never share a channel a reply could reach.
    rpc: std::sync::Mutex<std::collections::HashMap<String, Arc<rpc::Rpc>>>,
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

impl ConsumerChannel {
    /// Consumes `queue` with manual acks, at most `prefetch` unacked, under a consumer
    /// tag of `tag_prefix` and a fresh id.
    pub async fn consume_with_prefetch(
        &self,
        queue: &str,
        tag_prefix: &str,
        prefetch: u16,
    ) -> Result<lapin::Consumer, lapin::Error> {
        self.channel
            .basic_qos(prefetch, lapin::options::BasicQosOptions::default())
            .await?;
        self.consume(queue, tag_prefix).await
    }

    /// [`ConsumerChannel::consume_with_prefetch`] with the channel's current prefetch.
    pub async fn consume(
        &self,
        queue: &str,
        tag_prefix: &str,
    ) -> Result<lapin::Consumer, lapin::Error> {
        let tag = format!("{tag_prefix}-{}", crate::ids::uuid_v4().simple());
        self.channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                lapin::options::BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
    }

    /// Puts one delivery back in its queue now.
    pub async fn requeue(&self, delivery_tag: u64) -> Result<(), lapin::Error> {
        let options = lapin::options::BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        self.channel.basic_nack(delivery_tag, options).await
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
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let connector = Connector::new(
            urls,
            vhost,
            amqp,
            health.clone(),
            connections.clone(),
            (tasks.clone(), stop.clone()),
        )?;
        let channels =
            managed::Pool::builder(ChannelManager::new(connections.clone(), tasks.clone()))
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
            exchanges: ExchangeCache::new(
                Duration::from_secs(amqp.exchange_cache_ttl_s),
                amqp.exchange_cache_max_entries,
            ),
            max_message_bytes: amqp.max_message_bytes,
            max_delivery_bytes: u64::try_from(amqp.max_delivery_bytes).unwrap_or(u64::MAX),
            consumers: Arc::new(Semaphore::new(amqp.max_consumer_channels)),
            max_consumers: u32::try_from(amqp.max_consumer_channels).unwrap_or(u32::MAX),
            tasks,
            stop,
            holds: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            metrics,
            rpc: std::sync::Mutex::default(),
        });
        broker
            .tasks
            .spawn(supervise(Arc::downgrade(&broker), broker.stop.clone()));
        Ok(broker)
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Waits, at most `timeout` in all, until the pool is connected and holds one
    /// confirm-mode channel ready to lend, so a fresh pool's first publish does not
    /// spend its own acquisition time opening that channel. False if it did not get
    /// there in time (the request then meets the usual 503 answers).
    pub async fn warm_up(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        if !self.health.wait_up(timeout).await {
            return false;
        }
        // The channel goes straight back to the pool when dropped.
        matches!(
            tokio::time::timeout_at(deadline, self.channels.get()).await,
            Ok(Ok(_))
        )
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
            && self.rpc_inflight() == 0
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

    /// Stops reconnecting, closes every pooled channel and connection, and returns
    /// once the connections are closed and every task this pool started has ended.
    /// The pool is closed (publishes answer 503) as soon as this is called; the caller
    /// bounds the wait.
    pub async fn close(&self) {
        self.health
            .mark_closed("the pool was closed (shutdown, or an idle dynamic tenant)");
        self.stop.cancel();
        // Channels first, each close awaited: lapin fails a connection close that
        // overtakes a channel close still in flight, and the connection is then
        // dropped instead of closed. Consumers release their channels as their
        // sessions end (shutdown ends them first); a consumer that outlives that
        // costs its connection's clean close, not the pool's.
        let consumers = self.consumers.acquire_many(self.max_consumers);
        let _ = tokio::time::timeout(CONSUMERS_CLOSE_WAIT, consumers).await;
        let tenants: Vec<Arc<rpc::Rpc>> = self
            .rpc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for rpc in tenants {
            rpc.close().await;
        }
        let idle = self.channels.retain(|_, _| false).removed;
        self.channels.close();
        join_all(idle.into_iter().map(|publish| async move {
            let _ = publish
                .channel
                .close(200, "warren shutting down".into())
                .await;
        }))
        .await;
        let closes = self
            .connections
            .drain()
            .into_iter()
            .map(|connection| async move {
                if let Err(error) = connection.close(200, "warren shutting down".into()).await {
                    debug!(%error, "A broker connection did not close cleanly.");
                }
            });
        join_all(closes).await;
        // A supervisor probe that was connecting when the token fired may have added
        // one more; the supervisor has ended once the tracker is empty, so look again.
        self.tasks.close();
        self.tasks.wait().await;
        for connection in self.connections.drain() {
            let _ = connection.close(200, "warren shutting down".into()).await;
        }
    }

    /// A fresh channel for consuming (not from the publish pool, not in confirm mode),
    /// keeping bodies up to `amqp.max_delivery_bytes`.
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
        // A larger body (any producer can send one) is read and dropped as it arrives,
        // then refused as poison, instead of being assembled in memory (issue #27).
        channel.set_max_body_bytes(self.max_delivery_bytes);
        Ok(ConsumerChannel {
            channel,
            _permit: permit,
        })
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
                self.exchanges.forget(exchange);
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
        backoff(
            self.backoff_min,
            self.backoff_max,
            attempt,
            rand::random::<f64>(),
        )
    }
}

/// The wait before reconnect attempt `attempt + 1`: `min` doubled per failed attempt up
/// to `max`, less up to a quarter at random (so replicas don't reconnect in lockstep),
/// never below `min`. The floor bounds how often a down broker is tried (the default
/// 500 ms: at most twice a second per URL); the cap bounds how late a recovered broker
/// is noticed (the default 1.2 s keeps readiness within 2 s of it, with room for the
/// connection handshake). A backoff that kept growing through a long outage would leave
/// Warren unready long after the broker is back (issue #21).
fn backoff(min: Duration, max: Duration, attempt: u32, random: f64) -> Duration {
    let exp = min
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(max);
    let random = if random.is_finite() {
        random.clamp(0.0, 1.0)
    } else {
        0.0
    };
    exp.mul_f64(1.0 - 0.25 * random).max(min)
}

/// Keeps the link up: probes while healthy, reconnects with backoff while not; ends
/// when the broker is closed (`stop`) or dropped.
async fn supervise(broker: Weak<Broker>, stop: CancellationToken) {
    let mut attempt: u32 = 0;
    let mut ever_connected = false;
    loop {
        let Some(b) = broker.upgrade() else { return };
        let probed = tokio::select! {
            probed = b.probe() => probed,
            () = stop.cancelled() => return,
        };
        match probed {
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
                    () = stop.cancelled() => return,
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
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::backoff;

    #[test]
    fn backoff_doubles_to_the_cap_and_never_goes_below_the_floor() {
        let (min, max) = (Duration::from_millis(500), Duration::from_millis(1500));
        for random in [0.0, 0.3, 0.999, 1.0, -5.0, 7.0, f64::NAN] {
            for attempt in 0..40 {
                let wait = backoff(min, max, attempt, random);
                assert!(wait >= min && wait <= max, "{attempt} {random}: {wait:?}");
            }
        }
        assert_eq!(backoff(min, max, 0, 0.0), min);
        assert_eq!(backoff(min, max, 1, 0.0), Duration::from_millis(1000));
        assert_eq!(backoff(min, max, 1, 1.0), Duration::from_millis(750));
        // However long the outage, the wait stays at the cap (less jitter): the broker
        // is noticed within `max` of its return.
        assert_eq!(backoff(min, max, u32::MAX, 0.0), max);
        assert_eq!(backoff(min, max, 30, 1.0), Duration::from_millis(1125));
    }
}
