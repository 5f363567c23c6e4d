//! `[tenants.*]` and `[dynamic_tenants]`: vhosts, per-tenant broker credentials, grants
//! and quotas, checked and compiled here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use super::check::{all_positive, amqp_url_setting};
use crate::auth::grants::{Grant, GrantPattern};

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

/// Checks every `[tenants.*]` table; a tenant without its own URL uses `broker_urls`.
pub(super) fn resolve_tenants(
    tenants: &BTreeMap<String, TenantConfig>,
    dynamic_enabled: bool,
    broker_urls: &[String],
) -> Result<BTreeMap<String, ResolvedTenant>, ConfigError> {
    if tenants.is_empty() && !dynamic_enabled {
        return Err(ConfigError::invalid(
            "tenants",
            "at least one [tenants.<name>] table is required (or [dynamic_tenants] enabled)",
        ));
    }
    let mut resolved = BTreeMap::new();
    for (name, t) in tenants {
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
        let urls =
            match amqp_url_setting(&prefix, t.amqp_url.as_deref(), t.amqp_url_file.as_deref())? {
                Some(url) => vec![url],
                None => broker_urls.to_vec(),
            };
        resolved.insert(
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
    Ok(resolved)
}

impl DynamicTenantsConfig {
    /// The template of dynamic tenants, `None` when they are off.
    pub(super) fn resolve(
        &self,
        broker_urls: &[String],
    ) -> Result<Option<ResolvedDynamic>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        if !self.vhost_template.contains("{tenant}") {
            return Err(ConfigError::invalid(
                "dynamic_tenants.vhost_template",
                "must contain {tenant}, or every dynamic tenant would share one vhost",
            ));
        }
        if self.max_pools == 0 || self.pool_idle_s == 0 || self.max_tenants == 0 {
            return Err(ConfigError::invalid(
                "dynamic_tenants.max_pools",
                "max_pools, pool_idle_s and max_tenants must be greater than 0",
            ));
        }
        let urls = match amqp_url_setting(
            "dynamic_tenants",
            self.amqp_url.as_deref(),
            self.amqp_url_file.as_deref(),
        )? {
            Some(url) => vec![url],
            None => broker_urls.to_vec(),
        };
        Ok(Some(ResolvedDynamic {
            vhost_template: self.vhost_template.clone(),
            urls,
            publish: compile_grants("dynamic_tenants.publish", &self.publish)?,
            subscribe: compile_grants("dynamic_tenants.subscribe", &self.subscribe)?,
            limits: check_limits("dynamic_tenants.limits", &self.limits)?,
            max_pools: self.max_pools,
            pool_idle: Duration::from_secs(self.pool_idle_s),
            max_tenants: self.max_tenants,
        }))
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
        if let Some(max) = max {
            all_positive(&[(&format!("{key}.{name}"), max as u64)])?;
        }
    }
    Ok(limits.clone())
}
