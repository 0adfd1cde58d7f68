//! The Google-compatible Speech-to-Text emulator (`voxflow emulator`).
//!
//! A real tonic gRPC server for `google.cloud.speech.v1.Speech/StreamingRecognize`, for local
//! development and for tests, that behaves like Google where voxflow depends on it: the first
//! request must be the config; encoding, rate and language are checked; a stream ends with
//! OUT_OF_RANGE after [`EmulatorConfig::max_stream_secs`] or after
//! [`EmulatorConfig::audio_timeout_secs`] without audio; each HTTP/2 connection takes at most
//! [`EmulatorConfig::max_concurrent_streams`] streams; faults and latency can be injected.
//!
//! Transcription is deterministic: audio says words as tones ([`tones`]); each word becomes an
//! interim result as soon as its tone ends (when interim results are asked for), and an
//! utterance becomes a final after 300 ms without a tone or when the client half-closes.
//! `result_end_time` is the end of the last word, on the stream's own audio clock, as Google
//! reports it. A marker ([`tones::marker`]) becomes a final ("marker 17") the moment it is
//! recognized, with `result_end_time` where that happened, so a load tester can time the whole
//! path. [`EmulatorStats`] counts what the emulator saw, for tests and the load tester.

mod grpc;
pub mod tones;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use googleapis_tonic_google_cloud_speech_v1::google::cloud::speech::v1::{
    SpeechRecognitionAlternative, StreamingRecognitionConfig, StreamingRecognitionResult,
    StreamingRecognizeRequest, StreamingRecognizeResponse, recognition_config::AudioEncoding,
    streaming_recognize_request::StreamingRequest,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Status;

use self::grpc::{ResponseStream, Speech, SpeechService};
use self::tones::{Event, Recognizer};

pub use self::tones::{silence, tone_words, transcript};

/// HTTP/2 flow-control windows the emulator advertises (see `serve`).
const STREAM_WINDOW_BYTES: u32 = 1 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// Google's limit on the audio in one streaming request.
const MAX_AUDIO_BYTES: usize = 25_600;

/// How the emulator behaves. Defaults are Google's.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct EmulatorConfig {
    /// End a stream with OUT_OF_RANGE ("Exceeded maximum allowed stream duration") once it has
    /// lasted this long. Google measures wall-clock time; the emulator takes the larger of
    /// wall-clock time and the audio received, so clients that send faster than real time
    /// (tests, the load tester) meet the limit at the same audio position as in production.
    #[arg(long, default_value_t = 305)]
    pub max_stream_secs: u64,
    /// End a stream with OUT_OF_RANGE ("Audio Timeout Error") when no request arrives for this
    /// long, wall-clock, as Google does after ~10 s.
    #[arg(long, default_value_t = 10)]
    pub audio_timeout_secs: u64,
    /// HTTP/2 streams one connection may carry at once (Google's front ends take about 100);
    /// clients must spread further streams over more connections or queue.
    #[arg(long, default_value_t = 100)]
    pub max_concurrent_streams: u32,
    /// Abort every Nth stream (counted over all connections) with UNAVAILABLE after
    /// `fail_after_ms` of its audio; 0 = never.
    #[arg(long, default_value_t = 0)]
    pub fail_every: u64,
    /// Audio a failing stream receives before it is aborted.
    #[arg(long, default_value_t = 1_000)]
    pub fail_after_ms: u64,
    /// Delay added to every response (not to request handling).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Hold a stream's response headers until its first response (or error), as gRPC servers
    /// may: a client that waits for headers before sending audio then never gets any.
    #[arg(long)]
    pub lazy_headers: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            max_stream_secs: 305,
            audio_timeout_secs: 10,
            max_concurrent_streams: 100,
            fail_every: 0,
            fail_after_ms: 1_000,
            latency_ms: 0,
            lazy_headers: false,
        }
    }
}

/// What the emulator saw. Cheap to clone; shared with the server.
#[derive(Clone, Default)]
pub struct EmulatorStats(Arc<StatsInner>);

