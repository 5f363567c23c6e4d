//! `POST /v1/request` (SPEC §10): a thin handler over the request/reply service; its
//! wire types are in `model/request.rs`, shared with WebSocket `request` frames.

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};

use super::body::JsonBody;
use super::doc::{PublishHeaders, problems};
use super::publish::{CallHeaders, respond};
use super::slots::WorkSlot;
use crate::AppState;
use crate::idempotency::Fingerprint;
use crate::rpc::{self, KeyedRequest};
use crate::tenancy::Principal;
use crate::wire::request::{RequestBody, RequestReplied, RequestWire};

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
    Extension(slot): Extension<WorkSlot>,
    principal: Principal,
    mut headers: CallHeaders,
    body: JsonBody<RequestWire>,
) -> Response {
    let key = match headers.checks(&principal) {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let parsed = match body.value.checked() {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    // From here the request mostly waits for its reply: it holds a waiting slot, not
    // one of the gateway's work slots (issue #27).
    let _waiting = match state.waiting.admit(&principal.tenant) {
        Ok(waiting) => waiting,
        Err(error) => return error.into_response(),
    };
    slot.release();
    let call = KeyedRequest {
        tenant: &principal.tenant,
        subject: &principal.subject,
        key: key
            .as_ref()
            .map(|k| (k, Fingerprint::of("POST", "/v1/request", &body.raw))),
        trace: headers.trace,
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
