//! The Google engine against the emulator, over real gRPC on loopback.
//!
//! Audio is the emulator's tone language (`emulator::tones`), so every test knows the exact
//! transcript and end time of every utterance, and asserts that finals arrive once each, in
//! order, with monotonic times on the session clock, whatever happened upstream.

// The emulator is compiled into this test directly, so the test does not depend on how the
// binary wires it.
#[allow(dead_code, unused_imports)]
#[path = "../src/emulator/mod.rs"]
mod emulator;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use emulator::tones::{self, Event, Recognizer};
use emulator::{Emulator, EmulatorConfig, EmulatorStats};
use pipeline::{
    AudioBatch, EngineAudio, EngineInput, EngineResult, EngineResults, StreamConfig, SttEngine,
    SttError,
};
use stages::stt::google::{CustomServiceAccount, GoogleAuth, GoogleConfig, GoogleEngine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

const RATE: u32 = 16_000;
/// 20 ms batches, as the batch stage sends when the engine keeps up.
const BATCH: usize = 320;
/// Expected final end vs. the end of the last tone: the emulator works in 20 ms blocks.
const END_TOLERANCE: u64 = 400;

struct Running {
    addr: SocketAddr,
    stats: EmulatorStats,
    _stop: oneshot::Sender<()>,
}

async fn start_emulator(config: EmulatorConfig) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (emulator, stats) = Emulator::new(config);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(emulator.serve(listener, async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stats,
        _stop: stop,
    }
}

fn engine_config(addr: SocketAddr) -> GoogleConfig {
    GoogleConfig {
        endpoint: format!("http://{addr}"),
        auth: GoogleAuth::None,
        vad_gate: false,
        retry_initial_backoff_ms: 10,
        retry_max_backoff_ms: 200,
        ..GoogleConfig::default()
    }
}

fn stream_config(rate: u32) -> StreamConfig {
    StreamConfig {
        sample_rate_hz: rate,
        language_code: "en-US".into(),
        alternative_language_codes: Vec::new(),
        model: None,
        interim_results: true,
        punctuation: true,
        profanity_filter: false,
        word_time_offsets: false,
        phrase_hints: vec!["w1".into()],
    }
}

/// An utterance the audio contains: its transcript and where its last tone ends.
#[derive(Debug, Clone)]
struct Expected {
    transcript: String,
    end_sample: u64,
}

/// Audio being built on the session clock.
#[derive(Default)]
struct Script {
    /// (start sample, samples, speech) runs; gaps between runs are audio the VAD kept back.
    runs: Vec<(u64, Vec<i16>)>,
    position: u64,
    expected: Vec<Expected>,
}

impl Script {
    /// `count` utterances of 2–5 words chosen by `seed`, each followed by 400 ms of silence.
    fn utterances(&mut self, count: usize, seed: u64) {
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        for _ in 0..count {
            let words = 2 + next() % 4;
            let symbols: Vec<u8> = (0..words).map(|_| (next() % 16) as u8).collect();
            let word = u64::from(tones::TONE_MS + tones::GAP_MS) * u64::from(RATE) / 1_000;
            let tone = u64::from(tones::TONE_MS) * u64::from(RATE) / 1_000;
            self.expected.push(Expected {
                transcript: tones::transcript(&symbols),
                end_sample: self.position + (symbols.len() as u64 - 1) * word + tone,
            });
            let mut audio = tones::tone_words(&symbols, RATE);
            audio.extend(tones::silence(400, RATE));
            self.push(audio);
        }
    }

    fn silence(&mut self, ms: u32) {
        self.push(tones::silence(ms, RATE));
    }

    /// Advance the clock without audio (what the VAD gate does with silence).
    fn gap(&mut self, ms: u32) {
        self.position += u64::from(ms) * u64::from(RATE) / 1_000;
    }

    fn push(&mut self, audio: Vec<i16>) {
        let len = audio.len() as u64;
        self.runs.push((self.position, audio));
        self.position += len;
    }

    fn audio_secs(&self) -> f64 {
        self.runs.iter().map(|(_, a)| a.len()).sum::<usize>() as f64 / f64::from(RATE)
    }
}

/// Send a run as 20 ms batches, one per `every` (None: as fast as the engine takes them).
/// A batch is speech when it holds any tone. Returns false when the engine stopped listening.
async fn feed_run(
    audio: &mut EngineAudio,
    start: u64,
    samples: &[i16],
    every: Option<Duration>,
) -> bool {
    let mut next = Instant::now();
    for (i, chunk) in samples.chunks(BATCH).enumerate() {
        let batch = AudioBatch {
            samples: chunk.to_vec(),
            sample_rate_hz: RATE,
            start_sample: start + (i * BATCH) as u64,
            speech: chunk.iter().any(|&s| s != 0),
        };
        if audio.send(EngineInput::Audio(batch)).await.is_err() {
            return false;
        }
        if let Some(every) = every {
            next += every;
            tokio::time::sleep_until(next).await;
        } else if i.is_multiple_of(16) {
            tokio::task::yield_now().await;
        }
    }
    true
}

async fn collect(mut results: EngineResults) -> Vec<Result<EngineResult, SttError>> {
    let mut all = Vec::new();
    while let Some(result) = results.recv().await {
        all.push(result);
    }
    all
}

/// Finals are exactly `expected`, once each, in order, with monotonic times near the truth.
fn check_finals(results: &[Result<EngineResult, SttError>], expected: &[Expected]) {
    let errors: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "errors: {errors:?}");
    let finals: Vec<&EngineResult> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.is_final)
        .collect();
    let got: Vec<&str> = finals.iter().map(|f| f.transcript.as_str()).collect();
    let want: Vec<&str> = expected.iter().map(|e| e.transcript.as_str()).collect();
    assert_eq!(got, want, "finals differ");
    let mut previous_end = 0;
    for (final_, expected) in finals.iter().zip(expected) {
        assert!(
            final_.start_sample >= previous_end,
            "start went back: {final_:?}"
        );
        assert!(
            final_.end_sample > final_.start_sample,
            "empty span: {final_:?}"
        );
        assert!(
            final_.end_sample.abs_diff(expected.end_sample) <= END_TOLERANCE,
            "end {} vs expected {} for {:?}",
            final_.end_sample,
            expected.end_sample,
            expected.transcript
        );
        previous_end = final_.end_sample;
    }
    // Interims never reach back before the final that preceded them.
    let mut last_final_end = 0;
    for result in results.iter().filter_map(|r| r.as_ref().ok()) {
        assert!(
            result.end_sample > last_final_end || result.is_final,
            "stale interim {result:?}"
        );
        if result.is_final {
            last_final_end = result.end_sample;
        }
    }
}

