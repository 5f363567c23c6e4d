//! The router of one vhost on one replica: consumes `warren.scheduled.due` (competing
//! with the other replicas' routers), moves each message one rung down, or fires it.
//! Nothing is acked before what replaces it is confirmed: a hop's republish, the
//! message's own publish, or its copy in the scheduled DLQ. A failure the broker may
//! get over (no link, no confirm) puts the message back in the due queue a second
//! later; a failure that will not change (unroutable, exchange gone, grant withdrawn)
//! sends it to the DLQ.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{DLQ, DUE_QUEUE, ERROR_HEADER, Scheduled};
use crate::broker::{Broker, ConsumerChannel, PublishError};
use crate::config::ScheduleConfig;
use crate::error::ApiError;
use crate::publishing::now_ms;
use crate::telemetry;
use crate::tenancy::Tenant;

/// How long a router waits before looking again for a due queue nobody declared yet
/// (a local accept declares it and wakes the router at once).
const LOOK_AGAIN: Duration = Duration::from_secs(30);
/// How long a message the broker could not take waits before it is put back.
const BACK_OFF: Duration = Duration::from_secs(1);

pub struct Router {
    broker: Arc<Broker>,
    /// The configured tenants on this vhost: a message fires only for one of them, and
    /// only where that tenant's grants allow now.
    tenants: Vec<Arc<Tenant>>,
    wake: Arc<Notify>,
    prefetch: u16,
    top: u32,
}

/// How handling a delivery ended.
enum Settled {
    Done,
    /// The channel is gone: start over.
    Lost,
}

impl Router {
    pub fn new(
        broker: Arc<Broker>,
        tenants: Vec<Arc<Tenant>>,
        wake: Arc<Notify>,
        config: &ScheduleConfig,
    ) -> Self {
        Self {
            broker,
            tenants,
            wake,
            prefetch: config.prefetch,
            top: super::top_rung(config.max_delay_ms),
        }
    }

