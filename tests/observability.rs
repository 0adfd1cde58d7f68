//! What SREs rely on, checked without a Prometheus: the dashboard, the alert rules and the docs
//! name only catalog metrics; every catalog metric is documented; `/healthz` and `/readyz`; JSON
//! logs with the session span and no per-frame lines above `trace`.

#[path = "support/catalog.rs"]
mod catalog;
mod support;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use catalog::*;
use pipeline::metrics::CATALOG;
use pipeline::testing::CountingEngine;
use pipeline::{OverflowPolicy, StreamConfig, SttEngine, SttError, SttStream};
use serde_json::{Value, json};
use support::*;

fn dashboard() -> Value {
    serde_json::from_str(&repo_file("grafana/dashboards/voxflow.json")).expect("dashboard is JSON")
}

/// Names in `text` that neither the catalog nor a pending engine defines.
fn unknown_names(text: &str) -> Vec<String> {
    let mut unknown = Vec::new();
    for name in metric_names(text) {
        match resolve(&name) {
            Resolved::Catalog => {}
            Resolved::PendingEngine(engine) => eprintln!(
                "note: {name} is expected from the {engine} engine, which is not in the catalog yet"
            ),
            Resolved::Unknown => unknown.push(name),
        }
    }
    unknown
}

#[test]
fn dashboard_names_only_catalog_metrics() {
    let text = repo_file("grafana/dashboards/voxflow.json");
    assert!(metric_names(&text).len() > 10, "the scan finds the metrics");
    let unknown = unknown_names(&text);
    assert!(
        unknown.is_empty(),
        "grafana/dashboards/voxflow.json names metrics the catalog does not define: {unknown:?}"
    );
}

#[test]
fn alert_rules_name_only_catalog_metrics() {
    let unknown = unknown_names(&repo_file("grafana/alerts.yml"));
    assert!(
        unknown.is_empty(),
        "grafana/alerts.yml names metrics the catalog does not define: {unknown:?}"
    );
}

#[test]
fn docs_name_only_catalog_metrics_and_document_every_one() {
    let docs = repo_file("docs/metrics.md");
    let unknown = unknown_names(&docs);
    assert!(
        unknown.is_empty(),
        "docs/metrics.md names metrics the catalog does not define: {unknown:?}"
    );
    let documented = metric_names(&docs);
    let missing: Vec<_> = CATALOG
        .iter()
        .filter(|def| !documented.contains(def.name))
        .map(|def| def.name)
        .collect();
    assert!(
        missing.is_empty(),
        "catalog metrics missing from docs/metrics.md: {missing:?}"
    );
    // Each metric's type and labels are written next to it: `name` | type | labels.
    for def in CATALOG {
        let line = docs
            .lines()
            .find(|l| l.starts_with(&format!("| `{}`", def.name)))
            .unwrap_or_else(|| panic!("docs/metrics.md has no table row for {}", def.name));
        let kind = format!("{:?}", def.kind).to_lowercase();
        assert!(
            line.contains(&kind),
            "{}: type {kind} not in {line}",
            def.name
        );
        for label in def.labels {
            assert!(
                line.contains(&format!("`{label}`")),
                "{}: label {label} not in {line}",
                def.name
            );
        }
    }
}

#[test]
fn engine_metrics_match_the_catalog_once_the_engine_has_landed() {
    let wrong = engine_mismatches();
    assert!(
        wrong.is_empty(),
        "reconcile tests/support/catalog.rs ENGINE_METRICS, the dashboard and the alerts with the catalog:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn dashboard_stage_variable_lists_every_stage_in_graph_order() {
    let dashboard = dashboard();
    let stage = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "stage")
        .expect("a stage variable");
    let values: Vec<&str> = stage["query"].as_str().unwrap().split(',').collect();
    assert_eq!(values, pipeline::stage::ALL);
    // The repeated row and its panels use it.
    let rows: Vec<&Value> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["repeat"] == "stage")
        .collect();
    assert_eq!(rows.len(), 1, "one row repeated per stage");
}

#[test]
fn dashboard_panels_are_well_formed() {
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = std::collections::HashSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the grid");
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            !panel["description"].as_str().unwrap_or("").is_empty(),
            "{title}: say what the panel shows"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert!(!target["expr"].as_str().unwrap_or("").is_empty(), "{title}");
        }
    }
    // No two panels overlap on the grid.
    let rect = |p: &Value| {
        let g = &p["gridPos"];
        let n = |k: &str| g[k].as_u64().unwrap();
        (n("x"), n("y"), n("x") + n("w"), n("y") + n("h"))
    };
    for (i, a) in panels.iter().enumerate() {
        for b in &panels[i + 1..] {
            let ((ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1)) = (rect(a), rect(b));
            assert!(
                ax1 <= bx0 || bx1 <= ax0 || ay1 <= by0 || by1 <= ay0,
                "{} overlaps {}",
                a["title"],
                b["title"]
            );
        }
    }
    // Every $variable used in a query is defined (or one of Grafana's own).
    let defined: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    for (what, expr) in dashboard_expressions(&dashboard) {
        for part in expr.split('$').skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                name.starts_with("__") || defined.contains(&name),
                "{what}: ${name} is not a dashboard variable"
            );
        }
    }
}

