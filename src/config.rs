//! Configuration: one TOML file describes the pipeline; every key can be overridden by an
//! environment variable (`VOXFLOW_SERVER__LISTEN=0.0.0.0:8080`); nothing is required, the
//! embedded defaults run. [`Config::validate`] turns the raw file into typed [`Settings`]
//! without I/O, naming the bad key when it refuses.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use pipeline::{EdgeSettings, Encoding, OverflowPolicy};
use serde::{Deserialize, Serialize};
use stages::batch::{BatchConfig, BatchSettings};
use stages::stt::config::SttConfig;
use stages::vad::{VadConfig, VadSettings};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub metrics: MetricsConfig,
    pub shutdown: ShutdownConfig,
    pub session: SessionConfig,
    pub ingress: IngressConfig,
    pub egress: EgressConfig,
    pub edges: EdgesConfig,
    pub vad: VadConfig,
    pub batch: BatchConfig,
    pub stt: SttConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the WebSocket listener (`ws://LISTEN/v1/stream`, `wss://` with TLS).
    pub listen: String,
    pub tls: TlsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            tls: TlsConfig::default(),
        }
    }
}

/// `wss://` served directly. Both paths empty: plain `ws://` (behind a terminating proxy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_path: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: String,
    /// How often the two files are checked for changes; a changed pair is loaded for new
    /// connections (SIGHUP loads at once). Running sessions keep their connection.
    pub reload_interval_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_path: String::new(),
            key_path: String::new(),
            reload_interval_ms: 5_000,
        }
    }
}

/// Admission control: what one client, one key, or everyone together may hold.
/// Every refusal is counted in `voxflow_sessions_refused_total{reason}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Sessions at once, over all clients; beyond it upgrades get HTTP 503 (`capacity`).
    pub max_sessions: usize,
    /// Sessions at once from one source IP address; beyond it HTTP 429 (`per_ip`).
    pub max_sessions_per_ip: usize,
    /// A session is ended after this long: its finals are sent, then `closed` with reason
    /// `max_duration` and close 1013 (reconnect to go on).
    pub max_session_duration_ms: u64,
    /// A connection must complete its TLS handshake and HTTP upgrade request within this long,
    /// or it is dropped (`handshake_timeout`): slow or silent clients cannot hold sockets.
    pub handshake_timeout_ms: u64,
    /// The wait suggested to refused clients (`Retry-After`, `retry_after_ms`).
    pub retry_after_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: 1_000,
            max_sessions_per_ip: 50,
            max_session_duration_ms: 4 * 3_600_000,
            handshake_timeout_ms: 5_000,
            retry_after_ms: 1_000,
        }
    }
}

/// How a credential is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Anyone may connect (credentials, if sent, are still checked).
    None,
    /// A static key from `auth.api_keys`.
    ApiKey,
    /// A JWT bearer token checked against `auth.jwt`.
    Jwt,
}

/// Who may open sessions. Credentials come from `Authorization: Bearer …`, the `token` query
/// parameter, or a `bearer.…` entry of `Sec-WebSocket-Protocol` (browsers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accepted methods; a credential passes if any listed method accepts it.
    #[serde(deserialize_with = "one_or_many")]
    pub mode: Vec<AuthMode>,
    /// Browser `Origin` values allowed to connect (`https://app.example.com`); empty = any.
    /// Requests without an `Origin` header (non-browser clients) are not affected.
    pub allowed_origins: Vec<String>,
    pub api_keys: Vec<ApiKeyConfig>,
    pub jwt: JwtConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: vec![AuthMode::None],
            allowed_origins: Vec::new(),
            api_keys: Vec::new(),
            jwt: JwtConfig::default(),
        }
    }
}

