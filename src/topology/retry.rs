//! The retry policy of a queue (SPEC §11): a `nack` with `requeue: false` republishes
//! the message, confirmed, to its next delay queue with `x-warren-attempt` one higher
//! (after the last delay: to `<queue>.dlq`, the attempt unchanged), and only then is
//! the original acknowledged. The delay queue's TTL dead-letters it back to the queue,
//! and the broker records each pass in `x-death`, which travels along.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::broker::{Broker, OutgoingMessage, PublishError};
use crate::config::RetryPolicy;
use crate::publishing::ROUTING_HEADERS;

/// The header that counts the delays a message has been through (absent: none).
pub const ATTEMPT_HEADER: &str = "x-warren-attempt";

/// A delivery kept until its client settles it, for a republish on `nack`.
#[derive(Debug, Clone)]
pub struct Retained {
    pub body: bytes::Bytes,
    pub properties: BasicProperties,
}

/// The attempt a message carries: 0 without the header; any integer type is read,
/// anything else (or a negative number) counts as 0.
pub fn attempt(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers() else {
        return 0;
    };
    let value = headers
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == ATTEMPT_HEADER)
        .map(|(_, v)| v);
    let n: i128 = match value {
        Some(AMQPValue::ShortShortInt(n)) => (*n).into(),
        Some(AMQPValue::ShortShortUInt(n)) => (*n).into(),
        Some(AMQPValue::ShortInt(n)) => (*n).into(),
        Some(AMQPValue::ShortUInt(n)) => (*n).into(),
        Some(AMQPValue::LongInt(n)) => (*n).into(),
        Some(AMQPValue::LongUInt(n)) => (*n).into(),
        Some(AMQPValue::LongLongInt(n)) => (*n).into(),
        _ => 0,
    };
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// The properties a message carries when Warren republishes it to a queue of its own
/// choosing (a retry hop, the DLQ, a redrive): the attempt header set to `attempt`
/// (removed when `None`), every other property and header kept, `x-death` included,
/// except the sender-selected distribution headers (`CC`, `BCC`). Those name more
/// routing keys for whatever exchange the message is published to, and Warren
/// republishes through the default exchange, where a routing key is a queue name: kept,
/// they would deliver a copy to any queue of the vhost they name (security issue #27).
/// Whoever put them there, a client through Warren or any AMQP producer, they were
/// granted (if at all) for the exchange of the first publish, not for this one.
pub fn for_republish(properties: &BasicProperties, attempt: Option<u32>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (k, v) in old.inner() {
            let name = k.as_str();
            if name != ATTEMPT_HEADER && !ROUTING_HEADERS.contains(&name) {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    if let Some(attempt) = attempt {
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt));
    }
    without_user_id(properties).with_headers(headers)
}

/// `properties` without `user_id`: the broker vouches for it only on the publishing
/// connection (PRECONDITION_FAILED, a channel close, unless it names that connection's
/// user), and Warren republishes as itself.
fn without_user_id(p: &BasicProperties) -> BasicProperties {
    if p.user_id().is_none() {
        return p.clone();
    }
    copy_properties(p, true, true)
}

/// `p` without `user_id` (see [`without_user_id`]), and without `headers` and
/// `expiration` unless asked to keep them: what every republish starts from.
pub fn copy_properties(p: &BasicProperties, headers: bool, expiration: bool) -> BasicProperties {
    let mut out = BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(v) = p.$get() { out = out.$set(v.clone()); })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    if headers && let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if expiration && let Some(v) = p.expiration() {
        out = out.with_expiration(v.clone());
    }
    out
}

/// Where a message that carried `attempt` goes when nacked: the next delay queue and
/// the attempt it will carry, or the DLQ (attempt unchanged) after the last delay.
pub fn next_hop(policy: &RetryPolicy, attempt: u32) -> (String, u32) {
    let taken = usize::try_from(attempt).unwrap_or(usize::MAX);
    if taken < policy.delays_ms.len() {
        (policy.delay_queue(taken + 1), attempt + 1)
    } else {
        (policy.dlq(), attempt)
    }
}

/// [`next_hop`] when the next retry should wait at least `at_least` (a receiver's
/// `Retry-After`): the first remaining delay that long, or the longest one.
pub fn next_hop_at_least(policy: &RetryPolicy, attempt: u32, at_least: Duration) -> (String, u32) {
    let taken = usize::try_from(attempt).unwrap_or(usize::MAX);
    if taken >= policy.delays_ms.len() {
        return (policy.dlq(), attempt);
    }
    let index = (taken..policy.delays_ms.len())
        .find(|&i| Duration::from_millis(u64::from(policy.delays_ms[i])) >= at_least)
        .unwrap_or(policy.delays_ms.len() - 1);
    let next = u32::try_from(index + 1).unwrap_or(u32::MAX);
    (policy.delay_queue(index + 1), next)
}

