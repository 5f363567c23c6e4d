//! `[idempotency]`: which store keeps idempotency keys, for how long, within which
//! bounds, checked here.

use serde::Deserialize;

use super::ConfigError;
use super::check::all_positive;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded and bounded; right for a single replica.
    #[default]
    Memory,
    /// Shared by every replica pointing at the same Redis.
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    pub store: StoreKind,
    pub redis_url: String,
    /// Prefix of every Redis key Warren writes (namespacing several deployments).
    pub key_prefix: String,
    pub redis_timeout_ms: u64,
    /// How long a finished answer is kept for replay.
    pub retention_s: u64,
    /// How long a claim whose owner vanished (crash, lost request) blocks its key.
    pub lock_timeout_s: u64,
    /// Bounds of the memory store in total. A tenant's new key only ever evicts that
    /// tenant's own oldest finished entries, never another tenant's.
    pub max_entries: usize,
    pub max_bytes: usize,
    /// Each tenant's share of the memory store. Unset: the total divided by the number of
    /// `[tenants.*]` tables (at least 1).
    pub max_entries_per_tenant: Option<usize>,
    pub max_bytes_per_tenant: Option<usize>,
}

impl IdempotencyConfig {
    /// Each tenant's (entries, bytes) share of the memory store.
    pub fn tenant_share(&self, configured_tenants: usize) -> (usize, usize) {
        let n = configured_tenants.max(1);
        (
            self.max_entries_per_tenant
                .unwrap_or((self.max_entries / n).max(1)),
            self.max_bytes_per_tenant
                .unwrap_or((self.max_bytes / n).max(1)),
        )
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::Memory,
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            key_prefix: "warren:idem:".to_owned(),
            redis_timeout_ms: 1000,
            retention_s: 86_400,
            lock_timeout_s: 60,
            max_entries: 100_000,
            max_bytes: 64 * 1024 * 1024,
            max_entries_per_tenant: None,
            max_bytes_per_tenant: None,
        }
    }
}

impl IdempotencyConfig {
    /// `confirm_timeout_ms` is `amqp.confirm_timeout_ms`: a claim must outlive a publish.
    pub(super) fn validate(&self, confirm_timeout_ms: u64) -> Result<(), ConfigError> {
        all_positive(&[
            ("idempotency.retention_s", self.retention_s),
            ("idempotency.lock_timeout_s", self.lock_timeout_s),
            ("idempotency.redis_timeout_ms", self.redis_timeout_ms),
            ("idempotency.max_entries", self.max_entries as u64),
            ("idempotency.max_bytes", self.max_bytes as u64),
        ])?;
        for (key, value, total, total_key) in [
            (
                "idempotency.max_entries_per_tenant",
                self.max_entries_per_tenant,
                self.max_entries,
                "idempotency.max_entries",
            ),
            (
                "idempotency.max_bytes_per_tenant",
                self.max_bytes_per_tenant,
                self.max_bytes,
                "idempotency.max_bytes",
            ),
        ] {
            if let Some(value) = value {
                all_positive(&[(key, value as u64)])?;
                if value > total {
                    return Err(ConfigError::invalid(
                        key,
                        format!("must not be above {total_key} ({total})"),
                    ));
                }
            }
        }
        if self.lock_timeout_s * 1000 <= confirm_timeout_ms {
            return Err(ConfigError::invalid(
                "idempotency.lock_timeout_s",
                "must be longer than amqp.confirm_timeout_ms, or a slow publish loses its claim",
            ));
        }
        if self.store == StoreKind::Redis {
            redis::Client::open(self.redis_url.as_str()).map_err(|e| {
                ConfigError::invalid(
                    "idempotency.redis_url",
                    format!("not a valid Redis URL: {e}"),
                )
            })?;
        }
        Ok(())
    }
}
