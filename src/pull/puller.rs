//! One queue's side of pull consume on this replica: the channel every lease of the
//! queue is a delivery on (tags belong to a channel), `basic.get` for what is there,
//! and, while receives wait for messages (long polls), one consumer with a prefetch of
//! one that hands each arriving message to the oldest waiting receive (and gives it
//! back when nobody waits any more). When the channel is lost, its leases are gone
//! with it: the broker requeues them, and each channel has a generation so that a
//! lease of an old one is known for lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::broker::{BrokerLease, ConsumerChannel};
use crate::error::ApiError;
use crate::tenancy::Tenant;

/// A delivery and the generation of the channel it came on.
pub type Got = (Delivery, u64);

pub struct Puller {
    pub tenant: Arc<Tenant>,
    pub queue: String,
    open: tokio::sync::Mutex<Option<Open>>,
    generation: AtomicU64,
    waiters: Mutex<Waiters>,
}

struct Open {
    channel: Arc<ConsumerChannel>,
    generation: u64,
    /// Keeps a lazily opened pool from closing under the leases.
    broker: Arc<BrokerLease>,
    /// Counts against the tenant's `limits.max_consumers`.
    _consumer: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Waiters {
    queue: VecDeque<oneshot::Sender<Got>>,
    consuming: bool,
}

impl Puller {
    pub fn new(tenant: Arc<Tenant>, queue: String) -> Self {
        Self {
            tenant,
            queue,
            open: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            waiters: Mutex::default(),
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue's channel (opened if needed: 404 when the queue does not exist).
    pub async fn channel(&self) -> Result<(Arc<ConsumerChannel>, u64, Arc<BrokerLease>), ApiError> {
        let mut open = self.open.lock().await;
        if let Some(o) = open.as_ref()
            && o.channel.status().connected()
        {
            return Ok((o.channel.clone(), o.generation, o.broker.clone()));
        }
        *open = None;
        let permit = self.tenant.quota.admit_consumer()?;
        let broker = Arc::new(self.tenant.broker().await?);
        let channel = Arc::new(
            broker
                .consumer_channel()
                .await
                .map_err(crate::delivery::subscribe_failure)?,
        );
        let checked = async {
            channel.basic_qos(1, BasicQosOptions::default()).await?;
            channel
                .queue_declare(
                    self.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|_| ())
        };
        if let Err(error) = checked.await {
            let _ = channel.close(200, "pull setup failed".into()).await;
            return Err(if crate::broker::publish::is_not_found(&error) {
                ApiError::QueueNotFound(self.queue.clone())
            } else {
                crate::delivery::subscribe_failure(broker.failure(&error, ""))
            });
        }
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        *open = Some(Open {
            channel: channel.clone(),
            generation,
            broker: broker.clone(),
            _consumer: permit,
        });
        Ok((channel, generation, broker))
    }

    /// Whether leases of `generation` are still deliveries on a live channel.
    pub async fn holds(&self, generation: u64) -> Option<Arc<ConsumerChannel>> {
        let open = self.open.lock().await;
        open.as_ref()
            .filter(|o| o.generation == generation && o.channel.status().connected())
            .map(|o| o.channel.clone())
    }

    /// Forgets the channel after an error on it (its deliveries go back to the queue).
    pub async fn lost(&self, generation: u64) {
        let mut open = self.open.lock().await;
        if open.as_ref().is_some_and(|o| o.generation == generation)
            && let Some(o) = open.take()
        {
            let _ = o.channel.close(200, "pull channel lost".into()).await;
        }
    }

    /// Up to `n` messages that are in the queue now.
    pub async fn get(&self, n: usize) -> Result<Vec<Got>, ApiError> {
        let (channel, generation, broker) = self.channel().await?;
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            match channel
                .basic_get(
                    self.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
            {
                Ok(Some(message)) => got.push((message.delivery, generation)),
                Ok(None) => break,
                Err(error) => {
                    // The channel is gone, and what it got with it (requeued).
                    self.lost(generation).await;
                    return Err(if crate::broker::publish::is_not_found(&error) {
                        ApiError::QueueNotFound(self.queue.clone())
                    } else {
                        crate::delivery::subscribe_failure(broker.failure(&error, ""))
                    });
                }
            }
        }
        Ok(got)
    }

    /// Waits until `deadline` for one message to arrive (a long poll).
    pub async fn wait_one(
        self: &Arc<Self>,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Got>, ApiError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut waiters = self.waiters();
            waiters.queue.push_back(tx);
            !std::mem::replace(&mut waiters.consuming, true)
        };
        if start {
            let (channel, generation, _) = match self.channel().await {
                Ok(open) => open,
                Err(error) => {
                    self.waiters().consuming = false;
                    return Err(error);
                }
            };
            let this = self.clone();
            tokio::spawn(async move { this.forward(channel, generation).await });
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(got)) => Ok(Some(got)),
            // Timed out, or the consumer ended (its channel lost): nothing came.
            _ => Ok(None),
        }
    }

    /// The long-poll consumer: each delivery to the oldest receive still waiting; with
    /// none left, the delivery goes back and the consumer stops.
    async fn forward(self: Arc<Self>, channel: Arc<ConsumerChannel>, generation: u64) {
        let consumer = channel.consume(&self.queue, "warren-pull").await;
        let Ok(mut consumer) = consumer else {
            {
                let mut waiters = self.waiters();
                waiters.consuming = false;
                waiters.queue.clear();
            }
            self.lost(generation).await;
            return;
        };
        loop {
            let Some(Ok(delivery)) = consumer.next().await else {
                let mut waiters = self.waiters();
                waiters.consuming = false;
                waiters.queue.clear();
                return;
            };
            let (left, stop) = {
                let mut waiters = self.waiters();
                let mut got = Some((delivery, generation));
                while let Some(tx) = waiters.queue.pop_front() {
                    let Some(item) = got.take() else { break };
                    match tx.send(item) {
                        Ok(()) => break,
                        // That receive gave up (timed out, client gone): the next one.
                        Err(back) => got = Some(back),
                    }
                }
                let stop = waiters.queue.is_empty();
                if stop {
                    waiters.consuming = false;
                }
                (got, stop)
            };
            if let Some((delivery, _)) = left {
                let _ = channel.requeue(delivery.delivery_tag).await;
            }
            if stop {
                let _ = channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await;
                // What the broker sent before the cancel took effect goes back too.
                while let Ok(Some(Ok(delivery))) =
                    tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
                {
                    let _ = channel.requeue(delivery.delivery_tag).await;
                }
                return;
            }
        }
    }
}