#[test]
fn every_alert_has_a_summary_description_and_runbook() {
    let rules = repo_file("grafana/alerts.yml");
    let alerts = rules.matches("- alert: ").count();
    assert!(alerts >= 8, "{alerts} alerts");
    for annotation in ["summary: ", "description: ", "runbook: ", "severity: "] {
        assert_eq!(
            rules.matches(annotation).count(),
            alerts,
            "every alert needs `{annotation}`"
        );
    }
}

#[test]
fn thresholds_split_at_the_last_top_level_comparison() {
    assert_eq!(split_threshold("up == 0"), Some(("up", "== 0")));
    assert_eq!(
        split_threshold("sum by (a) (rate(x{a!=\"b\", c=~\"d>\"}[5m])) / y > 0.5"),
        Some(("sum by (a) (rate(x{a!=\"b\", c=~\"d>\"}[5m])) / y", "> 0.5"))
    );
    assert_eq!(split_threshold("a >= 1e-3"), Some(("a", ">= 1e-3")));
    assert_eq!(split_threshold("a > b"), None);
    assert_eq!(split_threshold("rate(x[5m])"), None);
}

/// A counting engine whose readiness the test sets.
struct Switchable {
    inner: CountingEngine,
    ready: Arc<AtomicBool>,
}

impl SttEngine for Switchable {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn vad_gate(&self) -> bool {
        self.inner.vad_gate()
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn open(&self, config: StreamConfig) -> Result<SttStream, SttError> {
        self.inner.open(config)
    }
}

#[tokio::test]
async fn readyz_follows_the_engine_and_healthz_stays_up() {
    let (inner, _stall) = CountingEngine::new();
    let ready = Arc::new(AtomicBool::new(false));
    let engine = Switchable {
        inner,
        ready: Arc::clone(&ready),
    };
    let server = TestServer::start(test_config(), Arc::new(engine)).await;
    let (status, body) = http_get(server.metrics_addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "engine not ready\n"));
    assert_eq!(http_get(server.metrics_addr, "/healthz").await.0, 200);
    ready.store(true, Ordering::Relaxed);
    assert_eq!(http_get(server.metrics_addr, "/readyz").await.0, 200);
}

/// Captured log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A session that streams 300 frames into a stalled engine under `drop_newest` (so the drop
/// path runs per frame), logged as JSON at `trace` on a current-thread runtime, where every
/// task of the session logs to this test's subscriber.
#[test]
fn json_logs_carry_the_session_span_and_nothing_per_frame_above_trace() {
    let captured = Captured::default();
    let (writer, log) = (captured.clone(), captured.clone());
    let subscriber = voxflow::logging::subscriber(
        true,
        tracing_subscriber::EnvFilter::new("trace"),
        move || writer.clone(),
    );
    let frames = 300u64;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dropped_frames = tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let (engine, stall) = CountingEngine::new();
            stall.stall();
            let config = policy_config(OverflowPolicy::DropNewest);
            let server = TestServer::start(config, Arc::new(engine)).await;
            let mut client = server.connect("").await;
            for _ in 0..frames {
                client.send_binary(le_bytes(&[5; 320])).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            stall.resume();
            client.send_json(json!({"type": "stop"})).await;
            let result = client.collect().await;
            assert!(result.dropped_ms() > 0, "the drop path ran");
            // The client may see the close before the session's task has logged its end.
            let deadline = tokio::time::Instant::now() + WAIT;
            while !String::from_utf8_lossy(&log.0.lock().unwrap()).contains("Session ended.")
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            result.dropped_ms() / 20
        })
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let above_trace: Vec<&Value> = events.iter().filter(|e| e["level"] != "TRACE").collect();
    let drops_traced = events
        .iter()
        .filter(|e| e["level"] == "TRACE" && e["fields"]["message"] == "Dropped an item.")
        .count() as u64;
    assert_eq!(drops_traced, dropped_frames, "each dropped frame is traced");
    assert!(
        above_trace.len() <= 10,
        "{} events above trace for one session of {frames} frames:\n{}",
        above_trace.len(),
        above_trace
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let ended = events
        .iter()
        .find(|e| e["fields"]["message"] == "Session ended.")
        .expect("the session logs its end");
    assert_eq!(ended["level"], "INFO");
    assert_eq!(ended["span"]["name"], "session");
    let id = ended["span"]["id"]
        .as_str()
        .expect("the span carries the session id");
    assert_eq!(id.len(), 16, "{id}");
    assert!(
        ended["span"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}
