//! The metrics catalog: every metric voxflow emits, its type, labels and help text.
//!
//! This is the only module allowed to call the `metrics` macros (clippy enforces it). Handles
//! are created once per stage per session and reused on the hot path. Label values are closed
//! sets (stage ids, [`DropReason`], [`ErrorKind`], …); session ids and addresses go to logs.

#![allow(clippy::disallowed_macros)]

mod sharded;

use std::time::Duration;

pub use metrics::{Counter, Gauge, Histogram};
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
pub use sharded::render as render_sharded;

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
    WHISPER_QUEUE_DEPTH = ("voxflow_whisper_queue_depth_jobs", Gauge, [],
        "Whisper decode jobs waiting for a model worker, over all sessions.");
    WHISPER_QUEUE_WAIT = ("voxflow_whisper_queue_wait_seconds", Histogram, ["kind"],
        "Time a Whisper decode job waited for a worker (kind = interim | final). Growing final waits mean the workers are saturated.");
    WHISPER_DECODE = ("voxflow_whisper_decode_seconds", Histogram, ["kind"],
        "Worker time for one Whisper decode (kind = interim | final). Real-time factor = rate(_sum) / rate(voxflow_whisper_audio_decoded_seconds_sum).");
    WHISPER_AUDIO_DECODED = ("voxflow_whisper_audio_decoded_seconds", Histogram, ["kind"],
        "Audio in each Whisper decode (the whole utterance so far, for interims).");
    WHISPER_INTERIMS_SKIPPED = ("voxflow_whisper_interims_skipped_total", Counter, ["reason"],
        "Interim decodes not run because the CPU was busy (reason = in_flight: the session's previous decode is still running | workers_busy: no worker idle). Finals are never skipped.");
    WHISPER_STREAMS = ("voxflow_whisper_streams_active", Gauge, [],
        "Sessions holding one of the Whisper engine's max_sessions seats.");
    STT_UPSTREAM_OPENED = ("voxflow_stt_upstream_streams_opened_total", Counter, ["engine"],
        "Upstream engine streams opened (first streams, rotations, retries, reopenings after silence).");
    STT_UPSTREAM_ACTIVE = ("voxflow_stt_upstream_streams_active", Gauge, ["engine"],
        "Upstream engine streams open now.");
    STT_UPSTREAM_CLOSED = ("voxflow_stt_upstream_streams_closed_total", Counter, ["engine", "reason"],
        "Upstream streams ended, by reason (finalize, silence, rotation, end, error).");
    STT_UPSTREAM_OPEN = ("voxflow_stt_upstream_open_seconds", Histogram, ["engine"],
        "Time to open an upstream stream: token, connection if needed, response headers.");
    STT_ROTATIONS = ("voxflow_stt_rotations_total", Counter, ["engine", "reason"],
        "Upstream streams replaced before the engine's duration limit (reason = boundary | forced).");
    STT_RETRIES = ("voxflow_stt_retries_total", Counter, ["engine", "code"],
        "Upstream streams reopened after a transient error, by the engine's status code.");
    STT_REPLAYED = ("voxflow_stt_replayed_audio_seconds", Histogram, ["engine"],
        "Audio sent again into a new upstream stream after a rotation or error, per new stream; the _sum is seconds replayed (billed twice).");
    BUILD_INFO = ("voxflow_build_info", Gauge, ["version"],
        "Always 1; the version label names the running build (one value per process).");
    PROCESS_START = ("voxflow_process_start_time_seconds", Gauge, [],
        "Unix time at which the process started serving; a change means it restarted.");
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
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Protocol,
        ErrorKind::Decode,
        ErrorKind::Overflow,
        ErrorKind::Engine,
        ErrorKind::Socket,
    ];

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
    for def in CATALOG
        .iter()
        .filter(|def| !sharded::NAMES.contains(&def.name))
    {
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

/// Create the fault counters at zero for every value of their closed label sets, so that
/// `rate()` and alerts see the first drop, error or refusal (a series that first appears at 1
/// shows no increase).
pub fn zero_fault_counters() {
    for stage in crate::stage::ALL {
        for reason in DropReason::ALL {
            counter!(STAGE_DROPPED, "stage" => stage, "reason" => reason.as_str()).absolute(0);
        }
        for kind in ErrorKind::ALL {
            counter!(STAGE_ERRORS, "stage" => stage, "error" => kind.as_str()).absolute(0);
        }
    }
    for reason in sessions::CLOSE_REASONS {
        counter!(SESSIONS_CLOSED, "reason" => reason).absolute(0);
    }
    for reason in sessions::REFUSE_REASONS {
        counter!(SESSIONS_REFUSED, "reason" => reason).absolute(0);
    }
}

/// Histogram bucket bounds per metric name suffix, for the Prometheus exporter.
///
/// The per-item families (stage counters, processing time, audio per frame) are not here: they
/// are kept per thread and rendered by [`render_sharded`].
pub fn buckets() -> Vec<(&'static str, Vec<f64>)> {
    let slow = vec![
        1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let audio: Vec<f64> = sharded::AUDIO_BOUNDS_NS
        .iter()
        .map(|&ns| ns as f64 / 1e9)
        .collect();
    let replay = vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    vec![
        (STAGE_SEND_BLOCKED, slow.clone()),
        (STT_FIRST_RESULT, slow.clone()),
        (STT_FINAL_LATENCY, slow.clone()),
        (WHISPER_QUEUE_WAIT, slow.clone()),
        (WHISPER_DECODE, slow.clone()),
        (
            WHISPER_AUDIO_DECODED,
            vec![0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0],
        ),
        (STT_UPSTREAM_OPEN, slow),
        (STT_REPLAYED, replay),
        (STAGE_DROPPED_AUDIO, audio),
    ]
}

/// The handles one stage of one session uses. Created once, used per item.
///
/// Received, sent, queue depth and processing time move with every item: they go to this
/// thread's shard (see `sharded`), not through the `metrics` crate.
#[derive(Clone)]
pub struct StageMetrics {
    pub stage: &'static str,
    index: usize,
    pub send_blocked: Histogram,
    pub queue_capacity: Gauge,
}

impl StageMetrics {
    /// # Panics
    /// When `stage` is not one of [`crate::stage::ALL`].
    pub fn new(stage: &'static str) -> StageMetrics {
        StageMetrics {
            stage,
            index: sharded::stage_index(stage),
            send_blocked: histogram!(STAGE_SEND_BLOCKED, "stage" => stage),
            queue_capacity: gauge!(STAGE_QUEUE_CAPACITY, "stage" => stage),
        }
    }

    /// Items taken from the input (`voxflow_stage_items_received_total`).
    pub fn received(&self, n: u64) {
        sharded::received(self.index, n);
    }

    /// Items handed on (`voxflow_stage_items_sent_total`).
    pub fn sent(&self, n: u64) {
        sharded::sent(self.index, n);
    }

    /// Items entering (positive) or leaving (negative) the stage's input queue.
    pub fn queue_depth(&self, delta: i64) {
        sharded::queue_depth(self.index, delta);
    }

    /// Time spent on one item (`voxflow_stage_processing_seconds`).
    pub fn processing(&self, elapsed: Duration) {
        sharded::processing(self.index, elapsed);
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

    /// The values of `voxflow_sessions_closed_total`'s `reason` label.
    pub const CLOSE_REASONS: [&str; 6] = [
        "normal",
        "client_gone",
        "error",
        "shutdown",
        "refused",
        "max_duration",
    ];

    /// The values of `voxflow_sessions_refused_total`'s `reason` label.
    pub const REFUSE_REASONS: [&str; 14] = [
        "bad_request",
        "not_found",
        "draining",
        "engine",
        "capacity",
        "per_ip",
        "per_key",
        "handshake_timeout",
        "tls",
        "auth_missing",
        "auth_invalid",
        "auth_expired",
        "auth_claims",
        "origin",
    ];

    pub fn opened() {
        counter!(SESSIONS_OPENED).increment(1);
        gauge!(SESSIONS_ACTIVE).increment(1.0);
    }

    /// `reason` is one of [`CLOSE_REASONS`].
    pub fn closed(reason: &'static str) {
        debug_assert!(CLOSE_REASONS.contains(&reason), "{reason}");
        counter!(SESSIONS_CLOSED, "reason" => reason).increment(1);
        gauge!(SESSIONS_ACTIVE).decrement(1.0);
    }

    /// `reason` is one of [`REFUSE_REASONS`].
    pub fn refused(reason: &'static str) {
        debug_assert!(REFUSE_REASONS.contains(&reason), "{reason}");
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

    /// A decoded frame of `duration` (`voxflow_audio_frame_duration_seconds`).
    pub fn audio_frame(duration: Duration) {
        sharded::audio_frame(duration);
    }

    /// A frame of `duration` the VAD gate kept from the engine (`voxflow_vad_gated_audio_seconds`).
    pub fn vad_gated(duration: Duration) {
        sharded::vad_gated(duration);
    }
}

/// Process-level metrics, set once at start-up.
pub mod process {
    use super::*;

    /// Record the build and the start time. `version` is the binary's own version.
    pub fn started(version: &'static str) {
        gauge!(BUILD_INFO, "version" => version).set(1.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        gauge!(PROCESS_START).set(now);
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

    pub fn upstream_opened(engine: &'static str) -> Counter {
        counter!(STT_UPSTREAM_OPENED, "engine" => engine)
    }

    pub fn upstream_active(engine: &'static str) -> Gauge {
        gauge!(STT_UPSTREAM_ACTIVE, "engine" => engine)
    }

    pub fn upstream_open(engine: &'static str) -> Histogram {
        histogram!(STT_UPSTREAM_OPEN, "engine" => engine)
    }

    pub fn replayed(engine: &'static str) -> Histogram {
        histogram!(STT_REPLAYED, "engine" => engine)
    }

    /// `reason` is one of `finalize`, `silence`, `rotation`, `end`, `error`. Rare: no cached handle.
    pub fn upstream_closed(engine: &'static str, reason: &'static str) {
        counter!(STT_UPSTREAM_CLOSED, "engine" => engine, "reason" => reason).increment(1);
    }

    /// `reason` is `boundary` (after a final) or `forced` (at the deadline).
    pub fn rotation(engine: &'static str, reason: &'static str) {
        counter!(STT_ROTATIONS, "engine" => engine, "reason" => reason).increment(1);
    }

    /// `code` is the engine's status name (a closed set, e.g. gRPC codes).
    pub fn retry(engine: &'static str, code: &'static str) {
        counter!(STT_RETRIES, "engine" => engine, "code" => code).increment(1);
    }
}

/// The Whisper engine's metrics (`stt/whisper`).
pub mod whisper {
    use super::*;

    /// `interim` or `final`: the values of the `kind` label.
    pub fn kind(is_final: bool) -> &'static str {
        if is_final { "final" } else { "interim" }
    }

    pub fn queue_depth() -> Gauge {
        gauge!(WHISPER_QUEUE_DEPTH)
    }

    pub fn queue_wait(is_final: bool) -> Histogram {
        histogram!(WHISPER_QUEUE_WAIT, "kind" => kind(is_final))
    }

    pub fn decode(is_final: bool) -> Histogram {
        histogram!(WHISPER_DECODE, "kind" => kind(is_final))
    }

    pub fn audio_decoded(is_final: bool) -> Histogram {
        histogram!(WHISPER_AUDIO_DECODED, "kind" => kind(is_final))
    }

    /// `reason` is `in_flight` or `workers_busy`.
    pub fn interims_skipped(reason: &'static str) -> Counter {
        counter!(WHISPER_INTERIMS_SKIPPED, "reason" => reason)
    }

    pub fn streams() -> Gauge {
        gauge!(WHISPER_STREAMS)
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
                    [
                        "stage", "reason", "error", "code", "kind", "engine", "version"
                    ]
                    .contains(label),
                    "{}: label {label} is not in the closed set",
                    def.name
                );
            }
        }
    }
}
