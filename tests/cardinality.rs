//! Series on `/metrics` do not grow with sessions: labels are closed sets, never a session id or
//! a peer. 1,000 short sessions (some failing on a bad message) come and go, about 50 at a time.
//! After the first 50 and after all 1,000, every label holds only values of its closed set and
//! no label has gained a value. (A rare event can still create a bounded series late, such as a
//! drop at egress while a session closes: a new combination of known values, listed if it
//! happens, never a new value.)

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;
use pipeline::testing::CountingEngine;
use serde_json::json;
use support::*;
use tokio::time::Instant;

const CONCURRENCY: usize = 50;

/// The series (name and labels) on a `/metrics` page.
fn series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').expect("name value").0.to_string())
        .collect()
}

/// Every `(label, value)` pair on a `/metrics` page.
fn label_values(series: &BTreeSet<String>) -> BTreeSet<(String, String)> {
    let mut pairs = BTreeSet::new();
    for s in series {
        let Some((_, labels)) = s.split_once('{') else {
            continue;
        };
        for pair in labels.trim_end_matches('}').split("\",") {
            let (key, value) = pair.split_once("=\"").expect("key=\"value\"");
            pairs.insert((key.to_string(), value.trim_end_matches('"').to_string()));
        }
    }
    pairs
}

/// Whether `value` is in the closed set of `label`.
fn closed(label: &str, value: &str) -> bool {
    use pipeline::metrics::{DropReason, ErrorKind, sessions};
    match label {
        "stage" => pipeline::stage::ALL.contains(&value),
        "reason" => {
            DropReason::ALL.iter().any(|r| r.as_str() == value)
                || sessions::CLOSE_REASONS.contains(&value)
                || sessions::REFUSE_REASONS.contains(&value)
        }
        "error" => ErrorKind::ALL.iter().any(|k| k.as_str() == value),
        // The protocol's codes this test can provoke, and the drop warning.
        "code" => ["invalid_json", "protocol_error", "audio_dropped"].contains(&value),
        "kind" => ["interim", "final"].contains(&value),
        "engine" => value == "counting",
        "version" => value == env!("CARGO_PKG_VERSION"),
        "le" => value == "+Inf" || value.parse::<f64>().is_ok(),
        _ => false,
    }
}

/// One short session: a start, a few frames, then stop, or (every fifth) a bad message.
async fn session(server: &TestServer, i: usize) {
    let mut client = server.connect("").await;
    client
        .send_json(json!({"type": "start", "audio_id": format!("s{i}"), "interim_results": true}))
        .await;
    for _ in 0..5 {
        client.send_binary(le_bytes(&[100; 320])).await;
    }
    if i.is_multiple_of(5) {
        client.send_text("{not json").await;
    } else {
        client.send_json(json!({"type": "stop"})).await;
    }
    let result = client.collect().await;
    assert!(result.close_code().is_some(), "session {i} closed");
}

async fn sessions(server: &TestServer, range: std::ops::Range<usize>) {
    futures::stream::iter(range)
        .map(|i| session(server, i))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

/// The value of an unlabelled series.
fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not on /metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_do_not_grow_with_sessions() {
    let (engine, _stall) = CountingEngine::new();
    let server = TestServer::start(test_config(), Arc::new(engine)).await;
    let started = Instant::now();

    sessions(&server, 0..50).await;
    let after_50 = server.metrics().await;
    sessions(&server, 50..1000).await;
    let after_1000 = server.metrics().await;
    eprintln!("1,000 sessions in {:?}", started.elapsed());

    assert_eq!(value(&after_1000, "voxflow_sessions_opened_total"), 1000.0);
    let (before, after) = (series(&after_50), series(&after_1000));
    eprintln!(
        "{} series after 50 sessions, {} after 1,000",
        before.len(),
        after.len()
    );
    let (values_50, values_1000) = (label_values(&before), label_values(&after));
    let open: Vec<_> = values_1000
        .iter()
        .filter(|(label, value)| !closed(label, value))
        .collect();
    assert!(
        open.is_empty(),
        "label values outside their closed sets: {open:?}"
    );
    let gained: Vec<_> = values_1000.difference(&values_50).collect();
    assert!(
        gained.is_empty(),
        "labels gained values between 50 and 1,000 sessions: {gained:?}"
    );
    let added: Vec<_> = after.difference(&before).collect();
    if !added.is_empty() {
        eprintln!("new combinations of known label values (bounded): {added:?}");
    }
    // Growth with sessions would add series per session; allow one late histogram at most.
    assert!(
        after.len() <= before.len() + 11,
        "{} series after 50 sessions, {} after 1,000",
        before.len(),
        after.len()
    );
    // Nothing session-specific in any label: no peer address, no audio_id.
    for line in after_1000.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains("127.0.0.1"), "a peer in a label: {line}");
        assert!(!line.contains("\"s1"), "an audio_id in a label: {line}");
    }
}
