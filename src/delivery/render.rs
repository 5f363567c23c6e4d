//! How a delivery is written for whoever receives it, the same on every transport:
//! the message frame (SPEC §6: `exchange`, `routing_key`, `redelivered`, `properties`,
//! then `payload` or `body_base64`), or the message as a structured CloudEvent
//! (`format: "cloudevents"`, SPEC §12), and AMQP properties as JSON. WebSocket frames,
//! server-sent events, push deliveries and pull receives all write this.

use std::fmt::Write as _;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// How a subscription's `message` frames carry each message (SPEC §12).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `properties` and `payload` or `body_base64`.
    #[default]
    Warren,
    /// `event`: the message as a structured CloudEvent (see [`DeliveryJson::cloudevent`]).
    CloudEvents,
}

/// A delivery as the client sees it: the subscriber's own `subscription` and
/// `delivery_tag`, then the delivery's members, serialised once and shared by every
/// subscriber it fans out to. On the wire:
/// `{"type":"message","subscription":…,"delivery_tag":…,"exchange":…,"routing_key":…,
/// "redelivered":…,"properties":{…}` then `"payload":…` or `"body_base64":…` and `}`.
#[derive(Debug, Clone)]
pub struct MessageFrame {
    subscription: FrameId,
    /// Only meaningful for durable subscriptions (ack/nack); 0 for live ones.
    delivery_tag: u64,
    /// A stream subscription's stream offset of the message (`"offset"` after
    /// `"delivery_tag"`); absent for other modes.
    offset: Option<u64>,
    delivery: Arc<DeliveryJson>,
}

/// A subscription id as it appears in message frames: JSON-quoted once, when the
/// subscription starts, not for every frame.
#[derive(Debug, Clone)]
pub struct FrameId(Arc<str>);

impl FrameId {
    pub fn new(subscription: &str) -> Self {
        let quoted = serde_json::to_string(subscription).unwrap_or_else(|_| "\"\"".to_owned());
        Self(quoted.into())
    }
}

/// The delivery's AMQP `message_id` (the `id:` of a live server-sent event).
fn message_id(delivery: &Delivery) -> Option<Box<str>> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().into())
}

/// The members of a message frame that are the same for every subscriber of a
/// delivery, as one JSON object: `{"exchange":…,…}`.
#[derive(Debug)]
pub struct DeliveryJson(
    String,
    Option<Box<str>>,
    Option<Box<crate::otel::Delivered>>,
);

#[derive(Serialize)]
struct DeliveryMembers<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    redelivered: bool,
    properties: PropertiesJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

impl DeliveryJson {
    /// JSON content becomes `payload`; anything else `body_base64`.
    pub fn new(delivery: &Delivery) -> Self {
        let properties = &delivery.properties;
        let is_json = properties.content_type().as_ref().is_some_and(|ct| {
            let essence = ct.as_str().split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")
        });
        let payload = if is_json {
            std::str::from_utf8(&delivery.data)
                .ok()
                .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
        } else {
            None
        };
        let members = DeliveryMembers {
            exchange: delivery.exchange.as_str(),
            routing_key: delivery.routing_key.as_str(),
            redelivered: delivery.redelivered,
            properties: PropertiesJson(properties),
            payload,
            body_base64: payload.is_none().then(|| BASE64.encode(&delivery.data)),
        };
        let message_id = message_id(delivery);
        // Serialising plain strings, maps and raw JSON cannot fail; `{}` keeps the
        // frame well-formed if it ever did.
        Self(
            serde_json::to_string(&members).unwrap_or_else(|_| "{}".to_owned()),
            message_id,
            crate::otel::Delivered::of(delivery),
        )
    }

