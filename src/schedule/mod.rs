//! Scheduled publish (SPEC §15), on the broker alone: a ladder of quorum queues per
//! vhost, `warren.scheduled.l<k>` with a fixed TTL of 100 ms · 2^k, each dead-lettering
//! (at least once) into `warren.scheduled.due`. A router on every replica consumes that
//! queue (competing consumers): for a message with `remaining` = due − now it either
//! hops, republishing it (confirmed, then acking) to the longest rung no longer than
//! `remaining`, or, under 100 ms, waits that out and fires it to its exchange as the
//! publisher asked, re-checking the tenant's grants. Every rung holds one TTL, so
//! its messages expire in arrival order and none waits behind a later one: no
//! head-of-line blocking whatever the mix of delays. A message takes at most one hop
//! per rung on its way down (each hop more than halves what remains).
//!
//! Accept ([`wrap`]): the message as it will fire is kept whole; its destination, its
//! `CC`/`BCC` keys (which would route at the default exchange), its `expiration` (which
//! would cut a rung short) and the tenant go into `x-warren-schedule-*` headers, and
//! the message goes to its first rung, persistent and confirmed. A publish through
//! Warren cannot set `x-warren-*` headers, so only Warren writes them.

mod ladder;
mod router;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::broker::{Broker, OutgoingMessage, PublishError, PublishResult};
use crate::publishing::{Due, Prepared, ROUTING_HEADERS};
use crate::topology::retry::copy_properties;
pub use ladder::{DLQ, DUE_QUEUE, STEP_MS, ladder, rung, rung_queue, top_rung};
pub use router::{Router, start};

/// Why a message is in [`DLQ`]: a problem `code` (`unroutable`, `exchange_not_found`,
/// `forbidden`, `invalid_request`, `broker_rejected`, `payload_too_large`).
pub const ERROR_HEADER: &str = "x-warren-schedule-error";
/// When it is due, Unix milliseconds.
pub const DUE_HEADER: &str = "x-warren-schedule-due";
pub const TENANT_HEADER: &str = "x-warren-schedule-tenant";
pub const EXCHANGE_HEADER: &str = "x-warren-schedule-exchange";
pub const ROUTING_KEY_HEADER: &str = "x-warren-schedule-routing-key";
pub const MANDATORY_HEADER: &str = "x-warren-schedule-mandatory";
/// The original `expiration`, restored when the message fires.
pub const EXPIRATION_HEADER: &str = "x-warren-schedule-expiration";
/// Present (`false`) when the message was published transient: it waits persistent.
pub const PERSISTENT_HEADER: &str = "x-warren-schedule-persistent";
/// The `CC` and `BCC` keys, restored when the message fires.
const ROUTING_HEADER_COPIES: [&str; 2] = ["x-warren-schedule-cc", "x-warren-schedule-bcc"];

/// Which queue a message due at `due_ms` goes to now.
fn queue_for(due_ms: u64, now_ms: u64, top: u32) -> String {
    match rung(due_ms.saturating_sub(now_ms), top) {
        Some(k) => rung_queue(k),
        None => DUE_QUEUE.to_owned(),
    }
}

