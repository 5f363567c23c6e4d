//! Typed configuration: loaded once at start from TOML plus `WARREN_*` environment
//! overrides, secrets resolved from files, and validated with errors that name the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use jsonwebtoken::{Algorithm, AlgorithmFamily};

use crate::auth::grants::{Grant, GrantPattern};
use crate::auth::keys::{HmacSecret, KeyFile, KeySources, is_loopback_host, parse_algorithm};

/// A configuration problem, always naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub amqp: AmqpConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    #[serde(default)]
    pub ws: WsConfig,
    #[serde(default)]
    pub dynamic_tenants: DynamicTenantsConfig,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
}

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
    /// Upper bound on concurrently served HTTP requests; excess requests wait.
    pub max_concurrent_requests: usize,
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
            header_read_timeout_s: 30,
            body_read_timeout_s: 10,
            tls: None,
            cors: CorsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// One broker URL; `urls` lists several for failover (tried in turn).
    pub url: Option<String>,
    pub urls: Vec<String>,
    /// Read the broker URL (it carries a password) from a file instead.
    pub url_file: Option<PathBuf>,
    pub confirm_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// How long a publish waits for a free channel or in-flight slot before answering 503.
    pub acquire_timeout_ms: u64,
    pub heartbeat_s: u16,
    pub connections_per_vhost: usize,
    pub channels_per_vhost: usize,
    /// Publishes awaiting their confirm, per vhost; beyond this new publishes wait
    /// up to `acquire_timeout_ms`, then answer 503.
    pub max_inflight_confirms: usize,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// How long a positive exchange-existence check is trusted.
    pub exchange_cache_ttl_s: u64,
    /// Exchanges remembered per vhost; beyond it the cache starts afresh.
    pub exchange_cache_max_entries: usize,
    /// Consumer channels (live topics and durable subscriptions, of every tenant on
    /// the vhost) one vhost pool may open; past it a subscribe answers 503. Kept well
    /// below connections_per_vhost x the broker's channel_max (2047), so the publish
    /// pool's channels can always be opened.
    pub max_consumer_channels: usize,
    pub tls: TlsConfig,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: None,
            urls: Vec::new(),
            url_file: None,
            confirm_timeout_ms: 5000,
            connect_timeout_ms: 5000,
            acquire_timeout_ms: 1000,
            heartbeat_s: 10,
            connections_per_vhost: 2,
            channels_per_vhost: 32,
            max_inflight_confirms: 10_000,
            reconnect_backoff_min_ms: 100,
            reconnect_backoff_max_ms: 10_000,
            exchange_cache_ttl_s: 30,
            exchange_cache_max_entries: 10_000,
            max_consumer_channels: 1024,
            tls: TlsConfig::default(),
        }
    }
}

impl AmqpConfig {
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms)
    }
}

/// TLS for `amqps://` broker URLs (rustls).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM bundle of CAs to trust in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and PKCS#8 key for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

/// Token verification (SPEC §3). At least one key source is required: an HS256 secret,
/// `hs_secrets`, `public_key_files`, `jwks_file` or `jwks_url`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub hs256_secret: Option<String>,
    pub hs256_secret_file: Option<PathBuf>,
    /// `kid` of the HS256 secret. When set, tokens must name it, and `warren token`
    /// puts it in the header; when unset, the secret verifies tokens without a `kid`.
    pub hs256_kid: Option<String>,
    /// More HMAC keys, each with its own `kid` and algorithm (rotation of shared secrets).
    pub hs_secrets: Vec<HsSecretConfig>,
    /// PEM public keys (RS*, PS*, ES256/384, EdDSA), each pinned to a `kid` and algorithm.
    pub public_key_files: Vec<PublicKeyFileConfig>,
    /// A JWKS document on disk, re-read when it changes.
    pub jwks_file: Option<PathBuf>,
    /// An identity provider's JWKS endpoint (https; http only on loopback).
    pub jwks_url: Option<String>,
    /// How often key files are checked for changes and `jwks_url` is fetched.
    pub jwks_refresh_s: u64,
    /// The least time between two refreshes caused by a token with an unknown `kid`.
    pub jwks_min_refetch_s: u64,
    /// Bound of one `jwks_url` fetch, including the first one at start.
    pub jwks_timeout_ms: u64,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub tenant_claim: String,
    pub leeway_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            hs256_secret_file: None,
            hs256_kid: None,
            hs_secrets: Vec::new(),
            public_key_files: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_s: 300,
            jwks_min_refetch_s: 30,
            jwks_timeout_ms: 5000,
            issuer: None,
            audience: None,
            tenant_claim: "tenant".to_owned(),
            leeway_s: 30,
        }
    }
}

/// `[[auth.hs_secrets]]`: an HMAC key with its `kid`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsSecretConfig {
    pub kid: String,
    /// HS256 (default), HS384 or HS512.
    #[serde(default = "default_hs_alg")]
    pub alg: String,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
}

fn default_hs_alg() -> String {
    "HS256".to_owned()
}

/// `[[auth.public_key_files]]`: a PEM public key with its `kid` and algorithm.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFileConfig {
    pub kid: String,
    pub alg: String,
    pub file: PathBuf,
}

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
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

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
    pub default_prefetch: u16,
    pub max_prefetch: u16,
    /// Bound on a live subscription's broker queue (oldest dropped beyond it).
    pub live_queue_max_length: u32,
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
            default_prefetch: 100,
            max_prefetch: 1000,
            live_queue_max_length: 10_000,
        }
    }
}

