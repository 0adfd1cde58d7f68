//! The metrics catalog: every metric voxflow emits, its type, labels and help text.
//!
//! This is the only module allowed to call the `metrics` macros (clippy enforces it). Handles
//! are created once per stage per session and reused on the hot path. Label values are closed
//! sets (stage ids, [`DropReason`], [`ErrorKind`], …); session ids and addresses go to logs.

#![allow(clippy::disallowed_macros)]

pub use metrics::{Counter, Gauge, Histogram};
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One entry of the catalog.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! catalog {
    ($( $ident:ident = ($name:literal, $kind:ident, [$($label:literal),*], $help:literal); )*) => {
        $( pub const $ident: &str = $name; )*
        /// Every metric, for documentation and dashboard checks.
        pub const CATALOG: &[MetricDef] = &[
            $( MetricDef { name: $name, kind: Kind::$kind, labels: &[$($label),*], help: $help }, )*
        ];
    };
}

catalog! {
    STAGE_RECEIVED = ("voxflow_stage_items_received_total", Counter, ["stage"],
        "Items a stage took from its input queue.");
    STAGE_SENT = ("voxflow_stage_items_sent_total", Counter, ["stage"],
        "Items a stage put on its output queue (for egress: messages written to the socket).");
    STAGE_DROPPED = ("voxflow_stage_items_dropped_total", Counter, ["stage", "reason"],
        "Items a stage discarded, by reason. Every drop of audio is also reported to the client.");
    STAGE_DROPPED_AUDIO = ("voxflow_stage_dropped_audio_seconds", Histogram, ["stage", "reason"],
        "Audio carried by each dropped item; the _sum is the audio lost, in seconds.");
    STAGE_ERRORS = ("voxflow_stage_errors_total", Counter, ["stage", "error"],
        "Errors a stage met, by kind.");
    STAGE_PROCESSING = ("voxflow_stage_processing_seconds", Histogram, ["stage"],
        "Time a stage spent on one item, excluding time blocked on its output.");
    STAGE_SEND_BLOCKED = ("voxflow_stage_send_blocked_seconds", Histogram, ["stage"],
        "Time a stage waited for room on its output queue, per wait (slow path only). The rate of the _sum is the fraction of time the stage was blocked: the backpressure signal.");
    STAGE_QUEUE_DEPTH = ("voxflow_stage_queue_depth_items", Gauge, ["stage"],
        "Items waiting in a stage's input queues, summed over sessions.");
    STAGE_QUEUE_CAPACITY = ("voxflow_stage_queue_capacity_items", Gauge, ["stage"],
        "Capacity of a stage's input queues, summed over sessions.");
    SESSIONS_ACTIVE = ("voxflow_sessions_active", Gauge, [],
        "Sessions connected now.");
    SESSIONS_OPENED = ("voxflow_sessions_opened_total", Counter, [],
        "WebSocket sessions accepted.");
    SESSIONS_CLOSED = ("voxflow_sessions_closed_total", Counter, ["reason"],
        "Sessions ended, by reason.");
    SESSIONS_REFUSED = ("voxflow_sessions_refused_total", Counter, ["reason"],
        "Connections refused before a session began, by reason.");
    CLIENT_ERRORS = ("voxflow_client_errors_total", Counter, ["code"],
        "`error` messages sent to clients, by protocol code.");
    CLIENT_WARNINGS = ("voxflow_client_warnings_total", Counter, ["code"],
        "`warning` messages sent to clients, by protocol code.");
    TRANSCRIPTS = ("voxflow_transcripts_sent_total", Counter, ["kind"],
        "Transcript messages sent to clients (kind = interim | final).");
    AUDIO_FRAME = ("voxflow_audio_frame_duration_seconds", Histogram, [],
        "Duration of each decoded audio frame; the rate of the _sum is audio seconds received per second.");
    VAD_GATED = ("voxflow_vad_gated_audio_seconds", Histogram, [],
        "Non-speech frames the VAD gate kept from the engine (by policy, not loss); _sum in seconds.");
    STT_FIRST_RESULT = ("voxflow_stt_first_result_seconds", Histogram, ["engine"],
        "Time from a stream's first audio to its first result.");
    STT_FINAL_LATENCY = ("voxflow_stt_final_latency_seconds", Histogram, ["engine"],
        "Time from the last audio a final covers reaching the engine to the final being received.");
}

/// Why an item was dropped. A closed set: the values of the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The output queue stayed full past the send timeout; the oldest queued item went.
    OverflowOldest,
    /// The output queue stayed full past the send timeout; the new item went.
    OverflowNewest,
    /// The item could not be decoded or parsed.
    Invalid,
    /// The session was ending and the item could not be delivered.
    Closed,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::OverflowOldest,
        DropReason::OverflowNewest,
        DropReason::Invalid,
        DropReason::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::OverflowOldest => "overflow_oldest",
            DropReason::OverflowNewest => "overflow_newest",
            DropReason::Invalid => "invalid",
            DropReason::Closed => "closed",
        }
    }
}

/// Kinds of stage error: the values of the `error` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Protocol,
    Decode,
    Overflow,
    Engine,
    Socket,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Decode => "decode",
            ErrorKind::Overflow => "overflow",
            ErrorKind::Engine => "engine",
            ErrorKind::Socket => "socket",
        }
    }
}

