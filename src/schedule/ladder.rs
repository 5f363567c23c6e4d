//! The ladder's shape, the same on every vhost: which rung a delay takes, the queues and
//! their arguments. Pure: the accept side (a due time's top rung) and the router (the
//! next hop) read it; [`super::declare`] declares it.

use lapin::types::{AMQPValue, FieldTable};

use super::long;

/// The queue every rung dead-letters into, consumed by the routers.
pub const DUE_QUEUE: &str = "warren.scheduled.due";
/// Messages that could not fire (unroutable, exchange gone, grant withdrawn).
pub const DLQ: &str = "warren.scheduled.dlq";
/// The shortest rung's TTL, and the precision of a hop: a message under this from its
/// time is held by the router until then.
pub const STEP_MS: u64 = 100;

/// The rung for `remaining` ms: the longest one no longer than it, at most `top`;
/// `None` under [`STEP_MS`] (fire now).
pub fn rung(remaining_ms: u64, top: u32) -> Option<u32> {
    let steps = remaining_ms / STEP_MS;
    if steps == 0 {
        return None;
    }
    Some((63 - steps.leading_zeros()).min(top))
}

/// The longest rung a `max_delay_ms` needs: 100 ms · 2^top ≤ max_delay_ms.
pub fn top_rung(max_delay_ms: u64) -> u32 {
    rung(max_delay_ms, u32::MAX).unwrap_or(0)
}

pub fn rung_queue(k: u32) -> String {
    format!("warren.scheduled.l{k}")
}

/// The ladder's queues with their arguments, rungs `0..=top`.
pub fn ladder(top: u32) -> Vec<(String, FieldTable)> {
    let quorum = |extra: &[(&str, AMQPValue)]| {
        let mut table = FieldTable::default();
        table.insert("x-queue-type".into(), long("quorum"));
        for (name, value) in extra {
            table.insert((*name).into(), value.clone());
        }
        table
    };
    let mut queues = vec![
        // The router puts a message back while the broker refuses its publish; from
        // RabbitMQ 4.0 a quorum queue drops a message after 20 deliveries unless told
        // otherwise. A million tries, a second apart, is eleven days.
        (
            DUE_QUEUE.to_owned(),
            quorum(&[("x-delivery-limit", AMQPValue::LongLongInt(1_000_000))]),
        ),
        (DLQ.to_owned(), quorum(&[])),
    ];
    for k in 0..=top {
        let ttl = STEP_MS.saturating_mul(1u64 << k.min(40));
        queues.push((
            rung_queue(k),
            quorum(&[
                (
                    "x-message-ttl",
                    AMQPValue::LongLongInt(i64::try_from(ttl).unwrap_or(i64::MAX)),
                ),
                ("x-dead-letter-exchange", long("")),
                ("x-dead-letter-routing-key", long(DUE_QUEUE)),
                // Dead-lettered with the queue's own confirms, and kept until the due
                // queue has it; that strategy needs overflow reject-publish.
                ("x-dead-letter-strategy", long("at-least-once")),
                ("x-overflow", long("reject-publish")),
            ]),
        ));
    }
    queues
}
