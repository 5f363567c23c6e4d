//! Every metric Warren exports, named in one place, and the calls that record them.
//! Labels come from bounded sets only: route templates, configured tenants and vhosts,
//! outcome enums. What each metric means is in `describe.rs`; the logging (and trace
//! export) set-up in `logging.rs`.
//!
//! A leaf: it takes plain values (names, numbers) and imports nothing else of Warren.

mod describe;
mod logging;

pub use logging::init_tracing;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "warren_http_requests_total";
pub const HTTP_DURATION: &str = "warren_http_request_duration_seconds";
pub const PUBLISH: &str = "warren_publish_total";
pub const CONFIRM_DURATION: &str = "warren_confirm_duration_seconds";
pub const AMQP_CONNECTED: &str = "warren_amqp_connected";
pub const AMQP_BLOCKED: &str = "warren_amqp_blocked";
pub const AMQP_RECONNECTS: &str = "warren_amqp_reconnects_total";
pub const AMQP_CONNECTIONS: &str = "warren_amqp_connections";
pub const AMQP_CHANNELS: &str = "warren_amqp_channels";
pub const AMQP_INFLIGHT: &str = "warren_amqp_inflight_confirms";
pub const AUTH_KEY_RELOADS: &str = "warren_auth_key_reloads_total";
pub const AUTH_KEYS: &str = "warren_auth_keys";
pub const BUILD_INFO: &str = "warren_build_info";
pub const AMQP_POOLS: &str = "warren_amqp_dynamic_pools";
pub const AMQP_POOLS_OPENED: &str = "warren_amqp_dynamic_pools_opened_total";
pub const AMQP_POOLS_CLOSED: &str = "warren_amqp_dynamic_pools_closed_total";
/// The `tenant` label of tenants that are not configured (bounded cardinality).
pub const DYNAMIC_TENANT_LABEL: &str = "_dynamic";
pub const WS_CONNECTIONS: &str = "warren_ws_connections";
pub const WS_SUBSCRIPTIONS: &str = "warren_ws_subscriptions";
pub const WS_FRAMES: &str = "warren_ws_frames_total";
pub const WS_DROPPED: &str = "warren_ws_live_dropped_total";
pub const WS_SLOW_CLOSES: &str = "warren_ws_slow_consumer_closes_total";
pub const WS_FILTERED: &str = "warren_ws_deliveries_filtered_total";
pub const WS_RETRIED: &str = "warren_ws_retries_total";
pub const SSE_CONNECTIONS: &str = "warren_sse_connections";
pub const SSE_EVENTS: &str = "warren_sse_events_total";
pub const SSE_SLOW_CLOSES: &str = "warren_sse_slow_reader_closes_total";
pub const STREAM_SUBSCRIPTIONS: &str = "warren_stream_subscriptions";
pub const STREAM_RESUMES: &str = "warren_stream_resumes_total";
pub const POISON: &str = "warren_poison_messages_total";
pub const CLOUDEVENTS: &str = "warren_cloudevents_received_total";
pub const IDEMPOTENCY: &str = "warren_idempotency_requests_total";
pub const IDEMPOTENCY_EVICTIONS: &str = "warren_idempotency_evictions_total";
pub const IDEMPOTENCY_ENTRIES: &str = "warren_idempotency_entries";
pub const IDEMPOTENCY_BYTES: &str = "warren_idempotency_bytes";
pub const IDEMPOTENCY_STORE_UP: &str = "warren_idempotency_store_up";
pub const RPC_REQUESTS: &str = "warren_rpc_requests_total";
pub const RPC_DURATION: &str = "warren_rpc_round_trip_seconds";
pub const RPC_LATE_REPLIES: &str = "warren_rpc_late_replies_total";
pub const RPC_INFLIGHT: &str = "warren_rpc_inflight";
pub const HTTP_WAITING: &str = "warren_http_waiting_requests";
pub const PUSH_DELIVERIES: &str = "warren_push_deliveries_total";
pub const PUSH_ATTEMPTS: &str = "warren_push_attempts_total";
pub const PUSH_ATTEMPT_DURATION: &str = "warren_push_attempt_duration_seconds";
pub const PUSH_IN_FLIGHT: &str = "warren_push_in_flight";
pub const PUSH_PAUSED: &str = "warren_push_paused";
pub const PULL_RECEIVED: &str = "warren_pull_received_total";
pub const PULL_SETTLED: &str = "warren_pull_settled_total";
pub const PULL_EXPIRED: &str = "warren_pull_leases_expired_total";
pub const PULL_LEASED: &str = "warren_pull_leased";
pub const TRACE_SPANS_EXPORTED: &str = "warren_trace_spans_exported_total";
pub const TRACE_SPANS_DROPPED: &str = "warren_trace_spans_dropped_total";
pub const SCHEDULED: &str = "warren_scheduled_total";
pub const SCHEDULE_FIRED: &str = "warren_schedule_fired_total";
pub const SCHEDULE_LAG: &str = "warren_schedule_lag_seconds";
pub const SCHEDULE_HOPS: &str = "warren_schedule_hops_total";