/// Run `script` through one engine session; pause `pauses[i]` (real time) before run `i`.
async fn run_session(
    engine: &GoogleEngine,
    script: &Script,
    every: Option<Duration>,
    pauses: &[(usize, Duration)],
) -> Vec<Result<EngineResult, SttError>> {
    let mut stream = engine.open(stream_config(RATE)).expect("open");
    let collector = tokio::spawn(collect(stream.results));
    for (i, (start, samples)) in script.runs.iter().enumerate() {
        if let Some((_, pause)) = pauses.iter().find(|(at, _)| *at == i) {
            tokio::time::sleep(*pause).await;
        }
        if !feed_run(&mut stream.audio, *start, samples, every).await {
            break;
        }
    }
    drop(stream.audio);
    collector.await.unwrap()
}

/// Run `test` on a current-thread runtime with a Prometheus recorder local to this thread (so
/// tests in parallel do not mix their figures); returns the rendered metrics.
fn with_metrics<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) -> String {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in pipeline::metrics::buckets() {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.into()), &buckets)
            .unwrap();
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(test()));
    handle.render()
}

/// The sum of the series whose line starts with `series` (a name, or a name and labels).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
                || (series.ends_with('}') && line.starts_with(series))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn recognizer_reads_tone_words() {
    for rate in [8_000, 16_000, 44_100, 48_000] {
        let mut audio = tones::tone_words(&[0, 15, 3, 3, 7], rate);
        audio.extend(tones::silence(400, rate));
        audio.extend(tones::tone_words(&[9], rate));
        let mut recognizer = Recognizer::new(rate);
        let mut events = Vec::new();
        for chunk in audio.chunks(333) {
            recognizer.push(chunk, &mut events);
        }
        recognizer.flush(&mut events);
        let finals: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Utterance { symbols, .. } => Some(tones::transcript(symbols)),
                _ => None,
            })
            .collect();
        assert_eq!(finals, ["w0 w15 w3 w3 w7", "w9"], "rate {rate}");
        let words = events
            .iter()
            .filter(|e| matches!(e, Event::Word { .. }))
            .count();
        assert_eq!(words, 6, "one interim per word at {rate}");
    }
}

