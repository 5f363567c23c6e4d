//! Request/reply over RabbitMQ's direct reply-to (SPEC §10): a few RPC channels per
//! vhost, each in confirm mode with its own `amq.rabbitmq.reply-to` consumer, and per
//! channel the requests awaiting a reply, by correlation id.
//!
//! Why channels of their own: direct reply-to delivers a reply to the channel that
//! published the request, and only when that channel consumes `amq.rabbitmq.reply-to`
//! (no-ack) before it publishes. The publish pool's channels are handed to whoever
//! asks next and carry no consumer, so they cannot do it. A fixed set of long-lived
//! channels can: thousands of requests are multiplexed over them, and no queue is
//! declared per request. A reply names its request by correlation id; the reply-to
//! address names the channel, so two requests with the same correlation id on
//! different channels (two tenants on one vhost, say) never see each other's reply.
//! A correlation id is unique per channel while it awaits a reply: a request whose id
//! is in flight on one channel goes to another, and only when it is in flight on all
//! of them is it refused ([`RpcError::CorrelationIdInUse`]).
//!
//! Confirms and returns are tracked by the same sequencer as the publish pool
//! (`channel.rs`), so `unroutable` lands on the request it belongs to.
//!
//! A channel that is lost (broker restart, connection cut) fails every request
//! awaiting a reply on it at once, refuses new ones, and is replaced by the next
//! request that picks its slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::channel::{Outcome, Tracked, confirm_future, return_key, sequence};
use super::{Broker, BrokerError, DIRECT_REPLY_TO, OutgoingMessage, PublishError};
use crate::telemetry;

/// The RPC settings of a vhost pool (from `[rpc]`).
#[derive(Debug, Clone, Copy)]
pub struct RpcSettings {
    pub channels: usize,
    pub max_inflight: usize,
    pub max_reply_bytes: usize,
}

/// A reply as the responder sent it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    /// From publishing the request to the reply's arrival.
    pub round_trip: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The request was not published, or its publish failed (as a publish would).
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Confirmed and routed, but no reply came in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// A reply came, larger than `rpc.max_reply_bytes`; it was dropped.
    #[error("the reply ({size} bytes) exceeds rpc.max_reply_bytes ({max} bytes)")]
    TooLarge { size: usize, max: usize },
    /// The correlation id awaits a reply on every RPC channel of the vhost.
    #[error("correlation id in flight on every RPC channel")]
    CorrelationIdInUse,
    /// The channel was lost after the request was published and before its reply.
    #[error("the reply channel was lost")]
    Lost,
}

/// What the reply consumer hands a waiting request.
enum Arrived {
    Reply(Box<(BasicProperties, Vec<u8>)>),
    TooLarge(usize),
}

/// The RPC state of one vhost pool, made on the first request.
pub(super) struct Rpc {
    settings: RpcSettings,
    slots: Vec<Slot>,
    next: AtomicUsize,
    inflight: Arc<Semaphore>,
}

/// One RPC channel position: the channel while it lives, reopened on demand.
struct Slot {
    current: Mutex<Option<Arc<RpcChannel>>>,
    /// One opener at a time, so a burst after a restart opens one channel, not many.
    opening: tokio::sync::Mutex<()>,
}

struct RpcChannel {
    channel: Channel,
    /// The channel's confirm sequencer; dropped when the channel is lost, so the
    /// sequencer ends (shutdown waits for it) even while a slot still holds this.
    sequencer: Mutex<Option<mpsc::UnboundedSender<Tracked>>>,
    /// Held while a publish is written and handed to the sequencer, so confirms reach
    /// it in publish order (many requests publish on one channel at once).
    publishing: tokio::sync::Mutex<()>,
    /// Requests awaiting a reply, by correlation id; `None` once the channel is lost.
    pending: Mutex<Option<HashMap<String, Waiter>>>,
    /// Numbers the waiters, so a request only ever removes its own entry.
    registered: AtomicU64,
}

/// A request awaiting its reply.
struct Waiter {
    /// Which registration this is: after a reply took the entry, a later request may
    /// register the same correlation id before the first one has cleaned up.
    number: u64,
    reply: oneshot::Sender<Arrived>,
}

