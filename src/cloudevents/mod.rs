//! CloudEvents 1.0 (SPEC §12): events read over HTTP (`event`), carried on AMQP by the
//! RabbitMQ protocol binding and rendered back for subscribers (`amqp`), and published
//! with every publish guarantee plus (`source`, `id`) duplicate suppression (`publish`).
//! `event` and `amqp` are pure (timestamps are `crate::rfc3339`); nothing here knows HTTP
//! or the app state.

pub mod amqp;
pub mod event;
pub mod publish;

pub use amqp::{BATCH, Destination, Mode, Origin, STRUCTURED, delivery_json, render};
pub use event::{BatchError, Event, from_batch, from_binary, from_structured};
