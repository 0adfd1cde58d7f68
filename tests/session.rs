//! Black-box sessions over real sockets: every encoding and form, finalize/stop, ordering.
//! The engine is the deterministic in-process counting engine, so each final says exactly how
//! many samples (and which: a checksum) reached it.

mod support;

use std::sync::Arc;

use pipeline::testing::{CountingEngine, checksum, parse_counts};
use serde_json::json;
use support::*;

async fn server() -> TestServer {
    let (engine, _stall) = CountingEngine::new();
    TestServer::start(test_config(), Arc::new(engine)).await
}

#[tokio::test]
async fn tutorial_json_base64_form_delivers_every_sample_in_order() {
    let server = server().await;
    let speech = speech_16k();
    let mut client = server.connect("").await;
    for chunk in speech.chunks(320) {
        client.send_tutorial("tutorial-1", &le_bytes(chunk)).await;
    }
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;

    let ready = &result.messages[0];
    assert_eq!(ready["type"], "ready");
    assert_eq!(ready["config"]["encoding"], "LINEAR16");
    assert_eq!(
        ready["config"]["audio_id"], "tutorial-1",
        "the first audio message names the stream"
    );
    let finals = result.finals();
    assert_eq!(finals.len(), 1);
    let (samples, sum) = parse_counts(finals[0]["transcript"].as_str().unwrap()).unwrap();
    assert_eq!(
        samples,
        speech.len() as u64,
        "every sample reaches the engine"
    );
    assert_eq!(sum, checksum(&speech), "byte-exact passthrough at 16 kHz");
    assert_eq!(finals[0]["end_ms"], speech.len() as u64 / 16);
    assert_eq!(result.of_type("closed").len(), 1);
    assert_eq!(result.close_code(), Some(1000));
    assert_eq!(result.dropped_ms(), 0);
}

#[tokio::test]
async fn binary_linear16_with_start() {
    binary_linear16_session(server().await).await;
}

/// The same with a queue in front of egress, fed by the stt stage's relay task.
#[tokio::test]
async fn binary_linear16_through_an_egress_queue() {
    let mut config = test_config();
    config.edges.egress.capacity = 16;
    let (engine, _stall) = CountingEngine::new();
    binary_linear16_session(TestServer::start(config, Arc::new(engine)).await).await;
}

async fn binary_linear16_session(server: TestServer) {
    let speech = speech_16k();
    let mut client = server.connect("").await;
    client
        .send_json(json!({"type": "start", "audio_id": "bin", "encoding": "LINEAR16", "sample_rate_hertz": 16000, "interim_results": true}))
        .await;
    for chunk in speech.chunks(320) {
        client.send_binary(le_bytes(chunk)).await;
    }
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    assert_eq!(result.messages[0]["config"]["audio_id"], "bin");
    assert_eq!(result.final_samples(), speech.len() as u64);
    // Interims came before the final, all for this audio_id, in order on the audio clock.
    let transcripts = result.of_type("transcript");
    assert!(transcripts.len() > 5, "interim results expected");
    assert!(transcripts.iter().all(|m| m["audio_id"] == "bin"));
    let ends: Vec<u64> = transcripts
        .iter()
        .map(|m| m["end_ms"].as_u64().unwrap())
        .collect();
    assert!(
        ends.windows(2).all(|w| w[0] <= w[1]),
        "results in order: {ends:?}"
    );
}

#[tokio::test]
async fn opus_packets_are_decoded() {
    let server = server().await;
    let speech = speech_16k();
    let mut encoder =
        opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut client = server
        .connect("encoding=OPUS&sample_rate_hertz=16000")
        .await;
    let frames: Vec<&[i16]> = speech.chunks_exact(320).collect();
    for frame in &frames {
        client
            .send_binary(encoder.encode_vec(frame, 4_000).unwrap())
            .await;
    }
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    assert_eq!(result.messages[0]["config"]["encoding"], "OPUS");
    assert_eq!(result.final_samples(), frames.len() as u64 * 320);
}

#[tokio::test]
async fn opus_at_48k_is_decoded_and_resampled() {
    let server = server().await;
    let speech = speech_at(48_000);
    let mut encoder =
        opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut client = server.connect("").await;
    client
        .send_json(json!({"type": "start", "encoding": "OPUS", "sample_rate_hertz": 48000}))
        .await;
    let frames: Vec<&[i16]> = speech.chunks_exact(960).collect();
    for frame in &frames {
        client
            .send_binary(encoder.encode_vec(frame, 4_000).unwrap())
            .await;
    }
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    assert_eq!(result.final_samples(), frames.len() as u64 * 320);
}

