//! Shared helpers for the black-box tests: a server on port 0, a WebSocket client, audio.

#![allow(dead_code)]

pub mod webdriver;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use pipeline::SttEngine;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use voxflow::{Config, Server};

pub const WAIT: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(config: Config, engine: Arc<dyn SttEngine>) -> TestServer {
        let settings = config.validate().expect("test config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Server::from_listeners(settings, engine, listener, metrics);
        let (addr, metrics_addr) = (server.local_addr().unwrap(), server.metrics_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            metrics_addr,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/v1/stream", self.addr)
        } else {
            format!("ws://{}/v1/stream?{query}", self.addr)
        }
    }

    pub async fn connect(&self, query: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(self.url(query))
            .await
            .expect("connects");
        Client { ws }
    }

    /// Begin a graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn metrics(&self) -> String {
        http_get(self.metrics_addr, "/metrics").await.1
    }
}

/// A minimal HTTP/1.1 GET, returning (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the server sent, in order, until it closed.
#[derive(Debug, Default)]
pub struct Transcript {
    pub messages: Vec<Value>,
    pub close: Option<(u16, String)>,
}

impl Transcript {
    pub fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.messages.iter().filter(|m| m["type"] == kind).collect()
    }

    pub fn finals(&self) -> Vec<&Value> {
        self.of_type("transcript")
            .into_iter()
            .filter(|m| m["is_final"] == true)
            .collect()
    }

    /// Samples the counting engine saw, summed over finals.
    pub fn final_samples(&self) -> u64 {
        self.finals()
            .iter()
            .map(|m| {
                pipeline::testing::parse_counts(m["transcript"].as_str().unwrap())
                    .unwrap()
                    .0
            })
            .sum()
    }

    pub fn dropped_ms(&self) -> u64 {
        self.of_type("warning")
            .iter()
            .filter_map(|m| m["dropped_ms"].as_u64())
            .sum()
    }

    pub fn close_code(&self) -> Option<u16> {
        self.close.as_ref().map(|c| c.0)
    }

    pub fn error_code(&self) -> Option<&str> {
        self.of_type("error")
            .first()
            .and_then(|m| m["code"].as_str())
    }
}

impl Client {
    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::binary(bytes)).await.expect("send");
    }

    /// The tutorial's form: `{"audio_id":…,"content":base64}`.
    pub async fn send_tutorial(&mut self, audio_id: &str, bytes: &[u8]) {
        let content = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.send_json(serde_json::json!({ "audio_id": audio_id, "content": content }))
            .await;
    }

    /// The next JSON message, skipping nothing; `None` at close.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("server answers in time")?;
            match message.ok()? {
                Message::Text(text) => {
                    return Some(serde_json::from_str(&text).expect("server sends JSON"));
                }
                Message::Close(_) => return None,
                _ => {}
            }
        }
    }

    /// Read everything until the server closes.
    pub async fn collect(mut self) -> Transcript {
        let mut transcript = Transcript::default();
        loop {
            let message = match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("server closes in time")
            {
                Some(Ok(message)) => message,
                _ => return transcript,
            };
            match message {
                Message::Text(text) => transcript
                    .messages
                    .push(serde_json::from_str(&text).expect("JSON")),
                Message::Close(frame) => {
                    transcript.close = frame
                        .map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string()));
                    // Drain until the server ends the TCP stream.
                    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.ws.next()).await {}
                    return transcript;
                }
                _ => {}
            }
        }
    }
}

/// LINEAR16 bytes for samples.
pub fn le_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The committed espeak-ng speech at 16 kHz.
pub fn speech_16k() -> Vec<i16> {
    read_wav(&fixture("speech-16k.wav"))
}

pub fn read_wav(path: &std::path::Path) -> Vec<i16> {
    let mut reader =
        hound::WavReader::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    reader.samples::<i16>().map(Result::unwrap).collect()
}

/// The speech fixture converted with sox to `rate` Hz (real resampling by a third party).
pub fn speech_at(rate: u32) -> Vec<i16> {
    let out =
        std::env::temp_dir().join(format!("voxflow-speech-{rate}-{}.wav", std::process::id()));
    let status = Command::new("sox")
        .arg(fixture("speech-16k.wav"))
        .args(["-r", &rate.to_string(), "-b", "16"])
        .arg(&out)
        .status()
        .expect("sox is installed (.ci/run installs it)");
    assert!(status.success());
    let samples = read_wav(&out);
    let _ = std::fs::remove_file(out);
    samples
}

/// Config whose decode queue is tiny and gives up after 10 ms with `overflow`: behind a stalled
/// engine, ingress meets the policy within a few frames.
pub fn policy_config(overflow: pipeline::OverflowPolicy) -> Config {
    let mut config = test_config();
    config.edges.decode = voxflow::config::EdgeConfig {
        capacity: 2,
        send_timeout_ms: 10,
        overflow,
    };
    config
}

/// Config for tests: ephemeral listeners come from the caller; short timeouts.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.metrics.listen = "127.0.0.1:0".into();
    config.shutdown.grace_period_ms = 5_000;
    config
}
