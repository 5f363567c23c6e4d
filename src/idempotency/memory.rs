//! The embedded idempotency store for one replica: bounded by entries and bytes,
//! expiring by retention, evicting the oldest first (and counting evictions).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Claim, Fingerprint, StoredResponse};
use crate::telemetry;

pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry>,
    /// Keys in age order, tagged with the sequence number they had when queued; a
    /// key whose entry has since been re-queued or removed leaves a stale tag behind.
    order: VecDeque<(u64, String)>,
    next_seq: u64,
    bytes: usize,
}

struct Entry {
    seq: u64,
    fingerprint: Fingerprint,
    state: State,
    expires: Instant,
    size: usize,
}

enum State {
    Pending { token: String },
    Done(StoredResponse),
}

/// Bookkeeping bytes per entry beyond its key and response.
const ENTRY_OVERHEAD: usize = 128;

impl MemoryStore {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_entries,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn claim(&self, key: &str, fingerprint: Fingerprint, lock: Duration) -> Claim {
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
        let token = uuid::Uuid::new_v4().to_string();
        let size = key.len() * 2 + token.len() + ENTRY_OVERHEAD;
        inner.insert(
            key.to_owned(),
            Entry {
                seq: 0,
                fingerprint,
                state: State::Pending {
                    token: token.clone(),
                },
                expires: now + lock,
                size,
            },
        );
        self.evict(&mut inner, now);
        Claim::New { token }
    }

    pub fn finish(
        &self,
        key: &str,
        token: &str,
        fingerprint: Fingerprint,
        response: StoredResponse,
        retention: Duration,
    ) {
        let now = Instant::now();
        let mut inner = self.lock();
        if !inner.owns(key, token) {
            return; // evicted or expired meanwhile; the next claim starts afresh
        }
        inner.remove(key);
        let size = key.len() * 2 + response.size() + ENTRY_OVERHEAD;
        inner.insert(
            key.to_owned(),
            Entry {
                seq: 0,
                fingerprint,
                state: State::Done(response),
                expires: now + retention,
                size,
            },
        );
        self.evict(&mut inner, now);
    }

    pub fn release(&self, key: &str, token: &str) {
        let mut inner = self.lock();
        if inner.owns(key, token) {
            inner.remove(key);
        }
    }

    /// Drops expired entries from the old end, then the oldest until within bounds.
    fn evict(&self, inner: &mut Inner, now: Instant) {
        let mut evicted = 0u64;
        while let Some((seq, key)) = inner.order.front().cloned() {
            let live = inner.map.get(&key).filter(|e| e.seq == seq);
            let Some(entry) = live else {
                inner.order.pop_front(); // stale tag
                continue;
            };
            let over = inner.map.len() > self.max_entries || inner.bytes > self.max_bytes;
            if entry.expires <= now {
                inner.remove(&key);
            } else if over {
                inner.remove(&key);
                evicted += 1;
            } else {
                break;
            }
            inner.order.pop_front();
        }
        if inner.order.len() > 2 * inner.map.len() + 1024 {
            inner.compact();
        }
        if evicted > 0 {
            telemetry::idempotency_evicted(evicted);
        }
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
        if let Some(old) = self.map.insert(key, entry) {
            self.bytes -= old.size;
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.map.remove(key) {
            self.bytes -= old.size;
        }
    }

    fn compact(&mut self) {
        let mut live: Vec<(u64, String)> =
            self.map.iter().map(|(k, e)| (e.seq, k.clone())).collect();
        live.sort_unstable_by_key(|(seq, _)| *seq);
        self.order = live.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    fn response(body: &str) -> StoredResponse {
        StoredResponse {
            status: 202,
            content_type: "application/json".into(),
            body: body.into(),
        }
    }

    const LOCK: Duration = Duration::from_secs(60);
    const KEEP: Duration = Duration::from_secs(3600);

    #[test]
    fn claim_finish_replay_mismatch_release() {
        let store = MemoryStore::new(100, 1 << 20);
        let Claim::New { token } = store.claim("k", fp(1), LOCK) else {
            panic!("first claim is new")
        };
        assert_eq!(store.claim("k", fp(1), LOCK), Claim::InFlight);
        assert_eq!(store.claim("k", fp(2), LOCK), Claim::Mismatch);
        store.finish("k", "someone-else", fp(1), response("x"), KEEP);
        assert_eq!(
            store.claim("k", fp(1), LOCK),
            Claim::InFlight,
            "wrong token ignored"
        );
        store.finish("k", &token, fp(1), response("done"), KEEP);
        assert_eq!(store.claim("k", fp(1), LOCK), Claim::Done(response("done")));
        assert_eq!(store.claim("k", fp(2), LOCK), Claim::Mismatch);

        let Claim::New { token } = store.claim("r", fp(1), LOCK) else {
            panic!()
        };
        store.release("r", &token);
        assert!(matches!(store.claim("r", fp(1), LOCK), Claim::New { .. }));
    }

    #[test]
    fn an_abandoned_claim_expires_after_the_lock_time() {
        let store = MemoryStore::new(100, 1 << 20);
        assert!(matches!(
            store.claim("k", fp(1), Duration::ZERO),
            Claim::New { .. }
        ));
        assert!(matches!(store.claim("k", fp(1), LOCK), Claim::New { .. }));
    }

    #[test]
    fn oldest_entries_are_evicted_first() {
        let store = MemoryStore::new(3, 1 << 20);
        for key in ["a", "b", "c", "d"] {
            let Claim::New { token } = store.claim(key, fp(1), LOCK) else {
                panic!()
            };
            store.finish(key, &token, fp(1), response(key), KEEP);
        }
        assert_eq!(store.len(), 3);
        assert!(
            matches!(store.claim("a", fp(1), LOCK), Claim::New { .. }),
            "a was evicted"
        );
        assert_eq!(store.claim("d", fp(1), LOCK), Claim::Done(response("d")));
    }

    #[test]
    fn a_million_distinct_keys_stay_within_both_bounds() {
        let max_entries = 50_000;
        let max_bytes = 8 << 20;
        let store = MemoryStore::new(max_entries, max_bytes);
        let body = "x".repeat(200);
        for i in 0..1_000_000u32 {
            let key = format!("tenant\u{1f}subject\u{1f}key-{i}");
            let Claim::New { token } = store.claim(&key, fp(1), LOCK) else {
                panic!("distinct keys are new")
            };
            store.finish(&key, &token, fp(1), response(&body), KEEP);
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
}
