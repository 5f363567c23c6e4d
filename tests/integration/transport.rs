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

/// Sends `request` (a POST to `/v1/publish`) as `token` with a non-mandatory message
/// for `amq.topic`.
async fn send_fire_and_forget(request: reqwest::RequestBuilder, token: &str) -> reqwest::Response {
    request
        .bearer_auth(token)
        .json(
            &json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1, "mandatory": false}),
        )
        .send()
        .await
        .unwrap()
}

/// Whether `client` gets a 200 from `url` within 10 s.
async fn answers_200_within_10s(client: &reqwest::Client, url: &str) -> bool {
    eventually(Duration::from_secs(10), || async {
        client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await
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
    let ok = answers_200_within_10s(&first, &format!("{base}/readyz")).await;
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
    let r = send_fire_and_forget(first.post(format!("{base}/v1/publish")), &token).await;
    assert_eq!(r.status(), 202);
    // ALPN offers HTTP/2, and HTTP/1.1 to a client that only speaks that.
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let http1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&first_pem).unwrap())
        .tls_built_in_root_certs(false)
        .http1_only()
        .build()
        .unwrap();
    let r = send_fire_and_forget(http1.post(format!("{base}/v1/publish")), &token).await;
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (202, reqwest::Version::HTTP_11)
    );
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
    let renewed = answers_200_within_10s(&second, &format!("{base}/healthz")).await;
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
async fn http2_carries_many_publishes_on_one_connection_within_its_stream_bound() {
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.server.http2_max_concurrent_streams = 8;
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish");
    let addr = server.base.trim_start_matches("http://").to_owned();

    // A client that starts with the HTTP/2 preface (h2c, prior knowledge) is served
    // HTTP/2, and told the configured bound on streams in flight.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut client = client.ready().await.unwrap();
    let request = axum::http::Request::get(format!("http://{addr}/healthz"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = tokio::select! {
        response = response => response.unwrap(),
        ended = &mut connection => panic!("the HTTP/2 connection ended: {ended:?}"),
    };
    assert_eq!(response.status(), 200);
    assert_eq!(connection.max_concurrent_send_streams(), 8);

    // 40 publishes at once on one connection: all confirmed, over HTTP/2, the client
    // keeping to 8 in flight.
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let publishes = (0..40)
        .map(|_| send_fire_and_forget(h2c.post(format!("{}/v1/publish", server.base)), &token));
    for r in futures::future::join_all(publishes).await {
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 202);
    }

    // A header list past the bound is refused without taking the connection's
    // neighbours down, and a list the bound allows but the gateway does not gets 400.
    let huge = "x".repeat(80 * 1024);
    let refused = h2c
        .get(format!("{}/healthz", server.base))
        .header("x-huge", &huge)
        .send()
        .await;
    assert!(
        refused.as_ref().map_or(true, |r| !r.status().is_success()),
        "{refused:?}"
    );
    let big = "x".repeat(60 * 1024);
    let answered = h2c
        .post(format!("{}/v1/publish", server.base))
        .header("x-big-a", &big)
        .header("x-big-b", "y".repeat(5 * 1024))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 400);
    let again = send_fire_and_forget(h2c.post(format!("{}/v1/publish", server.base)), &token).await;
    assert_eq!(again.status(), 202);
}

/// Asserts that `response` allows the origin `https://app.example` and that its header
/// `list` (a list of header names) names each of `names`, in any case.
#[track_caller]
fn assert_app_origin_and_listed(response: &reqwest::Response, list: &str, names: &[&str]) {
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let listed = response.headers()[list]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(names.iter().all(|name| listed.contains(name)), "{listed}");
}

/// A CORS preflight for `POST /v1/publish` from `origin`.
async fn preflight(server: &TestServer, origin: &str) -> reqwest::Response {
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
        .await
        .unwrap()
}

/// A `POST /v1/publish` by `tenant` from the origin `https://app.example`, accepted.
async fn cross_origin_publish(server: &TestServer, tenant: &str) -> reqwest::Response {
    let token = server.token(tenant, "publish");
    let request = server
        .http
        .post(format!("{}/v1/publish", server.base))
        .header("origin", "https://app.example");
    let r = send_fire_and_forget(request, &token).await;
    assert_eq!(r.status(), 202);
    r
}