/// Republishes `message` to its next hop, confirmed and mandatory (a missing delay
/// queue is an error, not a lost message). Returns the queue it went to.
pub async fn republish(
    broker: &Broker,
    policy: &RetryPolicy,
    message: &Retained,
) -> Result<String, PublishError> {
    let (queue, attempt) = next_hop(policy, attempt(&message.properties));
    send_to(broker, &queue, Some(attempt), message, &[]).await?;
    Ok(queue)
}

/// Publishes `message` to `queue` through the default exchange, confirmed and
/// mandatory, carrying `attempt` (none: no attempt header) and `headers` (Warren's own
/// `x-warren-*` notes, e.g. why a push failed) on top of what [`for_republish`] keeps.
pub async fn send_to(
    broker: &Broker,
    queue: &str,
    attempt: Option<u32>,
    message: &Retained,
    headers: &[(&str, AMQPValue)],
) -> Result<(), PublishError> {
    let mut properties = for_republish(&message.properties, attempt);
    if !headers.is_empty() {
        let mut table = properties.headers().clone().unwrap_or_default();
        for (name, value) in headers {
            table.insert((*name).into(), value.clone());
        }
        properties = properties.with_headers(table);
    }
    let outgoing = OutgoingMessage {
        exchange: String::new(),
        routing_key: queue.to_owned(),
        body: message.body.clone(),
        properties,
        mandatory: true,
    };
    broker.publish(&outgoing).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            queue: "q".into(),
            delays_ms: vec![200, 400, 800],
        }
    }

    #[test]
    fn each_nack_takes_the_next_delay_then_the_dlq() {
        let p = policy();
        assert_eq!(next_hop(&p, 0), ("q.retry.1".into(), 1));
        assert_eq!(next_hop(&p, 2), ("q.retry.3".into(), 3));
        assert_eq!(next_hop(&p, 3), ("q.dlq".into(), 3));
        assert_eq!(next_hop(&p, u32::MAX), ("q.dlq".into(), u32::MAX));
    }

    #[test]
    fn a_republished_message_loses_its_routing_keys_and_user_id_and_keeps_the_rest() {
        let keys = || {
            AMQPValue::FieldArray(vec![AMQPValue::LongString("other-tenant-queue".into())].into())
        };
        let mut headers = FieldTable::default();
        headers.insert("CC".into(), keys());
        headers.insert("BCC".into(), keys());
        headers.insert(
            "cc".into(),
            AMQPValue::LongString("not a routing header".into()),
        );
        headers.insert("traceparent".into(), AMQPValue::LongString("00-ab".into()));
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("m1".into())
            .with_user_id("alice".into())
            .with_priority(3);
        let out = for_republish(&props, Some(1));
        let names: Vec<&str> = out
            .headers()
            .as_ref()
            .map(|h| h.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default();
        assert!(
            !names.contains(&"CC") && !names.contains(&"BCC"),
            "{names:?}"
        );
        assert!(
            names.contains(&"cc") && names.contains(&"traceparent"),
            "{names:?}"
        );
        assert_eq!(out.message_id().as_ref().map(|m| m.as_str()), Some("m1"));
        assert_eq!(*out.priority(), Some(3));
        assert!(
            out.user_id().is_none(),
            "the broker refuses another user's id"
        );
        assert_eq!(attempt(&out), 1);
    }

    #[test]
    fn retry_after_picks_the_first_delay_that_long_or_the_longest() {
        let p = policy(); // 200, 400, 800 ms
        let at = |attempt, ms| next_hop_at_least(&p, attempt, Duration::from_millis(ms));
        assert_eq!(at(0, 0), ("q.retry.1".into(), 1));
        assert_eq!(at(0, 300), ("q.retry.2".into(), 2));
        assert_eq!(
            at(0, 60_000),
            ("q.retry.3".into(), 3),
            "capped at the longest"
        );
        assert_eq!(
            at(1, 100),
            ("q.retry.2".into(), 2),
            "never an earlier delay"
        );
        assert_eq!(at(3, 0), ("q.dlq".into(), 3));
    }

    #[test]
    fn the_attempt_header_is_read_from_any_integer_and_replaced_keeping_the_rest() {
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::LongString("kept".into()));
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(2));
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(attempt(&props), 2);
        let next = for_republish(&props, Some(3));
        assert_eq!(attempt(&next), 3);
        let inner = next.headers().as_ref().map(|h| h.inner().len());
        assert_eq!(inner, Some(2));
        assert_eq!(attempt(&for_republish(&props, None)), 0);
        let mut odd = FieldTable::default();
        odd.insert(ATTEMPT_HEADER.into(), AMQPValue::LongString("3".into()));
        assert_eq!(attempt(&BasicProperties::default().with_headers(odd)), 0);
        let mut negative = FieldTable::default();
        negative.insert(ATTEMPT_HEADER.into(), AMQPValue::LongInt(-4));
        assert_eq!(
            attempt(&BasicProperties::default().with_headers(negative)),
            0
        );
    }
}