/// Per-tenant quotas; unset means unlimited.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Messages per second (token bucket; bursts up to one second's worth).
    pub publish_rate: Option<f64>,
    /// Message body bytes per second (token bucket, same burst rule).
    pub publish_bytes_rate: Option<f64>,
    /// Publishes awaiting their confirm at once.
    pub max_inflight_publishes: Option<usize>,
    /// Open WebSockets; overrides ws.max_sockets_per_tenant for this tenant.
    pub max_websockets: Option<usize>,
    /// Broker consumers (each a channel and a queue: one per live topic, one per
    /// durable subscription) the tenant may hold at once; default 256. Bounds what one
    /// tenant can take of a shared vhost's channels (see amqp.max_consumer_channels).
    pub max_consumers: Option<usize>,
}

/// Tenants that are not listed under [tenants], for SaaS with many customers: any
/// tenant id in a valid token maps to `vhost_template` with the default grants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamicTenantsConfig {
    pub enabled: bool,
    /// `{tenant}` is replaced by the tenant id, e.g. `t-{tenant}`.
    pub vhost_template: String,
    /// Broker URL with the credentials used for dynamic vhosts (else the shared ones).
    pub amqp_url: Option<String>,
    pub amqp_url_file: Option<PathBuf>,
    pub publish: Vec<GrantConfig>,
    pub subscribe: Vec<GrantConfig>,
    pub limits: LimitsConfig,
    /// Open pools (one per dynamic vhost) at most; the least recently used idle one is
    /// closed to make room.
    pub max_pools: usize,
    /// A dynamic tenant's pool with no traffic for this long is closed.
    pub pool_idle_s: u64,
    /// Dynamic tenants remembered at once (cheap to make again; beyond it, forgotten).
    pub max_tenants: usize,
}

impl Default for DynamicTenantsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            vhost_template: "t-{tenant}".to_owned(),
            amqp_url: None,
            amqp_url_file: None,
            publish: Vec::new(),
            subscribe: Vec::new(),
            limits: LimitsConfig::default(),
            max_pools: 1000,
            pool_idle_s: 300,
            max_tenants: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub vhost: String,
    /// Broker URL with this tenant's own credentials; its vhost path is replaced by `vhost`.
    pub amqp_url: Option<String>,
    pub amqp_url_file: Option<PathBuf>,
    #[serde(default)]
    pub publish: Vec<GrantConfig>,
    #[serde(default)]
    pub subscribe: Vec<GrantConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// Exchange name, or `*` for every exchange (including the default exchange `""`).
    pub exchange: String,
    /// AMQP topic pattern: `*` is one word, `#` zero or more.
    pub routing_key: String,
}

/// Settings resolved from the raw config: secrets read, URLs chosen, grants compiled.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Every token key source, checked, with its files read.
    pub token_keys: KeySources,
    /// What `warren token` and dev mode sign with: the HS256 secret, else the first of
    /// `auth.hs_secrets`; `None` when only public keys are configured.
    pub signing_secret: Option<HmacSecret>,
    pub broker_urls: Vec<String>,
    pub tenants: BTreeMap<String, ResolvedTenant>,
    pub dynamic: Option<ResolvedDynamic>,
}

/// The template every dynamic tenant is made from.
#[derive(Debug, Clone)]
pub struct ResolvedDynamic {
    pub vhost_template: String,
    pub urls: Vec<String>,
    pub publish: Vec<Grant>,
    pub subscribe: Vec<Grant>,
    pub limits: LimitsConfig,
    pub max_pools: usize,
    pub pool_idle: Duration,
    pub max_tenants: usize,
}

#[derive(Debug, Clone)]
pub struct ResolvedTenant {
    pub name: String,
    pub vhost: String,
    /// Broker URLs for this tenant (its own credentials, or the shared ones).
    pub urls: Vec<String>,
    pub publish: Vec<Grant>,
    pub subscribe: Vec<Grant>,
    pub limits: LimitsConfig,
}

pub const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672";