impl RpcChannel {
    fn pending(&self) -> MutexGuard<'_, Option<HashMap<String, Waiter>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_live(&self) -> bool {
        self.channel.status().connected() && self.pending().is_some()
    }

    /// Fails every waiting request (their receivers see the sender dropped) and
    /// refuses new ones.
    fn lost(&self) {
        let waiting = self.pending().take();
        drop(waiting);
        let sequencer = lock(&self.sequencer).take();
        drop(sequencer);
    }
}

/// Removes a request's pending entry however the request ends (reply, timeout,
/// failure, or the caller dropping the future).
struct PendingEntry {
    channel: Arc<RpcChannel>,
    correlation_id: String,
    number: u64,
}

impl Drop for PendingEntry {
    fn drop(&mut self) {
        if let Some(pending) = self.channel.pending().as_mut()
            && pending
                .get(&self.correlation_id)
                .is_some_and(|w| w.number == self.number)
        {
            pending.remove(&self.correlation_id);
        }
    }
}

impl Rpc {
    pub(super) fn new(settings: RpcSettings) -> Self {
        Self {
            settings,
            slots: (0..settings.channels.max(1))
                .map(|_| Slot {
                    current: Mutex::new(None),
                    opening: tokio::sync::Mutex::new(()),
                })
                .collect(),
            next: AtomicUsize::new(0),
            inflight: Arc::new(Semaphore::new(settings.max_inflight)),
        }
    }

    pub(super) fn inflight(&self) -> usize {
        self.settings
            .max_inflight
            .saturating_sub(self.inflight.available_permits())
    }

