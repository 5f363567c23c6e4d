//! WebSocket `publish` frames: the same service and answers as `POST /v1/publish`,
//! answered by a `confirm` frame or an `error` frame with the code the HTTP answer
//! would carry.

use super::protocol::{Publish, ServerFrame};
use crate::AppState;
use crate::error::ApiError;
use crate::idempotency::{Answered, Fingerprint};
use crate::publishing::{self, Accepted, KeyedPublish, TraceContext};
use crate::tenancy::Principal;

/// The publish frame path: same service, same answers as `POST /v1/publish`, and the
/// same idempotency semantics when the frame carries an `idempotency_key`.
pub async fn publish(state: AppState, principal: Principal, frame: Publish) -> ServerFrame {
    let Publish {
        id,
        idempotency_key,
        request,
        raw,
    } = frame;
    let key = match ServerFrame::idempotency_key(&id, idempotency_key) {
        Ok(key) => key,
        Err(frame) => return *frame,
    };
    let publish = KeyedPublish {
        tenant: &principal.tenant,
        subject: &principal.subject,
        key: key
            .as_ref()
            .map(|k| (k, Fingerprint::of("WS", "/v1/ws#publish", raw.as_bytes()))),
        trace: TraceContext::default(),
        limits: publishing::Limits::of(&state.config),
    };
    let answer = publishing::publish_keyed(&state.idempotency, publish, request.into()).await;
    frame_from_outcome(id, answer)
}

/// A confirm for an accepted publish (fresh or replayed), else an error frame with the
/// problem's code and detail, as the HTTP answer would carry them.
fn frame_from_outcome(id: String, answer: Result<Answered<Accepted>, ApiError>) -> ServerFrame {
    ServerFrame::answer(id, answer, |id, body| ServerFrame::Confirm {
        id,
        message_id: body.message_id,
        routed: body.routed,
        scheduled_for: body.scheduled_for,
    })
}
