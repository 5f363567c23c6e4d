//! The JSON that HTTP and WebSocket share, below both: publish request and response
//! bodies as they travel on the wire (serde) and appear in the OpenAPI document
//! (utoipa), and their conversions into and from the publish service's own types; the
//! request/reply ones in `request.rs`; the JSON reader that names the path of a
//! problem in `json.rs`. Validation and the AMQP translation live in
//! [`crate::publishing`].

mod json;
pub mod request;

pub use json::parse_json;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::error::ProblemCode;
use crate::publishing;

/// One message to publish: `POST /v1/publish`, and each item of a batch. Exactly one of
/// `payload`, `body` and `body_base64` carries the message body (`null` counts as absent).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "exchange": "amq.topic",
    "routing_key": "demo.hello",
    "payload": {"hello": "world"},
    "mandatory": false
}))]
pub struct PublishRequest {
    /// Exchange in the tenant's vhost (`""` is the default exchange). At most 255 bytes
    /// of UTF-8; 404 `exchange_not_found` when it does not exist.
    #[schema(max_length = 255, example = "amq.topic")]
    pub exchange: String,
    /// Routing key, at most 255 bytes of UTF-8 (an AMQP short string).
    #[schema(max_length = 255, example = "demo.hello")]
    pub routing_key: String,
    /// Any JSON value; published byte for byte as sent, as `application/json`.
    #[serde(default)]
    #[schema(value_type = Option<serde_json::Value>)]
    pub payload: Option<Box<RawValue>>,
    /// UTF-8 text, published as `text/plain; charset=utf-8`.
    #[serde(default)]
    pub body: Option<String>,
    /// Arbitrary bytes as standard, padded base64 (RFC 4648 §4), published as
    /// `application/octet-stream`.
    #[serde(default)]
    #[schema(
        pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$",
        content_encoding = "base64",
        example = "AAH/"
    )]
    pub body_base64: Option<String>,
    /// AMQP content type; defaults to the body kind's (see `payload`, `body`,
    /// `body_base64`). At most 255 bytes.
    #[serde(default)]
    #[schema(max_length = 255)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub properties: MessageProperties,
    /// Defaults to `true`: a message no queue takes is answered 422 `unroutable`, never
    /// dropped silently. With `false`, the broker drops it and `routed` is `false`.
    #[serde(default)]
    pub mandatory: Option<bool>,
    /// Publish this many milliseconds from now (SPEC §15), at most
    /// `schedule.max_delay_ms` (the maximum shown is that key's default, 7 days). Answered `202` with `scheduled_for`
    /// once the broker confirmed the scheduled message in durable storage; at its time
    /// it is published as described here (mandatory and confirmed), or lands in
    /// `warren.scheduled.dlq` with `x-warren-schedule-error` if it cannot be. Not with
    /// `not_before`.
    #[serde(default, deserialize_with = "whole::u64")]
    #[schema(minimum = 0, maximum = 604_800_000_u64)]
    pub delay_ms: Option<u64>,
    /// Publish at this time (RFC 3339 date-time; whole seconds; a time already past is
    /// due now), at most `schedule.max_delay_ms` ahead. Not with `delay_ms`.
    #[serde(default)]
    #[schema(format = DateTime, nullable = false)]
    pub not_before: Option<String>,
}

