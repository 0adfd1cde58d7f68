//! `voxflow stream`: a command-line client that streams a WAV file (or stdin) and prints the
//! transcripts: partials rewritten in place, finals on their own lines.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use pipeline::Encoding;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

mod encode;

pub use encode::Encoder;

#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// A WAV file (16-bit PCM, any rate, mono or stereo), or `-` for a WAV on stdin.
    pub file: PathBuf,
    /// Server URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/stream")]
    pub url: String,
    /// Encoding to send the audio in.
    #[arg(long, default_value = "LINEAR16", value_parser = parse_encoding)]
    pub encoding: Encoding,
    /// Pace the audio in real time (as a microphone would); otherwise send as fast as the
    /// server accepts.
    #[arg(long)]
    pub realtime: bool,
    /// Send the tutorial's JSON/base64 messages instead of binary frames.
    #[arg(long)]
    pub json: bool,
    /// Frame length in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub frame_ms: u32,
    /// BCP-47 language code.
    #[arg(long)]
    pub language_code: Option<String>,
    /// Print every server message as a JSON line instead of text.
    #[arg(long)]
    pub raw: bool,
}

fn parse_encoding(name: &str) -> Result<Encoding, String> {
    Encoding::parse(name).ok_or_else(|| format!("unknown encoding {name:?}"))
}

/// Stream the file and print the transcripts; an `error` message from the server is an error.
///
/// # Errors
/// When the file cannot be read, the server cannot be reached, or the server reports an error.
pub async fn stream(args: StreamArgs) -> anyhow::Result<()> {
    let (samples, rate, channels) = read_wav(&args.file)?;
    let mut encoder = Encoder::new(args.encoding, rate, channels)?;
    let (mut ws, _) = tokio_tungstenite::connect_async(args.url.as_str())
        .await
        .with_context(|| format!("cannot connect to {}", args.url))?;
    let mut start = json!({
        "type": "start",
        "encoding": args.encoding.as_str(),
        "sample_rate_hertz": encoder.rate(),
        "audio_channel_count": channels,
        "interim_results": true,
    });
    if let Some(language) = &args.language_code {
        start["language_code"] = json!(language);
    }
    ws.send(Message::text(start.to_string())).await?;
    let (mut sink, mut source) = ws.split();

    let frame = encoder.frame_samples(args.frame_ms) * usize::from(channels);
    let realtime = args.realtime;
    let json = args.json;
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(u64::from(args.frame_ms)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for chunk in samples.chunks(frame) {
            if realtime {
                tick.tick().await;
            }
            let bytes = encoder.encode(chunk)?;
            let message = if json {
                let content = base64::engine::general_purpose::STANDARD.encode(&bytes);
                Message::text(
                    json!({ "audio_id": "voxflow-stream", "content": content }).to_string(),
                )
            } else {
                Message::binary(bytes)
            };
            sink.send(message).await?;
        }
        sink.send(Message::text(r#"{"type":"stop"}"#)).await?;
        anyhow::Ok(sink)
    });

    let mut printer = Printer::new(args.raw);
    let mut error = None;
    while let Some(message) = source.next().await {
        match message? {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(&text)?;
                if value["type"] == "error" {
                    error = Some(format!(
                        "{}: {}",
                        value["code"].as_str().unwrap_or("?"),
                        value["message"].as_str().unwrap_or("")
                    ));
                }
                printer.print(&value)?;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    printer.finish()?;
    // The sender may still be blocked if the server closed early; its outcome no longer matters.
    sender.abort();
    match error {
        Some(error) => bail!("server error: {error}"),
        None => Ok(()),
    }
}

/// 16-bit PCM samples (interleaved), rate and channel count of a WAV file, or of a WAV on stdin
/// when `path` is `-`.
///
/// # Errors
/// When the file cannot be read or is not 16-bit PCM.
pub fn read_wav(path: &Path) -> anyhow::Result<(Vec<i16>, u32, u16)> {
    let reader: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        )
    };
    let mut wav =
        hound::WavReader::new(std::io::BufReader::new(reader)).context("not a WAV file")?;
    let spec = wav.spec();
    if spec.sample_format != hound::SampleFormat::Int || spec.bits_per_sample != 16 {
        bail!(
            "expected 16-bit PCM WAV, got {} bits {:?}",
            spec.bits_per_sample,
            spec.sample_format
        );
    }
    let samples = wav.samples::<i16>().collect::<Result<Vec<_>, _>>()?;
    Ok((samples, spec.sample_rate, spec.channels))
}

/// Partials overwrite one line on a terminal; finals get their own.
struct Printer {
    raw: bool,
    tty: bool,
    partial_shown: bool,
}

impl Printer {
    fn new(raw: bool) -> Printer {
        Printer {
            raw,
            tty: std::io::stdout().is_terminal(),
            partial_shown: false,
        }
    }

    fn print(&mut self, value: &Value) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.raw {
            return writeln!(out, "{value}");
        }
        match value["type"].as_str() {
            Some("transcript") => {
                let text = value["transcript"].as_str().unwrap_or_default();
                if value["is_final"] == true {
                    self.clear(&mut out)?;
                    writeln!(out, "{text}")?;
                } else if self.tty {
                    write!(out, "\r\x1b[2K{text}")?;
                    self.partial_shown = true;
                }
                out.flush()
            }
            Some("warning") | Some("error") => {
                self.clear(&mut out)?;
                eprintln!(
                    "{}: {}",
                    value["type"].as_str().unwrap_or(""),
                    value["message"].as_str().unwrap_or("")
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn clear(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.partial_shown {
            write!(out, "\r\x1b[2K")?;
            self.partial_shown = false;
        }
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        self.clear(&mut out)?;
        out.flush()
    }
}
