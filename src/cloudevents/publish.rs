//! Publishing CloudEvents: each event becomes an AMQP message ([`super::amqp::prepare`])
//! that the publish service sends with its guarantees (grants, quotas, confirm,
//! mandatory), under the caller's `Idempotency-Key` or, without one, a key derived from
//! the event's (`source`, `id`), which CloudEvents says identifies an event: a retried
//! event is published once while that key is retained (`idempotency.retention_s`).

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::amqp::{self, Destination, Mode};
use super::event::Event;
use crate::error::{ApiError, ProblemCode};
use crate::idempotency::{Answered, Fingerprint, Idempotency, IdempotencyKey, Outcome};
use crate::publishing::{self, Accepted, ItemResult, Prepared, TraceContext};
use crate::tenancy::Tenant;

/// The scope (in place of a token subject) of keys derived from (`source`, `id`): the
/// pair names an event for the whole tenant, whoever sends it. A token subject holding a
/// unit separator is the only way to meet it, and only within the same tenant.
const EVENT_SCOPE: &str = "\u{1f}cloudevents";

/// Events of a batch published at once when each has its own (`source`, `id`) key: each
/// takes a pooled channel while it waits for its confirm, so a batch takes at most a
/// quarter of the default `amqp.channels_per_vhost` (32) and leaves the rest to others.
const EVENT_CONCURRENCY: usize = 8;

/// Who publishes, and how the request is keyed.
pub struct Caller<'a> {
    pub tenant: &'a Arc<Tenant>,
    pub subject: &'a str,
    /// The request's `Idempotency-Key`; when set it alone keys the request.
    pub key: Option<&'a IdempotencyKey>,
    /// The request's fingerprint (method, path and query, body) for `key`.
    pub fingerprint: Fingerprint,
    pub trace: TraceContext,
    pub limits: crate::publishing::Limits,
}

/// Publishes one event; `Ok` only once the broker confirmed it (or for the replayed
/// answer of the same event, or request, published earlier).
pub async fn publish_event(
    idempotency: &Idempotency,
    caller: Caller<'_>,
    destination: &Destination,
    event: &Event,
) -> Result<Answered<Accepted>, ApiError> {
    let prepared = amqp::prepare(event, destination, &caller.trace, caller.limits)
        .map_err(ApiError::InvalidRequest)?;
    let tenant = caller.tenant;
    let work = || async move {
        let accepted = publishing::publish_prepared(tenant, prepared).await?;
        Ok(Outcome::success(202, accepted))
    };
    match caller.key {
        Some(key) => {
            idempotency
                .run(&tenant.name, caller.subject, key, caller.fingerprint, work)
                .await
        }
        None => deduplicated(idempotency, tenant, event, destination, work).await,
    }
}