/// AMQP basic properties. Every string is an AMQP short string: at most 255 bytes of
/// UTF-8.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageProperties {
    /// Defaults to the id derived from the `Idempotency-Key` (a UUIDv5, stable across
    /// retries), else a fresh UUID.
    #[schema(min_length = 1, max_length = 255)]
    pub message_id: Option<String>,
    #[schema(max_length = 255)]
    pub correlation_id: Option<String>,
    #[schema(max_length = 255)]
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, at most ten years (RabbitMQ's own bound).
    #[serde(default, deserialize_with = "whole::u64")]
    #[schema(minimum = 0, maximum = 315_360_000_000_u64)]
    pub expiration_ms: Option<u64>,
    #[serde(default, deserialize_with = "whole::i64")]
    #[schema(minimum = 0, maximum = 255)]
    pub priority: Option<i64>,
    /// The AMQP `type` property.
    #[serde(rename = "type")]
    #[schema(max_length = 255)]
    pub kind: Option<String>,
    #[schema(max_length = 255)]
    pub app_id: Option<String>,
    /// Defaults to `true` (delivery mode 2).
    pub persistent: Option<bool>,
    #[schema(schema_with = header_table_schema)]
    pub headers: Option<serde_json::Map<String, Value>>,
}

// What `delivery::render::PropertiesJson` writes; this type only documents it.
/// The AMQP properties of a message as it arrived (a reply; WebSocket and SSE message
/// frames show the same): only those the message has.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // documentation of what PropertiesJson writes
pub struct DeliveredProperties {
    #[schema(nullable = false)]
    pub content_type: Option<String>,
    #[schema(nullable = false)]
    pub content_encoding: Option<String>,
    #[schema(nullable = false)]
    pub message_id: Option<String>,
    #[schema(nullable = false)]
    pub correlation_id: Option<String>,
    #[schema(nullable = false)]
    pub reply_to: Option<String>,
    /// The AMQP `type` property.
    #[serde(rename = "type")]
    #[schema(nullable = false)]
    pub kind: Option<String>,
    #[schema(nullable = false)]
    pub app_id: Option<String>,
    /// Set by the broker to the publishing connection's user, when the publisher set it.
    #[schema(nullable = false)]
    pub user_id: Option<String>,
    /// Per-message TTL in milliseconds.
    #[schema(nullable = false, minimum = 0)]
    pub expiration_ms: Option<u64>,
    #[schema(nullable = false, minimum = 0, maximum = 255)]
    pub priority: Option<u8>,
    /// Unix seconds.
    #[schema(nullable = false, minimum = 0)]
    pub timestamp: Option<u64>,
    /// Delivery mode 2.
    #[schema(nullable = false)]
    pub persistent: Option<bool>,
    /// AMQP headers as JSON (byte arrays as base64, decimals as text): trace context,
    /// `x-warren-attempt` on queues with a retry policy, the broker's `x-death`.
    #[schema(nullable = false, additional_properties)]
    pub headers: Option<serde_json::Map<String, Value>>,
}

fn header_table_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .description(Some(
            "AMQP headers. Strings, booleans, arrays and objects map to AMQP field values, \
             nested at most 8 deep; integers in the signed 64-bit range to long-long \
             integers, every other number to a double; `null` to void. Names are at most \
             255 bytes of UTF-8.",
        ))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(255)),
        ))
        .additional_properties(Some(AdditionalProperties::FreeForm(true)))
        .build()
}

/// Whole numbers. JSON Schema counts `5.0` as an integer, and clients whose numbers are
/// all floats (JavaScript, a Python `float`) send it that way: accept any number without
/// a fractional part that fits.
pub(crate) mod whole {
    use serde::Deserialize;
    use serde::de::{Deserializer, Error};
    use serde_json::Number;

    /// 2^63 and 2^64 as floats: the first values out of range.
    const I64_END: f64 = 9_223_372_036_854_775_808.0;
    const U64_END: f64 = 18_446_744_073_709_551_616.0;

    fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Number>, D::Error> {
        Option::<Number>::deserialize(d)
    }

    fn float<E: Error>(n: &Number, min: f64, end: f64) -> Result<f64, E> {
        match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f >= min && f < end => Ok(f),
            _ => Err(E::custom(format!(
                "expected a whole number in range, got {n}"
            ))),
        }
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        number(d)?
            .map(|n| match n.as_u64() {
                Some(v) => Ok(v),
                None => float(&n, 0.0, U64_END).map(|f| f as u64),
            })
            .transpose()
    }

    /// [`u64`] for a member that must be there.
    pub fn required_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        u64(d)?.ok_or_else(|| D::Error::custom("expected a whole number"))
    }

    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        number(d)?
            .map(|n| match n.as_i64() {
                Some(v) => Ok(v),
                None => float(&n, -I64_END, I64_END).map(|f| f as i64),
            })
            .transpose()
    }
}

