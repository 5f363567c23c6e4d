//! What the handlers' `#[utoipa::path]` annotations share: the document's info and tags,
//! the problem responses, the publish headers and the bearer scheme. The handlers name
//! these; `openapi.rs` assembles the document from the handlers.

use serde::Deserialize;
use serde_json::json;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, ObjectBuilder, Ref, RefOr, Response, ResponseBuilder, Type,
};
use utoipa::{IntoParams, Modify, OpenApi, ToResponse};

use crate::broker::PublishError;
use crate::error::{ApiError, Problem, ProblemCode};

/// The name of the bearer JWT scheme that `/v1` operations require.
pub const BEARER: &str = "bearerAuth";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Warren",
        description = "HTTP gateway in front of RabbitMQ. A `2xx` from a publish means the broker \
confirmed the message (publisher confirm); publishes are `mandatory` by default, so an \
unroutable message is a `422`, never a silent drop.\n\n\
Every `/v1` call needs `Authorization: Bearer <jwt>`: an HS256 token with `exp`, the tenant \
claim and `scope` (`publish`). The tenant selects the RabbitMQ vhost and the grants \
(exchange + routing-key patterns) that allow a publish.\n\n\
Errors are RFC 9457 `application/problem+json` with a stable `code`. Send an \
`Idempotency-Key` to make retries safe: while the key is retained, a retried request never \
publishes twice and gets the first answer again with `Idempotent-Replayed: true`.\n\n\
Every response carries `X-Request-Id` (the client's, or a fresh UUID).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "publish", description = "Publish messages with publisher confirms."),
        (name = "request", description = "Request/reply: publish a request and wait for its reply (direct reply-to)."),
        (name = "subscribe", description = "Receive messages as server-sent events (streams replay from an offset)."),
        (name = "pull", description = "Take messages from a queue with leases, and ack, nack or extend them (any replica)."),
        (name = "operations", description = "Liveness, readiness and metrics (no token needed)."),
    ),
    components(
        schemas(Problem, ProblemCode),
        responses(
            problems::InvalidRequest,
            problems::Unauthorized,
            problems::Forbidden,
            problems::ExchangeNotFound,
            problems::IdempotencyKeyInUse,
            problems::RateLimited,
            problems::PayloadTooLarge,
            problems::UnsupportedMediaType,
            problems::RequestTimeout,
            problems::PublishUnprocessable,
            problems::IdempotencyKeyMismatch,
            problems::PublishUnavailable,
            problems::IdempotencyStoreUnavailable,
            problems::ConfirmTimeout,
            problems::RequestConflict,
            problems::ReplyTooLarge,
            problems::RequestTimedOut,
            problems::StreamNotFound,
            problems::SubscribeUnavailable,
            problems::QueueNotFound,
        ),
    ),
    modifiers(&BearerScheme),
)]
pub struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .description(Some(
                "An HS256 JWT with `exp`, the tenant claim (`auth.tenant_claim`, default \
                 `tenant`) and `scope` containing `publish`. `warren token` mints one; dev \
                 mode (`warren serve`) prints one.",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(BEARER, SecurityScheme::Http(scheme));
    }
}

/// The request headers both publish operations read. Documentation only: the handlers
/// read them through [`crate::idempotency::IdempotencyKey`] and
/// [`crate::publishing::TraceContext`].
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct PublishHeaders {
    /// Makes retries safe (SPEC §5): 1-255 printable ASCII characters, as a bare token or
    /// a quoted structured-field string (`"abc"` and `abc` are the same key). Scoped by
    /// tenant and token subject. Same key and same request: the stored answer is replayed
    /// with `Idempotent-Replayed: true`; still in flight: `409`; different request: `422`.
    /// `503` and `504` answers release the key, and the AMQP `message_id` derived from
    /// (tenant, token subject, key) stays the same on every attempt.
    #[serde(rename = "Idempotency-Key")]
    #[param(
        pattern = r#"^(?:[!#-~](?:[ -~]{0,253}[!-~])?|"(?:[ !#-\[\]-~]|\\["\\]){1,255}")$"#,
        example = "order-42",
        nullable = false
    )]
    idempotency_key: Option<String>,
    /// W3C trace context; copied into the AMQP message headers (when 1-512 characters).
    #[param(
        example = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        nullable = false
    )]
    traceparent: Option<String>,
    /// W3C trace context vendor state; copied like `traceparent`.
    #[param(example = "congo=t61rcWkgMzE", nullable = false)]
    tracestate: Option<String>,
    /// Echoed in the response's `X-Request-Id` and logged; a fresh UUID when absent.
    #[serde(rename = "X-Request-Id")]
    #[param(nullable = false)]
    x_request_id: Option<String>,
}

