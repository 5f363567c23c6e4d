//! Pull consume over HTTP with leases (SPEC §14). A receive takes messages from a queue
//! on this replica and leases them: each stays an unacknowledged delivery on the
//! queue's channel here (the broker keeps it: if this replica dies the broker gives it
//! back to the queue) until it is acked, nacked, or its lease runs out. The client gets
//! a receipt per message (`receipt.rs`) naming this replica and the lease; an ack, nack
//! or extend sent to any replica reaches the lease: here directly, elsewhere through
//! the relay (`relay.rs`, over the Redis the gateway already shares for idempotency
//! keys). A lease that runs out moves the message back to its queue (republished with
//! one more expired lease counted, then acked), so the next receive gets it.
//!
//! Bounds: leases per tenant and per queue, leased bytes per tenant (429 past them),
//! receipts per call, lease lengths, the total age of a lease (below the broker's
//! `consumer_timeout`).

mod puller;
pub mod receipt;
pub mod relay;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::config::{PullConfig, RetryPolicy};
use crate::error::ApiError;
use crate::telemetry;
use crate::tenancy::Tenant;
use crate::topology::retry::{self, Retained};
use puller::Puller;
pub use receipt::{Receipt, ReceiptKey};

/// The header that counts a message's leases that ran out.
pub const LEASES_HEADER: &str = "x-warren-leases";
/// Most receipts in one ack, nack or extend call.
pub const MAX_RECEIPTS: usize = 100;
/// Most messages one receive may ask for, and the longest long poll (SPEC §14).
pub const MAX_MESSAGES: usize = 100;
pub const MAX_WAIT_MS: u64 = 20_000;
/// Leased bytes one tenant may hold on this replica (bodies kept for a retry or an
/// expiry). Together with `pull.max_leased_per_tenant` this bounds the memory.
const MAX_LEASED_BYTES_PER_TENANT: usize = 64 * 1024 * 1024;
/// Settled leases remembered (so that a repeated ack is harmless), at most.
const MAX_SETTLED: usize = 100_000;

/// A message a receive leased, for the edge to render.
pub struct Leased {
    pub receipt: String,
    pub expires_at: SystemTime,
    /// How many times the message has been received, this time included (leases that
    /// ran out count; `redelivered` also says the broker delivered it before).
    pub attempt: u32,
    pub delivery: Delivery,
}

/// What to do with a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Op {
    Ack,
    Nack { requeue: bool },
    Extend { lease_ms: u64 },
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Nack { .. } => "nack",
            Self::Extend { .. } => "extend",
        }
    }
}

/// How one receipt's operation ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Settled {
    Done {
        /// After an extend: the new end of the lease (Unix milliseconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease_expires_ms: Option<u64>,
    },
    /// The lease ran out (or its replica or channel is gone): the message was or will
    /// be delivered again.
    Expired,
    /// Not a receipt of this tenant's queue (forged, edited, another queue's).
    Invalid,
    /// The broker did not take the operation; the lease is gone (redelivered).
    Failed,
}

impl Settled {
    fn label(&self) -> &'static str {
        match self {
            Self::Done { .. } => "done",
            Self::Expired => "expired",
            Self::Invalid => "invalid",
            Self::Failed => "failed",
        }
    }
}

struct Lease {
    tenant: String,
    /// The tenant's `tenant` metric label.
    label: String,
    queue: String,
    puller: Arc<Puller>,
    generation: u64,
    tag: u64,
    expires: Instant,
    born: Instant,
    message: Retained,
    retry: Option<RetryPolicy>,
    size: usize,
}

#[derive(Default)]
struct Book {
    leases: HashMap<[u8; 16], Lease>,
    per_tenant: HashMap<String, (usize, usize)>,
    per_queue: HashMap<(String, String), usize>,
    /// Leases settled lately: an ack repeated after an ack is harmless.
    settled: HashMap<[u8; 16], (Instant, bool)>,
}

impl Book {
    fn insert(&mut self, id: [u8; 16], lease: Lease) {
        let share = self.per_tenant.entry(lease.tenant.clone()).or_default();
        share.0 += 1;
        share.1 += lease.size;
        *self
            .per_queue
            .entry((lease.tenant.clone(), lease.queue.clone()))
            .or_default() += 1;
        self.leases.insert(id, lease);
    }

