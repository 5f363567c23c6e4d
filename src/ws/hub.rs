//! Live fan-out: one exclusive, auto-delete broker queue and consumer per (tenant,
//! exchange, binding key) on this instance, shared by every local live subscriber.
//! Created on the first subscriber, removed after the last leaves.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::{Mutex, mpsc};

use super::Outgoing;
use super::protocol::MessageFrame;
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
    channel: lapin::Channel,
    consumer_tag: String,
    subscribers: std::sync::Mutex<HashMap<u64, Subscriber>>,
    /// Keeps a lazily opened pool from being closed under the consumer.
    _lease: crate::broker::BrokerLease,
}

#[derive(Clone)]
struct Subscriber {
    subscription: String,
    sink: mpsc::Sender<Outgoing>,
}

/// Every live topic of this instance.
type Topics = Arc<Mutex<HashMap<TopicKey, Arc<Topic>>>>;

#[derive(Default)]
pub struct LiveHub {
    topics: Topics,
    next_id: AtomicU64,
}

/// A socket's membership in a live topic; give it back with [`LiveHub::leave`].
#[derive(Debug)]
pub struct LiveSubscription {
    key: TopicKey,
    id: u64,
    pub queue: String,
}

impl LiveHub {
    /// Joins (or creates) the topic; deliveries arrive on `sink` as `Outgoing::Frame`.
    pub async fn join(
        &self,
        tenant: &Tenant,
        exchange: &str,
        binding_key: &str,
        subscription: &str,
        sink: mpsc::Sender<Outgoing>,
        max_queue_length: u32,
    ) -> Result<LiveSubscription, ApiError> {
        let key = TopicKey {
            tenant: tenant.name.clone(),
            exchange: exchange.to_owned(),
            binding_key: binding_key.to_owned(),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber {
            subscription: subscription.to_owned(),
            sink,
        };
        // Held across topic creation so two first subscribers don't create two queues.
        let mut topics = self.topics.lock().await;
        let topic = match topics.get(&key) {
            Some(topic) => topic.clone(),
            None => {
                let (topic, consumer) =
                    create(tenant, exchange, binding_key, max_queue_length).await?;
                let topic = Arc::new(topic);
                topics.insert(key.clone(), topic.clone());
                tokio::spawn(consume(
                    topic.clone(),
                    consumer,
                    key.clone(),
                    self.topics.clone(),
                ));
                topic
            }
        };
        lock(&topic.subscribers).insert(id, subscriber);
        telemetry::ws_subscriptions("live", 1);
        Ok(LiveSubscription {
            key,
            id,
            queue: topic.queue.clone(),
        })
    }

    /// Leaves the topic; the last one out cancels the consumer (the queue auto-deletes).
    pub async fn leave(&self, subscription: LiveSubscription) {
        let mut topics = self.topics.lock().await;
        let Some(topic) = topics.get(&subscription.key).cloned() else {
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
            drop(topics);
            close(&topic).await;
        }
    }

    /// Broker queue names of the live topics (for tests and introspection).
    pub async fn queues(&self) -> Vec<String> {
        self.topics
            .lock()
            .await
            .values()
            .map(|t| t.queue.clone())
            .collect()
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn create(
    tenant: &Tenant,
    exchange: &str,
    binding_key: &str,
    max_queue_length: u32,
) -> Result<(Topic, lapin::Consumer), ApiError> {
    let broker = tenant.broker().await?;
    let channel = broker.consumer_channel().await?;
    let fail = |e: lapin::Error| ApiError::from(broker.failure(&e, exchange));
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
            binding_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    if let Err(e) = bound {
        let _ = channel.close(200, "bind failed".into()).await;
        return Err(fail(e));
    }
    let consumer_tag = format!("warren-live-{}", uuid::Uuid::new_v4().simple());
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
        subscribers: std::sync::Mutex::new(HashMap::new()),
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
/// socket: a full socket buffer drops that socket's copy (live is at-most-once).
async fn consume(topic: Arc<Topic>, mut consumer: lapin::Consumer, key: TopicKey, topics: Topics) {
    while let Some(delivery) = consumer.next().await {
        let Ok(delivery) = delivery else { break };
        if !crate::broker::poison::admit_live(&delivery) {
            continue;
        }
        let subscribers: Vec<Subscriber> = lock(&topic.subscribers).values().cloned().collect();
        for subscriber in subscribers {
            let frame = MessageFrame::new(
                subscriber.subscription.clone(),
                0,
                delivery.exchange.as_str(),
                delivery.routing_key.as_str(),
                delivery.redelivered,
                &delivery.properties,
                &delivery.data,
            );
            match subscriber.sink.try_send(Outgoing::Message(Box::new(frame))) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => telemetry::ws_dropped(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
    // The consumer ended: cancelled by the last `leave`, or the broker link was lost.
    // In the second case forget the topic so the next subscriber creates a fresh one.
    {
        let mut topics = topics.lock().await;
        if topics.get(&key).is_some_and(|t| Arc::ptr_eq(t, &topic)) {
            topics.remove(&key);
        }
    }
    let subscribers: Vec<Subscriber> = lock(&topic.subscribers).drain().map(|(_, s)| s).collect();
    telemetry::ws_subscriptions("live", -(subscribers.len() as i64));
    for subscriber in subscribers {
        let _ = subscriber.sink.try_send(Outgoing::Ended {
            subscription: subscriber.subscription,
            error: ApiError::BrokerUnavailable {
                detail: format!(
                    "the live subscription to {:?} / {:?} lost its broker consumer; subscribe again",
                    key.exchange, key.binding_key
                ),
                retry_after: std::time::Duration::from_secs(1),
            },
        });
    }
}
