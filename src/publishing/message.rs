//! A message to publish as the client described it, and its translation into an AMQP
//! message with every property validated (SPEC §4): body kinds, short strings, TTL and
//! priority bounds, header tables, `CC`/`BCC` routing keys and the header size bound.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::broker::OutgoingMessage;
pub use crate::broker::publish::table_len;

/// One message to publish, not yet validated: what `POST /v1/publish`, each batch item
/// and a WebSocket publish frame carry (their wire types convert into it). At most one
/// of `payload`, `body` and `body_base64` may be set; [`Request::prepare`] checks that.
#[derive(Debug)]
pub struct Request {
    pub exchange: String,
    pub routing_key: String,
    /// Any JSON, published byte for byte as sent.
    pub payload: Option<Box<RawValue>>,
    /// UTF-8 text.
    pub body: Option<String>,
    /// Bytes as standard, padded base64.
    pub body_base64: Option<String>,
    /// Defaults to the body kind's.
    pub content_type: Option<String>,
    pub properties: Properties,
    /// Defaults to `true`.
    pub mandatory: Option<bool>,
    /// Publish later (SPEC §15): `delay_ms` or `not_before`, not both.
    pub delay_ms: Option<u64>,
    pub not_before: Option<String>,
}

/// The bounds a publish is checked against, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The encoded header table (`server.max_headers_bytes`): a header frame larger
    /// than the broker's frame size would close the shared connection.
    pub max_headers_bytes: usize,
    /// `schedule.max_delay_ms`.
    pub max_delay_ms: u64,
}

/// The config's defaults.
impl Default for Limits {
    fn default() -> Self {
        Self {
            max_headers_bytes: crate::config::ServerConfig::default().max_headers_bytes,
            max_delay_ms: crate::config::ScheduleConfig::default().max_delay_ms,
        }
    }
}

impl Limits {
    pub fn of(config: &crate::config::Config) -> Self {
        Self {
            max_headers_bytes: config.server.max_headers_bytes,
            max_delay_ms: config.schedule.max_delay_ms,
        }
    }
}

/// AMQP basic properties as the client set them, not yet validated.
#[derive(Debug, Default)]
pub struct Properties {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub expiration_ms: Option<u64>,
    pub priority: Option<i64>,
    /// The AMQP `type` property.
    pub kind: Option<String>,
    pub app_id: Option<String>,
    /// Defaults to `true` (delivery mode 2).
    pub persistent: Option<bool>,
    pub headers: Option<serde_json::Map<String, Value>>,
}

/// W3C trace context of the request, copied into AMQP headers.
#[derive(Debug, Clone, Default)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// RabbitMQ's bound on per-message TTL (ten years). Above it the broker closes the
/// publishing channel (406 PRECONDITION_FAILED) instead of answering the publish.
pub const MAX_EXPIRATION_MS: u64 = 315_360_000_000;

/// Nesting bound for header tables, so a hostile body cannot recurse deeply.
const MAX_HEADER_DEPTH: usize = 8;

/// A validated message plus the id it will carry.
#[derive(Debug)]
pub struct Prepared {
    pub message: OutgoingMessage,
    pub message_id: String,
    /// The routing keys of the `CC` and `BCC` headers: RabbitMQ routes the message with
    /// each of them too (sender-selected distribution), so each must be granted.
    pub extra_routing_keys: Vec<String>,
    /// When a scheduled message is due; `None`: publish now.
    pub due: Option<Due>,
}

/// When a scheduled message is due, and the longest rung its ladder needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// [`crate::schedule::top_rung`] of `schedule.max_delay_ms`.
    pub top: u32,
}

/// The headers RabbitMQ reads as more routing keys (sender-selected distribution).
pub const ROUTING_HEADERS: [&str; 2] = ["CC", "BCC"];

/// At most this many routing keys in `CC` and `BCC` together.
pub const MAX_EXTRA_ROUTING_KEYS: usize = 64;