/// Buckets from 100 µs to 10 s, for HTTP and confirm latency alike.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The process-wide Prometheus recorder (metrics are global; tests share it).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets(LATENCY_BUCKETS))
            .map(|b| b.build_recorder());
        let recorder = match recorder {
            Ok(recorder) => recorder,
            // Only reachable with empty bucket lists, which the constant above is not.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("A metrics recorder was already installed; /metrics may be empty.");
        }
        describe::describe();
        spawn_upkeep(handle.clone());
        handle
    })
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The recorder keeps every histogram sample until something folds them into the
/// buckets: a scrape does, and so does this thread, so memory stays flat when nothing
/// scrapes (no Prometheus yet, or Prometheus down). Without it a soak at 1,200
/// requests/s grew by ~60 KB/s until the next scrape.
fn spawn_upkeep(handle: PrometheusHandle) {
    let started = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(error) = started {
        tracing::warn!(%error, "Cannot start the metrics upkeep thread; histograms are folded only at scrape.");
    }
}

/// Metric handles of the per-request series, found by reference to their label values.
/// Registering a series builds its labels (strings) and looks the key up in the
/// recorder's registry; that was several allocations and hashes per request. A handle
/// found here costs a read lock and a hash of the first label. Bounded: past
/// `MAX_CACHED_SERIES` entries a series is registered every time instead (label values
/// come from bounded sets anyway).
struct Handles<K, V> {
    by_first: std::sync::RwLock<Map<String, Map<K, V>>>,
}

/// Keys of `Handles` come from bounded sets (routes, methods, tenants, outcomes).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

const MAX_CACHED_SERIES: usize = 4096;

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Handles<K, V> {
    fn new() -> Self {
        Self {
            by_first: std::sync::RwLock::new(Map::default()),
        }
    }

    fn get(&self, first: &str, rest: &K, register: impl FnOnce() -> V) -> V {
        if let Ok(map) = self.by_first.read()
            && let Some(found) = map.get(first).and_then(|m| m.get(rest))
        {
            return found.clone();
        }
        // The recorder must exist before a handle is kept: a handle registered before
        // it would count nothing, forever.
        prometheus();
        let handle = register();
        if let Ok(mut map) = self.by_first.write()
            && map.values().map(Map::len).sum::<usize>() < MAX_CACHED_SERIES
        {
            map.entry(first.to_owned())
                .or_default()
                .insert(rest.clone(), handle.clone());
        }
        handle
    }
}

/// One answered HTTP request, by its route template (never the raw URI).
pub fn http_request(route: &str, method: &http::Method, status: u16, elapsed: Duration) {
    static HANDLES: OnceLock<Handles<(http::Method, u16), (Counter, Histogram)>> = OnceLock::new();
    let (requests, duration) = HANDLES.get_or_init(Handles::new).get(
        route,
        &(method.clone(), status),
        || {
            let (route, method) = (route.to_owned(), method.as_str().to_owned());
            (
                counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method.clone(), "status" => status.to_string()),
                histogram!(HTTP_DURATION, "route" => route, "method" => method),
            )
        },
    );
    requests.increment(1);
    duration.record(elapsed.as_secs_f64());
}

pub fn publish_outcome(tenant: &str, outcome: &'static str) {
    static HANDLES: OnceLock<Handles<&'static str, Counter>> = OnceLock::new();
    tracing::Span::current().record("outcome", outcome);
    HANDLES
        .get_or_init(Handles::new)
        .get(
            tenant,
            &outcome,
            || counter!(PUBLISH, "tenant" => tenant.to_owned(), "outcome" => outcome),
        )
        .increment(1);
}

pub fn confirm_latency(elapsed: Duration) {
    static HANDLE: OnceLock<Histogram> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            prometheus();
            histogram!(CONFIRM_DURATION)
        })
        .record(elapsed.as_secs_f64());
}

/// Every per-vhost series exists from the start (at 0), so dashboards and alerts see it.
pub fn broker_registered(vhost: &str) {
    broker_connected(vhost, false);
    broker_blocked(vhost, false);
    counter!(AMQP_RECONNECTS, "vhost" => vhost.to_owned()).increment(0);
}

pub fn broker_connected(vhost: &str, up: bool) {
    gauge!(AMQP_CONNECTED, "vhost" => vhost.to_owned()).set(if up { 1.0 } else { 0.0 });
}

