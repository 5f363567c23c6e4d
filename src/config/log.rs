//! `[log]`: output format and filter.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info,warren=debug`. `RUST_LOG` wins when set.
    pub level: String,
    /// One line per HTTP request at info (method, path, request id, tenant, status,
    /// latency). Off by default: the line cost about a third of a publish's CPU
    /// (BENCHMARKS.md, "As a user measures it"); `warren_http_requests_total` and
    /// `warren_http_request_duration_seconds` count and time every request either way.
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
            access: false,
        }
    }
}
