//! Token verification keys: where they come from (HMAC secrets, PEM public keys, a JWKS
//! file or URL), the one algorithm each key is pinned to, and reloading them without a
//! restart (files when they change, the URL periodically and on an unknown `kid`).
//!
//! [`material`] is what a key is, [`sources`] where keys come from; this file holds the
//! keys in force and refreshes them.

mod material;
mod sources;

pub use material::{HmacSecret, ParsedJwks, VerificationKey, parse_algorithm, parse_jwks, pem_key};
pub use sources::{KeyFileKind, KeyFileSource, KeyLoadError, KeySources, is_loopback_host};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::telemetry;
use sources::{KeyFile, RemoteJwks};

/// The sources as they change at run time.
struct SourceState {
    hmac: Vec<Arc<VerificationKey>>,
    files: Vec<KeyFile>,
    remote: Option<RemoteJwks>,
    last_refresh: Option<Instant>,
}

impl SourceState {
    fn all_keys(&self) -> Vec<Arc<VerificationKey>> {
        let mut keys = self.hmac.clone();
        for file in &self.files {
            keys.extend(file.keys.iter().cloned());
        }
        if let Some(remote) = &self.remote {
            keys.extend(remote.keys.iter().cloned());
        }
        keys
    }
}

/// Why no key was found for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMiss {
    /// No key has the token's `kid`.
    UnknownKid,
    /// Keys with the token's `kid` exist, pinned to other algorithms.
    OtherAlgorithm(Vec<Algorithm>),
    /// The token has no `kid`, and no key is pinned to its algorithm.
    NoKeyForAlgorithm,
}

/// The keys in force at one moment.
#[derive(Debug, Default)]
pub struct KeySet(Vec<Arc<VerificationKey>>);

