//! HTTP surface: routes, middleware (request id, tracing, metrics, limits), fallbacks.

pub mod body;
pub mod doc;
pub mod events;
pub mod extract;
pub mod health;
pub mod openapi;
mod problem;
pub mod publish;
pub mod queues;
pub mod request;
pub mod slots;
pub mod sse;
pub mod track;

use std::any::Any;

use axum::Router;
use axum::http::{HeaderName, Response};
use axum::response::IntoResponse;
use axum::routing::get;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::AppState;
use crate::error::ApiError;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The routes the OpenAPI document describes, each declared once by its handler's
/// `#[utoipa::path]`. `/metrics` only when it is served on this listener.
pub(crate) fn documented_routes(with_metrics: bool) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(doc::ApiDoc::openapi())
        .merge(api_routes())
        .merge(operational_routes(with_metrics))
}

/// The `/v1` routes.
fn api_routes() -> OpenApiRouter<AppState> {
    work_routes().merge(waiting_routes())
}

/// Authenticated work that reads bodies and talks to the broker, and so shares
/// `server.max_concurrent_requests` until answered.
fn work_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(publish::publish))
        .routes(routes!(publish::publish_batch))
        .routes(routes!(events::publish_event))
        .routes(routes!(sse::events))
        .routes(routes!(queues::ack))
        .routes(routes!(queues::nack))
        .routes(routes!(queues::extend))
}

/// Requests that wait on something other than Warren: they share
/// `server.max_concurrent_requests` until their handler starts waiting, then hold a
/// waiting slot instead ([`crate::WaitingSlots`], [`slots::WorkSlot`]).
fn waiting_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(request::request))
        .routes(routes!(queues::receive))
}

/// Liveness, readiness and metrics: cheap, bodiless, and outside the request limit, so
/// that probes answer even while every request slot is held.
fn operational_routes(with_metrics: bool) -> OpenApiRouter<AppState> {
    let routes = OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz));
    if with_metrics {
        routes.routes(routes!(health::metrics))
    } else {
        routes
    }
}

/// The whole HTTP application: the documented routes, `/openapi.json` and `/docs`
/// (Swagger UI, served from the binary). `/metrics` is included unless it has its own
/// listener. Only the `/v1` routes count against `server.max_concurrent_requests`: the
/// operational endpoints, docs and the demo page never wait behind them.
pub fn router(state: AppState) -> Router {
    let (work, _) = work_routes().split_for_parts();
    let (waiting, _) = waiting_routes().split_for_parts();
    // The WebSocket protocol is described by openapi/asyncapi.yaml, not OpenAPI.
    let api = work
        .route("/v1/ws", get(crate::ws::upgrade))
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(
            state.work_slots.clone(),
        ))
        .merge(waiting.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            slots::hold_work_slot,
        )));
    let (operational, _) =
        operational_routes(state.config.server.metrics_listen.is_none()).split_for_parts();
    let docs = SwaggerUi::new("/docs")
        .external_url_unchecked("/openapi.json", openapi::document())
        .config(utoipa_swagger_ui::Config::from("/openapi.json").validator_url("none"));
    let access = state.config.log.access;
    let access_level = if access {
        tracing::Level::INFO
    } else {
        tracing::Level::DEBUG
    };
    operational
        .merge(api)
        .route("/demo", get(demo))
        .route("/demo/sse", get(sse::demo_page))
        .route("/clients/warren.js", get(client_library))
        .merge(docs)
        .route_layer(track::TrackLayer(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // One layer of all the cross-cutting services (outermost first): axum boxes
        // each `Router::layer` around every route and clones each box per request, so
        // six separate layers were six boxes cloned per request.
        .layer(
            tower::ServiceBuilder::new()
                .option_layer(cors(&state.config.server.cors))
                .layer(SetRequestIdLayer::new(
                    REQUEST_ID,
                    crate::ids::MakeRequestUuid,
                ))
                // CORS answers preflights with an empty (`Default`) body of the inner
                // response type, which the trace layer's body is not: make it axum's.
                .map_response(IntoResponse::into_response)
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(move |request: &axum::http::Request<axum::body::Body>| {
                            let request_id = request
                                .headers()
                                .get(REQUEST_ID)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-");
                            if !access {
                                // What a line the request logs itself needs to be found
                                // again: its id (and trace). Each field formatted here is
                                // paid by every request; the full set cost ~8k
                                // instructions of a publish (BENCHMARKS.md, #32).
                                return tracing::info_span!(
                                    "http",
                                    request_id,
                                    trace_id = tracing::field::Empty,
                                );
                            }
                            // `tenant` and `outcome` are filled in once known (auth,
                            // publish); `trace_id` when traces are exported (SPEC §16).
                            tracing::info_span!(
                                "http",
                                method = %request.method(),
                                path = %request.uri().path(),
                                request_id,
                                tenant = tracing::field::Empty,
                                outcome = tracing::field::Empty,
                                trace_id = tracing::field::Empty,
                            )
                        })
                        // With `log.access`, one line per request at info: status and
                        // latency, inside the span; else at debug.
                        .on_response(
                            tower_http::trace::DefaultOnResponse::new()
                                .level(access_level)
                                .latency_unit(tower_http::LatencyUnit::Micros),
                        )
                        // Not a second line at ERROR for every 5xx: during a broker outage
                        // that is one line per request (thousands a second) for one event,
                        // which the broker supervisor already logs once. The response line
                        // above has the status; unexpected failures log at ERROR themselves.
                        .on_failure(
                            tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                        ),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(track::LimitHeadersLayer),
        )
        .with_state(state)
}

/// CORS for browser origins; none with no origins configured (not even the layer: an
/// empty one would still add `Vary` to every response, at a cost per request).
fn cors(config: &crate::config::CorsConfig) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if config.allowed_origins.is_empty() {
        return None;
    }
    let origins = if config.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .allowed_origins
                .iter()
                .filter_map(|o| o.parse::<axum::http::HeaderValue>().ok()),
        )
    };
    let layer = CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("traceparent"),
            HeaderName::from_static("tracestate"),
            REQUEST_ID,
        ])
        .expose_headers([
            REQUEST_ID,
            header::RETRY_AFTER,
            HeaderName::from_static("idempotent-replayed"),
        ])
        .max_age(std::time::Duration::from_secs(config.max_age_s));
    Some(layer)
}

/// The operators' application for `server.metrics_listen`: metrics, and readiness with
/// the names and error texts the public `/readyz` leaves out.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .route("/readyz", get(health::readyz_detail))
        .fallback(not_found)
        .with_state(state)
}

/// A small page that connects with a token, subscribes, shows messages and publishes.
async fn demo() -> impl IntoResponse {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("../../assets/demo.html"),
    )
}

/// The browser and Node client library (clients/js), which `/demo` is built on.
async fn client_library() -> impl IntoResponse {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/javascript; charset=utf-8",
            ),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../clients/js/warren.js"),
    )
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("this endpoint does not support the method".to_owned())
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response<axum::body::Body> {
    ApiError::Internal("a request handler panicked".to_owned()).into_response()
}
