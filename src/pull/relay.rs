//! Settling a lease held by another replica: the receipt names the replica, and every
//! replica listens on a Redis channel of its own (`<prefix>pull:<replica>`, the Redis
//! of `idempotency.redis_url`, which replicas already share). An ack sent to replica B
//! for a lease of replica A is published on A's channel, A settles it on the broker
//! and answers on B's reply channel; B answers its client then. A replica that does
//! not answer in `pull.relay_timeout_ms` (it died: the broker gave its leases back, or
//! Redis is down) is answered `lease_expired`: the message was or will be redelivered.
//!
//! Why not a lease store in Redis: the broker would have to give up the message (ack
//! it) to Redis, and a Redis without persistence (a cache, as often deployed) would
//! lose it. Leases stay deliveries the broker holds; Redis only carries the request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{Op, Pull, Receipt, Settled};

pub struct RelayConfig {
    /// The Redis of `idempotency.redis_url`.
    pub client: redis::Client,
    /// The idempotency store's key prefix: several deployments on one Redis stay apart.
    pub prefix: String,
    pub timeout: Duration,
}

#[derive(Serialize, Deserialize)]
struct Request {
    id: u64,
    /// The asking replica (hex): where the answer goes.
    from: String,
    lease: String,
    tenant: String,
    queue: String,
    op: Op,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    id: u64,
    settled: Settled,
}

pub struct Relay {
    client: redis::Client,
    publisher: tokio::sync::Mutex<Option<ConnectionManager>>,
    prefix: String,
    replica: String,
    timeout: Duration,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Settled>>>>,
    next: AtomicU64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Relay {
    /// Starts listening for this replica's requests and replies (reconnecting to Redis
    /// by itself) on `tasks` until `stop`.
    pub fn start(
        config: RelayConfig,
        replica: [u8; 16],
        pull: Weak<Pull>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Self {
        let client = config.client;
        let relay = Self {
            client: client.clone(),
            publisher: tokio::sync::Mutex::new(None),
            prefix: config.prefix,
            replica: hex(&replica),
            timeout: config.timeout,
            pending: Arc::default(),
            next: AtomicU64::new(1),
        };
        let listen = Listen {
            client,
            requests: relay.requests_channel(&relay.replica),
            replies: relay.replies_channel(&relay.replica),
            prefix: relay.prefix.clone(),
            pending: relay.pending.clone(),
            pull,
        };
        tasks.spawn(listen.run(stop.clone()));
        relay
    }

    fn requests_channel(&self, replica: &str) -> String {
        format!("{}pull:{replica}", self.prefix)
    }

    fn replies_channel(&self, replica: &str) -> String {
        format!("{}pull-reply:{replica}", self.prefix)
    }

    async fn publish(&self, channel: &str, payload: String) -> Result<i64, redis::RedisError> {
        let mut guard = self.publisher.lock().await;
        if guard.is_none() {
            *guard = Some(ConnectionManager::new(self.client.clone()).await?);
        }
        let Some(conn) = guard.as_mut() else {
            return Ok(0);
        };
        conn.publish(channel, payload).await
    }

    /// Asks the replica that holds `receipt`'s lease to apply `op`.
    pub async fn settle(&self, receipt: Receipt, tenant: &str, queue: &str, op: Op) -> Settled {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let request = Request {
            id,
            from: self.replica.clone(),
            lease: hex(&receipt.lease),
            tenant: tenant.to_owned(),
            queue: queue.to_owned(),
            op,
        };
        let payload = serde_json::to_string(&request).unwrap_or_default();
        let sent = tokio::time::timeout(
            self.timeout,
            self.publish(&self.requests_channel(&hex(&receipt.owner)), payload),
        )
        .await;
        let answered = match sent {
            // Nobody listens there: that replica is gone, and its leases with it.
            Ok(Ok(0)) => None,
            Ok(Ok(_)) => tokio::time::timeout(self.timeout, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Ok(Err(error)) => {
                warn!(%error, "Cannot reach Redis to settle a lease of another replica.");
                None
            }
            Err(_) => None,
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        answered.unwrap_or(Settled::Expired)
    }
}

/// This replica's listener.
struct Listen {
    client: redis::Client,
    requests: String,
    replies: String,
    prefix: String,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Settled>>>>,
    pull: Weak<Pull>,
}

impl Listen {
    async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        loop {
            let listened = tokio::select! {
                listened = this.clone().listen() => listened,
                () = stop.cancelled() => return,
            };
            if let Err(error) = listened {
                debug!(%error, "The lease relay lost Redis; reconnecting.");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn listen(self: Arc<Self>) -> Result<(), redis::RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.requests).await?;
        pubsub.subscribe(&self.replies).await?;
        let mut messages = pubsub.into_on_message();
        let mut publisher: Option<ConnectionManager> = None;
        while let Some(message) = messages.next().await {
            let channel = message.get_channel_name().to_owned();
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            if channel == self.replies {
                if let Ok(reply) = serde_json::from_str::<Reply>(&payload)
                    && let Some(tx) = self
                        .pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&reply.id)
                {
                    let _ = tx.send(reply.settled);
                }
                continue;
            }
            let Ok(request) = serde_json::from_str::<Request>(&payload) else {
                continue;
            };
            if publisher.is_none() {
                publisher = ConnectionManager::new(self.client.clone()).await.ok();
            }
            let (Some(pull), Some(lease), Some(mut out)) = (
                self.pull.upgrade(),
                unhex(&request.lease),
                publisher.clone(),
            ) else {
                continue;
            };
            let reply_to = format!("{}pull-reply:{}", self.prefix, request.from);
            tokio::spawn(async move {
                let settled = pull
                    .settle_relayed(&lease, &request.tenant, &request.queue, request.op)
                    .await;
                let reply = Reply {
                    id: request.id,
                    settled,
                };
                let _: Result<i64, _> = out
                    .publish(reply_to, serde_json::to_string(&reply).unwrap_or_default())
                    .await;
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_ids_round_trip_as_hex() {
        let id = [0xab; 16];
        assert_eq!(unhex(&hex(&id)), Some(id));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(&"g".repeat(32)), None);
    }
}
