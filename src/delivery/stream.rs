//! Stream subscriptions (SPEC §9): replaying a RabbitMQ stream from an offset for one
//! WebSocket subscription or one server-sent event response. Warren acks for the
//! client (streams need consumer credit) with a bounded prefetch, tags every frame
//! with its stream offset, and never acknowledges anything that is not a stream's.
//!
//! A non-stream queue is never consumed here: the consumer asks for `x-stream-offset`,
//! which classic and quorum queues refuse (`PRECONDITION_FAILED`, nothing delivered);
//! and should a delivery ever come without an offset anyway, the subscription ends
//! without acking it (closing the channel gives it back to its queue).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinHandle;

use super::render::{Format, MessageFrame};
use super::{Outgoing, SendBudget};
use crate::auth::grants::GrantPattern;
use crate::broker::{Broker, BrokerLease, ConsumerChannel};
use crate::error::ApiError;
use crate::telemetry;
use crate::tenancy::Tenant;

/// Longest stream name accepted (RabbitMQ's queue names are at most 255 bytes).
pub const MAX_STREAM_NAME: usize = 255;
/// Largest numeric offset: the broker takes it as a signed 64-bit integer.
pub const MAX_OFFSET: u64 = i64::MAX as u64;
/// Longest offset text accepted (a timestamp with nanoseconds is 30 bytes).
const MAX_OFFSET_TEXT: usize = 64;

/// Where a stream subscription starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamOffset {
    /// The oldest message the stream still holds.
    First,
    /// The last chunk written (a few of the latest messages), then what follows.
    Last,
    /// Only what is written after the subscription starts.
    #[default]
    Next,
    /// The message at this offset (a reconnect passes the last one seen plus one).
    At(u64),
    /// The first messages the broker stored at or after this Unix time, in seconds
    /// (the broker's granularity).
    Timestamp(u64),
}

impl StreamOffset {
    /// From a WebSocket frame's `offset`: `"first"`, `"last"`, `"next"`, a number, or
    /// `{"timestamp": "<RFC 3339, UTC>"}`.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        match value {
            Value::String(text) => match text.as_str() {
                "first" => Ok(Self::First),
                "last" => Ok(Self::Last),
                "next" => Ok(Self::Next),
                _ => Err(Self::EXPECTED.to_owned()),
            },
            Value::Number(n) => n
                .as_u64()
                .filter(|n| *n <= MAX_OFFSET)
                .map(Self::At)
                .ok_or_else(|| format!("a numeric offset must be an integer 0-{MAX_OFFSET}")),
            Value::Object(members) => match (members.len(), members.get("timestamp")) {
                (1, Some(Value::String(text))) => parse_timestamp(text),
                _ => Err(Self::EXPECTED.to_owned()),
            },
            _ => Err(Self::EXPECTED.to_owned()),
        }
    }

    /// From a query string's `offset`: `first`, `last`, `next`, a number, or an
    /// RFC 3339 UTC timestamp (`2026-11-29T10:00:00Z`).
    pub fn from_query(text: &str) -> Result<Self, String> {
        match text {
            "first" => Ok(Self::First),
            "last" => Ok(Self::Last),
            "next" => Ok(Self::Next),
            _ if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => text
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= MAX_OFFSET)
                .map(Self::At)
                .ok_or_else(|| format!("a numeric offset must be an integer 0-{MAX_OFFSET}")),
            _ if text.contains('T') => parse_timestamp(text),
            _ => Err(
                "must be first, last, next, an offset (0, 1, …) or an RFC 3339 UTC timestamp"
                    .to_owned(),
            ),
        }
    }

    /// From an EventSource's `Last-Event-ID` (the offset of the last event seen): the
    /// offset after it.
    pub fn after_last_event_id(text: &str) -> Result<Self, String> {
        let last = (!text.is_empty()
            && text.len() <= 20
            && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse::<u64>().ok())
        .flatten()
        .filter(|n| *n < MAX_OFFSET)
        .ok_or_else(|| "Last-Event-ID: must be a stream offset this gateway sent".to_owned())?;
        Ok(Self::At(last + 1))
    }

    const EXPECTED: &'static str = r#"must be "first", "last", "next", an offset (0, 1, …) or {"timestamp": "2026-11-29T10:00:00Z"}"#;

    /// The `kind` label of `warren_stream_resumes_total`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Last => "last",
            Self::Next => "next",
            Self::At(_) => "offset",
            Self::Timestamp(_) => "timestamp",
        }
    }

    /// The `x-stream-offset` consumer argument. Only these typed values ever reach the
    /// broker: it answers an unknown string there by closing the whole connection.
    fn argument(self) -> AMQPValue {
        match self {
            Self::First => AMQPValue::LongString("first".into()),
            Self::Last => AMQPValue::LongString("last".into()),
            Self::Next => AMQPValue::LongString("next".into()),
            Self::At(offset) => AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX)),
            Self::Timestamp(seconds) => AMQPValue::Timestamp(seconds),
        }
    }
}

