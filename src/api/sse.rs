//! `GET /v1/events`: server-sent events (SPEC §9). One subscription per response — a
//! stream replayed from an offset (`id:` = the offset; `Last-Event-ID` resumes after
//! it) or a live binding shared through the live hub (`id:` = the message id). Each
//! event's `data:` is the WebSocket `message` frame. The response ends with an
//! `event: error` at token expiry, on shutdown and when the broker side is lost; a
//! reader that stays too slow is cut; dropping the response releases the subscription.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, Sleep};
use utoipa::IntoParams;

use crate::AppState;
use crate::auth;
use crate::auth::grants::GrantPattern;
use crate::delivery::live::{LiveSink, LiveSubscription};
use crate::delivery::render::{Format, MessageFrame};
use crate::delivery::stream::{StreamOffset, StreamRequest, StreamSubscription};
use crate::delivery::{Outgoing, SendBudget};
use crate::error::ApiError;
use crate::telemetry;
use crate::tenancy::{self, Principal, Scope};
use crate::ws::protocol::ServerFrame;

/// Longest `access_token` accepted in the query (tokens are a few hundred bytes to a
/// few KB). Keeps the longest valid URI well under hyper's 64 KiB (414) even when every
/// character is percent-encoded UTF-8.
const MAX_TOKEN_BYTES: usize = 4096;
/// Longest exchange, stream or binding key accepted.
const MAX_NAME_BYTES: usize = 255;
/// Longest message id used as an event `id:`; a longer one is left out.
const MAX_EVENT_ID_BYTES: usize = 1024;

/// What to read. Exactly one of `stream` and `exchange`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The token, for clients that cannot set `Authorization` (a browser's
    /// `EventSource`). Prefer the header elsewhere: URLs end up in logs.
    #[param(nullable = false, max_length = 4096)]
    access_token: Option<String>,
    /// A stream of the tenant's vhost to replay (needs a `{ stream }` subscribe grant).
    #[param(nullable = false, max_length = 255, example = "order-log")]
    stream: Option<String>,
    /// Where a stream subscription starts: `first`, `last`, `next` (default), an
    /// offset (`0`, `1`, …) or an RFC 3339 UTC timestamp. A `Last-Event-ID` header
    /// overrides it (the stream resumes after that offset).
    #[param(nullable = false, max_length = 64, example = "first")]
    offset: Option<String>,
    /// An exchange to follow live (at-most-once, as a WebSocket `live` subscription).
    #[param(nullable = false, max_length = 255, example = "events")]
    exchange: Option<String>,
    /// Live: the binding key (required). Stream: a routing-key filter (default `#`).
    #[param(nullable = false, max_length = 255, example = "order.*")]
    binding_key: Option<String>,
    /// `warren` (default): `data:` is a WebSocket message frame. `cloudevents`: its
    /// `event` member holds the message as a structured CloudEvent (SPEC §12).
    #[param(inline, nullable = false)]
    format: Option<Format>,
}

/// The request header an `EventSource` sends when it reconnects. Documentation only.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct EventsHeaders {
    /// The `id:` of the last event received: a stream resumes at the offset after it.
    /// Ignored for live subscriptions (they cannot replay).
    #[serde(rename = "Last-Event-ID")]
    #[param(nullable = false, pattern = "^[0-9]{1,19}$", example = "41")]
    last_event_id: Option<String>,
}

/// Open event streams per tenant (`sse.max_connections_per_tenant`,
/// `limits.max_sse_connections`).
#[derive(Default)]
pub struct SseConnections {
    per_tenant: Arc<Mutex<HashMap<String, usize>>>,
}

/// One counted event stream; uncounted on drop.
struct SseGuard {
    per_tenant: Arc<Mutex<HashMap<String, usize>>>,
    tenant: String,
}

