//! What the publish service answers: a confirmed publish, and each batch item's result.
//! The edges (HTTP handlers, WebSocket session) turn these into their wire answers.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// A message the broker confirmed. Serialisable so the idempotency layer can keep it for
/// replay; its JSON is the same as the `202` body's, so answers stored by earlier
/// versions (they stored that body) still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The `message_id` the AMQP message carries.
    pub message_id: String,
    pub exchange: String,
    pub routing_key: String,
    /// `true` only for a mandatory publish the broker confirmed without returning it (a
    /// queue took it); always `false` for `mandatory: false`, and for a scheduled
    /// message (known when it fires).
    pub routed: bool,
    /// A scheduled message's due time (RFC 3339, milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<String>,
}

/// One item of a batch, in request order.
#[derive(Debug, Clone)]
pub enum ItemResult {
    Accepted(Accepted),
    /// A failed item keeps its `message_id` when it had one: after a timeout the message
    /// may still have landed, and consumers can de-duplicate on it.
    Failed {
        message_id: Option<String>,
        error: ApiError,
    },
}

impl ItemResult {
    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted(_))
    }
}
