//! Acknowledged subscriptions: `durable` ones (a tenant-scoped named queue that
//! outlives the socket for `ws.durable_queue_expiry_s`) and `queue` ones (an existing
//! queue, SPEC §11, shared with competing consumers, never deleted by Warren), consumed
//! with a prefetch on the socket's own channel; the client acks and nacks. Closing the
//! channel requeues whatever was not acked. On a queue with a retry policy, a nack
//! without requeue republishes to the next delay queue or the DLQ (`topology::retry`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinHandle;

use super::render::{Format, MessageFrame};
use super::{Outgoing, SendBudget};
use crate::broker::{Broker, BrokerLease, ConsumerChannel};
use crate::config::{DurableQueueType, RetryPolicy};
use crate::error::ApiError;
use crate::telemetry;
use crate::tenancy::Tenant;
use crate::topology::retry::{self, Retained};

/// Delivery tags handed to the client and not yet acknowledged (at most the window),
/// with the message itself when a nack may have to republish it (retry policy).
type Outstanding = Arc<Mutex<BTreeMap<u64, Option<Retained>>>>;

pub struct Durable {
    channel: Arc<ConsumerChannel>,
    task: JoinHandle<()>,
    pub queue: String,
    /// `durable` or `queue`: the mode label of `warren_ws_subscriptions`.
    pub mode: &'static str,
    /// Delivery tags handed to the client and not yet acknowledged (at most the
    /// prefetch): an ack for any other tag is refused here, since the broker would
    /// answer it by closing the subscription's channel.
    outstanding: Outstanding,
    retry: Option<RetryPolicy>,
    /// Counts against the tenant's `limits.max_consumers`.
    _consumer: OwnedSemaphorePermit,
    /// Keeps a lazily opened pool from being closed under the consumer; republishes
    /// (retries) go through its publish pool.
    broker: BrokerLease,
}

/// Where an acknowledged subscription's messages come from.
pub enum Source<'a> {
    /// `durable`: Warren declares the queue (expiring `expiry` after its last consumer)
    /// and binds it; deliveries are filtered by the tenant's grants.
    Bound {
        exchange: &'a str,
        binding_key: &'a str,
        expiry: Duration,
        queue_type: DurableQueueType,
    },
    /// `queue`: an existing queue (404 otherwise), consumed whole (the `queue` grant
    /// covers every message in it), with its retry policy if the topology has one.
    Existing { retry: Option<RetryPolicy> },
}

/// The broker queue behind a durable subscription name: scoped by tenant, so two
/// tenants' `billing` never meet (they live in separate vhosts too, when configured so).
pub fn queue_name(tenant: &str, name: &str) -> Result<String, ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(ApiError::InvalidRequest(
            "queue: a durable subscription needs a `queue` name of 1-100 characters [A-Za-z0-9._-]"
                .to_owned(),
        ));
    }
    Ok(format!("warren.{tenant}.{name}"))
}

pub struct DurableRequest<'a> {
    pub subscription: &'a str,
    pub source: Source<'a>,
    pub queue: String,
    pub prefetch: u16,
    pub slow_consumer_timeout: Duration,
    pub budget: SendBudget,
}

impl Durable {
    pub async fn start(
        tenant: Arc<Tenant>,
        request: DurableRequest<'_>,
        sink: mpsc::Sender<Outgoing>,
    ) -> Result<Self, ApiError> {
        Self::start_as(tenant, request, sink, Format::Warren).await
    }

