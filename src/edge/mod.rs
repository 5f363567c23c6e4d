//! The serving edge: the listeners (plain TCP, TLS with certificate reload:
//! `tls.rs`), the accept loop and its per-connection timeouts, idle connections
//! closed (`idle.rs`), a lingering close (`linger.rs`), event streams served straight
//! to the socket (`sse_conn.rs`), and the shutdown: stop accepting, drain within
//! `server.shutdown_grace_s`, close the pools, await every background task.

mod idle;
mod linger;
mod sse_conn;
pub mod tls;

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{App, AppState, api, config};

/// Serves `state` on `listener` (and metrics on `metrics_listener`) until `shutdown`
/// resolves. Then, within `server.shutdown_grace_s` of the signal: stop accepting, let
/// in-flight requests and WebSocket sessions finish, close the broker pools (awaiting
/// each connection's close), and await every background task the app started.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = Duration::from_secs(state.config.server.shutdown_grace_s);
    let stop = state.stop_token();
    let signal_state = state.clone();
    state.tasks.spawn(async move {
        tokio::select! {
            () = shutdown => signal_state.begin_shutdown(),
            // `serve` failed and cancelled the token itself.
            () = signal_state.stop.cancelled() => {}
        }
    });

    if let Some(metrics_listener) = metrics_listener {
        let app = api::metrics_router(state.clone());
        let stop = stop.clone();
        state.tasks.spawn(async move {
            let served = axum::serve(metrics_listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                warn!(%error, "Metrics listener failed.");
            }
        });
    }

    let app = api::router(state.clone());
    let timeouts = ConnTimeouts {
        header_read: Duration::from_secs(state.config.server.header_read_timeout_s),
        event_write: Duration::from_millis(state.config.sse.slow_reader_timeout_ms),
        h2_streams: state.config.server.http2_max_concurrent_streams,
    };
    let server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
        match &state.config.server.tls {
            Some(tls) => {
                let listener = tls::TlsListener::start(
                    listener,
                    tls.cert_file.clone(),
                    tls.key_file.clone(),
                    Duration::from_secs(tls.reload_s),
                    &state.tasks,
                    stop.clone(),
                );
                let listener = match listener {
                    Ok(listener) => listener,
                    Err(error) => {
                        stop.cancel();
                        return Err(std::io::Error::other(error));
                    }
                };
                Box::pin(serve_http(
                    listener,
                    app,
                    stop.clone().cancelled_owned(),
                    timeouts,
                ))
            }
            None => Box::pin(serve_http(
                axum::serve::ListenerExt::tap_io(listener, |tcp: &mut TcpStream| no_delay(tcp)),
                app,
                stop.clone().cancelled_owned(),
                timeouts,
            )),
        };
    let sockets_state = state.clone();
    let drained = async move {
        let served = server.await;
        // Upgraded WebSockets are not hyper's connections any more: wait for their
        // sessions to close (they do so with 1001 on the shutdown signal).
        sockets_state.sockets.all_closed().await;
        served
    };
    let mut drained = std::pin::pin!(drained);
    let result = tokio::select! {
        served = &mut drained => served,
        () = stop.cancelled() => {
            info!(
                grace_s = grace.as_secs(),
                in_flight = state.in_flight(),
                "Shutting down: draining in-flight requests."
            );
            let deadline = Instant::now() + grace;
            let result = match tokio::time::timeout_at(deadline, drained).await {
                Ok(served) => served,
                Err(_) => {
                    warn!("Shutdown grace period expired with requests still in flight.");
                    Ok(())
                }
            };
            stop_background(&state, deadline).await;
            info!("Stopped.");
            return result;
        }
    };
    // The server ended by itself (an error): still stop and await everything.
    stop.cancel();
    stop_background(&state, Instant::now() + grace).await;
    result
}

/// The least time broker closes get when the drain used up the whole grace period:
/// closing a connection is one round trip, and an unclosed one lingers on the broker.
const CLOSE_FLOOR: Duration = Duration::from_secs(1);

/// Closes the broker pools and awaits every background task, until `deadline` (but
/// at least [`CLOSE_FLOOR`] for the pools).
async fn stop_background(state: &App, deadline: Instant) {
    let close_by = deadline.max(Instant::now() + CLOSE_FLOOR);
    if tokio::time::timeout_at(close_by, state.tenants.close())
        .await
        .is_err()
    {
        warn!("Shutdown grace period expired while closing broker connections.");
    }
    state.tasks.close();
    if tokio::time::timeout_at(close_by, state.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = state.tasks.len(),
            "Shutdown grace period expired with background tasks still running."
        );
    }
}

/// Bound on an HTTP/2 request's decoded header list (RFC 9113 §6.5.2).
const HEADER_LIST_BYTES: u32 = (crate::api::track::MAX_HEADER_BYTES + 100 * 32) as u32;

/// The time limits of one client connection, and its HTTP/2 stream bound.
#[derive(Clone, Copy)]
struct ConnTimeouts {
    /// A request head (and an idle connection) gets this long.
    header_read: Duration,
    /// An event stream's write may take this long (`sse.slow_reader_timeout_ms`).
    event_write: Duration,
    /// Requests in flight at once on one HTTP/2 connection
    /// (`server.http2_max_concurrent_streams`).
    h2_streams: u32,
}

/// Every accepted connection is written without Nagle's delay: a WebSocket frame or
/// server-sent event written while the peer still delays its ACK of the previous one
/// would otherwise wait for that ACK (up to 40 ms on Linux) before it leaves.
pub(crate) fn no_delay(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "Cannot set TCP_NODELAY on an accepted connection.");
    }
}

