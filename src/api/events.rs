//! `POST /v1/events/{exchange}`: CloudEvents in binary mode (`ce-*` headers), structured
//! mode (`application/cloudevents+json`) or a batch (`application/cloudevents-batch+json`),
//! read here and handed to the CloudEvents publish service (SPEC §12).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;

use super::body::RawBody;
use super::doc::{PublishHeaders, problems};
use super::publish::{checks, respond, trace_context};
use crate::AppState;
use crate::cloudevents::publish::{self as service, Caller};
use crate::cloudevents::{self, BATCH, BatchError, Destination, Mode, STRUCTURED};
use crate::error::ApiError;
use crate::idempotency::{Fingerprint, Outcome};
use crate::telemetry;
use crate::wire::{BatchResponse, PublishAccepted};

/// Where the event goes on AMQP, beyond the exchange in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Routing key, at most 255 bytes; defaults to the event's `type`.
    #[param(max_length = 255, nullable = false)]
    routing_key: Option<String>,
    /// `binary` (default): the RabbitMQ protocol binding's binary mode, every attribute a
    /// `ce-<name>` header and the data as the body. `structured`: the whole event as
    /// `application/cloudevents+json` in the body.
    #[param(inline, nullable = false)]
    mode: Option<AmqpMode>,
    /// Publish the event this many milliseconds from now (SPEC §15), at most
    /// `schedule.max_delay_ms`; answered `202` with `scheduled_for`.
    #[param(minimum = 0, maximum = 604_800_000_u64, nullable = false)]
    delay_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum AmqpMode {
    Binary,
    Structured,
}

/// The CloudEvents attribute headers of binary mode (HTTP binding: values
/// percent-encoded). Required in binary mode; ignored in structured mode. Further
/// `ce-<name>` headers are extension attributes.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct BinaryModeHeaders {
    /// `1.0`.
    #[serde(rename = "ce-specversion")]
    #[param(nullable = false, example = "1.0")]
    ce_specversion: Option<String>,
    /// The event's id; unique per `source`. Becomes the AMQP `message_id`.
    #[serde(rename = "ce-id")]
    #[param(nullable = false, example = "a8f5c1e2")]
    ce_id: Option<String>,
    /// A URI-reference naming the event's producer.
    #[serde(rename = "ce-source")]
    #[param(nullable = false, example = "/orders")]
    ce_source: Option<String>,
    /// The event's type; the routing key unless `routing_key` is given.
    #[serde(rename = "ce-type")]
    #[param(nullable = false, example = "order.created")]
    ce_type: Option<String>,
    /// RFC 3339; becomes the AMQP `timestamp`.
    #[serde(rename = "ce-time")]
    #[param(nullable = false, example = "2026-11-29T10:00:00Z")]
    ce_time: Option<String>,
    #[serde(rename = "ce-subject")]
    #[param(nullable = false)]
    ce_subject: Option<String>,
    /// An absolute URI.
    #[serde(rename = "ce-dataschema")]
    #[param(nullable = false)]
    ce_dataschema: Option<String>,
}

