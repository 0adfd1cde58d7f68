//! One run's figures: a JSON line for machines, a table for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::client::{Behind, Mode, Outcome};

#[derive(Debug, Serialize)]
pub struct Report {
    /// Always "voxflow_loadtest", so the line can be picked out of other output.
    pub kind: &'static str,
    /// UTC date of the run.
    pub date: String,
    /// What was tested: "voxflow" or "reference" (the bare-minimum gateway) when spawned,
    /// "url" for a server started elsewhere.
    pub gateway: &'static str,
    pub mode: Mode,
    pub encoding: &'static str,
    pub sample_rate_hertz: u32,
    pub clients: usize,
    pub connected: usize,
    pub connect_errors: usize,
    /// Sessions that ended with an error (the server's code or a transport error).
    pub session_errors: usize,
    pub first_errors: Vec<String>,
    pub measured_secs: f64,
    pub latency_ms: Latency,
    pub markers: Markers,
    /// Audio the server reported dropping (`audio_dropped` warnings).
    pub lost_audio_ms: u64,
    pub behind: BehindReport,
    pub server: Option<ProcessReport>,
    pub emulator: Option<ProcessReport>,
    pub loadtest: Option<ProcessReport>,
    /// Server CPU over the load generator's, in the same window. The generator's work is fixed
    /// by the client count and mode, so its CPU follows how fast the shared machine runs at the
    /// moment: compare builds by this ratio at the same count and mode (seven runs of one build
    /// at 600 clients: 1.18–1.40 ms per audio-s per client, ratio 1.36–1.45).
    pub server_cpu_per_loadtest_cpu: Option<f64>,
    /// Milliseconds of CPU per second of audio per client, per stage, from
    /// `voxflow_stage_processing_seconds_sum` (the rest of the server's CPU is sockets, tasks
    /// and gRPC).
    pub stage_cpu_ms_per_audio_sec: BTreeMap<String, f64>,
    pub slo: Slo,
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Markers {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// A marker final whose position does not hold that marker.
    pub misplaced: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct BehindReport {
    pub clients: usize,
    /// Behind because sends blocked: the server stopped reading.
    pub server_not_reading: usize,
    /// Behind because the load generator woke late (it is short of CPU; not the server's fault).
    pub generator: usize,
    pub max_lateness_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct ProcessReport {
    /// CPU cores used on average over the measured window.
    pub cpu_cores: f64,
    /// CPU per second of audio per client.
    pub cpu_ms_per_audio_sec: f64,
    pub rss_mib: f64,
    /// RSS growth since before the first client connected, per connected session.
    pub rss_kib_per_session: f64,
}

#[derive(Debug, Serialize)]
pub struct Slo {
    pub p99_bound_ms: f64,
    pub met: bool,
}

/// What the clients saw, summed.
pub struct ClientTotals {
    pub latency: Latency,
    pub markers: Markers,
    pub behind: BehindReport,
    pub connect_errors: usize,
    pub session_errors: usize,
    pub first_errors: Vec<String>,
    pub lost_audio_ms: u64,
}

impl ClientTotals {
    /// Latency, loss and lateness from the clients' outcomes; latency only for markers sent in
    /// the measured window.
    pub fn new(
        outcomes: &[Outcome],
        window: (tokio::time::Instant, tokio::time::Instant),
    ) -> ClientTotals {
        let mut latencies: Vec<Duration> = outcomes
            .iter()
            .flat_map(|o| o.latencies.iter())
            .filter(|(sent, _)| *sent >= window.0 && *sent < window.1)
            .map(|&(_, latency)| latency)
            .collect();
        latencies.sort_unstable();
        let pick = |q: f64| -> f64 {
            if latencies.is_empty() {
                return 0.0;
            }
            let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
            ms(latencies[rank - 1])
        };
        let latency = Latency {
            samples: latencies.len(),
            p50: pick(0.50),
            p90: pick(0.90),
            p99: pick(0.99),
            max: latencies.last().map_or(0.0, |&l| ms(l)),
        };
        let mut markers = Markers::default();
        let mut behind = BehindReport::default();
        let mut errors = Vec::new();
        let mut session_errors = 0;
        let mut lost_audio_ms = 0;
        for outcome in outcomes {
            markers.sent += outcome.markers_sent;
            markers.received += outcome.markers_received;
            markers.lost += outcome.lost_markers();
            markers.duplicated += outcome.duplicates;
            markers.misplaced += outcome.misplaced;
            lost_audio_ms += outcome.dropped_audio_ms;
            behind.max_lateness_ms = behind.max_lateness_ms.max(ms(outcome.max_lateness));
            match outcome.behind {
                Some(Behind::ServerNotReading) => behind.server_not_reading += 1,
                Some(Behind::Generator) => behind.generator += 1,
                None => {}
            }
            if let Some(error) = outcome.error.as_ref().or(outcome.connect_error.as_ref()) {
                if outcome.connected {
                    session_errors += 1;
                }
                if errors.len() < 5 && !errors.contains(error) {
                    errors.push(error.clone());
                }
            }
        }
        behind.clients = behind.server_not_reading + behind.generator;
        let connect_errors = outcomes.iter().filter(|o| !o.connected).count();
        ClientTotals {
            latency,
            markers,
            behind,
            connect_errors,
            session_errors,
            first_errors: errors,
            lost_audio_ms,
        }
    }
}

impl Report {
    /// The service-level objective of the capacity search: nothing lost or duplicated, every
    /// client connected and served, nobody behind, p99 under the bound.
    pub fn meets(&self, p99_bound_ms: f64) -> bool {
        self.connect_errors == 0
            && self.session_errors == 0
            && self.markers.lost == 0
            && self.markers.duplicated == 0
            && self.markers.misplaced == 0
            && self.lost_audio_ms == 0
            && self.behind.clients == 0
            && self.latency_ms.samples > 0
            && self.latency_ms.p99 < p99_bound_ms
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let l = &self.latency_ms;
        let m = &self.markers;
        let _ = writeln!(
            out,
            "voxflow loadtest {} · {} · {} {} Hz · {} clients ({} connected) · {:.0} s measured",
            self.date,
            self.gateway,
            match self.mode {
                Mode::Json => "JSON/base64",
                Mode::Binary => "binary",
            },
            self.sample_rate_hertz,
            self.clients,
            self.connected,
            self.measured_secs,
        );
        let _ = writeln!(
            out,
            "  marker latency ms   p50 {:>7.1}  p90 {:>7.1}  p99 {:>7.1}  max {:>7.1}  ({} markers)",
            l.p50, l.p90, l.p99, l.max, l.samples
        );
        let _ = writeln!(
            out,
            "  markers             sent {}  received {}  lost {}  duplicated {}  misplaced {}",
            m.sent, m.received, m.lost, m.duplicated, m.misplaced
        );
        let _ = writeln!(
            out,
            "  lost audio ms {}   connect errors {}   session errors {}   behind {} (server not reading {}, generator {}; worst {:.0} ms late)",
            self.lost_audio_ms,
            self.connect_errors,
            self.session_errors,
            self.behind.clients,
            self.behind.server_not_reading,
            self.behind.generator,
            self.behind.max_lateness_ms,
        );
        for (name, process) in [
            ("server", &self.server),
            ("emulator", &self.emulator),
            ("loadtest", &self.loadtest),
        ] {
            if let Some(p) = process {
                let _ = writeln!(
                    out,
                    "  {name:<9} CPU {:.2} cores = {:.3} ms per audio second per client; RSS {:.1} MiB{}",
                    p.cpu_cores,
                    p.cpu_ms_per_audio_sec,
                    p.rss_mib,
                    if name == "server" {
                        format!(" = {:.1} KiB per session", p.rss_kib_per_session)
                    } else {
                        String::new()
                    }
                );
            }
        }
        if let Some(ratio) = self.server_cpu_per_loadtest_cpu {
            let _ = writeln!(
                out,
                "  server CPU / loadtest CPU {ratio:.3} (the machine's speed factored out)"
            );
        }
        if !self.stage_cpu_ms_per_audio_sec.is_empty() {
            let stages: Vec<String> = self
                .stage_cpu_ms_per_audio_sec
                .iter()
                .map(|(stage, v)| format!("{stage} {v:.3}"))
                .collect();
            let _ = writeln!(
                out,
                "  per stage (ms CPU per audio second per client): {}",
                stages.join("  ")
            );
        }
        for error in &self.first_errors {
            let _ = writeln!(out, "  error: {error}");
        }
        let _ = writeln!(
            out,
            "  SLO (no loss, nobody behind, p99 < {} ms): {}",
            self.slo.p99_bound_ms,
            if self.slo.met { "met" } else { "NOT met" }
        );
        out
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// Today's UTC date, `YYYY-MM-DD`, from the system clock (civil-from-days).
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
