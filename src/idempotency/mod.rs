//! Idempotency keys (SPEC §5, the IETF httpapi draft as Stripe practises it): the
//! semantics live here once; the memory and Redis stores only claim, finish and release.

mod memory;
mod outcome;
mod redis_store;

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{IdempotencyConfig, StoreKind};
use crate::error::ApiError;
use crate::telemetry;
pub use memory::{Bounds, MemoryStore};
pub use outcome::{Answered, Outcome, StoredOutcome, StoredProblem};
pub use redis_store::RedisStore;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// A validated `Idempotency-Key` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Reads the [`HEADER`] from every value the request carries: none is no key, more
    /// than one is refused; 1–255 printable ASCII characters, as a bare token or a
    /// quoted structured-field string (`"abc"` and `abc` are the same key).
    pub fn from_header_values<'a>(
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Option<Self>, ApiError> {
        let mut values = values.into_iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(invalid("send one Idempotency-Key header, not several"));
        }
        Self::parse(value).map(Some)
    }

    pub fn parse(raw: &[u8]) -> Result<Self, ApiError> {
        let text = std::str::from_utf8(raw).map_err(|_| invalid("must be printable ASCII"))?;
        let text = text.trim_matches(' ');
        let key = if let Some(inner) = text.strip_prefix('"') {
            let inner = inner
                .strip_suffix('"')
                .ok_or_else(|| invalid("a quoted key must end with a quote"))?;
            let mut key = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some(e @ ('"' | '\\')) => key.push(e),
                        _ => return Err(invalid("only \\\" and \\\\ may be escaped")),
                    },
                    '"' => return Err(invalid("an inner quote must be escaped")),
                    c => key.push(c),
                }
            }
            key
        } else {
            text.to_owned()
        };
        if key.is_empty() || key.len() > 255 {
            return Err(invalid("must be 1-255 characters"));
        }
        if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(invalid("must be printable ASCII"));
        }
        Ok(Self(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The AMQP `message_id` for the `index`-th message published under this key
    /// (`None` for a single publish): a UUIDv5 of (tenant, token subject, key, index),
    /// the same scope the key is claimed in. Stable across retries of one caller, so
    /// consumers can de-duplicate a message whose first attempt did land; distinct for
    /// two callers that happen to pick the same key. The name is a JSON array, so no
    /// choice of subject can make two different scopes collide.
    pub fn message_id(&self, tenant: &str, subject: &str, index: Option<usize>) -> String {
        let name = serde_json::json!([tenant, subject, self.0, index]).to_string();
        uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes()).to_string()
    }
}

/// Namespace of derived message ids (a fixed random UUID; changing it changes every id).
const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("3f1c2b8e-6a55-4f0e-9d57-2b1f6c0e8a41");

fn invalid(why: &str) -> ApiError {
    ApiError::InvalidRequest(format!("Idempotency-Key: {why}"))
}

/// Hash of method, path and body: the same key with another fingerprint is a misuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint(#[serde(with = "hex_bytes")] pub [u8; 32]);

impl Fingerprint {
    pub fn of(method: &str, path: &str, body: &[u8]) -> Self {
        let mut hash = Sha256::new();
        hash.update(method.as_bytes());
        hash.update([0]);
        hash.update(path.as_bytes());
        hash.update([0]);
        hash.update(body);
        Self(hash.finalize().into())
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        if text.len() != 64 {
            return Err(D::Error::custom("fingerprint must be 64 hex digits"));
        }
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(D::Error::custom)?;
        }
        Ok(out)
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours now; `token` proves it when finishing or releasing.
    New { token: String },
    /// Someone holds the key and has not finished.
    InFlight,
    /// The key was used with another request.
    Mismatch,
    /// The key finished earlier with this fingerprint: replay.
    Done(StoredOutcome),
    /// Memory store: the tenant's share is taken by its own claims still in flight.
    TenantFull,
    /// Memory store: the total bound is taken by other tenants' entries and claims in
    /// flight, none of which this tenant may evict.
    StoreFull,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("idempotency store unavailable: {0}")]
pub struct StoreError(pub String);

/// Where claims live: one replica's memory, or Redis shared by several.
pub enum Store {
    Memory(MemoryStore),
    Redis(Box<RedisStore>),
}

impl Store {
    /// `configured_tenants` (the `[tenants.*]` tables) sets the memory store's default
    /// per-tenant share; see [`IdempotencyConfig::bounds`].
    pub async fn connect(
        config: &IdempotencyConfig,
        configured_tenants: usize,
    ) -> Result<Self, StoreError> {
        Ok(match config.store {
            StoreKind::Memory => {
                let (tenant_entries, tenant_bytes) = config.tenant_share(configured_tenants);
                Self::Memory(MemoryStore::new(Bounds {
                    max_entries: config.max_entries,
                    max_bytes: config.max_bytes,
                    tenant_entries,
                    tenant_bytes,
                }))
            }
            StoreKind::Redis => Self::Redis(Box::new(RedisStore::connect(config).await?)),
        })
    }