/// Publishes a batch, answered per event in request order by `answer`. With an
/// `Idempotency-Key` the batch is one keyed request, pipelined like
/// `POST /v1/publish/batch`; without one each event is published under its own
/// (`source`, `id`) key, so the events of a retried batch that landed are not sent again.
/// Invalid events, or two with the same (`source`, `id`), fail the whole batch with 400
/// before anything is published.
pub async fn publish_events<T, A>(
    idempotency: &Idempotency,
    caller: Caller<'_>,
    destination: &Destination,
    events: &[Event],
    answer: A,
) -> Result<Answered<T>, ApiError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
    A: FnOnce(Vec<ItemResult>) -> Outcome<T>,
{
    let mut seen: HashMap<(&str, &str), usize> = HashMap::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        if let Some(first) = seen.insert((event.source(), event.id()), i) {
            return Err(ApiError::InvalidRequest(format!(
                "[{i}].id: event [{first}] has the same source and id; each event of a batch needs its own"
            )));
        }
    }
    let prepared = events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            amqp::prepare(event, destination, &caller.trace, caller.limits)
                .map_err(|e| ApiError::InvalidRequest(format!("[{i}].{e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tenant = caller.tenant;
    if let Some(key) = caller.key {
        let work = || async move {
            let results = publishing::publish_prepared_batch(tenant, prepared).await?;
            Ok(answer(results))
        };
        return idempotency
            .run(&tenant.name, caller.subject, key, caller.fingerprint, work)
            .await;
    }
    // The futures are built first: a `map` closure inside the stream would make the
    // handler's future fail to be `Send` for every lifetime (rust-lang/rust#102211).
    let pending: Vec<_> = events
        .iter()
        .zip(prepared)
        .map(|(event, prepared)| one_of_batch(idempotency, tenant, destination, event, prepared))
        .collect();
    let results = futures::stream::iter(pending)
        .buffered(EVENT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    Ok(Answered::fresh(answer(results)))
}

async fn one_of_batch(
    idempotency: &Idempotency,
    tenant: &Tenant,
    destination: &Destination,
    event: &Event,
    prepared: Prepared,
) -> ItemResult {
    let message_id = prepared.message_id.clone();
    let work = || async move {
        let accepted = publishing::publish_prepared(tenant, prepared).await?;
        Ok(Outcome::success(202, accepted))
    };
    let failed = |error| ItemResult::Failed {
        message_id: Some(message_id.clone()),
        error,
    };
    match deduplicated(idempotency, tenant, event, destination, work).await {
        Ok(Answered {
            outcome: Outcome::Success { body, .. },
            ..
        }) => ItemResult::Accepted(body),
        // A final failure kept for this event earlier (404, 422), answered again.
        Ok(Answered {
            outcome: Outcome::Failure(problem),
            ..
        }) => failed(match problem.code {
            ProblemCode::ExchangeNotFound => {
                ApiError::ExchangeNotFound(destination.exchange.clone())
            }
            _ => ApiError::Unroutable(problem.detail),
        }),
        Err(error) => failed(error),
    }
}

/// Runs `work` once per (tenant, `source`, `id`) while the key is retained. The same
/// event again gets the first answer (replayed); the same pair with other content or
/// another destination is refused (422), as is one still in flight (409).
async fn deduplicated<F, Fut>(
    idempotency: &Idempotency,
    tenant: &Tenant,
    event: &Event,
    destination: &Destination,
    work: F,
) -> Result<Answered<Accepted>, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Outcome<Accepted>, ApiError>>,
{
    let key = event_key(event)?;
    idempotency
        .run(
            &tenant.name,
            EVENT_SCOPE,
            &key,
            event_fingerprint(event, destination),
            work,
        )
        .await
        .map_err(|error| match error {
            ApiError::IdempotencyKeyInUse => ApiError::EventInFlight,
            ApiError::IdempotencyKeyMismatch => ApiError::EventIdReused,
            other => other,
        })
}

/// `cloudevents:` and the SHA-256 (hex) of `[source, id]` as JSON, so no two pairs meet.
fn event_key(event: &Event) -> Result<IdempotencyKey, ApiError> {
    let name = serde_json::json!([event.source(), event.id()]).to_string();
    let hash = Sha256::digest(name.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    IdempotencyKey::parse(format!("cloudevents:{hex}").as_bytes())
        .map_err(|e| ApiError::Internal(format!("derived event key: {e}")))
}

/// The event's content and destination: the event in structured JSON (attributes in a
/// fixed order, so binary and structured mode agree), the exchange, routing key and mode.
fn event_fingerprint(event: &Event, destination: &Destination) -> Fingerprint {
    let mut target = serde_json::json!([
        destination.exchange,
        destination.routing_key(event),
        destination.mode == Mode::Structured
    ]);
    // Only a scheduled event says its delay: fingerprints kept before there were
    // scheduled events stay the same.
    if let (Some(delay), Some(items)) = (destination.delay_ms, target.as_array_mut()) {
        items.push(delay.into());
    }
    let target = target.to_string();
    Fingerprint::of("CLOUDEVENT", &target, event.to_structured_json().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudevents::event::from_structured;

    fn event(json: &str) -> Event {
        from_structured(json.as_bytes()).unwrap()
    }

    #[test]
    fn keys_name_the_pair_and_fingerprints_the_content() {
        let a = event(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1}"#);
        let b = event(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":2}"#);
        let c = event(r#"{"specversion":"1.0","id":"1","source":"/s2","type":"t","data":1}"#);
        // A source and id that would concatenate the same stay apart.
        let d = event(r#"{"specversion":"1.0","id":"s1","source":"/","type":"t","data":1}"#);
        let e = event(r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1}"#);
        let key = |e: &Event| event_key(e).unwrap();
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
        assert_ne!(key(&a), key(&d));
        assert!(key(&a).as_str().starts_with("cloudevents:"));
        let dest = |routing_key: Option<&str>, mode| Destination {
            exchange: "x".into(),
            routing_key: routing_key.map(str::to_owned),
            mode,
            delay_ms: None,
        };
        let fp = |e: &Event, d: &Destination| event_fingerprint(e, d);
        let binary = dest(None, Mode::Binary);
        assert_eq!(fp(&a, &binary), fp(&e, &binary));
        assert_ne!(fp(&a, &binary), fp(&b, &binary));
        assert_eq!(fp(&a, &binary), fp(&a, &dest(Some("t"), Mode::Binary)));
        assert_ne!(fp(&a, &binary), fp(&a, &dest(Some("u"), Mode::Binary)));
        assert_ne!(fp(&a, &binary), fp(&a, &dest(None, Mode::Structured)));
    }
}
