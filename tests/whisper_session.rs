//! Black-box: `voxflow serve`'s default engine (Whisper, the real tiny.en model) behind the real
//! server on port 0, a real WebSocket client, speech synthesized with espeak-ng and sox.
//!
//! Needs `models/ggml-tiny.en.bin` (`cargo run --release -- models install`) and
//! `apt-get install espeak-ng sox`.

use std::path::Path;
use std::process::Command;

use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const TEXT: &str = "Please send the report to the main office before Friday.";

/// `TEXT` as 16 kHz mono LINEAR16 with half a second of silence around it.
fn speech(dir: &Path) -> Vec<u8> {
    let raw = dir.join("raw.wav");
    let pcm = dir.join("speech.raw");
    let status = Command::new("espeak-ng")
        .args(["-v", "en", "-s", "160", "-w"])
        .arg(&raw)
        .arg(TEXT)
        .status()
        .expect("espeak-ng runs (apt-get install espeak-ng)");
    assert!(status.success());
    let status = Command::new("sox")
        .arg(&raw)
        .args([
            "-r",
            "16000",
            "-c",
            "1",
            "-b",
            "16",
            "-e",
            "signed-integer",
            "-t",
            "raw",
        ])
        .arg(&pcm)
        .args(["pad", "0.5", "0.5"])
        .status()
        .expect("sox runs (apt-get install sox)");
    assert!(status.success());
    std::fs::read(&pcm).unwrap()
}

/// GET /metrics over a plain socket.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    socket.read_to_string(&mut body).await.unwrap();
    body
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .collect::<String>()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_sent_over_a_websocket_comes_back_as_text() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ggml-tiny.en.bin");
    assert!(
        model.is_file(),
        "{} is missing: run `cargo run --release -- models install` first",
        model.display()
    );
    let mut config = voxflow::Config::default();
    config.stt.whisper.model_path = model;
    let settings = config.validate().unwrap();
    let engine = voxflow::server::engine(&settings).unwrap();
    assert_eq!(engine.name(), "whisper");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = voxflow::Server::from_listeners(settings, engine, listener, metrics);
    let addr = server.local_addr().unwrap();
    let metrics_addr = server.metrics_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let dir = std::env::temp_dir().join(format!("voxflow-whisper-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcm = speech(&dir);
    let _ = std::fs::remove_dir_all(&dir);

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/stream"))
        .await
        .unwrap();
    ws.send(Message::text(
        r#"{"type":"start","encoding":"LINEAR16","sample_rate_hertz":16000}"#,
    ))
    .await
    .unwrap();
    // 100 ms messages in real time: the VAD gate and the engine's timers see a live talker.
    // Transcripts queue up in the socket meanwhile and are read below.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    for chunk in pcm.chunks(3_200) {
        tick.tick().await;
        ws.send(Message::binary(chunk.to_vec())).await.unwrap();
    }
    ws.send(Message::text(r#"{"type":"stop"}"#)).await.unwrap();
    let (mut finals, mut interims) = (Vec::new(), 0);
    while let Some(message) = ws.next().await {
        let text = match message.unwrap() {
            Message::Text(text) => text,
            Message::Close(_) => break,
            _ => continue,
        };
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        match json["type"].as_str() {
            Some("transcript") if json["is_final"] == true => {
                finals.push(json["transcript"].as_str().unwrap().to_owned());
                assert!(
                    json["end_ms"].as_u64() > json["start_ms"].as_u64(),
                    "{json}"
                );
            }
            Some("transcript") => interims += 1,
            Some("error") => panic!("{json}"),
            _ => {}
        }
    }
    let heard = words(&finals.join(" "));
    let expected = words(TEXT);
    let missing: Vec<&String> = expected.iter().filter(|w| !heard.contains(w)).collect();
    assert!(missing.len() <= 1, "heard {finals:?} ({interims} interims)");
    assert!(interims >= 1, "no interim while speaking");

    // The engine's metrics are exported.
    let exported = scrape(metrics_addr).await;
    for name in [
        "voxflow_whisper_decode_seconds_sum{kind=\"final\"}",
        "voxflow_whisper_audio_decoded_seconds_sum{kind=\"final\"}",
        "voxflow_whisper_queue_depth_jobs",
    ] {
        assert!(
            exported.contains(name),
            "{name} not in /metrics:\n{exported}"
        );
    }

    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
