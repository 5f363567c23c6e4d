//! `topology.apply_on_start`: applies the topology in the background at `warren serve`
//! (retrying while the broker cannot be reached) and holds what `/readyz` reports:
//! not ready until applied, and never while the topology conflicts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::run::apply_on_start;
use crate::config::{AmqpConfig, ResolvedTenant};

/// How long to wait before trying again when the broker did not answer.
const RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Off,
    Pending(String),
    Applied,
    Conflict(String),
}

/// The state of the startup apply, read by `/readyz`.
#[derive(Debug)]
pub struct Startup(Mutex<Status>);

impl Default for Startup {
    fn default() -> Self {
        Self(Mutex::new(Status::Off))
    }
}

impl Startup {
    fn set(&self, status: Status) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// `None` when `apply_on_start` is off; else whether it is applied and, if not, why.
    pub fn report(&self) -> Option<(bool, Option<String>)> {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Status::Off => None,
            Status::Applied => Some((true, None)),
            Status::Pending(why) | Status::Conflict(why) => Some((false, Some(why.clone()))),
        }
    }

    /// Starts applying `tenants`' topology on `tasks`, until applied, conflicting, or
    /// `stop`.
    pub fn spawn(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        stop: CancellationToken,
        amqp: AmqpConfig,
        tenants: Vec<ResolvedTenant>,
    ) {
        self.set(Status::Pending("the topology is being applied".to_owned()));
        let this = self.clone();
        tasks.spawn(async move {
            loop {
                let result = tokio::select! {
                    result = apply_on_start(&amqp, tenants.iter()) => result,
                    () = stop.cancelled() => return,
                };
                match result {
                    Ok(()) => return this.set(Status::Applied),
                    Err(failure) if !failure.retryable => {
                        return this.set(Status::Conflict(failure.reason));
                    }
                    Err(failure) => this.set(Status::Pending(failure.reason)),
                }
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    () = stop.cancelled() => return,
                }
            }
        });
    }
}
