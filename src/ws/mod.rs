//! `GET /v1/ws`: authenticate the upgrade (header, `access_token` query parameter or
//! `bearer.<jwt>` subprotocol), enforce origin and per-tenant socket limits, then hand
//! the socket to a session.

pub mod protocol;
mod publish;
pub mod queue;
mod request;
pub mod session;
mod socket;
pub mod stream;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

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

pub const SUBPROTOCOL: &str = "warren.v1";

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