const REPLAYED: &str = "`true` when this is the stored answer to an earlier request with \
                        the same `Idempotency-Key`; absent otherwise.";

/// A problem+json response whose examples are real answers (built from [`ApiError`]s, so
/// they cannot drift from what the gateway sends).
fn problem(description: &str, examples: &[(&str, ApiError)]) -> Response {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Problem")))
        .examples_from_iter(examples.iter().map(|(name, error)| {
            let value = serde_json::to_value(error.problem()).ok();
            (*name, ExampleBuilder::new().value(value).build())
        }))
        .build();
    let mut response = ResponseBuilder::new()
        .description(description)
        .content("application/problem+json", content);
    if examples.iter().any(|(_, e)| e.retry_after().is_some()) {
        let retry_after = HeaderBuilder::new()
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            ))
            .description(Some("Seconds to wait before retrying (at least 1)."))
            .build();
        response = response.header("Retry-After", retry_after);
    }
    // Final answers are stored under an Idempotency-Key and replayed (see
    // `idempotency::is_final`): among problems, 404 and 422 `unroutable`.
    if examples
        .iter()
        .any(|(_, e)| matches!(e, ApiError::ExchangeNotFound(_) | ApiError::Unroutable(_)))
    {
        let replayed = HeaderBuilder::new()
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .description(Some(REPLAYED))
            .build();
        response = response.header("Idempotent-Replayed", replayed);
    }
    if examples
        .iter()
        .any(|(_, e)| matches!(e, ApiError::Unauthorized(_)))
    {
        let challenge = HeaderBuilder::new()
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .description(Some("The bearer challenge (RFC 6750)."))
            .example(Some(json!(
                "Bearer realm=\"warren\", error=\"invalid_token\""
            )))
            .build();
        response = response.header("WWW-Authenticate", challenge);
    }
    response.build()
}

/// The reusable problem responses, one per status and meaning, under
/// `#/components/responses`.
pub mod problems {
    use super::*;

