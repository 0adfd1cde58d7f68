//! The per-item metrics, kept per thread and summed when `/metrics` is scraped.
//!
//! Every frame passes every stage, so these series move hundreds of thousands of times a second
//! on a loaded gateway. Through the `metrics` crate each increment is an atomic add on a cache
//! line that every session shares, and each histogram sample a push into a shared queue kept
//! until upkeep; at 1,000 sessions that was ~13% of the gateway's CPU, mostly the two cores
//! passing those lines back and forth. Here each thread owns a shard that only it writes (plain
//! loads and stores, no locked instructions); a scrape sums the shards, so values are exact
//! whenever they are read. A thread that exits folds its shard into a retired total first.
//!
//! The families here are rendered by [`render`]; the `metrics` exporter never sees them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{
    AUDIO_FRAME, CATALOG, STAGE_PROCESSING, STAGE_QUEUE_DEPTH, STAGE_RECEIVED, STAGE_SENT,
};
use super::{Kind, VAD_GATED};
use crate::stage;

const STAGES: usize = stage::ALL.len();

/// Bucket bounds of `voxflow_stage_processing_seconds`, in nanoseconds.
pub(super) const PROCESSING_BOUNDS_NS: [u64; 13] = [
    1_000,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
];

/// Bucket bounds of the audio-duration histograms, in nanoseconds.
pub(super) const AUDIO_BOUNDS_NS: [u64; 8] = [
    10_000_000,
    20_000_000,
    40_000_000,
    60_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
];

/// Add to a cell only its own thread writes (or one written under the registry lock): a load
/// and a store, where `fetch_add` would be a locked instruction.
fn add(cell: &AtomicU64, n: u64) {
    cell.store(cell.load(Relaxed).wrapping_add(n), Relaxed);
}

