//! A connection that opens with `GET /v1/events` is answered without hyper: the
//! request head is parsed here (httparse), the router answers it as usual, and the
//! event stream is written straight to the socket, then the connection closes. An idle
//! event stream so costs its subscription and a small task, not hyper's two 8 KiB
//! connection buffers, which are most of an idle HTTP/1.1 connection's memory (issue
//! #15: ≤ 16 KiB per idle event stream). Every other connection, and anything this
//! cannot parse, goes to hyper with the bytes already read put back first ([`Rewind`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::{Buf, Bytes};
use futures::StreamExt;
use http::header::{CONNECTION, TRANSFER_ENCODING};
use http::{HeaderName, HeaderValue, Method, Request, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tower::ServiceExt;

/// The start of a request this module answers itself.
const PREFIX: &[u8] = b"GET /v1/events";
/// A longer head goes to hyper (which applies its own limits).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Headers parsed at most; more goes to hyper.
const MAX_HEADERS: usize = 100;

/// What the start of a connection turned out to be.
pub enum Opening<I> {
    /// A complete `GET /v1/events` request.
    Events(I, Box<Request<Body>>),
    /// Anything else, for hyper, with what was read so far.
    Other(Rewind<I>),
    /// The peer closed, or sent no complete head in time.
    Gone,
}

/// Reads the start of a new connection (at most `timeout`) to tell an event stream
/// request from anything else.
pub async fn sniff<I: AsyncRead + Unpin>(mut io: I, timeout: Duration) -> Opening<I> {
    let mut head = Vec::new();
    let complete = tokio::time::timeout(timeout, async {
        loop {
            let known = head.len().min(PREFIX.len());
            if head[..known] != PREFIX[..known] {
                return Some(false);
            }
            if head.len() > PREFIX.len() {
                if !matches!(head[PREFIX.len()], b' ' | b'?') {
                    return Some(false);
                }
                if head.windows(4).any(|w| w == b"\r\n\r\n") {
                    return Some(true);
                }
            }
            if head.len() >= MAX_HEAD_BYTES {
                return Some(false);
            }
            let mut chunk = [0u8; 1024];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    match complete {
        Ok(Some(true)) => match parse(&head) {
            Some(request) => Opening::Events(io, Box::new(request)),
            None => Opening::Other(Rewind::new(head, io)),
        },
        Ok(Some(false)) => Opening::Other(Rewind::new(head, io)),
        // Closed early: hyper answers what it can of a partial request, as it would.
        Ok(None) if !head.is_empty() => Opening::Other(Rewind::new(head, io)),
        Ok(None) | Err(_) => Opening::Gone,
    }
}

/// The request of a complete head; `None` for anything hyper should judge instead.
fn parse(head: &[u8]) -> Option<Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = parsed.parse(head).ok()? else {
        return None;
    };
    if parsed.method != Some("GET") {
        return None;
    }
    let version = match parsed.version? {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let uri: Uri = parsed.path?.parse().ok()?;
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .version(version)
        .body(Body::empty())
        .ok()?;
    for header in parsed.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(header.value).ok()?;
        request.headers_mut().append(name, value);
    }
    Some(request)
}

/// Answers `request` with `app` and writes the response to `io`: the head with
/// `Connection: close`, then the body as it comes, each write bounded by
/// `write_timeout` (a reader that takes nothing that long is cut). Ends when the body
/// does, or the peer closes; the connection is not reused.
pub async fn serve<I>(mut io: I, request: Request<Body>, app: axum::Router, write_timeout: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(response) = app.oneshot(request).await;
    let (parts, body) = response.into_parts();
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == CONNECTION || name == TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // The body ends with the connection (close-delimited), so no chunked encoding.
    head.extend_from_slice(b"connection: close\r\n\r\n");
    if !write(&mut io, &head, write_timeout).await {
        return;
    }
    drop(head);
    let mut body = body.into_data_stream();
    let mut ignored = [0u8; 64];
    loop {
        tokio::select! {
            chunk = body.next() => match chunk {
                Some(Ok(bytes)) => {
                    if !write(&mut io, &bytes, write_timeout).await {
                        return;
                    }
                }
                // The body failed (a slow reader given up on): drop the connection.
                Some(Err(_)) => return,
                None => break,
            },
            // Whatever the peer sends now is ignored; its end ends the stream.
            read = io.read(&mut ignored) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return;
                }
            }
        }
    }
    let _ = tokio::time::timeout(write_timeout, io.shutdown()).await;
}

/// Writes all of `bytes` within `timeout`; false when the connection is unusable.
async fn write<I: AsyncWrite + Unpin>(io: &mut I, bytes: &[u8], timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, io.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// A connection with bytes already read from it put back in front.
pub struct Rewind<I> {
    prefix: Option<Bytes>,
    inner: I,
}

impl<I> Rewind<I> {
    fn new(prefix: Vec<u8>, inner: I) -> Self {
        let prefix = (!prefix.is_empty()).then(|| Bytes::from(prefix));
        Self { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(prefix) = self.prefix.as_mut() {
            let n = prefix.len().min(buf.remaining());
            buf.put_slice(&prefix[..n]);
            prefix.advance(n);
            if prefix.is_empty() {
                self.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_event_stream_request_is_told_from_anything_else() {
        let opening = |bytes: &'static [u8]| async move {
            match sniff(bytes, Duration::from_secs(1)).await {
                Opening::Events(_, request) => format!("events {}", request.uri()),
                Opening::Other(mut rewind) => {
                    let mut back = Vec::new();
                    let _ = rewind.read_to_end(&mut back).await;
                    format!("other {}", String::from_utf8_lossy(&back))
                }
                Opening::Gone => "gone".to_owned(),
            }
        };
        assert_eq!(
            opening(b"GET /v1/events?stream=s HTTP/1.1\r\nhost: x\r\n\r\n").await,
            "events /v1/events?stream=s"
        );
        // Everything else reaches hyper byte for byte.
        for other in [
            &b"GET /v1/eventsx HTTP/1.1\r\n\r\n"[..],
            b"POST /v1/events/x HTTP/1.1\r\n\r\n",
            b"GET /v1/ws HTTP/1.1\r\n\r\n",
            b"GET /v1/events HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET /v1/ev",
        ] {
            let got = opening(other).await;
            assert_eq!(got, format!("other {}", String::from_utf8_lossy(other)));
        }
        assert_eq!(opening(b"").await, "gone");
    }

    #[tokio::test]
    async fn a_head_that_never_ends_is_given_up_on_in_time() {
        let (client, server) = tokio::io::duplex(1024);
        let mut client = client;
        client
            .write_all(b"GET /v1/events HTTP/1.1\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let opening = sniff(server, Duration::from_millis(200)).await;
        assert!(matches!(opening, Opening::Gone));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
