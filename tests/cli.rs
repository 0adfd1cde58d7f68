//! `voxflow stream`: the real binary as a client against an in-process server.

mod support;

use std::process::Command;
use std::sync::Arc;

use pipeline::testing::{CountingEngine, parse_counts};
use support::*;

async fn run_client(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_voxflow"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn stream_prints_finals_and_exits_zero_in_every_encoding() {
    let (engine, _stall) = CountingEngine::new();
    let server = TestServer::start(test_config(), Arc::new(engine)).await;
    let wav = fixture("speech-16k.wav");
    let samples = speech_16k().len() as u64;
    for (encoding, extra) in [
        ("LINEAR16", "--json"),
        ("LINEAR16", "--raw"),
        ("OPUS", ""),
        ("MULAW", ""),
        ("FLOAT32", ""),
    ] {
        let mut args = vec![
            "stream".to_string(),
            wav.display().to_string(),
            "--url".into(),
            server.url(""),
            "--encoding".into(),
            encoding.into(),
        ];
        if !extra.is_empty() {
            args.push(extra.into());
        }
        let output = run_client(args).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{encoding} {extra}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line = stdout
            .lines()
            .find(|l| l.contains("samples="))
            .expect("a final is printed");
        if extra != "--raw" {
            let (count, _) = parse_counts(line).unwrap();
            // Opus pads the last partial frame to a whole 20 ms.
            assert!(
                count >= samples && count < samples + 320,
                "{encoding}: {count} samples"
            );
        }
    }
}

#[tokio::test]
async fn stream_exits_non_zero_on_a_server_error_or_a_bad_file() {
    let (engine, _stall) = CountingEngine::new();
    let server = TestServer::start(test_config(), Arc::new(engine)).await;
    let wav = fixture("speech-16k.wav").display().to_string();
    // An unknown query parameter is refused at the upgrade (HTTP 400).
    let output = run_client(vec![
        "stream".into(),
        wav.clone(),
        "--url".into(),
        server.url("language_code=x&bogus=1"),
    ])
    .await;
    assert!(
        !output.status.success(),
        "an HTTP 400 from the server is an error"
    );
    let output = run_client(vec![
        "stream".into(),
        "/nonexistent.wav".into(),
        "--url".into(),
        server.url(""),
    ])
    .await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot open"));
}
