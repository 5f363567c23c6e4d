//! The `warren.v1` WebSocket frame protocol: JSON text frames with a `type`, parsed
//! into typed client frames and serialized from typed server frames, and a service's
//! answer as the frame that carries it. Pure; no I/O (an unexpected internal error is
//! logged as it becomes an `error` frame).
//!
//! Over 700 lines because of its tests (~320 of them): they pin the wire format byte
//! for byte, which clients depend on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::delivery::render::{Format, MessageFrame};
use crate::delivery::stream::StreamOffset;
use crate::error::ApiError;
use crate::idempotency::{Answered, IdempotencyKey, Outcome};
use crate::wire::PublishRequest;
use crate::wire::parse_json;
use crate::wire::request::{ReplyMessage, RequestBody};

/// Every client frame type, as named in the `type` member.
pub const CLIENT_FRAME_TYPES: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "ack",
    "nack",
    "publish",
    "auth",
    "request",
];
/// Every server frame type.
pub const SERVER_FRAME_TYPES: &[&str] = &[
    "subscribed",
    "unsubscribed",
    "confirm",
    "message",
    "error",
    "reply",
];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// At-most-once, one shared broker queue per (tenant, exchange, binding key).
    #[default]
    Live,
    /// At-least-once, a named tenant-scoped queue that outlives the socket.
    Durable,
    /// At-least-once, an existing queue (SPEC §11), shared with other consumers.
    Queue,
    /// Replay of a RabbitMQ stream from an offset (SPEC §9); Warren acks.
    Stream,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    pub id: String,
    /// Required for `live` and `durable` (checked by [`parse`]); not for `queue` or `stream`.
    #[serde(default)]
    pub exchange: String,
    /// Required for `live` and `durable`; a `stream` subscription's optional routing-key
    /// filter (`#`, everything, when absent).
    #[serde(default)]
    pub binding_key: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub prefetch: Option<u16>,
    #[serde(default)]
    pub format: Format,
    /// `mode: "stream"`: the stream to read.
    #[serde(default)]
    pub stream: Option<String>,
    /// `mode: "stream"`: where to start (`next` when absent).
    #[serde(default)]
    pub offset: Option<StreamOffset>,
}

