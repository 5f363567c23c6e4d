//! The embedded idempotency store for one replica: bounded by entries and bytes, in
//! total and per tenant, expiring by retention.
//!
//! Isolation (security issue #13, hole 9, and #27): every entry belongs to the tenant
//! that claimed it, and making room for a tenant's new entry evicts that tenant's own
//! oldest *finished* entries first. Only when the store as a whole is full and the
//! tenant holds less than its fair share (the bounds divided by the tenants holding
//! entries, itself included) does it evict another tenant's oldest finished entry: that
//! of the tenant holding the most, and only while that one holds more than its fair
//! share. So no tenant, configured or dynamic, can keep another out of the store, and
//! no tenant loses retained answers below its fair share to anyone's traffic (the
//! static split by `[tenants.*]` count did not cover dynamic tenants: a few of them
//! filled the store and every new one got 503 for `retention_s`). Claims still in
//! flight are never evicted at all (that would let a concurrent duplicate run). When
//! no room can be made the claim is refused: [`Claim::TenantFull`] when the tenant's own
//! share is taken by its in-flight claims, [`Claim::StoreFull`] otherwise.
//!
//! Over 500 lines because nearly half of it is the tests that pin those bounds and that
//! isolation, kept next to the bookkeeping they check.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Claim, Fingerprint, Finished, StoredOutcome};
use crate::telemetry;

/// The memory store's bounds: in total, and for each tenant's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_entries: usize,
    pub max_bytes: usize,
    pub tenant_entries: usize,
    pub tenant_bytes: usize,
}

impl Bounds {
    /// The same bound in total and for each tenant (one tenant may use it all).
    pub fn shared(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            max_entries,
            max_bytes,
            tenant_entries: max_entries,
            tenant_bytes: max_bytes,
        }
    }
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    bounds: Bounds,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry>,
    /// Every key in age order, tagged with the sequence number it had when queued (for
    /// expiry); a key whose entry has since been re-queued or removed leaves a stale tag.
    order: VecDeque<(u64, String)>,
    /// Each tenant's count, bytes and keys in age order (for eviction within the tenant).
    tenants: HashMap<Arc<str>, Share>,
    next_seq: u64,
    bytes: usize,
}

#[derive(Default)]
struct Share {
    entries: usize,
    bytes: usize,
    order: VecDeque<(u64, String)>,
}

struct Entry {
    seq: u64,
    tenant: Arc<str>,
    fingerprint: Fingerprint,
    state: State,
    expires: Instant,
    size: usize,
}

enum State {
    Pending { token: String },
    Done(StoredOutcome),
}

/// Why no room could be made.
enum Full {
    Tenant,
    Store,
}

/// Bookkeeping bytes per entry beyond its key and response.
const ENTRY_OVERHEAD: usize = 128;

impl MemoryStore {
    pub fn new(bounds: Bounds) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            bounds,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `key` for `tenant` (the key itself is already scoped by tenant).
    pub fn claim(
        &self,
        tenant: &str,
        key: &str,
        fingerprint: Fingerprint,
        lock: Duration,
    ) -> Claim {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(entry) = inner.map.get(key) {
            if entry.expires > now {
                return match &entry.state {
                    _ if entry.fingerprint != fingerprint => Claim::Mismatch,
                    State::Pending { .. } => Claim::InFlight,
                    State::Done(response) => Claim::Done(response.clone()),
                };
            }
            inner.remove(key);
        }
        inner.expire(now);
        let token = crate::ids::uuid_v4().to_string();
        let size = key.len() * 2 + token.len() + ENTRY_OVERHEAD;
        if let Err(full) = self.make_room(&mut inner, tenant, size, now) {
            self.record(&inner);
            return match full {
                Full::Tenant => Claim::TenantFull,
                Full::Store => Claim::StoreFull,
            };
        }
        inner.insert(
            key.to_owned(),
            Entry {
                seq: 0,
                tenant: Arc::from(tenant),
                fingerprint,
                state: State::Pending {
                    token: token.clone(),
                },
                expires: now + lock,
                size,
            },
        );
        self.record(&inner);
        Claim::New { token }
    }