impl Request {
    /// Validates and converts to an AMQP message. Errors name the offending field.
    /// `message_id` is used when the client sets none (derived from an idempotency key);
    /// without either, a fresh UUID.
    pub fn prepare(
        self,
        trace: &TraceContext,
        message_id: Option<String>,
        limits: Limits,
    ) -> Result<Prepared, String> {
        let max_headers_bytes = limits.max_headers_bytes;
        let due = due_ms(
            self.delay_ms,
            self.not_before.as_deref(),
            limits.max_delay_ms,
        )?
        .map(|at_ms| Due {
            at_ms,
            top: crate::schedule::top_rung(limits.max_delay_ms),
        });
        short("exchange", &self.exchange)?;
        short("routing_key", &self.routing_key)?;
        let (body, default_type) = match (self.payload, self.body, self.body_base64) {
            (Some(json), None, None) => (json.get().as_bytes().to_vec(), "application/json"),
            (None, Some(text), None) => (text.into_bytes(), "text/plain; charset=utf-8"),
            (None, None, Some(b64)) => (
                BASE64
                    .decode(b64.as_bytes())
                    .map_err(|e| format!("body_base64: not valid base64: {e}"))?,
                "application/octet-stream",
            ),
            (None, None, None) => {
                return Err("one of payload, body or body_base64 is required".to_owned());
            }
            _ => return Err("set only one of payload, body and body_base64".to_owned()),
        };
        let content_type = match self.content_type {
            Some(ct) => {
                short("content_type", &ct)?;
                ct
            }
            None => default_type.to_owned(),
        };
        let p = self.properties;
        let message_id = match p.message_id {
            Some(id) if id.is_empty() => {
                return Err("properties.message_id: must not be empty".to_owned());
            }
            Some(id) => {
                short("properties.message_id", &id)?;
                id
            }
            None => message_id.unwrap_or_else(|| crate::ids::uuid_v4().to_string()),
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut properties = BasicProperties::default()
            .with_content_type(content_type.into())
            .with_message_id(message_id.as_str().into())
            .with_delivery_mode(if p.persistent.unwrap_or(true) { 2 } else { 1 })
            .with_timestamp(timestamp);
        if let Some(v) = p.correlation_id {
            properties = properties.with_correlation_id(short("properties.correlation_id", &v)?);
        }
        if let Some(v) = p.reply_to {
            properties = properties.with_reply_to(short("properties.reply_to", &v)?);
        }
        if let Some(v) = p.kind {
            properties = properties.with_type(short("properties.type", &v)?);
        }
        if let Some(v) = p.app_id {
            properties = properties.with_app_id(short("properties.app_id", &v)?);
        }
        if let Some(ms) = p.expiration_ms {
            if ms > MAX_EXPIRATION_MS {
                return Err(format!(
                    "properties.expiration_ms: must be at most {MAX_EXPIRATION_MS} (ten years)"
                ));
            }
            properties = properties.with_expiration(ms.to_string().into());
        }
        if let Some(priority) = p.priority {
            let priority = u8::try_from(priority)
                .map_err(|_| "properties.priority: must be an integer from 0 to 255".to_owned())?;
            properties = properties.with_priority(priority);
        }
        let mut headers = match p.headers {
            Some(map) => {
                reserved_headers(&map)?;
                table("properties.headers", map, 0)?
            }
            None => FieldTable::default(),
        };
        let extra_routing_keys = routing_headers(&headers)?;
        if let Some(tp) = &trace.traceparent {
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(tp.as_str().into()),
            );
        }
        if let Some(ts) = &trace.tracestate {
            headers.insert(
                "tracestate".into(),
                AMQPValue::LongString(ts.as_str().into()),
            );
        }
        let headers_bytes = table_len(&headers);
        if headers_bytes > max_headers_bytes {
            return Err(format!(
                "properties.headers: {headers_bytes} bytes encoded; at most {max_headers_bytes} are accepted (server.max_headers_bytes)"
            ));
        }
        if !headers.inner().is_empty() {
            properties = properties.with_headers(headers);
        }
        Ok(Prepared {
            message: OutgoingMessage {
                exchange: self.exchange,
                routing_key: self.routing_key,
                body: body.into(),
                properties,
                mandatory: self.mandatory.unwrap_or(true),
            },
            message_id,
            extra_routing_keys,
            due,
        })
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// When a scheduled publish is due: `delay_ms` from now, or `not_before` (RFC 3339; a
/// time already past is due now), at most `max_delay_ms` ahead.
fn due_ms(
    delay_ms: Option<u64>,
    not_before: Option<&str>,
    max_delay_ms: u64,
) -> Result<Option<u64>, String> {
    let now = now_ms();
    let (field, due) = match (delay_ms, not_before) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err("set only one of delay_ms and not_before".to_owned()),
        (Some(delay), None) => ("delay_ms", now.saturating_add(delay)),
        (None, Some(text)) => {
            let at = crate::rfc3339::parse_rfc3339(text).ok_or_else(|| {
                "not_before: must be an RFC 3339 date-time, e.g. 2026-12-07T10:00:00Z".to_owned()
            })?;
            // Whole seconds: a fraction is dropped.
            let at_ms = u64::try_from(at).unwrap_or(0).saturating_mul(1000);
            ("not_before", at_ms.max(now))
        }
    };
    if due - now > max_delay_ms {
        return Err(format!(
            "{field}: at most {max_delay_ms} ms ahead are accepted (schedule.max_delay_ms)"
        ));
    }
    Ok(Some(due))
}

/// Headers whose names start with this (in any case) are Warren's own: the attempt of
/// a retry policy (`x-warren-attempt`), why push or a scheduled message dead-lettered,
/// a scheduled message's due time and destination. A publisher may not set them: a
/// forged `x-warren-attempt` would skip a queue's retry delays, and a forged schedule
/// header would steer where Warren republishes a message.
pub const RESERVED_HEADER_PREFIX: &str = "x-warren-";

fn reserved_headers(map: &serde_json::Map<String, Value>) -> Result<(), String> {
    let prefix = RESERVED_HEADER_PREFIX.len();
    match map.keys().find(|name| {
        name.get(..prefix)
            .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX))
    }) {
        Some(name) => Err(format!(
            "properties.headers.{name}: headers starting with {RESERVED_HEADER_PREFIX:?} are set by Warren, not by publishers"
        )),
        None => Ok(()),
    }
}

