//! `[server]`: listeners, request bounds, TLS on `listen` and CORS, each checked here.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
use super::check::all_positive;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Separate listener for `/metrics`; when unset, `/metrics` is served on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    pub max_body_bytes: usize,
    pub max_batch_messages: usize,
    /// Bound on a message's encoded AMQP header table (`properties.headers`, plus CC,
    /// BCC and trace context). Must stay well below the broker's frame size: a content
    /// header larger than a frame makes the broker close the whole shared connection.
    pub max_headers_bytes: usize,
    /// How long a SIGTERM waits for in-flight requests before the process exits anyway.
    pub shutdown_grace_s: u64,
    /// Upper bound on concurrently served HTTP requests; excess requests wait. A
    /// request that waits on something other than Warren's own work (request/reply for
    /// its reply, a pull receive's long poll) gives its slot back once it waits, and
    /// counts against `max_waiting_requests` instead.
    pub max_concurrent_requests: usize,
    /// HTTP requests waiting at once across every tenant (each tenant at most
    /// `limits.max_waiting_requests`, default 1,000); past it, 429 at once.
    pub max_waiting_requests: usize,
    /// Once a request's first byte has arrived, its whole header section must arrive
    /// within this many seconds, else the connection is closed: slow-header
    /// (slowloris) clients do not hold a connection forever.
    pub header_read_timeout_s: u64,
    /// A request body must arrive in full within this many seconds of the handler
    /// starting to read it, else `408 request_timeout`: a client that declares a large
    /// `Content-Length` and trickles bytes does not hold a request slot for long.
    pub body_read_timeout_s: u64,
    /// TLS on `listen` (HTTPS and WSS), for deployments without a terminating proxy.
    pub tls: Option<ListenerTls>,
    pub cors: CorsConfig,
    /// Threads of the async runtime that serve requests; 0 (the default) is half the
    /// cores the process may use (its affinity and cgroup quota), at least one. A
    /// publish waits on the broker far longer than it computes, so half the cores
    /// carry more than a broker confirms, and fewer threads hand work across threads
    /// less often: on 2 cores, 1 thread spent about a quarter less CPU per publish than
    /// 2 (BENCHMARKS.md, "As a user measures it"). Set it to the core count for a host
    /// that runs nothing else and serves many slow consumers.
    pub worker_threads: usize,
    /// Requests one HTTP/2 connection may have in flight at once (its
    /// SETTINGS_MAX_CONCURRENT_STREAMS); further streams are refused until one ends.
    pub http2_max_concurrent_streams: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// How often the files are checked for a renewed certificate.
    #[serde(default = "default_tls_reload_s")]
    pub reload_s: u64,
}

fn default_tls_reload_s() -> u64 {
    60
}

/// Cross-origin requests from browsers (REST; WebSockets use ws.allowed_origins).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call the API, e.g. `https://app.example`; `*` for any. Empty:
    /// no CORS headers at all (browsers then refuse cross-origin calls).
    pub allowed_origins: Vec<String>,
    pub max_age_s: u64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_age_s: 600,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: None,
            max_body_bytes: 1024 * 1024,
            max_batch_messages: 1000,
            max_headers_bytes: 16 * 1024,
            shutdown_grace_s: 30,
            max_concurrent_requests: 10_000,
            max_waiting_requests: 10_000,
            header_read_timeout_s: 30,
            body_read_timeout_s: 10,
            tls: None,
            cors: CorsConfig::default(),
            worker_threads: 0,
            http2_max_concurrent_streams: 128,
        }
    }
}

impl ServerConfig {
    /// The runtime's thread count on a machine where the process may use `cores`.
    pub fn runtime_threads(&self, cores: usize) -> usize {
        match self.worker_threads {
            0 => cores.div_ceil(2).max(1),
            n => n,
        }
    }
}

/// More runtime threads than this is a typo, not a tuning.
const MAX_WORKER_THREADS: usize = 1024;

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("server.max_body_bytes", self.max_body_bytes as u64),
            ("server.max_batch_messages", self.max_batch_messages as u64),
        ])?;
        if self.max_headers_bytes == 0 || self.max_headers_bytes > 64 * 1024 {
            return Err(ConfigError::invalid(
                "server.max_headers_bytes",
                "must be from 1 to 65536 (the broker's frame size bounds a header frame)",
            ));
        }
        all_positive(&[
            (
                "server.max_concurrent_requests",
                self.max_concurrent_requests as u64,
            ),
            (
                "server.max_waiting_requests",
                self.max_waiting_requests as u64,
            ),
            ("server.header_read_timeout_s", self.header_read_timeout_s),
            ("server.body_read_timeout_s", self.body_read_timeout_s),
            (
                "server.http2_max_concurrent_streams",
                u64::from(self.http2_max_concurrent_streams),
            ),
        ])?;
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError::invalid(
                "server.worker_threads",
                format!("must be from 0 (half the cores) to {MAX_WORKER_THREADS}"),
            ));
        }
        if let Some(tls) = &self.tls {
            all_positive(&[("server.tls.reload_s", tls.reload_s)])?;
            crate::edge::tls::load(&tls.cert_file, &tls.key_file)
                .map_err(|m| ConfigError::invalid("server.tls", m))?;
        }
        for (i, origin) in self.cors.allowed_origins.iter().enumerate() {
            let valid = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && is_header_value(origin));
            if !valid {
                return Err(ConfigError::invalid(
                    format!("server.cors.allowed_origins[{i}]"),
                    "must be `*` or an origin like https://app.example (scheme, host, optional port; no path)",
                ));
            }
        }
        Ok(())
    }
}

/// What `http::HeaderValue::from_str` accepts (visible bytes, spaces and tabs; no
/// control characters), checked without the HTTP types: an origin is sent back as the
/// `Access-Control-Allow-Origin` header.
fn is_header_value(text: &str) -> bool {
    text.bytes().all(|b| (b >= 32 && b != 127) || b == b'\t')
}
