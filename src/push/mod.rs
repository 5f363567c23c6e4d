//! Push subscriptions (SPEC §13): Warren consumes a queue and POSTs each message to an
//! HTTP endpoint, signed as Standard Webhooks specify, with the queue's retry policy as
//! the only retry owner. A transport over the delivery layer: the message is rendered
//! by `delivery::render` (or as a CloudEvent in HTTP binary mode, `cloudevents.rs`),
//! sent by `client.rs` (no redirects, bounded reads, no private addresses unless
//! allowed), signed by `sign.rs`, and settled by `subscription.rs`.

pub mod client;
mod cloudevents;
pub mod sign;
pub mod subscription;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{PushSettings, Resolved};
use crate::tenancy::Tenants;
pub use subscription::{State, Status};

/// Every configured push subscription running on this replica.
#[derive(Default)]
pub struct Pushes {
    running: Vec<Arc<subscription::Shared>>,
}

impl Pushes {
    /// The HTTP client the subscriptions share, when there are any (built before the
    /// broker pools start, so that a failure here leaves nothing to tear down).
    pub fn client(
        resolved: &Resolved,
        settings: &PushSettings,
    ) -> anyhow::Result<Option<client::PushClient>> {
        if resolved.tenants.values().all(|t| t.push.is_empty()) {
            return Ok(None);
        }
        Ok(Some(client::PushClient::new(settings)?))
    }

    /// Starts one task per configured subscription on `tasks`; each ends on `stop`.
    pub fn start(
        resolved: &Resolved,
        settings: &PushSettings,
        client: Option<client::PushClient>,
        tenants: &Tenants,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Self {
        let Some(client) = client else {
            return Self::default();
        };
        let mut running = Vec::new();
        for spec in resolved.tenants.values().flat_map(|t| t.push.iter()) {
            // Configured tenants always resolve.
            let Ok(tenant) = tenants.get(&spec.tenant) else {
                continue;
            };
            let (subscription, shared) = subscription::Subscription::new(
                spec.clone(),
                tenant,
                client.clone(),
                settings.clone(),
            );
            tasks.spawn(subscription.run(stop.clone()));
            running.push(shared);
        }
        Self { running }
    }

    /// Each subscription's state, for the operators' `/readyz`.
    pub fn statuses(&self) -> Vec<Status> {
        self.running.iter().map(|s| s.status()).collect()
    }
}
