//! Operational endpoints: liveness, readiness (broker links), Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::telemetry;

/// What `/readyz` reports per broker pool (one per vhost and credentials).
#[derive(Serialize, ToSchema)]
pub struct HealthReport {
    /// Operators' view only (the metrics listener): the vhost.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub vhost: Option<String>,
    /// The broker link is up.
    pub connected: bool,
    /// The broker is blocking publishers (memory or disk alarm).
    pub blocked: bool,
    /// Operators' view only: the last connection error or the alarm's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
}

impl HealthReport {
    fn of(report: crate::broker::HealthReport, view: View) -> Self {
        let detail = view == View::Operator;
        Self {
            vhost: detail.then_some(report.vhost),
            connected: report.connected,
            blocked: report.blocked,
            error: report.error.filter(|_| detail),
        }
    }
}

/// Who reads `/readyz`: anyone who reaches the API port gets the verdict and which
/// part is down; the names and error texts (vhosts, the broker's and Redis's words,
/// the topology conflict) are for operators, on the metrics listener (issue #27).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum View {
    Public,
    Operator,
}

/// `GET /healthz` body.
#[derive(Serialize, ToSchema)]
pub struct Liveness {
    status: LiveStatus,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LiveStatus {
    Ok,
}

/// Liveness: the process is alive.
///
/// Says nothing about the broker; use `/readyz` for that.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "The process is alive.", body = Liveness))
)]
pub async fn healthz() -> Json<Liveness> {
    Json(Liveness {
        status: LiveStatus::Ok,
    })
}

/// `GET /readyz` body.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    status: ReadyStatus,
    /// One entry per vhost the configured tenants use.
    brokers: Vec<HealthReport>,
    idempotency: StoreReport,
    /// Present with `topology.apply_on_start`: ready only once the topology is applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    topology: Option<TopologyReport>,
    /// Operators' view only: each push subscription on this replica. A paused one
    /// does not make the gateway unready (its messages wait in the queue).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    push: Vec<PushReport>,
}

/// A push subscription's state on this replica (SPEC §13).
#[derive(Serialize, ToSchema)]
pub struct PushReport {
    tenant: String,
    name: String,
    /// `starting`, `active`, `paused` (the endpoint keeps failing; nothing is taken
    /// from the queue), `probing` (one message after a pause) or `stopped`.
    #[schema(example = "active")]
    state: String,
    /// Failed attempts in a row.
    consecutive_failures: u32,
    /// The last failed attempt's status (`503`, `timeout`, `connect_error`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    last_failure: Option<String>,
}

impl From<crate::push::Status> for PushReport {
    fn from(s: crate::push::Status) -> Self {
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        Self {
            tenant: s.tenant,
            name: s.name,
            state,
            consecutive_failures: s.consecutive_failures,
            last_failure: s.last_failure,
        }
    }
}

/// The startup apply of the configured topology (`topology.apply_on_start`).
#[derive(Serialize, ToSchema)]
pub struct TopologyReport {
    applied: bool,
    /// Operators' view only: why it is not applied, e.g. the queue and the argument
    /// that conflicts.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    error: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadyStatus {
    Ready,
    NotReady,
}

/// The idempotency store's health.
#[derive(Serialize, ToSchema)]
pub struct StoreReport {
    /// `memory` or `redis` (`idempotency.store`).
    #[schema(example = "memory")]
    store: &'static str,
    ok: bool,
    /// Operators' view only: why the store does not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    error: Option<String>,
}

/// Readiness: broker links and idempotency store.
///
/// 200 only while every broker link is up and the idempotency store answers; 503 otherwise
/// and during shutdown. The body says which part is down either way; vhost names and
/// error texts are only in the operators' view, `/readyz` on `server.metrics_listen`.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Ready: every broker link is up and the idempotency store answers.", body = Readiness),
        (status = 503, description = "Not ready: a broker link is down, the store does not answer, or the gateway is shutting down.", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    readiness(&state, View::Public).await
}

/// `/readyz` on the metrics listener: the same verdict with names and error texts.
pub async fn readyz_detail(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    readiness(&state, View::Operator).await
}

async fn readiness(state: &AppState, view: View) -> (StatusCode, Json<Readiness>) {
    let detail = view == View::Operator;
    let brokers: Vec<HealthReport> = state
        .tenants
        .brokers()
        .iter()
        .map(|b| HealthReport::of(b.health().report(), view))
        .collect();
    let store = state.idempotency.store.ping().await;
    telemetry::idempotency_store_up(store.is_ok());
    let idempotency = StoreReport {
        store: state.idempotency.store.kind(),
        ok: store.is_ok(),
        error: store.err().map(|e| e.to_string()).filter(|_| detail),
    };
    let topology = state
        .topology
        .report()
        .map(|(applied, error)| TopologyReport {
            applied,
            error: error.filter(|_| detail),
        });
    let ready = !state.is_shutting_down()
        && idempotency.ok
        && brokers.iter().all(|b| b.connected)
        && topology.as_ref().is_none_or(|t| t.applied);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready {
            ReadyStatus::Ready
        } else {
            ReadyStatus::NotReady
        },
        brokers,
        idempotency,
        topology,
        push: if detail {
            state.push.statuses().into_iter().map(Into::into).collect()
        } else {
            Vec::new()
        },
    };
    (status, Json(body))
}

/// Prometheus metrics.
///
/// Text exposition format; pool gauges are refreshed at scrape time. Served here unless
/// `server.metrics_listen` moves it to a listener of its own.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    responses((
        status = 200,
        description = "Every `warren_*` metric in the Prometheus text format.",
        body = String,
        content_type = "text/plain; version=0.0.4",
        example = "# TYPE warren_amqp_connected gauge\nwarren_amqp_connected{vhost=\"/\"} 1\n"
    ))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    for broker in state.tenants.brokers().iter().filter(|b| b.has_metrics()) {
        let stats = broker.stats();
        telemetry::pool_stats(
            broker.vhost(),
            telemetry::PoolGauges {
                connections: stats.connections,
                channels_open: stats.channels_open,
                channels_idle: stats.channels_idle,
                inflight_confirms: stats.inflight_confirms,
            },
        );
        telemetry::rpc_inflight(broker.vhost(), broker.rpc_inflight());
    }
    telemetry::http_waiting(state.waiting.in_use());
    telemetry::idempotency_store_up(state.idempotency.store.ping().await.is_ok());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::prometheus().render(),
    )
}
