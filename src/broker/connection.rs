//! AMQP connections for one vhost: URL failover, TLS, heartbeats, and a watcher that
//! feeds `connection.blocked` and connection errors into the vhost's [`Health`].
//!
//! Connections are multiplexed, so they are shared, never checked out: channel opens,
//! consumers and exchange checks all run on whichever live connection comes next.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::BrokerError;
use super::health::Health;
use crate::config::{AmqpConfig, TlsConfig};

/// Everything needed to open a connection to one vhost.
pub struct Connector {
    uris: Vec<AMQPUri>,
    /// Where the next connection attempt starts, so a dead URL is not retried first forever.
    next: AtomicUsize,
    tls: OwnedTLSConfig,
    connect_timeout: Duration,
    connection_name: String,
    health: Arc<Health>,
    /// The set new connections join; a connection's death only takes the link down
    /// when none of its siblings is alive (a late error from a replaced connection
    /// must not mark a healthy link down).
    connections: Arc<Connections>,
    /// The broker's tasks and its close signal: connection watchers run on these.
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Connector {
    pub fn new(
        urls: &[String],
        vhost: &str,
        amqp: &AmqpConfig,
        health: Arc<Health>,
        connections: Arc<Connections>,
        (tasks, stop): (TaskTracker, CancellationToken),
    ) -> Result<Self, BrokerError> {
        let uris = urls
            .iter()
            .map(|url| vhost_uri(url, vhost, amqp))
            .collect::<Result<Vec<_>, BrokerError>>()?;
        Ok(Self {
            uris,
            next: AtomicUsize::new(0),
            tls: tls_config(&amqp.tls)?,
            connect_timeout: Duration::from_millis(amqp.connect_timeout_ms),
            connection_name: format!("warren vhost={vhost}"),
            health,
            connections,
            tasks,
            stop,
        })
    }

    async fn connect_one(&self, uri: &AMQPUri) -> Result<Connection, BrokerError> {
        let runtime = lapin::runtime::default_runtime().map_err(BrokerError::Amqp)?;
        let props = ConnectionProperties::default()
            .with_connection_name(self.connection_name.clone().into());
        let connect =
            Connection::connect_uri_with_config(uri.clone(), props, self.tls.clone(), runtime);
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(result) => result.map_err(BrokerError::Amqp),
            Err(_) => Err(BrokerError::Timeout("connecting to the broker")),
        }
    }

    fn watch(&self, connection: &Connection) {
        let events = connection.events_listener();
        let mut events = Box::pin(events);
        let health = self.health.clone();
        let siblings = Arc::downgrade(&self.connections);
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    () = stop.cancelled() => return,
                };
                let Some(event) = event else { return };
                match event {
                    Event::ConnectionBlocked(reason) => {
                        warn!(vhost = %health.vhost(), %reason, "Broker blocked the connection.");
                        health.set_blocked(Some(reason));
                    }
                    Event::ConnectionUnblocked => {
                        info!(vhost = %health.vhost(), "Broker unblocked the connection.");
                        health.set_blocked(None);
                    }
                    // A channel-level (soft) error closes one channel, which the pool
                    // replaces; only a connection-level error takes the link down.
                    Event::Error(error) if error.is_amqp_soft_error() => {}
                    Event::Error(error) => {
                        let alive = siblings.upgrade().map_or(0, |c| c.len());
                        if alive == 0 {
                            health.mark_down(&format!("connection lost: {error}"));
                        } else {
                            health.kick.notify_one(); // re-probe: replace the lost one
                        }
                        break;
                    }
                    _ => {}
                }
            }
        });
    }
}

