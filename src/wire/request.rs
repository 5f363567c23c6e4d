//! The request/reply wire types (SPEC §10), shared by `POST /v1/request` and WebSocket
//! `request` frames: the publish body plus `timeout_ms`, parsed in one pass; the reply
//! rendered as properties and `payload`, `body` or `body_base64`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::PublishRequest;
use super::parse_json;
use crate::delivery::render::{BodyMembers, PropertiesJson, properties_json};
use crate::error::ApiError;
use crate::rpc::Replied;

/// A request: every member of a publish (`PublishRequest`) plus `timeout_ms`. Warren
/// sets `reply_to` (direct reply-to) and `correlation_id` (when the client sets none);
/// the request is always mandatory.
#[derive(Debug, ToSchema)]
#[schema(example = json!({
    "exchange": "",
    "routing_key": "rpc.quote",
    "payload": {"sku": "A-1", "quantity": 3},
    "timeout_ms": 5000
}))]
pub struct RequestBody {
    #[serde(flatten)]
    pub publish: PublishRequest,
    /// How long to wait for the reply after publishing, in milliseconds, from 1 to
    /// `rpc.max_timeout_ms` (the maximum shown is that key's default); when absent,
    /// `rpc.default_timeout_ms`.
    #[schema(minimum = 1, maximum = 60_000)]
    pub timeout_ms: Option<u64>,
}

impl RequestBody {
    /// Splits a request's members into the publish body and `timeout_ms`; errors name
    /// the JSON path, as for a publish. `members` has no `type`, `id` or key members.
    pub fn from_members(members: BTreeMap<String, Box<RawValue>>) -> Result<Self, ApiError> {
        let text = serde_json::to_string(&members)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))?;
        parse_json::<RequestWire>(text.as_bytes())?.checked()
    }
}

/// A request body as parsed, in one pass: the publish body's members go to
/// `PublishRequest`'s own deserializer and `timeout_ms` is taken out on the way
/// ([`split::TakeTimeout`]); [`RequestWire::checked`] then judges `timeout_ms`, so its
/// error names it as the publish body's errors name theirs.
pub struct RequestWire {
    publish: PublishRequest,
    timeout_ms: split::Timeout,
}

impl RequestWire {
    pub fn checked(self) -> Result<RequestBody, ApiError> {
        let timeout_ms = match self.timeout_ms {
            split::Timeout::Absent => None,
            split::Timeout::Ms(ms) => Some(ms),
            split::Timeout::Invalid => {
                return Err(ApiError::InvalidRequest(
                    "timeout_ms: must be a whole number of milliseconds".to_owned(),
                ));
            }
        };
        Ok(RequestBody {
            publish: self.publish,
            timeout_ms,
        })
    }
}

impl<'de> Deserialize<'de> for RequestWire {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut timeout_ms = split::Timeout::Absent;
        let publish = PublishRequest::deserialize(split::TakeTimeout {
            inner: deserializer,
            timeout: &mut timeout_ms,
        })?;
        Ok(Self {
            publish,
            timeout_ms,
        })
    }
}

/// Taking `timeout_ms` out of an object whose other members are a publish body, while
/// `PublishRequest`'s derived deserializer reads them (no intermediate map, no second
/// parse).
mod split {
    use std::fmt;

    use serde::de::value::{BorrowedStrDeserializer, StringDeserializer};
    use serde::de::{
        DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };

    const TIMEOUT_MS: &str = "timeout_ms";

