//! `POST /v1/publish` and `POST /v1/publish/batch`: thin handlers over the publish
//! service, wrapped in the idempotency layer when an `Idempotency-Key` is sent.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::body::JsonBody;
use super::model::{BatchRequest, BatchResponse, PublishRequest, TraceContext};
use crate::AppState;
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::idempotency::{Fingerprint, IdempotencyKey};
use crate::publishing;

/// Publish one message; 202 once the broker confirmed it.
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
    let message_id = key.as_ref().map(|k| k.message_id(&tenant.name, None));
    let work = || async move {
        match publishing::publish_one(&tenant, body.value, &trace, message_id).await {
            Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
            Err(error) => error.into_response(),
        }
    };
    idempotent(&state, &principal, key.as_ref(), fingerprint, work).await
}

/// Publish many messages; 200 when all were confirmed, else 207 with per-item results.
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
    let item_key = key.clone();
    let work = || async move {
        let results =
            publishing::publish_batch(&tenant, body.value, max, &trace, item_key.as_ref()).await;
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
    idempotent(&state, &principal, key.as_ref(), fingerprint, work).await
}

/// Scope first, then a well-formed key (if any).
fn checks(principal: &Principal, headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    principal.require(Scope::Publish)?;
    IdempotencyKey::from_headers(headers)
}

/// Keys are scoped by tenant and token subject.
async fn idempotent<F, Fut>(
    state: &AppState,
    principal: &Principal,
    key: Option<&IdempotencyKey>,
    fingerprint: Fingerprint,
    work: F,
) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Response>,
{
    match key {
        None => work().await,
        Some(key) => {
            let scope = format!("{}\u{1f}{}", principal.tenant.name, principal.subject);
            state.idempotency.run(&scope, key, fingerprint, work).await
        }
    }
}
