//! `voxflow loadtest`: many real-time clients against a voxflow server, measuring what users
//! feel.
//!
//! Each client loops real speech (espeak-ng, or `--speech FILE`) in 20 ms frames on a steady
//! clock, with a latency marker after every piece of speech: a short tone sequence the
//! emulator's deterministic recognizer answers with a final the moment it is complete. Latency
//! is (final received) − (the frame holding the final's `end_ms` sent); every marker must come
//! back exactly once. The server's CPU and RSS come from `/proc`, the per-stage split from its
//! `/metrics`. `--spawn` starts `voxflow emulator` and `voxflow serve` for the run; `--search`
//! repeats runs to find the most clients meeting the SLO.

mod audio;
mod client;
mod progress;
pub mod reference;
mod report;
mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use pipeline::Encoding;
use tokio::time::Instant;

use self::audio::{Clip, ClipSpec};
pub use self::client::Mode;
use self::progress::Live;
pub use self::reference::ReferenceArgs;
use self::report::{ClientTotals, ProcessReport, Report, Slo};
use self::server::{ProcSample, Spawned};

#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestArgs {
    /// Concurrent clients (the first count tried with --search).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Clients connect evenly spread over this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub ramp_secs: f64,
    /// Seconds measured once every client streams (after a 2 s settle).
    #[arg(long, default_value_t = 30.0)]
    pub duration_secs: f64,
    /// `json`: the Python tutorial's `{"audio_id","content":"<base64>"}` messages, format in
    /// the URL's query; `binary`: a `start` message, then binary frames.
    #[arg(long, value_enum, default_value_t = Mode::Json)]
    pub mode: Mode,
    /// Audio encoding (LINEAR16, OPUS, MULAW, ALAW, FLOAT32).
    #[arg(long, default_value = "LINEAR16", value_parser = parse_encoding)]
    pub encoding: Encoding,
    #[arg(long, default_value_t = 16_000)]
    pub sample_rate_hertz: u32,
    /// Frame length (Opus: 10, 20, 40 or 60).
    #[arg(long, default_value_t = 20)]
    pub frame_ms: u32,
    /// One latency marker this often (between pieces of speech).
    #[arg(long, default_value_t = 1000)]
    pub marker_interval_ms: u32,
    /// Speech to loop (any WAV sox reads); default: espeak-ng reads a paragraph.
    #[arg(long)]
    pub speech: Option<PathBuf>,
    /// Ask for interim results (the server's default otherwise).
    #[arg(long)]
    pub interim_results: Option<bool>,
    /// The server to test (ignored with --spawn).
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/stream")]
    pub url: String,
    /// The server's process id, for its CPU and RSS (ignored with --spawn).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server's metrics listener (host:port), for the per-stage CPU split.
    #[arg(long)]
    pub metrics: Option<String>,
    /// Start `voxflow emulator` and `voxflow serve` (engine google → the emulator) on free
    /// loopback ports for each run, sized for the client count.
    #[arg(long)]
    pub spawn: bool,
    /// With --spawn: start the bare-minimum reference gateway (`voxflow reference-gateway`:
    /// one upstream stream per client, every frame forwarded at once, no VAD, batching or
    /// metrics) instead of `voxflow serve`, to compare voxflow with on the same machine.
    #[arg(long, requires = "spawn")]
    pub reference: bool,
    /// Extra environment for the spawned server, `KEY=VALUE` (e.g.
    /// `VOXFLOW_VAD__ENABLED=false`); repeatable.
    #[arg(long = "server-env", value_parser = parse_env)]
    pub server_env: Vec<(String, String)>,
    /// A client that sends a frame this late is behind real time.
    #[arg(long, default_value_t = 200)]
    pub behind_ms: u64,
    /// The SLO's bound on p99 marker latency.
    #[arg(long, default_value_t = 50.0)]
    pub slo_p99_ms: f64,
    /// Find the most clients meeting the SLO: double from --clients until a run fails, then
    /// bisect down to --search-resolution.
    #[arg(long)]
    pub search: bool,
    #[arg(long, default_value_t = 4000)]
    pub search_max: usize,
    #[arg(long, default_value_t = 50)]
    pub search_resolution: usize,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 5)]
    pub progress_secs: u64,
    /// Exit non-zero when the (last) run misses the SLO.
    #[arg(long)]
    pub check: bool,
}