fn add_signed(cell: &AtomicI64, n: i64) {
    cell.store(cell.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Bucket counts (the last is `+Inf`) and the sum, in nanoseconds.
struct Hist<const B: usize> {
    buckets: [AtomicU64; B],
    sum_ns: AtomicU64,
}

impl<const B: usize> Hist<B> {
    fn new() -> Self {
        Hist {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn record(&self, bounds: &[u64], ns: u64) {
        // `le` is inclusive; past the last bound is the `+Inf` bucket.
        let index = bounds.partition_point(|&bound| bound < ns);
        add(&self.buckets[index], 1);
        add(&self.sum_ns, ns);
    }

    fn fold_into(&self, total: &Hist<B>) {
        for (from, to) in self.buckets.iter().zip(&total.buckets) {
            add(to, from.load(Relaxed));
        }
        add(&total.sum_ns, self.sum_ns.load(Relaxed));
    }
}

const PROCESSING_BUCKETS: usize = PROCESSING_BOUNDS_NS.len() + 1;
const AUDIO_BUCKETS: usize = AUDIO_BOUNDS_NS.len() + 1;

/// One thread's share of every series.
struct Shard {
    received: [AtomicU64; STAGES],
    sent: [AtomicU64; STAGES],
    queue_depth: [AtomicI64; STAGES],
    processing: [Hist<PROCESSING_BUCKETS>; STAGES],
    audio_frame: Hist<AUDIO_BUCKETS>,
    vad_gated: Hist<AUDIO_BUCKETS>,
}

impl Shard {
    fn new() -> Shard {
        Shard {
            received: std::array::from_fn(|_| AtomicU64::new(0)),
            sent: std::array::from_fn(|_| AtomicU64::new(0)),
            queue_depth: std::array::from_fn(|_| AtomicI64::new(0)),
            processing: std::array::from_fn(|_| Hist::new()),
            audio_frame: Hist::new(),
            vad_gated: Hist::new(),
        }
    }

    fn fold_into(&self, total: &Shard) {
        for stage in 0..STAGES {
            add(&total.received[stage], self.received[stage].load(Relaxed));
            add(&total.sent[stage], self.sent[stage].load(Relaxed));
            add_signed(
                &total.queue_depth[stage],
                self.queue_depth[stage].load(Relaxed),
            );
            self.processing[stage].fold_into(&total.processing[stage]);
        }
        self.audio_frame.fold_into(&total.audio_frame);
        self.vad_gated.fold_into(&total.vad_gated);
    }
}

/// Every live thread's shard, and what exited threads left behind.
struct Registry {
    live: Vec<Arc<Shard>>,
    retired: Shard,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn registry() -> MutexGuard<'static, Option<Registry>> {
    // The lock guards plain counters: still consistent after a panic elsewhere.
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut guard = registry();
    let registry = guard.get_or_insert_with(|| Registry {
        live: Vec::new(),
        retired: Shard::new(),
    });
    f(registry)
}

/// A thread's handle on its shard; folds it into the retired total when the thread exits.
struct Local(Arc<Shard>);

impl Local {
    fn register() -> Local {
        let shard = Arc::new(Shard::new());
        with_registry(|registry| registry.live.push(Arc::clone(&shard)));
        Local(shard)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        with_registry(|registry| {
            self.0.fold_into(&registry.retired);
            registry.live.retain(|shard| !Arc::ptr_eq(shard, &self.0));
        });
    }
}

thread_local! {
    static LOCAL: Local = Local::register();
}

/// Run `f` on this thread's shard; while the thread is exiting (its shard already folded), on
/// the retired total under the lock, so nothing recorded is lost.
fn with_shard(f: impl Fn(&Shard)) {
    if LOCAL.try_with(|local| f(&local.0)).is_err() {
        with_registry(|registry| f(&registry.retired));
    }
}

/// A stage's index in [`stage::ALL`], the only values of the `stage` label.
///
/// # Panics
/// When `stage` is not a stage id: a programming error, caught by every test that builds a
/// stage.
pub(super) fn stage_index(stage: &str) -> usize {
    stage::ALL
        .iter()
        .position(|s| *s == stage)
        .unwrap_or_else(|| panic!("{stage:?} is not a stage id (pipeline::stage::ALL)"))
}

pub(super) fn received(stage: usize, n: u64) {
    with_shard(|shard| add(&shard.received[stage], n));
}

pub(super) fn sent(stage: usize, n: u64) {
    with_shard(|shard| add(&shard.sent[stage], n));
}

pub(super) fn queue_depth(stage: usize, delta: i64) {
    with_shard(|shard| add_signed(&shard.queue_depth[stage], delta));
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

pub(super) fn processing(stage: usize, elapsed: Duration) {
    let ns = nanos(elapsed);
    with_shard(|shard| shard.processing[stage].record(&PROCESSING_BOUNDS_NS, ns));
}

pub(super) fn audio_frame(duration: Duration) {
    let ns = nanos(duration);
    with_shard(|shard| shard.audio_frame.record(&AUDIO_BOUNDS_NS, ns));
}

pub(super) fn vad_gated(duration: Duration) {
    let ns = nanos(duration);
    with_shard(|shard| shard.vad_gated.record(&AUDIO_BOUNDS_NS, ns));
}

/// The sum over every shard, live and retired.
fn totals() -> Shard {
    with_registry(|registry| {
        let total = Shard::new();
        registry.retired.fold_into(&total);
        for shard in &registry.live {
            shard.fold_into(&total);
        }
        total
    })
}

/// Append these families, in the Prometheus text format, to `out`.
pub fn render(out: &mut String) {
    let total = totals();
    let load = |cells: &[AtomicU64; STAGES]| cells.each_ref().map(|c| c.load(Relaxed));
    family(out, STAGE_RECEIVED, "counter");
    per_stage(out, STAGE_RECEIVED, &load(&total.received));
    family(out, STAGE_SENT, "counter");
    per_stage(out, STAGE_SENT, &load(&total.sent));
    family(out, STAGE_QUEUE_DEPTH, "gauge");
    per_stage(
        out,
        STAGE_QUEUE_DEPTH,
        &total.queue_depth.each_ref().map(|c| c.load(Relaxed)),
    );
    family(out, STAGE_PROCESSING, "histogram");
    for (stage, hist) in stage::ALL.iter().zip(&total.processing) {
        histogram(
            out,
            STAGE_PROCESSING,
            &format!("stage=\"{stage}\","),
            &PROCESSING_BOUNDS_NS,
            hist,
        );
    }
    family(out, AUDIO_FRAME, "histogram");
    histogram(out, AUDIO_FRAME, "", &AUDIO_BOUNDS_NS, &total.audio_frame);
    family(out, VAD_GATED, "histogram");
    histogram(out, VAD_GATED, "", &AUDIO_BOUNDS_NS, &total.vad_gated);
}

/// The names this module renders, so the exporter's output can be checked not to repeat them.
pub const NAMES: [&str; 6] = [
    STAGE_RECEIVED,
    STAGE_SENT,
    STAGE_QUEUE_DEPTH,
    STAGE_PROCESSING,
    AUDIO_FRAME,
    VAD_GATED,
];

fn family(out: &mut String, name: &str, kind: &str) {
    let help = CATALOG
        .iter()
        .find(|def| def.name == name)
        .map_or("", |def| def.help);
    debug_assert!(CATALOG.iter().any(|def| def.name == name
        && matches!(
            (def.kind, kind),
            (Kind::Counter, "counter") | (Kind::Gauge, "gauge") | (Kind::Histogram, "histogram")
        )));
    // The text format escapes only backslashes and newlines in help text.
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn per_stage<T: std::fmt::Display>(out: &mut String, name: &str, values: &[T; STAGES]) {
    for (stage, value) in stage::ALL.iter().zip(values) {
        let _ = writeln!(out, "{name}{{stage=\"{stage}\"}} {value}");
    }
}

/// `labels` is empty or ends with a comma, ready for `le`.
fn histogram<const B: usize>(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[u64],
    hist: &Hist<B>,
) {
    let mut cumulative = 0;
    for (index, bucket) in hist.buckets.iter().enumerate() {
        cumulative += bucket.load(Relaxed);
        match bounds.get(index) {
            Some(&ns) => {
                let le = ns as f64 / 1e9;
                let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
            }
        }
    }
    let labels = labels.trim_end_matches(',');
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let sum = hist.sum_ns.load(Relaxed) as f64 / 1e9;
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of one rendered line, by its exact series.
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    fn rendered() -> String {
        let mut out = String::new();
        render(&mut out);
        out
    }

    // Other tests in this process record too: compare before and after, on one series each
    // that nothing else here touches.
    #[test]
    fn counts_from_every_thread_survive_the_threads_exit() {
        let index = stage_index(stage::EGRESS);
        let series = r#"voxflow_stage_items_received_total{stage="egress"}"#;
        let before = value(&rendered(), series);
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(move || received(index, 250)))
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        received(index, 1);
        assert_eq!(value(&rendered(), series), before + 1_001.0);
    }

    #[test]
    fn histograms_are_cumulative_with_exact_sum_and_count() {
        let index = stage_index(stage::STT);
        let name = "voxflow_stage_processing_seconds";
        let before = rendered();
        let series = |suffix: &str, le: Option<&str>| match le {
            Some(le) => format!(r#"{name}{suffix}{{stage="stt",le="{le}"}}"#),
            None => format!(r#"{name}{suffix}{{stage="stt"}}"#),
        };
        let delta = |after: &str, suffix: &str, le: Option<&str>| {
            value(after, &series(suffix, le)) - value(&before, &series(suffix, le))
        };
        // 1 µs exactly (inclusive bound), 3 µs, 7 ms, and 2 s (past every bound).
        for ns in [1_000, 3_000, 7_000_000, 2_000_000_000] {
            processing(index, Duration::from_nanos(ns));
        }
        let after = rendered();
        assert_eq!(delta(&after, "_bucket", Some("0.000001")), 1.0);
        assert_eq!(delta(&after, "_bucket", Some("0.000005")), 2.0);
        assert_eq!(delta(&after, "_bucket", Some("0.01")), 3.0);
        assert_eq!(delta(&after, "_bucket", Some("0.1")), 3.0);
        assert_eq!(delta(&after, "_bucket", Some("+Inf")), 4.0);
        assert_eq!(delta(&after, "_count", None), 4.0);
        let sum = delta(&after, "_sum", None);
        assert!((sum - 2.007_004).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn a_gauge_is_the_sum_of_its_moves_across_threads() {
        let index = stage_index(stage::RESAMPLE);
        let series = r#"voxflow_stage_queue_depth_items{stage="resample"}"#;
        let before = value(&rendered(), series);
        queue_depth(index, 3);
        std::thread::spawn(move || queue_depth(index, -2))
            .join()
            .unwrap();
        assert_eq!(value(&rendered(), series), before + 1.0);
    }

    #[test]
    fn every_family_is_declared_once_with_help_and_type() {
        let text = rendered();
        for name in NAMES {
            let types = text
                .lines()
                .filter(|l| l.starts_with(&format!("# TYPE {name} ")))
                .count();
            assert_eq!(types, 1, "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
    }
}