    /// `timeout_ms` as found: absent (or `null`), a whole number of milliseconds (`5.0`
    /// counts: JSON Schema calls it an integer, and clients whose numbers are floats
    /// send it so), or anything else.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Timeout {
        Absent,
        Ms(u64),
        Invalid,
    }

    /// A deserializer for an object that hands every member but `timeout_ms` to the
    /// visitor, and `timeout_ms` to `timeout`.
    pub struct TakeTimeout<'t, D> {
        pub inner: D,
        pub timeout: &'t mut Timeout,
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for TakeTimeout<'_, D> {
        type Error = D::Error;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.inner.deserialize_map(Members {
                visitor,
                timeout: self.timeout,
            })
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            struct enum identifier ignored_any
        }
    }

    /// Accepts only an object, whose members go through [`Filtered`].
    struct Members<'t, V> {
        visitor: V,
        timeout: &'t mut Timeout,
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Members<'_, V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            self.visitor.visit_map(Filtered {
                map,
                timeout: self.timeout,
            })
        }
    }

    struct Filtered<'t, A> {
        map: A,
        timeout: &'t mut Timeout,
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Filtered<'_, A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            loop {
                match self.map.next_key::<Key<'de>>()? {
                    None => return Ok(None),
                    Some(key) if key.is(TIMEOUT_MS) => {
                        *self.timeout = self.map.next_value::<Timeout>()?;
                    }
                    Some(Key::Borrowed(key)) => {
                        return seed
                            .deserialize(BorrowedStrDeserializer::new(key))
                            .map(Some);
                    }
                    Some(Key::Owned(key)) => {
                        let key: StringDeserializer<A::Error> = StringDeserializer::new(key);
                        return seed.deserialize(key).map(Some);
                    }
                }
            }
        }

        fn next_value_seed<S: DeserializeSeed<'de>>(
            &mut self,
            seed: S,
        ) -> Result<S::Value, A::Error> {
            self.map.next_value_seed(seed)
        }
    }

    /// A member name, borrowed from the body unless it had escapes.
    enum Key<'de> {
        Borrowed(&'de str),
        Owned(String),
    }

    impl Key<'_> {
        fn is(&self, name: &str) -> bool {
            match self {
                Key::Borrowed(k) => *k == name,
                Key::Owned(k) => k == name,
            }
        }
    }

    impl<'de> serde::Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct KeyVisitor;
            impl<'de> Visitor<'de> for KeyVisitor {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a member name")
                }
                fn visit_borrowed_str<E: Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key::Borrowed(v))
                }
                fn visit_str<E: Error>(self, v: &str) -> Result<Key<'de>, E> {
                    Ok(Key::Owned(v.to_owned()))
                }
                fn visit_string<E: Error>(self, v: String) -> Result<Key<'de>, E> {
                    Ok(Key::Owned(v))
                }
            }
            d.deserialize_str(KeyVisitor)
        }
    }

    impl<'de> serde::Deserialize<'de> for Timeout {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct TimeoutVisitor;
            impl<'de> Visitor<'de> for TimeoutVisitor {
                type Value = Timeout;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a whole number of milliseconds")
                }
                fn visit_unit<E: Error>(self) -> Result<Timeout, E> {
                    Ok(Timeout::Absent)
                }
                fn visit_none<E: Error>(self) -> Result<Timeout, E> {
                    Ok(Timeout::Absent)
                }
                fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Timeout, D::Error> {
                    d.deserialize_any(self)
                }
                fn visit_u64<E: Error>(self, v: u64) -> Result<Timeout, E> {
                    Ok(Timeout::Ms(v))
                }
                fn visit_i64<E: Error>(self, v: i64) -> Result<Timeout, E> {
                    Ok(u64::try_from(v).map_or(Timeout::Invalid, Timeout::Ms))
                }
                fn visit_f64<E: Error>(self, v: f64) -> Result<Timeout, E> {
                    Ok(if v.fract() == 0.0 && (0.0..1e15).contains(&v) {
                        Timeout::Ms(v as u64)
                    } else {
                        Timeout::Invalid
                    })
                }
                fn visit_bool<E: Error>(self, _: bool) -> Result<Timeout, E> {
                    Ok(Timeout::Invalid)
                }
                fn visit_str<E: Error>(self, _: &str) -> Result<Timeout, E> {
                    Ok(Timeout::Invalid)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Timeout, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Timeout::Invalid)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Timeout, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(Timeout::Invalid)
                }
            }
            d.deserialize_any(TimeoutVisitor)
        }
    }
}