/// One static API key. Only its SHA-256 is stored: `printf %s KEY | sha256sum`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A name for logs (never the key).
    pub id: String,
    /// Lowercase hex SHA-256 of the key.
    pub sha256: String,
    /// Sessions this key may hold at once (0 = only the global limits); beyond it HTTP 429.
    #[serde(default)]
    pub max_sessions: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// File holding the HS256 shared secret (empty: HS256 off).
    pub hs256_secret_file: String,
    /// JWKS file with the RS256/ES256 public keys (empty: RS256/ES256 off).
    pub jwks_file: String,
    /// Accepted `aud` values; a token must name one. Required when `jwt` is a mode.
    pub audiences: Vec<String>,
    /// Accepted `iss` values; a token must name one. Required when `jwt` is a mode.
    pub issuers: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Sessions one `sub` may hold at once (0 = only the global limits).
    pub max_sessions_per_subject: usize,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            hs256_secret_file: String::new(),
            jwks_file: String::new(),
            audiences: Vec::new(),
            issuers: Vec::new(),
            leeway_secs: 30,
            max_sessions_per_subject: 0,
        }
    }
}

/// `mode = "jwt"` or `mode = ["api_key", "jwt"]` (environment variables give the first form).
fn one_or_many<'de, D>(deserializer: D) -> Result<Vec<AuthMode>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(AuthMode),
        Many(Vec<AuthMode>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(mode) => vec![mode],
        OneOrMany::Many(modes) => modes,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the listener serving `/metrics`, `/healthz` and `/readyz`.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGINT/SIGTERM, how long running sessions may take to send their last finals before
    /// they are cut. New sessions are refused from the signal on.
    pub grace_period_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period_ms: 10_000,
        }
    }
}

/// What a session uses when its `start` message (or URL) does not say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub encoding: Encoding,
    pub sample_rate_hertz: u32,
    pub audio_channel_count: u16,
    /// Refuse audio before a `start` message (close 1008) instead of assuming the defaults above.
    pub require_start: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            encoding: Encoding::Linear16,
            sample_rate_hertz: 16_000,
            audio_channel_count: 1,
            require_start: false,
        }
    }
}

/// Two 20 ms frames of 16 kHz LINEAR16 (898 bytes each in JSON/base64) per read when several
/// wait. 1024 measured 4-10% more CPU at 1,000 clients, and more latency and memory with it.
pub const DEFAULT_READ_BUFFER_BYTES: usize = 2048;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Largest WebSocket message accepted; larger ones end the session with close 1009.
    /// 1 MiB holds ~32 s of 16 kHz LINEAR16 in base64.
    pub max_message_bytes: usize,
    /// A session with no message at all (audio or keepalive) for this long is closed (1008).
    pub idle_timeout_ms: u64,
    /// Audio a client may send ahead of real time; beyond it ingress stops reading until real
    /// time catches up (TCP backpressure; nothing is dropped). 0: no pacing (clients may
    /// upload faster than real time, bounded only by the queues).
    pub max_burst_ms: u64,
    /// Most bytes one socket read takes: each session's read buffer. It grows only for a frame
    /// larger than itself, and shrinks back after it.
    pub read_buffer_bytes: usize,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            max_message_bytes: 1 << 20,
            idle_timeout_ms: 30_000,
            max_burst_ms: 0,
            read_buffer_bytes: DEFAULT_READ_BUFFER_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// A write to the client that takes longer than this ends the session: the client is gone
    /// or reads too slowly. Counted in `voxflow_stage_errors_total{stage="egress",error="socket"}`.
    pub write_timeout_ms: u64,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            write_timeout_ms: 10_000,
        }
    }
}

/// One edge: the input queue of the named stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Items the queue holds. Each queued item is latency; a full queue blocks the sender.
    pub capacity: usize,
    /// How long a sender waits on a full queue before the overflow policy applies. The wait is
    /// recorded in `voxflow_stage_send_blocked_seconds`.
    pub send_timeout_ms: u64,
    /// `block` (wait on: backpressure reaches the client's socket, nothing is lost),
    /// `drop_oldest` / `drop_newest` (audio lost, counted, the client warned), or `close`
    /// (the session ends with `overloaded`, close 1013).
    pub overflow: OverflowPolicy,
}

impl EdgeConfig {
    fn new(capacity: usize) -> EdgeConfig {
        EdgeConfig {
            capacity,
            send_timeout_ms: 100,
            overflow: OverflowPolicy::Block,
        }
    }

    /// An edge whose stage may run in its feeder's task: capacity 0 (no queue) allowed.
    fn validate_fusable(&self, name: &str) -> Result<EdgeSettings, ConfigError> {
        if self.capacity > 4_096 {
            return Err(ConfigError::Invalid(format!(
                "edges.{name}.capacity must be 0..=4096, got {}",
                self.capacity
            )));
        }
        self.settings(name)
    }

