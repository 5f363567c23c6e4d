//! OpenTelemetry traces (SPEC §16), through `tracing` and `tracing-opentelemetry`: a
//! span per HTTP request (the caller's `traceparent` its parent), a producer span per
//! publish with its confirm (its context is the `traceparent` the AMQP message
//! carries), and a consumer span per delivery to a WebSocket, a server-sent event
//! stream, a push endpoint or a pull receive, child of the publisher's span through
//! that header. Off by default: without an endpoint no span is ever created (each
//! helper returns `Span::none()`), so tracing costs nothing when it is not asked for.
//!
//! What a span carries is chosen here and only here: method, route template, status,
//! exchange, routing key, message id, outcome. Never a token, a payload, a header value
//! a client sent, a secret or a signature.

mod export;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler as SdkSampler, SdkTracerProvider};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{ParentRoot, Sampler, Tracing};

/// The `tracing` target of every span that is exported; the export layer takes these
/// and nothing else (log events and other spans stay logs).
pub const TARGET: &str = "warren::otel";

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static DRAIN: OnceLock<export::Drain> = OnceLock::new();

/// At exit: waits (at most `within`) until the spans still queued were exported.
pub async fn flush(within: Duration) {
    if let Some(drain) = DRAIN.get() {
        drain.wait(within).await;
    }
}

/// Whether spans are made at all.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The tracer exporting to `settings`' collector; its export task is spawned on the
/// current runtime. Called once, by the subscriber's set-up.
pub fn tracer(settings: &Tracing) -> anyhow::Result<opentelemetry_sdk::trace::Tracer> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(settings.export_timeout_ms))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(settings.traces_url.clone())
        .with_timeout(Duration::from_millis(settings.export_timeout_ms))
        .with_http_client(export::Client(std::sync::Arc::new(client)))
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    // Our processor keeps the spans, so the exporter is told the resource here (the
    // SDK would tell only its own batch processor's exporter).
    opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
    let (processor, task, drain) = export::pipeline(
        exporter,
        settings.max_queue_spans,
        Duration::from_millis(settings.export_timeout_ms),
    );
    tokio::spawn(task);
    let _ = DRAIN.set(drain);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler(settings.sampler))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("warren");
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(tracer)
}

fn sampler(sampler: Sampler) -> SdkSampler {
    let root = |root: ParentRoot| match root {
        ParentRoot::AlwaysOn => SdkSampler::AlwaysOn,
        ParentRoot::AlwaysOff => SdkSampler::AlwaysOff,
        ParentRoot::Ratio(r) => SdkSampler::TraceIdRatioBased(r),
    };
    match sampler {
        Sampler::AlwaysOn => SdkSampler::AlwaysOn,
        Sampler::AlwaysOff => SdkSampler::AlwaysOff,
        Sampler::Ratio(r) => SdkSampler::TraceIdRatioBased(r),
        Sampler::ParentBased(inner) => SdkSampler::ParentBased(Box::new(root(inner))),
    }
}

/// The W3C trace context a message carries (`traceparent`, `tracestate` headers).
#[derive(Debug, Clone, Default)]
pub struct Carried {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Extractor for Carried {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

impl Carried {
    /// From HTTP request headers (each at most 512 bytes).
    pub fn of_http(headers: &http::HeaderMap) -> Self {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 512)
                .map(str::to_owned)
        };
        Self {
            traceparent: get("traceparent"),
            tracestate: get("tracestate"),
        }
    }

    /// From a message's AMQP headers.
    pub fn of_message(properties: &BasicProperties) -> Self {
        let Some(headers) = properties.headers() else {
            return Self::default();
        };
        let get = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) if s.as_bytes().len() <= 512 => {
                std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned)
            }
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => None,
        };
        Self {
            traceparent: get("traceparent"),
            tracestate: get("tracestate"),
        }
    }

    fn context(&self) -> opentelemetry::Context {
        TraceContextPropagator::new().extract(self)
    }
}

/// What a delivery span says of its message, taken when the delivery is rendered (only
/// while tracing is on).
#[derive(Debug, Clone)]
pub struct Delivered {
    carried: Carried,
    exchange: Box<str>,
    routing_key: Box<str>,
    message_id: Option<Box<str>>,
}

impl Delivered {
    pub fn of(delivery: &lapin::message::Delivery) -> Option<Box<Self>> {
        enabled().then(|| {
            Box::new(Self {
                carried: Carried::of_message(&delivery.properties),
                exchange: delivery.exchange.as_str().into(),
                routing_key: delivery.routing_key.as_str().into(),
                message_id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().into()),
            })
        })
    }
}