    /// [`Self::start`], with the deliveries' frames in `format`.
    pub async fn start_as(
        tenant: Arc<Tenant>,
        request: DurableRequest<'_>,
        sink: mpsc::Sender<Outgoing>,
        format: Format,
    ) -> Result<Self, ApiError> {
        let consumer_permit = tenant.quota.admit_consumer()?;
        let broker = tenant.broker().await?;
        let channel = Arc::new(
            broker
                .consumer_channel()
                .await
                .map_err(super::subscribe_failure)?,
        );
        let result = Self::setup(&broker, &channel, &request).await;
        let consumer = match result {
            Ok(consumer) => consumer,
            Err(e) => {
                let _ = channel.close(200, "subscribe failed".into()).await;
                return Err(e);
            }
        };
        let outstanding = Arc::new(Mutex::new(BTreeMap::new()));
        let (mode, filter, retry) = match request.source {
            Source::Bound { .. } => ("durable", true, None),
            Source::Existing { retry } => ("queue", false, retry),
        };
        let forwarder = Forwarder {
            filter,
            retain: retry.is_some(),
            queue: request.queue.clone(),
            window: Window::new(request.prefetch, request.budget.max()),
            tenant,
            channel: channel.clone(),
            subscription: request.subscription.to_owned(),
            sink,
            budget: request.budget.clone(),
            timeout: request.slow_consumer_timeout,
            outstanding: outstanding.clone(),
            format,
        };
        let task = tokio::spawn(forwarder.run(consumer));
        Ok(Self {
            channel,
            task,
            queue: request.queue,
            mode,
            outstanding,
            retry,
            _consumer: consumer_permit,
            broker,
        })
    }

    async fn setup(
        broker: &Broker,
        channel: &ConsumerChannel,
        request: &DurableRequest<'_>,
    ) -> Result<lapin::Consumer, ApiError> {
        let exchange = match &request.source {
            Source::Bound { exchange, .. } => exchange,
            Source::Existing { .. } => "",
        };
        let fail = |e: lapin::Error| super::subscribe_failure(broker.failure(&e, exchange));
        // One message first: its size tells how many fit the byte budget (`Window`).
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .map_err(fail)?;
        let Source::Bound {
            exchange,
            binding_key,
            expiry,
            queue_type,
        } = request.source
        else {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let declared = channel
                .queue_declare(
                    request.queue.as_str().into(),
                    passive,
                    FieldTable::default(),
                )
                .await;
            return match declared {
                Ok(_) => consume(channel, &request.queue).await.map_err(fail),
                Err(e) if crate::broker::publish::is_not_found(&e) => {
                    Err(ApiError::QueueNotFound(request.queue.clone()))
                }
                Err(e) => Err(fail(e)),
            };
        };
        let mut arguments = FieldTable::default();
        let expiry_ms = u32::try_from(expiry.as_millis()).unwrap_or(u32::MAX);
        arguments.insert("x-expires".into(), AMQPValue::LongUInt(expiry_ms));
        // Only quorum is named: queues declared before this setting existed carry no
        // type argument, and redeclaring them must stay equivalent.
        if queue_type == DurableQueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(queue_type.as_str().into()),
            );
        }
        channel
            .queue_declare(
                request.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(fail)?;
        channel
            .queue_bind(
                request.queue.as_str().into(),
                exchange.into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail)?;
        consume(channel, &request.queue).await.map_err(fail)
    }

    pub async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), ApiError> {
        let _ = self.settle(delivery_tag, multiple)?;
        self.channel
            .basic_ack(delivery_tag, BasicAckOptions { multiple })
            .await
            .map_err(|_| ack_error())
    }

    pub async fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), ApiError> {
        let settled = self.settle(delivery_tag, multiple)?;
        match &self.retry {
            Some(policy) if !requeue => self.retry(policy, settled).await,
            _ => self
                .channel
                .basic_nack(delivery_tag, BasicNackOptions { multiple, requeue })
                .await
                .map_err(|_| ack_error()),
        }
    }

    /// Republishes each settled delivery to its next hop (confirmed), then acks it; one
    /// that cannot be republished goes back to the queue instead (nack with requeue),
    /// so none is lost either way.
    async fn retry(
        &self,
        policy: &RetryPolicy,
        settled: Vec<(u64, Option<Retained>)>,
    ) -> Result<(), ApiError> {
        let mut failed = None;
        for (tag, message) in settled {
            let republished = match &message {
                Some(message) => retry::republish(&self.broker, policy, message).await,
                None => Err(crate::broker::PublishError::Rejected),
            };
            let settle = match republished {
                Ok(hop) => {
                    telemetry::ws_retried(if hop == policy.dlq() { "dlq" } else { "delay" });
                    self.channel
                        .basic_ack(tag, BasicAckOptions { multiple: false })
                        .await
                }
                Err(e) => {
                    tracing::warn!(queue = %policy.queue, error = %e, "Could not move a nacked message to its retry queue; requeued it.");
                    telemetry::ws_retried("failed");
                    failed = Some(ApiError::BrokerUnavailable {
                        detail:
                            "the message could not be moved to its retry queue; it was requeued"
                                .to_owned(),
                        retry_after: Duration::from_secs(1),
                    });
                    self.channel.requeue(tag).await
                }
            };
            settle.map_err(|_| ack_error())?;
        }
        failed.map_or(Ok(()), Err)
    }

    /// Takes `delivery_tag` (and with `multiple` every earlier one) off the outstanding
    /// set, or refuses a tag this subscription never handed out or already settled.
    /// Returns the settled tags with what was retained of them.
    fn settle(
        &self,
        delivery_tag: u64,
        multiple: bool,
    ) -> Result<Vec<(u64, Option<Retained>)>, ApiError> {
        let mut outstanding = self.outstanding.lock().unwrap_or_else(|e| e.into_inner());
        if !outstanding.contains_key(&delivery_tag) {
            return Err(ApiError::InvalidRequest(
                "delivery_tag: no unacknowledged delivery of this subscription has this tag"
                    .to_owned(),
            ));
        }
        if multiple {
            let rest = outstanding.split_off(&(delivery_tag + 1));
            let settled = std::mem::replace(&mut *outstanding, rest);
            Ok(settled.into_iter().collect())
        } else {
            Ok(outstanding
                .remove_entry(&delivery_tag)
                .into_iter()
                .collect())
        }
    }

    /// Stops consuming; unacked deliveries go back to the queue, which stays.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.channel.close(200, "unsubscribed".into()).await;
    }
}

