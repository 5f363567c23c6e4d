//! Tokens already verified, so that a client sending the same token with every request
//! pays for its signature once: verification (header and claims decoding, HMAC or
//! RSA/EC) was over a quarter of the instructions of a `POST /v1/publish`.
//!
//! An entry is the token's exact bytes and its claims. It serves until the token's
//! `exp` (never into the leeway: past `exp` the token is verified again, which applies
//! the leeway) and only with the key set it was verified against: any refresh of the
//! keys (rotation, a removed key, a re-read file) empties the cache. Only tokens that
//! verified are kept, so a stranger cannot fill it; it is bounded by entries, and by
//! the size of a token it keeps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Claims;
use super::keys::KeySet;

/// Tokens longer than this are verified every time (real tokens are well under 2 KiB).
const MAX_TOKEN_BYTES: usize = 8 * 1024;

pub struct TokenCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The key set every entry was verified with.
    keys: Option<Arc<KeySet>>,
    /// foldhash (seeded per process): only verified tokens are ever inserted, so a
    /// caller cannot choose keys to collide.
    entries: HashMap<Box<str>, Claims, foldhash::fast::RandomState>,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens; 0 turns it off.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The claims of `token` if it verified with `keys` and has not expired at `now`
    /// (Unix seconds).
    pub fn get(&self, token: &str, keys: &Arc<KeySet>, now: u64) -> Option<Claims> {
        if self.capacity == 0 {
            return None;
        }
        let mut inner = self.lock();
        if !inner.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, keys)) {
            inner.entries.clear();
            inner.keys = Some(Arc::clone(keys));
            return None;
        }
        match inner.entries.get(token) {
            Some(claims) if now < claims.expires_at => Some(claims.clone()),
            Some(_) => {
                inner.entries.remove(token);
                None
            }
            None => None,
        }
    }

    /// Keeps the claims of a token that just verified with `keys`.
    pub fn put(&self, token: &str, keys: &Arc<KeySet>, claims: &Claims, now: u64) {
        if self.capacity == 0 || token.len() > MAX_TOKEN_BYTES || claims.expires_at <= now {
            return;
        }
        let mut inner = self.lock();
        if !inner.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, keys)) {
            // The keys changed while this token was being verified: start over with
            // the set it verified against (a later get with newer keys empties it).
            inner.entries.clear();
            inner.keys = Some(Arc::clone(keys));
        }
        if inner.entries.len() >= self.capacity {
            inner.entries.retain(|_, c| now < c.expires_at);
            if inner.entries.len() >= self.capacity {
                // Full of live tokens: start over rather than track recency on every
                // hit. A miss costs one verification.
                inner.entries.clear();
            }
        }
        inner.entries.insert(token.into(), claims.clone());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map is consistent after any panic in the few lines holding the lock.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(expires_at: u64) -> Claims {
        Claims {
            subject: "s".into(),
            tenant: "t".into(),
            scopes: vec!["publish".into()],
            expires_at,
        }
    }

    fn keys() -> Arc<KeySet> {
        Arc::new(KeySet::default())
    }

    #[test]
    fn serves_a_verified_token_until_its_exp_and_never_after() {
        let cache = TokenCache::new(10);
        let keys = keys();
        assert!(cache.get("a", &keys, 100).is_none(), "nothing kept yet");
        cache.put("a", &keys, &claims(200), 100);
        assert_eq!(cache.get("a", &keys, 199).map(|c| c.expires_at), Some(200));
        assert!(cache.get("a", &keys, 200).is_none(), "expired at exp");
        assert_eq!(cache.len(), 0, "the expired entry is dropped");
        cache.put("b", &keys, &claims(100), 100);
        assert!(
            cache.get("b", &keys, 99).is_none(),
            "an expired token is not kept"
        );
        assert!(
            cache.get("a ", &keys, 100).is_none(),
            "only the exact bytes match"
        );
    }

    #[test]
    fn another_key_set_empties_it() {
        let cache = TokenCache::new(10);
        let (old, new) = (keys(), keys());
        cache.put("a", &old, &claims(200), 100);
        assert!(cache.get("a", &new, 100).is_none(), "keys rotated");
        assert!(
            cache.get("a", &old, 100).is_none(),
            "the entry is gone, not kept for the old keys"
        );
        // A token verified with keys older than the cache's empties it too.
        cache.put("b", &new, &claims(200), 100);
        cache.put("c", &old, &claims(200), 100);
        assert!(cache.get("b", &new, 100).is_none());
    }

    #[test]
    fn is_bounded_and_can_be_turned_off() {
        let cache = TokenCache::new(3);
        let keys = keys();
        for (i, token) in ["a", "b", "c"].iter().enumerate() {
            cache.put(token, &keys, &claims(150 + i as u64), 100);
        }
        assert_eq!(cache.len(), 3);
        // Full: expired entries go first ("a" expired at 150).
        cache.put("d", &keys, &claims(300), 150);
        assert_eq!(cache.len(), 3);
        assert!(cache.get("d", &keys, 150).is_some());
        // Full of live tokens: it starts over.
        cache.put("e", &keys, &claims(300), 150);
        assert!(cache.len() <= 3);
        assert!(cache.get("e", &keys, 150).is_some());
        let long = "x".repeat(MAX_TOKEN_BYTES + 1);
        cache.put(&long, &keys, &claims(300), 150);
        assert!(cache.get(&long, &keys, 150).is_none(), "too long to keep");

        let off = TokenCache::new(0);
        off.put("a", &keys, &claims(200), 100);
        assert!(off.get("a", &keys, 100).is_none());
    }
}