    fn remove(&mut self, id: &[u8; 16], acked: bool) -> Option<Lease> {
        let lease = self.leases.remove(id)?;
        if let Some(share) = self.per_tenant.get_mut(&lease.tenant) {
            share.0 = share.0.saturating_sub(1);
            share.1 = share.1.saturating_sub(lease.size);
            if share.0 == 0 {
                self.per_tenant.remove(&lease.tenant);
            }
        }
        let key = (lease.tenant.clone(), lease.queue.clone());
        if let Some(n) = self.per_queue.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_queue.remove(&key);
            }
        }
        if self.settled.len() >= MAX_SETTLED {
            let oldest = self
                .settled
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.settled.remove(&k);
            }
        }
        self.settled.insert(*id, (Instant::now(), acked));
        Some(lease)
    }
}

pub struct Pull {
    config: PullConfig,
    key: ReceiptKey,
    /// This replica's id in receipts (random at each start: a restarted replica holds
    /// no lease of its previous life).
    pub replica: [u8; 16],
    pullers: Mutex<HashMap<(String, String), Arc<Puller>>>,
    book: Mutex<Book>,
    relay: Option<relay::Relay>,
}

/// A receive's leases until the edge answers: dropped before [`Receiving::commit`]
/// (the client went away mid-poll), they go straight back to the queue.
pub struct Receiving<'a> {
    pull: &'a Arc<Pull>,
    leased: Vec<Leased>,
    ids: Vec<[u8; 16]>,
}

impl Receiving<'_> {
    pub fn commit(mut self) -> Vec<Leased> {
        self.ids.clear();
        std::mem::take(&mut self.leased)
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.ids);
        let pull = self.pull.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                for id in ids {
                    pull.settle_local(&id, Op::Nack { requeue: true }).await;
                }
            });
        }
    }
}

