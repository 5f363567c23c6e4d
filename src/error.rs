//! One error type for every answer that is not a success: RFC 9457 problem+json with
//! a stable `code` (SPEC §4). Internals are logged, never sent to clients. How one
//! becomes an HTTP response is the edge's business (`api/problem.rs`); the schema
//! derive keeps the OpenAPI document and this type from drifting apart.

use std::time::Duration;

use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("exchange {0:?} does not exist in this tenant's vhost")]
    ExchangeNotFound(String),
    #[error("queue {0:?} does not exist in this tenant's vhost")]
    QueueNotFound(String),
    /// SPEC §9: no stream of this name in the tenant's vhost (or a queue that is not one).
    #[error("{0}")]
    StreamNotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    Unroutable(String),
    #[error("{detail}")]
    BrokerUnavailable {
        detail: String,
        retry_after: Duration,
    },
    #[error("{0}")]
    BrokerRejected(String),
    #[error("{0}")]
    ConfirmTimeout(String),
    #[error("a request with this Idempotency-Key is still in flight; retry after it finishes")]
    IdempotencyKeyInUse,
    #[error("this Idempotency-Key was used with a different request (method, path or body)")]
    IdempotencyKeyMismatch,
    /// A CloudEvent with the same (`source`, `id`) is still being published (SPEC §12).
    #[error("an event with this source and id is still being published; retry after it finishes")]
    EventInFlight,
    /// A CloudEvent reused an earlier event's (`source`, `id`) with other content.
    #[error(
        "an event with this source and id was already published with other content; \
         CloudEvents needs a new id for a distinct event"
    )]
    EventIdReused,
    #[error("{0}; not publishing without retry protection")]
    IdempotencyStoreUnavailable(String),
    #[error("{detail}")]
    RateLimited {
        detail: String,
        retry_after: Duration,
    },
    /// Request/reply (SPEC §10): no reply within the request's `timeout_ms`.
    #[error("{0}")]
    ReplyTimeout(String),
    /// Request/reply: the reply is larger than `rpc.max_reply_bytes`.
    #[error("{0}")]
    ReplyTooLarge(String),
    /// Request/reply: this `correlation_id` is already awaiting a reply on every
    /// reply channel of the vhost.
    #[error("{0}")]
    CorrelationIdInUse(String),
    /// Pull (SPEC §14): the receipt's lease ran out; the message was or will be
    /// delivered again.
    #[error("{0}")]
    LeaseExpired(String),
    #[error("internal error")]
    Internal(String),
}

/// An RFC 9457 problem (`application/problem+json`). Branch on `code`, which is stable;
/// `title` and `detail` are for people and may change.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "https://warren.dev/problems/unroutable",
    "title": "Unroutable",
    "status": 422,
    "code": "unroutable",
    "detail": "the broker returned the message as unroutable (NO_ROUTE): no queue is bound for this routing key"
}))]
pub struct Problem {
    /// A URI naming the problem type: `https://warren.dev/problems/{code}`.
    #[serde(rename = "type")]
    #[schema(format = "uri")]
    pub kind: String,
    /// Short, human-readable summary of the problem type.
    pub title: &'static str,
    /// The HTTP status code of this answer.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    pub code: ProblemCode,
    /// Human-readable explanation of this occurrence; names the JSON path when a field is
    /// at fault.
    pub detail: String,
}

/// The stable, machine-readable error code of a problem (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProblemCode {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    ExchangeNotFound,
    QueueNotFound,
    StreamNotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    RequestTimeout,
    Unroutable,
    BrokerUnavailable,
    BrokerRejected,
    ConfirmTimeout,
    IdempotencyKeyInUse,
    IdempotencyKeyMismatch,
    IdempotencyStoreUnavailable,
    RateLimited,
    InternalError,
    ReplyTimeout,
    ReplyTooLarge,
    LeaseExpired,
}

impl ProblemCode {
    pub const ALL: [Self; 23] = [
        Self::InvalidRequest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::ExchangeNotFound,
        Self::QueueNotFound,
        Self::StreamNotFound,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::RequestTimeout,
        Self::Unroutable,
        Self::BrokerUnavailable,
        Self::BrokerRejected,
        Self::ConfirmTimeout,
        Self::IdempotencyKeyInUse,
        Self::IdempotencyKeyMismatch,
        Self::IdempotencyStoreUnavailable,
        Self::RateLimited,
        Self::InternalError,
        Self::ReplyTimeout,
        Self::ReplyTooLarge,
        Self::LeaseExpired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::ExchangeNotFound => "exchange_not_found",
            Self::QueueNotFound => "queue_not_found",
            Self::StreamNotFound => "stream_not_found",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RequestTimeout => "request_timeout",
            Self::Unroutable => "unroutable",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::BrokerRejected => "broker_rejected",
            Self::ConfirmTimeout => "confirm_timeout",
            Self::IdempotencyKeyInUse => "idempotency_key_in_use",
            Self::IdempotencyKeyMismatch => "idempotency_key_mismatch",
            Self::IdempotencyStoreUnavailable => "idempotency_store_unavailable",
            Self::RateLimited => "rate_limited",
            Self::InternalError => "internal_error",
            Self::ReplyTimeout => "reply_timeout",
            Self::ReplyTooLarge => "reply_too_large",
            Self::LeaseExpired => "lease_expired",
        }
    }
}

