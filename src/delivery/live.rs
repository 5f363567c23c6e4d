//! Live fan-out: one exclusive, auto-delete broker queue and consumer per (tenant,
//! exchange, binding key) on this instance, shared by every local live subscriber.
//! Created on the first subscriber, removed after the last leaves.
//!
//! The registry lock is a plain mutex held for map updates only, never across broker
//! I/O: creating a topic waits only the subscribers of that same topic, so a tenant
//! whose broker is slow or gone cannot hold up anyone else's subscribe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, mpsc};

use super::render::{DeliveryJson, Format, FrameId, MessageFrame};
use super::{Outgoing, SendBudget};
use crate::auth::grants::GrantPattern;
use crate::broker::ConsumerChannel;
use crate::error::ApiError;
use crate::telemetry;
use crate::tenancy::Tenant;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TopicKey {
    tenant: String,
    exchange: String,
    binding_key: String,
}

struct Topic {
    queue: String,
    channel: ConsumerChannel,
    consumer_tag: String,
    /// The tenant, for the `source` of CloudEvents synthesized from plain messages.
    tenant: String,
    /// Deliveries whose routing key this does not match are not fanned out: on an
    /// exchange that ignores binding keys (fanout, headers) the broker sends
    /// everything, and a subscriber must see only what its grants allow.
    filter: Option<GrantPattern>,
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    /// Counts against the tenant's `limits.max_consumers` while the topic exists.
    _consumer: OwnedSemaphorePermit,
    /// Keeps a lazily opened pool from being closed under the consumer.
    _lease: crate::broker::BrokerLease,
}

#[derive(Clone)]
struct Subscriber {
    subscription: String,
    frame_id: FrameId,
    sink: mpsc::Sender<Outgoing>,
    budget: SendBudget,
    format: Format,
}

/// A topic being created or live; subscribers of the same key wait on the cell.
type Slot = Arc<OnceCell<Arc<Topic>>>;

#[derive(Default)]
struct Registry {
    topics: Mutex<HashMap<TopicKey, Slot>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<TopicKey, Slot>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets `slot` under `key` if it is still the one registered there.
    fn forget(&self, key: &TopicKey, slot: &Slot) {
        let mut topics = self.lock();
        if topics.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            topics.remove(key);
        }
    }

    /// After a failed creation: forgets the empty slot unless another subscriber is
    /// about to try again with it (clones are only taken under this lock, so the
    /// count is exact). Failed keys leave nothing behind.
    fn forget_failed(&self, key: &TopicKey, slot: &Slot) {
        let mut topics = self.lock();
        if topics.get(key).is_some_and(|s| Arc::ptr_eq(s, slot))
            && slot.get().is_none()
            && Arc::strong_count(slot) == 2
        {
            topics.remove(key);
        }
    }
}

#[derive(Default)]
pub struct LiveHub {
    registry: Arc<Registry>,
    next_id: AtomicU64,
}

/// A socket's membership in a live topic; give it back with [`LiveHub::leave`].
#[derive(Debug)]
pub struct LiveSubscription {
    key: TopicKey,
    id: u64,
    pub queue: String,
}

/// Where a live subscriber's deliveries go.
pub struct LiveSink<'a> {
    pub subscription: &'a str,
    pub sink: mpsc::Sender<Outgoing>,
    pub budget: SendBudget,
}

impl LiveHub {
    /// Joins (or creates) the topic; deliveries arrive on `sink` as `Outgoing::Message`.
    pub async fn join(
        &self,
        tenant: &Tenant,
        exchange: &str,
        binding_key: &GrantPattern,
        target: LiveSink<'_>,
        max_queue_length: u32,
    ) -> Result<LiveSubscription, ApiError> {
        self.join_as(
            tenant,
            exchange,
            binding_key,
            target,
            max_queue_length,
            Format::Warren,
        )
        .await
    }

    /// [`Self::join`], with the deliveries' frames in `format`. Subscribers of one topic
    /// may ask different formats; each delivery is rendered once per format in use.
    pub async fn join_as(
        &self,
        tenant: &Tenant,
        exchange: &str,
        binding_key: &GrantPattern,
        target: LiveSink<'_>,
        max_queue_length: u32,
        format: Format,
    ) -> Result<LiveSubscription, ApiError> {
        let key = TopicKey {
            tenant: tenant.name.clone(),
            exchange: exchange.to_owned(),
            binding_key: binding_key.as_str().to_owned(),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber {
            subscription: target.subscription.to_owned(),
            frame_id: FrameId::new(target.subscription),
            sink: target.sink,
            budget: target.budget,
            format,
        };
        loop {
            let slot = self.registry.lock().entry(key.clone()).or_default().clone();
            let created = slot
                .get_or_try_init(|| async {
                    let (topic, consumer) =
                        create(tenant, exchange, binding_key, max_queue_length).await?;
                    let topic = Arc::new(topic);
                    tokio::spawn(consume(
                        topic.clone(),
                        consumer,
                        key.clone(),
                        slot.clone(),
                        self.registry.clone(),
                    ));
                    Ok::<_, ApiError>(topic)
                })
                .await;
            let topic = match created {
                Ok(topic) => topic.clone(),
                Err(error) => {
                    self.registry.forget_failed(&key, &slot);
                    return Err(error);
                }
            };
            // Joined under the registry lock, so `leave` (which empties and removes a
            // topic under the same lock) cannot close the topic in between; a topic
            // that was removed meanwhile is retried with a fresh one.
            let registry = self.registry.lock();
            if !registry.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                continue;
            }
            lock(&topic.subscribers).insert(id, subscriber.clone());
            drop(registry);
            telemetry::ws_subscriptions("live", 1);
            return Ok(LiveSubscription {
                key,
                id,
                queue: topic.queue.clone(),
            });
        }
    }

