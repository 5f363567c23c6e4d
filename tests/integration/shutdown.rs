//! Graceful shutdown: requests in flight when the signal comes are still answered.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn in_flight_publishes_finish_after_the_shutdown_signal() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let mut server = TestServer::start_ready(tenant_config(&tenant, &exchange, "#")).await;
    let token = server.token(&tenant, "publish");

    // Requests whose bodies are still arriving when shutdown starts.
    let body =
        json!({"exchange": exchange, "routing_key": "k", "payload": {"pad": "x".repeat(100)}})
            .to_string();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut senders = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..10 {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
        tx.send(Ok(head.as_bytes().to_vec())).await.unwrap();
        let stream = tokio_stream_from(rx);
        let request = server
            .http
            .post(format!("{}/v1/publish", server.base))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(reqwest::Body::wrap_stream(stream));
        requests.push(tokio::spawn(async move { request.send().await }));
        senders.push(tx);
    }
    // Let the server take them all in, signal shutdown, then finish the bodies.
    let state = server.state.clone();
    let all_in = eventually(Duration::from_secs(5), || async { state.in_flight() == 10 }).await;
    assert!(all_in, "requests in flight: {}", state.in_flight());
    server.trigger_shutdown();
    let stopping = eventually(Duration::from_secs(5), || async {
        state.is_shutting_down()
    })
    .await;
    assert!(stopping);
    for tx in &senders {
        tx.send(Ok(tail.as_bytes().to_vec())).await.unwrap();
    }
    drop(senders);
    for request in requests {
        let response = request.await.unwrap().expect("answered, not reset");
        assert_eq!(response.status(), 202);
    }
    let result = tokio::time::timeout(Duration::from_secs(5), server.join()).await;
    assert!(
        matches!(result, Ok(Ok(()))),
        "serve did not return: {result:?}"
    );
    assert_eq!(rabbit.wait_count(&queue, 10).await, 10);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
