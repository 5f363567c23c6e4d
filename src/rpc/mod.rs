//! The request/reply service (SPEC §10): validate the request like a publish, set its
//! correlation id, authorize, admit, publish it with direct reply-to and a confirm,
//! wait for the reply, count the outcome. Shared by `POST /v1/request` and WebSocket
//! `request` frames, which render [`Replied`] at the edge. Nothing here knows HTTP.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::{Reply, RpcError, RpcSettings};
use crate::config::RpcConfig;
use crate::error::ApiError;
use crate::idempotency::{Answered, Fingerprint, Idempotency, IdempotencyKey, Outcome};
use crate::publishing::{self, Request, TraceContext};
use crate::telemetry;
use crate::tenancy::Tenant;

/// A request that got its reply.
#[derive(Debug, Clone)]
pub struct Replied {
    /// The request's `message_id`.
    pub message_id: String,
    /// The request's `correlation_id` (the client's, or the one Warren made).
    pub correlation_id: String,
    pub reply: Reply,
}

/// One request and what scopes it: as [`publishing::KeyedPublish`], plus the `[rpc]`
/// settings and the client's `timeout_ms`.
pub struct KeyedRequest<'a> {
    pub tenant: &'a Arc<Tenant>,
    pub subject: &'a str,
    /// The key with the request's fingerprint (only a keyed request is fingerprinted).
    pub key: Option<(&'a IdempotencyKey, Fingerprint)>,
    pub trace: TraceContext,
    pub max_headers_bytes: usize,
    pub rpc: &'a RpcConfig,
    pub timeout_ms: Option<u64>,
}

/// Sends one request under the caller's `Idempotency-Key`, if any: a retry with the key
/// gets the stored reply (`render`ed by the edge into the answer type `T` it keeps and
/// replays) and the request is not sent again while the key is retained. A reply
/// timeout (504) or an outage (503) releases the key, as for a publish.
pub async fn request_keyed<T, R>(
    idempotency: &Idempotency,
    call: KeyedRequest<'_>,
    request: Request,
    render: R,
) -> Result<Answered<T>, ApiError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
    R: FnOnce(Replied) -> T,
{
    let KeyedRequest {
        tenant,
        subject,
        key,
        trace,
        max_headers_bytes,
        rpc,
        timeout_ms,
    } = call;
    let message_id = key.map(|(k, _)| k.message_id(&tenant.name, subject, None));
    let work = || async move {
        let call = Call {
            trace: &trace,
            message_id,
            max_headers_bytes,
            rpc,
            timeout_ms,
        };
        let replied = request_one(tenant, request, call).await?;
        Ok(Outcome::success(OK, render(replied)))
    };
    publishing::idempotent(idempotency, &tenant.name, subject, key, work).await
}

/// The status of a request that got its reply.
const OK: u16 = 200;

/// What one request needs besides the tenant and the message.
pub struct Call<'a> {
    pub trace: &'a TraceContext,
    /// Used when the client sets none (derived from an idempotency key).
    pub message_id: Option<String>,
    pub max_headers_bytes: usize,
    pub rpc: &'a RpcConfig,
    pub timeout_ms: Option<u64>,
}

/// Sends one request and waits for its reply.
pub async fn request_one(
    tenant: &Tenant,
    mut request: Request,
    call: Call<'_>,
) -> Result<Replied, ApiError> {
    let timeout = timeout(call.rpc, call.timeout_ms)?;
    if request.properties.reply_to.is_some() {
        return Err(ApiError::InvalidRequest(
            "properties.reply_to: a request's reply_to is set by Warren (direct reply-to); leave it out"
                .to_owned(),
        ));
    }
    if request.delay_ms.is_some() || request.not_before.is_some() {
        return Err(ApiError::InvalidRequest(
            "delay_ms, not_before: a request waits for its reply and cannot be scheduled; leave them out"
                .to_owned(),
        ));
    }
    if request.mandatory == Some(false) {
        return Err(ApiError::InvalidRequest(
            "mandatory: a request is always mandatory (an unroutable request could never be answered); leave it out"
                .to_owned(),
        ));
    }
    let correlation_id = match request.properties.correlation_id.take() {
        Some(id) if id.is_empty() => {
            return Err(ApiError::InvalidRequest(
                "properties.correlation_id: must not be empty".to_owned(),
            ));
        }
        Some(id) => id,
        None => crate::ids::uuid_v4().to_string(),
    };
    request.properties.correlation_id = Some(correlation_id.clone());
    let mut prepared = request
        .prepare(
            call.trace,
            call.message_id,
            crate::publishing::Limits {
                max_headers_bytes: call.max_headers_bytes,
                max_delay_ms: 0,
            },
        )
        .map_err(ApiError::InvalidRequest)?;
    // The request's producer span; the responder continues under it (through the
    // message's traceparent).
    let span = crate::otel::publish_span(&mut prepared.message, "request", None);
    let m = &prepared.message;
    std::iter::once(&m.routing_key)
        .chain(&prepared.extra_routing_keys)
        .try_for_each(|key| tenant.authorize_publish(&m.exchange, key))
        .inspect_err(|_| telemetry::rpc_outcome(&tenant.metrics_label, "forbidden"))?;
    // Held until the reply: a tenant's requests awaiting replies count against its
    // in-flight quota, so one tenant cannot take a shared vhost's rpc.max_inflight.
    let _admitted = tenant
        .quota
        .admit(&tenant.name, 1, m.body.len())
        .inspect_err(|_| telemetry::rpc_outcome(&tenant.metrics_label, "rate_limited"))?;
    let broker = tenant
        .broker()
        .await
        .inspect_err(|_| telemetry::rpc_outcome(&tenant.metrics_label, "unavailable"))?;
    let settings = RpcSettings {
        channels: call.rpc.channels_per_vhost,
        max_inflight: call.rpc.max_inflight,
        max_reply_bytes: call.rpc.max_reply_bytes,
    };
    match broker
        .request(&tenant.name, m, &correlation_id, settings, timeout)
        .await
    {
        Ok(reply) => {
            telemetry::rpc_round_trip(reply.round_trip);
            telemetry::rpc_outcome(&tenant.metrics_label, "replied");
            crate::otel::record_outcome(&span, "replied", true);
            Ok(Replied {
                message_id: prepared.message_id,
                correlation_id,
                reply,
            })
        }
        Err(error) => {
            telemetry::rpc_outcome(&tenant.metrics_label, outcome(&error));
            crate::otel::record_outcome(&span, outcome(&error), false);
            Err(answer(error))
        }
    }
}

