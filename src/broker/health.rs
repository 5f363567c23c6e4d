//! Health of one vhost's broker link: connected or not, blocked by an alarm or not,
//! and when the next reconnect attempt is due. Read on every publish to fail fast.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::telemetry;

#[derive(Debug)]
pub struct Health {
    vhost: String,
    connected: AtomicBool,
    blocked: AtomicBool,
    /// Warren closed the pool itself (shutdown, an idle dynamic tenant): the link
    /// going away then is not news for the log.
    closed: AtomicBool,
    detail: Mutex<Detail>,
    /// Wakes the supervisor when a publish path notices the link is gone.
    pub(super) kick: Notify,
    /// Follows `connected`, for callers that wait for a fresh pool to come up.
    up: tokio::sync::watch::Sender<bool>,
    /// Per-vhost gauges only for vhosts with a bounded label (configured tenants).
    metrics: bool,
}

#[derive(Debug, Clone)]
struct Detail {
    last_error: Option<String>,
    blocked_reason: Option<String>,
    next_attempt: Instant,
}

/// Why the broker cannot take a publish right now.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub reason: String,
    pub retry_after: Duration,
}

/// A vhost link's state, as `/readyz` reports it (its wire form is in `api/health.rs`).
#[derive(Debug, Clone)]
pub struct HealthReport {
    pub vhost: String,
    pub connected: bool,
    pub blocked: bool,
    pub error: Option<String>,
}

/// While blocked by an alarm there is no reconnect schedule to point at; this is a
/// reasonable wait for a memory or disk alarm to clear.
const BLOCKED_RETRY_AFTER: Duration = Duration::from_secs(5);

impl Health {
    pub fn new(vhost: &str, metrics: bool) -> Self {
        Self {
            vhost: vhost.to_owned(),
            connected: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            detail: Mutex::new(Detail {
                last_error: Some("not connected yet".to_owned()),
                blocked_reason: None,
                next_attempt: Instant::now(),
            }),
            kick: Notify::new(),
            up: tokio::sync::watch::channel(false).0,
            metrics,
        }
    }

    /// Waits until the link is up, at most `timeout`; says whether it is.
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let mut up = self.up.subscribe();
        matches!(
            tokio::time::timeout(timeout, up.wait_for(|up| *up)).await,
            Ok(Ok(_))
        )
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails fast when publishing cannot work: not connected, or blocked by an alarm.
    pub fn check(&self) -> Result<(), Unavailable> {
        if !self.connected.load(Ordering::Acquire) {
            let detail = self.detail();
            let wait = detail
                .next_attempt
                .saturating_duration_since(Instant::now());
            // The cause (which can quote the broker) is in the log and on /readyz,
            // never in a client's answer.
            return Err(Unavailable {
                reason: "no connection to the broker; reconnecting".to_owned(),
                retry_after: wait,
            });
        }
        if self.blocked.load(Ordering::Acquire) {
            return Err(Unavailable {
                reason: "the broker is blocking publishers (a resource alarm)".to_owned(),
                retry_after: BLOCKED_RETRY_AFTER,
            });
        }
        Ok(())
    }

    /// Warren is closing this vhost's pool on purpose: not ready from now on, logged
    /// once at info, and the connection errors the close causes are not a link loss.
    pub(super) fn mark_closed(&self, why: &str) {
        self.closed.store(true, Ordering::Release);
        self.detail().last_error = Some(why.to_owned());
        if self.connected.swap(false, Ordering::AcqRel) {
            info!(vhost = %self.vhost, why, "Broker link closed by Warren.");
            self.up.send_replace(false);
            if self.metrics {
                telemetry::broker_connected(&self.vhost, false);
            }
        }
    }

    pub fn mark_down(&self, reason: &str) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        {
            let mut detail = self.detail();
            detail.last_error = Some(reason.to_owned());
        }
        if self.connected.swap(false, Ordering::AcqRel) {
            warn!(vhost = %self.vhost, %reason, "Broker link down; publishes answer 503 until it is back.");
            self.up.send_replace(false);
            if self.metrics {
                telemetry::broker_connected(&self.vhost, false);
            }
        }
        self.blocked.store(false, Ordering::Release);
        self.kick.notify_one();
    }

    pub(super) fn mark_up(&self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        {
            let mut detail = self.detail();
            detail.last_error = None;
        }
        if !self.connected.swap(true, Ordering::AcqRel) {
            info!(vhost = %self.vhost, "Broker link up.");
            self.up.send_replace(true);
            if self.metrics {
                telemetry::broker_connected(&self.vhost, true);
            }
        }
    }

    pub(super) fn schedule_retry(&self, at: Instant) {
        self.detail().next_attempt = at;
    }

    pub fn set_blocked(&self, reason: Option<String>) {
        let blocked = reason.is_some();
        self.detail().blocked_reason = reason;
        self.blocked.store(blocked, Ordering::Release);
        if self.metrics {
            telemetry::broker_blocked(&self.vhost, blocked);
        }
    }

    pub fn report(&self) -> HealthReport {
        let detail = self.detail().clone();
        HealthReport {
            vhost: self.vhost.clone(),
            connected: self.is_connected(),
            blocked: self.blocked.load(Ordering::Acquire),
            error: detail.last_error.or(detail.blocked_reason),
        }
    }
}