impl Config {
    /// Loads `path` (TOML) with `WARREN_<SECTION>__<KEY>` environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Parse(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        Self::from_figment(Figment::new().merge(Toml::file_exact(path)))
    }

    /// Parses TOML text (with the same environment overrides as [`Config::load`]).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        figment
            // Only `WARREN_<SECTION>__<KEY>` names are config; other WARREN_* variables
            // (WARREN_TEST_AMQP_URL, a script's own) are none of its business.
            .merge(
                Env::prefixed("WARREN_")
                    .filter(|key| key.as_str().contains("__"))
                    .split("__"),
            )
            .extract::<Config>()
            .map_err(|e| ConfigError::Parse(figment_message(e)))
    }

    /// The configuration of `warren serve` without `--config`: loopback only, one
    /// tenant `default` on vhost `/` with full grants, and a random HS256 secret.
    pub fn dev() -> Self {
        let secret: [u8; 32] = rand::random();
        let full = || {
            vec![GrantConfig {
                exchange: "*".to_owned(),
                routing_key: "#".to_owned(),
            }]
        };
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "default".to_owned(),
            TenantConfig {
                vhost: "/".to_owned(),
                amqp_url: None,
                amqp_url_file: None,
                publish: full(),
                subscribe: full(),
                limits: LimitsConfig::default(),
            },
        );
        Self {
            server: ServerConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
                ..ServerConfig::default()
            },
            amqp: AmqpConfig {
                url: Some(DEFAULT_BROKER_URL.to_owned()),
                ..AmqpConfig::default()
            },
            auth: AuthConfig {
                hs256_secret: Some(hex(&secret)),
                ..AuthConfig::default()
            },
            log: LogConfig::default(),
            idempotency: IdempotencyConfig::default(),
            ws: WsConfig::default(),
            dynamic_tenants: DynamicTenantsConfig::default(),
            tenants,
        }
    }

    /// Checks every key and reads every referenced file. The error names the key.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let s = &self.server;
        if s.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "server.max_body_bytes",
                "must be greater than 0",
            ));
        }
        if s.max_batch_messages == 0 {
            return Err(ConfigError::invalid(
                "server.max_batch_messages",
                "must be greater than 0",
            ));
        }
        if s.max_headers_bytes == 0 || s.max_headers_bytes > 64 * 1024 {
            return Err(ConfigError::invalid(
                "server.max_headers_bytes",
                "must be from 1 to 65536 (the broker's frame size bounds a header frame)",
            ));
        }
        if s.max_concurrent_requests == 0 {
            return Err(ConfigError::invalid(
                "server.max_concurrent_requests",
                "must be greater than 0",
            ));
        }
        if s.header_read_timeout_s == 0 {
            return Err(ConfigError::invalid(
                "server.header_read_timeout_s",
                "must be greater than 0",
            ));
        }
        if s.body_read_timeout_s == 0 {
            return Err(ConfigError::invalid(
                "server.body_read_timeout_s",
                "must be greater than 0",
            ));
        }
        if let Some(tls) = &s.tls {
            if tls.reload_s == 0 {
                return Err(ConfigError::invalid(
                    "server.tls.reload_s",
                    "must be greater than 0",
                ));
            }
            crate::tls::load(&tls.cert_file, &tls.key_file)
                .map_err(|m| ConfigError::invalid("server.tls", m))?;
        }
        for (i, origin) in s.cors.allowed_origins.iter().enumerate() {
            let valid = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && axum::http::HeaderValue::from_str(origin).is_ok());
            if !valid {
                return Err(ConfigError::invalid(
                    format!("server.cors.allowed_origins[{i}]"),
                    "must be `*` or an origin like https://app.example (scheme, host, optional port; no path)",
                ));
            }
        }
        let a = &self.amqp;
        for (key, value) in [
            ("amqp.confirm_timeout_ms", a.confirm_timeout_ms),
            ("amqp.connect_timeout_ms", a.connect_timeout_ms),
            ("amqp.acquire_timeout_ms", a.acquire_timeout_ms),
            ("amqp.connections_per_vhost", a.connections_per_vhost as u64),
            ("amqp.channels_per_vhost", a.channels_per_vhost as u64),
            ("amqp.max_inflight_confirms", a.max_inflight_confirms as u64),
            (
                "amqp.exchange_cache_max_entries",
                a.exchange_cache_max_entries as u64,
            ),
            ("amqp.reconnect_backoff_min_ms", a.reconnect_backoff_min_ms),
            ("amqp.max_consumer_channels", a.max_consumer_channels as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be greater than 0"));
            }
        }
        // RabbitMQ's default channel_max is 2047 per connection; leave the publish pool
        // room on every connection whatever the consumers take.
        if a.max_consumer_channels + a.channels_per_vhost > a.connections_per_vhost * 2000 {
            return Err(ConfigError::invalid(
                "amqp.max_consumer_channels",
                "with amqp.channels_per_vhost must fit in amqp.connections_per_vhost x 2000 channels",
            ));
        }
        if a.reconnect_backoff_max_ms < a.reconnect_backoff_min_ms {
            return Err(ConfigError::invalid(
                "amqp.reconnect_backoff_max_ms",
                "must not be below amqp.reconnect_backoff_min_ms",
            ));
        }
        if a.tls.client_cert_file.is_some() != a.tls.client_key_file.is_some() {
            return Err(ConfigError::invalid(
                "amqp.tls.client_key_file",
                "client_cert_file and client_key_file must be set together",
            ));
        }
        for (key, file) in [
            ("amqp.tls.ca_file", &a.tls.ca_file),
            ("amqp.tls.client_cert_file", &a.tls.client_cert_file),
            ("amqp.tls.client_key_file", &a.tls.client_key_file),
        ] {
            if let Some(path) = file {
                read_file(key, path)?;
            }
        }

        let i = &self.idempotency;
        for (key, value) in [
            ("idempotency.retention_s", i.retention_s),
            ("idempotency.lock_timeout_s", i.lock_timeout_s),
            ("idempotency.redis_timeout_ms", i.redis_timeout_ms),
            ("idempotency.max_entries", i.max_entries as u64),
            ("idempotency.max_bytes", i.max_bytes as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be greater than 0"));
            }
        }
        for (key, value, total, total_key) in [
            (
                "idempotency.max_entries_per_tenant",
                i.max_entries_per_tenant,
                i.max_entries,
                "idempotency.max_entries",
            ),
            (
                "idempotency.max_bytes_per_tenant",
                i.max_bytes_per_tenant,
                i.max_bytes,
                "idempotency.max_bytes",
            ),
        ] {
            match value {
                Some(0) => return Err(ConfigError::invalid(key, "must be greater than 0")),
                Some(v) if v > total => {
                    return Err(ConfigError::invalid(
                        key,
                        format!("must not be above {total_key} ({total})"),
                    ));
                }
                _ => {}
            }
        }
        if i.lock_timeout_s * 1000 <= a.confirm_timeout_ms {
            return Err(ConfigError::invalid(
                "idempotency.lock_timeout_s",
                "must be longer than amqp.confirm_timeout_ms, or a slow publish loses its claim",
            ));
        }
        if i.store == StoreKind::Redis {
            redis::Client::open(i.redis_url.as_str()).map_err(|e| {
                ConfigError::invalid(
                    "idempotency.redis_url",
                    format!("not a valid Redis URL: {e}"),
                )
            })?;
        }

        let w = &self.ws;
        if w.max_buffered_bytes > u32::MAX as usize {
            return Err(ConfigError::invalid(
                "ws.max_buffered_bytes",
                "must be at most 4294967295",
            ));
        }
        for (key, value) in [
            ("ws.max_message_bytes", w.max_message_bytes as u64),
            ("ws.send_buffer", w.send_buffer as u64),
            ("ws.max_buffered_bytes", w.max_buffered_bytes as u64),
            ("ws.slow_consumer_timeout_ms", w.slow_consumer_timeout_ms),
            ("ws.max_subscriptions", w.max_subscriptions as u64),
            ("ws.max_sockets_per_tenant", w.max_sockets_per_tenant as u64),
            ("ws.max_inflight_publishes", w.max_inflight_publishes as u64),
            ("ws.ping_interval_s", w.ping_interval_s),
            ("ws.idle_timeout_s", w.idle_timeout_s),
            ("ws.durable_queue_expiry_s", w.durable_queue_expiry_s),
            ("ws.default_prefetch", u64::from(w.default_prefetch)),
            ("ws.max_prefetch", u64::from(w.max_prefetch)),
            (
                "ws.live_queue_max_length",
                u64::from(w.live_queue_max_length),
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be greater than 0"));
            }
        }
        if w.default_prefetch > w.max_prefetch {
            return Err(ConfigError::invalid(
                "ws.default_prefetch",
                "must not exceed ws.max_prefetch",
            ));
        }

        let broker_urls = self.broker_urls()?;

        let (token_keys, signing_secret) = self.resolve_auth()?;

        if self.tenants.is_empty() && !self.dynamic_tenants.enabled {
            return Err(ConfigError::invalid(
                "tenants",
                "at least one [tenants.<name>] table is required (or [dynamic_tenants] enabled)",
            ));
        }
        let mut tenants = BTreeMap::new();
        for (name, t) in &self.tenants {
            let prefix = format!("tenants.{name}");
            // Durable queues are named `warren.<tenant>.<name>`: a dot in a tenant name
            // would let `a` + `b.c` and `a.b` + `c` share a queue on a shared vhost.
            if name.is_empty() || name.len() > 100 || name.contains('.') {
                return Err(ConfigError::invalid(
                    prefix,
                    "a tenant name must be 1-100 characters without dots",
                ));
            }
            if t.vhost.is_empty() || t.vhost.len() > 255 {
                return Err(ConfigError::invalid(
                    format!("{prefix}.vhost"),
                    "must be 1-255 bytes",
                ));
            }
            let urls = match (&t.amqp_url, &t.amqp_url_file) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        format!("{prefix}.amqp_url_file"),
                        "set either amqp_url or amqp_url_file, not both",
                    ));
                }
                (Some(url), None) => vec![check_url(&format!("{prefix}.amqp_url"), url)?],
                (None, Some(path)) => {
                    let key = format!("{prefix}.amqp_url_file");
                    let url = read_file(&key, path)?;
                    vec![check_url(&key, url.trim())?]
                }
                (None, None) => broker_urls.clone(),
            };
            tenants.insert(
                name.clone(),
                ResolvedTenant {
                    name: name.clone(),
                    vhost: t.vhost.clone(),
                    urls,
                    publish: compile_grants(&format!("{prefix}.publish"), &t.publish)?,
                    subscribe: compile_grants(&format!("{prefix}.subscribe"), &t.subscribe)?,
                    limits: check_limits(&format!("{prefix}.limits"), &t.limits)?,
                },
            );
        }
        let dynamic = self.resolve_dynamic(&broker_urls)?;
        Ok(Resolved {
            token_keys,
            signing_secret,
            broker_urls,
            tenants,
            dynamic,
        })
    }

    fn resolve_dynamic(
        &self,
        broker_urls: &[String],
    ) -> Result<Option<ResolvedDynamic>, ConfigError> {
        let d = &self.dynamic_tenants;
        if !d.enabled {
            return Ok(None);
        }
        if !d.vhost_template.contains("{tenant}") {
            return Err(ConfigError::invalid(
                "dynamic_tenants.vhost_template",
                "must contain {tenant}, or every dynamic tenant would share one vhost",
            ));
        }
        if d.max_pools == 0 || d.pool_idle_s == 0 || d.max_tenants == 0 {
            return Err(ConfigError::invalid(
                "dynamic_tenants.max_pools",
                "max_pools, pool_idle_s and max_tenants must be greater than 0",
            ));
        }
        let urls = match (&d.amqp_url, &d.amqp_url_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "dynamic_tenants.amqp_url_file",
                    "set either amqp_url or amqp_url_file, not both",
                ));
            }
            (Some(url), None) => vec![check_url("dynamic_tenants.amqp_url", url)?],
            (None, Some(path)) => {
                let url = read_file("dynamic_tenants.amqp_url_file", path)?;
                vec![check_url("dynamic_tenants.amqp_url_file", url.trim())?]
            }
            (None, None) => broker_urls.to_vec(),
        };
        Ok(Some(ResolvedDynamic {
            vhost_template: d.vhost_template.clone(),
            urls,
            publish: compile_grants("dynamic_tenants.publish", &d.publish)?,
            subscribe: compile_grants("dynamic_tenants.subscribe", &d.subscribe)?,
            limits: check_limits("dynamic_tenants.limits", &d.limits)?,
            max_pools: d.max_pools,
            pool_idle: Duration::from_secs(d.pool_idle_s),
            max_tenants: d.max_tenants,
        }))
    }

    fn resolve_auth(&self) -> Result<(KeySources, Option<HmacSecret>), ConfigError> {
        let auth = &self.auth;
        if auth.tenant_claim.is_empty() {
            return Err(ConfigError::invalid(
                "auth.tenant_claim",
                "must not be empty",
            ));
        }
        for (key, value) in [
            ("auth.jwks_refresh_s", auth.jwks_refresh_s),
            ("auth.jwks_min_refetch_s", auth.jwks_min_refetch_s),
            ("auth.jwks_timeout_ms", auth.jwks_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be greater than 0"));
            }
        }
        // A kid names one key: the same kid twice in the config is a mistake.
        let mut kids: BTreeMap<String, String> = BTreeMap::new();
        let mut claim_kid = |key: &str, kid: &str| {
            if kid.is_empty() {
                return Err(ConfigError::invalid(key, "must not be empty"));
            }
            match kids.insert(kid.to_owned(), key.to_owned()) {
                Some(other) => Err(ConfigError::invalid(
                    key,
                    format!("kid {kid:?} is already used by {other}"),
                )),
                None => Ok(()),
            }
        };

        let mut hmac = Vec::new();
        let hs256 = match (&auth.hs256_secret, &auth.hs256_secret_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "auth.hs256_secret_file",
                    "set either auth.hs256_secret or auth.hs256_secret_file, not both",
                ));
            }
            (Some(secret), None) => Some(secret.as_bytes().to_vec()),
            (None, Some(path)) => Some(
                read_file("auth.hs256_secret_file", path)?
                    .trim_end()
                    .as_bytes()
                    .to_vec(),
            ),
            (None, None) => None,
        };
        match hs256 {
            Some(secret) => {
                if let Some(kid) = &auth.hs256_kid {
                    claim_kid("auth.hs256_kid", kid)?;
                }
                let secret = HmacSecret::new(auth.hs256_kid.clone(), Algorithm::HS256, secret)
                    .map_err(|m| ConfigError::invalid("auth.hs256_secret", m))?;
                hmac.push(secret);
            }
            None if auth.hs256_kid.is_some() => {
                return Err(ConfigError::invalid(
                    "auth.hs256_kid",
                    "is set, but neither auth.hs256_secret nor auth.hs256_secret_file is",
                ));
            }
            None => {}
        }
        for (i, entry) in auth.hs_secrets.iter().enumerate() {
            let prefix = format!("auth.hs_secrets[{i}]");
            claim_kid(&format!("{prefix}.kid"), &entry.kid)?;
            let alg = parse_algorithm(&entry.alg)
                .map_err(|m| ConfigError::invalid(format!("{prefix}.alg"), m))?;
            let secret = match (&entry.secret, &entry.secret_file) {
                (Some(secret), None) => secret.as_bytes().to_vec(),
                (None, Some(path)) => read_file(&format!("{prefix}.secret_file"), path)?
                    .trim_end()
                    .as_bytes()
                    .to_vec(),
                _ => {
                    return Err(ConfigError::invalid(
                        format!("{prefix}.secret"),
                        "set exactly one of secret and secret_file",
                    ));
                }
            };
            let secret = HmacSecret::new(Some(entry.kid.clone()), alg, secret).map_err(|m| {
                let field = if alg.family() == AlgorithmFamily::Hmac {
                    "secret"
                } else {
                    "alg"
                };
                ConfigError::invalid(format!("{prefix}.{field}"), m)
            })?;
            hmac.push(secret);
        }

        let mut files = Vec::new();
        for (i, entry) in auth.public_key_files.iter().enumerate() {
            let prefix = format!("auth.public_key_files[{i}]");
            claim_kid(&format!("{prefix}.kid"), &entry.kid)?;
            let alg = parse_algorithm(&entry.alg)
                .map_err(|m| ConfigError::invalid(format!("{prefix}.alg"), m))?;
            if alg.family() == AlgorithmFamily::Hmac {
                return Err(ConfigError::invalid(
                    format!("{prefix}.alg"),
                    format!("{alg:?} is an HMAC algorithm; HMAC secrets belong in auth.hs_secrets"),
                ));
            }
            let file = KeyFile::pem(&prefix, &entry.file, &entry.kid, alg)
                .map_err(|m| ConfigError::invalid(format!("{prefix}.file"), m))?;
            files.push(file);
        }
        if let Some(path) = &auth.jwks_file {
            let file = KeyFile::jwks("auth.jwks_file", path)
                .map_err(|m| ConfigError::invalid("auth.jwks_file", m))?;
            files.push(file);
        }
        let jwks_url = match &auth.jwks_url {
            Some(url) => Some(check_jwks_url(url)?),
            None => None,
        };
        if hmac.is_empty() && files.is_empty() && jwks_url.is_none() {
            return Err(ConfigError::invalid(
                "auth",
                "a token key is required: set auth.hs256_secret (or auth.hs256_secret_file), \
                 auth.hs_secrets, auth.public_key_files, auth.jwks_file or auth.jwks_url",
            ));
        }
        let signing_secret = hmac.first().cloned();
        Ok((
            KeySources {
                hmac,
                files,
                jwks_url,
                refresh_every: Duration::from_secs(auth.jwks_refresh_s),
                min_refetch: Duration::from_secs(auth.jwks_min_refetch_s),
                fetch_timeout: Duration::from_millis(auth.jwks_timeout_ms),
            },
            signing_secret,
        ))
    }

    fn broker_urls(&self) -> Result<Vec<String>, ConfigError> {
        let a = &self.amqp;
        let set = [a.url.is_some(), !a.urls.is_empty(), a.url_file.is_some()]
            .iter()
            .filter(|s| **s)
            .count();
        if set > 1 {
            return Err(ConfigError::invalid(
                "amqp.url",
                "set only one of amqp.url, amqp.urls and amqp.url_file",
            ));
        }
        if let Some(url) = &a.url {
            return Ok(vec![check_url("amqp.url", url)?]);
        }
        if let Some(path) = &a.url_file {
            let url = read_file("amqp.url_file", path)?;
            return Ok(vec![check_url("amqp.url_file", url.trim())?]);
        }
        if a.urls.is_empty() {
            return Ok(vec![DEFAULT_BROKER_URL.to_owned()]);
        }
        a.urls
            .iter()
            .enumerate()
            .map(|(i, url)| check_url(&format!("amqp.urls[{i}]"), url))
            .collect()
    }
}