#[derive(Default)]
struct StatsInner {
    connections: AtomicU64,
    streams: AtomicU64,
    active: AtomicU64,
    half_closed: AtomicU64,
    cancelled: AtomicU64,
    rejected: AtomicU64,
    faults: AtomicU64,
    audio_timeouts: AtomicU64,
    duration_limits: AtomicU64,
    audio_us: AtomicU64,
    peak_per_connection: AtomicU64,
    per_connection: Mutex<HashMap<SocketAddr, u64>>,
    tokens: Mutex<Vec<String>>,
    recovery: Mutex<Recovery>,
}

#[derive(Default)]
struct Recovery {
    last_fault: Option<Instant>,
    gaps: Vec<Duration>,
}

impl EmulatorStats {
    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.0.connections.load(Ordering::Relaxed)
    }

    /// StreamingRecognize calls started.
    pub fn streams(&self) -> u64 {
        self.0.streams.load(Ordering::Relaxed)
    }

    /// Streams open now.
    pub fn active(&self) -> u64 {
        self.0.active.load(Ordering::Relaxed)
    }

    /// Streams the client ended by half-closing (and that got their finals).
    pub fn half_closed(&self) -> u64 {
        self.0.half_closed.load(Ordering::Relaxed)
    }

    /// Streams the client cancelled (reset) before they ended.
    pub fn cancelled(&self) -> u64 {
        self.0.cancelled.load(Ordering::Relaxed)
    }

    /// Streams refused with INVALID_ARGUMENT.
    pub fn rejected(&self) -> u64 {
        self.0.rejected.load(Ordering::Relaxed)
    }

    /// Streams aborted by `fail_every`.
    pub fn faults(&self) -> u64 {
        self.0.faults.load(Ordering::Relaxed)
    }

    /// Streams ended by the audio timeout.
    pub fn audio_timeouts(&self) -> u64 {
        self.0.audio_timeouts.load(Ordering::Relaxed)
    }

    /// Streams ended by the maximum stream duration.
    pub fn duration_limits(&self) -> u64 {
        self.0.duration_limits.load(Ordering::Relaxed)
    }

    /// Audio received over all streams.
    pub fn audio_received(&self) -> Duration {
        Duration::from_micros(self.0.audio_us.load(Ordering::Relaxed))
    }

    /// Most streams seen open at once on one connection.
    pub fn peak_streams_per_connection(&self) -> u64 {
        self.0.peak_per_connection.load(Ordering::Relaxed)
    }

    /// For each injected fault, the time until the next stream opened (the client's recovery).
    /// Meaningful when one client is failing at a time.
    pub fn fault_recoveries(&self) -> Vec<Duration> {
        self.0
            .recovery
            .lock()
            .map(|r| r.gaps.clone())
            .unwrap_or_default()
    }

    /// Distinct `authorization` headers seen, in order of first use (at most 1,000 kept).
    pub fn authorizations(&self) -> Vec<String> {
        self.0.tokens.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn authorization(&self, value: &str) {
        if let Ok(mut tokens) = self.0.tokens.lock()
            && tokens.len() < 1_000
            && !tokens.iter().any(|t| t == value)
        {
            tokens.push(value.to_string());
        }
    }

    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn stream_opened(&self, peer: Option<SocketAddr>) -> StreamGuard {
        let number = self.0.streams.fetch_add(1, Ordering::Relaxed) + 1;
        Self::add(&self.0.active);
        if let Ok(mut recovery) = self.0.recovery.lock()
            && let Some(fault) = recovery.last_fault.take()
            && recovery.gaps.len() < 10_000
        {
            recovery.gaps.push(fault.elapsed());
        }
        if let (Some(peer), Ok(mut map)) = (peer, self.0.per_connection.lock()) {
            let open = map.entry(peer).or_insert(0);
            *open += 1;
            self.0
                .peak_per_connection
                .fetch_max(*open, Ordering::Relaxed);
        }
        StreamGuard {
            stats: self.clone(),
            peer,
            number,
        }
    }

    fn fault(&self) {
        Self::add(&self.0.faults);
        if let Ok(mut recovery) = self.0.recovery.lock() {
            recovery.last_fault = Some(Instant::now());
        }
    }
}

/// Undoes a stream's share of the gauges when it ends, however it ends.
struct StreamGuard {
    stats: EmulatorStats,
    peer: Option<SocketAddr>,
    number: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.stats.0.active.fetch_sub(1, Ordering::Relaxed);
        if let (Some(peer), Ok(mut map)) = (self.peer, self.stats.0.per_connection.lock())
            && let Some(open) = map.get_mut(&peer)
        {
            *open = open.saturating_sub(1);
            if *open == 0 {
                map.remove(&peer);
            }
        }
    }
}

