//! Bad input gets the documented error and close code, and never disturbs other sessions.

mod support;

use std::sync::Arc;

use futures::SinkExt;
use pipeline::testing::CountingEngine;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;

async fn server_with(config: voxflow::Config) -> TestServer {
    let (engine, _stall) = CountingEngine::new();
    TestServer::start(config, Arc::new(engine)).await
}

/// Send `text` (after a valid start and some audio) and return what the server answered.
async fn answer_to(server: &TestServer, text: &str) -> Transcript {
    let mut client = server.connect("").await;
    client.send_binary(le_bytes(&[0; 320])).await;
    client.send_text(text).await;
    client.collect().await
}

#[tokio::test]
async fn each_kind_of_bad_message_gets_its_code() {
    let server = server_with(test_config()).await;
    let cases = [
        ("{not json", "invalid_json", 1007),
        (r#"{"content":"@@@@"}"#, "invalid_base64", 1007),
        // Three bytes: not a whole number of 16-bit samples.
        (r#"{"content":"AAEC"}"#, "invalid_audio", 1007),
        (r#"{"type":"dance"}"#, "unknown_type", 1008),
        (
            r#"{"type":"audio","content":"AAAA","sample_rate":1}"#,
            "invalid_message",
            1008,
        ),
        (
            r#"{"type":"start","encoding":"LINEAR16"}"#,
            "protocol_error",
            1008,
        ),
    ];
    for (text, code, close) in cases {
        let result = answer_to(&server, text).await;
        assert_eq!(
            result.error_code(),
            Some(code),
            "{text}: {:?}",
            result.messages
        );
        assert_eq!(result.close_code(), Some(close), "{text}");
        assert_eq!(
            result.of_type("error").len(),
            1,
            "{text}: exactly one error"
        );
    }
}

#[tokio::test]
async fn unsupported_formats_are_refused_before_audio_flows() {
    let server = server_with(test_config()).await;
    for start in [
        json!({"type": "start", "encoding": "FLAC"}),
        json!({"type": "start", "encoding": "OPUS", "sample_rate_hertz": 44100}),
        json!({"type": "start", "audio_channel_count": 6}),
    ] {
        let mut client = server.connect("").await;
        client.send_json(start.clone()).await;
        let result = client.collect().await;
        assert_eq!(result.error_code(), Some("unsupported_audio"), "{start}");
        assert_eq!(result.close_code(), Some(1003), "{start}");
        assert!(result.of_type("ready").is_empty());
    }
    // An unknown query parameter is refused at the HTTP upgrade.
    let error = tokio_tungstenite::connect_async(server.url("sample_rate=16000"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("400"), "{error}");
}

#[tokio::test]
async fn oversized_messages_get_1009() {
    let mut config = test_config();
    config.ingress.max_message_bytes = 4_096;
    let server = server_with(config).await;
    let mut client = server.connect("").await;
    client.send_binary(le_bytes(&[0; 320])).await;
    client.send_binary(vec![0; 10_000]).await;
    let result = client.collect().await;
    assert_eq!(result.error_code(), Some("message_too_big"));
    assert_eq!(result.close_code(), Some(1009));
}

#[tokio::test]
async fn audio_before_start_is_refused_when_a_start_is_required() {
    let mut config = test_config();
    config.session.require_start = true;
    let server = server_with(config).await;
    let mut client = server.connect("").await;
    client.send_binary(le_bytes(&[0; 320])).await;
    let result = client.collect().await;
    assert_eq!(result.error_code(), Some("protocol_error"));
    assert_eq!(result.close_code(), Some(1008));
}

#[tokio::test]
async fn an_engine_error_reaches_the_client_once() {
    engine_error_reaches_the_client_once(test_config()).await;
}

/// The same through the relay and a queue in front of egress.
#[tokio::test]
async fn an_engine_error_reaches_the_client_once_through_an_egress_queue() {
    let mut config = test_config();
    config.edges.egress.capacity = 16;
    engine_error_reaches_the_client_once(config).await;
}

async fn engine_error_reaches_the_client_once(config: voxflow::config::Config) {
    let (mut engine, _stall) = CountingEngine::new();
    engine.fail_after_batches = Some(3);
    let server = TestServer::start(config, Arc::new(engine)).await;
    let mut client = server.connect("").await;
    for _ in 0..50 {
        if client
            .ws
            .send(Message::binary(le_bytes(&[0; 320])))
            .await
            .is_err()
        {
            break;
        }
    }
    let result = client.collect().await;
    assert_eq!(result.of_type("error").len(), 1, "{:?}", result.messages);
    assert_eq!(result.error_code(), Some("engine_error"));
    assert!(
        result.of_type("error")[0]["message"]
            .as_str()
            .unwrap()
            .contains("INVALID_ARGUMENT")
    );
    assert_eq!(result.close_code(), Some(1011));
}

#[tokio::test]
async fn abrupt_disconnects_and_garbage_leave_other_sessions_untouched() {
    let server = server_with(test_config()).await;
    let speech = speech_16k();
    let mut good = server.connect("").await;
    let mut sent = 0u64;
    for (i, chunk) in speech.chunks(320).enumerate() {
        good.send_binary(le_bytes(chunk)).await;
        sent += chunk.len() as u64;
        // Meanwhile, clients misbehave in every way we know.
        if i % 40 == 0 {
            let mut rude = server.connect("").await;
            rude.send_binary(le_bytes(&[1; 320])).await;
            drop(rude); // no close frame: the TCP connection just goes
            let _ = answer_to(&server, "{not json").await;
            let mut half = tokio::net::TcpStream::connect(server.addr).await.unwrap();
            use tokio::io::AsyncWriteExt;
            half.write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            drop(half);
        }
    }
    good.send_json(json!({"type": "stop"})).await;
    let result = good.collect().await;
    assert_eq!(result.final_samples(), sent);
    assert_eq!(result.close_code(), Some(1000));
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("voxflow_client_errors_total{code=\"invalid_json\"}"),
        "errors are counted"
    );
}