    /// The egress edge: 0 means egress reads the engine's own result queue, where no policy of
    /// this edge can apply, so only `block` is accepted with it.
    fn validate_egress(&self) -> Result<EdgeSettings, ConfigError> {
        if self.capacity > 4_096 {
            return Err(ConfigError::Invalid(format!(
                "edges.egress.capacity must be 0..=4096, got {}",
                self.capacity
            )));
        }
        if self.capacity == 0 && self.overflow != OverflowPolicy::Block {
            return Err(ConfigError::Invalid(format!(
                "edges.egress.overflow must be \"block\" when edges.egress.capacity is 0 (egress \
                 then reads the engine's results directly), got \"{}\"",
                self.overflow.as_str()
            )));
        }
        self.settings("egress")
    }

    fn settings(&self, name: &str) -> Result<EdgeSettings, ConfigError> {
        if self.send_timeout_ms > 60_000 {
            return Err(ConfigError::Invalid(format!(
                "edges.{name}.send_timeout_ms must be at most 60000"
            )));
        }
        Ok(EdgeSettings {
            capacity: self.capacity,
            send_timeout: Duration::from_millis(self.send_timeout_ms),
            overflow: self.overflow,
        })
    }
}

/// The queues in front of each stage, in graph order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgesConfig {
    pub decode: EdgeConfig,
    pub resample: EdgeConfig,
    pub vad: EdgeConfig,
    pub batch: EdgeConfig,
    pub stt: EdgeConfig,
    pub egress: EdgeConfig,
}

