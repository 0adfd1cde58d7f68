//! Google Cloud Speech-to-Text v1 `StreamingRecognize` engine, over gRPC on h2 ([`grpc`]).
//!
//! Consumes a session's [`EngineInput`](pipeline::EngineInput)s and produces
//! [`EngineResult`](pipeline::EngineResult)s on the session clock. Per session one task drives a
//! sequence of upstream streams, one at a time, so that a session may last hours although Google
//! ends a stream after ~305 s and after ~10 s without audio:
//!
//! - it keeps a replay buffer of the audio not yet covered by a final (bounded: a final or a
//!   half-close empties it, and a stream lives at most `rotate_after_secs`);
//! - it replaces the stream before `rotate_after_secs` (from half of it on, right after a final,
//!   replaying the uncovered audio; at the deadline by half-closing, which makes Google finalize
//!   everything sent);
//! - on a transient error it reopens with exponential backoff and jitter and replays;
//! - after `silence_close_ms` without speech it half-closes, and reopens with pre-roll when
//!   speech resumes;
//! - `Finalize` half-closes the stream (Google v1 has no finalize request) and later audio goes
//!   to a new stream.
//!
//! Result times (`result_end_time`, relative to the stream's audio) are mapped back through the
//! record of which session positions each stream received, so gaps left by the VAD gate and
//! replays do not shift them; finals ending at or before the last final sent are dropped, so
//! replayed audio never yields a duplicate. Streams spread over a pool of HTTP/2 connections.

mod config;
mod grpc;
mod session;
#[cfg(test)]
mod tests;
mod transport;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use googleapis_tonic_google_cloud_speech_v1::google::cloud::speech::v1::StreamingRecognizeRequest;
use http::{HeaderValue, Uri};
use pipeline::metrics::{self, Gauge, Histogram};
use pipeline::{EngineResults, StreamConfig, SttEngine, SttError, SttStream};
use tonic::Status;

pub use config::{GoogleAuth, GoogleConfig};
/// For credentials obtained other than through ADC (see [`GoogleEngine::with_token_provider`]).
pub use gcp_auth::{CustomServiceAccount, TokenProvider};

/// The `engine` metric label.
pub const ENGINE: &str = "google";
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const RESULT_QUEUE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GoogleError {
    #[error("stt.google.endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("stt.google.{field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

/// Validated settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub rotate_after: Duration,
    pub silence_close: Duration,
    pub preroll: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_retries: u32,
    pub open_timeout: Duration,
    pub drain_timeout: Duration,
    pub model: String,
    pub use_enhanced: bool,
    pub write_coalesce: Duration,
}

/// The Google engine, shared by all sessions.
pub struct GoogleEngine {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub settings: Settings,
    vad_gate: bool,
    endpoint: Uri,
    connections: usize,
    capacity: usize,
    /// Built on first use (TLS setup reads the system's root certificates).
    pool: OnceLock<Result<Pool, String>>,
    sessions: AtomicUsize,
    /// Where the search for the least-loaded connection starts, so ties (and a retry after a
    /// failed connection) move on to the next one.
    next: AtomicUsize,
    auth: Auth,
}

struct Pool {
    target: grpc::Target,
    connections: Vec<grpc::Connection>,
}

enum Auth {
    None,
    Adc(tokio::sync::OnceCell<Arc<dyn gcp_auth::TokenProvider>>),
}

impl GoogleEngine {
    /// Validate `config` (no I/O: connections open on first use).
    ///
    /// # Errors
    /// A bad endpoint or an out-of-range setting.
    pub fn new(config: &GoogleConfig) -> Result<GoogleEngine, GoogleError> {
        GoogleEngine::build(config, None)
    }