/// How many real-time streams one core can recognize (run with `--release --ignored`).
#[test]
#[ignore = "a measurement, not a check"]
fn recognizer_throughput() {
    let mut script = Script::default();
    while script.audio_secs() < 60.0 {
        script.utterances(1, script.expected.len() as u64);
    }
    let audio: Vec<i16> = script
        .runs
        .iter()
        .flat_map(|(_, a)| a.iter().copied())
        .collect();
    let clock = Instant::now();
    let mut recognizer = Recognizer::new(RATE);
    let mut events = Vec::new();
    for chunk in audio.chunks(BATCH) {
        recognizer.push(chunk, &mut events);
    }
    let elapsed = clock.elapsed();
    println!(
        "recognizer: {:.0} s of speech-like audio in {:?}: {:.0} real-time streams per core",
        script.audio_secs(),
        elapsed,
        script.audio_secs() / elapsed.as_secs_f64()
    );
}

/// A minute of speech against 3 s streams: dozens of rotations, no word lost or repeated.
#[test]
fn long_session_rotates_without_loss_or_duplicates() {
    let text = with_metrics(long_session);
    let boundary = metric(
        &text,
        r#"voxflow_stt_rotations_total{engine="google",reason="boundary"}"#,
    );
    let forced = metric(
        &text,
        r#"voxflow_stt_rotations_total{engine="google",reason="forced"}"#,
    );
    let opened = metric(&text, "voxflow_stt_upstream_streams_opened_total");
    let replayed = metric(&text, "voxflow_stt_replayed_audio_seconds_sum");
    let replays = metric(&text, "voxflow_stt_replayed_audio_seconds_count");
    assert!(
        boundary >= 20.0,
        "rotations at utterance boundaries: {boundary}"
    );
    assert_eq!(forced, 0.0, "no utterance was cut by a forced rotation");
    // The last rotation may find nothing left to send, and open nothing.
    assert!(
        opened == boundary || opened == boundary + 1.0,
        "{opened} streams for {boundary} rotations"
    );
    assert_eq!(metric(&text, "voxflow_stt_upstream_streams_active"), 0.0);
    assert_eq!(metric(&text, "voxflow_stt_retries_total"), 0.0);
    assert!(replays >= boundary - 1.0, "replays recorded: {replays}");
    println!(
        "rotation metrics: {boundary} boundary rotations, {replayed:.2} s replayed ({:.0} ms per replay); open {:.2} ms mean; final latency {:.0} ms mean",
        replayed * 1_000.0 / replays.max(1.0),
        metric(&text, "voxflow_stt_upstream_open_seconds_sum") * 1_000.0
            / metric(&text, "voxflow_stt_upstream_open_seconds_count").max(1.0),
        metric(&text, "voxflow_stt_final_latency_seconds_sum") * 1_000.0
            / metric(&text, "voxflow_stt_final_latency_seconds_count").max(1.0),
    );
}