    /// Leaves the topic; the last one out cancels the consumer (the queue auto-deletes).
    pub async fn leave(&self, subscription: LiveSubscription) {
        let emptied = {
            let mut topics = self.registry.lock();
            let Some(topic) = topics
                .get(&subscription.key)
                .and_then(|slot| slot.get().cloned())
            else {
                return;
            };
            let empty = {
                let mut subscribers = lock(&topic.subscribers);
                if subscribers.remove(&subscription.id).is_some() {
                    telemetry::ws_subscriptions("live", -1);
                }
                subscribers.is_empty()
            };
            if empty {
                topics.remove(&subscription.key);
            }
            empty.then_some(topic)
        };
        if let Some(topic) = emptied {
            close(&topic).await;
        }
    }

    /// Broker queue names of the live topics (for tests and introspection).
    pub fn queues(&self) -> Vec<String> {
        self.registry
            .lock()
            .values()
            .filter_map(|slot| slot.get().map(|t| t.queue.clone()))
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn create(
    tenant: &Tenant,
    exchange: &str,
    binding_key: &GrantPattern,
    max_queue_length: u32,
) -> Result<(Topic, lapin::Consumer), ApiError> {
    let consumer_permit = tenant.quota.admit_consumer()?;
    let broker = tenant.broker().await?;
    let channel = broker
        .consumer_channel()
        .await
        .map_err(super::subscribe_failure)?;
    let fail = |e: lapin::Error| super::subscribe_failure(broker.failure(&e, exchange));
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongUInt(max_queue_length));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(fail)?;
    let queue = queue.name().as_str().to_owned();
    let bound = channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            binding_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    if let Err(e) = bound {
        let _ = channel.close(200, "bind failed".into()).await;
        return Err(fail(e));
    }
    let consumer_tag = format!("warren-live-{}", crate::ids::uuid_v4().simple());
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(fail)?;
    let topic = Topic {
        queue,
        channel,
        consumer_tag,
        tenant: tenant.name.clone(),
        filter: (!binding_key.matches_every_key()).then(|| binding_key.clone()),
        subscribers: Mutex::new(HashMap::new()),
        _consumer: consumer_permit,
        _lease: broker,
    };
    Ok((topic, consumer))
}

async fn close(topic: &Topic) {
    let _ = topic
        .channel
        .basic_cancel(
            topic.consumer_tag.as_str().into(),
            BasicCancelOptions::default(),
        )
        .await;
    let _ = topic
        .channel
        .close(200, "last live subscriber left".into())
        .await;
}

/// Drains the topic's consumer and fans each delivery out without ever waiting on a
/// socket: a full socket buffer (frames or bytes) drops that socket's copy (live is
/// at-most-once).
async fn consume(
    topic: Arc<Topic>,
    mut consumer: lapin::Consumer,
    key: TopicKey,
    slot: Slot,
    registry: Arc<Registry>,
) {
    while let Some(delivery) = consumer.next().await {
        let Ok(delivery) = delivery else { break };
        if !crate::broker::poison::admit_live(&delivery) {
            continue;
        }
        if let Some(filter) = &topic.filter
            && !filter.matches(delivery.routing_key.as_str())
        {
            telemetry::ws_filtered("live");
            continue;
        }
        // Built once for every subscriber: the JSON (and base64) of a delivery is most
        // of the fan-out's work. Each subscriber's frame only adds its id around it.
        // Rendered on first use, so a format nobody asked for costs nothing.
        let (mut warren, mut cloudevents) = (None, None);
        // Nothing below waits (`try_take`, `try_send`), so the lock is held for one pass
        // over the subscribers and no per-delivery copy of their list is made.
        for subscriber in lock(&topic.subscribers).values() {
            let shared = match subscriber.format {
                Format::Warren => {
                    warren.get_or_insert_with(|| Arc::new(DeliveryJson::new(&delivery)))
                }
                Format::CloudEvents => cloudevents.get_or_insert_with(|| {
                    Arc::new(DeliveryJson::cloudevent(&delivery, &topic.tenant))
                }),
            };
            let frame = MessageFrame::shared(&subscriber.frame_id, 0, shared);
            let Some(bytes) = subscriber.budget.try_take(frame.approximate_len()) else {
                telemetry::ws_dropped();
                continue;
            };
            match subscriber
                .sink
                .try_send(Outgoing::Message(Box::new(frame), bytes))
            {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => telemetry::ws_dropped(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
    // The consumer ended: cancelled by the last `leave`, or the broker link was lost.
    // In the second case forget the topic so the next subscriber creates a fresh one.
    registry.forget(&key, &slot);
    let subscribers: Vec<Subscriber> = lock(&topic.subscribers).drain().map(|(_, s)| s).collect();
    telemetry::ws_subscriptions("live", -(subscribers.len() as i64));
    for subscriber in subscribers {
        let _ = subscriber.sink.try_send(Outgoing::Ended {
            subscription: subscriber.subscription,
            error: ApiError::BrokerUnavailable {
                detail: "the live subscription lost its broker consumer; subscribe again"
                    .to_owned(),
                retry_after: std::time::Duration::from_secs(1),
            },
        });
    }
}