/// An emulator ready to serve.
pub struct Emulator {
    config: EmulatorConfig,
    stats: EmulatorStats,
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> (Emulator, EmulatorStats) {
        let stats = EmulatorStats::default();
        (
            Emulator {
                config,
                stats: stats.clone(),
            },
            stats,
        )
    }

    /// Serve on `listener` until `shutdown` completes.
    ///
    /// # Errors
    /// When the gRPC server fails.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let stats = self.stats.clone();
        let incoming = TcpListenerStream::new(listener).map(move |conn| {
            if let Ok(stream) = &conn {
                // Results are small and latency-bound.
                let _ = stream.set_nodelay(true);
                EmulatorStats::add(&stats.0.connections);
            }
            conn
        });
        let speech = EmulatorSpeech {
            config: self.config.clone(),
            stats: self.stats,
        };
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(self.config.max_concurrent_streams.max(1)))
            // HTTP/2's default 64 KiB windows let a connection carry only 64 KiB of audio
            // between window updates, shared by up to 100 streams; at a thousand real-time
            // streams audio queued behind them for seconds. Google's front ends advertise
            // large windows; so does the emulator.
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .add_service(SpeechService::new(Arc::new(speech)))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    }
}

/// Serve an emulator configured by `config` on `listener` until `shutdown` completes.
///
/// # Errors
/// When the gRPC server fails.
pub async fn serve(
    listener: TcpListener,
    config: EmulatorConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (emulator, _stats) = Emulator::new(config);
    emulator.serve(listener, shutdown).await
}

struct EmulatorSpeech {
    config: EmulatorConfig,
    stats: EmulatorStats,
}

type Item = Result<StreamingRecognizeResponse, Status>;

impl Speech for EmulatorSpeech {
    async fn streaming_recognize(
        &self,
        request: tonic::Request<tonic::Streaming<StreamingRecognizeRequest>>,
    ) -> Result<tonic::Response<ResponseStream>, Status> {
        let guard = self.stats.stream_opened(request.remote_addr());
        // Any token is accepted; tests read which ones were used.
        if let Some(value) = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            self.stats.authorization(value);
        }
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Item>(32);
        let responder = Responder::new(tx, Duration::from_millis(self.config.latency_ms));
        tokio::spawn(run_stream(self.config.clone(), guard, inbound, responder));
        let mut responses = ReceiverStream::new(rx);
        if !self.config.lazy_headers {
            return Ok(tonic::Response::new(Box::pin(responses)));
        }
        match responses.next().await {
            Some(Err(status)) => Err(status),
            first => {
                let stream = tokio_stream::iter(first).chain(responses);
                Ok(tonic::Response::new(Box::pin(stream)))
            }
        }
    }
}

/// Sends responses, after the configured latency.
enum Responder {
    Direct(mpsc::Sender<Item>),
    Delayed(mpsc::Sender<(Instant, Item)>, Duration),
}