/// The request's reply deadline: the client's `timeout_ms`, else `rpc.default_timeout_ms`.
fn timeout(rpc: &RpcConfig, timeout_ms: Option<u64>) -> Result<Duration, ApiError> {
    match timeout_ms {
        None => Ok(Duration::from_millis(rpc.default_timeout_ms)),
        Some(0) => Err(ApiError::InvalidRequest(
            "timeout_ms: must be at least 1".to_owned(),
        )),
        Some(ms) if ms > rpc.max_timeout_ms => Err(ApiError::InvalidRequest(format!(
            "timeout_ms: must be at most {} (rpc.max_timeout_ms)",
            rpc.max_timeout_ms
        ))),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

/// The `outcome` label of `warren_rpc_requests_total`.
fn outcome(error: &RpcError) -> &'static str {
    match error {
        RpcError::Publish(e) => e.outcome(),
        RpcError::Timeout(_) => "reply_timeout",
        RpcError::TooLarge { .. } => "reply_too_large",
        RpcError::CorrelationIdInUse => "correlation_id_in_use",
        RpcError::Lost => "unavailable",
    }
}

/// The client's answer; nothing here quotes the broker.
fn answer(error: RpcError) -> ApiError {
    match error {
        RpcError::Publish(e) => e.into(),
        RpcError::Timeout(after) => ApiError::ReplyTimeout(format!(
            "no reply within {} ms; the request was delivered, and a reply that comes later is dropped",
            after.as_millis()
        )),
        RpcError::TooLarge { max, .. } => ApiError::ReplyTooLarge(format!(
            "the reply is larger than rpc.max_reply_bytes ({max} bytes) and was dropped"
        )),
        RpcError::CorrelationIdInUse => ApiError::CorrelationIdInUse(
            "properties.correlation_id: a request with this correlation id is still awaiting its reply; retry later, or leave correlation_id out and Warren makes a unique one"
                .to_owned(),
        ),
        RpcError::Lost => ApiError::BrokerUnavailable {
            detail: "the broker link was lost while awaiting the reply; the request may have been handled, retry with the same Idempotency-Key".to_owned(),
            retry_after: Duration::from_secs(1),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_default_and_are_bounded() {
        let rpc = RpcConfig::default();
        assert_eq!(
            timeout(&rpc, None).unwrap(),
            Duration::from_millis(rpc.default_timeout_ms)
        );
        assert_eq!(
            timeout(&rpc, Some(250)).unwrap(),
            Duration::from_millis(250)
        );
        for bad in [0, rpc.max_timeout_ms + 1] {
            let error = timeout(&rpc, Some(bad)).unwrap_err();
            assert_eq!(error.code(), "invalid_request");
            assert!(error.to_string().starts_with("timeout_ms:"), "{error}");
        }
    }

    #[test]
    fn rpc_failures_have_their_own_codes_and_quote_nothing() {
        let cases = [
            (
                RpcError::Timeout(Duration::from_millis(5)),
                504,
                "reply_timeout",
            ),
            (
                RpcError::TooLarge { size: 9, max: 8 },
                502,
                "reply_too_large",
            ),
            (RpcError::CorrelationIdInUse, 409, "idempotency_key_in_use"),
            (RpcError::Lost, 503, "broker_unavailable"),
        ];
        for (error, status, code) in cases {
            let label = outcome(&error);
            let api = answer(error);
            assert_eq!((api.status().as_u16(), api.code()), (status, code));
            assert!(!label.is_empty());
        }
        let api = answer(RpcError::CorrelationIdInUse);
        assert_eq!(api.retry_after(), Some(1));
    }
}