    fn build(
        config: &GoogleConfig,
        provider: Option<Arc<dyn TokenProvider>>,
    ) -> Result<GoogleEngine, GoogleError> {
        let bad_endpoint = |reason: &str| GoogleError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason: reason.to_string(),
        };
        let uri: Uri = config
            .endpoint
            .parse()
            .map_err(|_| bad_endpoint("not a URI"))?;
        let host = uri
            .host()
            .ok_or_else(|| bad_endpoint("no host"))?
            .to_string();
        if host.is_empty() {
            return Err(bad_endpoint("no host"));
        }
        match uri.scheme_str() {
            Some("https" | "http") => {}
            _ => {
                return Err(bad_endpoint(
                    "the scheme must be https (or http for an emulator)",
                ));
            }
        }
        if !matches!(uri.path(), "" | "/") {
            return Err(bad_endpoint("must not have a path"));
        }
        let invalid = |field, reason| Err(GoogleError::Invalid { field, reason });
        if !(1..=1_024).contains(&config.connections) {
            return invalid("connections", "must be between 1 and 1024");
        }
        if !(1..=10_000).contains(&config.max_streams_per_connection) {
            return invalid("max_streams_per_connection", "must be between 1 and 10000");
        }
        if !(1..=300).contains(&config.rotate_after_secs) {
            return invalid(
                "rotate_after_secs",
                "must be between 1 and 300 (Google ends streams at 305 s)",
            );
        }
        if !(100..10_000).contains(&config.silence_close_ms) {
            return invalid(
                "silence_close_ms",
                "must be at least 100 and below 10000 (Google's audio timeout)",
            );
        }
        if config.preroll_ms > 5_000 {
            return invalid("preroll_ms", "must be at most 5000");
        }
        if config.write_coalesce_us > 20_000 {
            return invalid("write_coalesce_us", "must be at most 20000 (one frame)");
        }
        if config.retry_initial_backoff_ms == 0
            || config.retry_initial_backoff_ms > config.retry_max_backoff_ms
        {
            return invalid(
                "retry_initial_backoff_ms",
                "must be positive and at most retry_max_backoff_ms",
            );
        }
        if config.open_timeout_ms == 0 || config.drain_timeout_ms == 0 {
            return invalid(
                "open_timeout_ms",
                "open_timeout_ms and drain_timeout_ms must be positive",
            );
        }
        let settings = Settings {
            rotate_after: Duration::from_secs(config.rotate_after_secs),
            silence_close: Duration::from_millis(config.silence_close_ms),
            preroll: Duration::from_millis(config.preroll_ms),
            retry_initial: Duration::from_millis(config.retry_initial_backoff_ms),
            retry_max: Duration::from_millis(config.retry_max_backoff_ms),
            max_retries: config.max_retries,
            open_timeout: Duration::from_millis(config.open_timeout_ms),
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            model: config.model.clone(),
            use_enhanced: config.use_enhanced,
            write_coalesce: Duration::from_micros(config.write_coalesce_us),
        };
        let auth = match (provider, config.auth) {
            (Some(provider), _) => Auth::Adc(tokio::sync::OnceCell::new_with(Some(provider))),
            (None, GoogleAuth::Adc) => Auth::Adc(tokio::sync::OnceCell::new()),
            (None, GoogleAuth::None) => Auth::None,
        };
        Ok(GoogleEngine {
            shared: Arc::new(Shared {
                settings,
                vad_gate: config.vad_gate,
                endpoint: uri,
                connections: config.connections,
                capacity: config.connections * config.max_streams_per_connection,
                pool: OnceLock::new(),
                sessions: AtomicUsize::new(0),
                next: AtomicUsize::new(0),
                auth,
            }),
        })
    }

    /// Like [`GoogleEngine::new`], but tokens come from `provider` (e.g. a
    /// [`CustomServiceAccount`] read from a secret store) whatever `auth` says.
    ///
    /// # Errors
    /// As [`GoogleEngine::new`].
    pub fn with_token_provider(
        config: &GoogleConfig,
        provider: Arc<dyn TokenProvider>,
    ) -> Result<GoogleEngine, GoogleError> {
        GoogleEngine::build(config, Some(provider))
    }

    /// Sessions streaming now.
    pub fn sessions(&self) -> usize {
        self.shared.sessions.load(Ordering::Relaxed)
    }
}

impl SttEngine for GoogleEngine {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn vad_gate(&self) -> bool {
        self.shared.vad_gate
    }