    macro_rules! problem_response {
        ($(#[doc = $doc:literal])+ $name:ident => [$(($example:literal, $error:expr)),+ $(,)?]) => {
            $(#[doc = $doc])+
            pub struct $name;

            impl<'s> ToResponse<'s> for $name {
                fn response() -> (&'s str, RefOr<Response>) {
                    let description = [$($doc),+].map(str::trim).join(" ");
                    let examples = [$(($example, $error)),+];
                    (stringify!($name), problem(&description, &examples).into())
                }
            }
        };
    }

    problem_response! {
        /// `invalid_request`: bad JSON, a missing, unknown or invalid field (the detail
        /// names its JSON path), not exactly one of `payload`/`body`/`body_base64`, or a bad
        /// `Idempotency-Key`. Nothing was published.
        InvalidRequest => [
            ("field", ApiError::InvalidRequest(
                "routing_key: must be at most 255 bytes, got 300".to_owned())),
            ("body_kind", ApiError::InvalidRequest(
                "one of payload, body or body_base64 is required".to_owned())),
            ("idempotency_key", ApiError::InvalidRequest(
                "Idempotency-Key: must be 1-255 characters".to_owned())),
        ]
    }

    problem_response! {
        /// `unauthorized`: the bearer token is missing, malformed, badly signed, expired or
        /// not yet valid, has the wrong issuer or audience, or names no tenant.
        Unauthorized => [
            ("missing", ApiError::Unauthorized("a bearer token is required".to_owned())),
            ("expired", ApiError::Unauthorized("the token has expired".to_owned())),
        ]
    }

    problem_response! {
        /// `forbidden`: the token's tenant is not configured, its scope lacks `publish`, no
        /// grant allows this exchange and routing key, or the broker refused access.
        /// Nothing reached the broker.
        Forbidden => [
            ("scope", ApiError::Forbidden(
                "the token's scope does not include \"publish\"".to_owned())),
            ("grant", ApiError::Forbidden(
                "tenant \"acme\" may not publish to exchange \"events\" with routing key \"audit.x\""
                    .to_owned())),
        ]
    }

    problem_response! {
        /// `exchange_not_found`: the exchange does not exist in the tenant's vhost.
        ExchangeNotFound => [
            ("exchange_not_found", ApiError::ExchangeNotFound("events".to_owned())),
        ]
    }

    problem_response! {
        /// `idempotency_key_in_use`: a request with this `Idempotency-Key` is still in
        /// flight; retry after `Retry-After` seconds.
        IdempotencyKeyInUse => [
            ("idempotency_key_in_use", ApiError::IdempotencyKeyInUse),
        ]
    }

    problem_response! {
        /// `rate_limited`: the tenant is over a quota (`limits.publish_rate`,
        /// `limits.publish_bytes_rate`, `limits.max_inflight_publishes`), or sent a new
        /// `Idempotency-Key` while its share of the idempotency memory store is all held
        /// by its own requests in flight; nothing was published. Retry after
        /// `Retry-After` seconds.
        RateLimited => [
            ("rate_limited", ApiError::RateLimited {
                detail: "tenant \"acme\" is over its rate of 100 messages per second (limits.publish_rate)"
                    .to_owned(),
                retry_after: std::time::Duration::from_secs(1),
            }),
        ]
    }

    problem_response! {
        /// `payload_too_large`: the body is over `server.max_body_bytes`, or the batch over
        /// `server.max_batch_messages`.
        PayloadTooLarge => [
            ("body", ApiError::PayloadTooLarge(
                "the request body exceeds server.max_body_bytes (1048576 bytes)".to_owned())),
        ]
    }

    problem_response! {
        /// `unsupported_media_type`: the request body is not `application/json` (or
        /// `application/*+json`).
        UnsupportedMediaType => [
            ("unsupported_media_type", ApiError::UnsupportedMediaType(
                "the request body must be JSON (Content-Type: application/json)".to_owned())),
        ]
    }

    problem_response! {
        /// `request_timeout`: the request body did not arrive in full within
        /// `server.body_read_timeout_s` of the gateway starting to read it; nothing was
        /// published. Send the body promptly (or retry over a faster link).
        RequestTimeout => [
            ("request_timeout", ApiError::RequestTimeout(
                "the request body did not arrive within server.body_read_timeout_s (10 s)"
                    .to_owned())),
        ]
    }

    problem_response! {
        /// `unroutable`: the publish was mandatory and the broker returned it (no queue is
        /// bound for the routing key); or `idempotency_key_mismatch`: this
        /// `Idempotency-Key` was used with a different request, and nothing was published.
        PublishUnprocessable => [
            ("unroutable", ApiError::from(PublishError::Unroutable("NO_ROUTE".to_owned()))),
            ("idempotency_key_mismatch", ApiError::IdempotencyKeyMismatch),
        ]
    }

    problem_response! {
        /// `idempotency_key_mismatch`: this `Idempotency-Key` was used with a different
        /// request; nothing was published.
        IdempotencyKeyMismatch => [
            ("idempotency_key_mismatch", ApiError::IdempotencyKeyMismatch),
        ]
    }

    problem_response! {
        /// `broker_unavailable` (no broker link, the broker blocks publishers, the channel
        /// was lost before the confirm, or every channel is busy), `broker_rejected`
        /// (`basic.nack`) or `idempotency_store_unavailable`. Retry after `Retry-After`
        /// seconds, with the same `Idempotency-Key`.
        PublishUnavailable => [
            ("broker_unavailable", ApiError::from(PublishError::Unavailable {
                reason: "no connection to the broker for vhost \"/\" (reconnecting)".to_owned(),
                retry_after: std::time::Duration::from_secs(2),
            })),
            ("broker_rejected", ApiError::from(PublishError::Rejected)),
            ("idempotency_store_unavailable", ApiError::IdempotencyStoreUnavailable(
                "idempotency store unavailable: connection refused".to_owned())),
        ]
    }

    problem_response! {
        /// `idempotency_store_unavailable`: an `Idempotency-Key` was sent and the store does
        /// not answer (or the memory store is full with other tenants' keys); nothing was
        /// published. Retry after `Retry-After` seconds.
        IdempotencyStoreUnavailable => [
            ("idempotency_store_unavailable", ApiError::IdempotencyStoreUnavailable(
                "idempotency store unavailable: connection refused".to_owned())),
        ]
    }

    problem_response! {
        /// `stream_not_found`: no stream of this name in the tenant's vhost (or a queue
        /// of that name that is not a stream; it is never consumed).
        StreamNotFound => [
            ("stream_not_found", ApiError::StreamNotFound(
                "stream \"order-log\" does not exist in this tenant's vhost".to_owned())),
        ]
    }

    problem_response! {
        /// `queue_not_found`: no queue of this name in the tenant's vhost.
        QueueNotFound => [
            ("queue_not_found", ApiError::QueueNotFound("jobs".to_owned())),
        ]
    }

    problem_response! {
        /// `broker_unavailable`: no broker link, or the vhost has as many subscriptions
        /// open as the gateway allows. Retry after `Retry-After` seconds.
        SubscribeUnavailable => [
            ("broker_unavailable", ApiError::from(PublishError::Unavailable {
                reason: "no connection to the broker for vhost \"/\" (reconnecting)".to_owned(),
                retry_after: std::time::Duration::from_secs(2),
            })),
        ]
    }

    problem_response! {
        /// `confirm_timeout`: no publisher confirm within `amqp.confirm_timeout_ms`. The
        /// outcome is unknown: retry with the same `Idempotency-Key` (consumers can
        /// de-duplicate on the derived `message_id`).
        ConfirmTimeout => [
            ("confirm_timeout", ApiError::from(PublishError::ConfirmTimeout(
                std::time::Duration::from_secs(5)))),
        ]
    }

    problem_response! {
        /// `idempotency_key_in_use`: a request with this `Idempotency-Key` is still in
        /// flight, or (request/reply) a request with this `correlation_id` is still
        /// awaiting its reply on every reply channel. Retry after `Retry-After` seconds
        /// (or leave `correlation_id` out: Warren then makes a unique one).
        RequestConflict => [
            ("idempotency_key_in_use", ApiError::IdempotencyKeyInUse),
            ("correlation_id_in_flight", ApiError::CorrelationIdInUse(
                "properties.correlation_id: a request with this correlation id is still awaiting its reply; retry later, or leave correlation_id out and Warren makes a unique one"
                    .to_owned())),
        ]
    }

    problem_response! {
        /// `reply_too_large`: the reply is larger than `rpc.max_reply_bytes`; it was
        /// dropped. The request was handled: retrying sends it again.
        ReplyTooLarge => [
            ("reply_too_large", ApiError::ReplyTooLarge(
                "the reply is larger than rpc.max_reply_bytes (1048576 bytes) and was dropped"
                    .to_owned())),
        ]
    }

    problem_response! {
        /// `reply_timeout`: the request was confirmed and routed, and no reply came within
        /// `timeout_ms` (a later reply is dropped); or `confirm_timeout`: no publisher
        /// confirm within `amqp.confirm_timeout_ms`. Retry with the same
        /// `Idempotency-Key`.
        RequestTimedOut => [
            ("reply_timeout", ApiError::ReplyTimeout(
                "no reply within 5000 ms; the request was delivered, and a reply that comes later is dropped"
                    .to_owned())),
            ("confirm_timeout", ApiError::from(PublishError::ConfirmTimeout(
                std::time::Duration::from_secs(5)))),
        ]
    }
}
