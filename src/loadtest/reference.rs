//! A bare-minimum gateway, the yardstick the load tests compare voxflow with
//! (`voxflow loadtest --spawn --reference`).
//!
//! One upstream `StreamingRecognize` per client, every frame forwarded the moment it arrives;
//! no VAD, no batching, no bounded stage graph, no metrics, no limits, no replay. It speaks
//! just enough of voxflow's protocol for the load tester: the tutorial's JSON/base64 messages
//! (format in the query) or a `start` message then binary frames, LINEAR16 only, `stop`, and
//! `transcript`/`closed` back. Not for production: it exists so that "what does the full graph
//! cost" is measured against the least a gateway can do, on the same machine in the same run.

use anyhow::{Context as _, bail};
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use googleapis_tonic_google_cloud_speech_v1::google::cloud::speech::v1::{
    RecognitionConfig, StreamingRecognitionConfig, StreamingRecognizeRequest,
    recognition_config::AudioEncoding, speech_client::SpeechClient,
    streaming_recognize_request::StreamingRequest,
};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, clap::Args)]
pub struct ReferenceArgs {
    /// WebSocket address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// The Google-compatible endpoint (plaintext gRPC).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub upstream: String,
    /// HTTP/2 connections upstream; streams are spread over them in turn.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

/// Serve until the process is killed.
///
/// # Errors
/// When the address cannot be bound or the endpoint is not a URI.
pub async fn run(args: ReferenceArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_shared(args.upstream.clone())
        .with_context(|| format!("bad upstream {:?}", args.upstream))?
        .tcp_nodelay(true);
    let channels: Vec<Channel> = (0..args.connections.max(1))
        .map(|_| endpoint.connect_lazy())
        .collect();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    for next in 0.. {
        let (tcp, _) = listener.accept().await?;
        let channel = channels[next % channels.len()].clone();
        tokio::spawn(async move {
            if let Err(error) = session(tcp, channel).await {
                tracing::debug!(%error, "reference session ended");
            }
        });
    }
    Ok(())
}

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default)]
    sample_rate_hertz: Option<u32>,
}

async fn session(tcp: TcpStream, channel: Channel) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut query = String::new();
    // tungstenite's callback signature: its error type is its own, however large.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        query = request.uri().query().unwrap_or_default().to_owned();
        Ok(response)
    };
    // tungstenite's default 128 KiB read buffer would dominate a session's memory: the same read
    // size as voxflow's, and no write buffering.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(crate::config::DEFAULT_READ_BUFFER_BYTES)
        .write_buffer_size(0);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await?;
    let (mut sink, mut stream) = ws.split();
    let mut fields = form_urlencoded::parse(query.as_bytes());
    let mut rate = fields
        .find(|(key, _)| key == "sample_rate_hertz")
        .and_then(|(_, value)| value.parse::<u32>().ok());
    if rate.is_none() {
        // The binary form names the format in its first message.
        let Some(Ok(Message::Text(text))) = stream.next().await else {
            bail!("no start message");
        };
        let start: ClientMessage = serde_json::from_str(&text)?;
        if start.kind != "start" || start.encoding.as_deref().is_some_and(|e| e != "LINEAR16") {
            bail!("expected a LINEAR16 start message");
        }
        rate = start.sample_rate_hertz;
    }
    let rate = rate.unwrap_or(16_000);

    let (requests, queued) = mpsc::channel(8);
    let config = StreamingRecognitionConfig {
        config: Some(RecognitionConfig {
            encoding: AudioEncoding::Linear16 as i32,
            sample_rate_hertz: i32::try_from(rate)?,
            audio_channel_count: 1,
            language_code: "en-US".into(),
            max_alternatives: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    requests
        .send(StreamingRecognizeRequest {
            streaming_request: Some(StreamingRequest::StreamingConfig(config)),
        })
        .await?;
    let mut responses = SpeechClient::new(channel)
        .streaming_recognize(ReceiverStream::new(queued))
        .await?
        .into_inner();

    let forward = async move {
        while let Some(Ok(message)) = stream.next().await {
            let audio = match message {
                Message::Binary(audio) => audio.to_vec(),
                Message::Text(text) => {
                    let Ok(message) = serde_json::from_str::<ClientMessage>(&text) else {
                        continue;
                    };
                    if message.kind == "stop" {
                        break;
                    }
                    let Some(content) = message.content else {
                        continue;
                    };
                    let Ok(audio) = base64::engine::general_purpose::STANDARD.decode(content)
                    else {
                        continue;
                    };
                    audio
                }
                Message::Close(_) => break,
                _ => continue,
            };
            let request = StreamingRecognizeRequest {
                streaming_request: Some(StreamingRequest::AudioContent(audio)),
            };
            if requests.send(request).await.is_err() {
                break;
            }
        }
        // Dropping `requests` half-closes the upstream stream: its last finals follow.
    };
    let backward = async move {
        while let Ok(Some(response)) = responses.message().await {
            for result in response.results {
                let Some(best) = result.alternatives.first() else {
                    continue;
                };
                let end_ms = result.result_end_time.map_or(0, |end| {
                    u64::try_from(end.seconds).unwrap_or(0) * 1000
                        + u64::try_from(end.nanos).unwrap_or(0) / 1_000_000
                });
                let text = serde_json::json!({
                    "type": "transcript",
                    "transcript": best.transcript,
                    "is_final": result.is_final,
                    "end_ms": end_ms,
                })
                .to_string();
                sink.send(Message::text(text)).await?;
            }
        }
        sink.send(Message::text(r#"{"type":"closed"}"#)).await?;
        sink.close().await?;
        anyhow::Ok(())
    };
    let ((), result) = tokio::join!(forward, backward);
    result
}