/// `200` body: the request's ids and the reply.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "message_id": "7355677e-d5de-4446-bb05-86497f6b8155",
    "correlation_id": "0b5e4a4c-2f0e-4f53-9d3b-6f1f0e2a9c11",
    "reply": {
        "properties": {"content_type": "application/json", "correlation_id": "0b5e4a4c-2f0e-4f53-9d3b-6f1f0e2a9c11"},
        "payload": {"price": 42}
    }
}))]
pub struct RequestReplied {
    /// The request's `message_id`.
    pub message_id: String,
    /// The request's `correlation_id`: the client's, or the one Warren made.
    pub correlation_id: String,
    pub reply: ReplyMessage,
}

/// A reply as the responder sent it: its AMQP properties (as a WebSocket `message`
/// frame shows them) and exactly one of `payload` (JSON content that parses),
/// `body` (`text/*` content that is UTF-8) and `body_base64` (anything else).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReplyMessage {
    #[schema(value_type = super::DeliveredProperties)]
    pub properties: ReplyProperties,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>, nullable = false)]
    pub payload: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, content_encoding = "base64")]
    pub body_base64: Option<String>,
}

/// A reply's properties: the AMQP ones as they arrived, written as JSON when the answer
/// is (no map in between), or the JSON object read back from a stored answer
/// (`Idempotency-Key` replays).
#[derive(Debug, Clone)]
pub enum ReplyProperties {
    Amqp(Box<lapin::BasicProperties>),
    Stored(Map<String, Value>),
}

impl ReplyProperties {
    /// The properties as a JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        match self {
            Self::Amqp(properties) => properties_json(properties),
            Self::Stored(map) => map.clone(),
        }
    }
}

impl Serialize for ReplyProperties {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Amqp(properties) => PropertiesJson(properties).serialize(serializer),
            Self::Stored(map) => map.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ReplyProperties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Map::deserialize(deserializer).map(Self::Stored)
    }
}

