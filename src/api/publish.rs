//! `POST /v1/publish` and `POST /v1/publish/batch`: thin handlers over the publish service.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

use super::body::JsonBody;
use super::model::{BatchRequest, BatchResponse, PublishAccepted, PublishRequest, TraceContext};
use crate::AppState;
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::publishing;

/// Publish one message; 202 once the broker confirmed it.
pub async fn publish(
    principal: Principal,
    headers: HeaderMap,
    body: JsonBody<PublishRequest>,
) -> Result<(StatusCode, Json<PublishAccepted>), ApiError> {
    principal.require(Scope::Publish)?;
    let trace = TraceContext::from_headers(&headers);
    let accepted = publishing::publish_one(&principal.tenant, body.value, &trace).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// Publish many messages; 200 when all were confirmed, else 207 with per-item results.
pub async fn publish_batch(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: JsonBody<BatchRequest>,
) -> Result<(StatusCode, Json<BatchResponse>), ApiError> {
    principal.require(Scope::Publish)?;
    let trace = TraceContext::from_headers(&headers);
    let max = state.config.server.max_batch_messages;
    let results = publishing::publish_batch(&principal.tenant, body.value, max, &trace).await?;
    let status = if results
        .iter()
        .all(|r| r.status == StatusCode::ACCEPTED.as_u16())
    {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    Ok((status, Json(BatchResponse { results })))
}
