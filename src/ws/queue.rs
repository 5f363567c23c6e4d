//! `mode: "queue"` subscriptions (SPEC §11): consume an existing queue of the tenant's
//! vhost, granted by `{ queue = "…" }`. Sockets on one queue are competing consumers.
//! The consumer, its window and its acks are `durable.rs`'s; this adds the checks and
//! the queue's retry policy from the configured topology.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::protocol::Subscribe;
use crate::AppState;
use crate::config::WsConfig;
use crate::delivery::durable::{Durable, DurableRequest, Source};
use crate::delivery::{Outgoing, SendBudget};
use crate::error::ApiError;
use crate::tenancy::Tenant;

/// The client's prefetch, capped by `ws.max_prefetch` (default `ws.default_prefetch`).
pub fn prefetch(requested: Option<u16>, config: &WsConfig) -> Result<u16, ApiError> {
    match requested {
        Some(0) => Err(ApiError::InvalidRequest(
            "prefetch: must be at least 1".into(),
        )),
        Some(p) => Ok(p.min(config.max_prefetch)),
        None => Ok(config.default_prefetch),
    }
}

/// Starts consuming the queue `s` names; 404 `queue_not_found` when it does not exist.
pub async fn start(
    state: &AppState,
    tenant: Arc<Tenant>,
    s: &Subscribe,
    sink: mpsc::Sender<Outgoing>,
    budget: SendBudget,
) -> Result<Durable, ApiError> {
    let name = s.queue.as_deref().unwrap_or_default();
    if name.is_empty() || name.len() > 255 {
        return Err(ApiError::InvalidRequest(
            "queue: must be 1-255 bytes".to_owned(),
        ));
    }
    tenant.authorize_queue(name)?;
    let config = &state.config.ws;
    let retry = state
        .resolved
        .tenants
        .get(&tenant.name)
        .and_then(|t| t.topology.retry.get(name))
        .cloned();
    let request = DurableRequest {
        subscription: &s.id,
        source: Source::Existing { retry },
        queue: name.to_owned(),
        prefetch: prefetch(s.prefetch, config)?,
        slow_consumer_timeout: Duration::from_millis(config.slow_consumer_timeout_ms),
        budget,
    };
    Durable::start_as(tenant, request, sink, s.format).await
}