impl SseConnections {
    fn admit(&self, tenant: &str, max: usize) -> Result<SseGuard, ApiError> {
        let mut counts = self.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(tenant.to_owned()).or_default();
        if *count >= max {
            return Err(ApiError::RateLimited {
                detail: format!(
                    "tenant {tenant:?} already has {max} open event streams (limits.max_sse_connections or sse.max_connections_per_tenant)"
                ),
                retry_after: Duration::from_secs(5),
            });
        }
        *count += 1;
        telemetry::sse_connections(1);
        Ok(SseGuard {
            per_tenant: self.per_tenant.clone(),
            tenant: tenant.to_owned(),
        })
    }
}

impl Drop for SseGuard {
    fn drop(&mut self) {
        let mut counts = self.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.tenant);
            }
        }
        drop(counts);
        telemetry::sse_connections(-1);
    }
}

/// Subscribe as server-sent events
///
/// `text/event-stream` of one subscription: a stream replayed from an offset
/// (`?stream=order-log&offset=first`; each event's `id:` is its offset, and a
/// reconnect with `Last-Event-ID: N` resumes at `N+1`), or a live binding
/// (`?exchange=events&binding_key=order.*`; `id:` is the message id). Every message is
/// `event: message` whose `data:` is the WebSocket `message` frame (with `offset` for
/// streams). Comments keep the connection alive and `retry:` is set. The stream ends
/// with `event: error` (`data: {"type":"error","code":…,"detail":…}`) at token expiry
/// (`unauthorized`), on shutdown and when the broker side is lost
/// (`broker_unavailable`); a browser's `EventSource` reconnects by itself. A reader
/// that stays slower than the events is cut (the response is closed). Errors before
/// the stream starts are problem+json, except for a reader that accepts
/// `text/event-stream` (an `EventSource`): a transient one (429, 503, 504) is then a
/// `200` event stream with `retry:` and one `event: error` carrying the code, so the
/// browser reconnects by itself instead of giving up.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "subscribe",
    operation_id = "events",
    security(("bearerAuth" = [])),
    params(EventsQuery, EventsHeaders),
    responses(
        (status = 200, description = "The event stream; it ends with `event: error` (token expiry, shutdown, broker link lost).",
            content_type = "text/event-stream", body = String,
            headers(("Cache-Control" = String, description = "`no-cache`."),
                    ("X-Accel-Buffering" = String, description = "`no`: proxies must not buffer the stream."))),
        (status = 400, response = crate::api::doc::problems::InvalidRequest),
        (status = 401, response = crate::api::doc::problems::Unauthorized),
        (status = 403, response = crate::api::doc::problems::Forbidden),
        (status = 404, response = crate::api::doc::problems::StreamNotFound),
        (status = 429, response = crate::api::doc::problems::RateLimited),
        (status = 503, response = crate::api::doc::problems::SubscribeUnavailable),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    match open(&state, &headers, query).await {
        Ok(response) => response,
        Err(error) if is_transient(&error) && wants_event_stream(&headers) => {
            retry_later(&error, state.config.sse.retry_ms)
        }
        Err(error) => error.into_response(),
    }
}

/// A failure the same request may not meet in a moment: the broker link is down or
/// starting (503), a limit is full (429), the broker was slow (504).
fn is_transient(error: &ApiError) -> bool {
    matches!(error.status().as_u16(), 429 | 503 | 504)
}

/// An `EventSource` asks for `text/event-stream` (and a reader that asks for it
/// understands an event stream).
fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// A transient failure as an event stream: `retry:` (the failure's Retry-After, else
/// `sse.retry_ms`) and one `event: error` with its code, then the end. A browser's
/// EventSource treats any answer but a 200 event stream as final and never reconnects
/// (issue #27: a 5 s broker outage closed every open tab's stream for good); this one
/// it reconnects after, by itself. Permanent failures (400, 401, 403, 404) stay
/// problem+json, so an EventSource stops on them.
fn retry_later(error: &ApiError, retry_ms: u64) -> Response {
    telemetry::sse_event("error");
    let retry_ms = error
        .retry_after()
        .map_or(retry_ms, |s| s.saturating_mul(1000));
    let mut text = format!("retry: {retry_ms}\nevent: error\n");
    push_data(&mut text, &ServerFrame::error(None, error).to_json());
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        text,
    )
        .into_response()
}

