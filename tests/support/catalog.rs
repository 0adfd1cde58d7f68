//! Metric names in dashboards, alert rules and docs, checked against the catalog.
//!
//! Engines add their own metrics to the catalog on their own branches. The dashboard's engine
//! rows already use the names those engines are expected to register ([`ENGINE_METRICS`]): while
//! none of an engine's metrics is in the catalog the names are tolerated (and listed when the
//! tests run); as soon as one is, every name of that engine must be, so a rename on either side
//! fails here instead of leaving a dashboard panel silently empty.

#![allow(dead_code)]

use std::collections::BTreeSet;

use pipeline::metrics::{CATALOG, Kind};

/// The engines' metrics the dashboard and the alert rules expect, by engine.
pub const ENGINE_METRICS: &[(&str, &[(&str, Kind)])] = &[
    (
        "google",
        &[
            ("voxflow_stt_upstream_streams_opened_total", Kind::Counter),
            ("voxflow_stt_upstream_streams_active", Kind::Gauge),
            ("voxflow_stt_rotations_total", Kind::Counter),
            ("voxflow_stt_retries_total", Kind::Counter),
            ("voxflow_stt_replayed_audio_seconds", Kind::Histogram),
            ("voxflow_stt_upstream_streams_closed_total", Kind::Counter),
            ("voxflow_stt_upstream_open_seconds", Kind::Histogram),
        ],
    ),
    (
        "whisper",
        &[
            ("voxflow_whisper_queue_depth_jobs", Kind::Gauge),
            ("voxflow_whisper_queue_wait_seconds", Kind::Histogram),
            ("voxflow_whisper_decode_seconds", Kind::Histogram),
            ("voxflow_whisper_audio_decoded_seconds", Kind::Histogram),
            ("voxflow_whisper_interims_skipped_total", Kind::Counter),
            ("voxflow_whisper_streams_active", Kind::Gauge),
        ],
    ),
];

/// Every `voxflow_*` token in `text`.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("voxflow_") {
        let start = i + found;
        let boundary = start == 0 || {
            let before = bytes[start - 1];
            !(before.is_ascii_alphanumeric() || before == b'_')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary && end > start + "voxflow_".len() {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// How a name used in a query resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// A catalog metric (or a histogram's `_bucket`, `_sum`, `_count` series).
    Catalog,
    /// An engine metric whose engine has not landed in the catalog yet.
    PendingEngine(&'static str),
    Unknown,
}

fn kind_of(name: &str, defs: &[(&str, Kind)]) -> Option<Kind> {
    defs.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

fn resolve_in(name: &str, defs: &[(&str, Kind)]) -> bool {
    if kind_of(name, defs).is_some() {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| kind_of(base, defs) == Some(Kind::Histogram))
    })
}

pub fn catalog() -> Vec<(&'static str, Kind)> {
    CATALOG.iter().map(|d| (d.name, d.kind)).collect()
}

/// Whether any metric of `engine` is in the catalog (the engine has landed).
pub fn engine_landed(engine: &str) -> bool {
    let catalog = catalog();
    ENGINE_METRICS
        .iter()
        .filter(|(e, _)| *e == engine)
        .flat_map(|(_, defs)| defs.iter())
        .any(|(name, _)| kind_of(name, &catalog).is_some())
}

pub fn resolve(name: &str) -> Resolved {
    if resolve_in(name, &catalog()) {
        return Resolved::Catalog;
    }
    for (engine, defs) in ENGINE_METRICS {
        if resolve_in(name, defs) && !engine_landed(engine) {
            return Resolved::PendingEngine(engine);
        }
    }
    Resolved::Unknown
}

/// Whether `name` is an engine metric (landed or not): the in-process counting engine the
/// black-box tests use never emits these.
pub fn is_engine_metric(name: &str) -> bool {
    ENGINE_METRICS
        .iter()
        .any(|(_, defs)| resolve_in(name, defs))
}

/// The engine's expected metrics that the catalog lacks or types differently, once any of its
/// metrics has landed.
pub fn engine_mismatches() -> Vec<String> {
    let catalog = catalog();
    let mut wrong = Vec::new();
    for (engine, defs) in ENGINE_METRICS {
        if !engine_landed(engine) {
            continue;
        }
        for (name, kind) in defs.iter() {
            match kind_of(name, &catalog) {
                Some(k) if k == *kind => {}
                Some(k) => wrong.push(format!("{engine}: {name} is a {k:?} in the catalog, the dashboard expects a {kind:?}")),
                None => wrong.push(format!("{engine}: {name} is used by the dashboard or alerts but the catalog does not define it")),
            }
        }
    }
    wrong
}

/// The repository file at `path`, as text.
pub fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Every PromQL expression of the dashboard, as written (with template variables).
pub fn dashboard_expressions(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
    }
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or("?");
                let legend = target["legendFormat"].as_str().unwrap_or("");
                out.push((format!("{title} [{legend}]"), expr.to_string()));
            }
        }
    }
    out
}

/// Split `query > 0.5` into (`query`, `> 0.5`) at the last top-level comparison, when its right
/// side is a number.
pub fn split_threshold(expr: &str) -> Option<(&str, &str)> {
    let bytes = expr.as_bytes();
    let (mut depth, mut quote, mut last) = (0i32, None::<u8>, None::<usize>);
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(_) if c == b'\\' => i += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' | b'{' | b'[' => depth += 1,
                b')' | b'}' | b']' => depth -= 1,
                b'>' | b'<' if depth == 0 => last = Some(i),
                b'=' | b'!' if depth == 0 && bytes.get(i + 1) == Some(&b'=') => {
                    last = Some(i);
                    i += 1;
                }
                _ => {}
            },
        }
        i += 1;
    }
    let at = last?;
    let (left, right) = expr.split_at(at);
    let number = right.trim_start_matches(['>', '<', '=', '!']).trim();
    let number = number.strip_prefix("bool").unwrap_or(number).trim();
    number.parse::<f64>().ok()?;
    Some((left.trim_end(), right.trim()))
}
