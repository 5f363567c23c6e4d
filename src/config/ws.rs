//! `[ws]`: WebSocket limits and behaviour, checked here.

use serde::Deserialize;

use super::ConfigError;
use super::check::all_positive;

/// WebSocket limits and behaviour (`GET /v1/ws`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Largest client frame accepted; a larger one closes the socket with 1009.
    pub max_message_bytes: usize,
    /// Frames queued for one socket; live deliveries beyond it are dropped (at-most-once).
    pub send_buffer: usize,
    /// Bytes of message frames queued for one socket (on top of `send_buffer` frames):
    /// a live delivery that does not fit is dropped, a durable one waits (and a reader
    /// that stays that slow is closed with 4408).
    pub max_buffered_bytes: usize,
    /// A socket that cannot take a frame for this long is closed with 4408.
    pub slow_consumer_timeout_ms: u64,
    pub max_subscriptions: usize,
    pub max_sockets_per_tenant: usize,
    /// Publish frames in flight per socket; the socket is not read while at the limit.
    pub max_inflight_publishes: usize,
    pub ping_interval_s: u64,
    /// A socket silent (no frame, no pong) for this long is closed.
    pub idle_timeout_s: u64,
    /// Browser `Origin`s allowed to connect; empty allows any (tokens still required).
    pub allowed_origins: Vec<String>,
    /// `x-expires` of durable subscription queues: how long they outlive their socket.
    pub durable_queue_expiry_s: u64,
    /// The type of durable subscription queues: `classic`, or `quorum` (replicated on
    /// a cluster, so a subscription survives the loss of a node).
    pub durable_queue_type: DurableQueueType,
    pub default_prefetch: u16,
    pub max_prefetch: u16,
    /// Bound on a live subscription's broker queue (oldest dropped beyond it).
    pub live_queue_max_length: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurableQueueType {
    Classic,
    Quorum,
}

impl DurableQueueType {
    /// The `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            send_buffer: 256,
            max_buffered_bytes: 8 * 1024 * 1024,
            slow_consumer_timeout_ms: 5000,
            max_subscriptions: 100,
            max_sockets_per_tenant: 10_000,
            max_inflight_publishes: 64,
            ping_interval_s: 20,
            idle_timeout_s: 60,
            allowed_origins: Vec::new(),
            durable_queue_expiry_s: 3600,
            durable_queue_type: DurableQueueType::Classic,
            default_prefetch: 100,
            max_prefetch: 1000,
            live_queue_max_length: 10_000,
        }
    }
}

impl WsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_buffered_bytes > u32::MAX as usize {
            return Err(ConfigError::invalid(
                "ws.max_buffered_bytes",
                "must be at most 4294967295",
            ));
        }
        all_positive(&[
            ("ws.max_message_bytes", self.max_message_bytes as u64),
            ("ws.send_buffer", self.send_buffer as u64),
            ("ws.max_buffered_bytes", self.max_buffered_bytes as u64),
            ("ws.slow_consumer_timeout_ms", self.slow_consumer_timeout_ms),
            ("ws.max_subscriptions", self.max_subscriptions as u64),
            (
                "ws.max_sockets_per_tenant",
                self.max_sockets_per_tenant as u64,
            ),
            (
                "ws.max_inflight_publishes",
                self.max_inflight_publishes as u64,
            ),
            ("ws.ping_interval_s", self.ping_interval_s),
            ("ws.idle_timeout_s", self.idle_timeout_s),
            ("ws.durable_queue_expiry_s", self.durable_queue_expiry_s),
            ("ws.default_prefetch", u64::from(self.default_prefetch)),
            ("ws.max_prefetch", u64::from(self.max_prefetch)),
            (
                "ws.live_queue_max_length",
                u64::from(self.live_queue_max_length),
            ),
        ])?;
        if self.default_prefetch > self.max_prefetch {
            return Err(ConfigError::invalid(
                "ws.default_prefetch",
                "must not exceed ws.max_prefetch",
            ));
        }
        Ok(())
    }
}