fn parse_encoding(name: &str) -> Result<Encoding, String> {
    Encoding::parse(name).ok_or_else(|| format!("unknown encoding {name:?}"))
}

fn parse_env(pair: &str) -> Result<(String, String), String> {
    pair.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {pair:?}"))
}

/// Run the load test (or the capacity search) and print the reports: the table on stderr,
/// a JSON line per run on stdout.
///
/// # Errors
/// When the audio cannot be made, the server cannot be spawned, or `--check` and the SLO is
/// missed.
pub async fn run(args: LoadtestArgs) -> anyhow::Result<()> {
    let clip = Arc::new(Clip::build(&ClipSpec {
        speech: args.speech.as_deref(),
        encoding: args.encoding,
        rate_hz: args.sample_rate_hertz,
        frame_ms: args.frame_ms,
        marker_interval_ms: args.marker_interval_ms,
    })?);
    eprintln!(
        "clip: {:.1} s of speech in {} pieces, a {} ms marker after each; {} {} Hz, {} ms frames",
        clip.speech_secs,
        clip.pieces.len(),
        crate::emulator::tones::MARKER_MS,
        args.encoding.as_str(),
        clip.rate_hz,
        clip.frame_ms
    );
    if !args.search {
        let report = run_once(&args, args.clients, &clip).await?;
        return finish(&args, &report);
    }
    // Double until a run misses the SLO, then bisect between the best pass and the first miss.
    let (mut pass, mut fail) = (None::<usize>, None::<usize>);
    let mut clients = args.clients.max(1);
    loop {
        if run_once(&args, clients, &clip).await?.slo.met {
            pass = Some(clients);
        } else {
            fail = Some(clients);
        }
        let next = match (pass, fail) {
            (Some(p), None) if p >= args.search_max => break,
            (Some(p), None) => (p * 2).min(args.search_max),
            (p, Some(f)) => {
                let p = p.unwrap_or(0);
                if f - p <= args.search_resolution {
                    break;
                }
                (p + f) / 2
            }
            (None, None) => unreachable!("every run passes or fails"),
        };
        clients = next;
    }
    let capacity = pass.unwrap_or(0);
    eprintln!(
        "capacity: {capacity} clients meet the SLO (no loss, nobody behind, p99 < {} ms){}",
        args.slo_p99_ms,
        fail.map(|f| format!("; {f} do not")).unwrap_or_default()
    );
    println!(
        "{}",
        serde_json::json!({
            "kind": "voxflow_loadtest_capacity",
            "date": report::today(),
            "mode": args.mode,
            "encoding": args.encoding.as_str(),
            "sample_rate_hertz": args.sample_rate_hertz,
            "slo_p99_ms": args.slo_p99_ms,
            "capacity": capacity,
            "first_failing": fail,
        })
    );
    if args.check && capacity == 0 {
        bail!("no client count met the SLO");
    }
    Ok(())
}

fn finish(args: &LoadtestArgs, report: &Report) -> anyhow::Result<()> {
    if args.check && !report.slo.met {
        bail!("the run missed the SLO");
    }
    Ok(())
}

async fn run_once(args: &LoadtestArgs, clients: usize, clip: &Arc<Clip>) -> anyhow::Result<Report> {
    let spawned = if args.spawn {
        Some(Spawned::start(clients, &args.server_env, args.reference).await?)
    } else {
        None
    };
    let (url, metrics, server_pid, emulator_pid) = match &spawned {
        Some(s) => (
            s.url.clone(),
            // The reference gateway has no metrics listener.
            (!args.reference).then(|| s.metrics.clone()),
            s.server_pid(),
            s.emulator_pid(),
        ),
        None => (
            args.url.clone(),
            args.metrics.clone(),
            args.server_pid,
            None,
        ),
    };
    let result = drive(
        args,
        clients,
        clip,
        &url,
        metrics.as_deref(),
        server_pid,
        emulator_pid,
    )
    .await;
    if let Some(spawned) = spawned {
        spawned.stop().await;
    }
    let report = result?;
    eprint!("{}", report.table());
    println!("{}", serde_json::to_string(&report)?);
    Ok(report)
}