async fn open(
    state: &AppState,
    headers: &HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::InvalidRequest(format!("query: {}", e.body_text())))?;
    let too_long = [
        ("stream", &query.stream),
        ("exchange", &query.exchange),
        ("binding_key", &query.binding_key),
    ]
    .into_iter()
    .find(|(_, v)| v.as_ref().is_some_and(|v| v.len() > MAX_NAME_BYTES));
    if let Some((name, _)) = too_long {
        return Err(ApiError::InvalidRequest(format!(
            "{name}: must be at most {MAX_NAME_BYTES} bytes"
        )));
    }
    if query
        .access_token
        .as_ref()
        .is_some_and(|t| t.len() > MAX_TOKEN_BYTES)
    {
        return Err(ApiError::Unauthorized("the token is too long".to_owned()));
    }
    let token = match auth::bearer(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))? {
        Some(token) => Some(token),
        None => query.access_token.as_deref(),
    };
    let principal = tenancy::authenticate(&state.verifier, &state.tenants, token).await?;
    principal.require(Scope::Subscribe)?;
    let config = &state.config.sse;
    let tenant = principal.tenant.clone();
    let max = tenant
        .quota
        .max_sse_connections
        .unwrap_or(config.max_connections_per_tenant);
    let guard = state.sse.admit(&tenant.name, max)?;
    let (tx, rx) = mpsc::channel(config.send_buffer);
    let budget = SendBudget::new(config.max_buffered_bytes);
    let (subscription, kind) = match (&query.stream, &query.exchange) {
        (Some(stream), None) => {
            let (offset, resume) = start_offset(headers, query.offset.as_deref())?;
            let filter = pattern(query.binding_key.as_deref().unwrap_or("#"))?;
            let request = StreamRequest {
                subscription: stream,
                stream,
                filter,
                offset,
                resume,
                prefetch: state.config.streams.prefetch,
                slow_timeout: Duration::from_millis(config.slow_reader_timeout_ms),
                budget,
                transport: "sse",
                slots: &state.stream_slots,
                format: query.format.unwrap_or_default(),
            };
            let stream = StreamSubscription::start(tenant, request, tx).await?;
            (Subscription::Stream(stream), Kind::Stream)
        }
        (None, Some(exchange)) => {
            if query.offset.is_some() {
                return Err(ApiError::InvalidRequest(
                    "offset: only a stream subscription takes an offset".to_owned(),
                ));
            }
            let binding_key = query.binding_key.as_deref().ok_or_else(|| {
                ApiError::InvalidRequest("binding_key: required with exchange".to_owned())
            })?;
            let pattern = pattern(binding_key)?;
            tenant.authorize_subscribe(exchange, &pattern)?;
            let target = LiveSink {
                subscription: exchange,
                sink: tx,
                budget,
            };
            let live = state
                .live
                .join_as(
                    &tenant,
                    exchange,
                    &pattern,
                    target,
                    state.config.ws.live_queue_max_length,
                    query.format.unwrap_or_default(),
                )
                .await?;
            (Subscription::Live(live), Kind::Live)
        }
        _ => {
            return Err(ApiError::InvalidRequest(
                "exactly one of `stream` and `exchange` is required".to_owned(),
            ));
        }
    };
    let feed = Feed {
        rx,
        kind,
        expiry: Box::pin(tokio::time::sleep_until(expiry_instant(
            principal.expires_at,
        ))),
        keepalive: keepalive(config.keepalive(state.config.server.header_read_timeout_s)),
        shutdown: state.shutdown_receiver(),
        retry_ms: config.retry_ms,
        started: false,
        done: false,
        _cleanup: Cleanup {
            state: state.clone(),
            subscription: Some(subscription),
            _guard: guard,
        },
        _principal: principal,
    };
    let body = Body::from_stream(futures::stream::unfold(feed, Feed::next));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response())
}