pub fn broker_blocked(vhost: &str, blocked: bool) {
    gauge!(AMQP_BLOCKED, "vhost" => vhost.to_owned()).set(if blocked { 1.0 } else { 0.0 });
}

pub fn broker_reconnected(vhost: &str) {
    counter!(AMQP_RECONNECTS, "vhost" => vhost.to_owned()).increment(1);
}

/// One vhost pool's size and use, read when `/metrics` is scraped.
#[derive(Debug, Clone, Copy)]
pub struct PoolGauges {
    pub connections: usize,
    pub channels_open: usize,
    pub channels_idle: usize,
    pub inflight_confirms: usize,
}

/// Pool gauges, refreshed when `/metrics` is scraped.
pub fn pool_stats(vhost: &str, stats: PoolGauges) {
    let v = vhost.to_owned();
    gauge!(AMQP_CONNECTIONS, "vhost" => v.clone()).set(stats.connections as f64);
    gauge!(AMQP_CHANNELS, "vhost" => v.clone(), "state" => "idle").set(stats.channels_idle as f64);
    gauge!(AMQP_CHANNELS, "vhost" => v.clone(), "state" => "in_use")
        .set(stats.channels_open.saturating_sub(stats.channels_idle) as f64);
    gauge!(AMQP_INFLIGHT, "vhost" => v).set(stats.inflight_confirms as f64);
}

pub fn idempotency(result: &'static str) {
    counter!(IDEMPOTENCY, "result" => result).increment(1);
}

pub fn idempotency_evicted(count: u64) {
    counter!(IDEMPOTENCY_EVICTIONS).increment(count);
}

pub fn idempotency_entries(entries: usize, bytes: usize) {
    gauge!(IDEMPOTENCY_ENTRIES).set(entries as f64);
    gauge!(IDEMPOTENCY_BYTES).set(bytes as f64);
}

/// `source` is `file` or `url`.
pub fn auth_key_reload(source: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    counter!(AUTH_KEY_RELOADS, "source" => source, "outcome" => outcome).increment(1);
}

pub fn auth_keys(count: usize) {
    gauge!(AUTH_KEYS).set(count as f64);
}

pub fn ws_connections(delta: i64) {
    gauge!(WS_CONNECTIONS).increment(delta as f64);
}

pub fn ws_subscriptions(mode: &'static str, delta: i64) {
    gauge!(WS_SUBSCRIPTIONS, "mode" => mode).increment(delta as f64);
}

pub fn ws_frame(direction: &'static str, kind: &'static str) {
    counter!(WS_FRAMES, "direction" => direction, "type" => kind).increment(1);
}

pub fn ws_dropped() {
    counter!(WS_DROPPED).increment(1);
}

/// `outcome`: `delay`, `dlq` or `failed`.
pub fn ws_retried(outcome: &'static str) {
    counter!(WS_RETRIED, "outcome" => outcome).increment(1);
}

/// `mode` is `binary`, `structured` or `batch`.
pub fn cloudevents_received(mode: &'static str, events: usize) {
    counter!(CLOUDEVENTS, "mode" => mode).increment(events as u64);
}

/// `mode`: `live`, `durable` or `stream`.
pub fn ws_filtered(mode: &'static str) {
    counter!(WS_FILTERED, "mode" => mode).increment(1);
}

/// Makes the poison series exist from the start (at 0) for every `reason` label the
/// broker layer reports, in both modes.
pub fn poison_reasons(reasons: impl IntoIterator<Item = &'static str>) {
    for reason in reasons {
        for mode in ["live", "durable"] {
            counter!(POISON, "mode" => mode, "reason" => reason).increment(0);
        }
    }
}

/// `mode` is `live` or `durable`, `reason` a label given to [`poison_reasons`].
pub fn poison_message(mode: &'static str, reason: &'static str) {
    counter!(POISON, "mode" => mode, "reason" => reason).increment(1);
}

pub fn ws_slow_consumer_closed() {
    counter!(WS_SLOW_CLOSES).increment(1);
}

/// The `kind` labels of [`STREAM_RESUMES`].
pub const STREAM_RESUME_KINDS: &[&str] = &[
    "first",
    "last",
    "next",
    "offset",
    "timestamp",
    "last_event_id",
];

pub fn sse_connections(delta: i64) {
    gauge!(SSE_CONNECTIONS).increment(delta as f64);
}

/// `kind`: `message` or `error`.
pub fn sse_event(kind: &'static str) {
    counter!(SSE_EVENTS, "kind" => kind).increment(1);
}