    async fn claim(
        &self,
        tenant: &str,
        key: &str,
        fingerprint: Fingerprint,
        lock: Duration,
    ) -> Result<Claim, StoreError> {
        match self {
            Self::Memory(s) => Ok(s.claim(tenant, key, fingerprint, lock)),
            Self::Redis(s) => s.claim(key, fingerprint, lock).await,
        }
    }

    async fn finish(&self, key: &str, token: &str, done: Finished) -> Result<(), StoreError> {
        match self {
            Self::Memory(s) => {
                s.finish(key, token, done);
                Ok(())
            }
            Self::Redis(s) => s.finish(key, token, done).await,
        }
    }

    async fn release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        match self {
            Self::Memory(s) => {
                s.release(key, token);
                Ok(())
            }
            Self::Redis(s) => s.release(key, token).await,
        }
    }

    /// For `/readyz`: does the store answer?
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(s) => s.ping().await,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }
}

/// The idempotency layer: store plus retention and lock times.
/// A finished request's answer, to keep under its key for `retention`.
#[derive(Debug, Clone)]
pub struct Finished {
    pub fingerprint: Fingerprint,
    pub outcome: StoredOutcome,
    pub retention: Duration,
}

pub struct Idempotency {
    pub store: Store,
    retention: Duration,
    lock: Duration,
}

/// Statuses kept for replay. Everything else (400 validation, 403, 503, 504, ...) releases
/// the key: either nothing happened, or it is transient and the client should retry.
fn is_final(status: u16) -> bool {
    matches!(status, 200 | 202 | 207 | 404 | 422)
}

impl Idempotency {
    pub fn new(store: Store, config: &IdempotencyConfig) -> Self {
        Self {
            store,
            retention: Duration::from_secs(config.retention_s),
            lock: Duration::from_secs(config.lock_timeout_s),
        }
    }

    /// Runs `work` at most once per (tenant, subject, key) while the key is retained, and
    /// replays its outcome to retries with the same fingerprint. `Err` is an answer given
    /// now: `work`'s own failure (kept for replay when final), or the key's refusal.
    pub async fn run<T, F, Fut>(
        &self,
        tenant: &str,
        subject: &str,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        work: F,
    ) -> Result<Answered<T>, ApiError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Outcome<T>, ApiError>>,
    {
        let store_key = format!("{tenant}\u{1f}{subject}\u{1f}{}", key.as_str());
        let claim = self
            .store
            .claim(tenant, &store_key, fingerprint, self.lock)
            .await
            .map_err(unavailable)?;
        let token = match claim {
            Claim::New { token } => token,
            Claim::InFlight => {
                telemetry::idempotency("in_use");
                return Err(ApiError::IdempotencyKeyInUse);
            }
            Claim::Mismatch => {
                telemetry::idempotency("mismatch");
                return Err(ApiError::IdempotencyKeyMismatch);
            }
            Claim::Done(stored) => {
                telemetry::idempotency("replayed");
                let outcome = Outcome::decode(&stored).map_err(|e| {
                    unavailable(StoreError(format!("unreadable idempotency record: {e}")))
                })?;
                return Ok(Answered {
                    outcome,
                    replayed: true,
                });
            }
            Claim::TenantFull => {
                telemetry::idempotency("full");
                return Err(ApiError::RateLimited {
                    detail: "this tenant's share of the idempotency store \
                             (idempotency.max_entries_per_tenant, max_bytes_per_tenant) \
                             is taken by its own requests still in flight; retry when \
                             some have finished"
                        .to_owned(),
                    retry_after: Duration::from_secs(1),
                });
            }
            Claim::StoreFull => {
                telemetry::idempotency("full");
                return Err(unavailable(StoreError(
                    "the memory store is full (idempotency.max_entries, max_bytes) with \
                     other tenants' keys"
                        .to_owned(),
                )));
            }
        };
        telemetry::idempotency("new");
        let result = work().await;
        let status = match &result {
            Ok(outcome) => outcome.status(),
            Err(error) => error.status().as_u16(),
        };
        if !is_final(status) {
            if let Err(e) = self.store.release(&store_key, &token).await {
                tracing::warn!(error = %e, "Could not release an idempotency key; it frees itself after the lock time.");
            }
            return result.map(Answered::fresh);
        }
        let stored = match &result {
            Ok(outcome) => outcome.encode(),
            Err(error) => Outcome::<T>::Failure(error.problem().into()).encode(),
        };
        let finished = match stored {
            Ok(stored) => {
                self.store
                    .finish(
                        &store_key,
                        &token,
                        Finished {
                            fingerprint,
                            outcome: stored,
                            retention: self.retention,
                        },
                    )
                    .await
            }
            Err(e) => Err(StoreError(format!("could not serialise the answer: {e}"))),
        };
        if let Err(e) = finished {
            // The publish happened; answer it. A retry finds the key in flight until the
            // lock expires, then runs again with the same derived message_id.
            tracing::warn!(error = %e, "Could not store an idempotent response.");
        }
        result.map(Answered::fresh)
    }
}

