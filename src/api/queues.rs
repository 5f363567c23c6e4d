//! `POST /v1/queues/{queue}/receive|ack|nack|extend`: pull consume with leases
//! (SPEC §14), thin handlers over `pull::Pull`.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::time::Duration;
use utoipa::ToSchema;

use super::body::JsonBody;
use super::doc::problems;
use super::slots::WorkSlot;
use crate::AppState;
use crate::delivery::render::BodyMembers;
use crate::error::ApiError;
use crate::pull::{self, Op, Settled};
use crate::tenancy::{Principal, Scope};
use crate::wire::request::ReplyProperties;
use crate::wire::whole;

/// What to receive.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// Most messages to take (default 1).
    #[serde(default, deserialize_with = "whole::u64")]
    #[schema(minimum = 1, maximum = 100, example = 10)]
    pub max_messages: Option<u64>,
    /// How long to wait for the first message when none is there (a long poll; default
    /// 0: answer at once).
    #[serde(default, deserialize_with = "whole::u64")]
    #[schema(minimum = 0, maximum = 20000, example = 20000)]
    pub wait_ms: Option<u64>,
    /// How long each message stays leased (default `pull.default_lease_ms`), within
    /// `pull.min_lease_ms` and `pull.max_lease_ms` (the bounds shown are those keys'
    /// defaults).
    #[serde(default, deserialize_with = "whole::u64")]
    #[schema(minimum = 1000, maximum = 300000, example = 30000)]
    pub lease_ms: Option<u64>,
}

/// The messages received, each leased until `lease_expires_at`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Received {
    pub messages: Vec<ReceivedMessage>,
}

/// A leased message: its receipt, and the members of a WebSocket message frame.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReceivedMessage {
    /// Opaque; send it back to ack, nack or extend, to any replica.
    #[schema(example = "vQw1bSK5n8bqSrN3AZ7d6g5dVEhXLgZJp3TkgYk6rJ2J5T0pGk4q9xq2b7lUQ1wW")]
    pub receipt: String,
    /// RFC 3339, UTC: unless acked, nacked or extended before, the message goes back to
    /// the queue then.
    #[schema(example = "2026-12-07T10:00:30.000Z")]
    pub lease_expires_at: String,
    /// How many times the message has been received, this time included (leases that
    /// ran out count).
    #[schema(minimum = 1)]
    pub attempt: u32,
    pub exchange: String,
    pub routing_key: String,
    /// The broker delivered it before (a nack with requeue, a replica that died).
    pub redelivered: bool,
    #[schema(value_type = crate::wire::DeliveredProperties)]
    pub properties: ReplyProperties,
    /// The body, for JSON content.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>, nullable = false)]
    pub payload: Option<Box<RawValue>>,
    /// The body, for `text/*` content that is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub body: Option<String>,
    /// The body, otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, content_encoding = "base64")]
    pub body_base64: Option<String>,
}

/// Receipts to ack.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    #[schema(min_items = 1, max_items = 100)]
    pub receipts: Vec<String>,
}

/// Receipts to nack.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NackRequest {
    #[schema(min_items = 1, max_items = 100)]
    pub receipts: Vec<String>,
    /// `true`: back to the queue now. `false`: the queue's retry policy (its next delay,
    /// then `<queue>.dlq`); without one, the queue's dead-letter exchange, if any.
    pub requeue: bool,
}

/// Receipts whose leases to extend.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    #[schema(min_items = 1, max_items = 100)]
    pub receipts: Vec<String>,
    /// The new lease, from now (within `pull.min_lease_ms` and `pull.max_lease_ms`, the
    /// bounds shown being those keys' defaults; a lease never lasts more than
    /// `pull.max_lease_age_ms` in all).
    #[serde(deserialize_with = "whole::required_u64")]
    #[schema(minimum = 1000, maximum = 300000, example = 30000)]
    pub lease_ms: u64,
}

