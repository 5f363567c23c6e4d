//! Per-tenant quotas: message and byte rates (token buckets), publishes in flight, and
//! open WebSockets. Exceeding one is `429 rate_limited` with `Retry-After`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::error::ApiError;

/// A token bucket refilled at `rate` per second, holding at most one second's worth.
pub(crate) struct Bucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub(crate) fn new(rate: f64) -> Self {
        Self {
            rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    /// Takes `n` tokens or says how long until they would be there. A request larger
    /// than the whole bucket passes when the bucket is full, leaving it in debt.
    pub(crate) fn take(&self, n: f64) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
        *last = now;
        let needed = n.min(self.rate);
        if *tokens >= needed {
            *tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - *tokens) / self.rate))
        }
    }

    fn refund(&self, n: f64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 = (state.0 + n).min(self.rate);
    }
}

pub struct Quota {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    inflight: Option<(Arc<Semaphore>, usize)>,
    pub max_websockets: Option<usize>,
    /// `limits.max_sse_connections`: open event streams (else `sse.max_connections_per_tenant`).
    pub max_sse_connections: Option<usize>,
    consumers: Arc<Semaphore>,
    max_consumers: usize,
    waiting: Arc<Semaphore>,
    max_waiting: usize,
}

/// Broker consumers a tenant may hold when `limits.max_consumers` is unset.
pub const DEFAULT_MAX_CONSUMERS: usize = 256;
/// Waiting HTTP requests a tenant may hold when `limits.max_waiting_requests` is unset:
/// a tenth of the default `server.max_waiting_requests`, so at least ten tenants are
/// needed to fill the gateway's.
pub const DEFAULT_MAX_WAITING_REQUESTS: usize = 1_000;

fn max_waiting(limits: &LimitsConfig) -> usize {
    limits
        .max_waiting_requests
        .unwrap_or(DEFAULT_MAX_WAITING_REQUESTS)
}

/// Held while publishes are in flight (releases the tenant's in-flight slots on drop).
pub struct Admitted {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Quota {
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            messages: limits.publish_rate.map(Bucket::new),
            bytes: limits.publish_bytes_rate.map(Bucket::new),
            inflight: limits
                .max_inflight_publishes
                .map(|max| (Arc::new(Semaphore::new(max)), max)),
            max_websockets: limits.max_websockets,
            max_sse_connections: limits.max_sse_connections,
            consumers: Arc::new(Semaphore::new(
                limits.max_consumers.unwrap_or(DEFAULT_MAX_CONSUMERS),
            )),
            max_consumers: limits.max_consumers.unwrap_or(DEFAULT_MAX_CONSUMERS),
            waiting: Arc::new(Semaphore::new(max_waiting(limits))),
            max_waiting: max_waiting(limits),
        }
    }

    /// One waiting request of the tenant (see [`crate::WaitingSlots`]), held until
    /// dropped; past `limits.max_waiting_requests`, 429.
    pub fn admit_waiting(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.waiting
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::RateLimited {
                detail: format!(
                    "the tenant already has {} requests waiting (limits.max_waiting_requests)",
                    self.max_waiting
                ),
                retry_after: Duration::from_secs(1),
            })
    }

    /// One broker consumer (channel + queue) for the tenant, held until dropped; past
    /// `limits.max_consumers`, 429.
    pub fn admit_consumer(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.consumers
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::RateLimited {
                detail: format!(
                    "the tenant already holds {} broker consumers (limits.max_consumers); unsubscribe first",
                    self.max_consumers
                ),
                retry_after: Duration::from_secs(5),
            })
    }

    /// Admits `messages` publishes carrying `bytes` of bodies, or answers 429.
    pub fn admit(&self, tenant: &str, messages: usize, bytes: usize) -> Result<Admitted, ApiError> {
        let limited = |what: String, wait: Duration| ApiError::RateLimited {
            detail: format!("tenant {tenant:?} is over its {what}"),
            retry_after: wait,
        };
        let permit = match &self.inflight {
            None => None,
            Some((semaphore, max)) => {
                let n = u32::try_from(messages.min(*max)).unwrap_or(u32::MAX);
                Some(semaphore.clone().try_acquire_many_owned(n).map_err(|_| {
                    limited(
                        format!(
                            "limit of {max} publishes in flight (limits.max_inflight_publishes)"
                        ),
                        Duration::from_secs(1),
                    )
                })?)
            }
        };
        if let Some(bucket) = &self.messages {
            bucket.take(messages as f64).map_err(|wait| {
                limited(
                    format!(
                        "rate of {} messages per second (limits.publish_rate)",
                        bucket.rate
                    ),
                    wait,
                )
            })?;
        }
        if let Some(bucket) = &self.bytes
            && let Err(wait) = bucket.take(bytes as f64)
        {
            if let Some(messages_bucket) = &self.messages {
                messages_bucket.refund(messages as f64);
            }
            return Err(limited(
                format!(
                    "rate of {} bytes per second (limits.publish_bytes_rate)",
                    bucket.rate
                ),
                wait,
            ));
        }
        Ok(Admitted { _permit: permit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(rate: Option<f64>, bytes: Option<f64>, inflight: Option<usize>) -> Quota {
        Quota::new(&LimitsConfig {
            publish_rate: rate,
            publish_bytes_rate: bytes,
            max_inflight_publishes: inflight,
            max_websockets: None,
            max_consumers: None,
            max_sse_connections: None,
            max_waiting_requests: None,
        })
    }

    #[test]
    fn message_rate_allows_a_burst_then_says_when_to_retry() {
        let q = quota(Some(5.0), None, None);
        for _ in 0..5 {
            assert!(q.admit("t", 1, 10).is_ok());
        }
        match q.admit("t", 1, 10) {
            Err(ApiError::RateLimited { retry_after, .. }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200));
            }
            other => panic!("expected 429, got {:?}", other.err()),
        }
    }

    #[test]
    fn byte_rate_refunds_the_message_bucket_when_it_refuses() {
        let q = quota(Some(10.0), Some(100.0), None);
        assert!(q.admit("t", 1, 100).is_ok());
        assert!(q.admit("t", 1, 50).is_err());
        // The refused publish did not eat a message token: nine remain.
        for _ in 0..9 {
            assert!(q.messages.as_ref().unwrap().take(1.0).is_ok());
        }
        assert!(q.messages.as_ref().unwrap().take(1.0).is_err());
    }

    #[test]
    fn in_flight_slots_are_held_until_dropped() {
        let q = quota(None, None, Some(2));
        let a = q.admit("t", 2, 0).unwrap();
        assert!(q.admit("t", 1, 0).is_err());
        drop(a);
        assert!(q.admit("t", 1, 0).is_ok());
    }

    #[test]
    fn unlimited_admits_everything() {
        let q = quota(None, None, None);
        for _ in 0..10_000 {
            assert!(q.admit("t", 100, 1 << 20).is_ok());
        }
    }
}