#[tokio::test]
async fn cors_allows_configured_origins_only() {
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.server.cors.allowed_origins = vec!["https://app.example".into()];
    let server = TestServer::start_ready(config).await;
    let allowed = preflight(&server, "https://app.example").await;
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_app_origin_and_listed(
        &allowed,
        "access-control-allow-headers",
        &["authorization", "idempotency-key"],
    );

    let denied = preflight(&server, "https://evil.example").await;
    assert!(
        denied
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    let r = cross_origin_publish(&server, &tenant).await;
    assert_app_origin_and_listed(
        &r,
        "access-control-expose-headers",
        &["x-request-id", "retry-after"],
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn cors_is_off_without_configured_origins() {
    let tenant = unique("t");
    let server = TestServer::start_ready(tenant_config(&tenant, "*", "#")).await;
    let r = cross_origin_publish(&server, &tenant).await;
    let cors_headers: Vec<_> = r
        .headers()
        .keys()
        .filter(|name| name.as_str().starts_with("access-control-") || *name == "vary")
        .collect();
    assert!(cors_headers.is_empty(), "{cors_headers:?}");
    let preflight = preflight(&server, "https://app.example").await;
    assert!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .is_none()
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
                let Ok(mut broker) = tokio::net::TcpStream::connect(broker_addr()).await else {
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
    let (rabbit, exchange, queue, tenant, server, token) = publishing_tenant(|config| {
        config.amqp.url = Some(format!("amqps://guest:guest@localhost:{port}"));
        config.amqp.tls.ca_file = Some(ca.clone());
    })
    .await;
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
}

/// A client that sends a publish's headers with a large `Content-Length`, then trickles
/// the body a byte at a time and never finishes it. Once the headers are sent, returns
/// a task with everything the server sent (status line through body) once it
/// closes the connection, or `None` by `deadline`.
async fn trickling_publish(
    addr: &str,
    token: &str,
    deadline: Duration,
) -> tokio::task::JoinHandle<Option<(String, Duration)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: 100000\r\n\r\n{{\"payload\": \""
    );
    write.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        let trickle = tokio::spawn(async move {
            while write.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let answer = tokio::time::timeout(deadline, async {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match read.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            String::from_utf8_lossy(&buffer).into_owned()
        })
        .await
        .ok();
        trickle.abort();
        answer.map(|text| (text, started.elapsed()))
    })
}

#[tokio::test]
async fn trickled_bodies_time_out_and_probes_never_wait_behind_them() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|config| {
        config.server.max_concurrent_requests = 2;
        config.server.body_read_timeout_s = 1;
    })
    .await;
    let addr = server.base.trim_start_matches("http://").to_owned();

    // Two authenticated requests take both request slots and trickle their bodies.
    let mut slow = Vec::new();
    for _ in 0..2 {
        slow.push(trickling_publish(&addr, &token, Duration::from_secs(10)).await);
    }
    // A normal publish queues behind them: proof that both slots are held.
    let body = json!({"exchange": exchange, "routing_key": "k", "payload": "queued"});
    let queued = {
        let request = server
            .http
            .post(format!("{}/v1/publish", server.base))
            .bearer_auth(&token)
            .json(&body);
        tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
    };
    let probe_deadline = Duration::from_millis(500);
    let waited = tokio::time::timeout(probe_deadline, async {
        while !queued.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        waited.is_err(),
        "a publish did not wait ({:?}): the trickling requests hold no slots",
        queued.is_finished()
    );

    // Meanwhile the operational endpoints answer at once.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let probe = tokio::time::timeout(
            probe_deadline,
            server.http.get(format!("{}{path}", server.base)).send(),
        )
        .await
        .unwrap_or_else(|_| panic!("{path} waited behind the held request slots"))
        .unwrap();
        assert_eq!(probe.status(), 200, "{path}");
    }

    // The trickling requests are cut off after server.body_read_timeout_s with 408.
    for task in slow {
        let (answer, elapsed) = task
            .await
            .unwrap()
            .expect("a trickling request was never answered");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
        assert!(answer.contains("application/problem+json"), "{answer}");
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
            "answered after {elapsed:?}"
        );
    }

    // The slots are free again: the queued publish and a new one are served.
    assert_eq!(queued.await.unwrap().unwrap(), 202);
    let r = server.publish(&token, &body).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2);
    server.shutdown().await.unwrap();
}