impl<'de> Deserialize<'de> for StreamOffset {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_json(&value).map_err(serde::de::Error::custom)
    }
}

fn parse_timestamp(text: &str) -> Result<StreamOffset, String> {
    let invalid = || "a timestamp must be RFC 3339 in UTC, like 2026-11-29T10:00:00Z".to_owned();
    if text.len() > MAX_OFFSET_TEXT {
        return Err(invalid());
    }
    let time = humantime::parse_rfc3339(text).map_err(|_| invalid())?;
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "a timestamp must not be before 1970".to_owned())?;
    // The broker's timestamps have a one-second accuracy: a fraction rounds up, so
    // nothing stored before the asked-for instant's second is replayed.
    let whole = seconds.as_secs() + u64::from(seconds.subsec_nanos() > 0);
    Ok(StreamOffset::Timestamp(whole))
}

/// The offset the broker tagged a stream delivery with, if it is one.
pub fn delivery_offset(delivery: &lapin::message::Delivery) -> Option<u64> {
    let headers = delivery.properties.headers().as_ref()?;
    let value = headers.inner().get("x-stream-offset")?;
    match value {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

/// A stream subscription's settings.
pub struct StreamRequest<'a> {
    pub subscription: &'a str,
    pub stream: &'a str,
    /// Routing keys passed on (`#` for all); covered by the tenant's stream grant.
    pub filter: GrantPattern,
    pub offset: StreamOffset,
    pub prefetch: u16,
    /// A reader that takes nothing for this long ends the subscription.
    pub slow_timeout: Duration,
    pub budget: SendBudget,
    /// `ws` or `sse`: the metrics' label.
    pub transport: &'static str,
    /// How the client asked to start (`warren_stream_resumes_total`'s `kind`):
    /// [`StreamOffset::kind`], or `last_event_id`.
    pub resume: &'static str,
    /// The gateway's stream subscription slots (`streams.max_subscriptions`).
    pub slots: &'a StreamSlots,
    /// How message frames carry each message (SPEC §12).
    pub format: Format,
}

/// Stream subscriptions held at once by this gateway (`streams.max_subscriptions`).
pub struct StreamSlots {
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
    /// Subscriptions held per tenant, so one tenant cannot take every slot.
    per_tenant: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    max_per_tenant: usize,
}

/// One stream subscription's place: a gateway slot and its tenant's count.
pub struct StreamSlot {
    _slot: OwnedSemaphorePermit,
    tenant: String,
    per_tenant: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut counts = self.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = counts.get_mut(&self.tenant) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

impl StreamSlots {
    pub fn new(max: usize, max_per_tenant: usize) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
            per_tenant: Arc::default(),
            max_per_tenant,
        }
    }

    /// A slot for `tenant`: 503 when the gateway holds all it allows
    /// (`streams.max_subscriptions`), 429 past the tenant's share
    /// (`streams.max_subscriptions_per_tenant`).
    fn take(&self, tenant: &str) -> Result<StreamSlot, ApiError> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::BrokerUnavailable {
                detail: format!(
                    "this gateway holds as many stream subscriptions as it allows ({}, streams.max_subscriptions)",
                    self.max
                ),
                retry_after: Duration::from_secs(5),
            }
        })?;
        let mut counts = self.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
        let held = counts.get(tenant).copied().unwrap_or(0);
        if held >= self.max_per_tenant {
            return Err(ApiError::RateLimited {
                detail: format!(
                    "the tenant already holds {} stream subscriptions (streams.max_subscriptions_per_tenant); unsubscribe first",
                    self.max_per_tenant
                ),
                retry_after: Duration::from_secs(5),
            });
        }
        counts.insert(tenant.to_owned(), held + 1);
        Ok(StreamSlot {
            _slot: slot,
            tenant: tenant.to_owned(),
            per_tenant: self.per_tenant.clone(),
        })
    }
}

/// Checks a stream subscription against the grants before anything reaches the
/// broker: the name, then a `{ stream }` grant covering the filter.
pub fn authorize(tenant: &Tenant, stream: &str, filter: &GrantPattern) -> Result<(), ApiError> {
    if stream.is_empty() || stream.len() > MAX_STREAM_NAME {
        return Err(ApiError::InvalidRequest(format!(
            "stream: must be 1-{MAX_STREAM_NAME} bytes"
        )));
    }
    tenant.authorize_stream(stream, filter)
}