/// Per-receipt results, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettleResults {
    pub results: Vec<SettleResult>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SettleResult {
    pub receipt: String,
    /// 200, or 410 `lease_expired`, 400 `invalid_request` (not a receipt of this queue),
    /// 503 `broker_unavailable`.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub detail: Option<String>,
    /// After an extend: the lease's new end (RFC 3339, UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub lease_expires_at: Option<String>,
}

/// The queue of the path, checked: its name and the caller's `{ queue }` grant.
fn queue_of(
    principal: &Principal,
    path: Result<Path<String>, PathRejection>,
) -> Result<String, ApiError> {
    principal.require(Scope::Subscribe)?;
    let Path(queue) = path.map_err(|e| ApiError::InvalidRequest(format!("queue: {e}")))?;
    if queue.is_empty() || queue.len() > 255 {
        return Err(ApiError::InvalidRequest(
            "queue: must be 1-255 bytes".to_owned(),
        ));
    }
    principal.tenant.authorize_queue(&queue)?;
    Ok(queue)
}

fn lease_ms(state: &AppState, requested: Option<u64>) -> Result<Duration, ApiError> {
    let c = &state.config.pull;
    let ms = requested.unwrap_or(c.default_lease_ms);
    if !(c.min_lease_ms..=c.max_lease_ms).contains(&ms) {
        return Err(ApiError::InvalidRequest(format!(
            "lease_ms: must be from {} to {} (pull.min_lease_ms, pull.max_lease_ms)",
            c.min_lease_ms, c.max_lease_ms
        )));
    }
    Ok(Duration::from_millis(ms))
}

