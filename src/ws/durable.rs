//! Durable subscriptions: a tenant-scoped named queue that outlives the socket for
//! `ws.durable_queue_expiry_s`, consumed with a prefetch on the socket's own channel;
//! the client acks and nacks. Closing the channel requeues whatever was not acked.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Outgoing;
use super::protocol::MessageFrame;
use crate::broker::{Broker, BrokerLease};
use crate::error::ApiError;
use crate::tenancy::Tenant;

pub struct Durable {
    channel: lapin::Channel,
    task: JoinHandle<()>,
    pub queue: String,
    /// Keeps a lazily opened pool from being closed under the consumer.
    _lease: BrokerLease,
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
    pub exchange: &'a str,
    pub binding_key: &'a str,
    pub queue: String,
    pub prefetch: u16,
    pub expiry: Duration,
    pub slow_consumer_timeout: Duration,
}

impl Durable {
    pub async fn start(
        tenant: &Tenant,
        request: DurableRequest<'_>,
        sink: mpsc::Sender<Outgoing>,
    ) -> Result<Self, ApiError> {
        let broker = tenant.broker().await?;
        let channel = broker.consumer_channel().await?;
        let result = Self::setup(&broker, &channel, &request).await;
        let consumer = match result {
            Ok(consumer) => consumer,
            Err(e) => {
                let _ = channel.close(200, "subscribe failed".into()).await;
                return Err(e);
            }
        };
        let subscription = request.subscription.to_owned();
        let timeout = request.slow_consumer_timeout;
        let task = tokio::spawn(forward(consumer, subscription, sink, timeout));
        Ok(Self {
            channel,
            task,
            queue: request.queue,
            _lease: broker,
        })
    }

    async fn setup(
        broker: &Broker,
        channel: &lapin::Channel,
        request: &DurableRequest<'_>,
    ) -> Result<lapin::Consumer, ApiError> {
        let fail = |e: lapin::Error| ApiError::from(broker.failure(&e, request.exchange));
        channel
            .basic_qos(request.prefetch, BasicQosOptions::default())
            .await
            .map_err(fail)?;
        let mut arguments = FieldTable::default();
        let expiry_ms = u32::try_from(request.expiry.as_millis()).unwrap_or(u32::MAX);
        arguments.insert("x-expires".into(), AMQPValue::LongUInt(expiry_ms));
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
                request.exchange.into(),
                request.binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail)?;
        let tag = format!("warren-durable-{}", uuid::Uuid::new_v4().simple());
        channel
            .basic_consume(
                request.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail)
    }

    pub async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), ApiError> {
        self.channel
            .basic_ack(delivery_tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| ack_error(&e))
    }

    pub async fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), ApiError> {
        self.channel
            .basic_nack(delivery_tag, BasicNackOptions { multiple, requeue })
            .await
            .map_err(|e| ack_error(&e))
    }

    /// Stops consuming; unacked deliveries go back to the queue, which stays.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.channel.close(200, "unsubscribed".into()).await;
    }
}

/// An ack or nack fails at once only when the subscription's channel is gone (a bad
/// delivery tag is refused by the broker later, by closing the channel): the broker
/// side is unavailable, not the client's frame wrong.
fn ack_error(error: &lapin::Error) -> ApiError {
    ApiError::BrokerUnavailable {
        detail: format!(
            "the acknowledgement could not reach the broker ({error}); the subscription's unacked messages will be redelivered"
        ),
        retry_after: Duration::from_secs(1),
    }
}

/// Moves deliveries to the socket, waiting for room (the prefetch bounds how many are
/// outstanding); a socket that takes nothing for the slow-consumer timeout is closed.
async fn forward(
    mut consumer: lapin::Consumer,
    subscription: String,
    sink: mpsc::Sender<Outgoing>,
    timeout: Duration,
) {
    while let Some(delivery) = consumer.next().await {
        let Ok(delivery) = delivery else { break };
        if !crate::broker::poison::admit_durable(&delivery).await {
            continue;
        }
        let frame = MessageFrame::new(
            subscription.clone(),
            delivery.delivery_tag,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            delivery.redelivered,
            &delivery.properties,
            &delivery.data,
        );
        match sink
            .send_timeout(Outgoing::Message(Box::new(frame)), timeout)
            .await
        {
            Ok(()) => {}
            // The socket's writer is stuck too, and closes it with 4408 on its own timer.
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => return,
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
        }
    }
    let _ = sink
        .send(Outgoing::Ended {
            subscription,
            error: ApiError::BrokerUnavailable {
                detail: "the durable subscription lost its broker consumer; subscribe again to resume where it stopped".to_owned(),
                retry_after: Duration::from_secs(1),
            },
        })
        .await;
}
