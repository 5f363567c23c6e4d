//! `[rpc]`: request/reply over direct reply-to (SPEC §10): timeouts, the in-flight
//! bound, the reply size bound and the reply channels per vhost, each checked here.

use serde::Deserialize;

use super::ConfigError;
use super::check::all_positive;

/// Request/reply (`POST /v1/request`, WebSocket `request` frames).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcConfig {
    /// How long a request waits for its reply when the client sends no `timeout_ms`.
    pub default_timeout_ms: u64,
    /// The largest `timeout_ms` a client may ask for (400 above it).
    pub max_timeout_ms: u64,
    /// Requests awaiting their reply at once, per tenant on each vhost (tenants that
    /// share a vhost each have their own); past it a request is answered 503
    /// `broker_unavailable` with `Retry-After` at once.
    pub max_inflight: usize,
    /// Channels per tenant on each vhost that carry requests, each with its own direct
    /// reply-to consumer; requests are spread over them round robin. Per tenant: a
    /// reply reaches whichever request waits on its correlation id on the channel, so
    /// tenants sharing a vhost never share a channel.
    pub channels_per_vhost: usize,
    /// Largest reply body relayed; a larger reply is dropped and the request answered
    /// 502 `reply_too_large`.
    pub max_reply_bytes: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            default_timeout_ms: 10_000,
            max_timeout_ms: 60_000,
            max_inflight: 10_000,
            channels_per_vhost: 4,
            max_reply_bytes: 1024 * 1024,
        }
    }
}

/// Beyond this a request would hold its in-flight slot (and an HTTP request) for more
/// than an hour: surely a mistake.
const MAX_TIMEOUT_BOUND_MS: u64 = 3_600_000;
/// More channels than this buys nothing (each is one consumer and one confirm stream).
const MAX_CHANNELS: usize = 64;
/// Waiting requests per vhost beyond this would be a typo (and a semaphore has a bound).
const MAX_INFLIGHT: usize = 1_000_000;
/// RabbitMQ's own ceiling on a message (its `max_message_size` cannot go above 512 MiB).
const MAX_REPLY_BYTES: usize = 512 * 1024 * 1024;

impl RpcConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("rpc.default_timeout_ms", self.default_timeout_ms),
            ("rpc.max_timeout_ms", self.max_timeout_ms),
            ("rpc.max_inflight", self.max_inflight as u64),
            ("rpc.channels_per_vhost", self.channels_per_vhost as u64),
            ("rpc.max_reply_bytes", self.max_reply_bytes as u64),
        ])?;
        if self.max_timeout_ms > MAX_TIMEOUT_BOUND_MS {
            return Err(ConfigError::invalid(
                "rpc.max_timeout_ms",
                format!("must be at most {MAX_TIMEOUT_BOUND_MS} (one hour)"),
            ));
        }
        if self.default_timeout_ms > self.max_timeout_ms {
            return Err(ConfigError::invalid(
                "rpc.default_timeout_ms",
                "must not exceed rpc.max_timeout_ms",
            ));
        }
        if self.max_inflight > MAX_INFLIGHT {
            return Err(ConfigError::invalid(
                "rpc.max_inflight",
                format!("must be at most {MAX_INFLIGHT}"),
            ));
        }
        if self.max_reply_bytes > MAX_REPLY_BYTES {
            return Err(ConfigError::invalid(
                "rpc.max_reply_bytes",
                format!("must be at most {MAX_REPLY_BYTES} (RabbitMQ's largest message)"),
            ));
        }
        if self.channels_per_vhost > MAX_CHANNELS {
            return Err(ConfigError::invalid(
                "rpc.channels_per_vhost",
                format!("must be at most {MAX_CHANNELS}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(config: RpcConfig) -> String {
        match config.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_errors_name_the_key() {
        assert!(RpcConfig::default().validate().is_ok());
        let zero = RpcConfig {
            max_inflight: 0,
            ..RpcConfig::default()
        };
        assert_eq!(key_of(zero), "rpc.max_inflight");
        let inverted = RpcConfig {
            default_timeout_ms: 70_000,
            ..RpcConfig::default()
        };
        assert_eq!(key_of(inverted), "rpc.default_timeout_ms");
        let huge = RpcConfig {
            max_timeout_ms: MAX_TIMEOUT_BOUND_MS + 1,
            ..RpcConfig::default()
        };
        assert_eq!(key_of(huge), "rpc.max_timeout_ms");
        let many = RpcConfig {
            channels_per_vhost: MAX_CHANNELS + 1,
            ..RpcConfig::default()
        };
        assert_eq!(key_of(many), "rpc.channels_per_vhost");
        let crowded = RpcConfig {
            max_inflight: MAX_INFLIGHT + 1,
            ..RpcConfig::default()
        };
        assert_eq!(key_of(crowded), "rpc.max_inflight");
        let huge_reply = RpcConfig {
            max_reply_bytes: MAX_REPLY_BYTES + 1,
            ..RpcConfig::default()
        };
        assert_eq!(key_of(huge_reply), "rpc.max_reply_bytes");
    }
}
