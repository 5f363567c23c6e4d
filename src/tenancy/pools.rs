//! Lazily opened broker pools for dynamic tenants: one per vhost, opened on first use,
//! closed when idle for `dynamic_tenants.pool_idle_s`, at most `max_pools` at once.
//! Opening one never holds up other tenants: the registry lock covers map updates only.
//! Pools closed while running (idle, evicted) close on a task tracker of their own, so
//! [`Pools::close_all`] at shutdown waits for those closes too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::broker::{Broker, BrokerLease};
use crate::config::AmqpConfig;
use crate::error::ApiError;
use crate::telemetry;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub urls: Vec<String>,
    pub vhost: String,
}

struct Entry {
    broker: Arc<Broker>,
    last_used: Instant,
}

pub struct Pools {
    amqp: AmqpConfig,
    max: usize,
    idle: Duration,
    open: Mutex<HashMap<PoolKey, Entry>>,
    opened: std::sync::atomic::AtomicU64,
    /// Closes of pools taken out of `open` while running.
    closing: TaskTracker,
}

impl Pools {
    pub fn new(amqp: &AmqpConfig, max: usize, idle: Duration) -> Self {
        Self {
            amqp: amqp.clone(),
            max,
            idle,
            open: Mutex::new(HashMap::new()),
            opened: std::sync::atomic::AtomicU64::new(0),
            closing: TaskTracker::new(),
        }
    }

    /// Closes `broker` in the background (never under the registry lock); shutdown
    /// awaits it in [`Pools::close_all`].
    fn close_later(&self, broker: Arc<Broker>) {
        self.closing.spawn(async move { broker.close().await });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Entry>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool for `key`, opened if needed; a fresh pool is waited for (at most the
    /// connect timeout, for its connection and first channel) so the first request
    /// does not fail while it connects.
    /// The lease is taken under the registry lock, so the idle closer cannot close the
    /// pool between lookup and use.
    pub async fn get(&self, key: &PoolKey) -> Result<BrokerLease, ApiError> {
        let (broker, fresh) = {
            let mut open = self.lock();
            if let Some(entry) = open.get_mut(key) {
                entry.last_used = Instant::now();
                (BrokerLease::new(entry.broker.clone()), false)
            } else {
                if open.len() >= self.max && !self.evict_lru(&mut open) {
                    return Err(ApiError::BrokerUnavailable {
                        detail: format!(
                            "all {} dynamic tenant pools are busy (dynamic_tenants.max_pools)",
                            self.max
                        ),
                        retry_after: Duration::from_secs(1),
                    });
                }
                let broker = Broker::start(&key.urls, &key.vhost, &self.amqp, false)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                open.insert(
                    key.clone(),
                    Entry {
                        broker: broker.clone(),
                        last_used: Instant::now(),
                    },
                );
                counter!(telemetry::AMQP_POOLS_OPENED).increment(1);
                self.opened
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                gauge!(telemetry::AMQP_POOLS).set(open.len() as f64);
                (BrokerLease::new(broker), true)
            }
        };
        if fresh {
            let timeout = Duration::from_millis(self.amqp.connect_timeout_ms);
            broker.warm_up(timeout).await;
        }
        Ok(broker)
    }

    /// Closes pools idle for longer than the idle time. Called periodically.
    pub fn close_idle(&self) {
        let mut open = self.lock();
        let idle = self.idle;
        let before = open.len();
        open.retain(|key, entry| {
            let keep = entry.last_used.elapsed() < idle || !entry.broker.is_idle();
            if !keep {
                info!(vhost = %key.vhost, "Closing an idle dynamic tenant pool.");
                self.close_later(entry.broker.clone());
            }
            keep
        });
        let closed = before - open.len();
        if closed > 0 {
            counter!(telemetry::AMQP_POOLS_CLOSED).increment(closed as u64);
        }
        gauge!(telemetry::AMQP_POOLS).set(open.len() as f64);
    }

    /// Pools opened since start (each open of a closed pool counts again).
    pub fn opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every open pool and waits until they, and any pool closed earlier, are.
    pub async fn close_all(&self) {
        let open: Vec<Entry> = self.lock().drain().map(|(_, entry)| entry).collect();
        for entry in open {
            self.close_later(entry.broker);
        }
        self.closing.close();
        self.closing.wait().await;
    }

    /// Closes the least recently used idle pool; `false` if every pool is busy.
    fn evict_lru(&self, open: &mut HashMap<PoolKey, Entry>) -> bool {
        let victim = open
            .iter()
            .filter(|(_, e)| e.broker.is_idle())
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone());
        match victim.and_then(|key| open.remove(&key)) {
            Some(entry) => {
                self.close_later(entry.broker);
                counter!(telemetry::AMQP_POOLS_CLOSED).increment(1);
                true
            }
            None => false,
        }
    }
}