/// `/demo/sse`: a plain browser `EventSource` that replays a stream and resumes by
/// itself after a dropped connection (the browser test drives it).
pub async fn demo_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("../../assets/sse.html"),
    )
}

fn pattern(binding_key: &str) -> Result<GrantPattern, ApiError> {
    GrantPattern::parse(binding_key)
        .map_err(|e| ApiError::InvalidRequest(format!("binding_key: {e}")))
}

/// Where a stream starts: after `Last-Event-ID` when an EventSource reconnects, else
/// `?offset=`, else `next`; with the `kind` label of the resume metric.
fn start_offset(
    headers: &HeaderMap,
    offset: Option<&str>,
) -> Result<(StreamOffset, &'static str), ApiError> {
    if let Some(last) = headers.get("last-event-id") {
        let text = last
            .to_str()
            .map_err(|_| {
                ApiError::InvalidRequest(
                    "Last-Event-ID: must be a stream offset this gateway sent".to_owned(),
                )
            })?
            .trim();
        // An EventSource that never received an event sends none; an empty one is none.
        if !text.is_empty() {
            let offset =
                StreamOffset::after_last_event_id(text).map_err(ApiError::InvalidRequest)?;
            return Ok((offset, "last_event_id"));
        }
    }
    let offset = match offset {
        Some(text) => StreamOffset::from_query(text)
            .map_err(|e| ApiError::InvalidRequest(format!("offset: {e}")))?,
        None => StreamOffset::Next,
    };
    Ok((offset, offset.kind()))
}

fn keepalive(every: Duration) -> Interval {
    let mut interval = tokio::time::interval_at(Instant::now() + every, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// When the token's `exp` (Unix seconds) falls, as a monotonic instant.
fn expiry_instant(expires_at: u64) -> Instant {
    let now = crate::delivery::stream::unix_now();
    let remaining = expires_at.saturating_sub(now).min(10 * 365 * 86_400);
    Instant::now() + Duration::from_secs(remaining)
}

enum Subscription {
    Live(LiveSubscription),
    Stream(StreamSubscription),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Live,
    Stream,
}

/// Gives the subscription back when the response is dropped (finished, or the client
/// went away): a live hub membership or a stream consumer.
struct Cleanup {
    state: AppState,
    subscription: Option<Subscription>,
    _guard: SseGuard,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(subscription) = self.subscription.take() else {
            return;
        };
        let state = self.state.clone();
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.state.tasks().spawn(async move {
            match subscription {
                Subscription::Live(live) => state.live.leave(live).await,
                Subscription::Stream(stream) => stream.stop().await,
            }
        });
    }
}

/// The response body's state: what the subscription delivered, the token's expiry,
/// the keep-alive timer and the shutdown signal.
struct Feed {
    rx: mpsc::Receiver<Outgoing>,
    kind: Kind,
    expiry: Pin<Box<Sleep>>,
    keepalive: Interval,
    shutdown: watch::Receiver<bool>,
    retry_ms: u64,
    started: bool,
    done: bool,
    _cleanup: Cleanup,
    _principal: Principal,
}

/// What woke the body.
enum Step {
    Shutdown,
    Expired,
    Delivered(Option<Outgoing>),
    KeepAlive,
}

/// What the body yields: text, or an error that makes hyper drop the connection.
type Chunk = Result<Bytes, std::io::Error>;

impl Feed {
    async fn next(mut self) -> Option<(Chunk, Self)> {
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            let hello = format!("retry: {}\n: warren\n\n", self.retry_ms);
            return Some((Ok(Bytes::from(hello)), self));
        }
        let step = tokio::select! {
            biased;
            _ = self.shutdown.wait_for(|stop| *stop) => Step::Shutdown,
            () = self.expiry.as_mut() => Step::Expired,
            outgoing = self.rx.recv() => Step::Delivered(outgoing),
            _ = self.keepalive.tick() => Step::KeepAlive,
        };
        let chunk = match step {
            Step::Shutdown => self.end(&ApiError::BrokerUnavailable {
                detail: "the gateway is shutting down; reconnect to resume".to_owned(),
                retry_after: Duration::from_secs(1),
            }),
            Step::Expired => self.end(&ApiError::Unauthorized(
                "the token expired; reconnect with a fresh token".to_owned(),
            )),
            Step::Delivered(Some(Outgoing::Message(frame, _bytes))) => {
                drop(crate::otel::delivery_span("sse", frame.delivered()));
                Ok(self.message(&frame))
            }
            Step::Delivered(Some(Outgoing::Ended { error, .. })) => self.end(&error),
            // The subscription gave up on this reader (too slow): cut the connection.
            Step::Delivered(None) => {
                self.done = true;
                Err(std::io::Error::other("slow reader"))
            }
            Step::KeepAlive => Ok(Bytes::from_static(b": keep-alive\n\n")),
        };
        Some((chunk, self))
    }

    fn message(&self, frame: &MessageFrame) -> Bytes {
        telemetry::sse_event("message");
        let data = frame.to_json();
        let id = match self.kind {
            Kind::Stream => frame.offset().map(|o| o.to_string()),
            Kind::Live => frame
                .message_id()
                .filter(|id| id.len() <= MAX_EVENT_ID_BYTES && !id.contains(['\r', '\n', '\0']))
                .map(str::to_owned),
        };
        let mut text = String::with_capacity(data.len() + 64);
        if let Some(id) = id {
            text.push_str("id: ");
            text.push_str(&id);
            text.push('\n');
        }
        text.push_str("event: message\n");
        push_data(&mut text, &data);
        Bytes::from(text)
    }

    /// The last event: an error with a SPEC §4 code; the response ends after it.
    fn end(&mut self, error: &ApiError) -> Result<Bytes, std::io::Error> {
        self.done = true;
        telemetry::sse_event("error");
        let data = ServerFrame::error(None, error).to_json();
        let mut text = String::from("event: error\n");
        push_data(&mut text, &data);
        Ok(Bytes::from(text))
    }
}