    /// `format: cloudevents`: `exchange`, `routing_key`, `redelivered`, then `event`,
    /// the message as a structured CloudEvent ([`crate::cloudevents::delivery_json`];
    /// `source` of a non-CloudEvents message names `tenant` and the exchange).
    pub fn cloudevent(delivery: &Delivery, tenant: &str) -> Self {
        let exchange = delivery.exchange.as_str();
        let event = crate::cloudevents::delivery_json(delivery, tenant, exchange);
        let head = serde_json::json!({
            "exchange": exchange,
            "routing_key": delivery.routing_key.as_str(),
            "redelivered": delivery.redelivered,
        })
        .to_string();
        let mut out = String::with_capacity(head.len() + event.len() + 10);
        out.push_str(head.strip_suffix('}').unwrap_or("{"));
        out.push_str(",\"event\":");
        out.push_str(&event);
        out.push('}');
        Self(
            out,
            message_id(delivery),
            crate::otel::Delivered::of(delivery),
        )
    }

    /// The members for `format`.
    pub fn formatted(delivery: &Delivery, format: Format, tenant: &str) -> Self {
        match format {
            Format::Warren => Self::new(delivery),
            Format::CloudEvents => Self::cloudevent(delivery, tenant),
        }
    }
}

const FRAME_START: &str = r#"{"type":"message","subscription":"#;
const FRAME_TAG: &str = r#","delivery_tag":"#;
const FRAME_OFFSET: &str = r#","offset":"#;
/// What a frame adds to its subscription id and delivery, with room for the digits
/// of two u64s.
const FRAME_OVERHEAD: usize = FRAME_START.len() + FRAME_TAG.len() + FRAME_OFFSET.len() + 40;

impl MessageFrame {
    /// The frame of a delivery that goes to one subscriber only.
    pub fn new(subscription: &str, delivery: &Delivery) -> Self {
        let shared = Arc::new(DeliveryJson::new(delivery));
        Self::shared(&FrameId::new(subscription), delivery.delivery_tag, &shared)
    }

    /// The frame of a delivery that goes to one subscriber only, in `format`.
    pub fn formatted(
        subscription: &str,
        delivery: &Delivery,
        format: Format,
        tenant: &str,
    ) -> Self {
        let shared = Arc::new(DeliveryJson::formatted(delivery, format, tenant));
        Self::shared(&FrameId::new(subscription), delivery.delivery_tag, &shared)
    }

    /// One subscriber's frame of a delivery built once for all of them.
    pub fn shared(subscription: &FrameId, delivery_tag: u64, delivery: &Arc<DeliveryJson>) -> Self {
        Self {
            subscription: subscription.clone(),
            delivery_tag,
            offset: None,
            delivery: delivery.clone(),
        }
    }

    /// The frame of a stream subscription: it carries the message's stream offset.
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The AMQP `message_id` of the delivery, if it has one.
    pub fn message_id(&self) -> Option<&str> {
        self.delivery.1.as_deref()
    }

    /// What a delivery span says of the message (only while traces are exported).
    pub fn delivered(&self) -> Option<&crate::otel::Delivered> {
        self.delivery.2.as_deref()
    }

    /// The size of the frame's JSON, at most a few bytes over.
    pub fn approximate_len(&self) -> usize {
        FRAME_OVERHEAD + self.subscription.0.len() + self.delivery.0.len()
    }

    /// The text frame: the subscriber's members, then the shared delivery's.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(self.approximate_len());
        out.push_str(FRAME_START);
        out.push_str(&self.subscription.0);
        out.push_str(FRAME_TAG);
        // Writing to a String cannot fail.
        let _ = write!(out, "{}", self.delivery_tag);
        if let Some(offset) = self.offset {
            out.push_str(FRAME_OFFSET);
            let _ = write!(out, "{offset}");
        }
        match self.delivery.0.strip_prefix('{') {
            Some(members) => {
                out.push(',');
                out.push_str(members);
            }
            None => out.push('}'),
        }
        out
    }
}

/// A body as a JSON answer carries it (a reply, a pull receive): JSON content that
/// parses as `payload`; UTF-8 `text/*` content as `body`; anything else as
/// `body_base64`. Exactly one is set.
#[derive(Debug, Clone, Default)]
pub struct BodyMembers {
    pub payload: Option<Box<RawValue>>,
    pub body: Option<String>,
    pub body_base64: Option<String>,
}

