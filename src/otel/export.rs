//! The span export pipeline: the SDK's OTLP/HTTP exporter behind a bounded queue of
//! our own. The SDK's batch processor neither counts what it drops nor says when its
//! exports fail except per batch in its own log; here a finished span is put on a
//! bounded channel without waiting (full: dropped and counted), and one task sends
//! batches, logging the first failure and the recovery, not every batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::telemetry;

/// Spans sent in one export at most.
const MAX_BATCH: usize = 512;
/// How long the task waits for more spans once one is there.
const LINGER: Duration = Duration::from_millis(200);

/// Puts each finished, sampled span on the export queue, or drops and counts it.
#[derive(Debug)]
pub struct BoundedProcessor {
    queue: mpsc::Sender<SpanData>,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            telemetry::trace_spans_dropped("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// What shutdown needs to see the queue drained: the queue's sending side and whether
/// a batch is out.
#[derive(Debug, Clone)]
pub struct Drain {
    queue: mpsc::Sender<SpanData>,
    exporting: Arc<AtomicBool>,
}

impl Drain {
    /// Waits until every queued span was sent (or dropped), at most `within`.
    pub async fn wait(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while (self.queue.capacity() < self.queue.max_capacity()
            || self.exporting.load(Ordering::Acquire))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The processor, the task that exports what it queues (spawn it on the runtime), and
/// the handle shutdown drains it with.
pub fn pipeline<E: SpanExporter + 'static>(
    exporter: E,
    capacity: usize,
    timeout: Duration,
) -> (BoundedProcessor, impl Future<Output = ()> + Send, Drain) {
    let (queue, spans) = mpsc::channel(capacity);
    let exporting = Arc::new(AtomicBool::new(false));
    let drain = Drain {
        queue: queue.clone(),
        exporting: exporting.clone(),
    };
    (
        BoundedProcessor { queue },
        export(exporter, spans, timeout, exporting),
        drain,
    )
}

async fn export<E: SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    timeout: Duration,
    exporting: Arc<AtomicBool>,
) {
    let mut failing = false;
    while let Some(first) = spans.recv().await {
        exporting.store(true, Ordering::Release);
        let mut batch = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                () = &mut linger => break,
                next = spans.recv() => match next {
                    Some(span) => batch.push(span),
                    None => break,
                },
            }
        }
        let count = batch.len() as u64;
        let outcome = tokio::time::timeout(timeout, exporter.export(batch)).await;
        match outcome {
            Ok(Ok(())) => {
                telemetry::trace_spans_exported(count);
                if failing {
                    info!("Trace export works again.");
                    failing = false;
                }
            }
            failed => {
                telemetry::trace_spans_dropped("export_failed", count);
                if !failing {
                    let error = match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => format!("no answer within {timeout:?}"),
                    };
                    warn!(%error, "Trace export failed; spans are dropped (and counted in warren_trace_spans_dropped_total) until the collector answers. Logged once until it recovers.");
                    failing = true;
                }
            }
        }
        exporting.store(false, Ordering::Release);
    }
}

/// The exporter's HTTP client: the gateway's own reqwest, with the export deadline
/// and a bound on what is read back.
#[derive(Debug, Clone)]
pub struct Client(pub Arc<reqwest::Client>);

/// A collector's answer is a small protobuf; more than this is not read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let mut response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let mut read = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if read.len() + chunk.len() > MAX_RESPONSE_BYTES {
                break;
            }
            read.extend_from_slice(&chunk);
        }
        let mut answer = http::Response::new(Bytes::from(read));
        *answer.status_mut() = status;
        Ok(answer)
    }
}
