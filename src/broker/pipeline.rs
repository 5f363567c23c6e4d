//! The publish pipeline: a batch of messages pipelined on one pooled confirm-mode
//! channel (bounded by the vhost's in-flight confirms and one acquisition deadline),
//! each confirm handed to the channel's sequencer, then all confirms awaited together
//! and judged into a [`PublishResult`] per message, in input order.

use std::time::{Duration, Instant};

use deadpool::managed;
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
    ///
    /// The span is at debug: at info it was made, formatted, entered and closed for
    /// every publish (~6k of a single publish's ~95k instructions, BENCHMARKS.md #32)
    /// for the few lines logged inside it, which the request's own span already ties
    /// to their request.
    #[tracing::instrument(level = "debug", name = "publish", skip_all, fields(vhost = %self.vhost, messages = messages.len()))]
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

        // One timer for all of them: the confirms resolve concurrently whatever order
        // they are awaited in, so awaiting each in turn against one deadline waits no
        // longer than a timer per message did (a timer-wheel entry each and a join over
        // all of them; BENCHMARKS.md #32). Past the deadline, what has arrived counts.
        let deadline = tokio::time::sleep(self.confirm_timeout);
        tokio::pin!(deadline);
        let mut expired = false;
        for mut p in pending {
            let waited = if expired {
                Waited::arrived(&mut p.outcome)
            } else {
                tokio::select! {
                    biased;
                    answer = &mut p.outcome => match answer {
                        Ok(answer) => Waited::Answer(answer),
                        Err(_) => Waited::Lost,
                    },
                    () = &mut deadline => {
                        expired = true;
                        Waited::arrived(&mut p.outcome)
                    }
                }
            };
            let (index, result) = self.settle(p, waited, messages);
            results[index] = Some(result);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(PublishError::LostBeforeConfirm("not attempted".into())))
            })
            .collect()
    }

    /// The answer for one awaited confirm, and its latency counted: the time to the
    /// instant its sequencer saw the confirm (or to now, when none came).
    fn settle(
        &self,
        p: Pending,
        waited: Waited,
        messages: &[OutgoingMessage],
    ) -> (usize, PublishResult) {
        let message = &messages[p.index];
        let (result, latency) = match waited {
            Waited::Answer((outcome, at)) => (
                self.judge(outcome, message),
                at.saturating_duration_since(p.started),
            ),
            Waited::Lost => (
                Err(PublishError::LostBeforeConfirm(
                    "the channel's confirm tracking stopped".to_owned(),
                )),
                p.started.elapsed(),
            ),
            Waited::TimedOut => {
                // The channel is suspect: close it so the pool replaces it and lapin
                // drops its bookkeeping for this message.
                let channel = p.channel;
                self.tasks.spawn(async move {
                    let _ = channel.close(200, "confirm timeout".into()).await;
                });
                (
                    Err(PublishError::ConfirmTimeout(self.confirm_timeout)),
                    p.started.elapsed(),
                )
            }
        };
        telemetry::confirm_latency(latency);
        (p.index, result)
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

/// What awaiting one confirm came to.
enum Waited {
    Answer((Outcome, Instant)),
    /// The sequencer went away without an answer.
    Lost,
    TimedOut,
}

impl Waited {
    /// Past the deadline: the answer if it has arrived.
    fn arrived(outcome: &mut oneshot::Receiver<(Outcome, Instant)>) -> Self {
        match outcome.try_recv() {
            Ok(answer) => Self::Answer(answer),
            Err(oneshot::error::TryRecvError::Closed) => Self::Lost,
            Err(oneshot::error::TryRecvError::Empty) => Self::TimedOut,
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