impl Connector {
    /// Opens one connection, trying each URL in turn from where the last success was.
    pub async fn connect(&self) -> Result<Connection, BrokerError> {
        let start = self.next.load(Ordering::Relaxed);
        let mut last_error = BrokerError::Config("no broker URL configured".to_owned());
        for offset in 0..self.uris.len() {
            let index = (start + offset) % self.uris.len();
            let uri = &self.uris[index];
            match self.connect_one(uri).await {
                Ok(connection) => {
                    self.next.store(index, Ordering::Relaxed);
                    self.watch(&connection);
                    info!(
                        vhost = %self.health.vhost(),
                        host = %uri.authority.host,
                        port = uri.authority.port,
                        "Connected to the broker."
                    );
                    return Ok(connection);
                }
                Err(error) => {
                    warn!(
                        vhost = %self.health.vhost(),
                        host = %uri.authority.host,
                        port = uri.authority.port,
                        %error,
                        "Broker connection attempt failed."
                    );
                    last_error = error;
                }
            }
        }
        self.next
            .store((start + 1) % self.uris.len(), Ordering::Relaxed);
        Err(last_error)
    }
}

/// The live connections of one vhost, filled and pruned by the broker's supervisor.
pub struct Connections {
    live: RwLock<Vec<Arc<Connection>>>,
    next: AtomicUsize,
    pub target: usize,
}

impl Connections {
    pub fn new(target: usize) -> Self {
        Self {
            live: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            target,
        }
    }

    /// The next connected connection, round robin; `None` when none is up.
    pub fn pick(&self) -> Option<Arc<Connection>> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let n = live.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &live[(start + i) % n])
            .find(|c| c.status().connected())
            .cloned()
    }

    /// Drops closed connections; returns how many connected ones remain.
    pub fn prune(&self) -> usize {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        live.retain(|c| c.status().connected());
        live.len()
    }

    pub fn add(&self, connection: Connection) {
        self.live
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(connection));
    }

    pub fn len(&self) -> usize {
        self.live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|c| c.status().connected())
            .count()
    }

    /// Takes every connection out (for closing them).
    pub fn drain(&self) -> Vec<Arc<Connection>> {
        std::mem::take(&mut *self.live.write().unwrap_or_else(|e| e.into_inner()))
    }
}

fn tls_config(tls: &TlsConfig) -> Result<OwnedTLSConfig, BrokerError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| BrokerError::Config(format!("cannot read {}: {e}", path.display())))
    };
    let cert_chain = match &tls.ca_file {
        Some(path) => Some(
            String::from_utf8(read(path)?)
                .map_err(|_| BrokerError::Config(format!("{} is not PEM", path.display())))?,
        ),
        None => None,
    };
    let identity = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read(cert)?,
            key: read(key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// `url` pointed at `vhost`, with the configured heartbeat and connect timeout.
fn vhost_uri(url: &str, vhost: &str, amqp: &AmqpConfig) -> Result<AMQPUri, BrokerError> {
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|e| BrokerError::Config(format!("invalid AMQP URL: {e}")))?;
    uri.vhost = vhost.to_owned();
    uri.query.heartbeat = Some(amqp.heartbeat_s);
    uri.query.connection_timeout = Some(amqp.connect_timeout_ms);
    Ok(uri)
}

/// One connection to `vhost` outside any pool (the topology commands and
/// `topology.apply_on_start` use it and close it): each URL in turn, same TLS and
/// timeouts as the pools.
pub async fn connect_once(
    urls: &[String],
    vhost: &str,
    amqp: &AmqpConfig,
) -> Result<Connection, BrokerError> {
    let tls = tls_config(&amqp.tls)?;
    let mut last_error = BrokerError::Config("no broker URL configured".to_owned());
    for url in urls {
        let uri = vhost_uri(url, vhost, amqp)?;
        let runtime = lapin::runtime::default_runtime().map_err(BrokerError::Amqp)?;
        let props = ConnectionProperties::default()
            .with_connection_name(format!("warren topology vhost={vhost}").into());
        let connect = Connection::connect_uri_with_config(uri, props, tls.clone(), runtime);
        match tokio::time::timeout(Duration::from_millis(amqp.connect_timeout_ms), connect).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(e)) => last_error = BrokerError::Amqp(e),
            Err(_) => last_error = BrokerError::Timeout("connecting to the broker"),
        }
    }
    Err(last_error)
}