async fn long_session() {
    let emulator = start_emulator(EmulatorConfig {
        max_stream_secs: 3,
        audio_timeout_secs: 5,
        ..EmulatorConfig::default()
    })
    .await;
    let engine = GoogleEngine::new(&GoogleConfig {
        rotate_after_secs: 2,
        ..engine_config(emulator.addr)
    })
    .unwrap();
    let mut script = Script::default();
    while script.audio_secs() < 60.0 {
        script.utterances(1, script.expected.len() as u64);
    }
    // Ten times real time.
    let started = Instant::now();
    let results = timeout(
        Duration::from_secs(40),
        run_session(&engine, &script, Some(Duration::from_millis(2)), &[]),
    )
    .await
    .expect("session finished");
    check_finals(&results, &script.expected);
    let stats = &emulator.stats;
    assert_eq!(
        stats.duration_limits(),
        0,
        "the engine rotates before Google's limit"
    );
    assert!(
        stats.streams() >= 20,
        "rotations happened: {} streams",
        stats.streams()
    );
    let replayed = stats.audio_received().as_secs_f64() - script.audio_secs();
    println!(
        "rotation: {:.1} s audio in {:.1} s, {} utterances, {} streams, {:.2} s replayed in all, {:.0} ms per stream",
        script.audio_secs(),
        started.elapsed().as_secs_f64(),
        script.expected.len(),
        stats.streams(),
        replayed,
        replayed * 1_000.0 / (stats.streams() - 1) as f64
    );
}

/// Every stream is aborted with UNAVAILABLE after 1.5 s of audio, mid-utterance or not.
#[test]
fn unavailable_mid_utterance_recovers_without_loss() {
    let text = with_metrics(unavailable_mid_utterance);
    let retries = metric(
        &text,
        r#"voxflow_stt_retries_total{engine="google",code="UNAVAILABLE"}"#,
    );
    assert!(retries >= 5.0, "retries counted by code: {retries}");
    assert_eq!(metric(&text, "voxflow_stt_upstream_streams_active"), 0.0);
    println!(
        "fault metrics: {retries} retries, {:.2} s replayed",
        metric(&text, "voxflow_stt_replayed_audio_seconds_sum")
    );
}

async fn unavailable_mid_utterance() {
    let emulator = start_emulator(EmulatorConfig {
        fail_every: 1,
        fail_after_ms: 1_500,
        ..EmulatorConfig::default()
    })
    .await;
    let engine = GoogleEngine::new(&engine_config(emulator.addr)).unwrap();
    let mut script = Script::default();
    script.utterances(24, 7);
    let results = timeout(
        Duration::from_secs(30),
        run_session(&engine, &script, Some(Duration::from_millis(2)), &[]),
    )
    .await
    .expect("session finished");
    check_finals(&results, &script.expected);
    let faults = emulator.stats.faults();
    assert!(faults >= 5, "faults were injected: {faults}");
    let mut recoveries = emulator.stats.fault_recoveries();
    recoveries.sort();
    println!(
        "faults: {faults} over {:.1} s of audio; recovery (fault to next stream) median {:?}, max {:?}",
        script.audio_secs(),
        recoveries.get(recoveries.len() / 2),
        recoveries.last()
    );
}

/// A TCP relay in front of the emulator whose connections the test can cut, as a network
/// failure or a restarted front end would; counts the connections it was asked for.
struct Relay {
    addr: SocketAddr,
    cut: tokio::sync::broadcast::Sender<()>,
    connections: Arc<AtomicU64>,
}

async fn start_relay(upstream: SocketAddr) -> Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, _) = tokio::sync::broadcast::channel(4);
    let connections = Arc::new(AtomicU64::new(0));
    let (cuts, counted) = (cut.clone(), Arc::clone(&connections));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            let mut cut = cuts.subscribe();
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                // Either side closing, or a cut, drops both sockets.
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = cut.recv() => {}
                }
            });
        }
    });
    Relay {
        addr,
        cut,
        connections,
    }
}

