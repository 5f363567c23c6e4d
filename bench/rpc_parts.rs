//! Request/reply pieces shared by the load generator (`rpc.rs`), the thin relay
//! (`relay.rs`) and the profiler (`profile.rs`): a queue bound to the bench exchange,
//! the echo responder, and a confirm-mode channel consuming direct reply-to with its
//! calls awaiting replies.

// Each of the three binaries uses a part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio::sync::oneshot;

pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Calls awaiting their reply on one channel, by correlation id.
pub type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Declares `queue` with `options` and binds it to `exchange` with `key`.
pub async fn declare_bound(
    ch: &Channel,
    queue: &str,
    options: QueueDeclareOptions,
    exchange: &str,
    key: &str,
) -> lapin::Result<()> {
    ch.queue_declare(queue.into(), options, FieldTable::default())
        .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// A consumer of `queue` that needs no acks (direct reply-to requires it; the echo
/// responder does not need them).
async fn consume_no_ack(channel: &Channel, queue: &str, tag: &str) -> lapin::Result<Consumer> {
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    channel
        .basic_consume(queue.into(), tag.into(), no_ack, FieldTable::default())
        .await
}

/// Echoes every request on `queue` to its `reply_to` with its correlation id (as JSON),
/// on a channel of its own.
pub async fn echo_responder(
    conn: &Connection,
    queue: &str,
) -> lapin::Result<tokio::task::JoinHandle<()>> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut requests = consume_no_ack(&ch, queue, "bench-responder").await?;
    Ok(tokio::spawn(async move {
        while let Some(Ok(delivery)) = requests.next().await {
            let p = &delivery.properties;
            let (Some(reply_to), Some(id)) = (p.reply_to(), p.correlation_id()) else {
                continue;
            };
            let reply = BasicProperties::default()
                .with_correlation_id(id.clone())
                .with_content_type("application/json".into());
            let _ = ch
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    reply,
                )
                .await;
        }
    }))
}

/// A confirm-mode channel consuming direct reply-to, with its calls awaiting replies
/// (a task hands each reply to the call awaiting its correlation id).
pub async fn reply_channel(conn: &Connection) -> lapin::Result<(Channel, Waiting)> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut replies = consume_no_ack(&channel, DIRECT_REPLY_TO, "bench-replies").await?;
    let waiting: Waiting = Arc::default();
    let map = waiting.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = replies.next().await {
            let waiter = delivery
                .properties
                .correlation_id()
                .as_ref()
                .and_then(|id| lock(&map).remove(id.as_str()));
            if let Some(waiter) = waiter {
                let _ = waiter.send(delivery.data);
            }
        }
    });
    Ok((channel, waiting))
}