    /// Closes every RPC channel (shutdown): their consumers end and their waiting
    /// requests fail.
    pub(super) async fn close(&self) {
        let channels: Vec<Arc<RpcChannel>> = self
            .slots
            .iter()
            .filter_map(|slot| lock(&slot.current).take())
            .collect();
        for rpc in channels {
            rpc.lost();
            let _ = rpc.channel.close(200, "warren shutting down".into()).await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker {
    /// Requests awaiting their reply on this vhost.
    pub fn rpc_inflight(&self) -> usize {
        lock(&self.rpc).values().map(|rpc| rpc.inflight()).sum()
    }

    /// `tenant`'s RPC channels on this vhost, made with `settings` on its first request.
    fn rpc_of(&self, tenant: &str, settings: RpcSettings) -> Arc<Rpc> {
        let mut rpc = lock(&self.rpc);
        if let Some(found) = rpc.get(tenant) {
            return found.clone();
        }
        rpc.entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(Rpc::new(settings)))
            .clone()
    }

    /// Publishes `message` as a request (mandatory as the message says, confirmed,
    /// `reply_to` direct reply-to, `correlation_id` as given) and waits for its reply
    /// until `timeout` after the publish. `settings` are taken on the vhost's first
    /// request.
    #[tracing::instrument(name = "request", skip_all, fields(vhost = %self.vhost))]
    pub async fn request(
        &self,
        tenant: &str,
        message: &OutgoingMessage,
        correlation_id: &str,
        settings: RpcSettings,
        timeout: Duration,
    ) -> Result<Reply, RpcError> {
        if let Err(unavailable) = self.health.check() {
            return Err(
                PublishError::unavailable(unavailable.reason, unavailable.retry_after).into(),
            );
        }
        let rpc = self.rpc_of(tenant, settings);
        let rpc = rpc.as_ref();
        let Ok(_permit) = rpc.inflight.clone().try_acquire_owned() else {
            return Err(PublishError::unavailable(
                format!(
                    "{} requests are already awaiting replies on this vhost (rpc.max_inflight)",
                    rpc.settings.max_inflight
                ),
                Duration::from_secs(1),
            )
            .into());
        };
        if let Some(refused) = super::publish::refusal(message, self.max_message_bytes) {
            return Err(refused.into());
        }
        self.ensure_exchange(&message.exchange).await?;
        let (channel, number, reply) = self.register(rpc, correlation_id).await?;
        let _entry = PendingEntry {
            channel: channel.clone(),
            correlation_id: correlation_id.to_owned(),
            number,
        };
        let started = Instant::now();
        let confirmed = self
            .publish_request(&channel, message, correlation_id)
            .await?;
        match tokio::time::timeout(self.confirm_timeout, confirmed).await {
            Ok(Ok((Outcome::Acked, _))) => {}
            Ok(Ok((Outcome::Returned(text), _))) => {
                return Err(PublishError::Unroutable(text).into());
            }
            Ok(Ok((Outcome::Nacked, _))) => return Err(PublishError::Rejected.into()),
            Ok(Ok((Outcome::NotConfirmed, _))) => {
                return Err(PublishError::LostBeforeConfirm("not in confirm mode".into()).into());
            }
            Ok(Ok((Outcome::Failed(error), _))) => {
                return Err(self.failure(&error, &message.exchange).into());
            }
            Ok(Err(_)) => {
                return Err(
                    PublishError::LostBeforeConfirm("confirm tracking stopped".into()).into(),
                );
            }
            Err(_) => {
                // The sequencer answers in order, so a stuck confirm wedges every later
                // request on this channel: replace it.
                channel.lost();
                let closing = channel.channel.clone();
                self.tasks.spawn(async move {
                    let _ = closing.close(200, "confirm timeout".into()).await;
                });
                return Err(PublishError::ConfirmTimeout(self.confirm_timeout).into());
            }
        }
        match tokio::time::timeout_at((started + timeout).into(), reply).await {
            Ok(Ok(Arrived::Reply(reply))) => {
                let (properties, body) = *reply;
                Ok(Reply {
                    properties,
                    body,
                    round_trip: started.elapsed(),
                })
            }
            Ok(Ok(Arrived::TooLarge(size))) => Err(RpcError::TooLarge {
                size,
                max: rpc.settings.max_reply_bytes,
            }),
            Ok(Err(_)) => Err(RpcError::Lost),
            Err(_) => Err(RpcError::Timeout(timeout)),
        }
    }

    /// A live RPC channel on which `correlation_id` is not awaiting a reply, with the
    /// request's place in its pending map. Starts at the next slot round robin.
    async fn register(
        &self,
        rpc: &Rpc,
        correlation_id: &str,
    ) -> Result<(Arc<RpcChannel>, u64, oneshot::Receiver<Arrived>), RpcError> {
        let count = rpc.slots.len();
        let start = rpc.next.fetch_add(1, Ordering::Relaxed);
        for offset in 0..count {
            let slot = &rpc.slots[(start + offset) % count];
            let channel = self.rpc_channel(rpc, slot).await?;
            let mut pending = channel.pending();
            let Some(waiting) = pending.as_mut() else {
                return Err(RpcError::Lost);
            };
            if waiting.contains_key(correlation_id) {
                continue;
            }
            let (reply, rx) = oneshot::channel();
            let number = channel.registered.fetch_add(1, Ordering::Relaxed);
            waiting.insert(correlation_id.to_owned(), Waiter { number, reply });
            drop(pending);
            return Ok((channel, number, rx));
        }
        Err(RpcError::CorrelationIdInUse)
    }

    /// The slot's channel, opened (once, by one caller) if it has none or lost it.
    async fn rpc_channel(&self, rpc: &Rpc, slot: &Slot) -> Result<Arc<RpcChannel>, RpcError> {
        let live = |slot: &Slot| lock(&slot.current).clone().filter(|c| c.is_live());
        if let Some(channel) = live(slot) {
            return Ok(channel);
        }
        // One deadline for queueing behind the opener and opening: a burst of requests
        // after a restart waits for the one channel being opened, not for its own.
        let deadline = tokio::time::Instant::now() + self.acquire_timeout + self.confirm_timeout;
        let Ok(_opening) = tokio::time::timeout_at(deadline, slot.opening.lock()).await else {
            return Err(PublishError::unavailable(
                "no RPC channel could be opened in time",
                Duration::from_secs(1),
            )
            .into());
        };
        if let Some(channel) = live(slot) {
            return Ok(channel);
        }
        let opened = tokio::time::timeout_at(
            deadline,
            self.open_rpc_channel(rpc.settings.max_reply_bytes),
        )
        .await;
        let channel = match opened {
            Ok(Ok(channel)) => channel,
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => {
                return Err(PublishError::unavailable(
                    "the broker did not open an RPC channel in time",
                    Duration::from_secs(1),
                )
                .into());
            }
        };
        *lock(&slot.current) = Some(channel.clone());
        Ok(channel)
    }

    /// A confirm-mode channel consuming direct reply-to, its sequencer and its reply
    /// dispatcher (both on the broker's tasks).
    async fn open_rpc_channel(
        &self,
        max_reply_bytes: usize,
    ) -> Result<Arc<RpcChannel>, PublishError> {
        let Some(connection) = self.connections.pick() else {
            return Err(self.acquire_failed(&BrokerError::NotConnected));
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| self.failure(&e, ""))?;
        drop(connection);
        // A reply over the bound is read off the connection and dropped as it comes,
        // never assembled: four 125 MB replies must not cost 500 MB (issue #27).
        channel.set_max_body_bytes(u64::try_from(max_reply_bytes).unwrap_or(u64::MAX));
        let ready = async {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            channel
                .basic_consume(
                    DIRECT_REPLY_TO.into(),
                    format!("warren-rpc-{}", crate::ids::uuid_v4().simple())
                        .as_str()
                        .into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
        };
        let consumer = match ready.await {
            Ok(consumer) => consumer,
            Err(error) => {
                let _ = channel.close(200, "rpc setup failed".into()).await;
                return Err(self.failure(&error, ""));
            }
        };
        let (sequencer, tracked) = mpsc::unbounded_channel();
        self.tasks.spawn(sequence(tracked));
        let rpc = Arc::new(RpcChannel {
            channel,
            sequencer: Mutex::new(Some(sequencer)),
            publishing: tokio::sync::Mutex::new(()),
            pending: Mutex::new(Some(HashMap::new())),
            registered: AtomicU64::new(0),
        });
        self.tasks.spawn(dispatch(
            rpc.clone(),
            consumer,
            max_reply_bytes,
            self.stop.clone(),
        ));
        Ok(rpc)
    }

    /// Writes the request on `rpc` and hands its confirm to the channel's sequencer.
    async fn publish_request(
        &self,
        rpc: &RpcChannel,
        message: &OutgoingMessage,
        correlation_id: &str,
    ) -> Result<oneshot::Receiver<(Outcome, Instant)>, RpcError> {
        let properties = message
            .properties
            .clone()
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(correlation_id.into());
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default();
        let key = return_key(&message_id, &message.exchange, &message.routing_key);
        let (exchange, routing_key) = (message.exchange.clone(), message.routing_key.clone());
        let body = message.body.clone();
        let options = BasicPublishOptions {
            mandatory: message.mandatory,
            immediate: false,
        };
        let on_channel = rpc.channel.clone();
        let _order = rpc.publishing.lock().await;
        let sequencer = lock(&rpc.sequencer).clone().ok_or(RpcError::Lost)?;
        // As in the pipeline: the first poll registers the confirm and queues the
        // frames; the rest (the write) is awaited by the sequencer.
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
        let confirm = match futures::poll!(write.as_mut()) {
            std::task::Poll::Ready(Err(error)) => {
                return Err(self.failure(&error, &message.exchange).into());
            }
            std::task::Poll::Ready(Ok(confirm)) => confirm_future(std::future::ready(Ok(confirm))),
            std::task::Poll::Pending => confirm_future(write),
        };
        let (reply, outcome) = oneshot::channel();
        sequencer
            .send(Tracked {
                key,
                confirm,
                reply,
            })
            .map_err(|_| RpcError::Lost)?;
        Ok(outcome)
    }
}

/// Hands each reply to the request awaiting its correlation id; a reply nobody awaits
/// (late, duplicate, unknown) is dropped and counted. When the consumer ends (channel
/// or connection lost, or shutdown) every waiting request fails at once.
async fn dispatch(
    rpc: Arc<RpcChannel>,
    mut consumer: Consumer,
    max_reply_bytes: usize,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            () = stop.cancelled() => None,
        };
        let Some(Ok(delivery)) = next else { break };
        let waiter = delivery
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|id| rpc.pending().as_mut()?.remove(id.as_str()));
        let Some(waiter) = waiter else {
            telemetry::rpc_late_reply();
            continue;
        };
        let size = delivery.data.len();
        let arrived = if let Some(declared) = delivery.oversized {
            Arrived::TooLarge(usize::try_from(declared).unwrap_or(usize::MAX))
        } else if size > max_reply_bytes {
            Arrived::TooLarge(size)
        } else {
            Arrived::Reply(Box::new((delivery.properties, delivery.data)))
        };
        if waiter.reply.send(arrived).is_err() {
            // The caller gave up between the lookup and now: late as well.
            telemetry::rpc_late_reply();
        }
    }
    rpc.lost();
    if rpc.channel.status().connected() {
        let _ = rpc.channel.close(200, "rpc consumer ended".into()).await;
    }
}
