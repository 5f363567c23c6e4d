//! One push subscription on one replica: consumes its queue (competing with the other
//! replicas; a single active consumer when ordered), POSTs each message, and settles it
//! by the outcome. Nothing is acked before the receiver's 2xx. The queue's retry policy
//! is the only retry owner: a failed attempt moves the message to the next delay queue
//! (or, ordered, waits that delay in place), and after the last delay, or at once for a
//! permanent failure, to `<queue>.dlq` with `x-warren-push-status` and
//! `x-warren-attempt`. An endpoint that keeps failing pauses the subscription: it stops
//! consuming (messages wait in the queue) and probes with one message at a time, with
//! a backoff, until one is delivered.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::client::{Answer, Attempt, PushClient};
use super::sign;
use crate::broker::{BrokerLease, ConsumerChannel};
use crate::config::{PushFormat, PushSettings, PushSpec};
use crate::delivery::render::{Format, MessageFrame};
use crate::telemetry;
use crate::tenancy::Tenant;
use crate::tenancy::quota::Bucket;
use crate::topology::retry::{self, Retained};

/// The header a dead-lettered (or retried) push message carries: the last attempt's
/// status, or `timeout` / `connect_error` / `refused_address`.
pub const STATUS_HEADER: &str = "x-warren-push-status";

/// Where a subscription is, for `/readyz` (operators' view) and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not consuming yet (connecting to the broker).
    Starting,
    Active,
    /// The endpoint kept failing: not consuming; the next probe is due.
    Paused,
    /// Trying one message after a pause.
    Probing,
    Stopped,
}

/// What `/readyz` shows of a subscription.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub tenant: String,
    pub name: String,
    pub state: State,
    pub consecutive_failures: u32,
    /// The last failed attempt's status (`503`, `timeout`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

/// A subscription's shared status: written by its task, read by `/readyz`.
pub struct Shared {
    status: Mutex<Status>,
    label: String,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    fn set_state(&self, state: State) {
        self.lock().state = state;
        telemetry::push_paused(&self.label, state == State::Paused);
    }

    /// Counts a settled attempt; the consecutive failures so far.
    fn record(&self, answer: &Answer, failed: bool) -> u32 {
        let mut status = self.lock();
        if failed {
            status.consecutive_failures = status.consecutive_failures.saturating_add(1);
            status.last_failure = Some(answer.label());
        } else {
            status.consecutive_failures = 0;
        }
        status.consecutive_failures
    }
}

/// What happened to one delivery, for the loop that runs the subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Delivered,
    /// The endpoint failed (a retryable answer); the message went on by the policy.
    Failed,
    /// Refused for good (4xx) or poison: the endpoint is up.
    Refused,
    /// The broker side failed (the channel is gone): start over.
    Lost,
}

pub struct Subscription {
    spec: Arc<PushSpec>,
    tenant: Arc<Tenant>,
    client: PushClient,
    settings: PushSettings,
    shared: Arc<Shared>,
    rate: Option<Arc<Bucket>>,
}

