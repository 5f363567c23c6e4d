//! The `warren.v1` WebSocket frame protocol: JSON text frames with a `type`, parsed
//! into typed client frames and serialized from typed server frames. Pure; no I/O.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::api::body::parse_json;
use crate::api::model::PublishRequest;
use crate::error::ApiError;

/// Every client frame type, as named in the `type` member.
pub const CLIENT_FRAME_TYPES: &[&str] =
    &["subscribe", "unsubscribe", "ack", "nack", "publish", "auth"];
/// Every server frame type.
pub const SERVER_FRAME_TYPES: &[&str] =
    &["subscribed", "unsubscribed", "confirm", "message", "error"];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// At-most-once, one shared broker queue per (tenant, exchange, binding key).
    #[default]
    Live,
    /// At-least-once, a named tenant-scoped queue that outlives the socket.
    Durable,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    pub id: String,
    pub exchange: String,
    pub binding_key: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub prefetch: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribe {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub subscription: String,
    pub delivery_tag: u64,
    #[serde(default)]
    pub multiple: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nack {
    pub subscription: String,
    pub delivery_tag: u64,
    #[serde(default)]
    pub multiple: bool,
    #[serde(default = "yes")]
    pub requeue: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub token: String,
}

/// A publish frame: the `POST /v1/publish` body plus `id` and an optional key.
#[derive(Debug)]
pub struct Publish {
    pub id: String,
    pub idempotency_key: Option<String>,
    pub request: PublishRequest,
    /// The publish body with its members in sorted order (a stable idempotency fingerprint).
    pub raw: String,
}

#[derive(Debug)]
pub enum ClientFrame {
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Ack(Ack),
    Nack(Nack),
    Publish(Box<Publish>),
    Auth(Auth),
}

/// A frame that could not be understood; answered with an error frame, socket kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The frame's `id` when it could be read, so the client can correlate.
    pub id: Option<String>,
    pub detail: String,
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    let members: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(text).map_err(|e| FrameError {
            id: None,
            detail: format!("a frame must be a JSON object: {e}"),
        })?;
    let id = members
        .get("id")
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok());
    let fail = |detail: String| FrameError {
        id: id.clone(),
        detail,
    };
    let kind = members
        .get("type")
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
        .ok_or_else(|| fail("the frame has no string `type`".to_owned()))?;
    let typed = |members: &BTreeMap<String, Box<RawValue>>| -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in members.iter().filter(|(k, _)| *k != "type").enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(k).unwrap_or_default());
            out.push(':');
            out.push_str(v.get());
        }
        out.push('}');
        out
    };
    let body = typed(&members);
    let decode = |e: ApiError| fail(format!("{kind} frame: {e}"));
    match kind.as_str() {
        "subscribe" => parse_json(body.as_bytes())
            .map(ClientFrame::Subscribe)
            .map_err(decode),
        "unsubscribe" => parse_json(body.as_bytes())
            .map(ClientFrame::Unsubscribe)
            .map_err(decode),
        "ack" => parse_json(body.as_bytes())
            .map(ClientFrame::Ack)
            .map_err(decode),
        "nack" => parse_json(body.as_bytes())
            .map(ClientFrame::Nack)
            .map_err(decode),
        "auth" => parse_json(body.as_bytes())
            .map(ClientFrame::Auth)
            .map_err(decode),
        "publish" => {
            let mut rest = members;
            rest.remove("type");
            let id = rest
                .remove("id")
                .ok_or_else(|| fail("publish frame: `id` is required".to_owned()))
                .and_then(|v| {
                    serde_json::from_str::<String>(v.get())
                        .map_err(|_| fail("publish frame: `id` must be a string".to_owned()))
                })?;
            let idempotency_key = match rest.remove("idempotency_key") {
                None => None,
                Some(v) => Some(serde_json::from_str::<String>(v.get()).map_err(|_| {
                    fail("publish frame: `idempotency_key` must be a string".to_owned())
                })?),
            };
            let raw = typed(&rest);
            let request = parse_json::<PublishRequest>(raw.as_bytes()).map_err(decode)?;
            Ok(ClientFrame::Publish(Box::new(Publish {
                id,
                idempotency_key,
                request,
                raw,
            })))
        }
        other => Err(fail(format!(
            "unknown frame type {other:?}; expected one of {}",
            CLIENT_FRAME_TYPES.join(", ")
        ))),
    }
}

/// Frames the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Subscribed {
        id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        queue: Option<String>,
    },
    Unsubscribed {
        id: String,
    },
    Confirm {
        id: String,
        message_id: String,
        routed: bool,
    },
    Message(Box<MessageFrame>),
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: String,
        detail: String,
    },
}

