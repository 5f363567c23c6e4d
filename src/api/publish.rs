//! `POST /v1/publish` and `POST /v1/publish/batch`: thin handlers over the publish
//! service, wrapped in the idempotency layer when an `Idempotency-Key` is sent.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::body::JsonBody;
use super::model::{BatchRequest, BatchResponse, PublishAccepted, PublishRequest, TraceContext};
use super::openapi::{PublishHeaders, problems};
use crate::AppState;
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::idempotency::{Fingerprint, IdempotencyKey};
use crate::publishing;

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
    headers: HeaderMap,
    body: JsonBody<PublishRequest>,
) -> Response {
    let key = match checks(&principal, &headers) {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let trace = TraceContext::from_headers(&headers);
    let fingerprint = Fingerprint::of("POST", "/v1/publish", &body.raw);
    let tenant = principal.tenant.clone();
    let message_id = key
        .as_ref()
        .map(|k| k.message_id(&tenant.name, &principal.subject, None));
    let max_headers = state.config.server.max_headers_bytes;
    let work = || async move {
        match publishing::publish_one(&tenant, body.value, &trace, message_id, max_headers).await {
            Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
            Err(error) => error.into_response(),
        }
    };
    publishing::idempotent(&state, &principal, key.as_ref(), fingerprint, work).await
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
    headers: HeaderMap,
    body: JsonBody<BatchRequest>,
) -> Response {
    let key = match checks(&principal, &headers) {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let trace = TraceContext::from_headers(&headers);
    let fingerprint = Fingerprint::of("POST", "/v1/publish/batch", &body.raw);
    let tenant = principal.tenant.clone();
    let max = state.config.server.max_batch_messages;
    let max_headers = state.config.server.max_headers_bytes;
    let item_key = key.clone();
    let subject = principal.subject.clone();
    let work = || async move {
        let item_key = item_key.as_ref().map(|k| (k, subject.as_str()));
        let results =
            publishing::publish_batch(&tenant, body.value, max, max_headers, &trace, item_key)
                .await;
        match results {
            Ok(results) => {
                let all_ok = results
                    .iter()
                    .all(|r| r.status == StatusCode::ACCEPTED.as_u16());
                let status = if all_ok {
                    StatusCode::OK
                } else {
                    StatusCode::MULTI_STATUS
                };
                (status, Json(BatchResponse { results })).into_response()
            }
            Err(error) => error.into_response(),
        }
    };
    publishing::idempotent(&state, &principal, key.as_ref(), fingerprint, work).await
}

/// Scope first, then a well-formed key (if any).
fn checks(principal: &Principal, headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    principal.require(Scope::Publish)?;
    IdempotencyKey::from_headers(headers)
}
