//! `[streams]`: how Warren reads RabbitMQ streams for replay subscriptions (SPEC §9),
//! over WebSocket and server-sent events alike; checked here.

use serde::Deserialize;

use super::ConfigError;
use super::check::all_positive;

/// Stream subscriptions (`mode: "stream"`, `GET /v1/events?stream=`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// `basic.qos` of a stream consumer: deliveries the broker sends ahead of Warren's
    /// acks (streams need consumer credit). A client's `prefetch` may ask for less.
    pub prefetch: u16,
    /// Stream subscriptions this gateway holds at once, all tenants and vhosts (503
    /// past it). Each one keeps a couple of files open on the broker (segment and
    /// index), and a broker out of file descriptors closes the whole AMQP connection.
    pub max_subscriptions: usize,
    /// Of those, what one tenant may hold at once (429 past it), so one tenant cannot
    /// take every slot from the others. Default: a quarter of `max_subscriptions` (at
    /// least 1).
    pub max_subscriptions_per_tenant: Option<usize>,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            prefetch: 200,
            max_subscriptions: 256,
            max_subscriptions_per_tenant: None,
        }
    }
}

impl StreamsConfig {
    /// What one tenant may hold (`max_subscriptions_per_tenant`, else a quarter).
    pub fn tenant_share(&self) -> usize {
        self.max_subscriptions_per_tenant
            .unwrap_or((self.max_subscriptions / 4).max(1))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("streams.prefetch", u64::from(self.prefetch)),
            ("streams.max_subscriptions", self.max_subscriptions as u64),
            (
                "streams.max_subscriptions_per_tenant",
                self.tenant_share() as u64,
            ),
        ])?;
        if self.tenant_share() > self.max_subscriptions {
            return Err(ConfigError::invalid(
                "streams.max_subscriptions_per_tenant",
                "must not exceed streams.max_subscriptions",
            ));
        }
        if self.prefetch > 10_000 {
            return Err(ConfigError::invalid(
                "streams.prefetch",
                "must be at most 10000",
            ));
        }
        Ok(())
    }
}