impl BodyMembers {
    pub fn of(properties: &BasicProperties, data: &[u8]) -> Self {
        let essence = properties
            .content_type()
            .as_ref()
            .map(|ct| ct.as_str().split(';').next().unwrap_or_default().trim())
            .unwrap_or_default();
        let has = |at: Option<&str>, kind: &str| at.is_some_and(|a| a.eq_ignore_ascii_case(kind));
        let is_json = essence.eq_ignore_ascii_case("application/json")
            || has(
                essence.len().checked_sub(5).and_then(|i| essence.get(i..)),
                "+json",
            );
        let is_text = has(essence.get(..5), "text/");
        let text = std::str::from_utf8(data).ok();
        let payload = text
            .filter(|_| is_json)
            .and_then(|t| RawValue::from_string(t.to_owned()).ok());
        let body = text
            .filter(|_| payload.is_none() && is_text)
            .map(str::to_owned);
        let body_base64 = (payload.is_none() && body.is_none()).then(|| BASE64.encode(data));
        Self {
            payload,
            body,
            body_base64,
        }
    }
}

/// AMQP properties as a JSON object; trace context headers come along in `headers`.
/// Written straight to the serializer (no intermediate map: this runs for every
/// delivery and every reply).
#[derive(Debug, Clone, Copy)]
pub struct PropertiesJson<'a>(pub &'a BasicProperties);

impl Serialize for PropertiesJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let p = self.0;
        let mut map = serializer.serialize_map(None)?;
        let strings = [
            ("content_type", p.content_type()),
            ("content_encoding", p.content_encoding()),
            ("message_id", p.message_id()),
            ("correlation_id", p.correlation_id()),
            ("reply_to", p.reply_to()),
            ("type", p.kind()),
            ("app_id", p.app_id()),
            ("user_id", p.user_id()),
        ];
        for (key, value) in strings {
            if let Some(value) = value {
                map.serialize_entry(key, value.as_str())?;
            }
        }
        if let Some(ms) = p
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok())
        {
            map.serialize_entry("expiration_ms", &ms)?;
        }
        if let Some(priority) = p.priority() {
            map.serialize_entry("priority", priority)?;
        }
        if let Some(timestamp) = p.timestamp() {
            map.serialize_entry("timestamp", timestamp)?;
        }
        if let Some(mode) = p.delivery_mode() {
            map.serialize_entry("persistent", &(*mode == 2))?;
        }
        if let Some(headers) = p.headers() {
            map.serialize_entry("headers", &table_json(headers))?;
        }
        map.end()
    }
}

/// [`PropertiesJson`] as a map of values.
pub fn properties_json(p: &BasicProperties) -> Map<String, Value> {
    match serde_json::to_value(PropertiesJson(p)) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

fn table_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_json(v)))
            .collect(),
    )
}

fn value_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(*f),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => Value::from(format!("{d:?}")),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(s.to_string()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::ByteArray(b) => Value::from(BASE64.encode(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_written_as_the_protocol_documents_them() {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), AMQPValue::LongString("00-ab".into()));
        headers.insert("n".into(), AMQPValue::LongInt(-3));
        let all = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_content_encoding("gzip".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c\"1".into())
            .with_reply_to("r".into())
            .with_type("t".into())
            .with_app_id("a".into())
            .with_user_id("u".into())
            .with_expiration("1500".into())
            .with_priority(7)
            .with_timestamp(1_700_000_000)
            .with_delivery_mode(2)
            .with_headers(headers);
        assert_eq!(
            serde_json::to_string(&PropertiesJson(&all)).unwrap(),
            r#"{"content_type":"text/plain","content_encoding":"gzip","message_id":"m-1","correlation_id":"c\"1","reply_to":"r","type":"t","app_id":"a","user_id":"u","expiration_ms":1500,"priority":7,"timestamp":1700000000,"persistent":true,"headers":{"n":-3,"traceparent":"00-ab"}}"#
        );
        let transient = BasicProperties::default()
            .with_delivery_mode(1)
            .with_expiration("soon".into());
        assert_eq!(
            serde_json::to_string(&PropertiesJson(&transient)).unwrap(),
            r#"{"persistent":false}"#
        );
        assert_eq!(properties_json(&all).len(), 13);
        assert!(properties_json(&BasicProperties::default()).is_empty());
    }
}
