//! `POST /v1/publish` and `POST /v1/publish/batch`: thin handlers over the publish
//! service, wrapped in the idempotency layer when an `Idempotency-Key` is sent.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::body::JsonBody;
use super::doc::{PublishHeaders, problems};
use crate::AppState;
use crate::error::ApiError;
use crate::idempotency::{self, Answered, Fingerprint, IdempotencyKey, Outcome};
use crate::publishing::{self, KeyedPublish, TraceContext};
use crate::tenancy::{Principal, Scope};
use crate::wire::{BatchRequest, BatchResponse, PublishAccepted, PublishRequest};

/// Publish one message.
///
/// Answers `202` only after the broker's publisher confirm. Publishes are `mandatory`
/// unless the body says otherwise, so a message no queue takes is `422 unroutable`, never
/// dropped silently. With an `Idempotency-Key`, a retry never publishes twice while the
/// key is retained: the first answer is replayed with `Idempotent-Replayed: true`.
#[utoipa::path(
    post,
    path = "/v1/publish",
    tag = "publish",
    operation_id = "publish",
    security(("bearerAuth" = [])),
    params(PublishHeaders),
    request_body(content = PublishRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "The broker confirmed the message (and, for a mandatory publish, a queue took it).",
            body = PublishAccepted,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`; absent otherwise."))),
        (status = 400, response = problems::InvalidRequest),
        (status = 401, response = problems::Unauthorized),
        (status = 403, response = problems::Forbidden),
        (status = 404, response = problems::ExchangeNotFound),
        (status = 408, response = problems::RequestTimeout),
        (status = 409, response = problems::IdempotencyKeyInUse),
        (status = 413, response = problems::PayloadTooLarge),
        (status = 415, response = problems::UnsupportedMediaType),
        (status = 429, response = problems::RateLimited),
        (status = 422, response = problems::PublishUnprocessable),
        (status = 503, response = problems::PublishUnavailable),
        (status = 504, response = problems::ConfirmTimeout),
    )
)]
pub async fn publish(
    State(state): State<AppState>,
    principal: Principal,
    mut headers: CallHeaders,
    body: JsonBody<PublishRequest>,
) -> Response {
    let key = match headers.checks(&principal) {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let publish = KeyedPublish {
        tenant: &principal.tenant,
        subject: &principal.subject,
        key: key
            .as_ref()
            .map(|k| (k, Fingerprint::of("POST", "/v1/publish", &body.raw))),
        trace: headers.trace,
        limits: publishing::Limits::of(&state.config),
    };
    let answer = publishing::publish_keyed(&state.idempotency, publish, body.value.into()).await;
    respond(answer.map(|answered| answered.map(PublishAccepted::from)))
}

/// Publish a batch of messages.
///
/// The messages are pipelined on pooled channels and answered per item, in request
/// order: `200` when every one was confirmed, `207` otherwise, with each failed item's
/// `status` and `code` as a single publish would have answered. A malformed batch is
/// answered `400` as a whole and nothing is published. With an `Idempotency-Key`, item
/// `i` gets a `message_id` derived from (tenant, token subject, key, i).
#[utoipa::path(
    post,
    path = "/v1/publish/batch",
    tag = "publish",
    operation_id = "publish_batch",
    security(("bearerAuth" = [])),
    params(PublishHeaders),
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every message was confirmed (every `results[i].status` is 202).",
            body = BatchResponse,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`; absent otherwise."))),
        (status = 207, description = "Some messages failed; `results[i]` says which and why.",
            body = BatchResponse,
            headers(("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same `Idempotency-Key`; absent otherwise."))),
        (status = 400, response = problems::InvalidRequest),
        (status = 401, response = problems::Unauthorized),
        (status = 403, response = problems::Forbidden),
        (status = 408, response = problems::RequestTimeout),
        (status = 409, response = problems::IdempotencyKeyInUse),
        (status = 413, response = problems::PayloadTooLarge),
        (status = 415, response = problems::UnsupportedMediaType),
        (status = 429, response = problems::RateLimited),
        (status = 422, response = problems::IdempotencyKeyMismatch),
        (status = 503, response = problems::IdempotencyStoreUnavailable),
    )
)]
pub async fn publish_batch(
    State(state): State<AppState>,
    principal: Principal,
    mut headers: CallHeaders,
    body: JsonBody<BatchRequest>,
) -> Response {
    let key = match headers.checks(&principal) {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let trace = headers.trace;
    let tenant = principal.tenant.clone();
    let max = state.config.server.max_batch_messages;
    let limits = publishing::Limits::of(&state.config);
    let item_key = key.clone();
    let subject = principal.subject.clone();
    let requests = body.value.messages.into_iter().map(Into::into).collect();
    let work = || async move {
        let item_key = item_key.as_ref().map(|k| (k, subject.as_str()));
        let results =
            publishing::publish_batch(&tenant, requests, max, limits, &trace, item_key).await?;
        let response = BatchResponse {
            results: results.into_iter().map(Into::into).collect(),
        };
        Ok(Outcome::success(response.status(), response))
    };
    let (tenant, subject) = (&principal.tenant.name, &principal.subject);
    let keyed = key
        .as_ref()
        .map(|k| (k, Fingerprint::of("POST", "/v1/publish/batch", &body.raw)));
    let answer = publishing::idempotent(&state.idempotency, tenant, subject, keyed, work).await;
    respond(answer)
}

/// Scope first, then a well-formed key (if any).
pub(super) fn checks(
    principal: &Principal,
    headers: &HeaderMap,
) -> Result<Option<IdempotencyKey>, ApiError> {
    principal.require(Scope::Publish)?;
    idempotency_key(headers)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    IdempotencyKey::from_header_values(
        headers
            .get_all(idempotency::HEADER)
            .iter()
            .map(HeaderValue::as_bytes),
    )
}

/// What a publishing call reads of its headers (`Idempotency-Key`, trace context),
/// taken without cloning the whole header map as the `HeaderMap` extractor does.
pub struct CallHeaders {
    key: Result<Option<IdempotencyKey>, ApiError>,
    pub trace: TraceContext,
}

impl CallHeaders {
    /// Scope first, then a well-formed key (if any), as [`checks`].
    pub fn checks(&mut self, principal: &Principal) -> Result<Option<IdempotencyKey>, ApiError> {
        principal.require(Scope::Publish)?;
        std::mem::replace(&mut self.key, Ok(None))
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for CallHeaders {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self {
            key: idempotency_key(&parts.headers),
            trace: trace_context(&parts.headers),
        })
    }
}

/// W3C trace context from the request headers (each at most 512 bytes), for the AMQP
/// headers.
pub(super) fn trace_context(headers: &HeaderMap) -> TraceContext {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 512)
            .map(str::to_owned)
    };
    TraceContext {
        traceparent: get("traceparent"),
        tracestate: get("tracestate"),
    }
}

/// The HTTP answer: a success as JSON with its status, a stored problem as
/// problem+json, an error as its problem; a replay says so in `Idempotent-Replayed`.
pub(super) fn respond<T: Serialize>(answer: Result<Answered<T>, ApiError>) -> Response {
    let answered = match answer {
        Ok(answered) => answered,
        Err(error) => return error.into_response(),
    };
    let status = |code| StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    let mut response = match answered.outcome {
        Outcome::Success { status: code, body } => (status(code), Json(body)).into_response(),
        Outcome::Failure(problem) => {
            let body = serde_json::to_vec(&problem).unwrap_or_default();
            let mut response = (status(problem.status), body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
            response
        }
    };
    if answered.replayed {
        response.headers_mut().insert(
            idempotency::REPLAYED_HEADER,
            HeaderValue::from_static("true"),
        );
    }
    response
}
