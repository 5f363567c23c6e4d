//! WebSocket `request` frames (SPEC §10): the same service and answers as
//! `POST /v1/request`, answered by a `reply` frame or an `error` frame with the code
//! the HTTP answer would carry.

use super::protocol::{Request, ServerFrame};
use crate::AppState;
use crate::idempotency::Fingerprint;
use crate::publishing::TraceContext;
use crate::rpc::{self, KeyedRequest};
use crate::tenancy::Principal;
use crate::wire::request::RequestReplied;

/// Runs one request frame to its answer frame.
pub async fn request(state: AppState, principal: Principal, frame: Request) -> ServerFrame {
    let Request {
        id,
        idempotency_key,
        request,
        raw,
    } = frame;
    let key = match ServerFrame::idempotency_key(&id, idempotency_key) {
        Ok(key) => key,
        Err(frame) => return *frame,
    };
    let call = KeyedRequest {
        tenant: &principal.tenant,
        subject: &principal.subject,
        key: key
            .as_ref()
            .map(|k| (k, Fingerprint::of("WS", "/v1/ws#request", raw.as_bytes()))),
        trace: TraceContext::default(),
        max_headers_bytes: state.config.server.max_headers_bytes,
        rpc: &state.config.rpc,
        timeout_ms: request.timeout_ms,
    };
    let answer = rpc::request_keyed(
        &state.idempotency,
        call,
        request.publish.into(),
        RequestReplied::from,
    )
    .await;
    ServerFrame::answer(id, answer, |id, body| ServerFrame::Reply {
        id,
        message_id: body.message_id,
        correlation_id: body.correlation_id,
        reply: body.reply,
    })
}
