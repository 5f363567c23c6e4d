//! `[amqp]`: broker URLs (inline, several, or from a file), pool sizes, timeouts and
//! TLS to the broker, each checked here.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::check::{all_positive, check_url, read_file};
use super::{ConfigError, DEFAULT_BROKER_URL};

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
    /// The largest message body the broker accepts: RabbitMQ's `max_message_size`
    /// (128 MiB by default). A larger one is refused with 413 before it is published,
    /// because the broker answers it by closing the channel, which fails every publish
    /// in flight on it. Set it to the broker's value when that is lower.
    pub max_message_bytes: usize,
    /// The largest message body Warren takes from the broker for a subscriber
    /// (WebSocket, server-sent events, push, pull). A larger one, which any AMQP
    /// producer can send, is read off the connection and dropped as it arrives, never
    /// held in memory: a live or stream subscriber skips it, a durable or queue one
    /// rejects it without requeue (dead-lettered when the queue has a DLX), and
    /// `warren_poison_messages_total{reason="body_too_large"}` counts it.
    pub max_delivery_bytes: usize,
    pub tls: TlsConfig,
}

/// RabbitMQ's default `max_message_size` (3.8 and later).
pub const RABBITMQ_MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;
/// The highest `max_message_size` RabbitMQ accepts.
const RABBITMQ_MAX_MESSAGE_BYTES_CEILING: usize = 512 * 1024 * 1024;

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
            reconnect_backoff_min_ms: 500,
            reconnect_backoff_max_ms: 1_200,
            exchange_cache_ttl_s: 30,
            exchange_cache_max_entries: 10_000,
            max_consumer_channels: 1024,
            max_message_bytes: RABBITMQ_MAX_MESSAGE_BYTES,
            max_delivery_bytes: 16 * 1024 * 1024,
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

impl AmqpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("amqp.confirm_timeout_ms", self.confirm_timeout_ms),
            ("amqp.connect_timeout_ms", self.connect_timeout_ms),
            ("amqp.acquire_timeout_ms", self.acquire_timeout_ms),
            (
                "amqp.connections_per_vhost",
                self.connections_per_vhost as u64,
            ),
            ("amqp.channels_per_vhost", self.channels_per_vhost as u64),
            (
                "amqp.max_inflight_confirms",
                self.max_inflight_confirms as u64,
            ),
            (
                "amqp.exchange_cache_max_entries",
                self.exchange_cache_max_entries as u64,
            ),
            (
                "amqp.reconnect_backoff_min_ms",
                self.reconnect_backoff_min_ms,
            ),
            (
                "amqp.max_consumer_channels",
                self.max_consumer_channels as u64,
            ),
            ("amqp.max_message_bytes", self.max_message_bytes as u64),
            ("amqp.max_delivery_bytes", self.max_delivery_bytes as u64),
        ])?;
        if self.max_message_bytes > RABBITMQ_MAX_MESSAGE_BYTES_CEILING {
            return Err(ConfigError::invalid(
                "amqp.max_message_bytes",
                "must be at most 536870912 (512 MiB, the most RabbitMQ's max_message_size allows)",
            ));
        }
        // RabbitMQ's default channel_max is 2047 per connection; leave the publish pool
        // room on every connection whatever the consumers take.
        if self.max_consumer_channels + self.channels_per_vhost > self.connections_per_vhost * 2000
        {
            return Err(ConfigError::invalid(
                "amqp.max_consumer_channels",
                "with amqp.channels_per_vhost must fit in amqp.connections_per_vhost x 2000 channels",
            ));
        }
        if self.reconnect_backoff_max_ms < self.reconnect_backoff_min_ms {
            return Err(ConfigError::invalid(
                "amqp.reconnect_backoff_max_ms",
                "must not be below amqp.reconnect_backoff_min_ms",
            ));
        }
        let tls = &self.tls;
        if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
            return Err(ConfigError::invalid(
                "amqp.tls.client_key_file",
                "client_cert_file and client_key_file must be set together",
            ));
        }
        for (key, file) in [
            ("amqp.tls.ca_file", &tls.ca_file),
            ("amqp.tls.client_cert_file", &tls.client_cert_file),
            ("amqp.tls.client_key_file", &tls.client_key_file),
        ] {
            if let Some(path) = file {
                read_file(key, path)?;
            }
        }
        Ok(())
    }

    /// The shared broker URLs: `url`, `urls` or the content of `url_file` (only one of
    /// them), else the local default.
    pub(super) fn broker_urls(&self) -> Result<Vec<String>, ConfigError> {
        let set = [
            self.url.is_some(),
            !self.urls.is_empty(),
            self.url_file.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if set > 1 {
            return Err(ConfigError::invalid(
                "amqp.url",
                "set only one of amqp.url, amqp.urls and amqp.url_file",
            ));
        }
        if let Some(url) = &self.url {
            return Ok(vec![check_url("amqp.url", url)?]);
        }
        if let Some(path) = &self.url_file {
            // One URL, or several (a cluster's nodes) separated by whitespace or commas.
            let text = read_file("amqp.url_file", path)?;
            let urls: Vec<String> = text
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|url| !url.is_empty())
                .map(|url| check_url("amqp.url_file", url))
                .collect::<Result<_, _>>()?;
            if urls.is_empty() {
                return Err(ConfigError::invalid("amqp.url_file", "holds no URL"));
            }
            return Ok(urls);
        }
        if self.urls.is_empty() {
            return Ok(vec![DEFAULT_BROKER_URL.to_owned()]);
        }
        self.urls
            .iter()
            .enumerate()
            .map(|(i, url)| check_url(&format!("amqp.urls[{i}]"), url))
            .collect()
    }
}
