//! The broker unreachable, lost and back: fail fast with 503, readiness red, and
//! recovery without a restart.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn unreachable_broker_fails_fast_with_503_and_readyz_red() {
    let port = closed_port().await;
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.amqp.url = Some(format!("amqp://guest:guest@127.0.0.1:{port}"));
    let server = TestServer::start(config).await;
    let token = server.token(&tenant, "publish");

    let ready = server.get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["status"], "not_ready");
    assert_eq!(ready.body["brokers"][0]["connected"], false);
    assert_eq!(server.get("/healthz").await.status, 200);

    for _ in 0..5 {
        let started = Instant::now();
        let r = server
            .publish(
                &token,
                &json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1}),
            )
            .await;
        let took = started.elapsed();
        assert_problem(&r, 503, "broker_unavailable");
        let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(retry_after >= 1);
        assert!(took < Duration::from_millis(500), "took {took:?}");
    }
    let batch = server
        .post(
            "/v1/publish/batch",
            Some(&token),
            &json!({"messages": [{"exchange": "amq.topic", "routing_key": "k", "payload": 1}]}),
        )
        .await;
    assert_eq!(batch.status, 207);
    assert_eq!(batch.body["results"][0]["code"], "broker_unavailable");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn several_urls_fail_over_to_one_that_works() {
    let port = closed_port().await;
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.amqp.url = None;
    config.amqp.urls = vec![format!("amqp://guest:guest@127.0.0.1:{port}"), broker_url()];
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish");
    server
        .publish_fire_and_forget(&token, "amq.topic", "k")
        .await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn lost_link_answers_503_then_recovers_without_restart() {
    let proxy = ChaosProxy::start().await;
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|config| {
        config.amqp.url = Some(proxy.url());
        config.amqp.reconnect_backoff_max_ms = 1000;
    })
    .await;
    let body = json!({"exchange": exchange, "routing_key": "k", "payload": 1});
    assert_eq!(server.publish(&token, &body).await.status, 202);

    proxy.cut();
    let red = eventually(Duration::from_secs(2), || async {
        server.get("/readyz").await.status == 503
    })
    .await;
    assert!(red, "readiness did not go red within 2s of the cut");
    let started = Instant::now();
    let r = server.publish(&token, &body).await;
    assert_problem(&r, 503, "broker_unavailable");
    assert!(r.header("retry-after").is_some());
    assert!(started.elapsed() < Duration::from_millis(500));

    proxy.restore();
    let green = eventually(Duration::from_secs(5), || async {
        server.get("/readyz").await.status == 200
    })
    .await;
    assert!(green, "readiness did not recover within 5s");
    let r = server.publish(&token, &body).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("warren_amqp_reconnects_total{vhost=\"/\"}"),
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}

/// Issue #21: with the default backoff, readiness returns within 2 s of the broker
/// accepting connections again however long the outage was, and a down broker is never
/// tried more than twice a second. Prints the recovery time of each outage.
#[tokio::test]
async fn readiness_returns_within_two_seconds_of_the_broker_and_retries_are_paced() {
    let proxy = ChaosProxy::start().await;
    let (_rabbit, _exchange, _queue, _, server, _token) = publishing_tenant(|config| {
        config.amqp.url = Some(proxy.url());
        config.amqp.connections_per_vhost = 1;
    })
    .await;
    let ready = || async { server.get("/readyz").await.status == 200 };
    for outage in [1u64, 3, 12] {
        let refused_before = proxy.refused();
        proxy.cut();
        let cut_at = Instant::now();
        assert!(
            eventually(Duration::from_secs(5), || async { !ready().await }).await,
            "readiness did not go red after the cut"
        );
        tokio::time::sleep_until((cut_at + Duration::from_secs(outage)).into()).await;
        let attempts = proxy.refused() - refused_before;
        proxy.restore();
        let restored = Instant::now();
        assert!(
            eventually(Duration::from_secs(2), ready).await,
            "not ready within 2 s of the broker's return after a {outage} s outage"
        );
        let recovery = restored.elapsed();
        println!("outage {outage} s: ready {recovery:?} after the broker, {attempts} attempts");
        assert!(
            attempts as u64 <= 2 * outage + 1,
            "{attempts} connection attempts in a {outage} s outage (at most 2 a second)"
        );
    }
    server.shutdown().await.unwrap();
}

/// A TCP proxy that can stall: bytes are held (the TCP connections stay open) until
/// it is released — a broker that stopped answering, not one that went away.
async fn stalling_proxy(upstream: String) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stalled = Arc::new(AtomicBool::new(false));
    let flag = stalled.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (Box::new(sr), Box::new(cw)),
            ] {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let Ok(n) = from.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        while flag.load(Ordering::Acquire) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (port, stalled)
}

#[tokio::test]
async fn no_confirm_in_time_is_504_and_the_gateway_carries_on() {
    use std::sync::atomic::Ordering;
    let (port, stalled) = stalling_proxy(broker_addr()).await;
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.amqp.url = Some(broker_url_via(port));
    config.amqp.confirm_timeout_ms = 800;
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish");
    let body =
        json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1, "mandatory": false});
    assert_eq!(server.publish(&token, &body).await.status, 202);

    stalled.store(true, Ordering::Release);
    let started = Instant::now();
    let r = server.publish(&token, &body).await;
    let took = started.elapsed();
    assert_problem(&r, 504, "confirm_timeout");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("outcome is unknown")
    );
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );

    stalled.store(false, Ordering::Release);
    let recovered = eventually(Duration::from_secs(5), || async {
        server.publish(&token, &body).await.status == 202
    })
    .await;
    assert!(recovered, "publishing works again once the broker answers");
    server.shutdown().await.unwrap();
}
