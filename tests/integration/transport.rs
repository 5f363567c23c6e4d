//! Warren's own listener: TLS with a certificate that reloads without a restart, and
//! CORS for browser origins.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::common::*;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate it signed for localhost / 127.0.0.1, as PEM files;
/// returns (server cert, server key, CA cert PEM). rustls will not take a self-signed
/// CA certificate as a server's own, hence the two steps.
fn make_cert(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let p = |suffix: &str| {
        dir.join(format!("{name}{suffix}"))
            .to_string_lossy()
            .into_owned()
    };
    let (ca_key, ca_crt, key, csr, crt, ext) = (
        p("-ca.key"),
        p("-ca.crt"),
        p(".key"),
        p(".csr"),
        p(".crt"),
        p(".ext"),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=test CA {name}"),
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &ext,
        "-out",
        &crt,
    ]);
    let ca_pem = std::fs::read(&ca_crt).unwrap();
    (crt.into(), key.into(), ca_pem)
}

fn client_trusting(pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap())
        .tls_built_in_root_certs(false)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

#[tokio::test]
async fn tls_listener_serves_and_reloads_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, first_pem) = make_cert(dir.path(), "first");
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.server.tls = Some(warren::config::ListenerTls {
        cert_file: cert.clone(),
        key_file: key.clone(),
        reload_s: 1,
    });
    let state = warren::App::start(config).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(warren::serve(state.clone(), listener, None, async move {
        let _ = stopped.await;
    }));
    let base = format!("https://127.0.0.1:{port}");

    let first = client_trusting(&first_pem);
    let ok = eventually(Duration::from_secs(10), || async {
        first
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ok, "HTTPS with the first certificate");
    let token = warren::auth::mint(
        &state.config.auth,
        state.resolved.signing_secret.as_ref().unwrap(),
        &warren::auth::TokenRequest {
            tenant: &tenant,
            subject: "tls",
            scope: "publish",
            ttl: Duration::from_secs(60),
        },
    )
    .unwrap();
    let r = first
        .post(format!("{base}/v1/publish"))
        .bearer_auth(&token)
        .json(
            &json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1, "mandatory": false}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Plain HTTP on the TLS port gets nowhere.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .is_err()
    );

    // Renew: new files in place; new connections get the new certificate.
    let (renewed_cert, renewed_key, second_pem) = make_cert(dir.path(), "second");
    std::fs::copy(&renewed_key, &key).unwrap();
    std::fs::copy(&renewed_cert, &cert).unwrap();
    let second = client_trusting(&second_pem);
    let renewed = eventually(Duration::from_secs(10), || async {
        second
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(
        renewed,
        "the renewed certificate is served without a restart"
    );
    // A new client that only trusts the old CA is refused (sessions resumed from before
    // the renewal may live on; that is ordinary TLS).
    let fresh_first = client_trusting(&first_pem);
    assert!(
        fresh_first
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_err(),
        "the old certificate is no longer served"
    );

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn cors_allows_configured_origins_only() {
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.server.cors.allowed_origins = vec!["https://app.example".into()];
    let server = TestServer::start_ready(config).await;
    let preflight = |origin: &'static str| {
        server
            .http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/publish", server.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,idempotency-key",
            )
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        headers.contains("authorization") && headers.contains("idempotency-key"),
        "{headers}"
    );

    let denied = preflight("https://evil.example").await.unwrap();
    assert!(
        denied
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    let token = server.token(&tenant, "publish");
    let r = server
        .http
        .post(format!("{}/v1/publish", server.base))
        .header("origin", "https://app.example")
        .bearer_auth(&token)
        .json(
            &json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1, "mandatory": false}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("retry-after"),
        "{exposed}"
    );
    server.shutdown().await.unwrap();
}

/// Terminates TLS with `cert`/`key` and forwards plaintext to RabbitMQ: an amqps://
/// broker for the test without reconfiguring the real one.
async fn tls_terminating_proxy(cert: &Path, key: &Path) -> u16 {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn amqps_urls_work_with_a_configured_ca_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca_pem) = make_cert(dir.path(), "broker");
    let ca = dir.path().join("ca-bundle.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let port = tls_terminating_proxy(&cert, &key).await;
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, &exchange, "#");
    config.amqp.url = Some(format!("amqps://guest:guest@localhost:{port}"));
    config.amqp.tls.ca_file = Some(ca.clone());
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish");
    let r = server
        .publish(
            &token,
            &json!({"exchange": exchange, "routing_key": "tls", "payload": {"over": "amqps"}}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(rabbit.wait_count(&queue, 1).await, 1);
    server.shutdown().await.unwrap();

    // Without the CA the broker's certificate is not trusted: never ready, 503.
    let mut untrusted = tenant_config(&tenant, &exchange, "#");
    untrusted.amqp.url = Some(format!("amqps://guest:guest@localhost:{port}"));
    let server = TestServer::start(untrusted).await;
    let r = server
        .publish(
            &server.token(&tenant, "publish"),
            &json!({"exchange": exchange, "routing_key": "tls", "payload": 1}),
        )
        .await;
    assert_eq!((r.status, r.code()), (503, "broker_unavailable"));
    assert_eq!(server.get("/readyz").await.status, 503);
    server.shutdown().await.unwrap();
    rabbit.cleanup().await;
}
