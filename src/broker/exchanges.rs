//! The exchange cache: exchanges known to exist (checked with a passive declare on a
//! throwaway channel) for `amqp.exchange_cache_ttl_s`, at most
//! `amqp.exchange_cache_max_entries` of them, so a typo costs a cached lookup rather
//! than a pooled channel.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::ExchangeKind;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;

use super::{Broker, BrokerError, OutgoingMessage, PublishError, PublishResult, publish};

/// Exchanges seen to exist, with when they were checked.
pub(super) struct ExchangeCache {
    ttl: Duration,
    max_entries: usize,
    checked: Mutex<HashMap<String, Instant>>,
}

impl ExchangeCache {
    pub(super) fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            checked: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.checked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checked within the TTL.
    fn is_fresh(&self, exchange: &str) -> bool {
        self.lock()
            .get(exchange)
            .is_some_and(|checked| checked.elapsed() < self.ttl)
    }

    /// Records a successful check; when full, expired entries go first, then all.
    fn insert(&self, exchange: &str) {
        let mut cache = self.lock();
        if cache.len() >= self.max_entries {
            let ttl = self.ttl;
            cache.retain(|_, checked| checked.elapsed() < ttl);
            if cache.len() >= self.max_entries {
                cache.clear();
            }
        }
        cache.insert(exchange.to_owned(), Instant::now());
    }

    /// Forgets an exchange the broker said is gone.
    pub(super) fn forget(&self, exchange: &str) {
        self.lock().remove(exchange);
    }
}

impl Broker {
    /// Makes sure each exchange exists before publishing, so a typo costs a cached
    /// lookup rather than a channel (the broker closes a channel on a missing exchange,
    /// failing every confirm pending on it).
    pub(super) async fn check_exchanges(
        &self,
        messages: &[OutgoingMessage],
        results: &mut [Option<PublishResult>],
    ) {
        let mut checked: HashMap<&str, Result<(), PublishError>> = HashMap::new();
        for (index, message) in messages.iter().enumerate() {
            let exchange = message.exchange.as_str();
            if !checked.contains_key(exchange) {
                let outcome = self.ensure_exchange(exchange).await;
                checked.insert(exchange, outcome);
            }
            if let Some(Err(error)) = checked.get(exchange) {
                results[index] = Some(Err(error.clone()));
            }
        }
    }

    /// Makes sure one exchange exists (as [`Broker::check_exchanges`] for one message).
    pub(super) async fn ensure_exchange(&self, exchange: &str) -> Result<(), PublishError> {
        if exchange.is_empty() {
            return Ok(()); // the default exchange always exists
        }
        if self.exchanges.is_fresh(exchange) {
            return Ok(());
        }
        let check = async {
            let connection = self.connections.pick().ok_or(BrokerError::NotConnected)?;
            let channel = connection.create_channel().await?;
            drop(connection);
            let declared = channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if declared.is_ok() {
                self.tasks.spawn(async move {
                    let _ = channel.close(200, "OK".into()).await;
                });
            }
            declared.map_err(BrokerError::Amqp)
        };
        match tokio::time::timeout(self.confirm_timeout, check).await {
            Ok(Ok(())) => {
                self.exchanges.insert(exchange);
                Ok(())
            }
            Ok(Err(BrokerError::Amqp(error))) if publish::is_not_found(&error) => {
                Err(PublishError::ExchangeNotFound(exchange.to_owned()))
            }
            Ok(Err(BrokerError::Amqp(error))) => Err(self.failure(&error, exchange)),
            Ok(Err(error)) => Err(self.acquire_failed(&error)),
            Err(_) => Err(PublishError::unavailable(
                "the broker did not answer an exchange check in time",
                Duration::from_secs(1),
            )),
        }
    }
}
