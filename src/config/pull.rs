//! `[pull]` (SPEC §14): leases of pull consumers, their bounds, and the key that signs
//! receipts, checked here.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
use super::check::{Given, all_positive, inline_or_file};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PullConfig {
    /// A receive's lease when it asks for none.
    pub default_lease_ms: u64,
    /// The shortest and longest lease (and extension) a client may ask for.
    pub min_lease_ms: u64,
    pub max_lease_ms: u64,
    /// How long a message may stay leased in all, extensions included: the broker's
    /// `consumer_timeout` (30 minutes by default in RabbitMQ) takes an unacked
    /// delivery back after that, closing the channel all leases of the queue share.
    pub max_lease_age_ms: u64,
    /// Messages one tenant may hold leased at once on this replica (429 past it).
    pub max_leased_per_tenant: usize,
    /// Messages leased at once from one queue on this replica (429 past it).
    pub max_leased_per_queue: usize,
    /// The key that signs receipts. Every replica must have the same one so that a
    /// receipt from one is honoured by another. Unset: derived from
    /// `auth.hs256_secret` (or the first `auth.hs_secrets`), which replicas share;
    /// with public keys only, a random key per process (one replica only).
    pub receipt_secret: Option<String>,
    pub receipt_secret_file: Option<PathBuf>,
    /// How long a replica waits for the replica that holds a lease to settle it
    /// (an ack sent to another replica than the one that received the message).
    pub relay_timeout_ms: u64,
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            default_lease_ms: 30_000,
            min_lease_ms: 1_000,
            max_lease_ms: 300_000,
            max_lease_age_ms: 25 * 60 * 1000,
            max_leased_per_tenant: 1_000,
            max_leased_per_queue: 1_000,
            receipt_secret: None,
            receipt_secret_file: None,
            relay_timeout_ms: 2_000,
        }
    }
}

/// The broker's default `consumer_timeout`: a lease must end before it.
const BROKER_CONSUMER_TIMEOUT_MS: u64 = 30 * 60 * 1000;

impl PullConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("pull.default_lease_ms", self.default_lease_ms),
            ("pull.min_lease_ms", self.min_lease_ms),
            ("pull.max_lease_ms", self.max_lease_ms),
            ("pull.max_lease_age_ms", self.max_lease_age_ms),
            (
                "pull.max_leased_per_tenant",
                self.max_leased_per_tenant as u64,
            ),
            (
                "pull.max_leased_per_queue",
                self.max_leased_per_queue as u64,
            ),
            ("pull.relay_timeout_ms", self.relay_timeout_ms),
        ])?;
        if self.min_lease_ms > self.max_lease_ms {
            return Err(ConfigError::invalid(
                "pull.min_lease_ms",
                "must not be above pull.max_lease_ms",
            ));
        }
        if !(self.min_lease_ms..=self.max_lease_ms).contains(&self.default_lease_ms) {
            return Err(ConfigError::invalid(
                "pull.default_lease_ms",
                "must be within pull.min_lease_ms and pull.max_lease_ms",
            ));
        }
        if self.max_lease_age_ms < self.max_lease_ms {
            return Err(ConfigError::invalid(
                "pull.max_lease_age_ms",
                "must not be below pull.max_lease_ms",
            ));
        }
        if self.max_lease_age_ms >= BROKER_CONSUMER_TIMEOUT_MS {
            return Err(ConfigError::invalid(
                "pull.max_lease_age_ms",
                "must stay below the broker's consumer_timeout (30 minutes by default): past it the broker closes the channel every lease of the queue shares",
            ));
        }
        self.receipt_key_material()?;
        Ok(())
    }

    /// The configured receipt secret, if any (at least 32 bytes).
    pub fn receipt_key_material(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let given = inline_or_file(
            self.receipt_secret.as_deref(),
            self.receipt_secret_file.as_deref(),
            "pull.receipt_secret_file",
            (
                "pull.receipt_secret_file",
                "set either receipt_secret or receipt_secret_file, not both",
            ),
        )?;
        let secret = match given {
            Some(Given::Inline(s)) => s.as_bytes().to_vec(),
            Some(Given::File(text)) => text.trim_end_matches(['\r', '\n']).as_bytes().to_vec(),
            None => return Ok(None),
        };
        if secret.len() < 32 {
            return Err(ConfigError::invalid(
                "pull.receipt_secret",
                "must be at least 32 bytes",
            ));
        }
        Ok(Some(secret))
    }
}