impl Subscribe {
    /// The members each mode needs (and those it cannot take), given the members the
    /// frame had; a stream subscription without a filter takes every key (`#`).
    fn check(&mut self, members: &BTreeMap<String, Box<RawValue>>) -> Result<(), String> {
        let has = |name: &str| members.contains_key(name);
        let (mode, required, refused): (&str, &[&str], &[&str]) = match self.mode {
            Mode::Live => ("live", &["exchange", "binding_key"], &["stream", "offset"]),
            Mode::Durable => (
                "durable",
                &["exchange", "binding_key"],
                &["stream", "offset"],
            ),
            Mode::Queue => (
                "queue",
                &["queue"],
                &["exchange", "binding_key", "stream", "offset"],
            ),
            Mode::Stream => ("stream", &["stream"], &["exchange", "queue"]),
        };
        if let Some(m) = required.iter().find(|m| !has(m)) {
            return Err(format!("missing field `{m}` (mode \"{mode}\")"));
        }
        if let Some(m) = refused.iter().find(|m| has(m)) {
            return Err(format!("`{m}` does not apply to mode \"{mode}\""));
        }
        if self.mode == Mode::Stream && !has("binding_key") {
            "#".clone_into(&mut self.binding_key);
        }
        Ok(())
    }
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

/// A request frame (SPEC §10): the `POST /v1/request` body plus `id` and an optional key.
#[derive(Debug)]
pub struct Request {
    pub id: String,
    pub idempotency_key: Option<String>,
    pub request: RequestBody,
    /// The request body with its members in sorted order (a stable idempotency fingerprint).
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
    Request(Box<Request>),
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
        "subscribe" => {
            let mut subscribe: Subscribe = parse_json(body.as_bytes()).map_err(decode)?;
            subscribe
                .check(&members)
                .map_err(|e| fail(format!("subscribe frame: {e}")))?;
            Ok(ClientFrame::Subscribe(subscribe))
        }
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
        "request" => {
            let mut rest = members;
            rest.remove("type");
            let id = rest
                .remove("id")
                .ok_or_else(|| fail("request frame: `id` is required".to_owned()))
                .and_then(|v| {
                    serde_json::from_str::<String>(v.get())
                        .map_err(|_| fail("request frame: `id` must be a string".to_owned()))
                })?;
            let idempotency_key = match rest.remove("idempotency_key") {
                None => None,
                Some(v) => Some(serde_json::from_str::<String>(v.get()).map_err(|_| {
                    fail("request frame: `idempotency_key` must be a string".to_owned())
                })?),
            };
            let raw = typed(&rest);
            let request = RequestBody::from_members(rest).map_err(decode)?;
            Ok(ClientFrame::Request(Box::new(Request {
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
        #[serde(skip_serializing_if = "Option::is_none")]
        scheduled_for: Option<String>,
    },
    /// Written by [`MessageFrame::to_json`], which splices the shared delivery JSON
    /// after the subscriber's own members; serde never sees it.
    #[serde(skip_serializing)]
    Message(Box<MessageFrame>),
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: String,
        detail: String,
    },
    /// The reply to a `request` frame, as `POST /v1/request` answers it.
    Reply {
        id: String,
        message_id: String,
        correlation_id: String,
        reply: ReplyMessage,
    },
}

impl ServerFrame {
    /// A frame's `idempotency_key`, checked as the HTTP header is; else the error frame
    /// answering the frame `id`.
    pub fn idempotency_key(
        id: &str,
        key: Option<String>,
    ) -> Result<Option<IdempotencyKey>, Box<Self>> {
        key.map(|k| IdempotencyKey::parse(k.as_bytes()))
            .transpose()
            .map_err(|e| Box::new(Self::error(Some(id.to_owned()), &e)))
    }

    pub fn error(id: Option<String>, error: &ApiError) -> Self {
        Self::Error {
            id,
            code: error.code().to_owned(),
            detail: error.to_string(),
        }
    }

    /// The frame of a keyed call's answer (fresh or replayed): `success` of its body,
    /// else an error frame with the problem's code and detail, as the HTTP answer would carry
    /// them.
    pub fn answer<T>(
        id: String,
        answer: Result<Answered<T>, ApiError>,
        success: impl FnOnce(String, T) -> ServerFrame,
    ) -> ServerFrame {
        let outcome = match answer {
            Ok(answered) => answered.outcome,
            Err(error) => {
                if let ApiError::Internal(cause) = &error {
                    tracing::error!(error = %cause, "Request failed unexpectedly.");
                }
                Outcome::Failure(error.problem().into())
            }
        };
        match outcome {
            Outcome::Success { body, .. } => success(id, body),
            Outcome::Failure(problem) => ServerFrame::Error {
                id: Some(id),
                code: problem.code.as_str().to_owned(),
                detail: problem.detail,
            },
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Subscribed { .. } => "subscribed",
            Self::Unsubscribed { .. } => "unsubscribed",
            Self::Confirm { .. } => "confirm",
            Self::Message(_) => "message",
            Self::Error { .. } => "error",
            Self::Reply { .. } => "reply",
        }
    }

    pub fn to_json(&self) -> String {
        if let Self::Message(message) = self {
            return message.to_json();
        }
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal_error","detail":"unserializable frame"}"#.to_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use lapin::BasicProperties;
    use lapin::message::Delivery;
    use lapin::types::{AMQPValue, FieldTable};
    use serde_json::{Map, Value};

    use super::*;
    use crate::delivery::render::{DeliveryJson, FrameId, properties_json};

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
        let f = parse(r##"{"type":"request","id":"r1","exchange":"e","routing_key":"k","body":"b","timeout_ms":50,"idempotency_key":"k2"}"##).unwrap();
        let ClientFrame::Request(r) = f else { panic!() };
        assert_eq!(
            (r.id.as_str(), r.idempotency_key.as_deref()),
            ("r1", Some("k2"))
        );
        assert_eq!(r.request.timeout_ms, Some(50));
        assert_eq!(r.request.publish.body.as_deref(), Some("b"));
        let e = parse(r##"{"type":"request","id":"r2","exchange":"e","routing_key":"k","body":"b","timeout_ms":"soon"}"##).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("r2"));
        assert!(e.detail.contains("timeout_ms"), "{}", e.detail);
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
    fn cloudevents_format_puts_the_event_in_the_frame() {
        let f = parse(r##"{"type":"subscribe","id":"s","exchange":"e","binding_key":"#","format":"cloudevents"}"##).unwrap();
        assert!(matches!(f, ClientFrame::Subscribe(s) if s.format == Format::CloudEvents));
        let f =
            parse(r##"{"type":"subscribe","id":"s","exchange":"e","binding_key":"#"}"##).unwrap();
        assert!(matches!(f, ClientFrame::Subscribe(s) if s.format == Format::Warren));
        assert!(
            parse(
                r##"{"type":"subscribe","id":"s","exchange":"e","binding_key":"#","format":"xml"}"##
            )
            .is_err()
        );

        let mut headers = FieldTable::default();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "e1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ] {
            headers.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers);
        let f = MessageFrame::formatted(
            "s1",
            &delivery(4, &props, br##"{"n":1}"##),
            Format::CloudEvents,
            "acme",
        );
        let v: Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"message","subscription":"s1","delivery_tag":4,"exchange":"e",
                "routing_key":"k","redelivered":true,
                "event":{"specversion":"1.0","id":"e1","source":"/s","type":"t",
                         "datacontenttype":"application/json","data":{"n":1}}})
        );
        assert!(f.approximate_len() >= f.to_json().len());
        // The default format is unchanged.
        let f = MessageFrame::formatted("s1", &delivery(4, &props, b"{}"), Format::Warren, "acme");
        let v: Value = serde_json::from_str(&f.to_json()).unwrap();
        assert!(v.get("event").is_none() && v.get("payload").is_some());
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
    fn a_queue_subscription_names_a_queue_and_no_exchange() {
        let f = parse(
            r##"{"type":"subscribe","id":"w1","mode":"queue","queue":"billing","prefetch":10}"##,
        )
        .unwrap();
        assert!(
            matches!(f, ClientFrame::Subscribe(s) if s.mode == Mode::Queue && s.queue.as_deref() == Some("billing") && s.prefetch == Some(10))
        );
        let e = parse(r##"{"type":"subscribe","id":"w1","mode":"queue"}"##).unwrap_err();
        assert!(e.detail.contains("`queue`"), "{}", e.detail);
        let e =
            parse(r##"{"type":"subscribe","id":"w1","mode":"queue","queue":"q","exchange":"e"}"##)
                .unwrap_err();
        assert!(
            e.detail.contains("`exchange` does not apply"),
            "{}",
            e.detail
        );
        let e = parse(r##"{"type":"subscribe","id":"s","binding_key":"#"}"##).unwrap_err();
        assert!(e.detail.contains("`exchange`"), "{}", e.detail);
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
                scheduled_for: None,
            },
            ServerFrame::error(Some("x".into()), &ApiError::Forbidden("no".into())),
        ] {
            let v: Value = serde_json::from_str(&frame.to_json()).unwrap();
            assert_eq!(v["type"], frame.kind());
            assert!(SERVER_FRAME_TYPES.contains(&frame.kind()));
        }
    }

    fn delivery(tag: u64, properties: &BasicProperties, body: &[u8]) -> Delivery {
        let mut delivery = Delivery::mock(tag, "e".into(), "k".into(), true, body.to_vec());
        delivery.properties = properties.clone();
        delivery
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
        let f = MessageFrame::new("s1", &delivery(3, &props, br##"{"id":42}"##));
        let v: Value = serde_json::from_str(&ServerFrame::Message(Box::new(f)).to_json()).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["subscription"], "s1");
        assert_eq!(v["delivery_tag"], 3);
        assert_eq!(v["payload"]["id"], 42);
        assert!(v.get("body_base64").is_none());
        assert_eq!(v["properties"]["message_id"], "m1");
        assert_eq!(v["properties"]["persistent"], true);
        assert_eq!(v["properties"]["headers"]["traceparent"], "00-abc-01");
        let text = BasicProperties::default().with_content_type("text/plain".into());
        let f = MessageFrame::new("s1", &delivery(0, &text, b"hi"));
        let v: Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(v["body_base64"], "aGk=");
        assert!(v.get("payload").is_none());
        // JSON content type but not JSON inside: still delivered, as base64.
        let f = MessageFrame::new("s1", &delivery(0, &props, b"{oops"));
        let v: Value = serde_json::from_str(&f.to_json()).unwrap();
        assert!(v.get("payload").is_none() && v.get("body_base64").is_some());
    }

    /// The frame as it was serialised before deliveries were shared (a serde struct
    /// per subscriber): the spliced frame must be the same bytes.
    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum SerdeFrame {
        Message(SerdeMessage),
    }

    #[derive(Serialize)]
    struct SerdeMessage {
        subscription: String,
        delivery_tag: u64,
        exchange: String,
        routing_key: String,
        redelivered: bool,
        properties: Map<String, Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<Box<RawValue>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        body_base64: Option<String>,
    }

    #[test]
    fn a_shared_delivery_is_spliced_into_the_same_bytes_serde_writes() {
        let mut headers = FieldTable::default();
        headers.insert("n".into(), AMQPValue::LongInt(-7));
        headers.insert("s".into(), AMQPValue::LongString("a\"b\\c\u{1}é".into()));
        let json = BasicProperties::default()
            .with_content_type("application/vnd.x+json; charset=utf-8".into())
            .with_timestamp(1_700_000_000)
            .with_headers(headers);
        let cases: [(&BasicProperties, &[u8]); 4] = [
            (&json, b" {\"a\": [1, 2.5, \"\\u00e9\"]} "),
            (&json, b"{broken"),
            (&BasicProperties::default(), b"\x00\xffbinary"),
            (&BasicProperties::default(), b""),
        ];
        for (properties, body) in cases {
            let mut delivery =
                Delivery::mock(9, "ex\"1".into(), "k.\u{2028}".into(), true, body.to_vec());
            delivery.properties = properties.clone();
            let delivery = Arc::new(DeliveryJson::new(&delivery));
            for (subscription, tag) in [("s1", 0), ("quo\"te\n", u64::MAX)] {
                let spliced = MessageFrame::shared(&FrameId::new(subscription), tag, &delivery);
                let payload = std::str::from_utf8(body)
                    .ok()
                    .filter(|_| properties.content_type().is_some())
                    .and_then(|t| RawValue::from_string(t.to_owned()).ok());
                let expected = SerdeFrame::Message(SerdeMessage {
                    subscription: subscription.to_owned(),
                    delivery_tag: tag,
                    exchange: "ex\"1".to_owned(),
                    routing_key: "k.\u{2028}".to_owned(),
                    redelivered: true,
                    properties: properties_json(properties),
                    body_base64: payload.is_none().then(|| BASE64.encode(body)),
                    payload,
                });
                let expected = serde_json::to_string(&expected).unwrap();
                assert_eq!(
                    ServerFrame::Message(Box::new(spliced.clone())).to_json(),
                    expected
                );
                assert!(spliced.approximate_len() >= expected.len());
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = parse(&text);
        }

        #[test]
        fn parsing_frame_shaped_json_never_panics(
            kind in proptest::sample::select(vec!["subscribe", "unsubscribe", "ack", "nack", "publish", "auth", "request", "other"]),
            keys in proptest::collection::vec(
                proptest::sample::select(vec!["id", "exchange", "binding_key", "mode", "queue", "prefetch",
                    "subscription", "delivery_tag", "multiple", "requeue", "token", "routing_key",
                    "payload", "body", "body_base64", "properties", "idempotency_key", "type", "timeout_ms"]), 0..8),
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