impl Responder {
    fn new(tx: mpsc::Sender<Item>, latency: Duration) -> Responder {
        if latency.is_zero() {
            return Responder::Direct(tx);
        }
        let (delayed_tx, mut delayed_rx) = mpsc::channel::<(Instant, Item)>(64);
        tokio::spawn(async move {
            while let Some((due, item)) = delayed_rx.recv().await {
                sleep_until(due).await;
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        Responder::Delayed(delayed_tx, latency)
    }

    /// False when the client is gone.
    async fn send(&self, item: Item) -> bool {
        match self {
            Responder::Direct(tx) => tx.send(item).await.is_ok(),
            Responder::Delayed(tx, latency) => {
                tx.send((Instant::now() + *latency, item)).await.is_ok()
            }
        }
    }
}

/// What the config message fixed for the stream.
struct Setup {
    encoding: AudioEncoding,
    rate_hz: u32,
    interim_results: bool,
    language_code: String,
}

fn validate(request: Option<StreamingRecognizeRequest>) -> Result<Setup, Status> {
    let Some(StreamingRequest::StreamingConfig(StreamingRecognitionConfig {
        config: Some(config),
        interim_results,
        ..
    })) = request.and_then(|r| r.streaming_request)
    else {
        return Err(Status::invalid_argument(
            "The first StreamingRecognizeRequest must carry streaming_config with a config; \
             audio follows in later requests.",
        ));
    };
    let encoding =
        AudioEncoding::try_from(config.encoding).unwrap_or(AudioEncoding::EncodingUnspecified);
    if !matches!(encoding, AudioEncoding::Linear16 | AudioEncoding::Mulaw) {
        return Err(Status::invalid_argument(format!(
            "Invalid recognition 'config': the emulator accepts LINEAR16 and MULAW, not {}.",
            encoding.as_str_name()
        )));
    }
    if !(8_000..=48_000).contains(&config.sample_rate_hertz) {
        return Err(Status::invalid_argument(format!(
            "Invalid recognition 'config': sample_rate_hertz {} must be between 8000 and 48000 for {}.",
            config.sample_rate_hertz,
            encoding.as_str_name()
        )));
    }
    if config.audio_channel_count > 1 {
        return Err(Status::invalid_argument(
            "Invalid recognition 'config': the emulator transcribes mono audio only.",
        ));
    }
    if config.language_code.trim().is_empty() {
        return Err(Status::invalid_argument(
            "Invalid recognition 'config': language_code is required.",
        ));
    }
    Ok(Setup {
        encoding,
        rate_hz: config.sample_rate_hertz as u32,
        interim_results,
        language_code: config.language_code,
    })
}

async fn run_stream(
    config: EmulatorConfig,
    guard: StreamGuard,
    mut inbound: tonic::Streaming<StreamingRecognizeRequest>,
    out: Responder,
) {
    let stats = guard.stats.clone();
    let started = Instant::now();
    let audio_timeout = Duration::from_secs(config.audio_timeout_secs);
    let max_stream = Duration::from_secs(config.max_stream_secs);
    let max_stream_us = config.max_stream_secs.saturating_mul(1_000_000);
    let audio_timeout_error = || {
        Status::out_of_range(
            "Audio Timeout Error: Long duration elapsed without audio. Audio should be sent close to real time.",
        )
    };
    let duration_error = || {
        Status::out_of_range(format!(
            "Exceeded maximum allowed stream duration of {} seconds.",
            config.max_stream_secs
        ))
    };

    let first = match timeout(audio_timeout, inbound.message()).await {
        Ok(Ok(first)) => first,
        Ok(Err(_)) => {
            EmulatorStats::add(&stats.0.cancelled);
            return;
        }
        Err(_) => {
            EmulatorStats::add(&stats.0.audio_timeouts);
            out.send(Err(audio_timeout_error())).await;
            return;
        }
    };
    let setup = match validate(first) {
        Ok(setup) => setup,
        Err(status) => {
            EmulatorStats::add(&stats.0.rejected);
            out.send(Err(status)).await;
            return;
        }
    };
    let fail_at_us = (config.fail_every > 0 && guard.number.is_multiple_of(config.fail_every))
        .then(|| config.fail_after_ms.saturating_mul(1_000));
    let mut recognizer = Recognizer::new(setup.rate_hz);
    let mut samples: Vec<i16> = Vec::new();
    let mut carry: Option<u8> = None;
    let mut events = Vec::new();
    let mut received = 0u64;
    let mut last_request = Instant::now();

    loop {
        let audio_deadline = last_request + audio_timeout;
        let duration_deadline = started + max_stream;
        let message = tokio::select! {
            message = inbound.message() => message,
            () = sleep_until(audio_deadline.min(duration_deadline)) => {
                if duration_deadline <= audio_deadline {
                    EmulatorStats::add(&stats.0.duration_limits);
                    out.send(Err(duration_error())).await;
                } else {
                    EmulatorStats::add(&stats.0.audio_timeouts);
                    out.send(Err(audio_timeout_error())).await;
                }
                return;
            }
        };
        let request = match message {
            Ok(Some(request)) => request,
            Ok(None) => {
                // Half-close: finish the word and utterance in progress, then end the stream.
                recognizer.flush(&mut events);
                send_events(&out, &setup, &mut events).await;
                EmulatorStats::add(&stats.0.half_closed);
                return;
            }
            Err(_) => {
                EmulatorStats::add(&stats.0.cancelled);
                return;
            }
        };
        last_request = Instant::now();
        let audio = match request.streaming_request {
            Some(StreamingRequest::AudioContent(audio)) => audio,
            Some(StreamingRequest::StreamingConfig(_)) | None => {
                EmulatorStats::add(&stats.0.rejected);
                out.send(Err(Status::invalid_argument(
                    "Only the first request may carry streaming_config; later requests carry audio_content.",
                )))
                .await;
                return;
            }
        };
        if audio.len() > MAX_AUDIO_BYTES {
            EmulatorStats::add(&stats.0.rejected);
            out.send(Err(Status::invalid_argument(format!(
                "audio_content of {} bytes exceeds the limit of {MAX_AUDIO_BYTES} bytes per request.",
                audio.len()
            ))))
            .await;
            return;
        }
        samples.clear();
        decode(setup.encoding, &audio, &mut carry, &mut samples);
        recognizer.push(&samples, &mut events);
        received += samples.len() as u64;
        let received_us = received * 1_000_000 / u64::from(setup.rate_hz);
        stats.0.audio_us.fetch_add(
            samples.len() as u64 * 1_000_000 / u64::from(setup.rate_hz),
            Ordering::Relaxed,
        );
        if !send_events(&out, &setup, &mut events).await {
            EmulatorStats::add(&stats.0.cancelled);
            return;
        }
        if received_us > max_stream_us {
            EmulatorStats::add(&stats.0.duration_limits);
            out.send(Err(duration_error())).await;
            return;
        }
        if fail_at_us.is_some_and(|at| received_us >= at) {
            stats.fault();
            out.send(Err(Status::unavailable(
                "emulator: injected fault (fail_every)",
            )))
            .await;
            return;
        }
    }
}

fn decode(encoding: AudioEncoding, audio: &[u8], carry: &mut Option<u8>, out: &mut Vec<i16>) {
    match encoding {
        AudioEncoding::Mulaw => out.extend(audio.iter().map(|&b| mulaw_to_linear(b))),
        _ => {
            let mut bytes = audio;
            if let Some(low) = *carry
                && let Some((&high, rest)) = bytes.split_first()
            {
                out.push(i16::from_le_bytes([low, high]));
                bytes = rest;
                *carry = None;
            }
            let mut pairs = bytes.chunks_exact(2);
            out.extend(pairs.by_ref().map(|p| i16::from_le_bytes([p[0], p[1]])));
            if let Some(&odd) = pairs.remainder().first() {
                *carry = Some(odd);
            }
        }
    }
}

/// G.711 μ-law expansion.
fn mulaw_to_linear(byte: u8) -> i16 {
    let u = !byte;
    let exponent = (u >> 4) & 0x07;
    let mantissa = i32::from(u & 0x0f);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    (if u & 0x80 != 0 { -magnitude } else { magnitude }) as i16
}

/// Send recognizer events as results; false when the client is gone.
async fn send_events(out: &Responder, setup: &Setup, events: &mut Vec<Event>) -> bool {
    for event in events.drain(..) {
        let (transcript, end_sample, is_final) = match event {
            Event::Word {
                symbols,
                end_sample,
            } => (transcript(&symbols), end_sample, false),
            Event::Utterance {
                symbols,
                end_sample,
            } => (transcript(&symbols), end_sample, true),
            Event::Marker { id, end_sample } => (tones::marker_transcript(id), end_sample, true),
        };
        if !is_final && !setup.interim_results {
            continue;
        }
        let rate = u64::from(setup.rate_hz);
        let end = prost_types::Duration {
            seconds: (end_sample / rate) as i64,
            nanos: ((end_sample % rate) * 1_000_000_000 / rate) as i32,
        };
        let response = StreamingRecognizeResponse {
            results: vec![StreamingRecognitionResult {
                alternatives: vec![SpeechRecognitionAlternative {
                    transcript,
                    confidence: if is_final { 0.9 } else { 0.0 },
                    words: Vec::new(),
                }],
                is_final,
                stability: if is_final { 0.0 } else { 0.9 },
                result_end_time: Some(end),
                language_code: setup.language_code.to_lowercase(),
                ..Default::default()
            }],
            ..Default::default()
        };
        if !out.send(Ok(response)).await {
            return false;
        }
    }
    true
}