/// Appends `data` as the `data:` field of an event and ends the event. A CR or LF in
/// it would end the field (and a blank line the event) early, so each line of `data`,
/// whatever ends it (CRLF, CR or LF, as a reader splits them), goes in a `data:` line
/// of its own; the reader joins them with LF. A message frame's JSON holds a line break
/// only as whitespace (a payload forwarded byte for byte), so what the reader joins is
/// still the same JSON.
fn push_data(text: &mut String, data: &str) {
    for line in data.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
        text.push_str("data: ");
        text.push_str(line);
        text.push('\n');
    }
    text.push('\n');
}

#[cfg(test)]
mod tests {
    use super::push_data;

    /// The fields of one event as an EventSource reads them: lines end at CRLF, CR or
    /// LF; `data:` lines are joined with LF.
    fn read_data(event: &str) -> (String, usize) {
        let normalised = event.replace("\r\n", "\n").replace('\r', "\n");
        let blocks: Vec<&str> = normalised.split("\n\n").filter(|b| !b.is_empty()).collect();
        let data: Vec<&str> = blocks[0]
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .collect();
        (data.join("\n"), blocks.len())
    }

    #[test]
    fn line_breaks_in_the_data_never_end_the_event() {
        for json in [
            "{\"a\":\r\n\r\n1}",
            "{\"a\":\n\n1}",
            "{\"a\":\r\r1}",
            "\r\n{\"a\":1}\r\n\r\n",
            "{\"a\":1}",
        ] {
            let mut text = String::new();
            push_data(&mut text, json);
            let (data, events) = read_data(&text);
            assert_eq!(events, 1, "{json:?} made {events} events: {text:?}");
            let value: serde_json::Value = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("{json:?} read back as {data:?}: {e}"));
            assert_eq!(value, serde_json::json!({"a": 1}));
        }
    }
}
