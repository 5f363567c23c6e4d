//! Middleware counting and timing every HTTP request (and holding it in flight for the
//! shutdown drain).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;
use crate::telemetry;

/// Counts and times every request by its route template, never the raw URI.
pub async fn track_http(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let _in_flight = state.0.track_request();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = request.method().clone();
    let response = next.run(request).await;
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    telemetry::http_request(route, &method, response.status().as_u16(), start.elapsed());
    response
}
