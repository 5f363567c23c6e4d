//! `[sse]`: server-sent events (`GET /v1/events`, SPEC §9) limits and timing; checked
//! here.

use serde::Deserialize;

use super::ConfigError;
use super::check::all_positive;

/// Server-sent event responses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    /// Open event streams per tenant (`limits.max_sse_connections` overrides it).
    pub max_connections_per_tenant: usize,
    /// A comment line is sent every this many seconds, so proxies and browsers keep
    /// the connection. Capped at half of `server.header_read_timeout_s` (a connection
    /// that moves no byte for that long is closed as idle): [`SseConfig::keepalive`].
    pub keepalive_s: u64,
    /// The `retry:` the browser's EventSource waits before reconnecting.
    pub retry_ms: u64,
    /// Events queued for one response.
    pub send_buffer: usize,
    /// Bytes of events queued for one response; a live event that does not fit is
    /// dropped, a stream event waits (and a reader that stays that slow is cut).
    pub max_buffered_bytes: usize,
    /// A response that cannot take an event for this long is closed (slow reader).
    pub slow_reader_timeout_ms: u64,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            max_connections_per_tenant: 10_000,
            keepalive_s: 15,
            retry_ms: 2000,
            send_buffer: 64,
            max_buffered_bytes: 1024 * 1024,
            slow_reader_timeout_ms: 5000,
        }
    }
}

impl SseConfig {
    /// The keep-alive interval in force: `keepalive_s`, at most half of the idle
    /// timeout `server.header_read_timeout_s`, at least a second.
    pub fn keepalive(&self, header_read_timeout_s: u64) -> std::time::Duration {
        let seconds = self.keepalive_s.min(header_read_timeout_s / 2).max(1);
        std::time::Duration::from_secs(seconds)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            (
                "sse.max_connections_per_tenant",
                self.max_connections_per_tenant as u64,
            ),
            ("sse.keepalive_s", self.keepalive_s),
            ("sse.retry_ms", self.retry_ms),
            ("sse.send_buffer", self.send_buffer as u64),
            ("sse.max_buffered_bytes", self.max_buffered_bytes as u64),
            ("sse.slow_reader_timeout_ms", self.slow_reader_timeout_ms),
        ])?;
        if self.max_buffered_bytes > u32::MAX as usize {
            return Err(ConfigError::invalid(
                "sse.max_buffered_bytes",
                "must be at most 4294967295",
            ));
        }
        if self.retry_ms > 3_600_000 {
            return Err(ConfigError::invalid(
                "sse.retry_ms",
                "must be at most 3600000 (an hour)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn error(extra: &str) -> String {
        let text = format!(
            "[auth]\nhs256_secret = \"0123456789abcdef0123456789abcdef\"\n{extra}\n[tenants.t]\nvhost = \"t\"\n"
        );
        match Config::from_toml(&text).map(|c| c.resolve()) {
            Ok(Ok(_)) => String::new(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sse_and_streams_settings_are_checked_with_the_key_named() {
        assert_eq!(
            error("[sse]\nkeepalive_s = 10\n[streams]\nprefetch = 50\n"),
            ""
        );
        assert!(error("[sse]\nkeepalive_s = 0\n").starts_with("sse.keepalive_s:"));
        let config = |text: &str| Config::from_toml(text).expect("parses");
        let sse = config("[sse]\nkeepalive_s = 30\n").sse;
        assert_eq!(
            sse.keepalive(30),
            std::time::Duration::from_secs(15),
            "under the idle timeout, or a quiet stream would be closed"
        );
        assert_eq!(sse.keepalive(100), std::time::Duration::from_secs(30));
        assert_eq!(sse.keepalive(1), std::time::Duration::from_secs(1));
        assert!(error("[sse]\nretry_ms = 3600001\n").starts_with("sse.retry_ms:"));
        assert!(error("[sse]\nmax_buffered_bytes = 0\n").starts_with("sse.max_buffered_bytes:"));
        assert!(error("[sse]\nbogus = 1\n").contains("bogus"));
        assert!(error("[streams]\nprefetch = 0\n").starts_with("streams.prefetch:"));
        assert!(error("[streams]\nprefetch = 10001\n").starts_with("streams.prefetch:"));
        assert!(
            error("[streams]\nmax_subscriptions = 0\n").starts_with("streams.max_subscriptions:")
        );
        assert!(
            error("[tenants.a]\nvhost = \"a\"\nlimits = { max_sse_connections = 3 }\n").is_empty()
        );
        assert!(
            error("[tenants.a]\nvhost = \"a\"\nlimits = { max_sse = 3 }\n").contains("max_sse")
        );
    }
}