/// The message to publish at accept time: the prepared message kept whole, its
/// destination and what would misroute or cut it short on the ladder in Warren's
/// headers, sent to its first rung (mandatory: a ladder not declared yet is returned,
/// not lost).
pub fn wrap(prepared: &Prepared, due: Due, tenant: &str, now_ms: u64) -> OutgoingMessage {
    let (m, due_ms) = (&prepared.message, due.at_ms);
    let mut headers = FieldTable::default();
    if let Some(old) = m.properties.headers() {
        for (name, value) in old.inner() {
            match ROUTING_HEADERS.iter().position(|h| *h == name.as_str()) {
                Some(i) => headers.insert(ROUTING_HEADER_COPIES[i].into(), value.clone()),
                None => headers.insert(name.clone(), value.clone()),
            };
        }
    }
    let at = i64::try_from(due_ms).unwrap_or(i64::MAX);
    headers.insert(DUE_HEADER.into(), AMQPValue::LongLongInt(at));
    headers.insert(TENANT_HEADER.into(), long(tenant));
    headers.insert(EXCHANGE_HEADER.into(), long(&m.exchange));
    headers.insert(ROUTING_KEY_HEADER.into(), long(&m.routing_key));
    headers.insert(MANDATORY_HEADER.into(), AMQPValue::Boolean(m.mandatory));
    if let Some(expiration) = m.properties.expiration() {
        headers.insert(EXPIRATION_HEADER.into(), long(expiration.as_str()));
    }
    if m.properties.delivery_mode() == &Some(1) {
        headers.insert(PERSISTENT_HEADER.into(), AMQPValue::Boolean(false));
    }
    let properties = copy_properties(&m.properties, false, false)
        .with_delivery_mode(2)
        .with_headers(headers);
    OutgoingMessage {
        exchange: String::new(),
        routing_key: queue_for(due_ms, now_ms, due.top),
        body: m.body.clone(),
        properties,
        mandatory: true,
    }
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// The due time a ladder message carries.
fn due_of(properties: &BasicProperties) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(DUE_HEADER)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// A scheduled message as read back from the ladder.
#[derive(Debug, Clone)]
pub struct Scheduled {
    pub due_ms: u64,
    pub tenant: String,
    /// The message as it fires: its exchange, routing key, `mandatory`, headers
    /// (`CC`/`BCC` back, Warren's and the broker's dead-letter notes gone),
    /// `expiration` and delivery mode as published.
    pub message: OutgoingMessage,
    /// The `CC` and `BCC` routing keys, each checked against the grants at fire time.
    pub extra_routing_keys: Vec<String>,
}

/// Reads a message off the ladder; the error names what is missing or malformed (a
/// message some other producer put on a ladder queue).
pub fn unwrap(properties: &BasicProperties, body: &[u8]) -> Result<Scheduled, String> {
    let empty = FieldTable::default();
    let old = properties.headers().as_ref().unwrap_or(&empty);
    let get = |name: &str| old.inner().get(name);
    let text = |name: &str| match get(name) {
        Some(AMQPValue::LongString(s)) => Ok(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Ok(s.as_str().to_owned()),
        _ => Err(format!("{name}: missing or not a string")),
    };
    let due_ms = due_of(properties)
        .ok_or_else(|| format!("{DUE_HEADER}: missing or not a non-negative integer"))?;
    let tenant = text(TENANT_HEADER)?;
    let exchange = text(EXCHANGE_HEADER)?;
    let routing_key = text(ROUTING_KEY_HEADER)?;
    if exchange.len() > 255 || routing_key.len() > 255 {
        return Err("the exchange or routing key is longer than 255 bytes".to_owned());
    }
    let mandatory = !matches!(get(MANDATORY_HEADER), Some(AMQPValue::Boolean(false)));
    let mut headers = FieldTable::default();
    let mut extra_routing_keys = Vec::new();
    for (name, value) in old.inner() {
        let name = name.as_str();
        if let Some(i) = ROUTING_HEADER_COPIES.iter().position(|h| *h == name) {
            let AMQPValue::FieldArray(items) = value else {
                return Err(format!("{name}: not an array of routing keys"));
            };
            for item in items.as_slice() {
                let AMQPValue::LongString(key) = item else {
                    return Err(format!("{name}: not an array of routing keys"));
                };
                extra_routing_keys.push(String::from_utf8_lossy(key.as_bytes()).into_owned());
            }
            headers.insert(ROUTING_HEADERS[i].into(), value.clone());
        } else if !is_note(name) {
            headers.insert(name.into(), value.clone());
        }
    }
    if extra_routing_keys.len() > crate::publishing::MAX_EXTRA_ROUTING_KEYS {
        return Err("more routing keys in CC and BCC than a publish may carry".to_owned());
    }
    let persistent = !matches!(get(PERSISTENT_HEADER), Some(AMQPValue::Boolean(false)));
    let expiration = text(EXPIRATION_HEADER).ok();
    let mut message_properties = copy_properties(properties, false, false)
        .with_delivery_mode(if persistent { 2 } else { 1 });
    if let Some(expiration) = expiration {
        message_properties = message_properties.with_expiration(expiration.as_str().into());
    }
    if !headers.inner().is_empty() {
        message_properties = message_properties.with_headers(headers);
    }
    Ok(Scheduled {
        due_ms,
        tenant,
        message: OutgoingMessage {
            exchange,
            routing_key,
            body: bytes::Bytes::copy_from_slice(body),
            properties: message_properties,
            mandatory,
        },
        extra_routing_keys,
    })
}

/// Warren's schedule headers and the notes the broker adds on dead-lettering: none of
/// them fires with the message.
fn is_note(name: &str) -> bool {
    name.starts_with("x-warren-schedule-") || is_dead_letter_note(name)
}

/// What the broker adds each time a rung dead-letters the message.
fn is_dead_letter_note(name: &str) -> bool {
    name == "x-death" || name.starts_with("x-first-death-") || name.starts_with("x-last-death-")
}

/// The message moved one rung on: the same headers without the broker's dead-letter
/// notes (they would grow by one entry per rung), to the rung for what remains.
pub fn hop(properties: &BasicProperties, body: &[u8], queue: String) -> OutgoingMessage {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (name, value) in old.inner() {
            if !is_dead_letter_note(name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    OutgoingMessage {
        exchange: String::new(),
        routing_key: queue,
        body: bytes::Bytes::copy_from_slice(body),
        properties: copy_properties(properties, false, false).with_headers(headers),
        mandatory: true,
    }
}

/// Declares the ladder on a throwaway channel (a refused declare closes only that).
pub async fn declare(broker: &Broker, top: u32) -> Result<(), PublishError> {
    let channel = broker.consumer_channel().await?;
    for (queue, arguments) in ladder(top) {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await;
        if let Err(error) = declared {
            tracing::warn!(vhost = %broker.vhost(), %queue, %error, "Cannot declare the scheduled-publish ladder.");
            return Err(broker.failure(&error, ""));
        }
    }
    let _ = channel.close(200, "OK".into()).await;
    Ok(())
}

/// Publishes `messages` (those flagged in `onto_ladder` go to the ladder); a ladder
/// message returned unroutable means the ladder is not declared yet on this vhost: it
/// is declared and those messages are published once more. `wake` tells this
/// replica's router the due queue now exists.
pub async fn publish_all(
    broker: &Broker,
    messages: &[OutgoingMessage],
    onto_ladder: &[bool],
    top: u32,
    wake: Option<&tokio::sync::Notify>,
) -> Vec<PublishResult> {
    let mut results = broker.publish_all(messages).await;
    let again: Vec<usize> = (0..messages.len())
        .filter(|&i| {
            onto_ladder.get(i).copied().unwrap_or(false)
                && matches!(results[i], Err(PublishError::Unroutable(_)))
        })
        .collect();
    if again.is_empty() {
        return results;
    }
    if let Err(error) = declare(broker, top).await {
        for i in again {
            results[i] = Err(error.clone());
        }
        return results;
    }
    if let Some(wake) = wake {
        wake.notify_one();
    }
    // Declaring took time: each message goes to the rung for what remains now, the
    // soonest due first (those already due go straight to the due queue, in due order).
    let mut again = again;
    again.sort_by_key(|&i| due_of(&messages[i].properties).unwrap_or(0));
    let now = crate::publishing::now_ms();
    let retry: Vec<OutgoingMessage> = again
        .iter()
        .map(|&i| {
            let mut message = messages[i].clone();
            if let Some(due) = due_of(&message.properties) {
                message.routing_key = queue_for(due, now, top);
            }
            message
        })
        .collect();
    for (i, result) in again.into_iter().zip(broker.publish_all(&retry).await) {
        results[i] = result;
    }
    results
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldArray;

    use super::*;

    #[test]
    fn rungs_more_than_halve_what_remains() {
        assert_eq!(rung(99, 30), None);
        assert_eq!(rung(100, 30), Some(0));
        assert_eq!(rung(199, 30), Some(0));
        assert_eq!(rung(200, 30), Some(1));
        assert_eq!(rung(3_600_000, 30), Some(15));
        assert_eq!(rung(3_600_000, 10), Some(10));
        assert_eq!(top_rung(7 * 24 * 3_600_000), 22);
        for remaining in [100u64, 150, 999, 65_432, 3_600_000, 604_800_000] {
            let k = rung(remaining, 22).unwrap();
            let ttl = STEP_MS << k;
            assert!(ttl <= remaining);
            assert!(remaining - ttl < ttl || k == 22, "{remaining}");
        }
    }

    fn prepared(headers: FieldTable) -> Prepared {
        Prepared {
            message: OutgoingMessage {
                exchange: "orders".into(),
                routing_key: "order.created".into(),
                body: bytes::Bytes::from_static(b"{}"),
                properties: BasicProperties::default()
                    .with_message_id("m-1".into())
                    .with_content_type("application/json".into())
                    .with_expiration("60000".into())
                    .with_delivery_mode(1)
                    .with_priority(3)
                    .with_headers(headers),
                mandatory: false,
            },
            message_id: "m-1".into(),
            extra_routing_keys: vec!["other".into()],
            due: Some(Due {
                at_ms: 10_000,
                top: 22,
            }),
        }
    }

    #[test]
    fn a_wrapped_message_keeps_everything_and_routes_only_to_its_rung() {
        let mut headers = FieldTable::default();
        headers.insert(
            "CC".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![long("other")])),
        );
        headers.insert("k".into(), long("v"));
        let p = prepared(headers);
        let wrapped = wrap(&p, p.due.unwrap(), "acme", 9_000);
        assert_eq!(wrapped.exchange, "");
        assert_eq!(wrapped.routing_key, "warren.scheduled.l3");
        assert!(wrapped.mandatory);
        let p = &wrapped.properties;
        assert_eq!(p.delivery_mode(), &Some(2));
        assert!(
            p.expiration().is_none(),
            "a message TTL would cut a rung short"
        );
        let table = p.headers().clone().unwrap();
        assert!(
            !table.inner().contains_key("CC"),
            "CC would route at the default exchange"
        );

        // What fires is what was published.
        let mut with_death = table.clone();
        with_death.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        with_death.insert("x-first-death-queue".into(), long("warren.scheduled.l3"));
        let fired = unwrap(&p.clone().with_headers(with_death), b"{}").unwrap();
        assert_eq!(fired.due_ms, 10_000);
        assert_eq!(fired.tenant, "acme");
        assert_eq!(fired.extra_routing_keys, vec!["other".to_owned()]);
        let m = &fired.message;
        assert_eq!(
            (m.exchange.as_str(), m.routing_key.as_str()),
            ("orders", "order.created")
        );
        assert!(!m.mandatory);
        assert_eq!(m.properties.delivery_mode(), &Some(1));
        assert_eq!(
            m.properties.expiration().as_ref().map(|e| e.as_str()),
            Some("60000")
        );
        assert_eq!(m.properties.priority(), &Some(3));
        assert_eq!(
            m.properties.message_id().as_ref().map(|e| e.as_str()),
            Some("m-1")
        );
        let fired_headers = m.properties.headers().clone().unwrap();
        let mut names: Vec<&str> = fired_headers.inner().keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["CC", "k"]);
    }

    #[test]
    fn a_message_without_the_schedule_headers_is_named_as_such() {
        let error = unwrap(&BasicProperties::default(), b"").unwrap_err();
        assert!(error.contains(DUE_HEADER), "{error}");
        let mut headers = FieldTable::default();
        headers.insert(DUE_HEADER.into(), AMQPValue::LongLongInt(1));
        headers.insert(TENANT_HEADER.into(), long("t"));
        headers.insert(EXCHANGE_HEADER.into(), long("e"));
        headers.insert(ROUTING_KEY_HEADER.into(), long("k"));
        headers.insert(ROUTING_HEADER_COPIES[0].into(), long("not-an-array"));
        let props = BasicProperties::default().with_headers(headers);
        assert!(
            unwrap(&props, b"")
                .unwrap_err()
                .contains("x-warren-schedule-cc")
        );
    }

    #[test]
    fn a_hop_drops_the_dead_letter_notes_and_keeps_the_rest() {
        let mut headers = FieldTable::default();
        headers.insert(DUE_HEADER.into(), AMQPValue::LongLongInt(1));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        headers.insert("x-last-death-reason".into(), long("expired"));
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_user_id("someone".into());
        let next = hop(&props, b"x", rung_queue(2));
        assert_eq!(next.routing_key, "warren.scheduled.l2");
        assert!(next.properties.user_id().is_none());
        let table = next.properties.headers().clone().unwrap();
        let names: Vec<&str> = table.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, [DUE_HEADER]);
    }
}