pub struct StreamSubscription {
    channel: Arc<ConsumerChannel>,
    task: JoinHandle<()>,
    pub stream: String,
    pub filter: GrantPattern,
    transport: &'static str,
    /// Counts against the tenant's `limits.max_consumers`.
    _consumer: OwnedSemaphorePermit,
    /// Counts against `streams.max_subscriptions`.
    _slot: StreamSlot,
    /// Keeps a lazily opened pool from being closed under the consumer.
    _lease: BrokerLease,
}

impl StreamSubscription {
    /// Starts consuming `request.stream`; deliveries arrive on `sink` as
    /// [`Outgoing::Message`] frames carrying their offset. When the broker side ends,
    /// an [`Outgoing::Ended`] says how to resume; when the reader stays too slow the
    /// subscription's sender is simply dropped (the WebSocket's writer closes it with
    /// 4408 on its own timer; an event stream ends).
    pub async fn start(
        tenant: Arc<Tenant>,
        request: StreamRequest<'_>,
        sink: mpsc::Sender<Outgoing>,
    ) -> Result<Self, ApiError> {
        authorize(&tenant, request.stream, &request.filter)?;
        let consumer_permit = tenant.quota.admit_consumer()?;
        let slot = request.slots.take(&tenant.name)?;
        let broker = tenant.broker().await?;
        let channel = Arc::new(
            broker
                .consumer_channel()
                .await
                .map_err(super::subscribe_failure)?,
        );
        let consumer = match consume(&broker, &channel, &request).await {
            Ok(consumer) => consumer,
            Err(e) => {
                let _ = channel.close(200, "subscribe failed".into()).await;
                return Err(e);
            }
        };
        telemetry::stream_resume(request.resume);
        telemetry::stream_subscriptions(request.transport, 1);
        let forwarder = Forwarder {
            tenant,
            stream: request.stream.to_owned(),
            filter: request.filter.clone(),
            channel: channel.clone(),
            subscription: request.subscription.to_owned(),
            sink,
            transport: request.transport,
            budget: request.budget.clone(),
            timeout: request.slow_timeout,
            ack_every: (request.prefetch / 2).max(1),
            format: request.format,
        };
        let task = tokio::spawn(forwarder.run(consumer));
        Ok(Self {
            channel,
            task,
            stream: request.stream.to_owned(),
            filter: request.filter,
            transport: request.transport,
            _consumer: consumer_permit,
            _slot: slot,
            _lease: broker,
        })
    }

    /// Stops consuming (the stream itself is untouched; a later subscription picks up
    /// from any offset).
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.channel.close(200, "unsubscribed".into()).await;
    }
}

impl Drop for StreamSubscription {
    fn drop(&mut self) {
        self.task.abort();
        telemetry::stream_subscriptions(self.transport, -1);
    }
}

/// How the forwarder stopped.
enum Ended {
    /// The reader took nothing for the slow-reader timeout.
    SlowReader,
    /// The broker side ended; the error says how to resume.
    Failed(ApiError),
}

async fn consume(
    broker: &Broker,
    channel: &lapin::Channel,
    request: &StreamRequest<'_>,
) -> Result<lapin::Consumer, ApiError> {
    let fail = |e: lapin::Error| consume_failure(broker, request.stream, &e);
    channel
        .basic_qos(request.prefetch, BasicQosOptions::default())
        .await
        .map_err(fail)?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-stream-offset".into(), request.offset.argument());
    let tag = format!("warren-stream-{}", crate::ids::uuid_v4().simple());
    channel
        .basic_consume(
            request.stream.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .map_err(fail)
}

/// A refused `basic.consume`, in the client's words (the broker's reply text names
/// vhosts; it is logged, not shown).
fn consume_failure(broker: &Broker, stream: &str, error: &lapin::Error) -> ApiError {
    if let lapin::ErrorKind::ProtocolError(amqp) = error.kind() {
        match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
                return ApiError::StreamNotFound(format!(
                    "stream {stream:?} does not exist in this tenant's vhost"
                ));
            }
            // Classic and quorum queues refuse the `x-stream-offset` argument.
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                tracing::info!(vhost = %broker.vhost(), %stream, reply = %amqp.get_message(), "A stream subscription named a queue that is not a stream.");
                return ApiError::StreamNotFound(format!(
                    "{stream:?} in this tenant's vhost is a queue, not a stream"
                ));
            }
            _ => {}
        }
    }
    super::subscribe_failure(broker.failure(error, ""))
}

