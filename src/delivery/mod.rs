//! Deliveries, whatever carries them: the sources that consume the broker for a
//! subscriber (`live`: one shared queue per topic fanned out in-process; `durable`: an
//! acknowledged consumer of a named or existing queue; `stream`: replay from a stream
//! offset) and the one renderer of a delivery (`render`). The transports sit above and
//! only write what they are handed: WebSocket sessions (`ws/`), server-sent events
//! (`api/sse.rs`), push subscriptions (`push/`) and pull receives (`pull/`).
//! A source knows nothing of the transport but the sink it writes to ([`Outgoing`] on
//! a bounded channel, with a [`SendBudget`] of bytes).

pub mod durable;
pub mod live;
pub mod render;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use render::MessageFrame;

/// What a source hands its transport to write (a socket, an event stream).
pub enum Outgoing {
    /// A delivery, with the share of the socket's byte budget it holds until written.
    Message(Box<MessageFrame>, OwnedSemaphorePermit),
    /// A subscription ended from the broker side (consumer lost).
    Ended {
        subscription: String,
        error: ApiError,
    },
}

/// The bytes of message frames waiting for one socket (`ws.max_buffered_bytes`), on top
/// of the frame count its channel bounds (`ws.send_buffer`): large messages and a slow
/// reader cannot make a socket hold more than this.
#[derive(Clone)]
pub struct SendBudget {
    bytes: Arc<Semaphore>,
    max: usize,
}

impl SendBudget {
    pub fn new(max: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// The whole budget, in bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    /// What a frame of `len` bytes takes: a frame larger than the whole budget takes
    /// all of it (so it waits until the socket has nothing else queued).
    fn cost(&self, len: usize) -> u32 {
        u32::try_from(len.clamp(1, self.max)).unwrap_or(u32::MAX)
    }

    /// Room for a frame now, or `None` (live deliveries are dropped then).
    pub fn try_take(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        self.bytes
            .clone()
            .try_acquire_many_owned(self.cost(len))
            .ok()
    }

    /// Room for a frame within `timeout`, or `None` (the reader is too slow).
    pub async fn take(&self, len: usize, timeout: Duration) -> Option<OwnedSemaphorePermit> {
        let wanted = self.bytes.clone().acquire_many_owned(self.cost(len));
        tokio::time::timeout(timeout, wanted).await.ok()?.ok()
    }
}

/// A broker failure while subscribing, in a subscriber's words: a publish's talk of
/// confirms and Idempotency-Keys means nothing here.
pub fn subscribe_failure(error: crate::broker::PublishError) -> ApiError {
    match error {
        crate::broker::PublishError::LostBeforeConfirm(_) => ApiError::BrokerUnavailable {
            detail: "the broker closed the subscription's channel; subscribe again".to_owned(),
            retry_after: Duration::from_secs(1),
        },
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_byte_budget_bounds_what_waits_for_a_socket() {
        let budget = SendBudget::new(1000);
        let a = budget.try_take(600).expect("room for the first frame");
        assert!(budget.try_take(600).is_none(), "a live copy is dropped");
        // A durable delivery waits for room, and gives up after its timeout.
        assert!(budget.take(600, Duration::from_millis(20)).await.is_none());
        drop(a);
        let b = budget.take(600, Duration::from_millis(20)).await;
        assert!(b.is_some(), "room once the first frame was written");
        drop(b);
        // A frame larger than the whole budget takes all of it, never more.
        let whole = budget
            .try_take(5_000_000)
            .expect("an empty budget takes it");
        assert!(budget.try_take(1).is_none());
        drop(whole);
        assert!(budget.try_take(1000).is_some());
    }
}