/// Publish a CloudEvent (or a batch of them).
///
/// Binary mode: the attributes as `ce-*` headers, the data as the body (any content
/// type; `Content-Type` is `datacontenttype`). Structured mode: `Content-Type:
/// application/cloudevents+json` and the event as JSON (`data` or `data_base64`). A batch:
/// `application/cloudevents-batch+json`, a JSON array of events, answered like
/// `POST /v1/publish/batch` (`200`, or `207` with per-event results).
///
/// The publish semantics are those of `POST /v1/publish`: `202` only after the broker's
/// confirm, `mandatory` (`422 unroutable`), grants on the exchange and routing key, quotas.
/// The AMQP message carries the event in the CloudEvents RabbitMQ binding (`message_id`
/// = `id`, `timestamp` = `time`). Without an `Idempotency-Key`, an event is published
/// once per (`source`, `id`) while retained: a retry is answered with the first answer
/// (`Idempotent-Replayed: true`), the same pair with other content is `422`. Invalid
/// attributes are `400` naming the attribute.
#[utoipa::path(
    post,
    path = "/v1/events/{exchange}",
    tag = "publish",
    operation_id = "publish_event",
    security(("bearerAuth" = [])),
    params(
        ("exchange" = String, Path, description = "Exchange in the tenant's vhost.", max_length = 255),
        EventsQuery,
        PublishHeaders,
        BinaryModeHeaders,
    ),
    request_body(
        description = "One event (binary or structured mode) or a batch.",
        content(
            ("application/cloudevents+json"),
            ("application/cloudevents-batch+json"),
            ("application/octet-stream"),
        )
    ),
    responses(
        (status = 202, description = "The broker confirmed the event (and a queue took it).",
            body = PublishAccepted,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`, or to the same event (`source`, `id`); absent otherwise."))),
        (status = 200, description = "Batch: every event was confirmed.", body = BatchResponse,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`; absent otherwise."))),
        (status = 207, description = "Batch: some events failed; `results[i]` says which and why.", body = BatchResponse,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`; absent otherwise."))),
        (status = 400, response = problems::InvalidRequest),
        (status = 401, response = problems::Unauthorized),
        (status = 403, response = problems::Forbidden),
        (status = 404, response = problems::ExchangeNotFound),
        (status = 408, response = problems::RequestTimeout),
        (status = 409, response = problems::IdempotencyKeyInUse),
        (status = 413, response = problems::PayloadTooLarge),
        (status = 415, response = problems::UnsupportedMediaType),
        (status = 422, response = problems::PublishUnprocessable),
        (status = 429, response = problems::RateLimited),
        (status = 503, response = problems::PublishUnavailable),
        (status = 504, response = problems::ConfirmTimeout),
    )
)]
pub async fn publish_event(
    State(state): State<AppState>,
    principal: crate::tenancy::Principal,
    exchange: Result<Path<String>, PathRejection>,
    query: Result<Query<EventsQuery>, QueryRejection>,
    uri: Uri,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Response {
    let key = match checks(&principal, &headers) {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let (exchange, query) = match (exchange, query) {
        (Ok(Path(exchange)), Ok(Query(query))) => (exchange, query),
        (Err(e), _) => return ApiError::InvalidRequest(format!("exchange: {e}")).into_response(),
        (_, Err(e)) => {
            return ApiError::InvalidRequest(format!("query: {}", e.body_text())).into_response();
        }
    };
    let destination = Destination {
        exchange,
        routing_key: query.routing_key,
        mode: match query.mode {
            Some(AmqpMode::Structured) => Mode::Structured,
            _ => Mode::Binary,
        },
        delay_ms: query.delay_ms,
    };
    let content_type = match headers.get(header::CONTENT_TYPE).map(|v| v.to_str()) {
        None => None,
        Some(Ok(ct)) => Some(ct.trim()).filter(|ct| !ct.is_empty()),
        Some(Err(_)) => {
            return ApiError::InvalidRequest("datacontenttype: Content-Type must be ASCII".into())
                .into_response();
        }
    };
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or_default();
    let caller = |fingerprint| Caller {
        tenant: &principal.tenant,
        subject: &principal.subject,
        key: key.as_ref(),
        fingerprint,
        trace: trace_context(&headers),
        limits: crate::publishing::Limits::of(&state.config),
    };
    let essence = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|e| e.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if essence == BATCH {
        let max = state.config.server.max_batch_messages;
        let events = match cloudevents::from_batch(&body, max) {
            Ok(events) => events,
            Err(BatchError::Invalid(detail)) => {
                return ApiError::InvalidRequest(detail).into_response();
            }
            Err(BatchError::TooMany(n)) => {
                return ApiError::PayloadTooLarge(format!(
                    "{n} events exceed server.max_batch_messages ({max})"
                ))
                .into_response();
            }
        };
        telemetry::cloudevents_received("batch", events.len());
        let fingerprint = Fingerprint::of("POST", target, &body);
        let answer = |results: Vec<crate::publishing::ItemResult>| {
            let response = BatchResponse {
                results: results.into_iter().map(Into::into).collect(),
            };
            Outcome::success(response.status(), response)
        };
        let answered = service::publish_events(
            &state.idempotency,
            caller(fingerprint),
            &destination,
            &events,
            answer,
        )
        .await;
        return respond(answered);
    }
    let mode = if essence == STRUCTURED {
        "structured"
    } else {
        "binary"
    };
    let event = if essence == STRUCTURED {
        cloudevents::from_structured(&body)
    } else if essence.starts_with("application/cloudevents") {
        return ApiError::UnsupportedMediaType(format!(
            "{essence} is not supported; send {STRUCTURED}, {BATCH} or binary mode"
        ))
        .into_response();
    } else {
        let ce = headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
        cloudevents::from_binary(ce, content_type, body)
    };
    let event = match event {
        Ok(event) => event,
        Err(detail) => return ApiError::InvalidRequest(detail).into_response(),
    };
    telemetry::cloudevents_received(mode, 1);
    // The event as read (binary and structured mode alike), so a retry in either mode
    // with the same key and the same event is the same request.
    let fingerprint = Fingerprint::of("POST", target, event.to_structured_json().as_bytes());
    let answered = service::publish_event(
        &state.idempotency,
        caller(fingerprint),
        &destination,
        &event,
    )
    .await;
    respond(answered.map(|a| a.map(PublishAccepted::from)))
}

/// The schema of a structured event, and of a batch, in the request body of
/// `POST /v1/events/{exchange}`: what utoipa's attributes cannot say (extension names
/// and types, `data` xor `data_base64`).
pub fn document_schemas(doc: &mut Value) {
    let attribute = json!({"type": "string", "minLength": 1});
    let event = json!({
        "type": "object",
        "description": "A CloudEvent 1.0 in the JSON format. Every member other than `data` and \
            `data_base64` is an attribute; extension attributes (at most 32) have names of 1-20 \
            lower-case letters and digits and string, boolean or integer values.",
        "required": ["specversion", "id", "source", "type"],
        "properties": {
            "specversion": {"type": "string", "const": "1.0"},
            "id": {"type": "string", "minLength": 1, "maxLength": 255,
                   "description": "Unique per `source`; becomes the AMQP `message_id`."},
            "source": {"type": "string", "minLength": 1, "pattern": "^[^\\s\\u0000-\\u001f\\u007f-\\u009f]+$",
                       "description": "A URI-reference."},
            "type": {"type": "string", "minLength": 1, "maxLength": 255,
                     "description": "The routing key unless `routing_key` is given."},
            "datacontenttype": {"type": "string", "minLength": 1, "maxLength": 255},
            "dataschema": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9+.-]*:[^\\s\\u0000-\\u001f\\u007f-\\u009f]*$"},
            "subject": attribute,
            "time": {"type": "string", "format": "date-time"},
            "data": {"description": "The data, as JSON (any JSON value)."},
            "data_base64": {"type": "string", "contentEncoding": "base64",
                "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$"}
        },
        "propertyNames": {"pattern": "^(?:[a-z0-9]{1,20}|data_base64)$"},
        "additionalProperties": {"oneOf": [
            {"type": "string"}, {"type": "boolean"},
            {"type": "integer", "minimum": -2_147_483_648_i64, "maximum": 2_147_483_647}
        ]},
        "maxProperties": 42,
        "not": {"required": ["data", "data_base64"]},
        "example": {"specversion": "1.0", "id": "a8f5c1e2", "source": "/orders",
                    "type": "order.created", "time": "2026-11-29T10:00:00Z",
                    "datacontenttype": "application/json", "data": {"order": 42}}
    });
    let batch = json!({
        "type": "array", "minItems": 1,
        "description": "At most `server.max_batch_messages` events (413 above).",
        "items": {"$ref": "#/components/schemas/CloudEvent"}
    });
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        schemas.insert("CloudEvent".into(), event);
        schemas.insert("CloudEventBatch".into(), batch);
    }
    let Some(content) = doc
        .pointer_mut("/paths/~1v1~1events~1{exchange}/post/requestBody/content")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    content.insert(
        STRUCTURED.into(),
        json!({"schema": {"$ref": "#/components/schemas/CloudEvent"}}),
    );
    content.insert(
        BATCH.into(),
        json!({"schema": {"$ref": "#/components/schemas/CloudEventBatch"}}),
    );
    content.insert(
        "application/octet-stream".into(),
        json!({"schema": {"type": "string", "format": "binary",
            "description": "Binary mode: the event's data, of any content type (this one \
                stands for all); the attributes are the `ce-*` headers."}}),
    );
}