/// How long open connections keep serving after the listener closed on shutdown.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(250);

/// Serves `app` on `listener` like `axum::serve(..).with_graceful_shutdown(..)`, plus
/// an HTTP/1 header read timeout, which `axum::serve` does not expose (hyper only
/// applies one when a timer is set): a connection that does not deliver a request's
/// headers in time (slowloris) is closed instead of held forever, and so is one that
/// is idle that long (nothing in flight, no byte moved; see [`idle`]).
/// On `stop` the listener closes, each connection finishes its request and closes,
/// and this returns once all have. A connection that opens with `GET /v1/events` is
/// served by [`sse_conn`] instead of hyper.
async fn serve_http<L>(
    mut listener: L,
    app: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
    timeouts: ConnTimeouts,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    // `stopping` tells connections to wind down; every connection task holds a
    // `done` receiver, so `done_tx.closed()` resolves when the last one has ended.
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(());
    let mut stop = std::pin::pin!(stop);
    loop {
        // Stop first: once shutdown has begun, a connection waiting in the backlog is
        // refused, never served. (Unbiased, `select!` could pick it when both are
        // ready, e.g. a WebSocket client reconnecting after its 1001 close, and that
        // client would connect to a gateway that is going away.)
        let (io, _) = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let activity = idle::Activity::new();
        let service = idle::Serve::new(app.clone(), activity.clone());
        let mut stopping = stopping_rx.clone();
        let done = done_rx.clone();
        let events_app = app.clone();
        let ConnTimeouts {
            header_read: header_read_timeout,
            event_write,
            h2_streams,
        } = timeouts;
        tokio::spawn(async move {
            let io = idle::Watched::new(linger::Lingering::new(io), activity.clone());
            // The first request's start decides who serves the connection; a connection
            // that has sent nothing when shutdown comes is closed, as hyper closes idle ones.
            let opening = tokio::select! {
                opening = sse_conn::sniff(io, header_read_timeout) => opening,
                _ = stopping.wait_for(|stop| *stop) => sse_conn::Opening::Gone,
            };
            let io = match opening {
                sse_conn::Opening::Events(io, request) => {
                    let in_flight = activity.request();
                    sse_conn::serve(io, *request, events_app, event_write).await;
                    drop(in_flight);
                    drop(done);
                    return;
                }
                sse_conn::Opening::Other(io) => io,
                sse_conn::Opening::Gone => {
                    drop(done);
                    return;
                }
            };
            // HTTP/1.1, or HTTP/2 when the client starts with its preface (h2c with
            // prior knowledge, or `h2` chosen by ALPN over TLS): many publishes on one
            // connection without one request's wait holding up the next.
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(h2_streams)
                // The decoded header list: what `LimitHeadersLayer` allows, plus HPACK's
                // 32 bytes of overhead per field; a larger list is refused by h2 before
                // it is buffered.
                .max_header_list_size(HEADER_LIST_BYTES)
                // A client that stops reading is found by pings, as HTTP/1's idle
                // check finds one that sends nothing.
                .keep_alive_interval(Some(header_read_timeout))
                .keep_alive_timeout(header_read_timeout);
            let mut connection =
                std::pin::pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
            let mut signalled = false;
            let check = tokio::time::sleep(header_read_timeout);
            let mut check = std::pin::pin!(check);
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::trace!(%error, "Connection ended with an error.");
                        }
                        break;
                    }
                    _ = stopping.wait_for(|stop| *stop), if !signalled => {
                        signalled = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    () = check.as_mut() => {
                        // Idle: nothing in flight and no byte for the timeout (a new
                        // connection that never sends, or a keep-alive one nobody uses).
                        let now = tokio::time::Instant::now();
                        match activity.idle_deadline(header_read_timeout) {
                            Some(deadline) if deadline <= now => {
                                tracing::debug!("Closing an idle connection.");
                                break;
                            }
                            Some(deadline) => check.as_mut().reset(deadline),
                            None => check.as_mut().reset(now + header_read_timeout),
                        }
                    }
                }
            }
            drop(done);
        });
    }
    drop(listener);
    // Keep-alive connections go on serving for a moment first: a request a client sent
    // just before the signal may still be on the wire, and closing its idle-looking
    // connection now would lose it (the client sees the connection close, no answer).
    tokio::time::sleep(SHUTDOWN_LINGER).await;
    stopping_tx.send_replace(true);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// The configured listeners, bound before anything else starts: a port already in use
/// ends `warren serve` with one line and nothing to tear down.
pub struct Listeners {
    listener: TcpListener,
    metrics: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(server: &config::ServerConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(server.listen)
            .await
            .with_context(|| format!("cannot listen on {} (server.listen)", server.listen))?;
        let metrics = match server.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (server.metrics_listen)"))?,
            ),
            None => None,
        };
        Ok(Self { listener, metrics })
    }
}

/// Serves `state` on `listeners` until SIGTERM or Ctrl-C.
pub async fn run(state: AppState, listeners: Listeners) -> anyhow::Result<()> {
    let signal = shutdown_signal();
    info!(listen = %listeners.listener.local_addr()?, "Warren is listening.");
    serve(state, listeners.listener, listeners.metrics, signal).await?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not
/// when the future is first polled, so a signal right after start is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    warn!("Cannot install signal handlers; stop Warren by killing it.");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
