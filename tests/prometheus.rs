//! Every PromQL expression of the dashboard and the alert rules, run against a real Prometheus
//! scraping voxflow on loopback while sessions stream audio.
//!
//! Prometheus (Debian package `prometheus`, installed by `.ci/run`) scrapes the in-process
//! server's `/metrics` every second and loads `grafana/alerts.yml`. Sessions stream speech
//! throughout; the faults the dashboard and alerts watch for are provoked once each so that
//! their expressions have something to show:
//! - drops and blocked sends: a `drop_newest` edge in front of a stalled engine;
//! - engine errors: an engine that rejects the stream after two batches;
//! - refusals: an engine at capacity, and a request for an unknown path;
//! - protocol errors: a malformed message mid-session.
//!
//! Each expression must parse, and must return data (a non-empty result) once Prometheus has a
//! few scrapes: dashboard queries as written (with `$stage` set to each stage in turn and
//! `$__rate_interval` to 10s), alert rules without their threshold (the query an alert compares),
//! plus the full rule for the alerts whose fault is provoked. Expressions on engine metrics that
//! the in-process counting engine does not emit (Google upstream, Whisper) must parse only; they
//! are listed when the test runs.
//!
//! Skips with a loud message when `prometheus` is not installed, unless `CI` is set.

#[path = "support/catalog.rs"]
mod catalog;
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use catalog::*;
use futures::SinkExt as _;
use pipeline::testing::CountingEngine;
use pipeline::{OverflowPolicy, StreamConfig, SttEngine, SttError, SttStream};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Grafana's `$__rate_interval` for a 1 s scrape interval is at least 4 scrapes; 10 s is safe.
const RATE_INTERVAL: &str = "10s";