/// The routing keys of the `CC` and `BCC` headers. RabbitMQ takes them only as arrays
/// of strings and closes the channel on any other type, so anything else is refused
/// here, before it can break a pooled channel.
fn routing_headers(headers: &FieldTable) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for name in ROUTING_HEADERS {
        let Some(value) = headers.inner().get(name) else {
            continue;
        };
        let AMQPValue::FieldArray(items) = value else {
            return Err(format!(
                "properties.headers.{name}: must be an array of routing keys (strings)"
            ));
        };
        for item in items.as_slice() {
            let AMQPValue::LongString(key) = item else {
                return Err(format!(
                    "properties.headers.{name}: must be an array of routing keys (strings)"
                ));
            };
            let key = String::from_utf8_lossy(key.as_bytes()).into_owned();
            short(&format!("properties.headers.{name}[]"), &key)?;
            keys.push(key);
        }
    }
    if keys.len() > MAX_EXTRA_ROUTING_KEYS {
        return Err(format!(
            "properties.headers: at most {MAX_EXTRA_ROUTING_KEYS} routing keys in CC and BCC together"
        ));
    }
    Ok(keys)
}

/// AMQP short strings are at most 255 bytes.
fn short(field: &str, value: &str) -> Result<ShortString, String> {
    if value.len() > 255 {
        Err(format!(
            "{field}: must be at most 255 bytes, got {}",
            value.len()
        ))
    } else {
        Ok(value.into())
    }
}

fn table(
    path: &str,
    map: serde_json::Map<String, Value>,
    depth: usize,
) -> Result<FieldTable, String> {
    if depth > MAX_HEADER_DEPTH {
        return Err(format!(
            "{path}: nested deeper than {MAX_HEADER_DEPTH} levels"
        ));
    }
    let mut table = FieldTable::default();
    // An empty name is allowed: RabbitMQ stores and delivers it like any other.
    for (key, value) in map {
        let name = short(&format!("{path}.{key}"), &key)?;
        let value = amqp_value(&format!("{path}.{key}"), value, depth)?;
        table.insert(name, value);
    }
    Ok(table)
}

fn amqp_value(path: &str, value: Value, depth: usize) -> Result<AMQPValue, String> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(b),
        // Integers beyond the signed 64-bit range become doubles, as every other number
        // (serde_json already reads those beyond u64 as floats; one rule for all).
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(s.into()),
        Value::Array(items) => {
            if depth >= MAX_HEADER_DEPTH {
                return Err(format!(
                    "{path}: nested deeper than {MAX_HEADER_DEPTH} levels"
                ));
            }
            let values = items
                .into_iter()
                .enumerate()
                .map(|(i, v)| amqp_value(&format!("{path}[{i}]"), v, depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            AMQPValue::FieldArray(FieldArray::from(values))
        }
        Value::Object(map) => AMQPValue::FieldTable(table(path, map, depth + 1)?),
    })
}