/// Register help texts and units with the installed recorder.
pub fn describe() {
    for def in CATALOG {
        match def.kind {
            Kind::Counter => describe_counter!(def.name, def.help),
            Kind::Gauge => describe_gauge!(def.name, def.help),
            Kind::Histogram if def.name.ends_with("_seconds") => {
                describe_histogram!(def.name, Unit::Seconds, def.help)
            }
            Kind::Histogram => describe_histogram!(def.name, def.help),
        }
    }
}

/// Histogram bucket bounds per metric name suffix, for the Prometheus exporter.
pub fn buckets() -> Vec<(&'static str, Vec<f64>)> {
    let fast = vec![
        1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1,
    ];
    let slow = vec![
        1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let audio = vec![0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1.0];
    vec![
        (STAGE_PROCESSING, fast),
        (STAGE_SEND_BLOCKED, slow.clone()),
        (STT_FIRST_RESULT, slow.clone()),
        (STT_FINAL_LATENCY, slow),
        (STAGE_DROPPED_AUDIO, audio.clone()),
        (AUDIO_FRAME, audio.clone()),
        (VAD_GATED, audio),
    ]
}

/// The handles one stage of one session uses. Created once, used per item.
#[derive(Clone)]
pub struct StageMetrics {
    pub stage: &'static str,
    pub received: Counter,
    pub sent: Counter,
    pub processing: Histogram,
    pub send_blocked: Histogram,
    pub queue_depth: Gauge,
    pub queue_capacity: Gauge,
}

impl StageMetrics {
    pub fn new(stage: &'static str) -> StageMetrics {
        StageMetrics {
            stage,
            received: counter!(STAGE_RECEIVED, "stage" => stage),
            sent: counter!(STAGE_SENT, "stage" => stage),
            processing: histogram!(STAGE_PROCESSING, "stage" => stage),
            send_blocked: histogram!(STAGE_SEND_BLOCKED, "stage" => stage),
            queue_depth: gauge!(STAGE_QUEUE_DEPTH, "stage" => stage),
            queue_capacity: gauge!(STAGE_QUEUE_CAPACITY, "stage" => stage),
        }
    }

    /// Count a dropped item carrying `audio_us` of audio. Drops are rare: no cached handle.
    pub fn dropped(&self, reason: DropReason, audio_us: u64) {
        counter!(STAGE_DROPPED, "stage" => self.stage, "reason" => reason.as_str()).increment(1);
        histogram!(STAGE_DROPPED_AUDIO, "stage" => self.stage, "reason" => reason.as_str())
            .record(audio_us as f64 / 1e6);
    }

    pub fn error(&self, kind: ErrorKind) {
        counter!(STAGE_ERRORS, "stage" => self.stage, "error" => kind.as_str()).increment(1);
    }
}

/// Session-level metrics.
pub mod sessions {
    use super::*;

    pub fn opened() {
        counter!(SESSIONS_OPENED).increment(1);
        gauge!(SESSIONS_ACTIVE).increment(1.0);
    }

    /// `reason` is one of `normal`, `client_gone`, `error`, `shutdown`, `max_duration`.
    pub fn closed(reason: &'static str) {
        counter!(SESSIONS_CLOSED, "reason" => reason).increment(1);
        gauge!(SESSIONS_ACTIVE).decrement(1.0);
    }

    /// `reason` is a closed set named by the caller: `bad_request`, `not_found`, `draining`,
    /// `engine`, `capacity`, `per_ip`, `per_key`, `handshake_timeout`, `tls`, `auth_missing`,
    /// `auth_invalid`, `auth_expired`, `auth_claims`, `origin`.
    pub fn refused(reason: &'static str) {
        counter!(SESSIONS_REFUSED, "reason" => reason).increment(1);
    }

    pub fn client_error(code: &'static str) {
        counter!(CLIENT_ERRORS, "code" => code).increment(1);
    }

    pub fn client_warning(code: &'static str) {
        counter!(CLIENT_WARNINGS, "code" => code).increment(1);
    }

    pub fn transcripts(is_final: bool) -> Counter {
        counter!(TRANSCRIPTS, "kind" => if is_final { "final" } else { "interim" })
    }

    pub fn audio_frame() -> Histogram {
        histogram!(AUDIO_FRAME)
    }

    pub fn vad_gated() -> Histogram {
        histogram!(VAD_GATED)
    }
}

/// Engine-level metrics; `engine` is the engine's static name.
pub mod engine {
    use super::*;

    pub fn first_result(engine: &'static str) -> Histogram {
        histogram!(STT_FIRST_RESULT, "engine" => engine)
    }

    pub fn final_latency(engine: &'static str) -> Histogram {
        histogram!(STT_FINAL_LATENCY, "engine" => engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        let mut seen = std::collections::HashSet::new();
        for def in CATALOG {
            assert!(def.name.starts_with("voxflow_"), "{}", def.name);
            assert!(seen.insert(def.name), "duplicate {}", def.name);
            match def.kind {
                Kind::Counter => assert!(def.name.ends_with("_total"), "{}", def.name),
                _ => assert!(!def.name.ends_with("_total"), "{}", def.name),
            }
            assert!(!def.name.contains("_ms"), "{}: use seconds", def.name);
            for label in def.labels {
                assert!(
                    ["stage", "reason", "error", "code", "kind", "engine"].contains(label),
                    "{}: label {label} is not in the closed set",
                    def.name
                );
            }
        }
    }
}