impl Default for EdgesConfig {
    fn default() -> Self {
        EdgesConfig {
            // 0: ingress runs decode (and every stage up to the engine) itself; see `Edges`.
            decode: EdgeConfig::new(0),
            resample: EdgeConfig::new(0),
            vad: EdgeConfig::new(0),
            // 0: the VAD's task batches, and hands batches to the engine itself.
            batch: EdgeConfig::new(0),
            stt: EdgeConfig::new(0),
            // 0: egress reads the engine's results itself (no relay task, no second queue).
            egress: EdgeConfig::new(0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Validated edge settings. An edge of capacity 0 has no queue: its stage runs in the task
/// that feeds it, and the send timeout and policy apply to waiting for the stage after it. A
/// queue is worth having in front of a synchronous stage only to watch that stage on its own:
/// otherwise it adds a task wake-up per frame and buys nothing (neither side waits on I/O).
/// In front of batch and stt, a queue lets bursts wait there rather than in the socket.
#[derive(Debug, Clone, Copy)]
pub struct Edges {
    pub decode: EdgeSettings,
    pub resample: EdgeSettings,
    pub vad: EdgeSettings,
    pub batch: EdgeSettings,
    pub stt: EdgeSettings,
    /// Egress always runs in a task of its own (it writes to the socket); capacity 0 has it read
    /// the engine's result queue directly.
    pub egress: EdgeSettings,
}

/// Validated admission limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_sessions_per_ip: usize,
    pub max_session_duration: Duration,
    pub handshake_timeout: Duration,
    pub retry_after: Duration,
}

/// Everything the server needs, typed and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `None`: plain `ws://`.
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub metrics_listen: SocketAddr,
    pub grace_period: Duration,
    pub session: SessionConfig,
    pub max_message_bytes: usize,
    pub read_buffer_bytes: usize,
    pub idle_timeout: Duration,
    /// `None`: no pacing.
    pub max_burst: Option<Duration>,
    pub write_timeout: Duration,
    pub edges: Edges,
    pub vad: VadSettings,
    pub batch: BatchSettings,
    pub stt: SttConfig,
}

impl Config {
    /// Embedded defaults, then `file` if given, then `VOXFLOW_*` environment variables.
    ///
    /// # Errors
    /// When the file cannot be read or a key is unknown or of the wrong type; the message names it.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        // VOXFLOW_LOG, VOXFLOW_LOG_FORMAT and VOXFLOW_WORKER_THREADS configure the process
        // (logging, runtime), not the pipeline.
        figment = figment.merge(
            Env::prefixed("VOXFLOW_")
                .ignore(&["LOG", "LOG_FORMAT", "WORKER_THREADS"])
                .split("__"),
        );
        figment
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// Parse TOML text (no defaults from the environment): for tests and `config/` checks.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// # Errors
    /// The first invalid value, by key.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let addr = |key: &str, value: &str| {
            value
                .parse::<SocketAddr>()
                .map_err(|e| ConfigError::Invalid(format!("{key} = {value:?}: {e}")))
        };
        let rate = self.stt.sample_rate_hz;
        if !(8_000..=48_000).contains(&rate) {
            return Err(ConfigError::Invalid(format!(
                "stt.sample_rate_hz must be 8000..=48000, got {rate}"
            )));
        }
        // Checked whichever engine is chosen, so a bad value is named before it matters.
        self.stt
            .whisper
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let session = &self.session;
        if !session.encoding.supports_rate(session.sample_rate_hertz) {
            return Err(ConfigError::Invalid(format!(
                "session.sample_rate_hertz {} is not valid for {}",
                session.sample_rate_hertz,
                session.encoding.as_str()
            )));
        }
        if !(1..=2).contains(&session.audio_channel_count) {
            return Err(ConfigError::Invalid(
                "session.audio_channel_count must be 1 or 2".into(),
            ));
        }
        if !(1_024..=64 << 20).contains(&self.ingress.max_message_bytes) {
            return Err(ConfigError::Invalid(
                "ingress.max_message_bytes must be 1 KiB..=64 MiB".into(),
            ));
        }
        if !(256..=1 << 20).contains(&self.ingress.read_buffer_bytes) {
            return Err(ConfigError::Invalid(
                "ingress.read_buffer_bytes must be 256..=1048576".into(),
            ));
        }
        let positive = |key: &str, ms: u64| {
            if ms == 0 {
                Err(ConfigError::Invalid(format!("{key} must be positive")))
            } else {
                Ok(Duration::from_millis(ms))
            }
        };
        let tls = &self.server.tls;
        let tls = match (tls.cert_path.is_empty(), tls.key_path.is_empty()) {
            (true, true) => None,
            (false, false) => {
                positive("server.tls.reload_interval_ms", tls.reload_interval_ms)?;
                Some(tls.clone())
            }
            _ => {
                return Err(ConfigError::Invalid(
                    "server.tls needs both cert_path and key_path (or neither)".into(),
                ));
            }
        };
        let limits = &self.limits;
        let count = |key: &str, n: usize| {
            if n == 0 {
                Err(ConfigError::Invalid(format!("{key} must be positive")))
            } else {
                Ok(n)
            }
        };
        let limits = Limits {
            max_sessions: count("limits.max_sessions", limits.max_sessions)?,
            max_sessions_per_ip: count("limits.max_sessions_per_ip", limits.max_sessions_per_ip)?,
            max_session_duration: positive(
                "limits.max_session_duration_ms",
                limits.max_session_duration_ms,
            )?,
            handshake_timeout: positive(
                "limits.handshake_timeout_ms",
                limits.handshake_timeout_ms,
            )?,
            retry_after: Duration::from_millis(limits.retry_after_ms),
        };
        self.validate_auth()?;
        Ok(Settings {
            listen: addr("server.listen", &self.server.listen)?,
            tls,
            limits,
            auth: self.auth.clone(),
            metrics_listen: addr("metrics.listen", &self.metrics.listen)?,
            grace_period: Duration::from_millis(self.shutdown.grace_period_ms),
            session: self.session.clone(),
            max_message_bytes: self.ingress.max_message_bytes,
            read_buffer_bytes: self.ingress.read_buffer_bytes,
            idle_timeout: positive("ingress.idle_timeout_ms", self.ingress.idle_timeout_ms)?,
            max_burst: (self.ingress.max_burst_ms > 0)
                .then(|| Duration::from_millis(self.ingress.max_burst_ms)),
            write_timeout: positive("egress.write_timeout_ms", self.egress.write_timeout_ms)?,
            edges: Edges {
                decode: self.edges.decode.validate_fusable("decode")?,
                resample: self.edges.resample.validate_fusable("resample")?,
                vad: self.edges.vad.validate_fusable("vad")?,
                batch: self.edges.batch.validate_fusable("batch")?,
                stt: self.edges.stt.validate_fusable("stt")?,
                egress: self.edges.egress.validate_egress()?,
            },
            vad: self
                .vad
                .validate(rate)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            batch: self
                .batch
                .validate(rate)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            stt: self.stt.clone(),
        })
    }
}