/// Moves deliveries to the reader, waiting for room in its frame and byte budgets, and
/// acks them (credit for the next ones) once queued for the reader: at most the
/// prefetch is ever unacked, so a slow reader holds the broker back, not memory.
struct Forwarder {
    tenant: Arc<Tenant>,
    stream: String,
    filter: GrantPattern,
    channel: Arc<ConsumerChannel>,
    subscription: String,
    sink: mpsc::Sender<Outgoing>,
    transport: &'static str,
    budget: SendBudget,
    timeout: Duration,
    /// Acks go out (`multiple`) every this many deliveries: half the prefetch, so the
    /// broker always has credit left while the acks travel.
    ack_every: u16,
    format: Format,
}

impl Forwarder {
    async fn run(self, mut consumer: lapin::Consumer) {
        let mut unacked: u16 = 0;
        let mut last_offset: Option<u64> = None;
        let outcome = loop {
            let Some(Ok(delivery)) = consumer.next().await else {
                break Ended::Failed(self.lost(last_offset));
            };
            let Some(offset) = delivery_offset(&delivery) else {
                // Not a stream's delivery: never ack it (that would remove it from its
                // queue); closing the channel gives it back.
                tracing::warn!(tenant = %self.tenant.name, stream = %self.stream, "A stream subscription received a delivery without x-stream-offset; ending it without acking.");
                let _ = self.channel.close(200, "not a stream".into()).await;
                break Ended::Failed(ApiError::StreamNotFound(format!(
                    "{:?} in this tenant's vhost is not a stream",
                    self.stream
                )));
            };
            let routing_key = delivery.routing_key.as_str();
            let wanted = crate::broker::poison::admit_live(&delivery)
                && self.filter.matches(routing_key)
                && self
                    .tenant
                    .may_receive_from_stream(&self.stream, routing_key);
            if wanted {
                let frame = MessageFrame::formatted(
                    &self.subscription,
                    &delivery,
                    self.format,
                    &self.tenant.name,
                )
                .with_offset(offset);
                let Some(bytes) = self
                    .budget
                    .take(frame.approximate_len(), self.timeout)
                    .await
                else {
                    break Ended::SlowReader;
                };
                let sent = self
                    .sink
                    .send_timeout(Outgoing::Message(Box::new(frame), bytes), self.timeout)
                    .await;
                if sent.is_err() {
                    break Ended::SlowReader;
                }
                last_offset = Some(offset);
            } else {
                telemetry::ws_filtered("stream");
            }
            unacked += 1;
            if unacked >= self.ack_every {
                unacked = 0;
                let acked = self
                    .channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                    .await;
                if acked.is_err() {
                    break Ended::Failed(self.lost(last_offset));
                }
            }
        };
        match outcome {
            Ended::SlowReader => {
                if self.transport == "sse" {
                    telemetry::sse_slow_reader_closed();
                }
                tracing::info!(tenant = %self.tenant.name, stream = %self.stream, "A stream reader stayed too slow; ending its subscription.");
            }
            Ended::Failed(error) => {
                let ended = Outgoing::Ended {
                    subscription: self.subscription,
                    error,
                };
                let _ = self.sink.send_timeout(ended, self.timeout).await;
            }
        }
    }