impl Pull {
    pub fn new(
        config: PullConfig,
        key: ReceiptKey,
        relay: Option<relay::RelayConfig>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Arc<Self> {
        let replica: [u8; 16] = rand::random();
        let pull = Arc::new_cyclic(|weak: &std::sync::Weak<Self>| Self {
            config,
            key,
            replica,
            pullers: Mutex::default(),
            book: Mutex::default(),
            relay: relay.map(|r| relay::Relay::start(r, replica, weak.clone(), tasks, stop)),
        });
        tasks.spawn(expire(Arc::downgrade(&pull), stop.clone()));
        pull
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &PullConfig {
        &self.config
    }

    /// Leases held on this replica right now.
    pub fn leased(&self) -> usize {
        self.book().leases.len()
    }

    fn puller(&self, tenant: &Arc<Tenant>, queue: &str) -> Arc<Puller> {
        let mut pullers = self.pullers.lock().unwrap_or_else(|e| e.into_inner());
        pullers
            .entry((tenant.name.clone(), queue.to_owned()))
            .or_insert_with(|| Arc::new(Puller::new(tenant.clone(), queue.to_owned())))
            .clone()
    }

    /// Up to `max` messages of `queue`, leased for `lease`; waits up to `wait` for the
    /// first when none is there. Grants, scope and bounds are the caller's to check.
    pub async fn receive<'a>(
        self: &'a Arc<Self>,
        tenant: &Arc<Tenant>,
        queue: &str,
        max: usize,
        wait: Duration,
        lease: Duration,
        retry: Option<RetryPolicy>,
    ) -> Result<Receiving<'a>, ApiError> {
        let room = {
            let book = self.book();
            let (held, bytes) = book.per_tenant.get(&tenant.name).copied().unwrap_or((0, 0));
            let in_queue = book
                .per_queue
                .get(&(tenant.name.clone(), queue.to_owned()))
                .copied()
                .unwrap_or(0);
            if bytes >= MAX_LEASED_BYTES_PER_TENANT {
                0
            } else {
                self.config
                    .max_leased_per_tenant
                    .saturating_sub(held)
                    .min(self.config.max_leased_per_queue.saturating_sub(in_queue))
            }
        };
        if room == 0 {
            return Err(ApiError::RateLimited {
                detail: format!(
                    "the tenant holds as many leased messages as it may (pull.max_leased_per_tenant {}, pull.max_leased_per_queue {}); ack or nack some first",
                    self.config.max_leased_per_tenant, self.config.max_leased_per_queue
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        let max = max.min(room);
        let puller = self.puller(tenant, queue);
        let mut got = puller.get(max).await?;
        if got.is_empty() && !wait.is_zero() {
            let deadline = tokio::time::Instant::now() + wait;
            if let Some(first) = puller.wait_one(deadline).await? {
                got.push(first);
                if max > 1 {
                    got.extend(puller.get(max - 1).await.unwrap_or_default());
                }
            }
        }
        let mut receiving = Receiving {
            pull: self,
            leased: Vec::with_capacity(got.len()),
            ids: Vec::with_capacity(got.len()),
        };
        for (delivery, generation) in got {
            // Poison (headers, or a body over amqp.max_delivery_bytes): counted and
            // rejected, to the DLX when the queue has one.
            if !crate::broker::poison::admit_durable(&delivery).await {
                continue;
            }
            let id: [u8; 16] = rand::random();
            let now = Instant::now();
            let attempt = leases_of(&delivery.properties).saturating_add(1);
            let size = delivery.data.len();
            self.book().insert(
                id,
                Lease {
                    tenant: tenant.name.clone(),
                    label: tenant.metrics_label.clone(),
                    queue: queue.to_owned(),
                    puller: puller.clone(),
                    generation,
                    tag: delivery.delivery_tag,
                    expires: now + lease,
                    born: now,
                    message: Retained {
                        body: bytes::Bytes::from(delivery.data.clone()),
                        properties: delivery.properties.clone(),
                    },
                    retry: retry.clone(),
                    size,
                },
            );
            let receipt = self.key.seal(
                &tenant.name,
                queue,
                &Receipt {
                    owner: self.replica,
                    lease: id,
                },
            );
            receiving.ids.push(id);
            receiving.leased.push(Leased {
                receipt,
                expires_at: SystemTime::now() + lease,
                attempt,
                delivery,
            });
        }
        telemetry::pull_received(&tenant.metrics_label, receiving.leased.len());
        Ok(receiving)
    }

    /// Applies `op` to each receipt of `tenant`'s `queue`, wherever its lease is held.
    pub async fn settle(
        &self,
        tenant: &Tenant,
        queue: &str,
        receipts: &[String],
        op: Op,
    ) -> Vec<Settled> {
        let mut out = Vec::with_capacity(receipts.len());
        for text in receipts {
            let settled = match self.key.open(&tenant.name, queue, text) {
                None => Settled::Invalid,
                Some(r) if r.owner == self.replica => self.settle_local(&r.lease, op).await,
                Some(r) => match &self.relay {
                    Some(relay) => relay.settle(r, &tenant.name, queue, op).await,
                    // No shared store: only this replica's leases can be reached, and
                    // this one is not (a replica that restarted, or another one).
                    None => Settled::Expired,
                },
            };
            telemetry::pull_settled(&tenant.metrics_label, op.label(), settled.label());
            out.push(settled);
        }
        out
    }

    /// `op` on a lease this replica holds, asked by another replica for `tenant`'s
    /// `queue` (which the receipt it checked was sealed for).
    pub async fn settle_relayed(
        &self,
        id: &[u8; 16],
        tenant: &str,
        queue: &str,
        op: Op,
    ) -> Settled {
        let matches = self
            .book()
            .leases
            .get(id)
            .is_none_or(|l| l.tenant == tenant && l.queue == queue);
        if !matches {
            return Settled::Invalid;
        }
        self.settle_local(id, op).await
    }

    /// `op` on a lease this replica holds.
    pub async fn settle_local(&self, id: &[u8; 16], op: Op) -> Settled {
        if let Op::Extend { lease_ms } = op {
            let mut book = self.book();
            let max_age = Duration::from_millis(self.config.max_lease_age_ms);
            return match book.leases.get_mut(id) {
                Some(lease) if lease.expires > Instant::now() => {
                    let wanted = Instant::now() + Duration::from_millis(lease_ms);
                    lease.expires = wanted.min(lease.born + max_age);
                    let left = lease.expires.saturating_duration_since(Instant::now());
                    Settled::Done {
                        lease_expires_ms: Some(unix_ms(SystemTime::now() + left)),
                    }
                }
                _ => Settled::Expired,
            };
        }
        let lease = {
            let mut book = self.book();
            match book.leases.get(id) {
                Some(l) if l.expires > Instant::now() => book.remove(id, op == Op::Ack),
                Some(_) => None, // ran out: the expiry task moves it back
                None => {
                    let repeated_ack =
                        op == Op::Ack && book.settled.get(id).is_some_and(|(_, acked)| *acked);
                    return if repeated_ack {
                        Settled::Done {
                            lease_expires_ms: None,
                        }
                    } else {
                        Settled::Expired
                    };
                }
            }
        };
        let Some(lease) = lease else {
            return Settled::Expired;
        };
        let Some(channel) = lease.puller.holds(lease.generation).await else {
            // The channel went: the broker requeued the message already.
            return Settled::Expired;
        };
        let done = Settled::Done {
            lease_expires_ms: None,
        };
        let outcome = match op {
            Op::Ack => channel
                .basic_ack(lease.tag, BasicAckOptions::default())
                .await
                .map(|()| done),
            Op::Nack { requeue: true } => channel.requeue(lease.tag).await.map(|()| done),
            Op::Nack { requeue: false } => match &lease.retry {
                Some(policy) => {
                    let hop = match lease.puller.channel().await {
                        Ok((_, _, broker)) => retry::republish(&broker, policy, &lease.message)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match hop {
                        Ok(_) => channel
                            .basic_ack(lease.tag, BasicAckOptions::default())
                            .await
                            .map(|()| done),
                        Err(error) => {
                            warn!(queue = %lease.queue, %error, "Could not move a nacked pull message to its retry queue; requeued it.");
                            let _ = channel.requeue(lease.tag).await;
                            return Settled::Failed;
                        }
                    }
                }
                None => channel
                    .basic_reject(lease.tag, BasicRejectOptions { requeue: false })
                    .await
                    .map(|()| done),
            },
            Op::Extend { .. } => return Settled::Expired,
        };
        match outcome {
            Ok(settled) => settled,
            Err(_) => {
                lease.puller.lost(lease.generation).await;
                Settled::Failed
            }
        }
    }

    /// Moves the leases that ran out back to their queues.
    async fn expire_due(&self) {
        let now = Instant::now();
        let due: Vec<Lease> = {
            let mut book = self.book();
            let ids: Vec<[u8; 16]> = book
                .leases
                .iter()
                .filter(|(_, l)| l.expires <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| book.remove(id, false)).collect()
        };
        for lease in due {
            telemetry::pull_expired(&lease.label);
            let Some(channel) = lease.puller.holds(lease.generation).await else {
                continue; // requeued by the broker with its channel
            };
            // Republished with one more expired lease counted, then acked; if that
            // fails, back to the queue as it is.
            let leases = leases_of(&lease.message.properties).saturating_add(1);
            let attempt = (retry::attempt(&lease.message.properties) > 0)
                .then(|| retry::attempt(&lease.message.properties));
            let moved = match lease.puller.channel().await {
                Ok((_, _, broker)) => retry::send_to(
                    &broker,
                    &lease.queue,
                    attempt,
                    &lease.message,
                    &[(LEASES_HEADER, AMQPValue::LongUInt(leases))],
                )
                .await
                .is_ok(),
                Err(_) => false,
            };
            let settled = if moved {
                channel
                    .basic_ack(lease.tag, BasicAckOptions::default())
                    .await
            } else {
                channel.requeue(lease.tag).await
            };
            if settled.is_err() {
                lease.puller.lost(lease.generation).await;
            }
        }
        // Forget settled leases older than any lease can live.
        let horizon = Duration::from_millis(self.config.max_lease_age_ms);
        self.book()
            .settled
            .retain(|_, (at, _)| at.elapsed() < horizon);
    }
}

/// Sweeps expired leases every 100 ms until `stop`.
async fn expire(pull: std::sync::Weak<Pull>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some(pull) = pull.upgrade() else { return };
        pull.expire_due().await;
        telemetry::pull_leased(pull.leased());
    }
}

/// The leases of a message that ran out so far (its [`LEASES_HEADER`]).
fn leases_of(properties: &lapin::BasicProperties) -> u32 {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(LEASES_HEADER))
        .and_then(|v| match v {
            AMQPValue::LongUInt(n) => Some(*n),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            _ => None,
        })
        .unwrap_or(0)
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