impl Config {
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if auth.mode.is_empty() {
            return invalid("auth.mode must name at least one of none, api_key, jwt".into());
        }
        if auth.mode.contains(&AuthMode::ApiKey) && auth.api_keys.is_empty() {
            return invalid("auth.mode includes api_key but auth.api_keys is empty".into());
        }
        let mut ids = std::collections::HashSet::new();
        for key in &auth.api_keys {
            let hex_ok = key.sha256.len() == 64
                && key
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return invalid(format!(
                    "auth.api_keys[{:?}].sha256 must be 64 lowercase hex digits",
                    key.id
                ));
            }
            if key.id.is_empty() || !ids.insert(key.id.as_str()) {
                return invalid(format!(
                    "auth.api_keys ids must be unique and non-empty ({:?})",
                    key.id
                ));
            }
        }
        let jwt = &auth.jwt;
        if auth.mode.contains(&AuthMode::Jwt) {
            if jwt.hs256_secret_file.is_empty() && jwt.jwks_file.is_empty() {
                return invalid(
                    "auth.mode includes jwt but neither auth.jwt.hs256_secret_file nor \
                     auth.jwt.jwks_file is set"
                        .into(),
                );
            }
            if jwt.audiences.is_empty() || jwt.issuers.is_empty() {
                return invalid(
                    "auth.mode includes jwt: set auth.jwt.audiences and auth.jwt.issuers".into(),
                );
            }
        }
        for origin in &auth.allowed_origins {
            if origin.ends_with('/') || !origin.contains("://") {
                return invalid(format!(
                    "auth.allowed_origins: {origin:?} must look like https://host[:port]"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn the_shipped_file_documents_the_defaults() {
        let text = include_str!("../config/voxflow.toml");
        let parsed: Config = toml_only(text);
        assert_eq!(
            parsed,
            Config::default(),
            "config/voxflow.toml drifted from the defaults"
        );
    }

    #[test]
    fn every_example_parses_and_validates() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let config =
                Config::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            config
                .validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = Config::from_toml("[batch]\nmax_duration = 5\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_duration"), "{error}");
        let error = Config::from_toml(
            "[edges.egress]\ncapacity = 0\nsend_timeout_ms = 1\noverflow = \"drop_oldest\"\n",
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(error.contains("edges.egress.overflow"), "{error}");
        let error = Config::from_toml("[edges.egress]\ncapacity = 5000\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("edges.egress.capacity"), "{error}");
    }

    #[test]
    fn security_settings_are_checked_by_key() {
        let refused = |toml: &str, key: &str| {
            let error = Config::from_toml(toml)
                .and_then(|c| c.validate())
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{toml}: {error}");
        };
        refused("[auth]\nmode = \"api_key\"\n", "auth.api_keys");
        refused(
            "[auth]\nmode = \"jwt\"\n[auth.jwt]\nhs256_secret_file = \"s\"\n",
            "auth.jwt.audiences",
        );
        refused(
            "[auth]\napi_keys = [{ id = \"a\", sha256 = \"ABC\" }]\n",
            "sha256",
        );
        refused("[server.tls]\ncert_path = \"c.pem\"\n", "server.tls");
        refused("[limits]\nmax_sessions = 0\n", "limits.max_sessions");
        refused(
            "[ingress]\nread_buffer_bytes = 16\n",
            "ingress.read_buffer_bytes",
        );
        refused(
            "[auth]\nallowed_origins = [\"https://a.example/\"]\n",
            "auth.allowed_origins",
        );
        // One mode as a plain string (what an environment variable gives) or a list.
        let config = Config::from_toml("[auth]\nmode = \"none\"\n").unwrap();
        assert_eq!(config.auth.mode, vec![AuthMode::None]);
    }

    /// Parse without merging defaults, so a key missing from the file is an error.
    fn toml_only(text: &str) -> Config {
        Figment::from(Toml::string(text)).extract().unwrap()
    }
}
