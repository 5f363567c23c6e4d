//! Idempotency keys (SPEC §5, the IETF httpapi draft as Stripe practises it): the
//! semantics live here once; the memory and Redis stores only claim, finish and release.

mod memory;
mod redis_store;

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{IdempotencyConfig, StoreKind};
use crate::error::ApiError;
use crate::telemetry;
pub use memory::{Bounds, MemoryStore};
pub use redis_store::RedisStore;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// A validated `Idempotency-Key` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Reads the header: 1–255 printable ASCII characters, as a bare token or a quoted
    /// structured-field string (`"abc"` and `abc` are the same key).
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, ApiError> {
        let mut values = headers.get_all(HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(invalid("send one Idempotency-Key header, not several"));
        }
        Self::parse(value.as_bytes()).map(Some)
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

/// A finished answer, kept for replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl StoredResponse {
    fn size(&self) -> usize {
        self.content_type.len() + self.body.len() + 16
    }

    fn into_response(self, replayed: bool) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let mut response = (status, self.body).into_response();
        if let Ok(ct) = HeaderValue::from_str(&self.content_type) {
            response.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        if replayed {
            response
                .headers_mut()
                .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        }
        response
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
    Done(StoredResponse),
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

    async fn finish(
        &self,
        key: &str,
        token: &str,
        fingerprint: Fingerprint,
        response: StoredResponse,
        retention: Duration,
    ) -> Result<(), StoreError> {
        match self {
            Self::Memory(s) => {
                s.finish(key, token, fingerprint, response, retention);
                Ok(())
            }
            Self::Redis(s) => s.finish(key, token, fingerprint, response, retention).await,
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
    /// replays its answer to retries with the same fingerprint.
    pub async fn run<F, Fut>(
        &self,
        tenant: &str,
        subject: &str,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        work: F,
    ) -> Response
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Response>,
    {
        let store_key = format!("{tenant}\u{1f}{subject}\u{1f}{}", key.as_str());
        let claim = match self
            .store
            .claim(tenant, &store_key, fingerprint, self.lock)
            .await
        {
            Ok(claim) => claim,
            Err(e) => return unavailable(e).into_response(),
        };
        let token = match claim {
            Claim::New { token } => token,
            Claim::InFlight => {
                telemetry::idempotency("in_use");
                return ApiError::IdempotencyKeyInUse.into_response();
            }
            Claim::Mismatch => {
                telemetry::idempotency("mismatch");
                return ApiError::IdempotencyKeyMismatch.into_response();
            }
            Claim::Done(stored) => {
                telemetry::idempotency("replayed");
                return stored.into_response(true);
            }
            Claim::TenantFull => {
                telemetry::idempotency("full");
                return ApiError::RateLimited {
                    detail: "this tenant's share of the idempotency store \
                             (idempotency.max_entries_per_tenant, max_bytes_per_tenant) \
                             is taken by its own requests still in flight; retry when \
                             some have finished"
                        .to_owned(),
                    retry_after: Duration::from_secs(1),
                }
                .into_response();
            }
            Claim::StoreFull => {
                telemetry::idempotency("full");
                return unavailable(StoreError(
                    "the memory store is full (idempotency.max_entries, max_bytes) with \
                     other tenants' keys"
                        .to_owned(),
                ))
                .into_response();
            }
        };
        telemetry::idempotency("new");
        let response = work().await;
        let status = response.status().as_u16();
        if !is_final(status) {
            if let Err(e) = self.store.release(&store_key, &token).await {
                tracing::warn!(error = %e, "Could not release an idempotency key; it frees itself after the lock time.");
            }
            return response;
        }
        let (parts, body) = response.into_parts();
        let bytes = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => bytes,
            Err(e) => return ApiError::Internal(e.to_string()).into_response(),
        };
        let stored = StoredResponse {
            status,
            content_type: parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_owned(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
        };
        if let Err(e) = self
            .store
            .finish(&store_key, &token, fingerprint, stored, self.retention)
            .await
        {
            // The publish happened; answer it. A retry finds the key in flight until the
            // lock expires, then runs again with the same derived message_id.
            tracing::warn!(error = %e, "Could not store an idempotent response.");
        }
        axum::response::Response::from_parts(parts, axum::body::Body::from(bytes))
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
