use serde::{Deserialize, Serialize};

/// How the engine authenticates to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoogleAuth {
    /// Application Default Credentials: `GOOGLE_APPLICATION_CREDENTIALS` (a service-account key
    /// file), gcloud's application-default credentials, the GCE/GKE metadata server, or the
    /// `gcloud` CLI, in that order. Tokens are cached and refreshed before they expire.
    Adc,
    /// No credentials: for an emulator on a plaintext `http://` endpoint.
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoogleConfig {
    /// `https://speech.googleapis.com`, a regional endpoint (`https://eu-speech.googleapis.com`),
    /// or `http://HOST:PORT` (plaintext HTTP/2) for an emulator. TLS uses rustls with the system
    /// and webpki roots.
    pub endpoint: String,
    /// `adc` (Application Default Credentials) or `none` (emulators). With `adc` and no
    /// credentials found, every stream fails with UNAUTHENTICATED and the session gets an error.
    pub auth: GoogleAuth,
    /// Keep non-speech (beyond the VAD's pre-roll and hangover) from Google: silence is neither
    /// billed nor able to trip Google's audio timeout.
    pub vad_gate: bool,
    /// HTTP/2 connections to the endpoint. Each upstream stream goes to the least-loaded one,
    /// so `connections × max_streams_per_connection` sessions can stream at once without
    /// queueing behind one connection's stream limit.
    pub connections: usize,
    /// Streams per connection (Google's front ends take about 100). Sessions beyond
    /// `connections × max_streams_per_connection` are refused as overloaded (close 1013) rather
    /// than queued; `voxflow_sessions_refused_total` moves.
    pub max_streams_per_connection: usize,
    /// Replace the upstream stream before Google's ~305 s limit: no later than this, and from
    /// half of it on right after a final (an utterance boundary), replaying the audio not yet
    /// covered by a final. Also bounds the replay buffer (see `voxflow_stt_replayed_audio_seconds`).
    pub rotate_after_secs: u64,
    /// Half-close the upstream stream after this much audio (or wall-clock time) without speech,
    /// so silence is not billed and cannot trip Google's 10 s audio timeout; a new stream opens,
    /// with `preroll_ms` of audio, when speech resumes. Must stay below 10 000.
    pub silence_close_ms: u64,
    /// Audio kept while no upstream stream is open, sent first when speech resumes so the
    /// start of the first word is not cut.
    pub preroll_ms: u64,
    /// First wait before retrying after a transient error (UNAVAILABLE, INTERNAL,
    /// RESOURCE_EXHAUSTED, ABORTED, DEADLINE_EXCEEDED, connection reset); doubled per attempt,
    /// with jitter. Audio keeps being buffered meanwhile (bounded, see `rotate_after_secs`).
    pub retry_initial_backoff_ms: u64,
    /// Longest wait between retries.
    pub retry_max_backoff_ms: u64,
    /// Consecutive failed attempts (without a final in between) before the session ends with
    /// `engine_unavailable`. `voxflow_stt_upstream_retries_total{code}` counts every retry.
    pub max_retries: u32,
    /// Time allowed to obtain a token and open a stream (connect, TLS, response headers);
    /// beyond it the attempt counts as DEADLINE_EXCEEDED and is retried.
    pub open_timeout_ms: u64,
    /// Time allowed, after half-closing a stream, for Google's last finals; beyond it the
    /// stream is abandoned and its uncovered audio replayed into a new one.
    pub drain_timeout_ms: u64,
    /// Model for sessions that name none (`latest_long`, `phone_call`, …); empty = Google's
    /// default for the language.
    pub model: String,
    /// Ask for the enhanced variant of the model where one exists (billed at a higher rate).
    pub use_enhanced: bool,
    /// Hold a busy gRPC connection's socket writes for at most this long after its previous
    /// write, so requests from many streams leave in one system call. A connection carrying
    /// fewer requests than one per window writes each at once (no added latency); a busy one
    /// makes a request wait at most this long (rounded up to the timer's millisecond).
    /// 0 = write on every HTTP/2 flush.
    pub write_coalesce_us: u64,
}

impl Default for GoogleConfig {
    fn default() -> Self {
        GoogleConfig {
            endpoint: "https://speech.googleapis.com".into(),
            auth: GoogleAuth::Adc,
            vad_gate: true,
            connections: 4,
            max_streams_per_connection: 100,
            rotate_after_secs: 240,
            silence_close_ms: 5_000,
            preroll_ms: 500,
            retry_initial_backoff_ms: 100,
            retry_max_backoff_ms: 5_000,
            max_retries: 8,
            open_timeout_ms: 10_000,
            drain_timeout_ms: 10_000,
            model: String::new(),
            use_enhanced: false,
            write_coalesce_us: 1_000,
        }
    }
}