/// The upstream connection is cut three times mid-session: each time the stream fails, a new
/// connection is made, the uncovered audio is replayed, and no final is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_are_replaced_without_loss() {
    let emulator = start_emulator(EmulatorConfig::default()).await;
    let relay = start_relay(emulator.addr).await;
    let engine = GoogleEngine::new(&engine_config(relay.addr)).unwrap();
    let mut script = Script::default();
    script.utterances(24, 11);
    let cut = relay.cut.clone();
    let cutter = tokio::spawn(async move {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = cut.send(());
        }
    });
    let results = timeout(
        Duration::from_secs(30),
        run_session(&engine, &script, Some(Duration::from_millis(2)), &[]),
    )
    .await
    .expect("session finished");
    cutter.await.unwrap();
    check_finals(&results, &script.expected);
    let connections = relay.connections.load(Ordering::Relaxed);
    assert!(
        connections >= 2,
        "a cut connection was replaced by a new one: {connections} connections"
    );
    println!(
        "{connections} upstream connections over {:.1} s of audio with 3 cuts",
        script.audio_secs()
    );
}

/// Audio fed at four times real time, with faults and rotations: what backs up behind a full
/// request stream (while a stream opens, or after a fault) leaves in larger requests, neither
/// lost nor duplicated, and finals keep their positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_audio_loses_nothing_across_faults_and_rotations() {
    let emulator = start_emulator(EmulatorConfig {
        fail_every: 3,
        fail_after_ms: 1_500,
        ..EmulatorConfig::default()
    })
    .await;
    let engine = GoogleEngine::new(&GoogleConfig {
        rotate_after_secs: 2,
        ..engine_config(emulator.addr)
    })
    .unwrap();
    let mut script = Script::default();
    script.utterances(30, 11);
    let results = timeout(
        Duration::from_secs(40),
        run_session(&engine, &script, Some(Duration::from_millis(5)), &[]),
    )
    .await
    .expect("session finished");
    check_finals(&results, &script.expected);
    assert!(emulator.stats.faults() >= 1, "faults were injected");
}

/// A real-time pause longer than Google's audio timeout, then 20 s of non-speech audio: the
/// engine half-closes and reopens upstream, with no error and no audio timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_silence_closes_and_reopens_upstream() {
    let emulator = start_emulator(EmulatorConfig {
        audio_timeout_secs: 2,
        // Streams that open on pre-roll get no response for a while: audio must not wait.
        lazy_headers: true,
        ..EmulatorConfig::default()
    })
    .await;
    let engine = GoogleEngine::new(&GoogleConfig {
        silence_close_ms: 1_000,
        preroll_ms: 300,
        ..engine_config(emulator.addr)
    })
    .unwrap();
    let mut script = Script::default();
    script.utterances(3, 1);
    script.gap(3_000); // gated by the VAD, and 3 s of wall-clock time (below)
    let after_gap = script.runs.len();
    script.utterances(3, 2);
    script.silence(20_000); // non-speech that reaches the engine (gate off)
    script.utterances(3, 3);
    let results = timeout(
        Duration::from_secs(30),
        run_session(
            &engine,
            &script,
            Some(Duration::from_millis(2)),
            &[(after_gap, Duration::from_secs(3))],
        ),
    )
    .await
    .expect("session finished");
    check_finals(&results, &script.expected);
    let stats = &emulator.stats;
    assert_eq!(
        stats.audio_timeouts(),
        0,
        "the engine closed before Google's audio timeout"
    );
    assert!(
        stats.streams() >= 3,
        "closed and reopened: {} streams",
        stats.streams()
    );
    assert_eq!(
        stats.half_closed(),
        stats.streams(),
        "every stream ended cleanly"
    );
    let received = stats.audio_received().as_secs_f64();
    assert!(
        received < 12.0,
        "the silence was not streamed: {received:.1} s received"
    );
    println!(
        "silence: {:.1} s of audio, {received:.1} s streamed in {} streams",
        script.audio_secs(),
        stats.streams()
    );
}

