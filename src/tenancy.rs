//! Tenants: each maps to a vhost, broker credentials and grants. Tenants that share a
//! vhost and credentials share one broker pool.

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::grants::{self, Grant, GrantPattern};
use crate::broker::{Broker, BrokerError};
use crate::config::{AmqpConfig, ResolvedTenant};
use crate::error::ApiError;

pub struct Tenant {
    pub name: String,
    pub vhost: String,
    pub publish: Vec<Grant>,
    pub subscribe: Vec<Grant>,
    pub broker: Arc<Broker>,
}

impl Tenant {
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
        if grants::allows_subscribe(&self.subscribe, exchange, binding_key) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "tenant {:?} may not subscribe to exchange {exchange:?} with binding key {:?}",
                self.name,
                binding_key.as_str()
            )))
        }
    }
}

pub struct Tenants {
    by_name: HashMap<String, Arc<Tenant>>,
    brokers: Vec<Arc<Broker>>,
}

impl Tenants {
    /// Creates one broker pool per distinct (broker URLs, vhost) and starts connecting.
    pub fn start(
        tenants: impl IntoIterator<Item = ResolvedTenant>,
        amqp: &AmqpConfig,
    ) -> Result<Self, BrokerError> {
        let mut pools: HashMap<(Vec<String>, String), Arc<Broker>> = HashMap::new();
        let mut by_name = HashMap::new();
        for t in tenants {
            let key = (t.urls.clone(), t.vhost.clone());
            let broker = match pools.get(&key) {
                Some(broker) => broker.clone(),
                None => {
                    let broker = Broker::start(&t.urls, &t.vhost, amqp)?;
                    pools.insert(key, broker.clone());
                    broker
                }
            };
            by_name.insert(
                t.name.clone(),
                Arc::new(Tenant {
                    name: t.name,
                    vhost: t.vhost,
                    publish: t.publish,
                    subscribe: t.subscribe,
                    broker,
                }),
            );
        }
        Ok(Self {
            by_name,
            brokers: pools.into_values().collect(),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Tenant>> {
        self.by_name.get(name).cloned()
    }

    pub fn brokers(&self) -> &[Arc<Broker>] {
        &self.brokers
    }

    pub fn close(&self) {
        for broker in &self.brokers {
            broker.close();
        }
    }
}