    /// Runs until `stop`. Messages in hand then finish (each waits under 100 ms before
    /// it fires); closing the channel gives back the rest.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let vhost = this.broker.vhost().to_owned();
        let mut told = false;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let wait = match this.open().await {
                Ok((channel, consumer)) => {
                    if told {
                        info!(%vhost, "Scheduled-publish router consuming again.");
                    }
                    told = false;
                    this.clone().consume(channel.clone(), consumer, &stop).await;
                    let _ = channel.close(200, "router stopped".into()).await;
                    BACK_OFF
                }
                Err(None) if this.broker.health().is_connected() => LOOK_AGAIN,
                Err(None) => BACK_OFF,
                Err(Some(error)) => {
                    if !told {
                        warn!(%vhost, %error, "Scheduled-publish router cannot consume its due queue; retrying every second.");
                        told = true;
                    }
                    BACK_OFF
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = this.wake.notified() => {}
                () = stop.cancelled() => break,
            }
        }
    }

    /// The consumer on the due queue; `Err(None)` when the queue does not exist yet or
    /// the broker is not reachable (readiness and the pool's log say so already).
    async fn open(&self) -> Result<(Arc<ConsumerChannel>, lapin::Consumer), Option<String>> {
        let channel = match self.broker.consumer_channel().await {
            Ok(channel) => Arc::new(channel),
            // No link: readiness and the pool's log say so. (With the link up, an
            // unavailable channel is amqp.max_consumer_channels taken: said below.)
            Err(PublishError::Unavailable { .. }) if !self.broker.health().is_connected() => {
                return Err(None);
            }
            Err(error) => return Err(Some(error.to_string())),
        };
        match channel
            .consume_with_prefetch(DUE_QUEUE, "warren-schedule", self.prefetch)
            .await
        {
            Ok(consumer) => Ok((channel, consumer)),
            Err(error) => {
                let _ = channel.close(200, "router setup failed".into()).await;
                if crate::broker::publish::is_not_found(&error) {
                    Err(None)
                } else {
                    Err(Some(self.broker.failure(&error, "").to_string()))
                }
            }
        }
    }

    async fn consume(
        self: Arc<Self>,
        channel: Arc<ConsumerChannel>,
        mut consumer: lapin::Consumer,
        stop: &CancellationToken,
    ) {
        let mut tasks: JoinSet<Settled> = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if matches!(done, Ok(Settled::Lost) | Err(_)) {
                        break;
                    }
                }
                next = consumer.next() => {
                    let Some(Ok(delivery)) = next else { break };
                    let (this, channel) = (self.clone(), channel.clone());
                    tasks.spawn(async move { this.handle(&channel, delivery).await });
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn handle(&self, channel: &ConsumerChannel, delivery: Delivery) -> Settled {
        if let Some(reason) = crate::broker::poison::judge(&delivery) {
            // Not something Warren scheduled (it bounds what it accepts far lower): the
            // due queue has no dead-letter exchange, so this drops it.
            warn!(vhost = %self.broker.vhost(), reason = reason.as_str(), "A message on the scheduled-publish due queue cannot be read; dropped it.");
            let dropped = BasicNackOptions {
                multiple: false,
                requeue: false,
            };
            return match channel.basic_nack(delivery.delivery_tag, dropped).await {
                Ok(()) => Settled::Done,
                Err(_) => Settled::Lost,
            };
        }
        let scheduled = match super::unwrap(&delivery.properties, &delivery.data) {
            Ok(scheduled) => scheduled,
            Err(why) => {
                warn!(vhost = %self.broker.vhost(), %why, "A message on the scheduled-publish due queue is not a scheduled message; moved it to the scheduled DLQ.");
                return self
                    .dead_letter(channel, &delivery, "-", "invalid_request")
                    .await;
            }
        };
        let remaining = scheduled.due_ms.saturating_sub(now_ms());
        if let Some(k) = super::rung(remaining, self.top) {
            let next = super::hop(&delivery.properties, &delivery.data, super::rung_queue(k));
            return match self.send(next).await {
                Ok(()) => {
                    telemetry::schedule_hop();
                    ack(channel, &delivery).await
                }
                Err(_) => self.later(channel, &delivery).await,
            };
        }
        tokio::time::sleep(Duration::from_millis(remaining)).await;
        self.fire(channel, &delivery, scheduled).await
    }

    /// Publishes the message to its exchange, as the publisher asked, if the tenant's
    /// grants allow it now.
    async fn fire(
        &self,
        channel: &ConsumerChannel,
        delivery: &Delivery,
        scheduled: Scheduled,
    ) -> Settled {
        let Some(tenant) = self.tenants.iter().find(|t| t.name == scheduled.tenant) else {
            return self
                .dead_letter(channel, delivery, &scheduled.tenant, "forbidden")
                .await;
        };
        let label = tenant.metrics_label.as_str();
        let m = &scheduled.message;
        let allowed = std::iter::once(&m.routing_key)
            .chain(&scheduled.extra_routing_keys)
            .all(|key| tenant.authorize_publish(&m.exchange, key).is_ok());
        if !allowed {
            return self
                .dead_letter(channel, delivery, label, "forbidden")
                .await;
        }
        match self.broker.publish(m).await {
            Ok(_) => {
                telemetry::schedule_fired(label, "fired", "");
                let late = now_ms().saturating_sub(scheduled.due_ms);
                telemetry::schedule_lag(Duration::from_millis(late));
                ack(channel, delivery).await
            }
            Err(
                PublishError::Unavailable { .. }
                | PublishError::ConfirmTimeout(_)
                | PublishError::LostBeforeConfirm(_),
            ) => {
                // No confirm: the broker may or may not have it. Firing it again may
                // publish it twice (with the same message_id); not firing could lose it.
                telemetry::schedule_fired(label, "retried", "");
                self.later(channel, delivery).await
            }
            Err(error) => {
                let code = ApiError::from(error).code();
                self.dead_letter(channel, delivery, label, code).await
            }
        }
    }

    /// Copies the message to the scheduled DLQ with why (confirmed), then acks it.
    async fn dead_letter(
        &self,
        channel: &ConsumerChannel,
        delivery: &Delivery,
        label: &str,
        code: &'static str,
    ) -> Settled {
        let mut copy = super::hop(&delivery.properties, &delivery.data, DLQ.to_owned());
        let mut headers = copy.properties.headers().clone().unwrap_or_default();
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(code.into()));
        copy.properties = copy.properties.with_headers(headers);
        match self.send(copy).await {
            Ok(()) => {
                // A message naming a tenant not on this vhost is counted under "-":
                // its name is not a label anyone configured.
                let label = if self.tenants.iter().any(|t| t.metrics_label == label) {
                    label
                } else {
                    "-"
                };
                telemetry::schedule_fired(label, "dead_lettered", code);
                ack(channel, delivery).await
            }
            Err(_) => self.later(channel, delivery).await,
        }
    }

    /// Publishes onto the ladder (declaring it if someone deleted part of it).
    async fn send(&self, message: super::OutgoingMessage) -> Result<(), PublishError> {
        let results = super::publish_all(&self.broker, &[message], &[true], self.top, None).await;
        results
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(PublishError::LostBeforeConfirm("no result".to_owned())))
            .map(|_| ())
    }

    /// Puts the message back in the due queue after a pause, for another try.
    async fn later(&self, channel: &ConsumerChannel, delivery: &Delivery) -> Settled {
        tokio::time::sleep(BACK_OFF).await;
        match channel.requeue(delivery.delivery_tag).await {
            Ok(()) => Settled::Done,
            Err(_) => Settled::Lost,
        }
    }
}

async fn ack(channel: &ConsumerChannel, delivery: &Delivery) -> Settled {
    match channel
        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
        .await
    {
        Ok(()) => Settled::Done,
        Err(_) => Settled::Lost,
    }
}

/// Starts one router per configured vhost (tenants sharing a pool share its router).
pub fn start(
    tenants: &crate::tenancy::Tenants,
    config: &crate::config::ScheduleConfig,
    tasks: &tokio_util::task::TaskTracker,
    stop: &tokio_util::sync::CancellationToken,
) {
    for (broker, wake, on_it) in tenants.scheduling_pools() {
        let router = Router::new(broker, on_it, wake, config);
        tasks.spawn(router.run(stop.clone()));
    }
}