/// `POST /v1/publish/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"messages": [
    {"exchange": "amq.topic", "routing_key": "demo.a", "payload": 1, "mandatory": false},
    {"exchange": "amq.topic", "routing_key": "demo.b", "body": "two", "mandatory": false}
]}))]
pub struct BatchRequest {
    /// At least one message, at most `server.max_batch_messages` (413 above it).
    #[schema(min_items = 1)]
    pub messages: Vec<PublishRequest>,
}

/// `202` body of a confirmed publish.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[schema(example = json!({
    "message_id": "7355677e-d5de-4446-bb05-86497f6b8155",
    "exchange": "amq.topic",
    "routing_key": "demo.hello",
    "routed": false
}))]
pub struct PublishAccepted {
    /// The `message_id` the AMQP message carries.
    pub message_id: String,
    pub exchange: String,
    pub routing_key: String,
    /// `true` only for a mandatory publish (the broker confirmed and returned nothing, so
    /// a queue took it); always `false` for `mandatory: false` and for a scheduled
    /// message.
    pub routed: bool,
    /// Set for a scheduled publish (`delay_ms`, `not_before`): when it is due (RFC 3339,
    /// milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime, nullable = false)]
    pub scheduled_for: Option<String>,
}

/// One entry of a batch answer, in request order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct BatchItemResult {
    /// `202` when confirmed; otherwise the status a single publish would have answered.
    #[schema(minimum = 200, maximum = 599)]
    pub status: u16,
    /// The message's `message_id` (kept on failures: after a timeout the message may
    /// still have landed).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub message_id: Option<String>,
    /// Set on success; see `PublishAccepted.routed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub routed: Option<bool>,
    /// Set for an accepted scheduled message; see `PublishAccepted.scheduled_for`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime, nullable = false)]
    pub scheduled_for: Option<String>,
    /// Set on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub code: Option<ProblemCode>,
    /// Set on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub detail: Option<String>,
}

/// `200`/`207` body of a batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct BatchResponse {
    /// One result per message, in request order.
    pub results: Vec<BatchItemResult>,
}

impl From<PublishRequest> for publishing::Request {
    fn from(r: PublishRequest) -> Self {
        Self {
            exchange: r.exchange,
            routing_key: r.routing_key,
            payload: r.payload,
            body: r.body,
            body_base64: r.body_base64,
            content_type: r.content_type,
            properties: r.properties.into(),
            mandatory: r.mandatory,
            delay_ms: r.delay_ms,
            not_before: r.not_before,
        }
    }
}

impl From<MessageProperties> for publishing::Properties {
    fn from(p: MessageProperties) -> Self {
        Self {
            message_id: p.message_id,
            correlation_id: p.correlation_id,
            reply_to: p.reply_to,
            expiration_ms: p.expiration_ms,
            priority: p.priority,
            kind: p.kind,
            app_id: p.app_id,
            persistent: p.persistent,
            headers: p.headers,
        }
    }
}

impl From<publishing::Accepted> for PublishAccepted {
    fn from(a: publishing::Accepted) -> Self {
        Self {
            message_id: a.message_id,
            exchange: a.exchange,
            routing_key: a.routing_key,
            routed: a.routed,
            scheduled_for: a.scheduled_for,
        }
    }
}

