//! `[tenants.*]` and `[dynamic_tenants]`: vhosts, per-tenant broker credentials, grants
//! and quotas, checked and compiled here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use super::check::{all_positive, amqp_url_setting};
use super::topology::{ExchangeConfig, QueueConfig, TenantTopology};
use crate::auth::grants::{ExchangeMatch, Grant, GrantPattern, SubscribeGrants};

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
    /// Open server-sent event streams (`GET /v1/events`); overrides
    /// sse.max_connections_per_tenant for this tenant.
    pub max_sse_connections: Option<usize>,
    /// HTTP requests the tenant may hold waiting at once (request/reply awaiting its
    /// reply, a pull receive's long poll); default 1,000. They hold no
    /// `server.max_concurrent_requests` slot while they wait, so this and
    /// `server.max_waiting_requests` are what bound them.
    pub max_waiting_requests: Option<usize>,
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
    /// Topology as code (SPEC §11): `warren topology plan|apply`, `topology.apply_on_start`.
    #[serde(default)]
    pub exchanges: Vec<ExchangeConfig>,
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    /// Push subscriptions (SPEC §13): queues of this topology delivered over HTTP.
    #[serde(default)]
    pub push: Vec<super::push::PushConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// Exchange name, or `*` for every exchange (including the default exchange `""`).
    #[serde(default)]
    pub exchange: Option<String>,
    /// AMQP topic pattern: `*` is one word, `#` zero or more. Required with `exchange`;
    /// optional with `stream` (default `#`).
    #[serde(default)]
    pub routing_key: Option<String>,
    /// Subscribe grants only: consume this existing queue (SPEC §11); `*` for any.
    #[serde(default)]
    pub queue: Option<String>,
    /// Subscribe grants only: read this stream (SPEC §9); `*` for any.
    #[serde(default)]
    pub stream: Option<String>,
}

impl GrantConfig {
    /// `{ exchange, routing_key }`.
    pub fn exchange(exchange: &str, routing_key: &str) -> Self {
        Self {
            exchange: Some(exchange.to_owned()),
            routing_key: Some(routing_key.to_owned()),
            queue: None,
            stream: None,
        }
    }
}

/// The template every dynamic tenant is made from.
#[derive(Debug, Clone)]
pub struct ResolvedDynamic {
    pub vhost_template: String,
    pub urls: Vec<String>,
    pub publish: Vec<Grant>,
    pub subscribe: SubscribeGrants,
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
    pub subscribe: SubscribeGrants,
    pub limits: LimitsConfig,
    pub topology: TenantTopology,
    pub push: Vec<super::push::PushSpec>,
}

/// Checks every `[tenants.*]` table; a tenant without its own URL uses `broker_urls`.
pub(super) fn resolve_tenants(
    tenants: &BTreeMap<String, TenantConfig>,
    dynamic_enabled: bool,
    broker_urls: &[String],
    push: &super::push::PushSettings,
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
        let topology = super::topology::resolve(&prefix, &t.exchanges, &t.queues)?;
        let push = super::push::resolve(&prefix, name, &t.push, &topology, push)?;
        resolved.insert(
            name.clone(),
            ResolvedTenant {
                name: name.clone(),
                vhost: t.vhost.clone(),
                urls,
                publish: compile_publish_grants(&format!("{prefix}.publish"), &t.publish)?,
                subscribe: compile_subscribe_grants(&format!("{prefix}.subscribe"), &t.subscribe)?,
                limits: check_limits(&format!("{prefix}.limits"), &t.limits)?,
                topology,
                push,
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
            publish: compile_publish_grants("dynamic_tenants.publish", &self.publish)?,
            subscribe: compile_subscribe_grants("dynamic_tenants.subscribe", &self.subscribe)?,
            limits: check_limits("dynamic_tenants.limits", &self.limits)?,
            max_pools: self.max_pools,
            pool_idle: Duration::from_secs(self.pool_idle_s),
            max_tenants: self.max_tenants,
        }))
    }
}

fn compile_publish_grants(key: &str, grants: &[GrantConfig]) -> Result<Vec<Grant>, ConfigError> {
    let compiled = compile_subscribe_grants(key, grants)?;
    if !compiled.queues.is_empty() || !compiled.streams.is_empty() {
        return Err(ConfigError::invalid(
            key,
            "publish grants name an exchange and a routing_key; `queue` and `stream` are subscribe grants",
        ));
    }
    Ok(compiled.exchanges)
}

/// One grant is exactly one of `{ exchange, routing_key }`, `{ queue }` or
/// `{ stream, routing_key? }`.
fn compile_subscribe_grants(
    key: &str,
    grants: &[GrantConfig],
) -> Result<SubscribeGrants, ConfigError> {
    let mut compiled = SubscribeGrants::default();
    for (i, g) in grants.iter().enumerate() {
        let at = |member: &str| format!("{key}[{i}]{member}");
        let pattern = |required: bool| -> Result<GrantPattern, ConfigError> {
            match &g.routing_key {
                Some(source) => GrantPattern::parse(source)
                    .map_err(|e| ConfigError::invalid(at(".routing_key"), e.to_string())),
                None if required => Err(ConfigError::invalid(
                    at(".routing_key"),
                    "is required with `exchange`",
                )),
                None => Ok(GrantPattern::every_key()),
            }
        };
        let name = |member: &str, name: &String| -> Result<String, ConfigError> {
            if name.len() > 255 || (member != ".exchange" && name.is_empty()) {
                return Err(ConfigError::invalid(at(member), "must be 1-255 bytes"));
            }
            Ok(name.clone())
        };
        match (&g.exchange, &g.queue, &g.stream) {
            (Some(exchange), None, None) => compiled
                .exchanges
                .push(Grant::new(name(".exchange", exchange)?, pattern(true)?)),
            (None, Some(queue), None) => {
                if g.routing_key.is_some() {
                    return Err(ConfigError::invalid(
                        at(".routing_key"),
                        "a queue grant has no routing_key: consuming a queue takes every message in it",
                    ));
                }
                compiled
                    .queues
                    .push(ExchangeMatch::from_name(name(".queue", queue)?));
            }
            (None, None, Some(stream)) => compiled
                .streams
                .push(Grant::new(name(".stream", stream)?, pattern(false)?)),
            _ => {
                return Err(ConfigError::invalid(
                    at(""),
                    "a grant names exactly one of `exchange` (with `routing_key`), `queue` or `stream`",
                ));
            }
        }
    }
    Ok(compiled)
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