impl Subscription {
    pub fn new(
        spec: PushSpec,
        tenant: Arc<Tenant>,
        client: PushClient,
        settings: PushSettings,
    ) -> (Self, Arc<Shared>) {
        let label = spec.label();
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                tenant: spec.tenant.clone(),
                name: spec.name.clone(),
                state: State::Starting,
                consecutive_failures: 0,
                last_failure: None,
            }),
            label,
        });
        telemetry::push_paused(&shared.label, false);
        telemetry::push_in_flight(&shared.label, 0.0);
        let rate = spec.rate_per_s.map(|r| Arc::new(Bucket::new(r)));
        (
            Self {
                spec: Arc::new(spec),
                tenant,
                client,
                settings,
                shared: shared.clone(),
                rate,
            },
            shared,
        )
    }

    /// Runs until `stop`: deliveries in flight then finish (the app's shutdown bounds
    /// the wait), and closing the channel gives back what was not settled.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let mut probe_wait = Duration::from_secs(1);
        let mut probing = false;
        // Say once that the queue cannot be consumed, not every second.
        let mut told = false;
        loop {
            if stop.is_cancelled() {
                break;
            }
            this.shared.set_state(if probing {
                State::Probing
            } else {
                State::Starting
            });
            let outcome = match this.open(probing).await {
                Ok((broker, channel, consumer)) => {
                    told = false;
                    if !probing {
                        this.shared.set_state(State::Active);
                    }
                    let ended = this
                        .clone()
                        .consume(&broker, channel.clone(), consumer, probing, &stop)
                        .await;
                    let _ = channel
                        .close(200, "push subscription paused or stopped".into())
                        .await;
                    ended
                }
                Err(error) => {
                    if !told {
                        warn!(subscription = %this.shared.label, %error, "Push subscription cannot consume its queue; retrying every second.");
                        told = true;
                    }
                    Ended::Lost
                }
            };
            match outcome {
                Ended::Stopped => break,
                Ended::Lost => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = stop.cancelled() => break,
                    }
                }
                Ended::Pause => {
                    this.shared.set_state(State::Paused);
                    info!(subscription = %this.shared.label, wait_s = probe_wait.as_secs(), "Push subscription paused: its endpoint keeps failing.");
                    tokio::select! {
                        () = tokio::time::sleep(probe_wait) => {}
                        () = stop.cancelled() => break,
                    }
                    probe_wait = (probe_wait * 2)
                        .min(Duration::from_secs(this.settings.max_probe_interval_s));
                    probing = true;
                }
                Ended::Resume => {
                    info!(subscription = %this.shared.label, "Push subscription resumed.");
                    probe_wait = Duration::from_secs(1);
                    probing = false;
                }
            }
        }
        this.shared.set_state(State::Stopped);
    }

    async fn open(
        &self,
        probing: bool,
    ) -> Result<(Arc<BrokerLease>, Arc<ConsumerChannel>, lapin::Consumer), String> {
        let broker = Arc::new(self.tenant.broker().await.map_err(|e| e.to_string())?);
        let channel = Arc::new(broker.consumer_channel().await.map_err(|e| e.to_string())?);
        let prefetch = if probing { 1 } else { self.spec.max_in_flight };
        match channel
            .consume_with_prefetch(&self.spec.queue, "warren-push", prefetch)
            .await
        {
            Ok(consumer) => Ok((broker, channel, consumer)),
            Err(error) => {
                let _ = channel.close(200, "push setup failed".into()).await;
                Err(broker.failure(&error, "").to_string())
            }
        }
    }

    /// Takes deliveries until stopped, lost or paused; each runs as a task of its own
    /// (the prefetch bounds how many), ordered ones one after the other.
    async fn consume(
        self: Arc<Self>,
        broker: &Arc<BrokerLease>,
        channel: Arc<ConsumerChannel>,
        mut consumer: lapin::Consumer,
        probing: bool,
        stop: &CancellationToken,
    ) -> Ended {
        let mut tasks: JoinSet<Settled> = JoinSet::new();
        // One delivery at a time while probing, and always when ordered: the next is
        // taken once this one is settled.
        let one_at_a_time = probing || self.spec.ordered;
        let ended = loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break Ended::Stopped,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    match done.unwrap_or(Settled::Lost) {
                        Settled::Lost => break Ended::Lost,
                        Settled::Delivered | Settled::Refused if probing => break Ended::Resume,
                        Settled::Failed if probing => break Ended::Pause,
                        Settled::Failed => {
                            let failures = self.shared.lock().consecutive_failures;
                            if failures >= self.settings.pause_after_failures {
                                break Ended::Pause;
                            }
                        }
                        Settled::Delivered | Settled::Refused => {}
                    }
                }
                next = consumer.next(), if !one_at_a_time || tasks.is_empty() => {
                    let Some(Ok(delivery)) = next else { break Ended::Lost };
                    let (this, broker, channel) = (self.clone(), broker.clone(), channel.clone());
                    tasks.spawn(async move { this.deliver(&broker, &channel, delivery).await });
                }
            }
        };
        if matches!(ended, Ended::Stopped) && self.spec.ordered {
            // An ordered delivery may be waiting out a retry delay: it goes back to the
            // head of its queue when the channel closes, still first in line.
            tasks.abort_all();
        }
        // Deliveries in flight finish and settle (the app's shutdown bounds this). What
        // the broker pushed and nobody took goes back when the caller closes the
        // channel.
        while tasks.join_next().await.is_some() {}
        ended
    }

    /// Delivers one message and settles it.
    async fn deliver(
        &self,
        broker: &BrokerLease,
        channel: &ConsumerChannel,
        delivery: Delivery,
    ) -> Settled {
        let label = &self.shared.label;
        let tag = delivery.delivery_tag;
        if crate::broker::poison::judge(&delivery).is_some() {
            // Counted as poison; its queue dead-letters it to the DLQ.
            let _ = crate::broker::poison::admit_durable(&delivery).await;
            telemetry::push_delivered(label, "poison");
            return Settled::Refused;
        }
        let _in_flight = InFlight::new(label);
        let mut request = Request::of(&self.spec, &self.tenant.name, &delivery);
        // The delivery's span lasts until it is settled; the receiver gets its context
        // (a span only while traces are exported).
        let delivered = crate::otel::Delivered::of(&delivery);
        let _span = crate::otel::delivery_span("push", delivered.as_deref());
        if let Some((traceparent, _)) = crate::otel::w3c(&_span)
            && let Ok(value) = http::HeaderValue::from_str(&traceparent)
        {
            request
                .headers
                .push((http::HeaderName::from_static("traceparent"), value));
        }
        let mut attempt = retry::attempt(&delivery.properties);
        loop {
            let answer = self.attempt(&request).await;
            let verdict = Verdict::of(&answer);
            self.shared.record(&answer, verdict == Verdict::Retry);
            match verdict {
                Verdict::Ack => {
                    break match channel.basic_ack(tag, BasicAckOptions::default()).await {
                        Ok(()) => {
                            telemetry::push_delivered(label, "delivered");
                            Settled::Delivered
                        }
                        Err(_) => Settled::Lost,
                    };
                }
                Verdict::DeadLetter => {
                    break self
                        .move_on(
                            broker,
                            channel,
                            &request,
                            &delivery,
                            &answer,
                            self.spec.retry.dlq(),
                            attempt,
                        )
                        .await
                        .map_or(Settled::Lost, |_| Settled::Refused);
                }
                Verdict::Retry => {
                    let at_least = match &answer {
                        Answer::Status {
                            retry_after: Some(wait),
                            ..
                        } => *wait,
                        _ => Duration::ZERO,
                    };
                    let (queue, next) =
                        retry::next_hop_at_least(&self.spec.retry, attempt, at_least);
                    if !self.spec.ordered || queue == self.spec.retry.dlq() {
                        break self
                            .move_on(broker, channel, &request, &delivery, &answer, queue, next)
                            .await
                            .map_or(Settled::Lost, |_| Settled::Failed);
                    }
                    // Ordered: wait that hop's delay here, holding the message, so
                    // nothing after it overtakes it.
                    let index = usize::try_from(next)
                        .unwrap_or(usize::MAX)
                        .saturating_sub(1);
                    let delay = self.spec.retry.delays_ms.get(index).copied().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
                    attempt = next;
                }
            }
        }
    }

    /// One HTTP attempt (after the subscription's rate limit).
    async fn attempt(&self, request: &Request) -> Answer {
        if let Some(bucket) = &self.rate {
            while let Err(wait) = bucket.take(1.0) {
                tokio::time::sleep(wait).await;
            }
        }
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut headers = request.headers.clone();
        let signature = sign::signature(&self.spec.secrets, &request.id, timestamp, &request.body);
        for (name, value) in [
            ("webhook-id", request.id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ] {
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                headers.push((http::HeaderName::from_static(name), value));
            }
        }
        headers.extend(self.spec.headers.iter().cloned());
        let started = Instant::now();
        let answer = self
            .client
            .post(Attempt {
                url: &self.spec.url,
                timeout: self.spec.timeout,
                body: request.body.clone(),
                headers,
            })
            .await;
        telemetry::push_attempt(&self.shared.label, answer.class(), started.elapsed());
        answer
    }

    /// Republishes the message to `queue` (a delay queue or the DLQ) with its attempt
    /// and the last status, confirmed, then acks it; if it cannot be republished it
    /// goes back to its queue (nack with requeue), never lost.
    #[allow(clippy::too_many_arguments)]
    async fn move_on(
        &self,
        broker: &BrokerLease,
        channel: &ConsumerChannel,
        request: &Request,
        delivery: &Delivery,
        answer: &Answer,
        queue: String,
        attempt: u32,
    ) -> Result<(), ()> {
        let label = &self.shared.label;
        // Keep the webhook-id across hops: a message without a message_id gets the one
        // its first delivery was sent with.
        let mut properties = delivery.properties.clone();
        if properties.message_id().is_none() {
            properties = properties.with_message_id(request.id.as_str().into());
        }
        let message = Retained {
            body: bytes::Bytes::from(delivery.data.clone()),
            properties,
        };
        let status = AMQPValue::LongString(answer.label().into());
        let sent = retry::send_to(
            broker,
            &queue,
            Some(attempt),
            &message,
            &[(STATUS_HEADER, status)],
        )
        .await;
        let tag = delivery.delivery_tag;
        let settled = match sent {
            Ok(()) => {
                let dead = queue == self.spec.retry.dlq();
                telemetry::push_delivered(label, if dead { "dead_lettered" } else { "retried" });
                channel.basic_ack(tag, BasicAckOptions::default()).await
            }
            Err(error) => {
                warn!(subscription = %label, %error, "Could not move a failed push delivery on; requeued it.");
                telemetry::push_delivered(label, "requeued");
                channel.requeue(tag).await
            }
        };
        settled.map_err(|_| ())
    }
}

