//! Operational endpoints: liveness, readiness (broker links), Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;

use crate::AppState;
use crate::broker::HealthReport;
use crate::telemetry;

#[derive(Serialize)]
pub struct Liveness {
    status: &'static str,
}

/// The process is alive (says nothing about the broker).
pub async fn healthz() -> Json<Liveness> {
    Json(Liveness { status: "ok" })
}

#[derive(Serialize)]
pub struct Readiness {
    status: &'static str,
    brokers: Vec<HealthReport>,
    idempotency: StoreReport,
}

#[derive(Serialize)]
pub struct StoreReport {
    store: &'static str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// 200 only while every broker link is up and the idempotency store answers.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let brokers: Vec<HealthReport> = state
        .tenants
        .brokers()
        .iter()
        .map(|b| b.health().report())
        .collect();
    let store = state.idempotency.store.ping().await;
    telemetry::idempotency_store_up(store.is_ok());
    let idempotency = StoreReport {
        store: state.idempotency.store.kind(),
        ok: store.is_ok(),
        error: store.err().map(|e| e.to_string()),
    };
    let ready = !state.is_shutting_down() && idempotency.ok && brokers.iter().all(|b| b.connected);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        brokers,
        idempotency,
    };
    (status, Json(body))
}

/// Prometheus text; pool gauges are refreshed now, at scrape time.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    for broker in state.tenants.brokers().iter().filter(|b| b.has_metrics()) {
        telemetry::pool_stats(broker.vhost(), broker.stats());
    }
    telemetry::idempotency_store_up(state.idempotency.store.ping().await.is_ok());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::prometheus().render(),
    )
}
