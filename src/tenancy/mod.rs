//! Tenants: each maps to a vhost, broker credentials, grants and quotas. Configured
//! tenants get their pools at start (one per distinct vhost and credentials, pinned);
//! dynamic tenants, when enabled, are made from a template on first use and get lazy
//! pools that close when idle.

pub mod pools;
mod principal;
pub mod quota;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::grants::{self, Grant, GrantPattern, SubscribeGrants};
use crate::broker::{Broker, BrokerError, BrokerLease};
use crate::config::{AmqpConfig, Resolved, ResolvedDynamic};
use crate::error::ApiError;
use crate::telemetry;
use pools::{PoolKey, Pools};
pub use principal::{Principal, Scope, authenticate};
use quota::Quota;

enum Pool {
    /// Opened at start, never closed while running.
    Pinned(Arc<Broker>),
    Lazy(PoolKey),
}

/// Wakes the scheduled-publish router of a pool (`schedule/router.rs`) whose ladder was
/// just declared.
pub type ScheduleWake = Arc<tokio::sync::Notify>;

pub struct Tenant {
    pub name: String,
    pub vhost: String,
    pub publish: Vec<Grant>,
    pub subscribe: SubscribeGrants,
    pub quota: Quota,
    /// The `tenant` label in metrics: the name for configured tenants, one shared label
    /// for dynamic ones.
    pub metrics_label: String,
    pool: Pool,
    pools: Arc<Pools>,
    /// Configured tenants only: wakes their vhost's scheduled-publish router. Dynamic
    /// tenants cannot schedule (no replica knows their vhosts to run a router on).
    schedule: Option<ScheduleWake>,
}

impl Tenant {
    /// The broker pool of this tenant's vhost (opened if it is a lazy one).
    pub async fn broker(&self) -> Result<BrokerLease, ApiError> {
        match &self.pool {
            Pool::Pinned(broker) => Ok(BrokerLease::new(broker.clone())),
            Pool::Lazy(key) => self.pools.get(key).await,
        }
    }

    /// The router wake-up of this tenant's vhost, when the tenant may schedule.
    pub fn schedule_wake(&self) -> Option<&tokio::sync::Notify> {
        self.schedule.as_deref()
    }

    /// Denied publishes never reach the broker.
    pub fn authorize_publish(&self, exchange: &str, routing_key: &str) -> Result<(), ApiError> {
        if grants::allows_publish(&self.publish, exchange, routing_key) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "tenant {:?} may not publish to exchange {exchange:?} with routing key {routing_key:?}",
                self.name
            )))
        }
    }

    pub fn authorize_subscribe(
        &self,
        exchange: &str,
        binding_key: &GrantPattern,
    ) -> Result<(), ApiError> {
        match grants::allows_subscribe(&self.subscribe.exchanges, exchange, binding_key) {
            Ok(true) => Ok(()),
            Ok(false) if grants::ignores_binding_key(exchange) => Err(ApiError::Forbidden(format!(
                "exchange {exchange:?} ignores binding keys, so subscribing there needs a grant for every key (#)"
            ))),
            Ok(false) => Err(ApiError::Forbidden(format!(
                "tenant {:?} may not subscribe to exchange {exchange:?} with binding key {:?}",
                self.name,
                binding_key.as_str()
            ))),
            Err(grants::TooComplex) => Err(ApiError::InvalidRequest(
                "binding_key: too many combinations of `#` and `*` to check against the grants; use fewer wildcards".to_owned(),
            )),
        }
    }

    /// May this tenant's subscribers see a message routed through `exchange` with
    /// `routing_key`? (Deliveries are filtered by it; see [`grants::allows_delivery`].)
    pub fn may_receive(&self, exchange: &str, routing_key: &str) -> bool {
        grants::allows_delivery(&self.subscribe.exchanges, exchange, routing_key)
    }

    /// Consuming an existing queue (SPEC §11) needs a `{ queue }` grant naming it.
    pub fn authorize_queue(&self, queue: &str) -> Result<(), ApiError> {
        if self.subscribe.allows_queue(queue) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "tenant {:?} may not consume queue {queue:?}",
                self.name
            )))
        }
    }

    /// Reading a stream (SPEC §9) needs a `{ stream }` grant naming it whose pattern
    /// covers the subscription's filter (`#` when it has none).
    pub fn authorize_stream(&self, stream: &str, filter: &GrantPattern) -> Result<(), ApiError> {
        match grants::allows_subscribe(&self.subscribe.streams, stream, filter) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ApiError::Forbidden(format!(
                "tenant {:?} may not read stream {stream:?} with binding key {:?}",
                self.name,
                filter.as_str()
            ))),
            Err(grants::TooComplex) => Err(ApiError::InvalidRequest(
                "binding_key: too many combinations of `#` and `*` to check against the grants; use fewer wildcards".to_owned(),
            )),
        }
    }

    /// May this tenant's stream readers see a message of `stream` with `routing_key`?
    pub fn may_receive_from_stream(&self, stream: &str, routing_key: &str) -> bool {
        grants::allows_delivery(&self.subscribe.streams, stream, routing_key)
    }
}

pub struct Tenants {
    configured: HashMap<String, Arc<Tenant>>,
    pinned: Vec<Arc<Broker>>,
    dynamic: Option<ResolvedDynamic>,
    made: Mutex<HashMap<String, Arc<Tenant>>>,
    pools: Arc<Pools>,
}

