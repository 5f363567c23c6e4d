//! Operational endpoints: liveness, readiness (broker links), Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::telemetry;

/// What `/readyz` reports per vhost.
#[derive(Serialize, ToSchema)]
pub struct HealthReport {
    pub vhost: String,
    /// The broker link is up.
    pub connected: bool,
    /// The broker is blocking publishers (memory or disk alarm).
    pub blocked: bool,
    /// The last connection error or the alarm's reason, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
}

impl From<crate::broker::HealthReport> for HealthReport {
    fn from(report: crate::broker::HealthReport) -> Self {
        Self {
            vhost: report.vhost,
            connected: report.connected,
            blocked: report.blocked,
            error: report.error,
        }
    }
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
}

/// The startup apply of the configured topology (`topology.apply_on_start`).
#[derive(Serialize, ToSchema)]
pub struct TopologyReport {
    applied: bool,
    /// Why it is not applied: e.g. the queue and the argument that conflicts.
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
    /// Why the store does not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    error: Option<String>,
}

/// Readiness: broker links and idempotency store.
///
/// 200 only while every broker link is up and the idempotency store answers; 503 otherwise
/// and during shutdown. The body says which part is down either way.
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
    let brokers: Vec<HealthReport> = state
        .tenants
        .brokers()
        .iter()
        .map(|b| b.health().report().into())
        .collect();
    let store = state.idempotency.store.ping().await;
    telemetry::idempotency_store_up(store.is_ok());
    let idempotency = StoreReport {
        store: state.idempotency.store.kind(),
        ok: store.is_ok(),
        error: store.err().map(|e| e.to_string()),
    };
    let topology = state
        .topology
        .report()
        .map(|(applied, error)| TopologyReport { applied, error });
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
