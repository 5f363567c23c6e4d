//! `[schedule]` (SPEC §15): how far ahead a message may be scheduled, and how many
//! scheduled messages one replica handles at once.

use serde::Deserialize;

use super::ConfigError;
use super::check::all_positive;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// The longest `delay_ms` (and the furthest `not_before`) a publish may ask for.
    pub max_delay_ms: u64,
    /// Scheduled messages one replica's router holds unacknowledged per vhost (each
    /// waiting for its next hop's confirm, or its last < 100 ms before firing).
    pub prefetch: u16,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            max_delay_ms: 7 * 24 * 60 * 60 * 1000,
            prefetch: 256,
        }
    }
}

/// Thirty days: the ladder's longest rung is then 100 ms · 2^34 (about 20 days), and a
/// bound keeps a typo from scheduling a message for a century.
pub const MAX_MAX_DELAY_MS: u64 = 30 * 24 * 60 * 60 * 1000;

impl ScheduleConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("schedule.max_delay_ms", self.max_delay_ms),
            ("schedule.prefetch", u64::from(self.prefetch)),
        ])?;
        if self.max_delay_ms > MAX_MAX_DELAY_MS {
            return Err(ConfigError::invalid(
                "schedule.max_delay_ms",
                format!("must be at most {MAX_MAX_DELAY_MS} (30 days)"),
            ));
        }
        Ok(())
    }
}