    pub fn finish(&self, key: &str, token: &str, done: Finished) {
        let Finished {
            fingerprint,
            outcome: response,
            retention,
        } = done;
        let now = Instant::now();
        let mut inner = self.lock();
        if !inner.owns(key, token) {
            return; // expired meanwhile; the next claim starts afresh
        }
        let Some(tenant) = inner.map.get(key).map(|e| e.tenant.clone()) else {
            return;
        };
        inner.remove(key);
        let size = key.len() * 2 + response.size() + ENTRY_OVERHEAD;
        // Room from the tenant's own older answers. The publish has happened, so the
        // answer is kept even when no more room can be made (the tenant's share is all
        // in flight): the overshoot is bounded by the claims in flight, and the next
        // claim makes room again.
        let _ = self.make_room(&mut inner, &tenant, size, now);
        inner.insert(
            key.to_owned(),
            Entry {
                seq: 0,
                tenant,
                fingerprint,
                state: State::Done(response),
                expires: now + retention,
                size,
            },
        );
        self.record(&inner);
    }

    pub fn release(&self, key: &str, token: &str) {
        let mut inner = self.lock();
        if inner.owns(key, token) {
            inner.remove(key);
        }
        self.record(&inner);
    }

    /// Evicts `tenant`'s own oldest finished entries until one more entry of `size`
    /// bytes fits its share and the total bounds; when its own are all in flight (or it
    /// has none) and the store is full, the largest tenant's above the fair share (see
    /// the module docs). Never a claim in flight.
    fn make_room(
        &self,
        inner: &mut Inner,
        tenant: &str,
        size: usize,
        now: Instant,
    ) -> Result<(), Full> {
        let b = self.bounds;
        let mut evicted = 0u64;
        let result = loop {
            let (entries, bytes) = inner
                .tenants
                .get(tenant)
                .map_or((0, 0), |s| (s.entries, s.bytes));
            let tenant_over = entries + 1 > b.tenant_entries || bytes + size > b.tenant_bytes;
            let store_over =
                inner.map.len() + 1 > b.max_entries || inner.bytes + size > b.max_bytes;
            if !tenant_over && !store_over {
                break Ok(());
            }
            let own = inner.evict_oldest_finished(tenant, now);
            let taken = match own {
                None if !tenant_over => inner.evict_for(tenant, size, b, now),
                other => other,
            };
            match taken {
                Some(true) => evicted += 1,
                Some(false) => {} // it had expired anyway
                None if tenant_over => break Err(Full::Tenant),
                None => break Err(Full::Store),
            }
        };
        if evicted > 0 {
            telemetry::idempotency_evicted(evicted);
        }
        result
    }

