//! One queue of `[[tenants.<t>.queues]]` checked and resolved: its arguments by queue
//! type (an argument that does not fit the type is an error naming the key), its
//! dead-lettering, and a retry policy's delay queues and DLQ.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    ArgValue, Destination, MAX_RETRY_DELAYS, Overflow, QueueConfig, QueueSpec, QueueType,
    RetryPolicy, TenantTopology, check_bindings, check_name,
};
use crate::config::ConfigError;

/// RabbitMQ's `x-max-age`: a positive number and one unit of Y, M, D, h, m, s.
fn valid_max_age(value: &str) -> bool {
    let Some(unit) = value.chars().last() else {
        return false;
    };
    let digits = &value[..value.len() - unit.len_utf8()];
    matches!(unit, 'Y' | 'M' | 'D' | 'h' | 'm' | 's')
        && !digits.is_empty()
        && digits.len() <= 9
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0')
}

pub(super) fn check_queue(
    key: &str,
    q: &QueueConfig,
    names: &mut BTreeSet<String>,
    out: &mut TenantTopology,
) -> Result<(), ConfigError> {
    check_name(&format!("{key}.name"), &q.name)?;
    let not_for = |member: &str, set: bool, which: &str| -> Result<(), ConfigError> {
        if set {
            Err(ConfigError::invalid(
                format!("{key}.{member}"),
                format!("does not apply to a {} queue ({which})", q.kind.as_str()),
            ))
        } else {
            Ok(())
        }
    };
    let kind = q.kind;
    let stream_only = "stream queues only";
    let quorum_only = "quorum queues only";
    match kind {
        QueueType::Classic => {
            not_for("delivery_limit", q.delivery_limit.is_some(), quorum_only)?;
            not_for("max_age", q.max_age.is_some(), stream_only)?;
            not_for(
                "stream_max_segment_size_bytes",
                q.stream_max_segment_size_bytes.is_some(),
                stream_only,
            )?;
        }
        QueueType::Quorum => {
            not_for(
                "max_priority",
                q.max_priority.is_some(),
                "quorum queues have no priorities",
            )?;
            not_for("max_age", q.max_age.is_some(), stream_only)?;
            not_for(
                "stream_max_segment_size_bytes",
                q.stream_max_segment_size_bytes.is_some(),
                stream_only,
            )?;
            not_for(
                "overflow",
                q.overflow == Some(Overflow::RejectPublishDlx),
                "quorum queues support drop-head and reject-publish",
            )?;
        }
        QueueType::Stream => {
            let streams = "streams keep messages by size and age";
            not_for("message_ttl_ms", q.message_ttl_ms.is_some(), streams)?;
            not_for("expires_ms", q.expires_ms.is_some(), streams)?;
            not_for("max_length", q.max_length.is_some(), streams)?;
            not_for("overflow", q.overflow.is_some(), streams)?;
            not_for(
                "dead_letter_exchange",
                q.dead_letter_exchange.is_some(),
                "streams do not dead-letter",
            )?;
            not_for(
                "dead_letter_routing_key",
                q.dead_letter_routing_key.is_some(),
                "streams do not dead-letter",
            )?;
            not_for("max_priority", q.max_priority.is_some(), "no priorities")?;
            not_for("delivery_limit", q.delivery_limit.is_some(), quorum_only)?;
            not_for(
                "single_active_consumer",
                q.single_active_consumer.is_some(),
                "not over AMQP",
            )?;
            not_for(
                "retry",
                q.retry.is_some(),
                "a stream is read, not acknowledged",
            )?;
        }
    }
    if !q.durable && kind != QueueType::Classic {
        return Err(ConfigError::invalid(
            format!("{key}.durable"),
            format!("{} queues are always durable", kind.as_str()),
        ));
    }
    for (member, zero) in [
        ("expires_ms", q.expires_ms == Some(0)),
        ("max_priority", q.max_priority == Some(0)),
        ("delivery_limit", q.delivery_limit == Some(0)),
        (
            "stream_max_segment_size_bytes",
            q.stream_max_segment_size_bytes == Some(0),
        ),
    ] {
        if zero {
            return Err(ConfigError::invalid(
                format!("{key}.{member}"),
                "must be greater than 0",
            ));
        }
    }
    if let Some(age) = &q.max_age
        && !valid_max_age(age)
    {
        return Err(ConfigError::invalid(
            format!("{key}.max_age"),
            "must be a number and one unit of Y, M, D, h, m, s (e.g. \"7D\")",
        ));
    }
    if q.dead_letter_routing_key.is_some() && q.dead_letter_exchange.is_none() {
        return Err(ConfigError::invalid(
            format!("{key}.dead_letter_routing_key"),
            "needs dead_letter_exchange (\"\" for the default exchange)",
        ));
    }
    for (member, value) in [
        ("dead_letter_exchange", &q.dead_letter_exchange),
        ("dead_letter_routing_key", &q.dead_letter_routing_key),
    ] {
        if value.as_ref().is_some_and(|v| v.len() > 255) {
            return Err(ConfigError::invalid(
                format!("{key}.{member}"),
                "must be at most 255 bytes",
            ));
        }
    }

    let mut arguments = BTreeMap::new();
    let mut put = |name: &str, value: Option<ArgValue>| {
        if let Some(value) = value {
            arguments.insert(name.to_owned(), value);
        }
    };
    if kind != QueueType::Classic {
        put(
            "x-queue-type",
            Some(ArgValue::Str(kind.as_str().to_owned())),
        );
    }
    let int = |v: Option<u64>| v.map(|v| ArgValue::Int(i64::try_from(v).unwrap_or(i64::MAX)));
    put("x-message-ttl", int(q.message_ttl_ms.map(u64::from)));
    put("x-expires", int(q.expires_ms.map(u64::from)));
    put("x-max-length", int(q.max_length.map(u64::from)));
    put("x-max-length-bytes", int(q.max_length_bytes));
    put(
        "x-overflow",
        q.overflow.map(|o| ArgValue::Str(o.as_str().to_owned())),
    );
    // A queue with a retry policy dead-letters to its DLQ unless told otherwise: a plain
    // AMQP consumer's reject (amqplib, pika: `nack(requeue=false)`), an expired TTL or
    // a quorum delivery limit would otherwise drop the message (issue #27). Warren's own
    // nacks go through the delays instead (`topology::retry`).
    let (dead_letter_exchange, dead_letter_routing_key) = match (&q.retry, &q.dead_letter_exchange)
    {
        (Some(_), None) => (Some(String::new()), Some(format!("{}.dlq", q.name))),
        _ => (
            q.dead_letter_exchange.clone(),
            q.dead_letter_routing_key.clone(),
        ),
    };
    put(
        "x-dead-letter-exchange",
        dead_letter_exchange.map(ArgValue::Str),
    );
    put(
        "x-dead-letter-routing-key",
        dead_letter_routing_key.map(ArgValue::Str),
    );
    put("x-max-priority", int(q.max_priority.map(u64::from)));
    put("x-delivery-limit", int(q.delivery_limit.map(u64::from)));
    put(
        "x-single-active-consumer",
        q.single_active_consumer.map(ArgValue::Bool),
    );
    put("x-max-age", q.max_age.clone().map(ArgValue::Str));
    put(
        "x-stream-max-segment-size-bytes",
        int(q.stream_max_segment_size_bytes),
    );
    let mut add = |spec: QueueSpec, key: &str| -> Result<(), ConfigError> {
        if !names.insert(spec.name.clone()) {
            return Err(ConfigError::invalid(
                key,
                format!("queue {:?} is declared twice", spec.name),
            ));
        }
        out.queues.push(spec);
        Ok(())
    };
    // Before issue #27 a queue with a retry policy was declared without dead-lettering.
    let legacy_arguments = (q.retry.is_some() && q.dead_letter_exchange.is_none()).then(|| {
        let mut legacy = arguments.clone();
        legacy.remove("x-dead-letter-exchange");
        legacy.remove("x-dead-letter-routing-key");
        legacy
    });
    add(
        QueueSpec {
            name: q.name.clone(),
            durable: q.durable,
            arguments,
            derived_from: None,
            legacy_arguments,
        },
        &format!("{key}.name"),
    )?;
    check_bindings(
        key,
        &q.bindings,
        &Destination::Queue(q.name.clone()),
        &mut out.bindings,
    )?;

    let Some(retry) = &q.retry else {
        return Ok(());
    };
    let at = format!("{key}.retry.delays_ms");
    if retry.delays_ms.is_empty() || retry.delays_ms.len() > MAX_RETRY_DELAYS {
        return Err(ConfigError::invalid(
            at,
            format!("must list 1-{MAX_RETRY_DELAYS} delays"),
        ));
    }
    if retry.delays_ms.contains(&0) {
        return Err(ConfigError::invalid(
            at,
            "every delay must be greater than 0",
        ));
    }
    let policy = RetryPolicy {
        queue: q.name.clone(),
        delays_ms: retry.delays_ms.clone(),
    };
    if policy.delay_queue(MAX_RETRY_DELAYS).len() > 255 {
        return Err(ConfigError::invalid(
            format!("{key}.name"),
            "with a retry policy, the name must leave room for `.retry.<n>` within 255 bytes",
        ));
    }
    // Delay queues are classic: they only hold messages until their TTL sends them
    // back, dead-lettered to the queue through the default exchange.
    for (i, delay) in retry.delays_ms.iter().enumerate() {
        let mut arguments = BTreeMap::new();
        arguments.insert("x-message-ttl".to_owned(), ArgValue::Int(i64::from(*delay)));
        arguments.insert(
            "x-dead-letter-exchange".to_owned(),
            ArgValue::Str(String::new()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".to_owned(),
            ArgValue::Str(q.name.clone()),
        );
        add(
            QueueSpec {
                name: policy.delay_queue(i + 1),
                durable: q.durable,
                arguments,
                derived_from: Some(q.name.clone()),
                legacy_arguments: None,
            },
            &at,
        )?;
    }
    let mut dlq_arguments = BTreeMap::new();
    if kind == QueueType::Quorum {
        dlq_arguments.insert(
            "x-queue-type".to_owned(),
            ArgValue::Str("quorum".to_owned()),
        );
    }
    add(
        QueueSpec {
            name: policy.dlq(),
            durable: q.durable,
            arguments: dlq_arguments,
            derived_from: Some(q.name.clone()),
            legacy_arguments: None,
        },
        &at,
    )?;
    out.retry.insert(q.name.clone(), policy);
    Ok(())
}