/// Receive messages (long poll).
///
/// Takes up to `max_messages` messages of the queue and leases them for `lease_ms`:
/// nobody else receives them meanwhile. Each comes with a receipt to ack, nack or
/// extend, at any replica of the gateway. With none in the queue, waits up to
/// `wait_ms` for the first; an empty list when none came in time. A message not acked
/// within its lease goes back to the queue (received again with `attempt` one higher).
/// Needs the `subscribe` scope and a `{ queue }` subscribe grant.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/receive",
    tag = "pull",
    operation_id = "receive",
    security(("bearerAuth" = [])),
    params(("queue" = String, Path, description = "A queue of the tenant's vhost.", max_length = 255)),
    request_body(content = ReceiveRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The messages leased (possibly none).", body = Received),
        (status = 400, response = problems::InvalidRequest),
        (status = 401, response = problems::Unauthorized),
        (status = 403, response = problems::Forbidden),
        (status = 404, response = problems::QueueNotFound),
        (status = 413, response = problems::PayloadTooLarge),
        (status = 415, response = problems::UnsupportedMediaType),
        (status = 429, response = problems::RateLimited),
        (status = 503, response = problems::SubscribeUnavailable),
    )
)]
pub async fn receive(
    State(state): State<AppState>,
    Extension(slot): Extension<WorkSlot>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<ReceiveRequest>,
) -> Response {
    match receive_messages(&state, &slot, &principal, path, body.value).await {
        Ok(received) => Json(received).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn receive_messages(
    state: &AppState,
    slot: &WorkSlot,
    principal: &Principal,
    path: Result<Path<String>, PathRejection>,
    request: ReceiveRequest,
) -> Result<Received, ApiError> {
    let queue = queue_of(principal, path)?;
    let max = request.max_messages.unwrap_or(1);
    if max == 0 || max > pull::MAX_MESSAGES as u64 {
        return Err(ApiError::InvalidRequest(format!(
            "max_messages: must be from 1 to {}",
            pull::MAX_MESSAGES
        )));
    }
    let wait = request.wait_ms.unwrap_or(0);
    if wait > pull::MAX_WAIT_MS {
        return Err(ApiError::InvalidRequest(format!(
            "wait_ms: must be at most {}",
            pull::MAX_WAIT_MS
        )));
    }
    let lease = lease_ms(state, request.lease_ms)?;
    // A long poll waits on the broker, not on Warren: it holds a waiting slot, not one
    // of the work slots other tenants need (issue #27).
    let _waiting = if wait > 0 {
        let waiting = state.waiting.admit(&principal.tenant)?;
        slot.release();
        Some(waiting)
    } else {
        None
    };
    let retry = state
        .resolved
        .tenants
        .get(&principal.tenant.name)
        .and_then(|t| t.topology.retry.get(&queue))
        .cloned();
    let receiving = state
        .pull
        .receive(
            &principal.tenant,
            &queue,
            usize::try_from(max).unwrap_or(pull::MAX_MESSAGES),
            Duration::from_millis(wait),
            lease,
            retry,
        )
        .await?;
    let messages = receiving
        .commit()
        .into_iter()
        .map(|leased| {
            let d = leased.delivery;
            drop(crate::otel::delivery_span(
                "pull",
                crate::otel::Delivered::of(&d).as_deref(),
            ));
            let BodyMembers {
                payload,
                body,
                body_base64,
            } = BodyMembers::of(&d.properties, &d.data);
            ReceivedMessage {
                receipt: leased.receipt,
                lease_expires_at: rfc3339_ms(pull::unix_ms(leased.expires_at)),
                attempt: leased.attempt,
                exchange: d.exchange.as_str().to_owned(),
                routing_key: d.routing_key.as_str().to_owned(),
                redelivered: d.redelivered,
                properties: ReplyProperties::Amqp(Box::new(d.properties)),
                payload,
                body,
                body_base64,
            }
        })
        .collect();
    Ok(Received { messages })
}

/// Unix milliseconds as RFC 3339 in UTC with milliseconds.
fn rfc3339_ms(ms: u64) -> String {
    let seconds = crate::rfc3339::format_rfc3339(ms / 1000);
    match seconds.strip_suffix('Z') {
        Some(head) => format!("{head}.{:03}Z", ms % 1000),
        None => seconds,
    }
}

/// The answer to a settle call: 200 when every receipt succeeded, 207 otherwise.
async fn settle(
    state: &AppState,
    principal: &Principal,
    queue: Result<String, ApiError>,
    receipts: Vec<String>,
    op: Op,
) -> Response {
    let queue = match queue {
        Ok(queue) => queue,
        Err(error) => return error.into_response(),
    };
    if receipts.is_empty() || receipts.len() > pull::MAX_RECEIPTS {
        return ApiError::InvalidRequest(format!(
            "receipts: from 1 to {} receipts",
            pull::MAX_RECEIPTS
        ))
        .into_response();
    }
    let settled = state
        .pull
        .settle(&principal.tenant, &queue, &receipts, op)
        .await;
    let results: Vec<SettleResult> = receipts
        .into_iter()
        .zip(settled)
        .map(|(receipt, settled)| {
            let failed = |error: ApiError| SettleResult {
                receipt: receipt.clone(),
                status: error.status().as_u16(),
                code: Some(error.code().to_owned()),
                detail: Some(error.to_string()),
                lease_expires_at: None,
            };
            match settled {
                Settled::Done { lease_expires_ms } => SettleResult {
                    receipt,
                    status: 200,
                    code: None,
                    detail: None,
                    lease_expires_at: lease_expires_ms.map(rfc3339_ms),
                },
                Settled::Expired => failed(ApiError::LeaseExpired(
                    "the lease ran out (or the replica or channel holding it is gone): the message was or will be delivered again".to_owned(),
                )),
                Settled::Invalid => failed(ApiError::InvalidRequest(
                    "receipt: not a receipt of this queue".to_owned(),
                )),
                Settled::Failed => failed(ApiError::BrokerUnavailable {
                    detail: "the broker did not take it; the message will be delivered again"
                        .to_owned(),
                    retry_after: Duration::from_secs(1),
                }),
            }
        })
        .collect();
    let status = if results.iter().all(|r| r.status == 200) {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    (status, Json(SettleResults { results })).into_response()
}

/// Acknowledge received messages.
///
/// Each receipt's message is removed from the queue for good. `200` when every one
/// succeeded, `207` with per-receipt results otherwise (`410 lease_expired`: the lease
/// ran out and the message was or will be delivered again). A repeated ack is harmless.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/ack",
    tag = "pull",
    operation_id = "ack",
    security(("bearerAuth" = [])),
    params(("queue" = String, Path, description = "The queue the messages were received from.", max_length = 255)),
    request_body(content = AckRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every receipt was settled.", body = SettleResults),
        (status = 207, description = "Per-receipt results: some were not settled.", body = SettleResults),
        (status = 400, response = problems::InvalidRequest),
        (status = 401, response = problems::Unauthorized),
        (status = 403, response = problems::Forbidden),
        (status = 413, response = problems::PayloadTooLarge),
        (status = 415, response = problems::UnsupportedMediaType),
    )
)]
pub async fn ack(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<AckRequest>,
) -> Response {
    let queue = queue_of(&principal, path);
    settle(&state, &principal, queue, body.value.receipts, Op::Ack).await
}

/// Give received messages back.
///
/// `requeue: true` puts each message back in the queue now; `false` sends it through
/// the queue's retry policy (the next delay, then `<queue>.dlq`), or without one to its
/// dead-letter exchange. Answered per receipt like an ack.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/nack",
    tag = "pull",
    operation_id = "nack",
    security(("bearerAuth" = [])),
    params(("queue" = String, Path, description = "The queue the messages were received from.", max_length = 255)),
    request_body(content = NackRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every receipt was settled.", body = SettleResults),
        (status = 207, description = "Per-receipt results: some were not settled.", body = SettleResults),
        (status = 400, response = problems::InvalidRequest),
        (status = 401, response = problems::Unauthorized),
        (status = 403, response = problems::Forbidden),
        (status = 413, response = problems::PayloadTooLarge),
        (status = 415, response = problems::UnsupportedMediaType),
    )
)]
pub async fn nack(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<NackRequest>,
) -> Response {
    let requeue = body.value.requeue;
    let queue = queue_of(&principal, path);
    settle(
        &state,
        &principal,
        queue,
        body.value.receipts,
        Op::Nack { requeue },
    )
    .await
}

