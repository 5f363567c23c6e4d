//! The exchange cache: what a probe on a throwaway channel found about an exchange,
//! trusted for `amqp.exchange_cache_ttl_s`, at most `amqp.exchange_cache_max_entries`
//! of them. The broker answers a publish to a missing exchange, to an `internal` one,
//! or to one the gateway's credentials may not write by closing the channel (and with
//! it every confirm pending there, of every tenant on the pool); the probe finds out
//! on a channel of its own, so those cost a cached lookup instead of a pooled channel.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ErrorKind, ExchangeKind};

use super::{Broker, BrokerError, OutgoingMessage, PublishError, PublishResult, publish};

/// What the probe found about one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Exists and takes publishes from the gateway.
    Publishable,
    /// Exists but is `internal`: only exchange-to-exchange bindings feed it.
    Internal,
    /// Exists but the gateway's credentials may not write to it.
    NotWritable,
}

impl Verdict {
    fn check(self, exchange: &str) -> Result<(), PublishError> {
        match self {
            Self::Publishable => Ok(()),
            Self::Internal => Err(PublishError::Refused(format!(
                "exchange {exchange:?} is internal: it takes messages only from exchanges bound to it, so publish to one of those"
            ))),
            Self::NotWritable => Err(PublishError::AccessRefused(format!(
                "no write permission on exchange {exchange:?} (probe)"
            ))),
        }
    }
}

/// Exchanges probed, with when and what was found.
pub(super) struct ExchangeCache {
    ttl: Duration,
    max_entries: usize,
    checked: Mutex<HashMap<String, (Instant, Verdict)>>,
}

impl ExchangeCache {
    pub(super) fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            checked: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Verdict)>> {
        self.checked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What was found within the TTL, if anything.
    fn fresh(&self, exchange: &str) -> Option<Verdict> {
        self.lock()
            .get(exchange)
            .filter(|(checked, _)| checked.elapsed() < self.ttl)
            .map(|(_, verdict)| *verdict)
    }

    /// Records a probe; when full, expired entries go first, then all.
    fn insert(&self, exchange: &str, verdict: Verdict) {
        let mut cache = self.lock();
        if cache.len() >= self.max_entries {
            let ttl = self.ttl;
            cache.retain(|_, (checked, _)| checked.elapsed() < ttl);
            if cache.len() >= self.max_entries {
                cache.clear();
            }
        }
        cache.insert(exchange.to_owned(), (Instant::now(), verdict));
    }

    /// Forgets an exchange the broker said is gone.
    pub(super) fn forget(&self, exchange: &str) {
        self.lock().remove(exchange);
    }
}

impl Broker {
    /// Refuses, before they reach a pooled channel, the messages the broker would
    /// answer by closing it: each message's own properties ([`publish::refusal`]) and
    /// its exchange ([`Broker::ensure_exchange`]).
    pub(super) async fn check_messages(
        &self,
        messages: &[OutgoingMessage],
        results: &mut [Option<PublishResult>],
    ) {
        let mut checked: HashMap<&str, Result<(), PublishError>> = HashMap::new();
        for (index, message) in messages.iter().enumerate() {
            if let Some(refused) = publish::refusal(message, self.max_message_bytes) {
                results[index] = Some(Err(refused));
                continue;
            }
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

    /// Makes sure one exchange takes publishes from the gateway: it exists, is not
    /// `internal`, and the gateway's credentials may write to it.
    ///
    /// The probe, on a throwaway channel: a passive declare (does it exist), then, in a
    /// transaction, an empty publish that is rolled back. RabbitMQ checks the write
    /// permission and the internal flag when the publish arrives and only routes it
    /// into the transaction's buffer, which the rollback empties: nothing is delivered.
    /// A refusal closes only the probe's channel. The default exchange always takes
    /// publishes.
    pub async fn ensure_exchange(&self, exchange: &str) -> Result<(), PublishError> {
        if exchange.is_empty() {
            return Ok(());
        }
        if let Some(verdict) = self.exchanges.fresh(exchange) {
            return verdict.check(exchange);
        }
        let check = async {
            let connection = self.connections.pick().ok_or(BrokerError::NotConnected)?;
            let channel = connection.create_channel().await?;
            drop(connection);
            channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            channel.tx_select().await?;
            let probe = channel
                .basic_publish(
                    exchange.into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    b"",
                    BasicProperties::default(),
                )
                .await;
            let verdict = match probe {
                Ok(_) => match channel.tx_rollback().await {
                    Ok(()) => Verdict::Publishable,
                    Err(error) => refused_verdict(&error)?,
                },
                Err(error) => refused_verdict(&error)?,
            };
            if verdict == Verdict::Publishable {
                self.tasks.spawn(async move {
                    let _ = channel.close(200, "OK".into()).await;
                });
            }
            Ok::<_, BrokerError>(verdict)
        };
        match tokio::time::timeout(self.confirm_timeout, check).await {
            Ok(Ok(verdict)) => {
                self.exchanges.insert(exchange, verdict);
                verdict.check(exchange)
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

/// What an ACCESS_REFUSED close of the probe's publish means; any other error is the
/// probe's failure, not a verdict. RabbitMQ checks the write permission before the
/// internal flag, and says which in its reply text (read only to pick the verdict,
/// never shown).
fn refused_verdict(error: &lapin::Error) -> Result<Verdict, BrokerError> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) if amqp.get_id() == 403 => {
            let internal = amqp
                .get_message()
                .as_str()
                .contains("cannot publish to internal exchange");
            Ok(if internal {
                Verdict::Internal
            } else {
                Verdict::NotWritable
            })
        }
        _ => Err(BrokerError::Amqp(error.clone())),
    }
}
