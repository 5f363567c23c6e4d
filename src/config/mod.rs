//! Typed configuration: loaded once at start from TOML plus `WARREN_*` environment
//! overrides, and validated with errors that name the key. Plain data: each section
//! (a file here) checks itself; key sources are described, and the key store reads
//! them ([`crate::auth::keys`]).

mod amqp;
mod auth;
mod check;
mod idempotency;
mod log;
mod pull;
mod push;
#[cfg(test)]
mod reference_doc;
mod rpc;
mod schedule;
mod server;
mod sse;
mod streams;
mod telemetry;
mod tenants;
#[cfg(test)]
mod tests;
mod topology;
mod ws;

pub use amqp::{AmqpConfig, TlsConfig};
pub use auth::{AuthConfig, HsSecretConfig, PublicKeyFileConfig};
pub use idempotency::{IdempotencyConfig, StoreKind};
pub use log::{LogConfig, LogFormat};
pub use pull::PullConfig;
pub use push::{
    HeaderSource, PushConfig, PushFormat, PushSettings, PushSpec, check_push_url, is_public,
};
pub use rpc::RpcConfig;
pub use schedule::ScheduleConfig;
pub use server::{CorsConfig, ListenerTls, ServerConfig};
pub use sse::SseConfig;
pub use streams::StreamsConfig;
pub use telemetry::{ParentRoot, Sampler, TelemetryConfig, Tracing};
pub use tenants::{
    DynamicTenantsConfig, GrantConfig, LimitsConfig, ResolvedDynamic, ResolvedTenant, TenantConfig,
};
pub use topology::{
    ArgValue, BindingSpec, Destination, ExchangeSpec, QueueSpec, RetryPolicy, TenantTopology,
    TopologyConfig,
};
pub use ws::{DurableQueueType, WsConfig};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use crate::auth::keys::{HmacSecret, KeySources};

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
    pub rpc: RpcConfig,
    #[serde(default)]
    pub streams: StreamsConfig,
    #[serde(default)]
    pub sse: SseConfig,
    #[serde(default)]
    pub dynamic_tenants: DynamicTenantsConfig,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    #[serde(default)]
    pub topology: TopologyConfig,
    #[serde(default)]
    pub push: PushSettings,
    #[serde(default)]
    pub pull: PullConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// Settings resolved from the raw config: secrets read, URLs chosen, grants compiled.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Every token key source, checked and described; the key store reads the files.
    pub token_keys: KeySources,
    /// What `warren token` and dev mode sign with: the HS256 secret, else the first of
    /// `auth.hs_secrets`; `None` when only public keys are configured.
    pub signing_secret: Option<HmacSecret>,
    pub broker_urls: Vec<String>,
    pub tenants: BTreeMap<String, ResolvedTenant>,
    pub dynamic: Option<ResolvedDynamic>,
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
        let full = || vec![GrantConfig::exchange("*", "#")];
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
                exchanges: Vec::new(),
                queues: Vec::new(),
                push: Vec::new(),
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
            rpc: RpcConfig::default(),
            streams: StreamsConfig::default(),
            sse: SseConfig::default(),
            dynamic_tenants: DynamicTenantsConfig::default(),
            tenants,
            topology: TopologyConfig::default(),
            // Dev mode delivers to a receiver on this machine.
            push: PushSettings {
                allow_private_networks: true,
                ..PushSettings::default()
            },
            pull: PullConfig::default(),
            schedule: ScheduleConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }

    /// Checks every key and reads every referenced file except token key files (the
    /// key store reads those: `KeySources::check_files`). The error names the key.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        self.server.validate()?;
        self.amqp.validate()?;
        self.idempotency.validate(self.amqp.confirm_timeout_ms)?;
        self.ws.validate()?;
        self.rpc.validate()?;
        self.streams.validate()?;
        self.sse.validate()?;
        self.push.validate()?;
        self.pull.validate()?;
        self.schedule.validate()?;
        self.telemetry.validate()?;
        let broker_urls = self.amqp.broker_urls()?;
        let (token_keys, signing_secret) = self.auth.key_sources()?;
        let tenants = tenants::resolve_tenants(
            &self.tenants,
            self.dynamic_tenants.enabled,
            &broker_urls,
            &self.push,
        )?;
        let dynamic = self.dynamic_tenants.resolve(&broker_urls)?;
        Ok(Resolved {
            token_keys,
            signing_secret,
            broker_urls,
            tenants,
            dynamic,
        })
    }
}

/// Below this many idempotency entries a tenant is guaranteed, `warren check-config`
/// warns: its retries are protected only over its last few keyed requests.
const MIN_GUARANTEED_IDEMPOTENCY_ENTRIES: usize = 1000;

impl Config {
    /// What is valid but likely not what the operator wants; `warren check-config`
    /// prints each (the config still loads).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let idem = &self.idempotency;
        if self.dynamic_tenants.enabled {
            match idem.store {
                idempotency::StoreKind::Memory => {
                    // Every tenant holding entries gets at least an equal share of the
                    // store (the memory store evicts from the largest for a newcomer);
                    // with max_pools dynamic tenants active that share can be small.
                    let tenants = self.tenants.len() + self.dynamic_tenants.max_pools;
                    let share = idem.max_entries / tenants.max(1);
                    if share < MIN_GUARANTEED_IDEMPOTENCY_ENTRIES {
                        warnings.push(format!(
                            "idempotency.max_entries: with {} configured tenant(s) and up to dynamic_tenants.max_pools = {} dynamic ones active, each tenant is guaranteed only {share} idempotency entries (Idempotency-Keys and CloudEvent ids); a busier tenant's oldest answers are evicted early, within idempotency.retention_s. Raise idempotency.max_entries (and max_bytes) to at least {}, or lower dynamic_tenants.max_pools",
                            self.tenants.len(),
                            self.dynamic_tenants.max_pools,
                            MIN_GUARANTEED_IDEMPOTENCY_ENTRIES * tenants,
                        ));
                    }
                }
                idempotency::StoreKind::Redis => warnings.push(
                    "idempotency.store = \"redis\": Redis keeps no per-tenant share; with dynamic tenants one of them can fill its memory. Give Redis a maxmemory with a volatile-* eviction policy, or a Redis per group of tenants".to_owned(),
                ),
            }
        }
        // Replicas sharing Redis relay pull settles to each other, and each must open the
        // receipts the others sealed: that needs a shared key.
        let shared_secret = self.auth.hs256_secret.is_some()
            || self.auth.hs256_secret_file.is_some()
            || !self.auth.hs_secrets.is_empty();
        if idem.store == idempotency::StoreKind::Redis
            && !shared_secret
            && self.pull.receipt_secret.is_none()
            && self.pull.receipt_secret_file.is_none()
        {
            warnings.push(
                "pull.receipt_secret: with only public token keys, each replica seals pull receipts with a key of its own, so an ack sent to another replica is refused; set pull.receipt_secret (or receipt_secret_file) to the same secret on every replica".to_owned(),
            );
        }
        warnings
    }
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