/// A checked ack or nack fails only when the subscription's channel is gone: the broker
/// side is unavailable, not the client's frame wrong.
fn ack_error() -> ApiError {
    ApiError::BrokerUnavailable {
        detail: "the acknowledgement could not reach the broker; the subscription's unacked messages will be redelivered".to_owned(),
        retry_after: Duration::from_secs(1),
    }
}

/// Moves deliveries to the socket, waiting for room in its frame and byte budgets (the
/// prefetch bounds how many are outstanding); a socket that takes nothing for the
/// slow-consumer timeout is closed.
struct Forwarder {
    queue: String,
    /// Only deliveries the tenant's exchange grants allow reach the client (`durable`).
    filter: bool,
    /// Keep each delivery's body and properties until settled (retry policy).
    retain: bool,
    window: Window,
    tenant: Arc<Tenant>,
    channel: Arc<ConsumerChannel>,
    subscription: String,
    sink: mpsc::Sender<Outgoing>,
    budget: SendBudget,
    timeout: Duration,
    outstanding: Outstanding,
    format: Format,
}

/// Starts a consumer on `queue` with the channel's current prefetch.
async fn consume(channel: &ConsumerChannel, queue: &str) -> Result<lapin::Consumer, lapin::Error> {
    channel.consume(queue, "warren-durable").await
}

/// How many unacked deliveries a durable subscription lets the broker push, so that
/// they take about the socket's byte budget whatever the message size: the budget over
/// the largest body seen, between 1 and the client's prefetch. Unacked deliveries sit
/// in the AMQP client's buffer, Warren's queue and the socket: this bounds what a slow
/// reader with a large prefetch pins.
///
/// RabbitMQ has no prefetch in bytes and applies a consumer's prefetch only when the
/// consumer starts. So a subscription starts with one consumer of prefetch 1 (the
/// "probe"); its first body sizes the window, and a second consumer takes the rest of
/// it (window - 1). Both stay: together they never have more than the window (and so
/// the client's prefetch) outstanding. A larger body later replaces the second consumer
/// by a smaller one; the window never grows back, so it never exceeds the prefetch.
struct Window {
    prefetch: u16,
    budget: usize,
    largest: usize,
    current: u16,
}

impl Window {
    fn new(prefetch: u16, budget: usize) -> Self {
        Self {
            prefetch,
            budget,
            largest: 0,
            current: 1,
        }
    }

