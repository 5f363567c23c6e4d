//! OpenTelemetry traces (SPEC §16) from the real binary to a real OTLP/HTTP receiver
//! run by the test, its requests decoded with the `opentelemetry-proto` types: a
//! publish and its WebSocket delivery form one trace with the caller's parent, a
//! request carries the trace to its responder, no attribute holds the token or the
//! payload, and a collector that hangs or is gone slows no publish and costs only
//! counted spans and one log line.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;

use crate::common::*;
use crate::ws::{recv, send, subscribe};

/// An OTLP/HTTP receiver on a loopback port: every span it was sent, with the
/// `service.name` of its resource. `hang`: it never answers.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(hang: bool) -> Self {
        let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let kept = kept.clone();
                async move {
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut kept = kept.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|a| a.key == "service.name")
                            .and_then(|a| a.value.as_ref())
                            .and_then(|v| match &v.value {
                                Some(AnyValue::StringValue(s)) => Some(s.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                kept.push((service.clone(), span));
                            }
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            spans,
            _task: task,
        }
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits for a span named `name` for which `also` holds, and returns it.
    async fn span(&self, name: &str, also: impl Fn(&Span) -> bool) -> Span {
        let find = || {
            self.spans()
                .into_iter()
                .map(|(_, s)| s)
                .find(|s| s.name == name && also(s))
        };
        let found = eventually(Duration::from_secs(10), || async { find().is_some() }).await;
        assert!(
            found,
            "no such span {name:?} among {:?}",
            self.spans()
                .iter()
                .map(|(_, s)| (&s.name, attribute(s, "http.route")))
                .collect::<Vec<_>>()
        );
        find().unwrap()
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .map(|v| match &v.value {
            Some(AnyValue::StringValue(s)) => s.clone(),
            Some(AnyValue::IntValue(i)) => i.to_string(),
            Some(AnyValue::BoolValue(b)) => b.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh topic exchange with a queue bound by `binding`.
async fn broker(binding: &str) -> (Rabbit, String, String) {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, binding).await;
    (rabbit, exchange, queue)
}

/// A Warren process (in a directory of its own, kept with it) with `[telemetry]`
/// `telemetry`, its tenant allowed the exchange.
async fn warren(exchange: &str, telemetry: &str) -> (tempfile::TempDir, WarrenProcess) {
    let dir = tempfile::tempdir().unwrap();
    let tenant = unique("t");
    let port = closed_port().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_s = 5\n\
         [amqp]\nurl = \"{}\"\n[auth]\nhs256_secret = \"{SECRET}\"\n\
         [log]\naccess = true\n\
         [telemetry]\n{telemetry}\n\
         [tenants.{tenant}]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n\
         subscribe = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n",
        broker_url()
    );
    let process = WarrenProcess::start(&dir, &config, &tenant, port, 200).await;
    (dir, process)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_publish_and_its_websocket_delivery_are_one_trace_under_the_callers_span() {
    let receiver = Receiver::start(false).await;
    let (_rabbit, exchange, _queue) = broker("#").await;
    let (_dir, process) = warren(
        &exchange,
        &format!(
            "otlp_endpoint = \"{}\"\nsampler = \"always_on\"",
            receiver.url
        ),
    )
    .await;
    let mut ws = ws_connect(&process.base, &process.token).await;
    let subscribed = subscribe(&mut ws, "s1", &exchange, "#").await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");

    let r = process
        .http
        .post(format!("{}/v1/publish", process.base))
        .bearer_auth(&process.token)
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(
            &json!({"exchange": exchange, "routing_key": "order.created",
                      "payload": {"secret": "PAYLOAD-MARKER-7"},
                      "properties": {"message_id": "m-traced"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let message = recv(&mut ws).await;
    assert_eq!(message["type"], "message", "{message}");

    let http = receiver.span("POST /v1/publish", |_| true).await;
    let publish = receiver
        .span(&format!("publish {exchange}"), |_| true)
        .await;
    let deliver = receiver
        .span(&format!("deliver {exchange} (websocket)"), |_| true)
        .await;
    for span in [&http, &publish, &deliver] {
        assert_eq!(
            hex(&span.trace_id),
            TRACE_ID,
            "{} is in the caller's trace",
            span.name
        );
    }
    assert_eq!(hex(&http.parent_span_id), CALLER_SPAN);
    assert_eq!(
        publish.parent_span_id, http.span_id,
        "publish under the request"
    );
    assert_eq!(
        deliver.parent_span_id, publish.span_id,
        "delivery under the publish"
    );
    assert_eq!(
        attribute(&http, "http.route").as_deref(),
        Some("/v1/publish")
    );
    assert_eq!(
        attribute(&http, "http.response.status_code").as_deref(),
        Some("202")
    );
    assert_eq!(
        attribute(&publish, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        attribute(&publish, "messaging.destination.name").as_deref(),
        Some(exchange.as_str())
    );
    assert_eq!(
        attribute(&publish, "messaging.rabbitmq.destination.routing_key").as_deref(),
        Some("order.created")
    );
    assert_eq!(
        attribute(&publish, "messaging.message.id").as_deref(),
        Some("m-traced")
    );
    assert_eq!(
        attribute(&publish, "messaging.warren.outcome").as_deref(),
        Some("acked")
    );
    assert_eq!(
        attribute(&deliver, "warren.transport").as_deref(),
        Some("websocket")
    );
    // Producer and consumer kinds (OTLP: 4 producer, 5 consumer, 2 server).
    assert_eq!((http.kind, publish.kind, deliver.kind), (2, 4, 5));
    // The request's log line carries its trace id.
    let logged = eventually(Duration::from_secs(5), || async {
        std::fs::read_to_string(&process.log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("/v1/publish") && l.contains(TRACE_ID))
    })
    .await;
    assert!(
        logged,
        "{}",
        std::fs::read_to_string(&process.log).unwrap_or_default()
    );
    // Nothing secret anywhere.
    for (service, span) in receiver.spans() {
        assert_eq!(service, "warren");
        let text = format!("{span:?}");
        assert!(
            !text.contains(&process.token),
            "{} holds the token",
            span.name
        );
        assert!(
            !text.contains("PAYLOAD-MARKER-7"),
            "{} holds the payload",
            span.name
        );
    }
    let _ = send;
}

#[tokio::test]
async fn a_request_carries_its_trace_to_the_responder() {
    let receiver = Receiver::start(false).await;
    let (rabbit, exchange, queue) = broker("rpc.#").await;
    let (_dir, process) = warren(&exchange, &format!("otlp_endpoint = \"{}\"", receiver.url)).await;
    // The responder reads the context the request carries, and answers.
    let channel = rabbit.channel.clone();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            unique("responder").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(None::<String>));
    let kept = seen.clone();
    tokio::spawn(async move {
        if let Some(Ok(request)) = consumer.next().await {
            let traceparent = request.properties.headers().as_ref().and_then(|h| {
                match h.inner().get("traceparent") {
                    Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                    _ => None,
                }
            });
            *kept.lock().unwrap() = traceparent;
            let reply_to = request.properties.reply_to().clone().unwrap();
            let props = lapin::BasicProperties::default()
                .with_correlation_id(request.properties.correlation_id().clone().unwrap());
            channel
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    b"pong",
                    props,
                )
                .await
                .unwrap();
        }
    });
    let started = Instant::now();
    let r = process
        .http
        .post(format!("{}/v1/request", process.base))
        .bearer_auth(&process.token)
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&json!({"exchange": exchange, "routing_key": "rpc.ping", "body": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let request_span = receiver
        .span(&format!("request {exchange}"), |_| true)
        .await;
    assert_eq!(
        attribute(&request_span, "messaging.operation.name").as_deref(),
        Some("request")
    );
    assert_eq!(
        attribute(&request_span, "messaging.warren.outcome").as_deref(),
        Some("replied")
    );
    let carried = seen
        .lock()
        .unwrap()
        .clone()
        .expect("the request carried a traceparent");
    assert_eq!(
        carried,
        format!("00-{TRACE_ID}-{}-01", hex(&request_span.span_id)),
        "the responder continues under the request's span"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_collector_that_hangs_or_is_gone_slows_no_publish_and_drops_are_counted() {
    let (_rabbit, exchange, _queue) = broker("#").await;
    let hanging = Receiver::start(true).await;
    let gone = closed_port().await;
    for (endpoint, reason) in [
        (hanging.url.clone(), "queue_full"),
        (format!("http://127.0.0.1:{gone}"), "export_failed"),
    ] {
        let (_dir, process) = warren(
            &exchange,
            &format!(
                "otlp_endpoint = \"{endpoint}\"\nsampler = \"always_on\"\nmax_queue_spans = 4\nexport_timeout_ms = 60000"
            ),
        )
        .await;
        for round in 0..3 {
            for i in 0..20 {
                let sent = Instant::now();
                let r = process
                    .http
                    .post(format!("{}/v1/publish", process.base))
                    .bearer_auth(&process.token)
                    .json(&json!({"exchange": exchange, "routing_key": "k", "payload": i}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                // A publish never waits for the export: an export that hangs for 60 s
                // would show here.
                assert!(
                    sent.elapsed() < Duration::from_secs(2),
                    "{:?}",
                    sent.elapsed()
                );
            }
            // Let a batch go out (and fail) between rounds.
            tokio::time::sleep(Duration::from_millis(400 * (round + 1))).await;
        }
        let metrics = process
            .http
            .get(format!("{}/metrics", process.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let dropped = metrics
            .lines()
            .find(|l| {
                l.starts_with("warren_trace_spans_dropped_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(dropped > 0.0, "{reason}: {metrics}");
        if reason == "export_failed" {
            let log = std::fs::read_to_string(&process.log).unwrap();
            assert_eq!(
                log.matches("Trace export failed").count(),
                1,
                "logged once, not per batch: {log}"
            );
        }
    }
}