impl From<Replied> for RequestReplied {
    fn from(replied: Replied) -> Self {
        let Replied {
            message_id,
            correlation_id,
            reply,
        } = replied;
        let (properties, data) = (reply.properties, reply.body);
        let BodyMembers {
            payload,
            body,
            body_base64,
        } = BodyMembers::of(&properties, &data);
        Self {
            message_id,
            correlation_id,
            reply: ReplyMessage {
                properties: ReplyProperties::Amqp(Box::new(properties)),
                payload,
                body,
                body_base64,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;

    use super::*;
    use crate::broker::Reply;

    fn rendered(content_type: Option<&str>, body: &[u8]) -> ReplyMessage {
        let mut properties = BasicProperties::default().with_correlation_id("c".into());
        if let Some(ct) = content_type {
            properties = properties.with_content_type(ct.into());
        }
        RequestReplied::from(Replied {
            message_id: "m".into(),
            correlation_id: "c".into(),
            reply: Reply {
                properties,
                body: body.to_vec(),
                round_trip: std::time::Duration::ZERO,
            },
        })
        .reply
    }

    #[test]
    fn replies_render_as_payload_body_or_base64() {
        let json = rendered(Some("application/json"), br#"{"a": 1}"#);
        assert_eq!(json.payload.as_ref().map(|p| p.get()), Some(r#"{"a": 1}"#));
        assert!(json.body.is_none() && json.body_base64.is_none());
        assert_eq!(json.properties.to_map()["correlation_id"], "c");
        let text = rendered(Some("text/plain; charset=utf-8"), "héllo".as_bytes());
        assert_eq!(text.body.as_deref(), Some("héllo"));
        // Media types are case-insensitive.
        for json_type in [
            "Application/JSON",
            "application/problem+JSON; charset=utf-8",
        ] {
            let json = rendered(Some(json_type), br#"{"a": 1}"#);
            assert!(json.payload.is_some(), "{json_type}");
        }
        assert_eq!(
            rendered(Some("TEXT/Plain"), b"hi").body.as_deref(),
            Some("hi")
        );
        assert!(rendered(Some("json"), b"1").payload.is_none());
        assert!(rendered(Some("text"), b"x").body.is_none());
        let binary = rendered(Some("application/octet-stream"), &[0, 1, 255]);
        assert_eq!(binary.body_base64.as_deref(), Some("AAH/"));
        let broken = rendered(Some("application/json"), b"{oops");
        assert_eq!(
            broken.body_base64.as_deref(),
            Some(BASE64.encode(b"{oops").as_str())
        );
        let none = rendered(None, b"x");
        assert!(none.body_base64.is_some());
        // Stored for Idempotency-Key replay and read back the same.
        let stored = serde_json::to_string(&json).unwrap();
        let back: ReplyMessage = serde_json::from_str(&stored).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), stored);
    }

    #[test]
    fn a_request_body_is_parsed_in_one_pass() {
        let parse =
            |text: &str| parse_json::<RequestWire>(text.as_bytes()).and_then(RequestWire::checked);
        let body =
            parse(r#"{"timeout_ms":250,"exchange":"x","routing_key":"q","body":"hi"}"#).unwrap();
        assert_eq!(body.timeout_ms, Some(250));
        assert_eq!(
            (
                body.publish.exchange.as_str(),
                body.publish.routing_key.as_str()
            ),
            ("x", "q")
        );
        // A member name with an escape is not borrowed from the body; both kinds split.
        let body =
            parse(r#"{"exchange":"","routing_key":"q","body":"hi","timeout\u005fms":7}"#).unwrap();
        assert_eq!(body.timeout_ms, Some(7));
        let body = parse(r#"{"exchange":"","rout\u0069ng_key":"q","body":"hi"}"#).unwrap();
        assert_eq!(body.publish.routing_key, "q");
        let body =
            parse(r#"{"exchange":"","routing_key":"q","body":"hi","timeout_ms":null}"#).unwrap();
        assert_eq!(body.timeout_ms, None);
        for bad in ["[1]", "{\"a\":1}", "true", "1e300", "-3.0"] {
            let text =
                format!(r#"{{"exchange":"","routing_key":"q","body":"hi","timeout_ms":{bad}}}"#);
            let error = parse(&text).unwrap_err();
            assert!(
                error.to_string().starts_with("timeout_ms:"),
                "{bad}: {error}"
            );
        }
        // The publish body's own checks still apply, with their paths.
        let error = parse(r#"{"exchange":"","routing_key":"q","body":"hi","nope":1}"#).unwrap_err();
        assert!(error.to_string().contains("nope"), "{error}");
        let error = parse(r#"{"exchange":"","routing_key":"q","properties":{"priority":"x"}}"#)
            .unwrap_err();
        assert!(
            error.to_string().starts_with("properties.priority"),
            "{error}"
        );
        for not_an_object in ["[]", "\"x\"", "3"] {
            assert_eq!(parse(not_an_object).unwrap_err().code(), "invalid_request");
        }
    }

    #[test]
    fn timeout_ms_is_split_from_the_publish_body() {
        let members =
            |text: &str| serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(text).unwrap();
        let body = RequestBody::from_members(members(
            r#"{"exchange":"","routing_key":"q","body":"hi","timeout_ms":250}"#,
        ))
        .unwrap();
        assert_eq!(body.timeout_ms, Some(250));
        let body = RequestBody::from_members(members(
            r#"{"exchange":"","routing_key":"q","body":"hi","timeout_ms":1523.0}"#,
        ))
        .unwrap();
        assert_eq!(body.timeout_ms, Some(1523));
        for bad in ["1.5", "-1", "\"5\""] {
            let text =
                format!(r#"{{"exchange":"","routing_key":"q","body":"hi","timeout_ms":{bad}}}"#);
            assert!(RequestBody::from_members(members(&text)).is_err(), "{bad}");
        }
        assert_eq!(body.publish.body.as_deref(), Some("hi"));
        let error = RequestBody::from_members(members(
            r#"{"exchange":"","routing_key":"q","body":"hi","timeout_ms":-1}"#,
        ))
        .unwrap_err();
        assert!(error.to_string().starts_with("timeout_ms:"), "{error}");
        let error =
            RequestBody::from_members(members(r#"{"exchange":"","routing_key":7,"body":"hi"}"#))
                .unwrap_err();
        assert!(error.to_string().starts_with("routing_key:"), "{error}");
    }
}