    /// The new window after a body of `size` bytes, when a new second consumer is worth
    /// it: the first body sets it; later it only shrinks, by half or more (a replaced
    /// consumer's unacked deliveries count until acked, so resizes stay few and what
    /// they leave behind adds up to a few budgets at most).
    fn resize(&mut self, size: usize) -> Option<u16> {
        let first = self.largest == 0;
        self.largest = self.largest.max(size.max(1));
        let fits = (self.budget / self.largest).clamp(1, usize::from(self.prefetch));
        let fits = u16::try_from(fits).unwrap_or(self.prefetch);
        let changed = if first {
            fits > 1
        } else {
            fits <= self.current / 2
        };
        changed.then(|| {
            self.current = fits;
            fits
        })
    }
}

impl Forwarder {
    /// Starts the consumer that takes the window beyond the probe's one delivery, after
    /// cancelling the one it replaces (whose deliveries already sent stay valid: tags
    /// belong to the channel, and its stream yields them before it ends).
    async fn resize(&self, replaced: Option<&str>, window: u16) -> Option<lapin::Consumer> {
        if let Some(tag) = replaced {
            self.channel
                .basic_cancel(tag.into(), BasicCancelOptions::default())
                .await
                .ok()?;
        }
        if window <= 1 {
            return None;
        }
        self.channel
            .basic_qos(window - 1, BasicQosOptions::default())
            .await
            .ok()?;
        consume(&self.channel, &self.queue).await.ok()
    }

    async fn run(mut self, probe: lapin::Consumer) {
        let mut consumers = futures::stream::SelectAll::new();
        consumers.push(probe);
        let mut second: Option<String> = None;
        while let Some(delivery) = consumers.next().await {
            let Ok(delivery) = delivery else { break };
            if let Some(window) = self.window.resize(delivery.data.len()) {
                let replacement = self.resize(second.as_deref(), window).await;
                second = replacement.as_ref().map(|c| c.tag().as_str().to_owned());
                if let Some(consumer) = replacement {
                    consumers.push(consumer);
                }
            }
            if !crate::broker::poison::admit_durable(&delivery).await {
                continue;
            }
            // A queue may be fed by more than this subscription's binding (an earlier
            // one, an exchange that ignores binding keys): the client sees only what
            // its grants allow; the rest is rejected (dead-lettered if so configured).
            if self.filter
                && !self
                    .tenant
                    .may_receive(delivery.exchange.as_str(), delivery.routing_key.as_str())
            {
                telemetry::ws_filtered("durable");
                let _ = self
                    .channel
                    .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false })
                    .await;
                continue;
            }
            let frame = MessageFrame::formatted(
                &self.subscription,
                &delivery,
                self.format,
                &self.tenant.name,
            );
            // The reader is too slow: the socket's writer is stuck too, and closes it
            // with 4408 on its own timer.
            let Some(bytes) = self
                .budget
                .take(frame.approximate_len(), self.timeout)
                .await
            else {
                return;
            };
            let retained = self.retain.then(|| Retained {
                body: bytes::Bytes::from(delivery.data.clone()),
                properties: delivery.properties.clone(),
            });
            self.outstanding
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(delivery.delivery_tag, retained);
            let sent = self
                .sink
                .send_timeout(Outgoing::Message(Box::new(frame), bytes), self.timeout)
                .await;
            if sent.is_err() {
                return;
            }
        }
        let _ = self
            .sink
            .send(Outgoing::Ended {
                subscription: self.subscription,
                error: ApiError::BrokerUnavailable {
                    detail: "the subscription lost its broker consumer; subscribe again to resume where it stopped".to_owned(),
                    retry_after: Duration::from_secs(1),
                },
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::Window;

    #[test]
    fn the_window_shrinks_for_large_messages_and_grows_for_small_ones() {
        let mut window = Window::new(1000, 8 << 20);
        assert_eq!(
            window.resize(1024),
            Some(1000),
            "small bodies: the prefetch"
        );
        assert_eq!(window.resize(1024), None);
        assert_eq!(window.resize(1 << 20), Some(8), "1 MiB bodies: 8 fit");
        assert_eq!(window.resize(512), None, "the largest body seen decides");
        assert_eq!(window.resize(64 << 20), Some(1), "never below one");
        let mut small = Window::new(10, 8 << 20);
        assert_eq!(small.resize(100), Some(10));
        let mut exact = Window::new(1000, 8 << 20);
        assert_eq!(
            exact.resize(8 << 20),
            None,
            "one fits: the first window stays"
        );
    }
}