    fn lost(&self, last_offset: Option<u64>) -> ApiError {
        let resume = match last_offset {
            Some(offset) => format!("; subscribe again with offset {} to resume", offset + 1),
            None => "; subscribe again".to_owned(),
        };
        ApiError::BrokerUnavailable {
            detail: format!("the stream subscription lost its broker consumer{resume}"),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// Seconds since the Unix epoch now (for tests and docs of timestamp offsets).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_holds_at_most_its_share_of_the_stream_slots() {
        let slots = StreamSlots::new(3, 2);
        let a1 = slots.take("a").unwrap();
        let _a2 = slots.take("a").unwrap();
        let refused = slots.take("a").err().expect("over the share");
        assert_eq!(refused.code(), "rate_limited");
        let _b1 = slots.take("b").unwrap();
        // The gateway is full now: another tenant is told so, not rate limited.
        let full = slots.take("c").err().expect("the gateway is full");
        assert_eq!(full.code(), "broker_unavailable");
        drop(a1);
        let _a3 = slots.take("a").unwrap();
        assert!(
            slots.take("a").is_err(),
            "the share holds after a slot came back"
        );
    }
    use serde_json::json;

    #[test]
    fn offsets_parse_from_frames_queries_and_last_event_ids() {
        assert_eq!(
            StreamOffset::from_json(&json!("first")),
            Ok(StreamOffset::First)
        );
        assert_eq!(
            StreamOffset::from_json(&json!("last")),
            Ok(StreamOffset::Last)
        );
        assert_eq!(
            StreamOffset::from_json(&json!("next")),
            Ok(StreamOffset::Next)
        );
        assert_eq!(
            StreamOffset::from_json(&json!(42)),
            Ok(StreamOffset::At(42))
        );
        assert_eq!(
            StreamOffset::from_json(&json!({"timestamp": "2026-11-29T10:00:00Z"})),
            Ok(StreamOffset::Timestamp(1_795_946_400))
        );
        assert_eq!(
            StreamOffset::from_json(&json!({"timestamp": "2026-11-29T10:00:00.5Z"})),
            Ok(StreamOffset::Timestamp(1_795_946_401)),
            "a fraction rounds up"
        );
        for bad in [
            json!("First"),
            json!("bogus"),
            json!(-1),
            json!(1.5),
            json!(u64::MAX),
            json!(null),
            json!([]),
            json!({"timestamp": 5}),
            json!({"timestamp": "yesterday"}),
            json!({"timestamp": "1969-12-31T23:59:59Z"}),
            json!({"timestamp": "2026-11-29T10:00:00+02:00"}),
            json!({"timestamp": "2026-11-29T10:00:00Z", "x": 1}),
        ] {
            assert!(StreamOffset::from_json(&bad).is_err(), "{bad}");
        }
        assert_eq!(StreamOffset::from_query("7"), Ok(StreamOffset::At(7)));
        assert_eq!(
            StreamOffset::from_query("2026-11-29T10:00:00Z"),
            Ok(StreamOffset::Timestamp(1_795_946_400))
        );
        for bad in [
            "",
            "-1",
            "1e3",
            "99999999999999999999",
            "Tx",
            &"1".repeat(100),
        ] {
            assert!(StreamOffset::from_query(bad).is_err(), "{bad}");
        }
        assert_eq!(
            StreamOffset::after_last_event_id("41"),
            Ok(StreamOffset::At(42))
        );
        for bad in ["", "x", "-1", " 1", "9223372036854775807", &"1".repeat(21)] {
            assert!(StreamOffset::after_last_event_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stream_message_frames_carry_the_offset_after_the_delivery_tag() {
        let mut delivery =
            lapin::message::Delivery::mock(3, "".into(), "order-log".into(), false, b"{}".to_vec());
        delivery.properties = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into());
        let frame = MessageFrame::new("s3", &delivery).with_offset(41);
        let json = frame.to_json();
        assert!(
            json.starts_with(r#"{"type":"message","subscription":"s3","delivery_tag":3,"offset":41,"exchange":"","#),
            "{json}"
        );
        let value: Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(value["payload"], json!({}));
        assert!(frame.approximate_len() >= json.len());
        assert_eq!(frame.offset(), Some(41));
        assert_eq!(frame.message_id(), Some("m-1"));
        let live = MessageFrame::new("s1", &delivery);
        assert!(!live.to_json().contains("offset"), "other modes have none");
    }

    #[test]
    fn only_typed_offsets_reach_the_broker() {
        assert_eq!(StreamOffset::At(5).argument(), AMQPValue::LongLongInt(5));
        assert_eq!(
            StreamOffset::Timestamp(9).argument(),
            AMQPValue::Timestamp(9)
        );
        assert_eq!(
            StreamOffset::default().argument(),
            AMQPValue::LongString("next".into())
        );
    }

    #[test]
    fn the_offset_comes_from_the_broker_header_only() {
        let mut delivery = lapin::message::Delivery::mock(1, "".into(), "k".into(), false, vec![]);
        assert_eq!(delivery_offset(&delivery), None);
        let mut headers = FieldTable::default();
        headers.insert("x-stream-offset".into(), AMQPValue::LongString("7".into()));
        delivery.properties = lapin::BasicProperties::default().with_headers(headers.clone());
        assert_eq!(
            delivery_offset(&delivery),
            None,
            "a string is not an offset"
        );
        headers.insert("x-stream-offset".into(), AMQPValue::LongLongInt(-1));
        delivery.properties = lapin::BasicProperties::default().with_headers(headers.clone());
        assert_eq!(delivery_offset(&delivery), None);
        headers.insert("x-stream-offset".into(), AMQPValue::LongLongInt(7));
        delivery.properties = lapin::BasicProperties::default().with_headers(headers);
        assert_eq!(delivery_offset(&delivery), Some(7));
    }
}