/// Query string (JSON mode) and start message (binary mode) naming the format.
fn format_fields(args: &LoadtestArgs) -> (String, String) {
    let mut query = format!(
        "encoding={}&sample_rate_hertz={}",
        args.encoding.as_str(),
        args.sample_rate_hertz
    );
    let mut start = serde_json::json!({
        "type": "start",
        "encoding": args.encoding.as_str(),
        "sample_rate_hertz": args.sample_rate_hertz,
    });
    if let Some(interim) = args.interim_results {
        query.push_str(&format!("&interim_results={interim}"));
        start["interim_results"] = interim.into();
    }
    (query, start.to_string())
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &LoadtestArgs,
    clients: usize,
    clip: &Arc<Clip>,
    url: &str,
    metrics: Option<&str>,
    server_pid: Option<u32>,
    emulator_pid: Option<u32>,
) -> anyhow::Result<Report> {
    if clients == 0 {
        bail!("--clients must be at least 1");
    }
    let (query, start_message) = format_fields(args);
    let url = match args.mode {
        Mode::Json => format!("{url}{}{query}", if url.contains('?') { '&' } else { '?' }),
        Mode::Binary => url.to_string(),
    };
    let live = Arc::new(Live::default());
    let server_before = server_pid.and_then(server::sample);
    let began = Instant::now();
    let ramp = Duration::from_secs_f64(args.ramp_secs.max(0.0));
    let settle = Duration::from_secs(2);
    let window_start = began + ramp + settle;
    let window_end = window_start + Duration::from_secs_f64(args.duration_secs.max(1.0));
    let mut tasks = tokio::task::JoinSet::new();
    for number in 0..clients {
        let plan = client::Plan {
            number,
            url: url.clone(),
            mode: args.mode,
            start_message: start_message.clone(),
            connect_at: began + ramp.mul_f64(number as f64 / clients as f64),
            stop_at: window_end,
            // Spread clients over the clip so they do not all speak in unison.
            first_segment: number * 7919 % clip.pieces.len(),
            behind: Duration::from_millis(args.behind_ms),
        };
        tasks.spawn(client::run(plan, Arc::clone(clip), Arc::clone(&live)));
    }

    // Progress, and the samples that bracket the measured window.
    let me = std::process::id();
    let mut at_start = None;
    let mut at_end = None;
    let mut outcomes = Vec::with_capacity(clients);
    let mut next_progress = began + Duration::from_secs(args.progress_secs.max(1));
    let mut last_frames = 0;
    let mut last_cpu = server_pid.and_then(server::sample);
    let mut last_at = Instant::now();
    loop {
        let wake = [
            Some(next_progress).filter(|_| args.progress_secs > 0),
            Some(window_start).filter(|_| at_start.is_none()),
            Some(window_end).filter(|_| at_end.is_none()),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => outcomes.push(joined.context("a client task failed")?),
                None => break,
            },
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if at_start.is_none() && now >= window_start {
                    at_start = Some(Snapshot::take(now, server_pid, emulator_pid, me, metrics).await);
                }
                if at_end.is_none() && now >= window_end {
                    at_end = Some(Snapshot::take(now, server_pid, emulator_pid, me, metrics).await);
                }
                if args.progress_secs > 0 && now >= next_progress {
                    next_progress += Duration::from_secs(args.progress_secs);
                    let frames = live.frames.load(std::sync::atomic::Ordering::Relaxed);
                    let cpu = server_pid.and_then(server::sample);
                    let secs = now.duration_since(last_at).as_secs_f64();
                    let server = match (last_cpu, cpu) {
                        (Some(a), Some(b)) => format!(
                            "; server {:.2} cores, {:.0} MiB",
                            (b.cpu - a.cpu).as_secs_f64() / secs,
                            b.rss_bytes as f64 / 1_048_576.0
                        ),
                        _ => String::new(),
                    };
                    let latency = live
                        .take_percentiles()
                        .map(|(p50, p99)| format!("; latency p50 ≤{p50} p99 ≤{p99} ms"))
                        .unwrap_or_default();
                    eprintln!(
                        "[{:>4.0} s] {} clients streaming, {} connect errors, {} session errors, {} behind; {:.0} frames/s; {} markers back{latency}{server}",
                        now.duration_since(began).as_secs_f64(),
                        live.connected.load(std::sync::atomic::Ordering::Relaxed),
                        live.connect_errors.load(std::sync::atomic::Ordering::Relaxed),
                        live.errors.load(std::sync::atomic::Ordering::Relaxed),
                        live.behind.load(std::sync::atomic::Ordering::Relaxed),
                        (frames - last_frames) as f64 / secs,
                        live.markers(),
                    );
                    (last_frames, last_cpu, last_at) = (frames, cpu, now);
                }
            }
        }
    }
    let now = Instant::now();
    let at_start = match at_start {
        Some(s) => s,
        None => Snapshot::take(now, server_pid, emulator_pid, me, metrics).await,
    };
    let at_end = match at_end {
        Some(s) => s,
        None => Snapshot::take(now, server_pid, emulator_pid, me, metrics).await,
    };
    let totals = ClientTotals::new(&outcomes, (at_start.at, at_end.at));
    let connected = outcomes.iter().filter(|o| o.connected).count();
    let measured = at_end
        .at
        .duration_since(at_start.at)
        .as_secs_f64()
        .max(1e-3);
    // Client-seconds of audio in the window: the clients that stayed connected.
    let audio_secs = measured * connected.max(1) as f64;
    let process =
        |before: Option<ProcSample>, after: Option<ProcSample>, baseline: Option<ProcSample>| {
            let (before, after) = (before?, after?);
            let cpu = (after.cpu.saturating_sub(before.cpu)).as_secs_f64();
            let growth = after
                .rss_bytes
                .saturating_sub(baseline.map_or(after.rss_bytes, |b| b.rss_bytes));
            Some(ProcessReport {
                cpu_cores: cpu / measured,
                cpu_ms_per_audio_sec: cpu * 1000.0 / audio_secs,
                rss_mib: after.rss_bytes as f64 / 1_048_576.0,
                rss_kib_per_session: growth as f64 / 1024.0 / connected.max(1) as f64,
            })
        };
    let stage_cpu_ms_per_audio_sec = match (&at_start.stages, &at_end.stages) {
        (Some(a), Some(b)) => b
            .iter()
            .map(|(stage, end)| {
                let start = a.get(stage).copied().unwrap_or(0.0);
                (
                    stage.clone(),
                    ((end - start) * 1000.0 / audio_secs * 1000.0).round() / 1000.0,
                )
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    let server = process(at_start.server, at_end.server, server_before);
    let loadtest = process(at_start.me, at_end.me, None);
    let server_cpu_per_loadtest_cpu = match (&server, &loadtest) {
        (Some(s), Some(l)) if l.cpu_cores > 0.0 => {
            Some((s.cpu_cores / l.cpu_cores * 1000.0).round() / 1000.0)
        }
        _ => None,
    };
    let mut report = Report {
        kind: "voxflow_loadtest",
        date: report::today(),
        gateway: match (args.spawn, args.reference) {
            (true, false) => "voxflow",
            (true, true) => "reference",
            (false, _) => "url",
        },
        mode: args.mode,
        encoding: args.encoding.as_str(),
        sample_rate_hertz: args.sample_rate_hertz,
        clients,
        connected,
        connect_errors: totals.connect_errors,
        session_errors: totals.session_errors,
        first_errors: totals.first_errors,
        measured_secs: (measured * 10.0).round() / 10.0,
        latency_ms: totals.latency,
        markers: totals.markers,
        lost_audio_ms: totals.lost_audio_ms,
        behind: totals.behind,
        server,
        emulator: process(at_start.emulator, at_end.emulator, None),
        server_cpu_per_loadtest_cpu,
        loadtest,
        stage_cpu_ms_per_audio_sec,
        slo: Slo {
            p99_bound_ms: args.slo_p99_ms,
            met: false,
        },
    };
    report.slo.met = report.meets(args.slo_p99_ms);
    Ok(report)
}

/// Process samples and stage counters at one instant.
struct Snapshot {
    at: Instant,
    server: Option<ProcSample>,
    emulator: Option<ProcSample>,
    me: Option<ProcSample>,
    stages: Option<BTreeMap<String, f64>>,
}

impl Snapshot {
    async fn take(
        at: Instant,
        server_pid: Option<u32>,
        emulator_pid: Option<u32>,
        me: u32,
        metrics: Option<&str>,
    ) -> Snapshot {
        let (server, emulator, me) = (
            server_pid.and_then(server::sample),
            emulator_pid.and_then(server::sample),
            server::sample(me),
        );
        let stages = match metrics {
            Some(metrics) => server::stage_seconds(metrics).await,
            None => None,
        };
        Snapshot {
            at,
            server,
            emulator,
            me,
            stages,
        }
    }
}