/// A permanent error reaches the session exactly once, and ends the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_is_reported_once() {
    let emulator = start_emulator(EmulatorConfig {
        // The rejection then comes as the call's status, before any response.
        lazy_headers: true,
        ..EmulatorConfig::default()
    })
    .await;
    let engine = GoogleEngine::new(&engine_config(emulator.addr)).unwrap();
    for config in [
        StreamConfig {
            sample_rate_hz: 7_000,
            ..stream_config(7_000)
        },
        StreamConfig {
            language_code: String::new(),
            ..stream_config(RATE)
        },
    ] {
        let rate = config.sample_rate_hz;
        let mut stream = engine.open(config).expect("open");
        let collector = tokio::spawn(collect(stream.results));
        let audio = tones::tone_words(&[1, 2, 3], rate);
        for (i, chunk) in audio.chunks(BATCH).enumerate() {
            let batch = AudioBatch {
                samples: chunk.to_vec(),
                sample_rate_hz: rate,
                start_sample: (i * BATCH) as u64,
                speech: true,
            };
            if stream.audio.send(EngineInput::Audio(batch)).await.is_err() {
                break;
            }
        }
        let results = timeout(Duration::from_secs(10), collector)
            .await
            .unwrap()
            .unwrap();
        match results.as_slice() {
            [Err(SttError::Rejected { code, message })] => {
                assert_eq!(code, "INVALID_ARGUMENT");
                assert!(!message.is_empty());
            }
            other => panic!("expected one rejection, got {other:?}"),
        }
    }
    assert_eq!(
        emulator.stats.rejected(),
        2,
        "no retry of a permanent error"
    );
    assert_eq!(emulator.stats.streams(), 2);
}

/// 300 sessions at once spread over the pool instead of queueing behind one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_use_several_connections() {
    let emulator = start_emulator(EmulatorConfig {
        max_concurrent_streams: 100,
        ..EmulatorConfig::default()
    })
    .await;
    let engine = std::sync::Arc::new(
        GoogleEngine::new(&GoogleConfig {
            connections: 4,
            max_streams_per_connection: 100,
            ..engine_config(emulator.addr)
        })
        .unwrap(),
    );
    let started = Instant::now();
    let mut sessions = tokio::task::JoinSet::new();
    for seed in 0..300u64 {
        let engine = std::sync::Arc::clone(&engine);
        sessions.spawn(async move {
            let mut script = Script::default();
            script.utterances(2, seed);
            let results = run_session(&engine, &script, None, &[]).await;
            check_finals(&results, &script.expected);
        });
    }
    timeout(Duration::from_secs(45), async {
        while let Some(done) = sessions.join_next().await {
            done.expect("session passed");
        }
    })
    .await
    .expect("sessions finished");
    let stats = &emulator.stats;
    assert_eq!(stats.streams(), 300);
    assert!(stats.connections() >= 2, "one connection only");
    assert!(stats.peak_streams_per_connection() <= 100);
    assert_eq!(engine.sessions(), 0, "every session returned its place");
    println!(
        "300 sessions in {:.1} s over {} connections, peak {} streams on one",
        started.elapsed().as_secs_f64(),
        stats.connections(),
        stats.peak_streams_per_connection()
    );
}

/// A minimal OAuth token endpoint: each JWT-bearer grant gets a new token, `token-N`, valid for
/// 21 s, which gcp_auth treats as expiring 20 s early, i.e. after 1 s.
async fn start_token_server() -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}/token", listener.local_addr().unwrap());
    let issued = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&issued);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                let body = loop {
                    let n = match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    request.extend_from_slice(&buf[..n]);
                    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break String::from_utf8_lossy(&request[end + 4..]).into_owned();
                    }
                };
                let response = if body
                    .contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer")
                    && body.contains("assertion=")
                {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    let json = format!(
                        r#"{{"access_token":"token-{n}","expires_in":21,"token_type":"Bearer"}}"#
                    );
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                        json.len()
                    )
                } else {
                    "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (uri, issued)
}