impl From<publishing::ItemResult> for BatchItemResult {
    fn from(item: publishing::ItemResult) -> Self {
        match item {
            publishing::ItemResult::Accepted(ok) => Self {
                status: ACCEPTED,
                message_id: Some(ok.message_id),
                routed: Some(ok.routed),
                scheduled_for: ok.scheduled_for,
                code: None,
                detail: None,
            },
            publishing::ItemResult::Failed { message_id, error } => {
                let problem = error.problem();
                Self {
                    status: problem.status,
                    message_id,
                    routed: None,
                    scheduled_for: None,
                    code: Some(problem.code),
                    detail: Some(problem.detail),
                }
            }
        }
    }
}

impl BatchResponse {
    /// `200` when every item was confirmed, else `207`.
    pub fn status(&self) -> u16 {
        if self.results.iter().all(|r| r.status == ACCEPTED) {
            200
        } else {
            207
        }
    }
}

/// The status of a confirmed publish, alone and as a batch item.
const ACCEPTED: u16 = 202;

#[cfg(test)]
mod tests {
    use lapin::types::AMQPValue;

    use super::*;
    use crate::publishing::{Prepared, TraceContext};

    /// Through the wire type into the service's validation, as the handlers do.
    fn prepare(json: &str) -> Result<Prepared, String> {
        publishing::Request::from(
            parse_json::<PublishRequest>(json.as_bytes()).map_err(|e| e.to_string())?,
        )
        .prepare(
            &TraceContext::default(),
            None,
            crate::publishing::Limits::default(),
        )
    }