    fn open(&self, config: StreamConfig) -> Result<SttStream, SttError> {
        let shared = Arc::clone(&self.shared);
        if shared.sessions.fetch_add(1, Ordering::Relaxed) >= shared.capacity {
            shared.sessions.fetch_sub(1, Ordering::Relaxed);
            return Err(SttError::Overloaded(format!(
                "all {} Google streams are in use",
                shared.capacity
            )));
        }
        let slot = SessionSlot(Arc::clone(&shared));
        let (results_tx, results_rx) = EngineResults::channel(RESULT_QUEUE);
        let audio = session::open(shared, slot, &config, results_tx);
        Ok(SttStream {
            audio,
            results: results_rx,
        })
    }
}

/// A session's share of the engine's capacity, returned when its task ends.
pub(crate) struct SessionSlot(Arc<Shared>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upstream stream's place on a connection.
pub(crate) struct StreamSlot {
    streams: Arc<AtomicUsize>,
    active: Gauge,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
        self.active.decrement(1.0);
    }
}

/// Resolves to the response stream once the server has sent response headers.
pub(crate) type PendingResponses =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<grpc::Responses, Status>> + Send>>;

/// A started upstream stream: where requests go, where responses will come from.
pub(crate) struct Opened {
    pub requests: grpc::Requests,
    pub responses: PendingResponses,
    pub slot: StreamSlot,
}

impl Shared {
    fn pool(&self) -> Result<&Pool, Status> {
        let pool = self.pool.get_or_init(|| {
            let target = grpc::Target::new(
                &self.endpoint,
                self.settings.open_timeout,
                self.settings.write_coalesce,
            )?;
            Ok(Pool {
                target,
                connections: (0..self.connections)
                    .map(|_| grpc::Connection::new())
                    .collect(),
            })
        });
        pool.as_ref()
            .map_err(|error| Status::unavailable(format!("upstream setup: {error}")))
    }

    /// Take a place on the least-loaded connection.
    fn pick(&self) -> Result<(&Pool, &grpc::Connection, StreamSlot), Status> {
        let pool = self.pool()?;
        let connections = &pool.connections;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let connection = (0..connections.len())
            .filter_map(|i| connections.get((start + i) % connections.len()))
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))
            .ok_or_else(|| Status::unavailable("no connections"))?;
        connection.streams.fetch_add(1, Ordering::Relaxed);
        let active = metrics::engine::upstream_active(ENGINE);
        active.increment(1.0);
        let slot = StreamSlot {
            streams: Arc::clone(&connection.streams),
            active,
        };
        Ok((pool, connection, slot))
    }

    async fn authorization(&self) -> Result<Option<HeaderValue>, Status> {
        let Auth::Adc(provider) = &self.auth else {
            return Ok(None);
        };
        let provider = provider
            .get_or_try_init(gcp_auth::provider)
            .await
            .map_err(|error| Status::unauthenticated(format!("no Google credentials: {error}")))?;
        // gcp_auth caches the token and fetches a new one shortly before it expires.
        let token = provider
            .token(&[SCOPE])
            .await
            .map_err(|error| Status::unavailable(format!("fetching a token: {error}")))?;
        let mut value = HeaderValue::try_from(format!("Bearer {}", token.as_str()))
            .map_err(|_| Status::unauthenticated("the access token is not a valid header"))?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// Start an upstream stream whose first request is `first` (the streaming config).
    ///
    /// The response headers are not awaited here: a server may hold them until it has a first
    /// result, so audio must flow before they arrive. `open_latency` records when they do.
    pub(crate) async fn open_upstream(
        &self,
        first: &StreamingRecognizeRequest,
        open_latency: Histogram,
    ) -> Result<Opened, Status> {
        let started = tokio::time::Instant::now();
        let authorization = self.authorization().await?;
        let (pool, connection, slot) = self.pick()?;
        let (requests, response) = connection.open(&pool.target, authorization, first).await?;
        let responses = Box::pin(async move {
            let responses = grpc::responses(response).await;
            open_latency.record(started.elapsed().as_secs_f64());
            responses
        });
        Ok(Opened {
            requests,
            responses,
            slot,
        })
    }
}

/// The gRPC status name, e.g. `INVALID_ARGUMENT`: a closed set, used as the `code` label.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Whether a new stream may succeed where this one failed. OUT_OF_RANGE is what Google returns
/// for its stream-duration limit and audio timeout; UNKNOWN and CANCELLED are what a reset
/// connection looks like.
pub fn is_transient(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::OutOfRange
    )
}
