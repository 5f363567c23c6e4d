//! Poison deliveries (security issue #13): messages any AMQP producer can put on the
//! broker that Warren must survive and must not pass on.
//!
//! A header table nested thousands of levels deep used to overflow the stack of lapin's
//! I/O thread while parsing and abort the process. The parser is now bounded: the
//! vendored `amq-protocol-types` (see `vendor/amq-protocol-types/PATCHED.md`) stops at
//! [`PARSER_MAX_DEPTH`] levels and truncates what lies below. Everything Warren does
//! with a delivery afterwards — converting the headers to JSON, serialising the frame,
//! dropping the value — recurses per level too, so a delivery whose headers nest deeper
//! than [`MAX_HEADER_DEPTH`] (or carry more than [`MAX_HEADER_VALUES`] values) is
//! never forwarded: a live subscription drops it, a durable one rejects it without
//! requeue (a dead-letter policy on the queue catches it; it can never loop), and both
//! count it in `warren_poison_messages_total`. The check itself is iterative.
//!
//! Dropping a delivery still recurses through its headers (lapin gives no owned access
//! to the values inside a table or array, nor to the headers of its properties, so an
//! iterative teardown cannot be written against its API), but only as deep as the
//! parser lets a value be: dropping the deepest one (97 levels) measured at most 92 KiB
//! of stack in a debug build and under 20 KiB in release, against tokio's 2 MiB.

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::BasicRejectOptions;
use lapin::types::AMQPValue;
use tracing::warn;

use crate::telemetry;

/// Header nesting (the headers table is level 1) beyond which a delivery is poison.
/// Warren refuses publishes nested deeper than 8; 64 leaves room for any sane producer.
pub const MAX_HEADER_DEPTH: usize = 64;

/// Header values (scalars and containers) beyond which a delivery is poison: the frame
/// size bounds them already (~131,000 one-byte voids in 128 KiB), this bounds the JSON.
pub const MAX_HEADER_VALUES: usize = 10_000;

/// The depth at which the patched parser stops; a truncated value nests one level
/// deeper, so it always exceeds [`MAX_HEADER_DEPTH`] and is caught here.
pub const PARSER_MAX_DEPTH: usize = lapin::types::parsing::MAX_NESTING_DEPTH;

// Builds only against the patched parser, and only when its bound is above ours.
const _: () = assert!(MAX_HEADER_DEPTH < PARSER_MAX_DEPTH);

/// Why a delivery is poison (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    TooDeep,
    TooLarge,
    /// A body over `amqp.max_delivery_bytes`: read off the connection and dropped as
    /// it came (the patched lapin's `Delivery::oversized`), never held in memory.
    BodyTooLarge,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::TooDeep, Reason::TooLarge, Reason::BodyTooLarge];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooDeep => "too_deep",
            Reason::TooLarge => "too_large",
            Reason::BodyTooLarge => "body_too_large",
        }
    }
}

/// Why `delivery` may not be forwarded, if it may not: its body was over the consumer
/// channel's bound, or its headers are poison ([`inspect`]).
pub fn judge(delivery: &Delivery) -> Option<Reason> {
    if delivery.oversized.is_some() {
        return Some(Reason::BodyTooLarge);
    }
    inspect(&delivery.properties)
}

/// Checks the headers without recursion: `None` when the delivery may be forwarded.
pub fn inspect(properties: &BasicProperties) -> Option<Reason> {
    let headers = properties.headers().as_ref()?;
    // (value, depth of the container holding it)
    let mut pending: Vec<(&AMQPValue, usize)> = headers.inner().values().map(|v| (v, 1)).collect();
    let mut values = pending.len();
    while let Some((value, depth)) = pending.pop() {
        if values > MAX_HEADER_VALUES {
            return Some(Reason::TooLarge);
        }
        match value {
            AMQPValue::FieldTable(table) => {
                if depth + 1 > MAX_HEADER_DEPTH {
                    return Some(Reason::TooDeep);
                }
                values += table.inner().len();
                pending.extend(table.inner().values().map(|v| (v, depth + 1)));
            }
            AMQPValue::FieldArray(array) => {
                if depth + 1 > MAX_HEADER_DEPTH {
                    return Some(Reason::TooDeep);
                }
                values += array.as_slice().len();
                pending.extend(array.as_slice().iter().map(|v| (v, depth + 1)));
            }
            _ => {}
        }
    }
    (values > MAX_HEADER_VALUES).then_some(Reason::TooLarge)
}

