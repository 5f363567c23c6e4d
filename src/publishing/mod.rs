//! The publish service: validate, authorize, publish with confirm, count the outcome.
//! Shared by `POST /v1/publish`, the batch endpoint and WebSocket publish frames, which
//! convert their wire types into [`Request`] and translate [`Accepted`] and
//! [`ItemResult`] back at the edge. Nothing here knows HTTP or the app state.

mod message;
mod outcome;
mod scheduling;

use crate::broker::PublishResult;
use crate::error::ApiError;
use crate::idempotency::{Answered, Fingerprint, Idempotency, IdempotencyKey, Outcome};
use crate::schedule;
use crate::telemetry;
use crate::tenancy::Tenant;
use crate::tenancy::quota::Admitted;
pub use message::{
    Due, Limits, MAX_EXPIRATION_MS, MAX_EXTRA_ROUTING_KEYS, Prepared, Properties, ROUTING_HEADERS,
    Request, TraceContext, now_ms, table_len,
};
pub use outcome::{Accepted, ItemResult};

/// Publishes one message; `Ok` only once the broker confirmed it.
pub async fn publish_one(
    tenant: &Tenant,
    request: Request,
    trace: &TraceContext,
    message_id: Option<String>,
    limits: Limits,
) -> Result<Accepted, ApiError> {
    let prepared = request
        .prepare(trace, message_id, limits)
        .map_err(ApiError::InvalidRequest)?;
    publish_prepared(tenant, prepared).await
}

/// Publishes one message already validated (a CloudEvent's, which adjusts the prepared
/// message before it goes out): grants, quotas, publish with confirm, count.
pub async fn publish_prepared(tenant: &Tenant, prepared: Prepared) -> Result<Accepted, ApiError> {
    publish_prepared_batch(tenant, vec![prepared])
        .await?
        .pop()
        .map_or_else(
            || Err(ApiError::Internal("publish result lost".into())),
            |item| match item {
                ItemResult::Accepted(ok) => Ok(ok),
                ItemResult::Failed { error, .. } => Err(error),
            },
        )
}