impl KeySet {
    /// The keys to try for a token with this `kid` and `alg`: with a `kid`, the keys
    /// having that `kid` and pinned to `alg`; without one, every key pinned to `alg`.
    pub fn select(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<Arc<VerificationKey>>, KeyMiss> {
        let Some(kid) = kid else {
            let keys: Vec<_> = self.0.iter().filter(|k| k.alg == alg).cloned().collect();
            return if keys.is_empty() {
                Err(KeyMiss::NoKeyForAlgorithm)
            } else {
                Ok(keys)
            };
        };
        let named: Vec<_> = self
            .0
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid))
            .collect();
        if named.is_empty() {
            return Err(KeyMiss::UnknownKid);
        }
        let keys: Vec<_> = named
            .iter()
            .filter(|k| k.alg == alg)
            .map(|k| Arc::clone(k))
            .collect();
        if keys.is_empty() {
            Err(KeyMiss::OtherAlgorithm(
                named.iter().map(|k| k.alg).collect(),
            ))
        } else {
            Ok(keys)
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The keys in force, and their sources. Requests read a snapshot (one `Arc` clone);
/// refreshes run one at a time and swap in a new snapshot.
pub struct KeyStore {
    current: RwLock<Arc<KeySet>>,
    sources: tokio::sync::Mutex<SourceState>,
    /// Refreshes finished so far; lets a request that waited for a running refresh
    /// use its result instead of starting another.
    refreshes: AtomicU64,
    reloadable: bool,
    refresh_every: Duration,
    min_refetch: Duration,
}

impl KeyStore {
    /// Reads the key files (an error names the config key of the first bad one), builds
    /// the store and, with a JWKS URL, fetches it once: that fetch is bounded by
    /// `fetch_timeout`, and if it fails Warren starts without those keys (logged) and
    /// keeps trying every `min_refetch`.
    pub async fn start(sources: &KeySources) -> anyhow::Result<Arc<Self>> {
        let files = sources.load_files()?;
        let remote = match &sources.jwks_url {
            Some(url) => Some(RemoteJwks {
                url: url.clone(),
                client: reqwest::Client::builder()
                    .timeout(sources.fetch_timeout)
                    .connect_timeout(sources.fetch_timeout)
                    .user_agent(concat!("warren/", env!("CARGO_PKG_VERSION")))
                    .redirect(reqwest::redirect::Policy::custom(|attempt| {
                        // The https rule of auth.jwks_url holds for redirects too.
                        if attempt.previous().len() >= 5 {
                            attempt.error("too many redirects")
                        } else if attempt.url().scheme() == "https"
                            || is_loopback_host(attempt.url().host_str())
                        {
                            attempt.follow()
                        } else {
                            attempt.error("redirected away from https")
                        }
                    }))
                    .build()
                    .map_err(|e| anyhow::anyhow!("cannot build the JWKS client: {e}"))?,
                keys: Vec::new(),
                healthy: false,
            }),
            None => None,
        };
        let state = SourceState {
            hmac: sources
                .hmac
                .iter()
                .map(|s| Arc::new(s.verification_key()))
                .collect(),
            files,
            remote,
            last_refresh: None,
        };
        let store = Arc::new(Self {
            current: RwLock::new(Arc::new(KeySet(state.all_keys()))),
            reloadable: !state.files.is_empty() || state.remote.is_some(),
            sources: tokio::sync::Mutex::new(state),
            refreshes: AtomicU64::new(0),
            refresh_every: sources.refresh_every,
            min_refetch: sources.min_refetch,
        });
        if sources.jwks_url.is_some() {
            store.refresh().await;
        }
        telemetry::auth_keys(store.keys().len());
        Ok(store)
    }

    /// The keys in force now.
    pub fn keys(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            // A panic while swapping cannot leave a half-written Arc behind.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Called for a token whose `kid` no key has: refreshes every source unless a
    /// refresh ran less than `min_refetch` ago, so a stream of made-up `kid`s costs at
    /// most one fetch per interval. `true` when the keys may have changed since the
    /// caller looked (a refresh ran, here or while the caller waited for one).
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        if !self.reloadable {
            return false;
        }
        let seen = self.refreshes.load(Ordering::Acquire);
        let mut state = self.sources.lock().await;
        if self.refreshes.load(Ordering::Acquire) != seen {
            return true;
        }
        if state
            .last_refresh
            .is_some_and(|at| at.elapsed() < self.min_refetch)
        {
            return false;
        }
        self.refresh_locked(&mut state).await;
        true
    }

    /// Re-reads changed files and fetches the URL; a source that fails keeps its last
    /// good keys.
    pub async fn refresh(&self) {
        let mut state = self.sources.lock().await;
        self.refresh_locked(&mut state).await;
    }

    async fn refresh_locked(&self, state: &mut SourceState) {
        state.last_refresh = Some(Instant::now());
        for file in &mut state.files {
            match file.reload_if_changed() {
                Ok(false) => {}
                Ok(true) => {
                    telemetry::auth_key_reload("file", true);
                    info!(source = %file.source.source, path = %file.path().display(),
                        kids = ?kids(&file.keys), "Token keys reloaded from file.");
                }
                Err(error) => {
                    telemetry::auth_key_reload("file", false);
                    warn!(source = %file.source.source, %error,
                        "Cannot reload token keys; keeping the previous ones.");
                }
            }
        }
        if let Some(remote) = &mut state.remote {
            match remote.fetch().await {
                Ok(parsed) => {
                    telemetry::auth_key_reload("url", true);
                    for reason in &parsed.skipped {
                        tracing::debug!(url = %remote.url, reason = %reason, "JWKS key skipped.");
                    }
                    if kids(&parsed.keys) != kids(&remote.keys) || !remote.healthy {
                        info!(url = %remote.url, kids = ?kids(&parsed.keys),
                            skipped = parsed.skipped.len(), "Token keys fetched from the JWKS URL.");
                    }
                    remote.keys = parsed.keys;
                    remote.healthy = true;
                }
                Err(error) => {
                    telemetry::auth_key_reload("url", false);
                    remote.healthy = false;
                    warn!(url = %remote.url, %error,
                        kept = remote.keys.len(), "JWKS fetch failed; keeping the previous keys.");
                }
            }
        }
        let next = Arc::new(KeySet(state.all_keys()));
        telemetry::auth_keys(next.len());
        match self.current.write() {
            Ok(mut current) => *current = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        self.refreshes.fetch_add(1, Ordering::AcqRel);
    }

    /// Time until the next periodic refresh: sooner while the URL is failing.
    async fn next_refresh_in(&self) -> Duration {
        let state = self.sources.lock().await;
        match &state.remote {
            Some(remote) if !remote.healthy => self.min_refetch.min(self.refresh_every),
            _ => self.refresh_every,
        }
    }

    /// Starts the periodic refresh when some source can change. The task ends when the
    /// store is dropped; the handle aborts it sooner.
    pub fn spawn_refresher(self: &Arc<Self>) -> Option<AbortHandle> {
        if !self.reloadable {
            return None;
        }
        let store: Weak<Self> = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                let Some(delay) = (match store.upgrade() {
                    Some(store) => Some(store.next_refresh_in().await),
                    None => None,
                }) else {
                    return;
                };
                tokio::time::sleep(delay).await;
                match store.upgrade() {
                    Some(store) => store.refresh().await,
                    None => return,
                }
            }
        });
        Some(task.abort_handle())
    }
}

fn kids(keys: &[Arc<VerificationKey>]) -> Vec<String> {
    keys.iter()
        .map(|k| format!("{}:{:?}", k.kid.as_deref().unwrap_or("-"), k.alg))
        .collect()
}
