//! Graceful shutdown: running sessions get their last finals, then close 1001.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pipeline::testing::CountingEngine;
use serde_json::json;
use support::*;

#[tokio::test]
async fn shutdown_delivers_the_last_finals_then_closes_1001() {
    let (engine, _stall) = CountingEngine::new();
    let mut server = TestServer::start(test_config(), Arc::new(engine)).await;
    let speech = speech_16k();
    let (first, second) = speech.split_at(32_000);
    let mut client = server.connect("interim_results=false").await;
    for chunk in first.chunks(320) {
        client.send_binary(le_bytes(chunk)).await;
    }
    client.send_json(json!({"type": "finalize"})).await;
    // Wait for that final: the server has read everything so far.
    loop {
        let message = client.next().await.expect("session open");
        if message["type"] == "transcript" && message["is_final"] == true {
            break;
        }
    }
    for chunk in second.chunks(320) {
        client.send_binary(le_bytes(chunk)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.shutdown();
    let result = client.collect().await;
    assert_eq!(
        result.final_samples(),
        second.len() as u64,
        "audio in flight at shutdown is transcribed"
    );
    assert_eq!(result.of_type("closed")[0]["reason"], "shutdown");
    assert_eq!(result.close_code(), Some(1001));
    // The server returns within its grace period, and refuses nobody silently meanwhile.
    tokio::time::timeout(Duration::from_secs(6), &mut server.task)
        .await
        .expect("drained in time")
        .unwrap()
        .unwrap();
}
