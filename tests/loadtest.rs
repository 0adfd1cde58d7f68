//! A smoke run of `voxflow loadtest` so it cannot rot: the real binary spawns the emulator and
//! a server, streams espeak-ng speech with latency markers from a few clients in both forms,
//! and its JSON report must show every marker back exactly once, nothing lost, and the server
//! observed. The big runs (1,000 clients, the capacity search) live in BENCHMARKS.md, not here.

use std::process::Command;

use serde_json::Value;

fn loadtest(extra: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_voxflow"))
        .args([
            "loadtest",
            "--spawn",
            "--clients",
            "8",
            "--ramp-secs",
            "1",
            "--duration-secs",
            "4",
            "--progress-secs",
            "0",
            // A debug build on a shared CI machine: the bound only has to catch a marker that
            // waits for something (a timer, a batch), not measure the server.
            "--slo-p99-ms",
            "400",
        ])
        .args(extra)
        .output()
        .expect("the voxflow binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "loadtest failed: {}\n{stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .find(|l| l.contains(r#""kind":"voxflow_loadtest""#))
        .unwrap_or_else(|| panic!("no JSON report in:\n{stdout}\n{stderr}"));
    serde_json::from_str(line).expect("the report is JSON")
}

fn assert_clean(report: &Value, mode: &str) {
    assert_delivered(report, mode);
    assert!(
        report["stage_cpu_ms_per_audio_sec"]["vad"]
            .as_f64()
            .is_some(),
        "{report}"
    );
    // Both processes were measured: the ratio is a positive number.
    assert!(
        report["server_cpu_per_loadtest_cpu"]
            .as_f64()
            .is_some_and(|ratio| ratio > 0.0),
        "{report}"
    );
}

/// Every marker back once, nothing lost, nobody behind, the server process observed.
fn assert_delivered(report: &Value, mode: &str) {
    let markers = &report["markers"];
    let sent = markers["sent"].as_u64().unwrap();
    // 8 clients × ~5 s of streaming, one marker a second.
    assert!(sent >= 8 * 4, "{mode}: only {sent} markers sent: {report}");
    assert_eq!(markers["received"], markers["sent"], "{mode}: {report}");
    for key in ["lost", "duplicated", "misplaced"] {
        assert_eq!(markers[key], 0, "{mode}: {key}: {report}");
    }
    assert_eq!(report["lost_audio_ms"], 0, "{mode}: {report}");
    assert_eq!(report["connected"], 8, "{mode}: {report}");
    assert_eq!(report["session_errors"], 0, "{mode}: {report}");
    assert_eq!(report["behind"]["clients"], 0, "{mode}: {report}");
    let latency = &report["latency_ms"];
    assert!(latency["samples"].as_u64().unwrap() > 0, "{mode}: {report}");
    let (p50, p99) = (
        latency["p50"].as_f64().unwrap(),
        latency["p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{mode}: {report}");
    assert_eq!(report["slo"]["met"], true, "{mode}: {report}");
    // The server was observed: its process (and, for voxflow, its per-stage time).
    assert!(
        report["server"]["rss_mib"].as_f64().unwrap() > 1.0,
        "{report}"
    );
}

#[test]
fn loadtest_smoke_json_and_binary() {
    let json = loadtest(&["--mode", "json"]);
    assert_clean(&json, "json");
    assert_eq!(json["mode"], "json");
    let binary = loadtest(&[
        "--mode",
        "binary",
        "--encoding",
        "MULAW",
        "--sample-rate-hertz",
        "8000",
    ]);
    assert_clean(&binary, "binary");
    assert_eq!(binary["encoding"], "MULAW");
}

/// The bare-minimum reference gateway BENCHMARKS.md compares voxflow with, in both forms.
#[test]
fn loadtest_smoke_reference_gateway() {
    for mode in ["json", "binary"] {
        let report = loadtest(&["--reference", "--mode", mode]);
        assert_delivered(&report, mode);
    }
}