/// Alerts whose full expression (threshold included) must hold after the provoked faults.
const PROVOKED_ALERTS: &[&str] = &["VoxflowAudioDropped", "VoxflowSessionsRefused"];

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Start Prometheus scraping `target` every second; `None` when it is not installed.
    fn start(target: SocketAddr) -> Option<Prometheus> {
        let binary = std::env::var("VOXFLOW_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        if Command::new(&binary)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("voxflow-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("grafana/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: voxflow\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(&binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Some(Prometheus { child, addr, dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            if let Ok((200, _)) = get(self.addr, "/-/ready").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `/api/v1/query`: the whole JSON answer.
    async fn query(&self, expr: &str) -> Value {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", expr)
            .finish();
        let (_, body) = get(self.addr, &format!("/api/v1/query?{query}"))
            .await
            .expect("prometheus answers");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// Query until the result is non-empty or `deadline` passes; the last answer.
    async fn query_until_data(&self, expr: &str, deadline: Instant) -> Value {
        loop {
            let answer = self.query(expr).await;
            if answer["status"] != "success" || has_data(&answer) || Instant::now() > deadline {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn has_data(answer: &Value) -> bool {
    match &answer["data"]["result"] {
        Value::Array(series) => !series.is_empty(),
        Value::Null => false,
        // A scalar or a string.
        _ => true,
    }
}

/// A plain HTTP/1.0 GET (no chunked encoding to undo): (status, body).
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// An engine at capacity: every stream is refused.
struct Full;

impl SttEngine for Full {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn vad_gate(&self) -> bool {
        false
    }

    fn open(&self, _: StreamConfig) -> Result<SttStream, SttError> {
        Err(SttError::Overloaded("test engine is full".into()))
    }
}

/// Stream the speech fixture through one session, with interims.
async fn speak(server: &TestServer, speech: &[i16]) {
    let mut client = server.connect("").await;
    client
        .send_json(json!({"type": "start", "audio_id": "p", "interim_results": true}))
        .await;
    for chunk in speech.chunks(320) {
        client.send_binary(le_bytes(chunk)).await;
    }
    client.send_json(json!({"type": "finalize"})).await;
    client.send_json(json!({"type": "stop"})).await;
    let result = client.collect().await;
    assert_eq!(result.close_code(), Some(1000));
}

/// Provoke each fault once (see the module docs).
async fn provoke_faults(main: &TestServer) {
    // Drops and blocked sends.
    let (engine, stall) = CountingEngine::new();
    stall.stall();
    let config = policy_config(OverflowPolicy::DropNewest);
    let dropping = TestServer::start(config, Arc::new(engine)).await;
    let mut client = dropping.connect("").await;
    for _ in 0..200 {
        client.send_binary(le_bytes(&[3; 320])).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stall.resume();
    client.send_json(json!({"type": "stop"})).await;
    assert!(
        client.collect().await.dropped_ms() > 0,
        "frames were dropped"
    );

    // Engine errors.
    let (mut engine, _stall) = CountingEngine::new();
    engine.fail_after_batches = Some(2);
    let failing = TestServer::start(test_config(), Arc::new(engine)).await;
    let mut client = failing.connect("").await;
    for chunk in speech_16k().chunks(320) {
        if client
            .ws
            .send(tokio_tungstenite::tungstenite::Message::binary(le_bytes(
                chunk,
            )))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(client.collect().await.error_code(), Some("engine_error"));

    // Refusals: the engine is full; a path that is not the stream.
    let full = TestServer::start(test_config(), Arc::new(Full)).await;
    let mut client = full.connect("").await;
    client.send_binary(le_bytes(&[0; 320])).await;
    assert_eq!(client.collect().await.error_code(), Some("overloaded"));
    let (status, _) = http_get(main.addr, "/not-here").await;
    assert_eq!(status, 404);

    // A protocol error mid-session.
    let mut client = main.connect("").await;
    client.send_binary(le_bytes(&[0; 320])).await;
    client.send_text("{not json").await;
    assert_eq!(client.collect().await.error_code(), Some("invalid_json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_expression_parses_and_returns_data() {
    let started = Instant::now();
    let (mut engine, _stall) = CountingEngine::new();
    engine.gate = true; // so the VAD gate's metric has samples
    let main = Arc::new(TestServer::start(test_config(), Arc::new(engine)).await);
    let Some(mut prometheus) = Prometheus::start(main.metrics_addr) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus is not installed, and CI must run this test (scripts/setup installs it)"
        );
        eprintln!(
            "\n\n!!!!!!!! SKIPPED tests/prometheus.rs: `prometheus` is not installed. \
             Run scripts/setup (Debian package `prometheus`) to check the dashboard and alert \
             expressions against a real Prometheus. !!!!!!!!\n\n"
        );
        return;
    };
    prometheus.wait_ready().await;

    // A first scrape sees the fault counters at zero, so the faults show as increases.
    let deadline = Instant::now() + Duration::from_secs(15);
    let answer = prometheus
        .query_until_data("voxflow_stage_items_dropped_total", deadline)
        .await;
    assert!(
        has_data(&answer),
        "no scrape: {answer}\n{}",
        prometheus.log()
    );

    // Speech streams for the rest of the test, two sessions at a time.
    let streaming = Arc::new(AtomicBool::new(true));
    let traffic = {
        let (main, streaming) = (Arc::clone(&main), Arc::clone(&streaming));
        tokio::spawn(async move {
            let speech = speech_16k();
            while streaming.load(Ordering::Relaxed) {
                tokio::join!(speak(&main, &speech), speak(&main, &speech));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    provoke_faults(&main).await;
    // A few scrapes and rule evaluations after the faults.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut failures = Vec::new();
    let mut report = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);

    // The dashboard, with its variables set.
    let dashboard: Value =
        serde_json::from_str(&repo_file("grafana/dashboards/voxflow.json")).unwrap();
    let mut queries = Vec::new();
    for (what, expr) in dashboard_expressions(&dashboard) {
        let expr = expr.replace("$__rate_interval", RATE_INTERVAL);
        if expr.contains("$stage") {
            for stage in pipeline::stage::ALL {
                queries.push((
                    format!("{what} stage={stage}"),
                    expr.replace("$stage", stage),
                ));
            }
        } else {
            queries.push((what, expr));
        }
    }
    for (what, expr) in &queries {
        check(
            &prometheus,
            what,
            expr,
            deadline,
            &mut failures,
            &mut report,
        )
        .await;
    }

    // The alert rules, as Prometheus loaded them.
    let (_, body) = get(prometheus.addr, "/api/v1/rules").await.unwrap();
    let rules: Value = serde_json::from_str(&body).unwrap();
    let rules: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(rules.len() >= 8, "prometheus loaded {} rules", rules.len());
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        let expr = rule["query"].as_str().unwrap();
        if rule["health"] == "err" {
            failures.push(format!(
                "{name}: rule evaluation failed: {}",
                rule["lastError"]
            ));
        }
        for annotation in ["summary", "description", "runbook"] {
            if rule["annotations"][annotation]
                .as_str()
                .unwrap_or("")
                .is_empty()
            {
                failures.push(format!("{name}: no {annotation} annotation"));
            }
        }
        let answer = prometheus.query(expr).await;
        if answer["status"] != "success" {
            failures.push(format!("{name}: does not parse: {answer}"));
            continue;
        }
        let Some((query, threshold)) = split_threshold(expr) else {
            failures.push(format!(
                "{name}: not of the form `<query> <comparison> <number>`"
            ));
            continue;
        };
        check(
            &prometheus,
            &format!("alert {name} (without `{threshold}`)"),
            query,
            deadline,
            &mut failures,
            &mut report,
        )
        .await;
        if PROVOKED_ALERTS.contains(&name) {
            let answer = prometheus.query_until_data(expr, deadline).await;
            if has_data(&answer) {
                report.push(format!(
                    "alert {name}: condition holds after the provoked fault"
                ));
            } else {
                failures.push(format!(
                    "{name}: the provoked fault does not meet the condition"
                ));
            }
        }
    }

    // The exposition itself, as Prometheus's own linter reads it: the exporter's families and
    // the per-thread ones rendered by voxflow, each declared once.
    let (status, text) = get(main.metrics_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool comes with prometheus");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let linted = promtool.wait_with_output().unwrap();
    if !linted.status.success() {
        failures.push(format!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&linted.stdout),
            String::from_utf8_lossy(&linted.stderr)
        ));
    }

    streaming.store(false, Ordering::Relaxed);
    traffic.await.unwrap();
    eprintln!("{}", report.join("\n"));
    eprintln!(
        "{} dashboard queries and {} alert rules checked in {:?}",
        queries.len(),
        rules.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Run `expr`: it must parse; it must return data unless it reads only engine metrics.
async fn check(
    prometheus: &Prometheus,
    what: &str,
    expr: &str,
    deadline: Instant,
    failures: &mut Vec<String>,
    report: &mut Vec<String>,
) {
    let engine_only = metric_names(expr).iter().any(|n| is_engine_metric(n));
    let answer = if engine_only {
        prometheus.query(expr).await
    } else {
        prometheus.query_until_data(expr, deadline).await
    };
    if answer["status"] != "success" {
        failures.push(format!("{what}: does not parse: {expr}\n  {answer}"));
    } else if has_data(&answer) {
        report.push(format!("data    {what}: {}", summary(&answer)));
    } else if engine_only {
        report.push(format!(
            "parsed  {what}: no data expected, engine metrics the counting engine does not emit"
        ));
    } else {
        failures.push(format!("{what}: no data: {expr}"));
    }
}

/// The values of an answer, shortened.
fn summary(answer: &Value) -> String {
    let values: Vec<String> = answer["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .map(|s| s["value"][1].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default();
    let nonzero = values
        .iter()
        .filter(|v| v.parse::<f64>().is_ok_and(|x| x != 0.0 && x.is_finite()))
        .count();
    format!("{} series, {nonzero} non-zero", values.len())
}
