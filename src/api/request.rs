//! `POST /v1/request` (SPEC §10): a thin handler over the request/reply service, its
//! wire types (the publish body plus `timeout_ms`; the reply rendered as properties and
//! `payload`, `body` or `body_base64`), shared with WebSocket `request` frames.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::body::{JsonBody, parse_json};
use super::model::PublishRequest;
use super::openapi::{PublishHeaders, problems};
use super::publish::{checks, respond, trace_context};
use crate::AppState;
use crate::error::ApiError;
use crate::idempotency::Fingerprint;
use crate::rpc::{self, KeyedRequest, Replied};
use crate::tenancy::Principal;
use crate::ws::protocol::properties_json;

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
    pub fn from_members(mut members: BTreeMap<String, Box<RawValue>>) -> Result<Self, ApiError> {
        let timeout_ms = match members.remove("timeout_ms") {
            None => None,
            Some(raw) => whole_ms(raw.get())?,
        };
        let rest = serde_json::to_string(&members)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))?;
        let publish = parse_json::<PublishRequest>(rest.as_bytes())?;
        Ok(Self {
            publish,
            timeout_ms,
        })
    }
}

/// `timeout_ms` as a whole number; like the publish body's numbers, `5.0` counts (JSON
/// Schema calls it an integer, and clients whose numbers are floats send it so).
fn whole_ms(raw: &str) -> Result<Option<u64>, ApiError> {
    let invalid = || {
        ApiError::InvalidRequest("timeout_ms: must be a whole number of milliseconds".to_owned())
    };
    let Some(number) =
        serde_json::from_str::<Option<serde_json::Number>>(raw).map_err(|_| invalid())?
    else {
        return Ok(None);
    };
    if let Some(ms) = number.as_u64() {
        return Ok(Some(ms));
    }
    match number.as_f64() {
        Some(f) if f.fract() == 0.0 && (0.0..1e15).contains(&f) => Ok(Some(f as u64)),
        _ => Err(invalid()),
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
    #[schema(value_type = Object)]
    pub properties: Map<String, Value>,
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

impl From<Replied> for RequestReplied {
    fn from(replied: Replied) -> Self {
        let properties = &replied.reply.properties;
        let data = replied.reply.body.as_slice();
        let essence = properties
            .content_type()
            .as_ref()
            .map(|ct| {
                ct.as_str()
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let is_json = essence == "application/json" || essence.ends_with("+json");
        let text = std::str::from_utf8(data).ok();
        let payload = text
            .filter(|_| is_json)
            .and_then(|t| RawValue::from_string(t.to_owned()).ok());
        let body = text
            .filter(|_| payload.is_none() && essence.starts_with("text/"))
            .map(str::to_owned);
        let body_base64 = (payload.is_none() && body.is_none()).then(|| BASE64.encode(data));
        Self {
            message_id: replied.message_id,
            correlation_id: replied.correlation_id,
            reply: ReplyMessage {
                properties: properties_json(properties),
                payload,
                body,
                body_base64,
            },
        }
    }
}

/// Call an AMQP service and wait for its reply.
///
/// Publishes the body as a publish would (mandatory, confirmed, same grants), with
/// `reply_to` set to RabbitMQ's direct reply-to and a `correlation_id` (the client's
/// `properties.correlation_id`, or a fresh UUID), then waits up to `timeout_ms` for the
/// reply carrying that correlation id. `504 reply_timeout` means the request was
/// delivered and no reply came in time (a later one is dropped). With an
/// `Idempotency-Key`, a retry gets the stored reply and the request is not sent again
/// while the key is retained; `503`/`504` answers release the key.
#[utoipa::path(
    post,
    path = "/v1/request",
    tag = "request",
    operation_id = "request",
    security(("bearerAuth" = [])),
    params(PublishHeaders),
    request_body(content = RequestBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The reply arrived.", body = RequestReplied,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`; absent otherwise."))),
        (status = 400, response = problems::InvalidRequest),
        (status = 401, response = problems::Unauthorized),
        (status = 403, response = problems::Forbidden),
        (status = 404, response = problems::ExchangeNotFound),
        (status = 408, response = problems::RequestTimeout),
        (status = 409, response = problems::RequestConflict),
        (status = 413, response = problems::PayloadTooLarge),
        (status = 415, response = problems::UnsupportedMediaType),
        (status = 422, response = problems::PublishUnprocessable),
        (status = 429, response = problems::RateLimited),
        (status = 502, response = problems::ReplyTooLarge),
        (status = 503, response = problems::PublishUnavailable),
        (status = 504, response = problems::RequestTimedOut),
    )
)]
pub async fn request(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: JsonBody<BTreeMap<String, Box<RawValue>>>,
) -> Response {
    let key = match checks(&principal, &headers) {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let parsed = match RequestBody::from_members(body.value) {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    let call = KeyedRequest {
        tenant: &principal.tenant,
        subject: &principal.subject,
        key: key
            .as_ref()
            .map(|k| (k, Fingerprint::of("POST", "/v1/request", &body.raw))),
        trace: trace_context(&headers),
        max_headers_bytes: state.config.server.max_headers_bytes,
        rpc: &state.config.rpc,
        timeout_ms: parsed.timeout_ms,
    };
    let answer = rpc::request_keyed(
        &state.idempotency,
        call,
        parsed.publish.into(),
        RequestReplied::from,
    )
    .await;
    respond(answer)
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;

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
        assert_eq!(json.properties["correlation_id"], "c");
        let text = rendered(Some("text/plain; charset=utf-8"), "héllo".as_bytes());
        assert_eq!(text.body.as_deref(), Some("héllo"));
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
