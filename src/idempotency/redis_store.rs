//! The shared idempotency store for several replicas: Redis, with claim, finish and
//! release each one atomic Lua script, keys namespaced and hashed.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::{Claim, Fingerprint, Finished, StoreError, StoredOutcome};
use crate::config::IdempotencyConfig;

pub struct RedisStore {
    client: redis::Client,
    /// Connected lazily and re-used; the manager reconnects by itself after that.
    connection: Mutex<Option<ConnectionManager>>,
    prefix: String,
    timeout: Duration,
    claim: Script,
    finish: Script,
    release: Script,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum Record {
    Pending {
        fp: Fingerprint,
        token: String,
    },
    Done {
        fp: Fingerprint,
        response: StoredOutcome,
    },
}

/// Returns the existing record, or sets ours (pending, with a lock time) and returns nil.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// Replaces our pending record (matched by token) with the final one.
const FINISH: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if cjson.decode(v).token ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Deletes our pending record (matched by token).
const RELEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if cjson.decode(v).token ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

impl RedisStore {
    pub async fn connect(config: &IdempotencyConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| StoreError(format!("invalid idempotency.redis_url: {e}")))?;
        let store = Self {
            client,
            connection: Mutex::new(None),
            prefix: config.key_prefix.clone(),
            timeout: Duration::from_millis(config.redis_timeout_ms),
            claim: Script::new(CLAIM),
            finish: Script::new(FINISH),
            release: Script::new(RELEASE),
        };
        // Try once now so a misconfiguration shows at start; failure is not fatal
        // (readiness stays red and idempotent requests answer 503 until Redis answers).
        if let Err(e) = store.connection().await {
            tracing::warn!(error = %e, "Redis for idempotency keys is not reachable yet.");
        }
        Ok(store)
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = tokio::time::timeout(self.timeout, self.client.get_connection_manager())
            .await
            .map_err(|_| StoreError("timed out connecting to Redis".into()))?
            .map_err(|e| StoreError(e.to_string()))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    fn key(&self, key: &str) -> String {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}{hex}", self.prefix)
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| StoreError("Redis did not answer in time".into()))?
            .map_err(|e| StoreError(e.to_string()))
    }

    pub async fn claim(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lock: Duration,
    ) -> Result<Claim, StoreError> {
        let mut connection = self.connection().await?;
        let token = crate::ids::uuid_v4().to_string();
        let pending = encode(&Record::Pending {
            fp: fingerprint,
            token: token.clone(),
        })?;
        let existing: Option<String> = self
            .bounded(
                self.claim
                    .key(self.key(key))
                    .arg(pending)
                    .arg(lock.as_millis().max(1) as u64)
                    .invoke_async(&mut connection),
            )
            .await?;
        let Some(existing) = existing else {
            return Ok(Claim::New { token });
        };
        let record: Record = serde_json::from_str(&existing)
            .map_err(|e| StoreError(format!("unreadable idempotency record: {e}")))?;
        Ok(match record {
            Record::Pending { fp, .. } | Record::Done { fp, .. } if fp != fingerprint => {
                Claim::Mismatch
            }
            Record::Pending { .. } => Claim::InFlight,
            Record::Done { response, .. } => Claim::Done(response),
        })
    }

    pub async fn finish(&self, key: &str, token: &str, done: Finished) -> Result<(), StoreError> {
        let Finished {
            fingerprint,
            outcome: response,
            retention,
        } = done;
        let mut connection = self.connection().await?;
        let done = encode(&Record::Done {
            fp: fingerprint,
            response,
        })?;
        let _: i64 = self
            .bounded(
                self.finish
                    .key(self.key(key))
                    .arg(token)
                    .arg(done)
                    .arg(retention.as_millis().max(1) as u64)
                    .invoke_async(&mut connection),
            )
            .await?;
        Ok(())
    }

    pub async fn release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let _: i64 = self
            .bounded(
                self.release
                    .key(self.key(key))
                    .arg(token)
                    .invoke_async(&mut connection),
            )
            .await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let _: String = self.bounded(connection.ping()).await?;
        Ok(())
    }
}

fn encode(record: &Record) -> Result<String, StoreError> {
    serde_json::to_string(record).map_err(|e| StoreError(e.to_string()))
}