/// A service-account key whose token endpoint is local: new upstream streams (rotations) carry
/// a fresh token once the cached one nears expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_for_new_streams() {
    // A throwaway key, made now (ring cannot generate RSA keys).
    let key = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("openssl, to make a throwaway service-account key");
    assert!(key.status.success(), "openssl genpkey failed");
    let (token_uri, issued) = start_token_server().await;
    let account = serde_json::json!({
        "type": "service_account",
        "project_id": "voxflow-test",
        "private_key": String::from_utf8(key.stdout).unwrap(),
        "client_email": "transcriber@voxflow-test.iam.gserviceaccount.com",
        "token_uri": token_uri,
    });
    let account = CustomServiceAccount::from_json(&account.to_string()).expect("key file");
    let emulator = start_emulator(EmulatorConfig::default()).await;
    let config = GoogleConfig {
        auth: GoogleAuth::Adc,
        rotate_after_secs: 2,
        ..engine_config(emulator.addr)
    };
    let engine = GoogleEngine::with_token_provider(&config, Arc::new(account)).unwrap();
    let mut script = Script::default();
    while script.audio_secs() < 30.0 {
        script.utterances(1, 100 + script.expected.len() as u64);
    }
    let results = timeout(
        Duration::from_secs(30),
        run_session(&engine, &script, Some(Duration::from_millis(2)), &[]),
    )
    .await
    .expect("session finished");
    check_finals(&results, &script.expected);
    let seen = emulator.stats.authorizations();
    let issued = issued.load(Ordering::SeqCst);
    assert!(seen.len() >= 2, "a token was refreshed: {seen:?}");
    assert!(
        seen.iter().all(|t| t.starts_with("Bearer token-")),
        "{seen:?}"
    );
    assert_eq!(
        seen.len() as u64,
        issued,
        "every issued token was used, none fetched per stream"
    );
    assert!(
        emulator.stats.streams() > issued,
        "tokens are cached between streams"
    );
    println!(
        "tokens: {issued} issued for {} streams over 3 s",
        emulator.stats.streams()
    );
}

