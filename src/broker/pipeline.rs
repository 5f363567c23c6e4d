//! The publish pipeline: a batch of messages pipelined on one pooled confirm-mode
//! channel (bounded by the vhost's in-flight confirms and one acquisition deadline),
//! each confirm handed to the channel's sequencer, then all confirms awaited together
//! and judged into a [`PublishResult`] per message, in input order.

use std::time::{Duration, Instant};

use deadpool::managed;
use futures::future::join_all;
use lapin::options::BasicPublishOptions;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::channel::{ChannelManager, Outcome, Tracked, confirm_future, return_key};
use super::{Broker, BrokerError, OutgoingMessage, PublishError, PublishResult, Published};
use crate::telemetry;

impl Broker {
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
        self.check_messages(messages, &mut results).await;

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
                        self.tasks.spawn(async move {
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
}

struct Pending {
    index: usize,
    outcome: oneshot::Receiver<(Outcome, Instant)>,
    _permit: OwnedSemaphorePermit,
    channel: lapin::Channel,
    started: Instant,
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