/// Counts a delivery in `warren_push_in_flight` until dropped (also when its task is
/// aborted at shutdown).
struct InFlight<'a>(&'a str);

impl<'a> InFlight<'a> {
    fn new(label: &'a str) -> Self {
        telemetry::push_in_flight(label, 1.0);
        Self(label)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        telemetry::push_in_flight(self.0, -1.0);
    }
}

/// How a subscription's consume loop ended.
enum Ended {
    Stopped,
    Lost,
    Pause,
    /// A probe was answered: consume again with the full window.
    Resume,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ack,
    /// 408, 429, 5xx, no connection, no answer in time: the retry policy.
    Retry,
    /// Any other answer (3xx, which is not followed, and 4xx): the DLQ at once.
    DeadLetter,
}

impl Verdict {
    fn of(answer: &Answer) -> Self {
        match answer {
            Answer::Status { status, .. } if (200..300).contains(status) => Self::Ack,
            Answer::Status { status, .. } if *status == 408 || *status == 429 || *status >= 500 => {
                Self::Retry
            }
            Answer::Status { .. } => Self::DeadLetter,
            Answer::Timeout | Answer::ConnectError | Answer::Refused => Self::Retry,
        }
    }
}

/// What every attempt of one delivery sends: the same id and body.
struct Request {
    id: String,
    body: bytes::Bytes,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Request {
    fn of(spec: &PushSpec, tenant: &str, delivery: &Delivery) -> Self {
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .filter(|m| !m.is_empty() && http::HeaderValue::from_str(m).is_ok())
            .unwrap_or_else(|| format!("msg_{}", crate::ids::uuid_v4().simple()));
        let mut headers = trace_headers(delivery);
        let body = match spec.format {
            PushFormat::Warren => {
                headers.push((
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                ));
                let frame = MessageFrame::formatted(&spec.name, delivery, Format::Warren, tenant);
                bytes::Bytes::from(frame.to_json())
            }
            PushFormat::CloudEvents => super::cloudevents::binary(delivery, tenant, &mut headers),
        };
        Self { id, body, headers }
    }
}

/// The W3C trace context the message carries, as request headers.
fn trace_headers(delivery: &Delivery) -> Vec<(http::HeaderName, http::HeaderValue)> {
    let Some(table) = delivery.properties.headers() else {
        return Vec::new();
    };
    ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| {
            let value = match table.inner().get(name)? {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => return None,
            };
            let value = http::HeaderValue::from_str(&value).ok()?;
            Some((http::HeaderName::from_static(name), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_spec() {
        let status = |status| Answer::Status {
            status,
            retry_after: None,
        };
        for s in [200, 201, 204, 299] {
            assert_eq!(Verdict::of(&status(s)), Verdict::Ack, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(Verdict::of(&status(s)), Verdict::Retry, "{s}");
        }
        for s in [301, 302, 400, 401, 403, 404, 410, 422] {
            assert_eq!(Verdict::of(&status(s)), Verdict::DeadLetter, "{s}");
        }
        for a in [Answer::Timeout, Answer::ConnectError, Answer::Refused] {
            assert_eq!(Verdict::of(&a), Verdict::Retry, "{a:?}");
        }
    }
}