/// `Finalize` half-closes the upstream stream: a final for everything sent so far comes at once
/// (no end-of-utterance silence needed), and later audio goes to a new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_forces_a_final_and_continues() {
    let emulator = start_emulator(EmulatorConfig::default()).await;
    let engine = GoogleEngine::new(&engine_config(emulator.addr)).unwrap();
    let mut stream = engine.open(stream_config(RATE)).expect("open");
    let first = tones::tone_words(&[1, 2, 3], RATE);
    assert!(feed_run(&mut stream.audio, 0, &first, None).await);
    stream.audio.send(EngineInput::Finalize).await.unwrap();
    let final_ = timeout(Duration::from_secs(5), async {
        loop {
            match stream.results.recv().await {
                Some(Ok(result)) if result.is_final => return result,
                Some(Ok(_interim)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("a final without waiting for silence");
    assert_eq!(final_.transcript, "w1 w2 w3");
    let mut second = tones::tone_words(&[4, 5], RATE);
    second.extend(tones::silence(400, RATE));
    assert!(feed_run(&mut stream.audio, first.len() as u64, &second, None).await);
    drop(stream.audio);
    let rest = timeout(Duration::from_secs(5), collect(stream.results))
        .await
        .unwrap();
    let finals: Vec<_> = rest
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.is_final)
        .collect();
    assert_eq!(finals.len(), 1, "{rest:?}");
    assert_eq!(finals[0].transcript, "w4 w5");
    assert!(finals[0].start_sample >= final_.end_sample);
    assert_eq!(
        emulator.stats.streams(),
        2,
        "a new stream after the finalize"
    );
    assert_eq!(emulator.stats.half_closed(), 2);
}

/// A marker is final as soon as it is recognized, with the utterance before it final first, and
/// its end comes back on the session clock (past audio the VAD kept back) where the emulator
/// recognized it: at most 1.2 blocks (384 samples) before the marker's last sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_are_final_at_once_on_the_session_clock() {
    let emulator = start_emulator(EmulatorConfig::default()).await;
    let engine = GoogleEngine::new(&engine_config(emulator.addr)).unwrap();
    let mut stream = engine.open(stream_config(RATE)).expect("open");
    let mut script = Script::default();
    script.utterances(1, 3);
    script.gap(1_000);
    // Words straight into the marker, off the 20 ms grid.
    let mut audio = tones::silence(7, RATE);
    audio.extend(tones::tone_words(&[4, 5], RATE));
    let words_end =
        script.position + (audio.len() - tones::silence(tones::GAP_MS, RATE).len()) as u64;
    audio.extend(tones::marker(42, RATE));
    let marker_end = script.position + audio.len() as u64;
    script.push(audio);
    script.expected.push(Expected {
        transcript: "w4 w5".into(),
        end_sample: words_end,
    });
    script.expected.push(Expected {
        transcript: tones::marker_transcript(42),
        end_sample: marker_end - 192,
    });
    for (start, samples) in &script.runs {
        assert!(feed_run(&mut stream.audio, *start, samples, None).await);
    }
    // The stream stays open: no silence, no half-close is needed for the marker's final.
    let mut results = Vec::new();
    timeout(Duration::from_secs(5), async {
        while let Some(result) = stream.results.recv().await {
            let marker = matches!(&result, Ok(r) if r.is_final
                && tones::parse_marker(&r.transcript) == Some(42));
            results.push(result);
            if marker {
                return;
            }
        }
        panic!("results ended without the marker: {results:?}");
    })
    .await
    .expect("the marker's final while the stream is open");
    drop(stream.audio);
    results.extend(collect(stream.results).await);
    check_finals(&results, &script.expected);
    let marker = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .find(|r| r.transcript == "marker 42")
        .unwrap();
    assert!(
        marker.end_sample <= marker_end && marker.end_sample + 384 >= marker_end,
        "marker ends at {}, its audio at {marker_end}",
        marker.end_sample
    );
}

/// 1,000 real-time sessions through engine and emulator in this one process (run with
/// `--release --ignored`): every transcript right, and how late finals are.
#[test]
#[ignore = "a load measurement: 10 s of real time, both cores"]
fn thousand_real_time_sessions() {
    let text = with_metrics(|| async {
        let emulator = start_emulator(EmulatorConfig::default()).await;
        let engine = std::sync::Arc::new(
            GoogleEngine::new(&GoogleConfig {
                connections: 10,
                max_streams_per_connection: 100,
                ..engine_config(emulator.addr)
            })
            .unwrap(),
        );
        let started = Instant::now();
        let mut sessions = tokio::task::JoinSet::new();
        for seed in 0..1_000u64 {
            let engine = std::sync::Arc::clone(&engine);
            sessions.spawn(async move {
                let mut script = Script::default();
                script.utterances(8, seed);
                // Stagger starts over one batch period.
                tokio::time::sleep(Duration::from_micros(seed * 20)).await;
                let every = Some(Duration::from_millis(20));
                let results = run_session(&engine, &script, every, &[]).await;
                check_finals(&results, &script.expected);
            });
        }
        while let Some(done) = sessions.join_next().await {
            done.expect("session passed");
        }
        println!(
            "1000 sessions: {:.1} s wall, {} connections, peak {} streams on one",
            started.elapsed().as_secs_f64(),
            emulator.stats.connections(),
            emulator.stats.peak_streams_per_connection()
        );
    });
    println!(
        "final latency mean {:.0} ms (the emulator's 300 ms end-of-utterance silence included); first result mean {:.0} ms",
        metric(&text, "voxflow_stt_final_latency_seconds_sum") * 1_000.0
            / metric(&text, "voxflow_stt_final_latency_seconds_count").max(1.0),
        metric(&text, "voxflow_stt_first_result_seconds_sum") * 1_000.0
            / metric(&text, "voxflow_stt_first_result_seconds_count").max(1.0),
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("voxflow_stt_final_latency_seconds_bucket"))
    {
        println!("{line}");
    }
}