fn compile_grants(key: &str, grants: &[GrantConfig]) -> Result<Vec<Grant>, ConfigError> {
    grants
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let pattern = GrantPattern::parse(&g.routing_key).map_err(|e| {
                ConfigError::invalid(format!("{key}[{i}].routing_key"), e.to_string())
            })?;
            if g.exchange.len() > 255 {
                return Err(ConfigError::invalid(
                    format!("{key}[{i}].exchange"),
                    "must be at most 255 bytes",
                ));
            }
            Ok(Grant::new(g.exchange.clone(), pattern))
        })
        .collect()
}

fn check_limits(key: &str, limits: &LimitsConfig) -> Result<LimitsConfig, ConfigError> {
    for (name, rate) in [
        ("publish_rate", limits.publish_rate),
        ("publish_bytes_rate", limits.publish_bytes_rate),
    ] {
        if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(ConfigError::invalid(
                format!("{key}.{name}"),
                "must be a positive number",
            ));
        }
    }
    for (name, max) in [
        ("max_inflight_publishes", limits.max_inflight_publishes),
        ("max_websockets", limits.max_websockets),
        ("max_consumers", limits.max_consumers),
    ] {
        if max == Some(0) {
            return Err(ConfigError::invalid(
                format!("{key}.{name}"),
                "must be greater than 0",
            ));
        }
    }
    Ok(limits.clone())
}

