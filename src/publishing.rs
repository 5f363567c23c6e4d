//! The publish service: validate, authorize, publish with confirm, count the outcome.
//! Shared by `POST /v1/publish`, the batch endpoint and (later) WebSocket publish frames.

use axum::http::StatusCode;

use crate::api::model::{
    BatchItemResult, BatchRequest, Prepared, PublishAccepted, PublishRequest, TraceContext,
};
use crate::broker::PublishResult;
use crate::error::ApiError;
use crate::idempotency::IdempotencyKey;
use crate::telemetry;
use crate::tenancy::Tenant;
use crate::tenancy::quota::Admitted;

/// Publishes one message; `Ok` only once the broker confirmed it.
pub async fn publish_one(
    tenant: &Tenant,
    request: PublishRequest,
    trace: &TraceContext,
    message_id: Option<String>,
    max_headers_bytes: usize,
) -> Result<PublishAccepted, ApiError> {
    let prepared = request
        .prepare(trace, message_id, max_headers_bytes)
        .map_err(ApiError::InvalidRequest)?;
    authorize(tenant, &prepared)?;
    let _admitted = admit(tenant, 1, prepared.message.body.len())?;
    let broker = tenant.broker().await?;
    let result = broker.publish(&prepared.message).await;
    accepted(tenant, prepared, result)
}

/// Publishes a batch pipelined on pooled channels. A malformed item fails the whole
/// batch with 400 before anything is published; every other failure is per item.
/// `key` is the caller's `Idempotency-Key` with its token subject: item `i` then gets
/// the `message_id` derived from (tenant, subject, key, i).
pub async fn publish_batch(
    tenant: &Tenant,
    request: BatchRequest,
    max_messages: usize,
    max_headers_bytes: usize,
    trace: &TraceContext,
    key: Option<(&IdempotencyKey, &str)>,
) -> Result<Vec<BatchItemResult>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::InvalidRequest(
            "messages: a batch needs at least one message".to_owned(),
        ));
    }
    if request.messages.len() > max_messages {
        return Err(ApiError::PayloadTooLarge(format!(
            "messages: {} messages exceed server.max_batch_messages ({max_messages})",
            request.messages.len()
        )));
    }
    let prepared = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let message_id = key.map(|(k, subject)| k.message_id(&tenant.name, subject, Some(i)));
            m.prepare(trace, message_id, max_headers_bytes)
                .map_err(|e| ApiError::InvalidRequest(format!("messages[{i}].{e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut results: Vec<Option<BatchItemResult>> = vec![None; prepared.len()];
    let mut allowed = Vec::with_capacity(prepared.len());
    for (index, item) in prepared.into_iter().enumerate() {
        match authorize(tenant, &item) {
            Ok(()) => allowed.push((index, item)),
            Err(error) => results[index] = Some(item_error(&error, Some(item.message_id))),
        }
    }
    let messages: Vec<_> = allowed.iter().map(|(_, p)| p.message.clone()).collect();
    let bytes = messages.iter().map(|m| m.body.len()).sum();
    let _admitted = admit(tenant, messages.len(), bytes)?;
    let broker = tenant.broker().await?;
    let outcomes = broker.publish_all(&messages).await;
    for ((index, item), outcome) in allowed.into_iter().zip(outcomes) {
        let message_id = item.message_id.clone();
        results[index] = Some(match accepted(tenant, item, outcome) {
            Ok(ok) => BatchItemResult {
                status: StatusCode::ACCEPTED.as_u16(),
                message_id: Some(ok.message_id),
                routed: Some(ok.routed),
                code: None,
                detail: None,
            },
            Err(error) => item_error(&error, Some(message_id)),
        });
    }
    Ok(results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| item_error(&ApiError::Internal("batch item lost".into()), None))
        })
        .collect())
}

/// Every routing key the message can take must be granted: its own and each one its
/// `CC` and `BCC` headers name (RabbitMQ routes to those too).
fn authorize(tenant: &Tenant, prepared: &Prepared) -> Result<(), ApiError> {
    let m = &prepared.message;
    std::iter::once(&m.routing_key)
        .chain(&prepared.extra_routing_keys)
        .try_for_each(|key| tenant.authorize_publish(&m.exchange, key))
        .inspect_err(|_| telemetry::publish_outcome(&tenant.metrics_label, "forbidden"))
}

/// The tenant's quotas, checked after validation and grants and before the broker.
fn admit(tenant: &Tenant, messages: usize, bytes: usize) -> Result<Admitted, ApiError> {
    tenant
        .quota
        .admit(&tenant.name, messages, bytes)
        .inspect_err(|_| telemetry::publish_outcome(&tenant.metrics_label, "rate_limited"))
}

fn accepted(
    tenant: &Tenant,
    prepared: Prepared,
    result: PublishResult,
) -> Result<PublishAccepted, ApiError> {
    match result {
        Ok(published) => {
            telemetry::publish_outcome(&tenant.metrics_label, "acked");
            Ok(PublishAccepted {
                message_id: prepared.message_id,
                exchange: prepared.message.exchange,
                routing_key: prepared.message.routing_key,
                routed: published.routed,
            })
        }
        Err(error) => {
            telemetry::publish_outcome(&tenant.metrics_label, error.outcome());
            Err(error.into())
        }
    }
}

/// A failed item keeps its `message_id`: after a timeout the message may still have
/// landed, and consumers can de-duplicate on it.
fn item_error(error: &ApiError, message_id: Option<String>) -> BatchItemResult {
    let problem = error.problem();
    BatchItemResult {
        status: problem.status,
        message_id,
        routed: None,
        code: Some(problem.code),
        detail: Some(problem.detail),
    }
}

/// Runs `work` under the caller's `Idempotency-Key`, if any; keys are scoped by tenant
/// and token subject. Shared by the REST handlers and WebSocket publish frames.
pub async fn idempotent<F, Fut>(
    state: &crate::AppState,
    principal: &crate::auth::Principal,
    key: Option<&IdempotencyKey>,
    fingerprint: crate::idempotency::Fingerprint,
    work: F,
) -> axum::response::Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = axum::response::Response>,
{
    match key {
        None => work().await,
        Some(key) => {
            let (tenant, subject) = (&principal.tenant.name, &principal.subject);
            state
                .idempotency
                .run(tenant, subject, key, fingerprint, work)
                .await
        }
    }
}