pub fn sse_slow_reader_closed() {
    counter!(SSE_SLOW_CLOSES).increment(1);
}

/// `transport`: `ws` or `sse`.
pub fn stream_subscriptions(transport: &'static str, delta: i64) {
    gauge!(STREAM_SUBSCRIPTIONS, "transport" => transport).increment(delta as f64);
}

/// `kind`: one of [`STREAM_RESUME_KINDS`].
pub fn stream_resume(kind: &'static str) {
    counter!(STREAM_RESUMES, "kind" => kind).increment(1);
}

pub fn idempotency_store_up(up: bool) {
    gauge!(IDEMPOTENCY_STORE_UP).set(if up { 1.0 } else { 0.0 });
}

/// One request/reply call's outcome (see [`RPC_REQUESTS`] for the set).
pub fn rpc_outcome(tenant: &str, outcome: &'static str) {
    static HANDLES: OnceLock<Handles<&'static str, Counter>> = OnceLock::new();
    tracing::Span::current().record("outcome", outcome);
    HANDLES
        .get_or_init(Handles::new)
        .get(
            tenant,
            &outcome,
            || counter!(RPC_REQUESTS, "tenant" => tenant.to_owned(), "outcome" => outcome),
        )
        .increment(1);
}

pub fn rpc_round_trip(elapsed: Duration) {
    static HANDLE: OnceLock<Histogram> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            prometheus();
            histogram!(RPC_DURATION)
        })
        .record(elapsed.as_secs_f64());
}

pub fn rpc_late_reply() {
    counter!(RPC_LATE_REPLIES).increment(1);
}

pub fn rpc_inflight(vhost: &str, inflight: usize) {
    gauge!(RPC_INFLIGHT, "vhost" => vhost.to_owned()).set(inflight as f64);
}

pub fn http_waiting(waiting: usize) {
    gauge!(HTTP_WAITING).set(waiting as f64);
}

pub fn trace_spans_exported(spans: u64) {
    counter!(TRACE_SPANS_EXPORTED).increment(spans);
}

pub fn trace_spans_dropped(reason: &'static str, spans: u64) {
    counter!(TRACE_SPANS_DROPPED, "reason" => reason).increment(spans);
}

pub fn scheduled(tenant: &str, messages: u64) {
    counter!(SCHEDULED, "tenant" => tenant.to_owned()).increment(messages);
}

/// A scheduled message settled at fire time; `error` labels a dead-lettered one.
pub fn schedule_fired(tenant: &str, outcome: &'static str, error: &'static str) {
    counter!(SCHEDULE_FIRED, "tenant" => tenant.to_owned(), "outcome" => outcome, "error" => error)
        .increment(1);
}

pub fn schedule_lag(late: Duration) {
    histogram!(SCHEDULE_LAG).record(late.as_secs_f64());
}

pub fn schedule_hop() {
    counter!(SCHEDULE_HOPS).increment(1);
}

/// One push delivery settled; `outcome` is one of those [`PUSH_DELIVERIES`] describes.
pub fn push_delivered(subscription: &str, outcome: &'static str) {
    counter!(PUSH_DELIVERIES, "subscription" => subscription.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// One push attempt and how long it took; `result` is an [`PUSH_ATTEMPTS`] class.
pub fn push_attempt(subscription: &str, result: &'static str, took: Duration) {
    counter!(PUSH_ATTEMPTS, "subscription" => subscription.to_owned(), "result" => result)
        .increment(1);
    histogram!(PUSH_ATTEMPT_DURATION, "subscription" => subscription.to_owned())
        .record(took.as_secs_f64());
}

pub fn push_in_flight(subscription: &str, change: f64) {
    gauge!(PUSH_IN_FLIGHT, "subscription" => subscription.to_owned()).increment(change);
}

pub fn push_paused(subscription: &str, paused: bool) {
    gauge!(PUSH_PAUSED, "subscription" => subscription.to_owned()).set(if paused {
        1.0
    } else {
        0.0
    });
}

pub fn pull_received(tenant: &str, messages: usize) {
    counter!(PULL_RECEIVED, "tenant" => tenant.to_owned()).increment(messages as u64);
}

/// `op` is `ack`, `nack` or `extend`; `result` `done`, `expired`, `invalid` or `failed`.
pub fn pull_settled(tenant: &str, op: &'static str, result: &'static str) {
    counter!(PULL_SETTLED, "tenant" => tenant.to_owned(), "op" => op, "result" => result)
        .increment(1);
}

pub fn pull_expired(tenant: &str) {
    counter!(PULL_EXPIRED, "tenant" => tenant.to_owned()).increment(1);
}

pub fn pull_leased(leased: usize) {
    gauge!(PULL_LEASED).set(leased as f64);
}