/// Extend leases.
///
/// Each receipt's lease now ends `lease_ms` from now (never more than
/// `pull.max_lease_age_ms` after the receive); each result carries the new
/// `lease_expires_at`. Answered per receipt like an ack.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/extend",
    tag = "pull",
    operation_id = "extend",
    security(("bearerAuth" = [])),
    params(("queue" = String, Path, description = "The queue the messages were received from.", max_length = 255)),
    request_body(content = ExtendRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Every lease was extended.", body = SettleResults),
        (status = 207, description = "Per-receipt results: some were not extended.", body = SettleResults),
        (status = 400, response = problems::InvalidRequest),
        (status = 401, response = problems::Unauthorized),
        (status = 403, response = problems::Forbidden),
        (status = 413, response = problems::PayloadTooLarge),
        (status = 415, response = problems::UnsupportedMediaType),
    )
)]
pub async fn extend(
    State(state): State<AppState>,
    principal: Principal,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<ExtendRequest>,
) -> Response {
    // Scope and grant first: a caller who may not use the queue learns nothing more.
    let checked = queue_of(&principal, path)
        .and_then(|queue| lease_ms(&state, Some(body.value.lease_ms)).map(|lease| (queue, lease)));
    let (queue, lease) = match checked {
        Ok(checked) => checked,
        Err(error) => return error.into_response(),
    };
    let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    settle(
        &state,
        &principal,
        Ok(queue),
        body.value.receipts,
        Op::Extend { lease_ms },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::rfc3339_ms;

    #[test]
    fn lease_ends_are_rfc3339_with_milliseconds() {
        assert_eq!(rfc3339_ms(1_795_946_400_123), "2026-11-29T10:00:00.123Z");
        assert_eq!(rfc3339_ms(5), "1970-01-01T00:00:00.005Z");
    }
}
