//! The retry policy of a queue (SPEC §11): a `nack` with `requeue: false` republishes
//! the message, confirmed, to its next delay queue with `x-warren-attempt` one higher
//! (after the last delay: to `<queue>.dlq`, the attempt unchanged), and only then is
//! the original acknowledged. The delay queue's TTL dead-letters it back to the queue,
//! and the broker records each pass in `x-death`, which travels along.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::broker::{Broker, OutgoingMessage, PublishError};
use crate::config::RetryPolicy;

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

/// `properties` with the attempt header set to `attempt` (removed when `None`); every
/// other header, `x-death` included, is kept.
pub fn with_attempt(properties: &BasicProperties, attempt: Option<u32>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (k, v) in old.inner() {
            if k.as_str() != ATTEMPT_HEADER {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    if let Some(attempt) = attempt {
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt));
    }
    properties.clone().with_headers(headers)
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

/// Republishes `message` to its next hop, confirmed and mandatory (a missing delay
/// queue is an error, not a lost message). Returns the queue it went to.
pub async fn republish(
    broker: &Broker,
    policy: &RetryPolicy,
    message: &Retained,
) -> Result<String, PublishError> {
    let (queue, attempt) = next_hop(policy, attempt(&message.properties));
    let outgoing = OutgoingMessage {
        exchange: String::new(),
        routing_key: queue.clone(),
        body: message.body.clone(),
        properties: with_attempt(&message.properties, Some(attempt)),
        mandatory: true,
    };
    broker.publish(&outgoing).await?;
    Ok(queue)
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
    fn the_attempt_header_is_read_from_any_integer_and_replaced_keeping_the_rest() {
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::LongString("kept".into()));
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(2));
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(attempt(&props), 2);
        let next = with_attempt(&props, Some(3));
        assert_eq!(attempt(&next), 3);
        let inner = next.headers().as_ref().map(|h| h.inner().len());
        assert_eq!(inner, Some(2));
        assert_eq!(attempt(&with_attempt(&props, None)), 0);
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