#[tokio::test]
async fn mulaw_at_8k_is_expanded_and_resampled() {
    let server = server().await;
    // μ-law bytes made by sox, not by voxflow.
    let raw = std::env::temp_dir().join(format!("voxflow-mulaw-{}.raw", std::process::id()));
    let status = std::process::Command::new("sox")
        .arg(fixture("speech-16k.wav"))
        .args(["-r", "8000", "-e", "u-law", "-t", "raw"])
        .arg(&raw)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let mut client = server
        .connect("encoding=MULAW&sample_rate_hertz=8000")
        .await;
    for chunk in bytes.chunks(160) {
        client.send_binary(chunk.to_vec()).await;
    }
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    assert_eq!(
        result.final_samples(),
        bytes.len() as u64 * 2,
        "8 kHz in, exactly twice the samples at 16 kHz"
    );
}

#[tokio::test]
async fn common_rates_are_resampled_to_16k() {
    let server = server().await;
    for rate in [8_000u32, 44_100, 48_000] {
        let speech = speech_at(rate);
        let mut client = server.connect(&format!("sample_rate_hertz={rate}")).await;
        for chunk in speech.chunks(rate as usize / 50) {
            client.send_binary(le_bytes(chunk)).await;
        }
        client.send_json(json!({"type": "stop"})).await;
        let result = client.collect().await;
        let expected = (speech.len() as f64 * 16_000.0 / f64::from(rate)).round() as u64;
        assert_eq!(result.final_samples(), expected, "{rate} Hz");
    }
}

#[tokio::test]
async fn float32_from_a_browser() {
    let server = server().await;
    let speech = speech_16k();
    let mut client = server.connect("encoding=FLOAT32").await;
    for chunk in speech.chunks(2048) {
        let bytes: Vec<u8> = chunk
            .iter()
            .flat_map(|&s| (f32::from(s) / 32_768.0).to_le_bytes())
            .collect();
        client.send_binary(bytes).await;
    }
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    assert_eq!(result.final_samples(), speech.len() as u64);
}

#[tokio::test]
async fn finalize_splits_finals_exactly_where_it_was_sent() {
    let server = server().await;
    let speech = speech_16k();
    let (first, second) = speech.split_at(320 * 100);
    let mut client = server.connect("").await;
    for chunk in first.chunks(320) {
        client.send_binary(le_bytes(chunk)).await;
    }
    client.send_json(json!({"type": "finalize"})).await;
    for chunk in second.chunks(320) {
        client.send_binary(le_bytes(chunk)).await;
    }
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    let finals = result.finals();
    assert_eq!(finals.len(), 2);
    let counts: Vec<(u64, u64)> = finals
        .iter()
        .map(|m| parse_counts(m["transcript"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(counts[0], (first.len() as u64, checksum(first)));
    assert_eq!(counts[1], (second.len() as u64, checksum(second)));
    assert_eq!(finals[0]["end_ms"], 2_000);
    assert_eq!(finals[1]["start_ms"], 2_000);
}

#[tokio::test]
async fn keepalive_is_accepted_and_metrics_are_served() {
    let server = server().await;
    let mut client = server.connect("").await;
    client.send_json(json!({"type": "keepalive"})).await;
    client.send_binary(le_bytes(&[0; 320])).await;
    client.send_json(json!({"type": "keepalive"})).await;
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    assert_eq!(result.final_samples(), 320);
    let metrics = server.metrics().await;
    for needle in [
        "voxflow_stage_items_received_total{stage=\"decode\"}",
        "voxflow_stage_processing_seconds_bucket{stage=\"resample\"",
        "voxflow_sessions_opened_total",
        "voxflow_transcripts_sent_total{kind=\"final\"}",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}");
    }
    assert_eq!(http_get(server.metrics_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(server.metrics_addr, "/readyz").await.0, 200);
}

/// Send a ping; the payload of the pong that answers it.
async fn ping(client: &mut Client, payload: &'static [u8]) -> Vec<u8> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    client.ws.send(Message::Ping(payload.into())).await.unwrap();
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), client.ws.next())
            .await
            .expect("a pong within 5 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Pong(payload) = message {
            return payload.to_vec();
        }
    }
}

/// Pings are answered with their payload, before the first audio message and during a session.
#[tokio::test]
async fn pings_are_answered() {
    let server = server().await;
    let mut client = server.connect("").await;
    assert_eq!(ping(&mut client, b"before audio").await, b"before audio");
    client.send_binary(le_bytes(&[7; 320])).await;
    assert_eq!(
        ping(&mut client, b"in the session").await,
        b"in the session"
    );
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    assert_eq!(result.final_samples(), 320);
    assert_eq!(result.close_code(), Some(1000));
}

/// A client that closes gets a close frame back with its code (not a dropped connection).
#[tokio::test]
async fn a_clients_close_is_answered() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let server = server().await;
    let mut client = server.connect("").await;
    client.send_binary(le_bytes(&[7; 320])).await;
    client
        .ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(4000),
            reason: "done".into(),
        })))
        .await
        .unwrap();
    let mut answer = None;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(std::time::Duration::from_secs(5), client.ws.next()).await
    {
        if let Message::Close(frame) = message {
            answer = Some(frame.map(|f| u16::from(f.code)));
        }
    }
    assert_eq!(answer, Some(Some(4000)), "the server answers the close");
}
