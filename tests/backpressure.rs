//! Backpressure with exact counts for each overflow policy, against a stalled engine.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use pipeline::OverflowPolicy;
use pipeline::testing::CountingEngine;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const FRAME: usize = 320;

/// The value of the counter line naming every label in `labels`.
fn counter(metrics: &str, name: &str, labels: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

#[tokio::test]
async fn block_stalls_the_clients_socket_and_loses_nothing() {
    let (engine, stall) = CountingEngine::new();
    stall.stall();
    let server = TestServer::start(test_config(), Arc::new(engine)).await;
    let mut client = server.connect("").await;
    let mut accepted = 0u64;
    let mut blocked = false;
    while accepted < 20_000 {
        let send = client.ws.send(Message::binary(le_bytes(&[7; FRAME])));
        if tokio::time::timeout(Duration::from_millis(500), send)
            .await
            .is_err()
        {
            blocked = true;
            break;
        }
        accepted += 1;
    }
    assert!(
        blocked,
        "the client should be blocked by TCP backpressure, sent {accepted} frames"
    );
    // While blocked, the server holds only what its bounded queues and buffers allow.
    let metrics = server.metrics().await;
    let queued: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("voxflow_stage_queue_depth_items"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(
        queued <= 40.0,
        "queued items {queued} exceed the configured capacities"
    );
    stall.resume();
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    // The send that timed out was already in the client's buffer and is delivered too.
    let delivered = result.final_samples();
    assert!(
        delivered == accepted * FRAME as u64 || delivered == (accepted + 1) * FRAME as u64,
        "delivered {delivered} samples for {accepted} accepted frames"
    );
    assert_eq!(result.dropped_ms(), 0);
    assert_eq!(result.close_code(), Some(1000));
}

/// Stall, send `frames`, resume, stop: what arrived plus what was reported dropped is all of it.
async fn drop_policy_accounts_for_every_frame(policy: OverflowPolicy, reason: &str) {
    let (engine, stall) = CountingEngine::new();
    stall.stall();
    let server = TestServer::start(policy_config(policy), Arc::new(engine)).await;
    let mut client = server.connect("").await;
    let frames = 300u64;
    for _ in 0..frames {
        client.send_binary(le_bytes(&[3; FRAME])).await;
    }
    // Let ingress take every frame off the socket before the engine wakes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stall.resume();
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    let dropped_ms = result.dropped_ms();
    let delivered = result.final_samples();
    assert!(dropped_ms > 0, "a stalled engine with {reason} must drop");
    assert_eq!(
        delivered + dropped_ms * 16,
        frames * FRAME as u64,
        "every frame is delivered or reported"
    );
    assert!(!result.of_type("warning").is_empty());
    assert_eq!(result.of_type("warning")[0]["code"], "audio_dropped");
    let metrics = server.metrics().await;
    let counted = counter(
        &metrics,
        "voxflow_stage_items_dropped_total",
        &["stage=\"ingress\"", reason],
    );
    assert_eq!(
        counted,
        dropped_ms / 20,
        "the drop counter matches the client's warnings"
    );
    assert_eq!(result.close_code(), Some(1000));
}

#[tokio::test]
async fn drop_newest_counts_and_reports_every_lost_frame() {
    drop_policy_accounts_for_every_frame(OverflowPolicy::DropNewest, "reason=\"overflow_newest\"")
        .await;
}

#[tokio::test]
async fn drop_oldest_counts_and_reports_every_lost_frame() {
    drop_policy_accounts_for_every_frame(OverflowPolicy::DropOldest, "reason=\"overflow_oldest\"")
        .await;
}

#[tokio::test]
async fn close_policy_ends_the_session_with_1013() {
    let (engine, stall) = CountingEngine::new();
    stall.stall();
    let server = TestServer::start(policy_config(OverflowPolicy::Close), Arc::new(engine)).await;
    let mut client = server.connect("").await;
    for _ in 0..300 {
        if client
            .ws
            .send(Message::binary(le_bytes(&[1; FRAME])))
            .await
            .is_err()
        {
            break;
        }
    }
    let result = client.collect().await;
    assert_eq!(result.error_code(), Some("overloaded"));
    assert_eq!(result.close_code(), Some(1013));
    // 1013 means "try again later": the error says when.
    assert_eq!(result.of_type("error")[0]["retry_after_ms"], 1_000);
    assert_eq!(
        result.dropped_ms(),
        0,
        "close loses the session, not frames silently"
    );
}

/// A client that stops reading: egress's write times out and the session ends (counted as an
/// egress socket error), whether egress reads the engine's results itself or through a queue.
/// Both in one test: the metrics are the process's, shared by the tests running beside it.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut() {
    for egress_capacity in [0, 16] {
        client_that_stops_reading_is_cut(egress_capacity).await;
    }
}

async fn client_that_stops_reading_is_cut(egress_capacity: usize) {
    let (engine, _stall) = CountingEngine::new();
    let mut config = test_config();
    config.egress.write_timeout_ms = 300;
    config.edges.egress.capacity = egress_capacity;
    let server = TestServer::start(config, Arc::new(engine)).await;
    let socket_errors = |metrics: &str| {
        counter(
            metrics,
            "voxflow_stage_errors_total",
            &["stage=\"egress\"", "error=\"socket\""],
        )
    };
    let errors_before = socket_errors(&server.metrics().await);
    // A small receive window, so the server's writes back up after a few KiB.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(server.url(""), tcp)
        .await
        .unwrap();
    // Each frame plus `finalize` makes one final; none is read.
    let finalize = json!({"type": "finalize"}).to_string();
    let mut pairs = 0u32;
    while pairs < 50_000 {
        let sent = tokio::time::timeout(Duration::from_secs(2), async {
            ws.send(Message::binary(le_bytes(&[7; FRAME]))).await?;
            ws.send(Message::text(finalize.clone())).await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
        pairs += 1;
    }
    assert!(pairs < 50_000, "the server never pushed back");
    // The server has cut the connection: what it wrote before is readable, then the end.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(drained.is_ok(), "the stuck session was not ended");
    assert_eq!(socket_errors(&server.metrics().await) - errors_before, 1);
    // The server is still serving.
    let mut client = server.connect("").await;
    client.send_binary(le_bytes(&[7; FRAME])).await;
    client.send_json(json!({"type": "stop"})).await;
    assert_eq!(client.collect().await.final_samples(), FRAME as u64);
}
