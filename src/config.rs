//! Configuration: one TOML file describes the pipeline; every key can be overridden by an
//! environment variable (`VOXFLOW_SERVER__LISTEN=0.0.0.0:8080`); nothing is required, the
//! embedded defaults run. [`Config::validate`] turns the raw file into typed [`Settings`]
//! without I/O, naming the bad key when it refuses.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
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
    /// Address of the WebSocket listener (`ws://LISTEN/v1/stream`).
    pub listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
        }
    }
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Largest WebSocket message accepted; larger ones end the session with close 1009.
    /// 1 MiB holds ~32 s of 16 kHz LINEAR16 in base64.
    pub max_message_bytes: usize,
    /// A session with no message at all (audio or keepalive) for this long is closed (1008).
    pub idle_timeout_ms: u64,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            max_message_bytes: 1 << 20,
            idle_timeout_ms: 30_000,
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

    fn validate(&self, name: &str) -> Result<EdgeSettings, ConfigError> {
        let capacity = NonZeroUsize::new(self.capacity)
            .filter(|c| c.get() <= 4_096)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "edges.{name}.capacity must be 1..=4096, got {}",
                    self.capacity
                ))
            })?;
        if self.send_timeout_ms > 60_000 {
            return Err(ConfigError::Invalid(format!(
                "edges.{name}.send_timeout_ms must be at most 60000"
            )));
        }
        Ok(EdgeSettings {
            capacity,
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
            decode: EdgeConfig::new(8),
            resample: EdgeConfig::new(4),
            vad: EdgeConfig::new(4),
            batch: EdgeConfig::new(4),
            // Small on purpose: a full STT queue is the "engine busy" signal batching waits on.
            stt: EdgeConfig::new(2),
            egress: EdgeConfig::new(16),
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

/// Validated edge settings.
#[derive(Debug, Clone, Copy)]
pub struct Edges {
    pub decode: EdgeSettings,
    pub resample: EdgeSettings,
    pub vad: EdgeSettings,
    pub batch: EdgeSettings,
    pub stt: EdgeSettings,
    pub egress: EdgeSettings,
}

/// Everything the server needs, typed and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub grace_period: Duration,
    pub session: SessionConfig,
    pub max_message_bytes: usize,
    pub idle_timeout: Duration,
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
        figment = figment.merge(Env::prefixed("VOXFLOW_").split("__"));
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
        let positive = |key: &str, ms: u64| {
            if ms == 0 {
                Err(ConfigError::Invalid(format!("{key} must be positive")))
            } else {
                Ok(Duration::from_millis(ms))
            }
        };
        Ok(Settings {
            listen: addr("server.listen", &self.server.listen)?,
            metrics_listen: addr("metrics.listen", &self.metrics.listen)?,
            grace_period: Duration::from_millis(self.shutdown.grace_period_ms),
            session: self.session.clone(),
            max_message_bytes: self.ingress.max_message_bytes,
            idle_timeout: positive("ingress.idle_timeout_ms", self.ingress.idle_timeout_ms)?,
            write_timeout: positive("egress.write_timeout_ms", self.egress.write_timeout_ms)?,
            edges: Edges {
                decode: self.edges.decode.validate("decode")?,
                resample: self.edges.resample.validate("resample")?,
                vad: self.edges.vad.validate("vad")?,
                batch: self.edges.batch.validate("batch")?,
                stt: self.edges.stt.validate("stt")?,
                egress: self.edges.egress.validate("egress")?,
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
            "[edges.decode]\ncapacity = 0\nsend_timeout_ms = 1\noverflow = \"block\"\n",
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(error.contains("edges.decode.capacity"), "{error}");
    }

    /// Parse without merging defaults, so a key missing from the file is an error.
    fn toml_only(text: &str) -> Config {
        Figment::from(Toml::string(text)).extract().unwrap()
    }
}
