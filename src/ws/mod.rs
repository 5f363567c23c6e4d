//! `GET /v1/ws`: authenticate the upgrade (header, `access_token` query parameter or
//! `bearer.<jwt>` subprotocol), enforce origin and per-tenant socket limits, then hand
//! the socket to a session.

pub mod durable;
pub mod hub;
pub mod protocol;
pub mod queue;
mod request;
pub mod session;
pub mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::header::{ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::AppState;
use crate::auth;
use crate::error::ApiError;
use crate::telemetry;
use protocol::MessageFrame;

pub const SUBPROTOCOL: &str = "warren.v1";

/// What the rest of the gateway hands a session to write to its socket.
pub enum Outgoing {
    /// A delivery, with the share of the socket's byte budget it holds until written.
    Message(Box<MessageFrame>, OwnedSemaphorePermit),
    /// A subscription ended from the broker side (consumer lost).
    Ended {
        subscription: String,
        error: ApiError,
    },
}

/// The bytes of message frames waiting for one socket (`ws.max_buffered_bytes`), on top
/// of the frame count its channel bounds (`ws.send_buffer`): large messages and a slow
/// reader cannot make a socket hold more than this.
#[derive(Clone)]
pub struct SendBudget {
    bytes: Arc<Semaphore>,
    max: usize,
}

impl SendBudget {
    pub fn new(max: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// The whole budget, in bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    /// What a frame of `len` bytes takes: a frame larger than the whole budget takes
    /// all of it (so it waits until the socket has nothing else queued).
    fn cost(&self, len: usize) -> u32 {
        u32::try_from(len.clamp(1, self.max)).unwrap_or(u32::MAX)
    }

    /// Room for a frame now, or `None` (live deliveries are dropped then).
    pub fn try_take(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        self.bytes
            .clone()
            .try_acquire_many_owned(self.cost(len))
            .ok()
    }

    /// Room for a frame within `timeout`, or `None` (the reader is too slow).
    pub async fn take(&self, len: usize, timeout: Duration) -> Option<OwnedSemaphorePermit> {
        let wanted = self.bytes.clone().acquire_many_owned(self.cost(len));
        tokio::time::timeout(timeout, wanted).await.ok()?.ok()
    }
}

/// A broker failure while subscribing, in a subscriber's words: a publish's talk of
/// confirms and Idempotency-Keys means nothing here.
pub(crate) fn subscribe_failure(error: crate::broker::PublishError) -> ApiError {
    match error {
        crate::broker::PublishError::LostBeforeConfirm(_) => ApiError::BrokerUnavailable {
            detail: "the broker closed the subscription's channel; subscribe again".to_owned(),
            retry_after: Duration::from_secs(1),
        },
        other => other.into(),
    }
}

/// Open sockets per tenant, for `ws.max_sockets_per_tenant`; and the total, which
/// shutdown waits on to reach zero (a notification, not a poll).
pub struct Sockets {
    per_tenant: Mutex<HashMap<String, usize>>,
    total: watch::Sender<usize>,
}

impl Default for Sockets {
    fn default() -> Self {
        Self {
            per_tenant: Mutex::default(),
            total: watch::Sender::new(0),
        }
    }
}

/// One counted socket; uncounted on drop.
pub struct SocketGuard {
    state: AppState,
    tenant: String,
}

impl Sockets {
    fn admit(&self, state: &AppState, tenant: &str, max: usize) -> Result<SocketGuard, ApiError> {
        let mut counts = self.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(tenant.to_owned()).or_default();
        if *count >= max {
            return Err(ApiError::RateLimited {
                detail: format!(
                    "tenant {tenant:?} already has {max} open WebSockets (limits.max_websockets or ws.max_sockets_per_tenant)"
                ),
                retry_after: Duration::from_secs(5),
            });
        }
        *count += 1;
        self.total.send_modify(|total| *total += 1);
        telemetry::ws_connections(1);
        Ok(SocketGuard {
            state: state.clone(),
            tenant: tenant.to_owned(),
        })
    }

    pub fn open(&self) -> usize {
        *self.total.borrow()
    }

    /// Resolves once no socket is open (at once if none is).
    pub async fn all_closed(&self) {
        let mut total = self.total.subscribe();
        // The sender lives in `self`, so this cannot fail while we borrow it.
        let _ = total.wait_for(|open| *open == 0).await;
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let sockets = &self.state.sockets;
        let mut counts = sockets.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.tenant);
            }
            sockets
                .total
                .send_modify(|total| *total = total.saturating_sub(1));
        }
        drop(counts);
        telemetry::ws_connections(-1);
    }
}

#[derive(Deserialize)]
pub struct WsQuery {
    access_token: Option<String>,
}

/// Upgrade to a `warren.v1` WebSocket session.
pub async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<WsQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match admit(&state, &headers, query, upgrade).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    query: WsQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let config = &state.config.ws;
    let origin = headers.get(ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(origin) = origin
        && !config.allowed_origins.is_empty()
        && !config
            .allowed_origins
            .iter()
            .any(|allowed| allowed == origin)
    {
        return Err(ApiError::Forbidden(format!(
            "origin {origin:?} is not in ws.allowed_origins"
        )));
    }
    let token = token(headers, query.access_token.as_deref())?;
    let principal =
        crate::tenancy::authenticate(&state.verifier, &state.tenants, token.as_deref()).await?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::InvalidRequest(format!("GET /v1/ws needs a WebSocket upgrade: {e}"))
    })?;
    let max = principal
        .tenant
        .quota
        .max_websockets
        .unwrap_or(config.max_sockets_per_tenant);
    let guard = state.sockets.admit(state, &principal.tenant.name, max)?;
    let state = state.clone();
    Ok(upgrade
        .protocols([SUBPROTOCOL])
        // tungstenite's default 128 KiB read buffer per socket dominated the memory of
        // idle sockets (139 KiB each measured); frames larger than this still work.
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_message_size(config.max_message_bytes)
        .max_frame_size(config.max_message_bytes)
        .on_upgrade(move |socket| session::run(state, socket, principal, guard)))
}

/// The token from `Authorization: Bearer`, `?access_token=`, or a `bearer.<jwt>`
/// subprotocol (browsers cannot set headers on WebSockets).
fn token(headers: &HeaderMap, query: Option<&str>) -> Result<Option<String>, ApiError> {
    if let Some(token) = auth::bearer(
        headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    )? {
        return Ok(Some(token.to_owned()));
    }
    if let Some(token) = query {
        return Ok(Some(token.to_owned()));
    }
    let from_protocol = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix("bearer."))
        .map(str::to_owned);
    Ok(from_protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_byte_budget_bounds_what_waits_for_a_socket() {
        let budget = SendBudget::new(1000);
        let a = budget.try_take(600).expect("room for the first frame");
        assert!(budget.try_take(600).is_none(), "a live copy is dropped");
        // A durable delivery waits for room, and gives up after its timeout.
        assert!(budget.take(600, Duration::from_millis(20)).await.is_none());
        drop(a);
        let b = budget.take(600, Duration::from_millis(20)).await;
        assert!(b.is_some(), "room once the first frame was written");
        drop(b);
        // A frame larger than the whole budget takes all of it, never more.
        let whole = budget
            .try_take(5_000_000)
            .expect("an empty budget takes it");
        assert!(budget.try_take(1).is_none());
        drop(whole);
        assert!(budget.try_take(1000).is_some());
    }
}