impl Tenants {
    /// Opens one pinned pool per distinct (broker URLs, vhost) of the configured tenants.
    pub fn start(resolved: &Resolved, amqp: &AmqpConfig) -> Result<Self, BrokerError> {
        let (max_pools, idle) = resolved
            .dynamic
            .as_ref()
            .map(|d| (d.max_pools, d.pool_idle))
            .unwrap_or((1, std::time::Duration::from_secs(300)));
        let pools = Arc::new(Pools::new(amqp, max_pools, idle));
        let mut pinned: HashMap<(Vec<String>, String), (Arc<Broker>, ScheduleWake)> =
            HashMap::new();
        let mut configured = HashMap::new();
        for t in resolved.tenants.values() {
            let key = (t.urls.clone(), t.vhost.clone());
            let (broker, wake) = match pinned.get(&key) {
                Some(pool) => pool.clone(),
                None => {
                    let broker = Broker::start(&t.urls, &t.vhost, amqp, true)?;
                    let pool = (broker, ScheduleWake::default());
                    pinned.insert(key, pool.clone());
                    pool
                }
            };
            configured.insert(
                t.name.clone(),
                Arc::new(Tenant {
                    name: t.name.clone(),
                    vhost: t.vhost.clone(),
                    publish: t.publish.clone(),
                    subscribe: t.subscribe.clone(),
                    quota: Quota::new(&t.limits),
                    metrics_label: t.name.clone(),
                    pool: Pool::Pinned(broker),
                    pools: pools.clone(),
                    schedule: Some(wake),
                }),
            );
        }
        Ok(Self {
            configured,
            pinned: pinned.into_values().map(|(broker, _)| broker).collect(),
            dynamic: resolved.dynamic.clone(),
            made: Mutex::new(HashMap::new()),
            pools,
        })
    }

    /// A configured tenant, or one made from the dynamic template when enabled.
    pub fn get(&self, name: &str) -> Result<Arc<Tenant>, ApiError> {
        if let Some(tenant) = self.configured.get(name) {
            return Ok(tenant.clone());
        }
        let Some(dynamic) = &self.dynamic else {
            return Err(ApiError::Forbidden(format!(
                "tenant {name:?} is not configured"
            )));
        };
        validate_tenant_id(name)?;
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tenant) = made.get(name) {
            return Ok(tenant.clone());
        }
        if made.len() >= dynamic.max_tenants {
            made.clear();
        }
        let vhost = dynamic.vhost_template.replace("{tenant}", name);
        let tenant = Arc::new(Tenant {
            name: name.to_owned(),
            vhost: vhost.clone(),
            publish: dynamic.publish.clone(),
            subscribe: dynamic.subscribe.clone(),
            quota: Quota::new(&dynamic.limits),
            metrics_label: telemetry::DYNAMIC_TENANT_LABEL.to_owned(),
            pool: Pool::Lazy(PoolKey {
                urls: dynamic.urls.clone(),
                vhost,
            }),
            pools: self.pools.clone(),
            schedule: None,
        });
        made.insert(name.to_owned(), tenant.clone());
        Ok(tenant)
    }

    /// Each pool opened at start, with its scheduled-publish wake-up and the
    /// configured tenants on it.
    pub fn scheduling_pools(&self) -> Vec<(Arc<Broker>, ScheduleWake, Vec<Arc<Tenant>>)> {
        let mut pools: Vec<(Arc<Broker>, ScheduleWake, Vec<Arc<Tenant>>)> = Vec::new();
        for tenant in self.configured.values() {
            let (Pool::Pinned(broker), Some(wake)) = (&tenant.pool, &tenant.schedule) else {
                continue;
            };
            match pools.iter_mut().find(|(b, _, _)| Arc::ptr_eq(b, broker)) {
                Some((_, _, on_it)) => on_it.push(tenant.clone()),
                None => pools.push((broker.clone(), wake.clone(), vec![tenant.clone()])),
            }
        }
        pools
    }

    /// The pools opened at start; readiness follows these.
    pub fn brokers(&self) -> &[Arc<Broker>] {
        &self.pinned
    }

    pub fn dynamic_pools(&self) -> &Pools {
        &self.pools
    }

    pub fn pools_handle(&self) -> &Arc<Pools> {
        &self.pools
    }

    /// Closes every pool, static and dynamic, and waits until their connections are.
    pub async fn close(&self) {
        let pinned = futures::future::join_all(self.pinned.iter().map(|b| b.close()));
        futures::join!(pinned, self.pools.close_all());
    }
}

/// Tenant ids become vhost names: only lower-case letters, digits, `-` and `_`, 1-63
/// characters, starting with a letter or digit — nothing that could reach another vhost.
pub fn validate_tenant_id(name: &str) -> Result<(), ApiError> {
    let bytes = name.as_bytes();
    let valid = (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase() | bytes[0].is_ascii_digit()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "the token's tenant id is not a valid dynamic tenant id ([a-z0-9][a-z0-9_-]{0,62})"
                .to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_cannot_smuggle_vhost_names() {
        for ok in ["acme", "a", "customer-42", "x_y", "0abc"] {
            assert!(validate_tenant_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Acme",
            "-acme",
            "_acme",
            "acme/..",
            "a%2fb",
            "a.b",
            "a b",
            "ä",
            "/",
            &"a".repeat(64),
        ] {
            assert!(validate_tenant_id(bad).is_err(), "{bad:?}");
        }
    }
}
