//! The help text of every metric, and the series that exist from the start (at 0) so
//! that dashboards and alerts see them before the first event.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};

use super::*;

pub(super) fn describe() {
    describe_counter!(
        PULL_RECEIVED,
        "Messages handed out (leased) by pull receives, by tenant."
    );
    describe_counter!(
        PULL_SETTLED,
        "Pull receipts settled, by tenant, op (ack, nack, extend) and result (done, expired, invalid, failed)."
    );
    describe_counter!(
        PULL_EXPIRED,
        "Pull leases that ran out (the message went back to its queue), by tenant."
    );
    describe_gauge!(
        PULL_LEASED,
        "Messages leased by pull receives on this replica, not yet settled."
    );
    describe_counter!(
        TRACE_SPANS_EXPORTED,
        "Spans the collector accepted (telemetry.otlp_endpoint)."
    );
    describe_counter!(
        TRACE_SPANS_DROPPED,
        "Spans dropped, by reason: queue_full (telemetry.max_queue_spans were waiting for export; a request never waits for the export), export_failed (the collector refused or did not answer)."
    );
    describe_counter!(
        SCHEDULED,
        "Scheduled publishes accepted (confirmed onto the ladder), by tenant."
    );
    describe_counter!(
        SCHEDULE_FIRED,
        "Scheduled messages settled at their time, by tenant and outcome: fired (published to its exchange and confirmed), dead_lettered (to warren.scheduled.dlq, with the error label: unroutable, exchange_not_found, forbidden, invalid_request, broker_rejected, payload_too_large), retried (the broker could not take it; back in the due queue)."
    );
    describe_histogram!(
        SCHEDULE_LAG,
        "How late scheduled messages fired: publish confirmed minus due time."
    );
    describe_counter!(
        SCHEDULE_HOPS,
        "Scheduled messages moved down one rung of the delay ladder (republished, confirmed)."
    );
    describe_counter!(
        PUSH_DELIVERIES,
        "Push deliveries settled, by subscription (tenant/name) and outcome: delivered (2xx, acked), retried (to a delay queue), dead_lettered (to <queue>.dlq), requeued (a retry hop could not be published; back in the queue), poison (refused before any attempt)."
    );
    describe_counter!(
        PUSH_ATTEMPTS,
        "Push HTTP attempts, by subscription and result: 2xx, 3xx, 4xx, 5xx, timeout, connect_error, refused_address."
    );
    describe_histogram!(
        PUSH_ATTEMPT_DURATION,
        "Push HTTP attempt latency, by subscription."
    );
    describe_gauge!(
        PUSH_IN_FLIGHT,
        "Push deliveries in flight on this replica, by subscription."
    );
    describe_gauge!(
        PUSH_PAUSED,
        "1 while a push subscription is paused (its endpoint keeps failing; messages wait in the queue), by subscription."
    );
    describe_gauge!(
        HTTP_WAITING,
        "HTTP requests waiting on something other than Warren (a reply, a long poll), holding a waiting slot (server.max_waiting_requests) instead of a work slot."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route template, method and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        "HTTP request latency, by route template and method."
    );
    describe_counter!(
        PUBLISH,
        "Messages published, by tenant and outcome (acked, unroutable, nacked, timeout, unavailable, exchange_not_found, forbidden, rate_limited)."
    );
    describe_histogram!(
        CONFIRM_DURATION,
        "Time from basic.publish to the broker's confirm (or its failure)."
    );
    describe_gauge!(
        AMQP_CONNECTED,
        "1 while the broker link for the vhost is up."
    );
    describe_gauge!(
        AMQP_BLOCKED,
        "1 while the broker blocks publishers on the vhost (memory or disk alarm)."
    );
    describe_counter!(
        AMQP_RECONNECTS,
        "Times the broker link for the vhost came back after being down."
    );
    describe_gauge!(AMQP_CONNECTIONS, "Open pooled AMQP connections, by vhost.");
    describe_gauge!(
        AMQP_CHANNELS,
        "Pooled confirm-mode channels, by vhost and state (idle, in_use)."
    );
    describe_gauge!(
        AMQP_INFLIGHT,
        "Publishes written and awaiting their broker confirm, by vhost."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label names the running build."
    );
    describe_counter!(
        IDEMPOTENCY,
        "Requests with an Idempotency-Key, by result (new, replayed, in_use, mismatch)."
    );
    describe_counter!(
        IDEMPOTENCY_EVICTIONS,
        "Memory-store entries evicted before their retention ended (bounds reached)."
    );
    describe_gauge!(
        IDEMPOTENCY_ENTRIES,
        "Entries held by the memory idempotency store."
    );
    describe_gauge!(
        IDEMPOTENCY_BYTES,
        "Approximate bytes held by the memory idempotency store."
    );
    describe_gauge!(
        IDEMPOTENCY_STORE_UP,
        "1 when the idempotency store answered its last check (at scrape and readiness)."
    );
    describe_gauge!(
        AMQP_POOLS,
        "Open broker pools of dynamic tenants (one per vhost)."
    );
    describe_counter!(
        AMQP_POOLS_OPENED,
        "Dynamic tenant pools opened on first use."
    );
    describe_counter!(
        AMQP_POOLS_CLOSED,
        "Dynamic tenant pools closed (idle, or to make room under max_pools)."
    );
    gauge!(AMQP_POOLS).set(0.0);
    counter!(AMQP_POOLS_OPENED).increment(0);
    counter!(AMQP_POOLS_CLOSED).increment(0);
    describe_gauge!(WS_CONNECTIONS, "Open WebSocket sessions.");
    describe_gauge!(
        WS_SUBSCRIPTIONS,
        "Active WebSocket subscriptions, by mode (live, durable)."
    );
    describe_counter!(
        WS_FRAMES,
        "WebSocket frames, by direction (in, out) and type."
    );
    describe_counter!(
        WS_DROPPED,
        "Live deliveries dropped for a socket whose send buffer was full (live is at-most-once)."
    );
    describe_counter!(
        WS_SLOW_CLOSES,
        "WebSockets closed with 4408 because their reader stalled."
    );
    describe_counter!(
        WS_FILTERED,
        "Deliveries not passed to subscribers because their routing key is outside the subscription's binding key or grants (exchanges that ignore binding keys), by mode."
    );
    describe_gauge!(
        SSE_CONNECTIONS,
        "Open server-sent event streams (GET /v1/events)."
    );
    describe_counter!(
        SSE_EVENTS,
        "Server-sent events written, by kind (message, error)."
    );
    describe_counter!(
        SSE_SLOW_CLOSES,
        "Server-sent event streams cut because their reader stayed too slow."
    );
    describe_gauge!(
        STREAM_SUBSCRIPTIONS,
        "Active stream subscriptions (SPEC §9), by transport (ws, sse)."
    );
    describe_counter!(
        STREAM_RESUMES,
        "Stream subscriptions started, by where they start (first, last, next, offset, timestamp, last_event_id)."
    );
    gauge!(SSE_CONNECTIONS).set(0.0);
    counter!(SSE_SLOW_CLOSES).increment(0);
    for kind in ["message", "error"] {
        counter!(SSE_EVENTS, "kind" => kind).increment(0);
    }
    for transport in ["ws", "sse"] {
        gauge!(STREAM_SUBSCRIPTIONS, "transport" => transport).set(0.0);
    }
    for kind in STREAM_RESUME_KINDS {
        counter!(STREAM_RESUMES, "kind" => *kind).increment(0);
    }
    describe_counter!(
        POISON,
        "Deliveries not forwarded because their headers nest too deep or hold too many values, by mode (live: dropped, durable: rejected without requeue) and reason (too_deep, too_large)."
    );
    describe_counter!(
        CLOUDEVENTS,
        "Valid CloudEvents received by POST /v1/events, by HTTP content mode (binary, structured, batch: each event of a batch)."
    );
    describe_counter!(
        AUTH_KEY_RELOADS,
        "Token key reloads: changed key files re-read and JWKS URL fetches, by source and outcome."
    );
    describe_gauge!(AUTH_KEYS, "Token verification keys in force.");
    describe_counter!(
        RPC_REQUESTS,
        "Request/reply calls, by tenant and outcome (replied, reply_timeout, reply_too_large, unroutable, nacked, timeout, unavailable, exchange_not_found, forbidden, rate_limited, correlation_id_in_use)."
    );
    describe_histogram!(
        RPC_DURATION,
        "Request/reply round trip: from publishing the request to its reply arriving."
    );
    describe_counter!(
        RPC_LATE_REPLIES,
        "Replies that matched no waiting request (late after a timeout, duplicate, or an unknown correlation id), dropped."
    );
    describe_gauge!(
        RPC_INFLIGHT,
        "Requests awaiting their reply, by vhost (read at scrape)."
    );
    counter!(RPC_LATE_REPLIES).increment(0);
    gauge!(WS_CONNECTIONS).set(0.0);
    gauge!(WS_SUBSCRIPTIONS, "mode" => "live").set(0.0);
    gauge!(WS_SUBSCRIPTIONS, "mode" => "durable").set(0.0);
    gauge!(WS_SUBSCRIPTIONS, "mode" => "stream").set(0.0);
    counter!(WS_SLOW_CLOSES).increment(0);
    counter!(WS_DROPPED).increment(0);
    counter!(WS_FILTERED, "mode" => "live").increment(0);
    counter!(WS_FILTERED, "mode" => "durable").increment(0);
    for mode in ["binary", "structured", "batch"] {
        counter!(CLOUDEVENTS, "mode" => mode).increment(0);
    }
    describe_counter!(
        WS_RETRIED,
        "Nacked deliveries of queues with a retry policy (SPEC §11), by outcome: delay (moved to the next delay queue), dlq (moved to <queue>.dlq), failed (requeued instead)."
    );
    for outcome in ["delay", "dlq", "failed"] {
        counter!(WS_RETRIED, "outcome" => outcome).increment(0);
    }
    counter!(WS_FILTERED, "mode" => "stream").increment(0);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}