/// Seconds a client should wait before retrying after a nack, a key in use, or a store
/// outage: short, since each of these usually clears within a request's time.
const REJECTED_RETRY_AFTER_S: u64 = 1;

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_)
            | Self::ExchangeNotFound(_)
            | Self::QueueNotFound(_)
            | Self::StreamNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unroutable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BrokerUnavailable { .. } | Self::BrokerRejected(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ConfirmTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::IdempotencyKeyInUse | Self::EventInFlight => StatusCode::CONFLICT,
            Self::IdempotencyKeyMismatch | Self::EventIdReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IdempotencyStoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ReplyTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::ReplyTooLarge(_) => StatusCode::BAD_GATEWAY,
            Self::CorrelationIdInUse(_) => StatusCode::CONFLICT,
            Self::LeaseExpired(_) => StatusCode::GONE,
        }
    }

    pub fn code(&self) -> &'static str {
        self.problem_code().as_str()
    }

    pub fn problem_code(&self) -> ProblemCode {
        match self {
            Self::InvalidRequest(_) => ProblemCode::InvalidRequest,
            Self::Unauthorized(_) => ProblemCode::Unauthorized,
            Self::Forbidden(_) => ProblemCode::Forbidden,
            Self::NotFound(_) => ProblemCode::NotFound,
            Self::MethodNotAllowed(_) => ProblemCode::MethodNotAllowed,
            Self::ExchangeNotFound(_) => ProblemCode::ExchangeNotFound,
            Self::QueueNotFound(_) => ProblemCode::QueueNotFound,
            Self::StreamNotFound(_) => ProblemCode::StreamNotFound,
            Self::PayloadTooLarge(_) => ProblemCode::PayloadTooLarge,
            Self::UnsupportedMediaType(_) => ProblemCode::UnsupportedMediaType,
            Self::RequestTimeout(_) => ProblemCode::RequestTimeout,
            Self::Unroutable(_) => ProblemCode::Unroutable,
            Self::BrokerUnavailable { .. } => ProblemCode::BrokerUnavailable,
            Self::BrokerRejected(_) => ProblemCode::BrokerRejected,
            Self::ConfirmTimeout(_) => ProblemCode::ConfirmTimeout,
            Self::IdempotencyKeyInUse | Self::EventInFlight => ProblemCode::IdempotencyKeyInUse,
            Self::IdempotencyKeyMismatch | Self::EventIdReused => {
                ProblemCode::IdempotencyKeyMismatch
            }
            Self::IdempotencyStoreUnavailable(_) => ProblemCode::IdempotencyStoreUnavailable,
            Self::RateLimited { .. } => ProblemCode::RateLimited,
            Self::Internal(_) => ProblemCode::InternalError,
            Self::ReplyTimeout(_) => ProblemCode::ReplyTimeout,
            Self::ReplyTooLarge(_) => ProblemCode::ReplyTooLarge,
            // The same answer as a key in flight (SPEC §4): retry after Retry-After.
            Self::CorrelationIdInUse(_) => ProblemCode::IdempotencyKeyInUse,
            Self::LeaseExpired(_) => ProblemCode::LeaseExpired,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "Invalid request",
            Self::Unauthorized(_) => "Unauthorized",
            Self::Forbidden(_) => "Forbidden",
            Self::NotFound(_) => "Not found",
            Self::MethodNotAllowed(_) => "Method not allowed",
            Self::ExchangeNotFound(_) => "Exchange not found",
            Self::QueueNotFound(_) => "Queue not found",
            Self::StreamNotFound(_) => "Stream not found",
            Self::PayloadTooLarge(_) => "Payload too large",
            Self::UnsupportedMediaType(_) => "Unsupported media type",
            Self::RequestTimeout(_) => "Request timeout",
            Self::Unroutable(_) => "Unroutable",
            Self::BrokerUnavailable { .. } => "Broker unavailable",
            Self::BrokerRejected(_) => "Broker rejected the message",
            Self::ConfirmTimeout(_) => "Confirm timeout",
            Self::IdempotencyKeyInUse | Self::EventInFlight => "Idempotency key in use",
            Self::IdempotencyKeyMismatch | Self::EventIdReused => "Idempotency key mismatch",
            Self::IdempotencyStoreUnavailable(_) => "Idempotency store unavailable",
            Self::RateLimited { .. } => "Rate limited",
            Self::Internal(_) => "Internal error",
            Self::ReplyTimeout(_) => "Reply timeout",
            Self::ReplyTooLarge(_) => "Reply too large",
            Self::CorrelationIdInUse(_) => "Correlation id in use",
            Self::LeaseExpired(_) => "Lease expired",
        }
    }

    /// `Retry-After` seconds, for the answers the SPEC marks with it.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            // Round up, and never tell a client to retry at once into a known outage.
            Self::BrokerUnavailable { retry_after, .. } | Self::RateLimited { retry_after, .. } => {
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0))
                    .map(|s| s.max(1))
            }
            Self::BrokerRejected(_)
            | Self::IdempotencyKeyInUse
            | Self::EventInFlight
            | Self::CorrelationIdInUse(_)
            | Self::IdempotencyStoreUnavailable(_) => Some(REJECTED_RETRY_AFTER_S),
            _ => None,
        }
    }

    pub fn problem(&self) -> Problem {
        let detail = match self {
            Self::Internal(_) => "the gateway failed unexpectedly; see its logs".to_owned(),
            other => other.to_string(),
        };
        Problem {
            kind: format!("https://warren.dev/problems/{}", self.code()),
            title: self.title(),
            status: self.status().as_u16(),
            code: self.problem_code(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_codes_serialize_as_their_names() {
        for code in ProblemCode::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::from(code.as_str())
            );
        }
    }
}