fn unavailable(error: StoreError) -> ApiError {
    ApiError::IdempotencyStoreUnavailable(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_forms() {
        let k = |s: &str| IdempotencyKey::parse(s.as_bytes());
        assert_eq!(k("abc").unwrap(), k("\"abc\"").unwrap());
        assert_eq!(k("\"a\\\"b\"").unwrap().as_str(), "a\"b");
        assert_eq!(k("\"a\\\\b\"").unwrap().as_str(), "a\\b");
        assert_eq!(k("with space").unwrap().as_str(), "with space");
        assert!(k("").is_err());
        assert!(k("\"\"").is_err());
        assert!(k(&"x".repeat(256)).is_err());
        assert!(k(&"x".repeat(255)).is_ok());
        assert!(k("\"open").is_err());
        assert!(k("\"a\"b\"").is_err());
        assert!(k("\"a\\nb\"").is_err());
        assert!(IdempotencyKey::parse(b"caf\xc3\xa9").is_err());
        assert!(IdempotencyKey::parse(b"tab\there").is_err());
    }

    #[test]
    fn derived_message_ids_are_stable_and_distinct() {
        let key = IdempotencyKey::parse(b"order-1").unwrap();
        let id = |tenant, subject, index| key.message_id(tenant, subject, index);
        assert_eq!(id("acme", "svc-a", None), id("acme", "svc-a", None));
        assert_ne!(id("acme", "svc-a", None), id("globex", "svc-a", None));
        assert_ne!(id("acme", "svc-a", None), id("acme", "svc-b", None));
        assert_ne!(id("acme", "svc-a", Some(0)), id("acme", "svc-a", Some(1)));
        assert_ne!(id("acme", "svc-a", None), id("acme", "svc-a", Some(0)));
        assert_ne!(id("acme", "svc-a", Some(0)), id("acme", "svc-b", Some(0)));
        // A subject with a separator in it cannot pose as another (subject, key) pair.
        let other = IdempotencyKey::parse(b"1").unwrap();
        assert_ne!(
            key.message_id("acme", "x", None),
            other.message_id("acme", "x\u{1f}order-", None)
        );
    }

    fn memory_layer() -> Idempotency {
        Idempotency {
            store: Store::Memory(MemoryStore::new(Bounds::shared(100, 1 << 20))),
            retention: Duration::from_secs(60),
            lock: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn typed_outcomes_are_kept_replayed_or_released() {
        let layer = memory_layer();
        let fp = Fingerprint::of("POST", "/p", b"{}");
        let run = |key: &'static str, answer: Result<Outcome<u32>, ApiError>| {
            let layer = &layer;
            async move {
                let key = IdempotencyKey::parse(key.as_bytes()).unwrap();
                layer.run("t", "s", &key, fp, || async { answer }).await
            }
        };

        // A success runs once; the retry gets the first body back, marked replayed.
        let first = run("ok", Ok(Outcome::success(202, 7))).await.unwrap();
        assert_eq!(first, Answered::fresh(Outcome::success(202, 7)));
        let again = run("ok", Ok(Outcome::success(202, 8))).await.unwrap();
        assert_eq!(
            again,
            Answered {
                outcome: Outcome::success(202, 7),
                replayed: true
            }
        );

        // A final failure is answered as itself, then replayed as its problem.
        let gone = ApiError::ExchangeNotFound("x".into());
        let first = run("gone", Err(gone.clone())).await;
        assert!(matches!(first, Err(ApiError::ExchangeNotFound(_))));
        let again = run("gone", Ok(Outcome::success(202, 8))).await.unwrap();
        assert_eq!(
            again,
            Answered {
                outcome: Outcome::Failure(gone.problem().into()),
                replayed: true
            }
        );

        // A transient failure releases the key: the retry runs.
        let first = run("later", Err(ApiError::ConfirmTimeout("t".into()))).await;
        assert!(matches!(first, Err(ApiError::ConfirmTimeout(_))));
        let again = run("later", Ok(Outcome::success(202, 9))).await.unwrap();
        assert_eq!(again, Answered::fresh(Outcome::success(202, 9)));

        // The same key with another request is refused.
        let key = IdempotencyKey::parse(b"ok").unwrap();
        let other = Fingerprint::of("POST", "/p", b"[]");
        let answer = layer
            .run("t", "s", &key, other, || async {
                Ok(Outcome::success(202, 1u32))
            })
            .await;
        assert!(matches!(answer, Err(ApiError::IdempotencyKeyMismatch)));
    }

    #[test]
    fn fingerprints_cover_method_path_and_body() {
        let a = Fingerprint::of("POST", "/v1/publish", b"{}");
        assert_eq!(a, Fingerprint::of("POST", "/v1/publish", b"{}"));
        assert_ne!(a, Fingerprint::of("POST", "/v1/publish/batch", b"{}"));
        assert_ne!(a, Fingerprint::of("POST", "/v1/publish", b"{ }"));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), a);
    }
}