/// A JWKS URL must be https: over plain http anyone on the path could hand Warren their
/// own keys. Plain http is allowed for loopback addresses (a local sidecar, tests).
fn check_jwks_url(url: &str) -> Result<String, ConfigError> {
    let key = "auth.jwks_url";
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConfigError::invalid(key, format!("not a valid URL: {e}")))?;
    let loopback = is_loopback_host(parsed.host_str());
    match parsed.scheme() {
        "https" => Ok(url.to_owned()),
        "http" if loopback => Ok(url.to_owned()),
        _ => Err(ConfigError::invalid(
            key,
            "must be an https:// URL (http:// only for a loopback address)",
        )),
    }
}

fn check_url(key: &str, url: &str) -> Result<String, ConfigError> {
    url.parse::<lapin::uri::AMQPUri>()
        .map_err(|e| ConfigError::invalid(key, format!("not a valid AMQP URL: {e}")))?;
    Ok(url.to_owned())
}

fn read_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))
}

fn figment_message(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let kind = e.kind.to_string();
            if key.is_empty() {
                kind
            } else {
                format!("{key}: {kind}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn minimal(extra: &str) -> String {
        format!(
            "[auth]\nhs256_secret = \"{SECRET}\"\n[tenants.acme]\nvhost = \"acme\"\n\
             publish = [{{ exchange = \"events\", routing_key = \"order.#\" }}]\n{extra}"
        )
    }

    #[test]
    fn minimal_config_resolves_with_defaults() {
        let config = Config::from_toml(&minimal("")).unwrap();
        let resolved = config.resolve().unwrap();
        assert_eq!(resolved.broker_urls, vec![DEFAULT_BROKER_URL.to_owned()]);
        assert_eq!(resolved.tenants["acme"].vhost, "acme");
        assert_eq!(resolved.tenants["acme"].publish.len(), 1);
        assert_eq!(config.server.max_body_bytes, 1024 * 1024);
        assert_eq!(config.amqp.confirm_timeout_ms, 5000);
    }

    #[test]
    fn new_limits_are_validated_and_shares_default_to_an_equal_split() {
        let err = |extra: &str| {
            Config::from_toml(&minimal(extra))
                .unwrap()
                .resolve()
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("[server]\nbody_read_timeout_s = 0\n").starts_with("server.body_read_timeout_s:")
        );
        assert!(
            err("[idempotency]\nmax_entries = 10\nmax_entries_per_tenant = 11\n")
                .starts_with("idempotency.max_entries_per_tenant:")
        );
        assert!(
            err("[idempotency]\nmax_bytes_per_tenant = 0\n")
                .starts_with("idempotency.max_bytes_per_tenant:")
        );
        let config = Config::from_toml(&minimal("")).unwrap();
        assert_eq!(config.server.body_read_timeout_s, 10);
        let i = &config.idempotency;
        assert_eq!(i.tenant_share(0), (i.max_entries, i.max_bytes));
        assert_eq!(i.tenant_share(4), (i.max_entries / 4, i.max_bytes / 4));
        let mut set = i.clone();
        set.max_entries_per_tenant = Some(7);
        assert_eq!(set.tenant_share(4).0, 7);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml(&minimal("[server]\nlisten_port = 1\n")).unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::from_toml(&minimal("[server]\nmax_body_bytes = \"big\"\n")).unwrap_err();
        assert!(err.to_string().contains("server.max_body_bytes"), "{err}");
    }

    #[test]
    fn bad_grant_pattern_names_the_key() {
        let text = format!(
            "[auth]\nhs256_secret = \"{SECRET}\"\n[tenants.acme]\nvhost = \"acme\"\n\
             publish = [{{ exchange = \"events\", routing_key = \"order.#x\" }}]\n"
        );
        let err = Config::from_toml(&text).unwrap().resolve().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("tenants.acme.publish[0].routing_key:"),
            "{err}"
        );
    }

    #[test]
    fn short_secret_and_missing_secret_are_rejected() {
        let err =
            Config::from_toml("[auth]\nhs256_secret = \"short\"\n[tenants.a]\nvhost = \"a\"\n")
                .unwrap()
                .resolve()
                .unwrap_err();
        assert!(err.to_string().starts_with("auth.hs256_secret:"), "{err}");
        let err = Config::from_toml("[tenants.a]\nvhost = \"a\"\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("auth: a token key is required"),
            "{err}"
        );
    }

    #[test]
    fn bad_amqp_url_is_named() {
        let err = Config::from_toml(&minimal("[amqp]\nurls = [\"amqp://ok\", \"http://x\"]\n"))
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().starts_with("amqp.urls[1]:"), "{err}");
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let url = dir.path().join("url");
        std::fs::write(&url, "amqp://u:p@127.0.0.1:5672\n").unwrap();
        let text = format!(
            "[amqp]\nurl_file = {:?}\n[auth]\nhs256_secret_file = {:?}\n[tenants.a]\nvhost = \"a\"\n",
            url, secret
        );
        let resolved = Config::from_toml(&text).unwrap().resolve().unwrap();
        let signing = resolved.signing_secret.unwrap();
        assert_eq!(signing.secret(), SECRET.as_bytes());
        assert_eq!(resolved.broker_urls, vec!["amqp://u:p@127.0.0.1:5672"]);
        let missing = text.replace("secret\"", "nope\"");
        let err = Config::from_toml(&missing).unwrap().resolve().unwrap_err();
        assert!(
            err.to_string().starts_with("auth.hs256_secret_file:"),
            "{err}"
        );
    }

    fn keys_dir() -> String {
        format!("{}/tests/keys", env!("CARGO_MANIFEST_DIR"))
    }

    /// `[auth]` with `auth` as its body, and one tenant.
    fn resolve_auth(auth: &str) -> Result<Resolved, ConfigError> {
        let text = format!("[auth]\n{auth}\n[tenants.a]\nvhost = \"a\"\n");
        Config::from_toml(&text)?.resolve()
    }

    #[track_caller]
    fn assert_names(auth: &str, key: &str) {
        let err = resolve_auth(auth).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{key}:")), "{auth}\n=> {err}");
    }

    #[test]
    fn public_keys_and_jwks_resolve_without_an_hmac_secret() {
        let dir = keys_dir();
        let resolved = resolve_auth(&format!(
            "public_key_files = [{{ kid = \"a\", alg = \"RS256\", file = \"{dir}/rsa-a.pub.pem\" }},\n\
             {{ kid = \"e\", alg = \"EdDSA\", file = \"{dir}/ed25519.pub.pem\" }}]\n\
             jwks_file = \"{dir}/jwks.json\"\n\
             jwks_url = \"https://idp.example/.well-known/jwks.json\"\n"
        ))
        .unwrap();
        assert!(resolved.signing_secret.is_none());
        assert_eq!(resolved.token_keys.files.len(), 3);
        assert_eq!(resolved.token_keys.refresh_every, Duration::from_secs(300));
        assert_eq!(resolved.token_keys.min_refetch, Duration::from_secs(30));
        // The HS256 secret signs when there is one; else the first hs_secrets entry.
        let resolved = resolve_auth(&format!(
            "hs_secrets = [{{ kid = \"h\", alg = \"HS384\", secret = \"{SECRET}{SECRET}\" }}]\n"
        ))
        .unwrap();
        let signing = resolved.signing_secret.unwrap();
        assert_eq!(
            (signing.kid.as_deref(), signing.alg),
            (Some("h"), Algorithm::HS384)
        );
    }

    #[test]
    fn bad_key_settings_name_the_key() {
        let dir = keys_dir();
        let pem = |kid: &str, alg: &str, file: &str| {
            format!("{{ kid = \"{kid}\", alg = \"{alg}\", file = \"{dir}/{file}\" }}")
        };
        let files = |entries: &[String]| format!("public_key_files = [{}]\n", entries.join(", "));
        for (auth, key) in [
            (
                files(&[pem("a", "RS999", "rsa-a.pub.pem")]),
                "auth.public_key_files[0].alg",
            ),
            (
                files(&[pem("a", "HS256", "rsa-a.pub.pem")]),
                "auth.public_key_files[0].alg",
            ),
            (
                files(&[pem("a", "RS256", "missing.pem")]),
                "auth.public_key_files[0].file",
            ),
            (
                files(&[pem("a", "RS256", "rsa-a.key.pem")]),
                "auth.public_key_files[0].file",
            ),
            (
                files(&[pem("a", "RS256", "rsa-1024.pub.pem")]),
                "auth.public_key_files[0].file",
            ),
            (
                files(&[pem("a", "ES256", "ec-p384.pub.pem")]),
                "auth.public_key_files[0].file",
            ),
            (
                files(&[pem("a", "ES256", "rsa-a.pub.pem")]),
                "auth.public_key_files[0].file",
            ),
            (
                files(&[pem("", "RS256", "rsa-a.pub.pem")]),
                "auth.public_key_files[0].kid",
            ),
            (
                files(&[
                    pem("a", "RS256", "rsa-a.pub.pem"),
                    pem("a", "EdDSA", "ed25519.pub.pem"),
                ]),
                "auth.public_key_files[1].kid",
            ),
            (
                format!(
                    "hs256_secret = \"{SECRET}\"\nhs256_kid = \"a\"\n{}",
                    files(&[pem("a", "RS256", "rsa-a.pub.pem")])
                ),
                "auth.public_key_files[0].kid",
            ),
            (
                format!("hs_secrets = [{{ kid = \"h\", alg = \"HS512\", secret = \"{SECRET}\" }}]"),
                "auth.hs_secrets[0].secret",
            ),
            (
                format!("hs_secrets = [{{ kid = \"h\", alg = \"RS256\", secret = \"{SECRET}\" }}]"),
                "auth.hs_secrets[0].alg",
            ),
            (
                "hs_secrets = [{ kid = \"h\" }]".to_owned(),
                "auth.hs_secrets[0].secret",
            ),
            (
                format!("hs_secrets = [{{ kid = \"h\", secret_file = \"{dir}/nope\" }}]"),
                "auth.hs_secrets[0].secret_file",
            ),
            (
                "hs256_kid = \"k\"\njwks_url = \"https://idp.test/jwks\"".to_owned(),
                "auth.hs256_kid",
            ),
            (
                format!("jwks_file = \"{dir}/rsa-a.pub.pem\""),
                "auth.jwks_file",
            ),
            (
                "jwks_file = \"/nonexistent/jwks.json\"".to_owned(),
                "auth.jwks_file",
            ),
            (
                "jwks_url = \"http://idp.example/jwks\"".to_owned(),
                "auth.jwks_url",
            ),
            (
                "jwks_url = \"ftp://127.0.0.1/jwks\"".to_owned(),
                "auth.jwks_url",
            ),
            ("jwks_url = \"not a url\"".to_owned(), "auth.jwks_url"),
            (
                "jwks_url = \"https://idp.test/jwks\"\njwks_refresh_s = 0".to_owned(),
                "auth.jwks_refresh_s",
            ),
            (
                "jwks_url = \"https://idp.test/jwks\"\njwks_min_refetch_s = 0".to_owned(),
                "auth.jwks_min_refetch_s",
            ),
            ("issuer = \"https://idp.test\"".to_owned(), "auth"),
        ] {
            assert_names(&auth, key);
        }
        // An empty JWKS file is named too (it has no usable key).
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            tmp.path(),
            r#"{"keys": [{"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]}"#,
        )
        .unwrap();
        assert_names(&format!("jwks_file = {:?}", tmp.path()), "auth.jwks_file");
        // http is fine on loopback (a sidecar, tests).
        for url in [
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:1/jwks",
        ] {
            resolve_auth(&format!("jwks_url = \"{url}\"")).unwrap();
        }
    }

    #[test]
    fn dev_config_is_valid_and_loopback() {
        let config = Config::dev();
        assert!(config.server.listen.ip().is_loopback());
        let resolved = config.resolve().unwrap();
        assert_eq!(resolved.tenants["default"].vhost, "/");
    }
}