    fn record(&self, inner: &Inner) {
        telemetry::idempotency_entries(inner.map.len(), inner.bytes);
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl Inner {
    fn owns(&self, key: &str, token: &str) -> bool {
        matches!(self.map.get(key), Some(Entry { state: State::Pending { token: t }, .. }) if t == token)
    }

    fn insert(&mut self, key: String, mut entry: Entry) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += entry.size;
        self.order.push_back((entry.seq, key.clone()));
        let share = self.tenants.entry(entry.tenant.clone()).or_default();
        share.entries += 1;
        share.bytes += entry.size;
        share.order.push_back((entry.seq, key.clone()));
        if let Some(old) = self.map.insert(key, entry) {
            self.forget(&old);
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.map.remove(key) {
            self.forget(&old);
        }
    }

    /// Takes a removed entry out of the totals and its tenant's share.
    fn forget(&mut self, old: &Entry) {
        self.bytes -= old.size;
        if let Some(share) = self.tenants.get_mut(&old.tenant) {
            share.entries -= 1;
            share.bytes -= old.size;
            if share.entries == 0 {
                self.tenants.remove(&old.tenant);
            } else if share.order.len() > 2 * share.entries + 64 {
                share.compact(&self.map);
            }
        }
    }

    /// Drops expired entries (any tenant's: they are no longer retained) from the old end.
    fn expire(&mut self, now: Instant) {
        while let Some((seq, key)) = self.order.front() {
            match self.map.get(key) {
                Some(entry) if entry.seq == *seq => {
                    if entry.expires > now {
                        break;
                    }
                    let key = key.clone();
                    self.remove(&key);
                }
                _ => {} // stale tag
            }
            self.order.pop_front();
        }
        if self.order.len() > 2 * self.map.len() + 1024 {
            let mut live: Vec<(u64, String)> =
                self.map.iter().map(|(k, e)| (e.seq, k.clone())).collect();
            live.sort_unstable_by_key(|(seq, _)| *seq);
            self.order = live.into();
        }
    }

    /// Makes room for `tenant`, whose own entries cannot go, from another tenant: when
    /// `tenant` (with one more entry of `size` bytes) stays within its fair share of the
    /// bounds, evicts the oldest finished entry of the tenant holding the most entries
    /// (or bytes, whichever bound is hit) among those above their fair share that have
    /// one. Only runs while the store is full; as [`Inner::evict_oldest_finished`].
    fn evict_for(&mut self, tenant: &str, size: usize, b: Bounds, now: Instant) -> Option<bool> {
        let (entries, bytes) = self
            .tenants
            .get(tenant)
            .map_or((0, 0), |s| (s.entries, s.bytes));
        let holders = self.tenants.len() + usize::from(!self.tenants.contains_key(tenant));
        let (fair_entries, fair_bytes) = (b.max_entries / holders, b.max_bytes / holders);
        if entries + 1 > fair_entries || bytes + size > fair_bytes {
            return None;
        }
        let by_bytes = self.bytes + size > b.max_bytes;
        let mut above: Vec<(usize, Arc<str>)> = self
            .tenants
            .iter()
            .filter(|(name, _)| name.as_ref() != tenant)
            .filter_map(|(name, s)| {
                let (held, fair) = if by_bytes {
                    (s.bytes, fair_bytes)
                } else {
                    (s.entries, fair_entries)
                };
                (held > fair).then(|| (held, name.clone()))
            })
            .collect();
        above.sort_unstable_by_key(|(held, _)| std::cmp::Reverse(*held));
        above
            .into_iter()
            .find_map(|(_, victim)| self.evict_oldest_finished(&victim, now))
    }

    /// Removes `tenant`'s oldest entry that is finished or expired, skipping claims in
    /// flight. `Some(true)`: a retained answer was evicted; `Some(false)`: an expired
    /// entry was dropped; `None`: nothing of the tenant's can go.
    fn evict_oldest_finished(&mut self, tenant: &str, now: Instant) -> Option<bool> {
        let share = self.tenants.get_mut(tenant)?;
        let map = &self.map;
        let mut i = 0;
        let victim = loop {
            let Some((seq, key)) = share.order.get(i) else {
                break None;
            };
            match map.get(key) {
                Some(entry) if entry.seq == *seq => {
                    let expired = entry.expires <= now;
                    if expired || matches!(entry.state, State::Done(_)) {
                        break share.order.remove(i).map(|(_, key)| (key, !expired));
                    }
                    i += 1; // in flight: never evicted
                }
                _ => {
                    share.order.remove(i); // stale tag
                }
            }
        };
        let (key, evicted) = victim?;
        self.remove(&key);
        Some(evicted)
    }
}

impl Share {
    fn compact(&mut self, map: &HashMap<String, Entry>) {
        self.order
            .retain(|(seq, key)| map.get(key).is_some_and(|e| e.seq == *seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(fingerprint: Fingerprint, outcome: StoredOutcome, retention: Duration) -> Finished {
        Finished {
            fingerprint,
            outcome,
            retention,
        }
    }

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    fn response(body: &str) -> StoredOutcome {
        StoredOutcome {
            status: 202,
            content_type: "application/json".into(),
            body: body.into(),
        }
    }

    const LOCK: Duration = Duration::from_secs(60);
    const KEEP: Duration = Duration::from_secs(3600);

    #[test]
    fn claim_finish_replay_mismatch_release() {
        let store = MemoryStore::new(Bounds::shared(100, 1 << 20));
        let Claim::New { token } = store.claim("t", "k", fp(1), LOCK) else {
            panic!("first claim is new")
        };
        assert_eq!(store.claim("t", "k", fp(1), LOCK), Claim::InFlight);
        assert_eq!(store.claim("t", "k", fp(2), LOCK), Claim::Mismatch);
        store.finish("k", "someone-else", finished(fp(1), response("x"), KEEP));
        assert_eq!(
            store.claim("t", "k", fp(1), LOCK),
            Claim::InFlight,
            "wrong token ignored"
        );
        store.finish("k", &token, finished(fp(1), response("done"), KEEP));
        assert_eq!(
            store.claim("t", "k", fp(1), LOCK),
            Claim::Done(response("done"))
        );
        assert_eq!(store.claim("t", "k", fp(2), LOCK), Claim::Mismatch);

        let Claim::New { token } = store.claim("t", "r", fp(1), LOCK) else {
            panic!()
        };
        store.release("r", &token);
        assert!(matches!(
            store.claim("t", "r", fp(1), LOCK),
            Claim::New { .. }
        ));
    }

    #[test]
    fn an_abandoned_claim_expires_after_the_lock_time() {
        let store = MemoryStore::new(Bounds::shared(100, 1 << 20));
        assert!(matches!(
            store.claim("t", "k", fp(1), Duration::ZERO),
            Claim::New { .. }
        ));
        assert!(matches!(
            store.claim("t", "k", fp(1), LOCK),
            Claim::New { .. }
        ));
    }

    #[test]
    fn oldest_entries_are_evicted_first() {
        let store = MemoryStore::new(Bounds::shared(3, 1 << 20));
        for key in ["a", "b", "c", "d"] {
            let Claim::New { token } = store.claim("t", key, fp(1), LOCK) else {
                panic!()
            };
            store.finish(key, &token, finished(fp(1), response(key), KEEP));
        }
        assert_eq!(store.len(), 3);
        assert!(
            matches!(store.claim("t", "a", fp(1), LOCK), Claim::New { .. }),
            "a was evicted"
        );
        assert_eq!(
            store.claim("t", "d", fp(1), LOCK),
            Claim::Done(response("d"))
        );
    }

    #[test]
    fn a_million_distinct_keys_stay_within_both_bounds() {
        let max_entries = 50_000;
        let max_bytes = 8 << 20;
        let store = MemoryStore::new(Bounds::shared(max_entries, max_bytes));
        let body = "x".repeat(200);
        for i in 0..1_000_000u32 {
            let key = format!("tenant\u{1f}subject\u{1f}key-{i}");
            let Claim::New { token } = store.claim("t", &key, fp(1), LOCK) else {
                panic!("distinct keys are new")
            };
            store.finish(&key, &token, finished(fp(1), response(&body), KEEP));
            if i % 100_000 == 0 {
                assert!(store.len() <= max_entries);
                assert!(store.bytes() <= max_bytes);
            }
        }
        assert!(store.len() <= max_entries, "{} entries", store.len());
        assert!(store.bytes() <= max_bytes, "{} bytes", store.bytes());
        let inner = store.lock();
        assert!(inner.order.len() <= 2 * inner.map.len() + 1024 + 1);
        println!(
            "1,000,000 keys: {} entries, {} bytes retained (bounds {max_entries}, {max_bytes})",
            inner.map.len(),
            inner.bytes
        );
    }

    fn store_done(store: &MemoryStore, tenant: &str, key: &str) {
        let Claim::New { token } = store.claim(tenant, key, fp(1), LOCK) else {
            panic!("{key} is new")
        };
        store.finish(key, &token, finished(fp(1), response(key), KEEP));
    }

    #[test]
    fn one_tenants_churn_never_evicts_another_tenants_answers() {
        let store = MemoryStore::new(Bounds {
            max_entries: 10,
            max_bytes: 1 << 20,
            tenant_entries: 5,
            tenant_bytes: 1 << 20,
        });
        store_done(&store, "a", "a\u{1f}s\u{1f}kept");
        for i in 0..1000 {
            store_done(&store, "b", &format!("b\u{1f}s\u{1f}{i}"));
        }
        assert_eq!(
            store.claim("a", "a\u{1f}s\u{1f}kept", fp(1), LOCK),
            Claim::Done(response("a\u{1f}s\u{1f}kept"))
        );
        // b evicted only its own oldest: it keeps its newest five.
        assert_eq!(store.len(), 6);
        assert_eq!(
            store.claim("b", "b\u{1f}s\u{1f}999", fp(1), LOCK),
            Claim::Done(response("b\u{1f}s\u{1f}999"))
        );
        assert!(matches!(
            store.claim("b", "b\u{1f}s\u{1f}0", fp(1), LOCK),
            Claim::New { .. }
        ));
    }

    #[test]
    fn claims_in_flight_are_never_evicted() {
        let store = MemoryStore::new(Bounds {
            max_entries: 4,
            max_bytes: 1 << 20,
            tenant_entries: 2,
            tenant_bytes: 1 << 20,
        });
        for key in ["p1", "p2"] {
            assert!(matches!(
                store.claim("a", key, fp(1), LOCK),
                Claim::New { .. }
            ));
        }
        // The tenant's share is all in flight: a third key is refused, the two stay.
        assert_eq!(store.claim("a", "p3", fp(1), LOCK), Claim::TenantFull);
        assert_eq!(store.claim("a", "p1", fp(1), LOCK), Claim::InFlight);
        assert_eq!(store.claim("a", "p2", fp(1), LOCK), Claim::InFlight);
        // Another tenant fills the rest. A third tenant, with nothing of its own, takes
        // room from the one above its fair share (4 / 3 tenants = 1) with a finished
        // entry: b's oldest, never a's claims in flight.
        store_done(&store, "b", "b1");
        store_done(&store, "b", "b2");
        assert!(matches!(
            store.claim("c", "c1", fp(1), LOCK),
            Claim::New { .. }
        ));
        let held = |key: &str| store.lock().map.contains_key(key);
        assert!(!held("b1") && held("b2"), "b's oldest went for c");
        // Now b and c hold their fair share (4 / 4 tenants = 1) and a's two are in
        // flight: a fourth tenant finds nothing it may evict.
        assert_eq!(store.claim("d", "d1", fp(1), LOCK), Claim::StoreFull);
        assert_eq!(store.claim("a", "p1", fp(1), LOCK), Claim::InFlight);
        assert!(held("b2") && held("c1"));
    }

    #[test]
    fn a_new_tenant_gets_room_from_the_largest_and_nobody_drops_below_a_fair_share() {
        let store = MemoryStore::new(Bounds::shared(12, 1 << 20));
        // A few tenants fill the store; the first holds most of it.
        for i in 0..9 {
            store_done(&store, "big", &format!("big{i}"));
        }
        for i in 0..3 {
            store_done(&store, "small", &format!("small{i}"));
        }
        // Newcomers each get room, taken from `big` (above the fair share), never from
        // `small` while it holds no more than its share.
        for n in 0..3 {
            store_done(&store, &format!("new{n}"), &format!("new{n}-0"));
        }
        assert_eq!(store.len(), 12);
        for i in 0..3 {
            assert_eq!(
                store.claim("small", &format!("small{i}"), fp(1), LOCK),
                Claim::Done(response(&format!("small{i}"))),
                "small{i} kept"
            );
        }
        // Five tenants: a fair share is 12 / 5 = 2. `big` went from 9 to 6; newcomers
        // keep coming and take it down to its share, never below.
        for n in 3..7 {
            store_done(&store, &format!("new{n}"), &format!("new{n}-0"));
        }
        let inner = store.lock();
        let big = inner.tenants.get("big").map_or(0, |s| s.entries);
        let holders = inner.tenants.len();
        assert!(
            big >= 12 / holders,
            "big holds {big} with {holders} tenants: below its fair share"
        );
        drop(inner);
        assert_eq!(store.len(), 12);
    }

    #[test]
    fn expired_entries_of_idle_tenants_free_the_total() {
        let store = MemoryStore::new(Bounds {
            max_entries: 2,
            max_bytes: 1 << 20,
            tenant_entries: 2,
            tenant_bytes: 1 << 20,
        });
        for key in ["a1", "a2"] {
            let Claim::New { token } = store.claim("a", key, fp(1), LOCK) else {
                panic!()
            };
            store.finish(key, &token, finished(fp(1), response(key), Duration::ZERO));
        }
        store_done(&store, "b", "b1");
        assert_eq!(
            store.claim("b", "b1", fp(1), LOCK),
            Claim::Done(response("b1"))
        );
    }
}
