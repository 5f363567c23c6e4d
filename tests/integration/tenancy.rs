//! Multi-tenancy against the real broker: vhost isolation, dynamic tenants with lazy
//! pools that close when idle, and quotas that limit one tenant only.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn tenants_on_two_vhosts_only_reach_their_own() {
    let admin = Admin::new();
    let (va, vb) = (unique("va"), unique("vb"));
    admin.vhost(&va).await;
    admin.vhost(&vb).await;
    let (ra, rb) = (rabbit_in(&va).await, rabbit_in(&vb).await);
    // The same exchange name in both vhosts, each with a catch-all queue.
    let mut queues = Vec::new();
    for rabbit in [&ra, &rb] {
        rabbit
            .channel
            .exchange_declare(
                "events".into(),
                lapin::ExchangeKind::Topic,
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
        queues.push(rabbit.bound_queue("events", "#").await);
    }
    let (a, b) = (unique("a"), unique("b"));
    let server = TestServer::start_ready(config(&format!(
        "[tenants.{a}]\nvhost = \"{va}\"\npublish = [{{ exchange = \"events\", routing_key = \"order.#\" }}]\n\
         [tenants.{b}]\nvhost = \"{vb}\"\npublish = [{{ exchange = \"events\", routing_key = \"order.#\" }}]\n"
    )))
    .await;
    let (ta, tb) = (server.token(&a, "publish"), server.token(&b, "publish"));
    for n in 0..3 {
        let r = server.publish(&ta, &json!({"exchange": "events", "routing_key": "order.a", "payload": {"from": "a", "n": n}})).await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    let r = server
        .publish(
            &tb,
            &json!({"exchange": "events", "routing_key": "order.b", "payload": {"from": "b"}}),
        )
        .await;
    assert_eq!(r.status, 202);
    // Denied: outside the grant; must reach no queue in any vhost.
    let r = server
        .publish(
            &ta,
            &json!({"exchange": "events", "routing_key": "invoice.x", "payload": {"from": "a"}}),
        )
        .await;
    assert_eq!(r.code(), "forbidden");

    assert_eq!(ra.wait_count(&queues[0], 3).await, 3);
    assert_eq!(rb.wait_count(&queues[1], 1).await, 1);
    for _ in 0..3 {
        let m = ra.get(&queues[0]).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap()["from"],
            "a"
        );
    }
    let m = rb.get(&queues[1]).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap()["from"],
        "b"
    );
    assert_eq!(ra.count(&queues[0]).await, 0);
    assert_eq!(rb.count(&queues[1]).await, 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn fifty_dynamic_tenants_get_lazy_pools_that_close_when_idle() {
    let admin = Admin::new();
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let tenants: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
    for t in &tenants {
        admin.vhost(&format!("wtdyn-{run}-{t}")).await;
    }
    let mut config = config(&format!(
        "[dynamic_tenants]\nenabled = true\nvhost_template = \"wtdyn-{run}-{{tenant}}\"\n\
         pool_idle_s = 3\npublish = [{{ exchange = \"amq.topic\", routing_key = \"#\" }}]\n"
    ));
    config.amqp.connections_per_vhost = 1;
    let server = TestServer::start_ready(config).await;
    assert!(
        server.state.tenants.dynamic_pools().is_empty(),
        "pools are lazy"
    );

    // A fresh pool is handed out connected and with its first channel open, so the
    // first request does not spend its acquisition time on the broker's handshakes.
    let first = server.state.tenants.get(&tenants[0]).unwrap();
    let lease = first.broker().await.unwrap();
    assert_eq!(lease.stats().connections, 1);
    assert_eq!(lease.stats().channels_idle, 1, "the first channel is ready");
    drop(lease);

    // All fifty at once: no tenant waits for another's pool to open.
    let mut tasks = Vec::new();
    for t in &tenants {
        let token = server.token(t, "publish");
        let body =
            json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1, "mandatory": false});
        let request = server
            .http
            .post(format!("{}/v1/publish", server.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string());
        tasks.push(tokio::spawn(async move {
            into_resp(request.send().await.unwrap()).await
        }));
    }
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    // One pool per dynamic tenant (some may already have closed again when idle).
    assert_eq!(server.state.tenants.dynamic_pools().opened(), 50);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("warren_amqp_dynamic_pools_opened_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warren_publish_total{tenant=\"_dynamic\",outcome=\"acked\"}"),
        "dynamic tenants share one label"
    );
    assert!(
        !metrics.contains("tenant=\"c7\""),
        "no per-dynamic-tenant series"
    );

    // A tenant id that could reach another vhost is refused before any pool opens.
    let evil = server.token("../evil", "publish");
    let r = server
        .publish(
            &evil,
            &json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1}),
        )
        .await;
    assert_eq!(r.status, 403);

    let closed = eventually(Duration::from_secs(10), || async {
        server.state.tenants.dynamic_pools().is_empty()
    })
    .await;
    assert!(closed, "idle pools close after pool_idle_s");
    let metrics = server.metrics().await;
    assert!(metrics.contains("warren_amqp_dynamic_pools 0"), "{metrics}");
    // And reopen on the next request.
    let token = server.token("c0", "publish");
    let r = server
        .publish(
            &token,
            &json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1, "mandatory": false}),
        )
        .await;
    assert_eq!(r.status, 202);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_tenant_over_its_quota_gets_429_while_another_is_unaffected() {
    let (slow, free) = (unique("slow"), unique("free"));
    let server = TestServer::start_ready(config(&format!(
        "[tenants.{slow}]\nvhost = \"/\"\npublish = [{{ exchange = \"amq.topic\", routing_key = \"#\" }}]\n\
         [tenants.{slow}.limits]\npublish_rate = 5\n\
         [tenants.{free}]\nvhost = \"/\"\npublish = [{{ exchange = \"amq.topic\", routing_key = \"#\" }}]\n"
    )))
    .await;
    let body =
        json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1, "mandatory": false});
    let (ts, tf) = (
        server.token(&slow, "publish"),
        server.token(&free, "publish"),
    );
    let mut limited = 0;
    let mut accepted = 0;
    for _ in 0..20 {
        let r = server.publish(&ts, &body).await;
        match r.status {
            202 => accepted += 1,
            429 => {
                assert_eq!(r.code(), "rate_limited");
                assert!(r.header("retry-after").is_some());
                limited += 1;
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
        let other = server.publish(&tf, &body).await;
        assert_eq!(other.status, 202, "the other tenant is not limited");
    }
    assert!(limited >= 10, "{limited} limited, {accepted} accepted");
    assert!(accepted >= 5);
    // Batches count every message.
    let batch = server
        .post(
            "/v1/publish/batch",
            Some(&ts),
            &json!({"messages": [body, body, body, body, body, body]}),
        )
        .await;
    assert_eq!(batch.status, 429);
    server.shutdown().await.unwrap();
}
