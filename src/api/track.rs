//! Middleware counting and timing every HTTP request (and holding it in flight for the
//! shutdown drain), and the bound on a request's header section.
//!
//! Both are plain tower services rather than `axum::middleware::from_fn`: that clones
//! and boxes the inner service and boxes a future on every request, a few thousand
//! instructions each (BENCHMARKS.md, "CPU per message").

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::{IntoResponse, Response};
use futures::future::{Either, Ready, ready};
use tower::{Layer, Service};

use crate::AppState;
use crate::error::ApiError;
use crate::telemetry;

/// Counts and times every request by its route template, never the raw URI.
#[derive(Clone)]
pub struct TrackLayer(pub AppState);

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            state: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Track<S> {
    inner: S,
    state: AppState,
}

impl<S> Service<Request> for Track<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let start = Instant::now();
        let in_flight = self.state.0.track_request();
        let route = request.extensions().get::<MatchedPath>().cloned();
        let method = request.method().clone();
        let span = crate::otel::http_span(
            &method,
            route.as_ref().map_or("unmatched", MatchedPath::as_str),
            request.headers(),
        );
        let answer = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Tracked {
            answer,
            span,
            seen: Some(Seen {
                start,
                route,
                method,
                _in_flight: in_flight,
            }),
        }
    }
}

/// A request's answer; counted and timed when it is ready. (A future of its own
/// rather than a boxed `async` block: no allocation and no copy of the inner future.)
pub struct Tracked<F> {
    answer: F,
    /// The request's span (`Span::none()` unless traces are exported), entered while
    /// the answer is worked on.
    span: tracing::Span,
    seen: Option<Seen>,
}

struct Seen {
    start: Instant,
    route: Option<MatchedPath>,
    method: axum::http::Method,
    _in_flight: crate::InFlight,
}

impl<F> Future for Tracked<F>
where
    F: Future<Output = Result<Response, Infallible>> + Unpin,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let polled = {
            let _entered = this.span.enter();
            Pin::new(&mut this.answer).poll(cx)
        };
        let Poll::Ready(Ok(response)) = polled else {
            return Poll::Pending;
        };
        crate::otel::record_status(&self.span, response.status().as_u16());
        if let Some(seen) = self.seen.take() {
            let route = seen.route.as_ref().map_or("unmatched", MatchedPath::as_str);
            telemetry::http_request(
                route,
                &seen.method,
                response.status().as_u16(),
                seen.start.elapsed(),
            );
        }
        Poll::Ready(Ok(response))
    }
}

/// Upper bound on a request's header section (names and values together). hyper
/// itself only refuses about 400 KB; a token and the usual headers need a few KB.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Refuses requests whose headers exceed [`MAX_HEADER_BYTES`] with `400`, before any
/// authentication or body work.
#[derive(Clone, Copy)]
pub struct LimitHeadersLayer;

impl<S> Layer<S> for LimitHeadersLayer {
    type Service = LimitHeaders<S>;

    fn layer(&self, inner: S) -> LimitHeaders<S> {
        LimitHeaders(inner)
    }
}

#[derive(Clone)]
pub struct LimitHeaders<S>(S);

impl<S> Service<Request> for LimitHeaders<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let size: usize = request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if size > MAX_HEADER_BYTES {
            let refused = ApiError::InvalidRequest(format!(
                "the request headers take {size} bytes; at most {MAX_HEADER_BYTES} are accepted"
            ));
            return Either::Left(ready(Ok(refused.into_response())));
        }
        Either::Right(self.0.call(request))
    }
}