    #[test]
    fn json_payload_is_published_verbatim() {
        let p = prepare(r#"{"exchange":"e","routing_key":"k","payload": {"id": 42 }}"#).unwrap();
        assert_eq!(&p.message.body[..], br#"{"id": 42 }"#);
        assert_eq!(
            p.message
                .properties
                .content_type()
                .as_ref()
                .map(|s| s.as_str()),
            Some("application/json")
        );
        assert!(p.message.mandatory);
        assert_eq!(p.message.properties.delivery_mode(), &Some(2));
    }

    #[test]
    fn body_kinds_and_exclusivity() {
        let p = prepare(r#"{"exchange":"e","routing_key":"k","body":"hi"}"#).unwrap();
        assert_eq!(&p.message.body[..], b"hi");
        let p = prepare(r#"{"exchange":"e","routing_key":"k","body_base64":"AAEC"}"#).unwrap();
        assert_eq!(p.message.body, vec![0, 1, 2]);
        assert!(prepare(r#"{"exchange":"e","routing_key":"k"}"#).is_err());
        assert!(prepare(r#"{"exchange":"e","routing_key":"k","body":"a","payload":1}"#).is_err());
        let err = prepare(r#"{"exchange":"e","routing_key":"k","body_base64":"!!"}"#).unwrap_err();
        assert!(err.starts_with("body_base64:"), "{err}");
    }

    #[test]
    fn property_validation_names_fields() {
        let long = "x".repeat(256);
        let err = prepare(&format!(
            r#"{{"exchange":"e","routing_key":"{long}","body":""}}"#
        ))
        .unwrap_err();
        assert!(err.starts_with("routing_key:"), "{err}");
        let err = prepare(
            r#"{"exchange":"e","routing_key":"k","body":"","properties":{"priority":256}}"#,
        )
        .unwrap_err();
        assert!(err.starts_with("properties.priority:"), "{err}");
        let err =
            prepare(r#"{"exchange":"e","routing_key":"k","body":"","properties":{"priority":-1}}"#)
                .unwrap_err();
        assert!(err.starts_with("properties.priority:"), "{err}");
        let err = prepare(
            r#"{"exchange":"e","routing_key":"k","body":"","properties":{"expiration_ms":315360000001}}"#,
        )
        .unwrap_err();
        assert!(err.starts_with("properties.expiration_ms:"), "{err}");
        let p = prepare(
            r#"{"exchange":"e","routing_key":"k","body":"","properties":{"expiration_ms":6e4,"priority":5.0}}"#,
        )
        .unwrap();
        assert_eq!(
            p.message.properties.expiration().as_ref().unwrap().as_str(),
            "60000"
        );
        assert_eq!(p.message.properties.priority(), &Some(5));
        for bad in [
            r#""expiration_ms":1.5"#,
            r#""expiration_ms":-1"#,
            r#""priority":"5""#,
        ] {
            let err = prepare(&format!(
                r#"{{"exchange":"e","routing_key":"k","body":"","properties":{{{bad}}}}}"#
            ))
            .unwrap_err();
            assert!(err.starts_with("properties."), "{err}");
        }
        assert!(
            prepare(
                r#"{"exchange":"e","routing_key":"k","body":"","properties":{"expiration_ms":315360000000}}"#
            )
            .is_ok()
        );
        assert!(
            prepare(
                r#"{"exchange":"e","routing_key":"k","body":"","properties":{"headers":{"":{"":1}}}}"#,
            )
            .is_ok()
        );
        let err = prepare(&format!(
            r#"{{"exchange":"e","routing_key":"k","body":"","properties":{{"headers":{{"{}":1}}}}}}"#,
            "n".repeat(256)
        ))
        .unwrap_err();
        assert!(err.starts_with("properties.headers."), "{err}");
        let p = prepare(
            r#"{"exchange":"e","routing_key":"k","body":"","properties":{"headers":{"big":9223372036854775808}}}"#,
        )
        .unwrap();
        let headers = p.message.properties.headers().as_ref().unwrap().inner();
        assert_eq!(
            headers.get("big"),
            Some(&AMQPValue::Double(9_223_372_036_854_775_808.0))
        );
        let err =
            prepare(r#"{"exchange":"e","routing_key":"k","body":"","properties":{"colour":1}}"#)
                .unwrap_err();
        assert!(err.starts_with("properties.colour: unknown field"), "{err}");
        let deep = format!("{}1{}", "[".repeat(12), "]".repeat(12));
        let err = prepare(&format!(
            r#"{{"exchange":"e","routing_key":"k","body":"","properties":{{"headers":{{"d":{deep}}}}}}}"#
        ))
        .unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn properties_and_trace_context_are_carried() {
        let json = r#"{"exchange":"e","routing_key":"k","payload":1,"content_type":"application/vnd.x+json",
            "properties":{"message_id":"m-1","correlation_id":"c","reply_to":"r","expiration_ms":60000,
            "priority":5,"type":"t","app_id":"a","persistent":false,"headers":{"s":"v","n":3,"f":1.5,"b":true,"o":{"x":[1,"y"]}}}}"#;
        let trace = TraceContext {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: Some("congo=t61rcWkgMzE".into()),
        };
        let p = publishing::Request::from(parse_json::<PublishRequest>(json.as_bytes()).unwrap())
            .prepare(&trace, None, crate::publishing::Limits::default())
            .unwrap();
        let props = &p.message.properties;
        assert_eq!(p.message_id, "m-1");
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "c");
        assert_eq!(props.reply_to().as_ref().unwrap().as_str(), "r");
        assert_eq!(props.expiration().as_ref().unwrap().as_str(), "60000");
        assert_eq!(props.priority(), &Some(5));
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "t");
        assert_eq!(props.app_id().as_ref().unwrap().as_str(), "a");
        assert_eq!(props.delivery_mode(), &Some(1));
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/vnd.x+json"
        );
        let headers = props.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get("n"), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(headers.get("f"), Some(&AMQPValue::Double(1.5)));
        assert_eq!(headers.get("b"), Some(&AMQPValue::Boolean(true)));
        assert!(matches!(headers.get("o"), Some(AMQPValue::FieldTable(_))));
        assert!(
            matches!(headers.get("traceparent"), Some(AMQPValue::LongString(s)) if s.to_string().starts_with("00-4bf9"))
        );
        assert!(matches!(
            headers.get("tracestate"),
            Some(AMQPValue::LongString(_))
        ));
    }
}