/// Publishes a batch pipelined on pooled channels. A malformed item fails the whole
/// batch with 400 before anything is published; every other failure is per item.
/// `key` is the caller's `Idempotency-Key` with its token subject: item `i` then gets
/// the `message_id` derived from (tenant, subject, key, i).
pub async fn publish_batch(
    tenant: &Tenant,
    requests: Vec<Request>,
    max_messages: usize,
    limits: Limits,
    trace: &TraceContext,
    key: Option<(&IdempotencyKey, &str)>,
) -> Result<Vec<ItemResult>, ApiError> {
    if requests.is_empty() {
        return Err(ApiError::InvalidRequest(
            "messages: a batch needs at least one message".to_owned(),
        ));
    }
    if requests.len() > max_messages {
        return Err(ApiError::PayloadTooLarge(format!(
            "messages: {} messages exceed server.max_batch_messages ({max_messages})",
            requests.len()
        )));
    }
    let prepared = requests
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let message_id = key.map(|(k, subject)| k.message_id(&tenant.name, subject, Some(i)));
            m.prepare(trace, message_id, limits)
                .map_err(|e| ApiError::InvalidRequest(format!("messages[{i}].{e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    publish_prepared_batch(tenant, prepared).await
}

/// Publishes a batch of messages already validated, pipelined; every failure is per item.
pub async fn publish_prepared_batch(
    tenant: &Tenant,
    prepared: Vec<Prepared>,
) -> Result<Vec<ItemResult>, ApiError> {
    let mut results: Vec<Option<ItemResult>> = vec![None; prepared.len()];
    let mut allowed = Vec::with_capacity(prepared.len());
    for (index, item) in prepared.into_iter().enumerate() {
        match authorize(tenant, &item) {
            Ok(()) => allowed.push((index, item)),
            Err(error) => {
                results[index] = Some(ItemResult::Failed {
                    message_id: Some(item.message_id),
                    error,
                });
            }
        }
    }
    let bytes = allowed.iter().map(|(_, p)| p.message.body.len()).sum();
    let _admitted = admit(tenant, allowed.len(), bytes)?;
    let broker = tenant.broker().await?;
    let (mut messages, onto_ladder, allowed) =
        scheduling::outgoing(tenant, &broker, allowed, &mut results).await;
    // One producer span per message (none unless traces are exported); each message
    // carries its span's context to its consumers.
    let spans: Vec<tracing::Span> = if crate::otel::enabled() {
        messages
            .iter_mut()
            .zip(&onto_ladder)
            .zip(&allowed)
            .map(|((m, &later), (_, item))| {
                let to = &item.message;
                if later {
                    crate::otel::publish_span(m, "schedule", Some((&to.exchange, &to.routing_key)))
                } else {
                    crate::otel::publish_span(m, "publish", None)
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let outcomes = schedule::publish_all(
        &broker,
        &messages,
        &onto_ladder,
        scheduling::top(&allowed),
        tenant.schedule_wake(),
    )
    .await;
    for (span, outcome) in spans.iter().zip(&outcomes) {
        match outcome {
            Ok(_) => crate::otel::record_outcome(span, "acked", true),
            Err(error) => crate::otel::record_outcome(span, error.outcome(), false),
        }
    }
    for ((index, item), outcome) in allowed.into_iter().zip(outcomes) {
        let message_id = item.message_id.clone();
        results[index] = Some(match accepted(tenant, item, outcome) {
            Ok(ok) => ItemResult::Accepted(ok),
            Err(error) => ItemResult::Failed {
                message_id: Some(message_id),
                error,
            },
        });
    }
    Ok(results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| ItemResult::Failed {
                message_id: None,
                error: ApiError::Internal("batch item lost".into()),
            })
        })
        .collect())
}

/// Every routing key the message can take must be granted: its own and each one its
/// `CC` and `BCC` headers name (RabbitMQ routes to those too).
fn authorize(tenant: &Tenant, prepared: &Prepared) -> Result<(), ApiError> {
    let m = &prepared.message;
    std::iter::once(&m.routing_key)
        .chain(&prepared.extra_routing_keys)
        .try_for_each(|key| tenant.authorize_publish(&m.exchange, key))
        .inspect_err(|_| telemetry::publish_outcome(&tenant.metrics_label, "forbidden"))
}

/// The tenant's quotas, checked after validation and grants and before the broker.
fn admit(tenant: &Tenant, messages: usize, bytes: usize) -> Result<Admitted, ApiError> {
    tenant
        .quota
        .admit(&tenant.name, messages, bytes)
        .inspect_err(|_| telemetry::publish_outcome(&tenant.metrics_label, "rate_limited"))
}

fn accepted(
    tenant: &Tenant,
    prepared: Prepared,
    result: PublishResult,
) -> Result<Accepted, ApiError> {
    match result {
        Ok(published) => {
            let scheduled_for = prepared.due.map(|due| {
                telemetry::scheduled(&tenant.metrics_label, 1);
                crate::rfc3339::format_rfc3339_ms(due.at_ms)
            });
            if scheduled_for.is_none() {
                telemetry::publish_outcome(&tenant.metrics_label, "acked");
            }
            Ok(Accepted {
                message_id: prepared.message_id,
                exchange: prepared.message.exchange,
                routing_key: prepared.message.routing_key,
                // Scheduled: whether a queue takes it is known when it fires.
                routed: published.routed && scheduled_for.is_none(),
                scheduled_for,
            })
        }
        Err(error) => {
            telemetry::publish_outcome(&tenant.metrics_label, error.outcome());
            Err(error.into())
        }
    }
}

/// One message to publish and what scopes it: the tenant and token subject (which scope
/// an `Idempotency-Key` and the `message_id` derived from it), and the key with the
/// request's fingerprint. Only a request with a key is fingerprinted: hashing every
/// body was a tenth of the instructions of a publish.
pub struct KeyedPublish<'a> {
    pub tenant: &'a std::sync::Arc<Tenant>,
    pub subject: &'a str,
    pub key: Option<(&'a IdempotencyKey, Fingerprint)>,
    pub trace: TraceContext,
    pub limits: Limits,
}

/// Publishes one message under the caller's `Idempotency-Key`, if any: the service
/// behind `POST /v1/publish` and WebSocket publish frames, which differ only in how
/// they answer.
pub async fn publish_keyed(
    idempotency: &Idempotency,
    publish: KeyedPublish<'_>,
    request: Request,
) -> Result<Answered<Accepted>, ApiError> {
    let KeyedPublish {
        tenant,
        subject,
        key,
        trace,
        limits,
    } = publish;
    let message_id = key.map(|(k, _)| k.message_id(&tenant.name, subject, None));
    let work = || async move {
        let accepted = publish_one(tenant, request, &trace, message_id, limits).await?;
        Ok(Outcome::success(202, accepted))
    };
    idempotent(idempotency, &tenant.name, subject, key, work).await
}

/// Runs `work` under the caller's `Idempotency-Key`, if any; keys are scoped by tenant
/// and token subject. Shared by the REST handlers and WebSocket publish frames, each of
/// which picks the answer type `T` it keeps and replays.
pub async fn idempotent<T, F, Fut>(
    idempotency: &Idempotency,
    tenant: &str,
    subject: &str,
    key: Option<(&IdempotencyKey, Fingerprint)>,
    work: F,
) -> Result<Answered<T>, ApiError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Outcome<T>, ApiError>>,
{
    match key {
        None => work().await.map(Answered::fresh),
        Some((key, fingerprint)) => {
            idempotency
                .run(tenant, subject, key, fingerprint, work)
                .await
        }
    }
}