/// Hook for live (no-ack) consumers: `false` when the delivery is poison, which has
/// been logged and counted; the caller drops it.
pub fn admit_live(delivery: &Delivery) -> bool {
    match judge(delivery) {
        None => true,
        Some(reason) => {
            record("live", reason, delivery);
            false
        }
    }
}

/// Hook for durable (acked) consumers: `false` when the delivery is poison, which has
/// been rejected without requeue (dead-lettered when the queue has a dead-letter
/// exchange, else discarded by the broker), logged and counted.
pub async fn admit_durable(delivery: &Delivery) -> bool {
    let Some(reason) = judge(delivery) else {
        return true;
    };
    record("durable", reason, delivery);
    let rejected = delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await;
    if let Err(error) = rejected {
        // The channel is gone; the broker requeues the message to the next consumer,
        // which rejects it the same way.
        warn!(%error, delivery_tag = delivery.delivery_tag, "Could not reject a poison delivery.");
    }
    false
}

fn record(mode: &'static str, reason: Reason, delivery: &Delivery) {
    warn!(
        mode,
        reason = reason.as_str(),
        exchange = %delivery.exchange,
        routing_key = %delivery.routing_key,
        delivery_tag = delivery.delivery_tag,
        max_depth = MAX_HEADER_DEPTH,
        max_values = MAX_HEADER_VALUES,
        "Poison delivery not forwarded (headers too deep or too large)."
    );
    telemetry::poison_message(mode, reason.as_str());
}

#[cfg(test)]
mod tests {
    use lapin::types::{FieldArray, FieldTable};

    use super::*;

    fn nested(depth: usize, tables: bool) -> AMQPValue {
        let mut value = AMQPValue::Void;
        for _ in 0..depth {
            value = if tables {
                let mut t = FieldTable::default();
                t.insert("k".into(), value);
                AMQPValue::FieldTable(t)
            } else {
                AMQPValue::FieldArray(FieldArray::from(vec![value]))
            };
        }
        value
    }

    fn props(value: AMQPValue) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert("p".into(), value);
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn depth_counts_the_headers_table_as_level_one() {
        for tables in [true, false] {
            let at_bound = props(nested(MAX_HEADER_DEPTH - 1, tables));
            assert_eq!(inspect(&at_bound), None);
            let over = props(nested(MAX_HEADER_DEPTH, tables));
            assert_eq!(inspect(&over), Some(Reason::TooDeep));
        }
        assert_eq!(inspect(&BasicProperties::default()), None);
        assert_eq!(inspect(&props(AMQPValue::LongInt(1))), None);
    }

    #[test]
    fn too_many_values_are_poison_too() {
        let wide = FieldArray::from(vec![AMQPValue::Void; MAX_HEADER_VALUES]);
        assert_eq!(
            inspect(&props(AMQPValue::FieldArray(wide))),
            Some(Reason::TooLarge)
        );
        let fine = FieldArray::from(vec![AMQPValue::Void; MAX_HEADER_VALUES - 1]);
        assert_eq!(inspect(&props(AMQPValue::FieldArray(fine))), None);
    }

    /// Parsing, checking and dropping a table nested 20,000 deep fits in 4 MiB of stack
    /// (unpatched, parsing alone needed ~230 MiB in a debug build): the patched parser
    /// truncates it, and what it yields is poison.
    #[test]
    fn the_parser_truncates_deep_tables_and_they_are_poison() {
        use lapin::types::parsing::parse_field_table;
        let mut encoded: Vec<u8> = Vec::new();
        for _ in 0..20_000 {
            let mut outer = vec![b'A'];
            outer.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            outer.extend_from_slice(&encoded);
            encoded = outer;
        }
        let mut table = ((encoded.len() + 2) as u32).to_be_bytes().to_vec();
        table.extend_from_slice(&[1, b'p']);
        table.extend_from_slice(&encoded);
        let verdict = std::thread::Builder::new()
            .stack_size(4 << 20)
            .spawn(move || {
                let (rest, headers) = parse_field_table(table.as_slice()).expect("parses");
                assert!(rest.is_empty());
                inspect(&BasicProperties::default().with_headers(headers))
            })
            .expect("thread")
            .join()
            .expect("no overflow");
        assert_eq!(verdict, Some(Reason::TooDeep));
    }
}
