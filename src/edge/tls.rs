//! Optional TLS on Warren's own listeners (rustls), for deployments without a
//! terminating proxy: certificate and key from PEM files, re-read when they change, so
//! a renewed certificate is served without a restart. Handshakes run off the accept
//! loop, so a slow client cannot hold up others. The accept loop, the reload loop and
//! the handshakes run on the app's task tracker and end on its shutdown token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// A handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the server to take them.
const READY_QUEUE: usize = 1024;

/// Loads a certificate chain and private key from PEM files.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{} is not a PEM private key: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// A TCP listener that hands out connections after their TLS handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener`; the certificate files are checked every `reload`.
    /// Its tasks run on `tasks` and stop (closing the listener) when `stop` fires.
    pub fn start(
        listener: TcpListener,
        cert: PathBuf,
        key: PathBuf,
        reload: Duration,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, String> {
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let resolver = Arc::new(Reloading {
            current: RwLock::new(load(&cert, &key)?),
        });
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
        tasks.spawn(accept_loop(
            listener,
            acceptor,
            ready_tx,
            tasks.clone(),
            stop.clone(),
        ));
        tasks.spawn(reload_loop(resolver, cert, key, reload, stop));
        Ok(Self { ready, local })
    }
}

/// Accepts and hands each connection to a handshake task, until `stop` fires (or
/// the server stops taking connections); the listener closes when this returns.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
            () = ready.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "Accepting a TLS connection failed.");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        super::no_delay(&stream);
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let handshake = tokio::select! {
                handshake = handshake => handshake,
                // Not served any more: drop the half-open connection.
                () = stop.cancelled() => return,
            };
            match handshake {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed."),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out."),
            }
        });
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Re-reads the files when either changes; a bad new pair keeps the old one served.
async fn reload_loop(
    resolver: Arc<Reloading>,
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    stop: CancellationToken,
) {
    let mut seen = (modified(&cert), modified(&key));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = (modified(&cert), modified(&key));
        if now == seen {
            continue;
        }
        match load(&cert, &key) {
            Ok(loaded) => {
                *resolver.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
                seen = now;
                info!(cert = %cert.display(), "Reloaded the TLS certificate.");
            }
            Err(error) => {
                warn!(%error, "A changed TLS certificate could not be loaded; still serving the previous one.");
            }
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop has stopped (shutdown): nothing more to accept.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