impl ServerFrame {
    pub fn error(id: Option<String>, error: &ApiError) -> Self {
        Self::Error {
            id,
            code: error.code().to_owned(),
            detail: error.to_string(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Subscribed { .. } => "subscribed",
            Self::Unsubscribed { .. } => "unsubscribed",
            Self::Confirm { .. } => "confirm",
            Self::Message(_) => "message",
            Self::Error { .. } => "error",
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal_error","detail":"unserializable frame"}"#.to_owned()
        })
    }
}

/// A delivery as the client sees it.
#[derive(Debug, Serialize)]
pub struct MessageFrame {
    pub subscription: String,
    /// Only meaningful for durable subscriptions (ack/nack); 0 for live ones.
    pub delivery_tag: u64,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub properties: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl MessageFrame {
    /// JSON content becomes `payload`; anything else `body_base64`.
    pub fn new(
        subscription: String,
        delivery_tag: u64,
        exchange: &str,
        routing_key: &str,
        redelivered: bool,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Self {
        let is_json = properties.content_type().as_ref().is_some_and(|ct| {
            let essence = ct.as_str().split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")
        });
        let payload = if is_json {
            std::str::from_utf8(body)
                .ok()
                .and_then(|text| RawValue::from_string(text.to_owned()).ok())
        } else {
            None
        };
        let body_base64 = payload.is_none().then(|| BASE64.encode(body));
        Self {
            subscription,
            delivery_tag,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            redelivered,
            properties: properties_json(properties),
            payload,
            body_base64,
        }
    }

    /// About the size of the frame's JSON: the body dominates; properties and names
    /// are bounded by AMQP short strings and the broker's frame size.
    pub fn approximate_len(&self) -> usize {
        let body = match (&self.payload, &self.body_base64) {
            (Some(payload), _) => payload.get().len(),
            (None, Some(b64)) => b64.len(),
            (None, None) => 0,
        };
        body + self.exchange.len() + self.routing_key.len() + self.subscription.len() + 512
    }
}

/// AMQP properties as a JSON object; trace context headers come along in `headers`.
pub fn properties_json(p: &BasicProperties) -> Map<String, Value> {
    let mut out = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            out.insert(k.to_owned(), v);
        }
    };
    let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| Value::from(s.as_str()));
    put("content_type", s(p.content_type()));
    put("content_encoding", s(p.content_encoding()));
    put("message_id", s(p.message_id()));
    put("correlation_id", s(p.correlation_id()));
    put("reply_to", s(p.reply_to()));
    put("type", s(p.kind()));
    put("app_id", s(p.app_id()));
    put("user_id", s(p.user_id()));
    put(
        "expiration_ms",
        p.expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok())
            .map(Value::from),
    );
    put("priority", p.priority().map(Value::from));
    put("timestamp", p.timestamp().map(Value::from));
    put("persistent", p.delivery_mode().map(|m| Value::from(m == 2)));
    put("headers", p.headers().as_ref().map(table_json));
    out
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
    fn parses_each_client_frame() {
        let f = parse(r##"{"type":"subscribe","id":"s1","exchange":"events","binding_key":"order.*","mode":"live"}"##).unwrap();
        assert!(
            matches!(f, ClientFrame::Subscribe(s) if s.mode == Mode::Live && s.binding_key == "order.*")
        );
        let f = parse(r##"{"type":"subscribe","id":"s2","exchange":"e","binding_key":"#","mode":"durable","queue":"billing","prefetch":100}"##).unwrap();
        assert!(
            matches!(f, ClientFrame::Subscribe(s) if s.mode == Mode::Durable && s.queue.as_deref() == Some("billing") && s.prefetch == Some(100))
        );
        let f = parse(r##"{"type":"ack","subscription":"s2","delivery_tag":7,"multiple":false}"##)
            .unwrap();
        assert!(matches!(f, ClientFrame::Ack(a) if a.delivery_tag == 7));
        let f = parse(r##"{"type":"nack","subscription":"s2","delivery_tag":7,"requeue":false}"##)
            .unwrap();
        assert!(matches!(f, ClientFrame::Nack(n) if !n.requeue));
        let f = parse(r##"{"type":"nack","subscription":"s2","delivery_tag":7}"##).unwrap();
        assert!(
            matches!(f, ClientFrame::Nack(n) if n.requeue),
            "requeue defaults to true"
        );
        let f = parse(r##"{"type":"unsubscribe","id":"s1"}"##).unwrap();
        assert!(matches!(f, ClientFrame::Unsubscribe(u) if u.id == "s1"));
        let f = parse(r##"{"type":"auth","token":"t"}"##).unwrap();
        assert!(matches!(f, ClientFrame::Auth(a) if a.token == "t"));
        let f = parse(r##"{"type":"publish","id":"p1","exchange":"e","routing_key":"k","payload":{"a": [1, 2]},"idempotency_key":"k1"}"##).unwrap();
        let ClientFrame::Publish(p) = f else { panic!() };
        assert_eq!(p.id, "p1");
        assert_eq!(p.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(
            p.request.payload.as_ref().unwrap().get(),
            r##"{"a": [1, 2]}"##
        );
    }

    #[test]
    fn malformed_frames_are_errors_with_the_id_when_known() {
        assert!(parse("not json").is_err());
        assert!(parse("[1,2]").is_err());
        assert!(parse(r##"{"id":"x"}"##).unwrap_err().id.as_deref() == Some("x"));
        let e = parse(r##"{"type":"dance","id":"d"}"##).unwrap_err();
        assert!(e.detail.contains("unknown frame type"));
        let e = parse(r##"{"type":"subscribe","id":"s","exchange":"e"}"##).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("s"));
        assert!(e.detail.contains("binding_key"), "{}", e.detail);
        let e = parse(r##"{"type":"ack","subscription":"s","delivery_tag":-1}"##).unwrap_err();
        assert!(e.detail.contains("delivery_tag"), "{}", e.detail);
        assert!(
            parse(r##"{"type":"publish","exchange":"e","routing_key":"k","body":""}"##).is_err()
        );
        assert!(parse(r##"{"type":"publish","id":"p","exchange":"e","routing_key":"k","body":"","extra":1}"##).is_err());
        assert!(parse(r##"{"type":"subscribe","id":"s","exchange":"e","binding_key":"#","mode":"forever"}"##).is_err());
    }

    #[test]
    fn server_frames_serialize_with_their_type() {
        for frame in [
            ServerFrame::Subscribed {
                id: "s".into(),
                queue: None,
            },
            ServerFrame::Unsubscribed { id: "s".into() },
            ServerFrame::Confirm {
                id: "p".into(),
                message_id: "m".into(),
                routed: true,
            },
            ServerFrame::error(Some("x".into()), &ApiError::Forbidden("no".into())),
        ] {
            let v: Value = serde_json::from_str(&frame.to_json()).unwrap();
            assert_eq!(v["type"], frame.kind());
            assert!(SERVER_FRAME_TYPES.contains(&frame.kind()));
        }
    }

    #[test]
    fn message_frames_carry_json_payloads_or_base64() {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-abc-01".into()),
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m1".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let f = MessageFrame::new("s1".into(), 3, "e", "k", false, &props, br##"{"id":42}"##);
        let v: Value = serde_json::from_str(&ServerFrame::Message(Box::new(f)).to_json()).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["payload"]["id"], 42);
        assert!(v.get("body_base64").is_none());
        assert_eq!(v["properties"]["message_id"], "m1");
        assert_eq!(v["properties"]["persistent"], true);
        assert_eq!(v["properties"]["headers"]["traceparent"], "00-abc-01");
        let text = BasicProperties::default().with_content_type("text/plain".into());
        let f = MessageFrame::new("s1".into(), 0, "e", "k", true, &text, b"hi");
        assert_eq!(f.body_base64.as_deref(), Some("aGk="));
        // JSON content type but not JSON inside: still delivered, as base64.
        let f = MessageFrame::new("s1".into(), 0, "e", "k", true, &props, b"{oops");
        assert!(f.payload.is_none() && f.body_base64.is_some());
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = parse(&text);
        }

        #[test]
        fn parsing_frame_shaped_json_never_panics(
            kind in proptest::sample::select(vec!["subscribe", "unsubscribe", "ack", "nack", "publish", "auth", "other"]),
            keys in proptest::collection::vec(
                proptest::sample::select(vec!["id", "exchange", "binding_key", "mode", "queue", "prefetch",
                    "subscription", "delivery_tag", "multiple", "requeue", "token", "routing_key",
                    "payload", "body", "body_base64", "properties", "idempotency_key", "type"]), 0..8),
            values in proptest::collection::vec(
                proptest::sample::select(vec!["1", "-1", "\"x\"", "null", "true", "{}", "[]", "\"durable\"",
                    "18446744073709551616", "{\"headers\":{\"a\":[1,{}]}}", "\"#\"", "1.5"]), 0..8),
        ) {
            let members: Vec<String> = keys.iter().zip(values.iter())
                .map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let text = format!("{{\"type\":\"{kind}\"{}{}}}", if members.is_empty() { "" } else { "," }, members.join(","));
            if let Err(e) = parse(&text) {
                proptest::prop_assert!(!e.detail.is_empty());
            }
        }
    }

    #[test]
    fn the_asyncapi_document_names_every_frame_type() {
        let doc = include_str!("../../openapi/asyncapi.yaml");
        for kind in CLIENT_FRAME_TYPES.iter().chain(SERVER_FRAME_TYPES) {
            assert!(
                doc.contains(&format!("type: {{ const: {kind} }}")),
                "openapi/asyncapi.yaml lacks the {kind} frame"
            );
        }
        // And every client type the list names is one the parser knows.
        for kind in CLIENT_FRAME_TYPES {
            let e = parse(&format!(r#"{{"type":"{kind}"}}"#)).unwrap_err();
            assert!(!e.detail.contains("unknown frame type"), "{kind}");
        }
    }
}
