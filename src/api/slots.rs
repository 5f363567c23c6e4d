//! The work slot of a request that will wait (request/reply, a pull receive): taken
//! from `server.max_concurrent_requests` like any `/v1` request's, but handed to the
//! handler, which gives it back once it starts waiting and holds a waiting slot
//! instead (`crate::WaitingSlots`). Authentication and reading the body stay within the
//! gateway's bound on concurrent work; the wait does not.

use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::OwnedSemaphorePermit;

use crate::AppState;

/// The request's work slot, until [`WorkSlot::release`] or the answer.
#[derive(Clone)]
pub struct WorkSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl WorkSlot {
    /// Gives the slot back: the request waits now, and no longer counts as work.
    pub fn release(&self) {
        drop(self.0.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// Waits for a work slot (as the other `/v1` routes do) and hands it to the handler
/// as a request extension; the slot is released at the answer at the latest.
pub async fn hold_work_slot(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let permit = state.work_slots.clone().acquire_owned().await.ok();
    let slot = WorkSlot(Arc::new(Mutex::new(permit)));
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    slot.release();
    response
}