fn destination(exchange: &str) -> &str {
    if exchange.is_empty() {
        "amq.default"
    } else {
        exchange
    }
}

/// The span of one HTTP request, its parent the caller's `traceparent`.
pub fn http_span(method: &http::Method, route: &str, headers: &http::HeaderMap) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "http",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = route,
        http.response.status_code = Empty,
        otel.status_code = Empty,
        trace_id = Empty,
    );
    let _ = span.set_parent(Carried::of_http(headers).context());
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
    // The request's log span (the one every log line of the request is in) says it too,
    // so logs and traces join.
    Span::current().record("trace_id", tracing::field::display(trace_id));
    span
}

/// The answer's status on a request span; a 5xx marks it an error.
pub fn record_status(span: &Span, status: u16) {
    if span.is_none() {
        return;
    }
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// A producer span for one message about to be published (`operation`: `publish`,
/// `request`, `schedule`), a child of the current span. `target` names the exchange
/// and routing key when they are not the message's own (a scheduled message goes to
/// the ladder first). The message's `traceparent` and `tracestate` headers become the
/// span's context, so its consumers are the span's children.
pub fn publish_span(
    message: &mut crate::broker::OutgoingMessage,
    operation: &'static str,
    target: Option<(&str, &str)>,
) -> Span {
    if !enabled() {
        return Span::none();
    }
    let (exchange, routing_key) = match target {
        Some((e, k)) => (e.to_owned(), k.to_owned()),
        None => (message.exchange.clone(), message.routing_key.clone()),
    };
    let exchange = destination(&exchange);
    let span = tracing::info_span!(
        target: TARGET,
        "publish",
        otel.name = format!("{operation} {exchange}"),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = operation,
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = routing_key.as_str(),
        messaging.message.id = message.properties.message_id().as_ref().map(|m| m.as_str()),
        messaging.warren.outcome = Empty,
        otel.status_code = Empty,
    );
    inject(&span, &mut message.properties);
    span
}

/// How a publish ended (`acked`, `unroutable`, `timeout`, ...).
pub fn record_outcome(span: &Span, outcome: &str, ok: bool) {
    if span.is_none() {
        return;
    }
    span.record("messaging.warren.outcome", outcome);
    if !ok {
        span.record("otel.status_code", "ERROR");
    }
}

/// A consumer span for one delivery over `transport` (`websocket`, `sse`, `push`,
/// `pull`), a child of the publisher's span when the message carries one.
pub fn delivery_span(transport: &'static str, delivered: Option<&Delivered>) -> Span {
    let Some(d) = delivered.filter(|_| enabled()) else {
        return Span::none();
    };
    let exchange = destination(&d.exchange);
    let span = tracing::info_span!(
        target: TARGET,
        "deliver",
        otel.name = format!("deliver {exchange} ({transport})"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "deliver",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = &*d.routing_key,
        messaging.message.id = d.message_id.as_deref(),
        warren.transport = transport,
        otel.status_code = Empty,
    );
    let _ = span.set_parent(d.carried.context());
    span
}

/// The span's context as W3C headers: on the AMQP message (replacing the caller's).
fn inject(span: &Span, properties: &mut BasicProperties) {
    let Some((traceparent, tracestate)) = w3c(span) else {
        return;
    };
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    match tracestate {
        Some(state) => {
            headers.insert("tracestate".into(), AMQPValue::LongString(state.into()));
        }
        None => {
            let mut kept = FieldTable::default();
            for (k, v) in headers.inner() {
                if k.as_str() != "tracestate" {
                    kept.insert(k.clone(), v.clone());
                }
            }
            headers = kept;
        }
    }
    *properties = properties.clone().with_headers(headers);
}

/// `traceparent` (and `tracestate`, if any) of a span; `None` for an invalid context.
pub fn w3c(span: &Span) -> Option<(String, Option<String>)> {
    if span.is_none() {
        return None;
    }
    let context = span.context();
    let otel = context.span();
    let sc = otel.span_context();
    if !sc.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    let state = sc.trace_state().header();
    Some((traceparent, (!state.is_empty()).then_some(state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_is_read_from_amqp_headers_and_bounded() {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        );
        headers.insert(
            "tracestate".into(),
            AMQPValue::LongString("x".repeat(600).into()),
        );
        let carried = Carried::of_message(&BasicProperties::default().with_headers(headers));
        assert!(carried.traceparent.is_some());
        assert!(carried.tracestate.is_none(), "over 512 bytes is not read");
        let cx = carried.context();
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        // Off: no span, nothing injected.
        assert!(delivery_span("websocket", None).is_none());
    }
}
