//! Idle HTTP connections: a connection that has no request in flight and moves no
//! byte for `server.header_read_timeout_s` is closed. hyper's own header read timeout
//! starts at a request's first byte, so without this a client that connects and sends
//! nothing (or keeps an idle keep-alive connection) held the connection, and a file
//! descriptor, forever.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What one connection is doing: when it last moved a byte, and how many of its
/// requests are being answered.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` of the last byte read or written.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection counts as idle for `timeout`, if nothing moves before then;
    /// `None` while a request is in flight.
    pub fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.opened + last + timeout)
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// A request being answered on a connection; see [`Activity::request`].
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The service hyper calls for each request on one connection: the application's
/// router, with the request counted in flight on the connection's [`Activity`] until
/// its response is ready. Written out rather than composed from tower's `map_request`,
/// `map_future` and hyper-util's `TowerToHyperService`, which move the request and
/// the router's future through three wrappers per request.
#[derive(Clone)]
pub struct Serve {
    app: axum::Router,
    activity: Arc<Activity>,
}

impl Serve {
    pub fn new(app: axum::Router, activity: Arc<Activity>) -> Self {
        Self { app, activity }
    }
}

impl hyper::service::Service<axum::http::Request<hyper::body::Incoming>> for Serve {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Answering;

    fn call(&self, request: axum::http::Request<hyper::body::Incoming>) -> Answering {
        let in_flight = self.activity.request();
        // The router is always ready (axum's `poll_ready` is `Ready`); a clone is one
        // reference count.
        let answer = tower::Service::call(&mut self.app.clone(), request);
        Answering {
            answer,
            _in_flight: in_flight,
        }
    }
}

/// A request's answer, holding the request in flight until it is ready.
pub struct Answering {
    answer: axum::routing::future::RouteFuture<std::convert::Infallible>,
    _in_flight: InFlight,
}

impl Future for Answering {
    type Output = Result<axum::response::Response, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer).poll(cx)
    }
}

/// A connection's IO that records every byte moved in its [`Activity`].
pub struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> Watched<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Lets the clock move on by more than the 1 ms resolution of `Activity`.
    async fn later() -> Instant {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Instant::now()
    }

    #[tokio::test]
    async fn idle_only_without_requests_and_counted_from_the_last_byte() {
        let timeout = Duration::from_secs(2);
        let tolerance = Duration::from_millis(1);
        let before = Instant::now();
        let activity = Activity::new();
        let fresh = activity
            .idle_deadline(timeout)
            .expect("idle from the start");
        assert!(fresh >= before + timeout && fresh <= Instant::now() + timeout);

        let request = activity.request();
        later().await;
        assert_eq!(
            activity.idle_deadline(timeout),
            None,
            "a request is in flight"
        );
        drop(request);
        let answered = Instant::now();
        let deadline = activity.idle_deadline(timeout).expect("idle again");
        assert!(
            deadline + tolerance >= answered + timeout,
            "counted from the answer"
        );

        let (mut client, server) = tokio::io::duplex(64);
        let mut watched = Watched::new(server, activity.clone());
        let sent = later().await;
        client.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        watched.read_exact(&mut byte).await.expect("read");
        let deadline = activity.idle_deadline(timeout).expect("idle");
        assert!(deadline + tolerance >= sent + timeout, "a byte read counts");

        let wrote = later().await;
        watched.write_all(b"y").await.expect("write");
        let deadline = activity.idle_deadline(timeout).expect("idle");
        assert!(
            deadline + tolerance >= wrote + timeout,
            "a byte written counts"
        );
    }
}
