//! The demo page in headless Chromium, its microphone fed from a WAV file: the page connects,
//! streams, and shows the results.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pipeline::testing::{CountingEngine, parse_counts};
use support::webdriver::{self, Browser};
use support::*;

#[tokio::test]
async fn the_demo_page_streams_the_microphone_and_shows_finals() {
    if !webdriver::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium (scripts/setup installs it)"
        );
        eprintln!("SKIPPED: chromium and chromedriver are not installed; run scripts/setup");
        return;
    }
    let (engine, _stall) = CountingEngine::new();
    let server = TestServer::start(test_config(), Arc::new(engine)).await;
    let browser = Browser::launch(&fixture("speech-16k.wav")).await;
    browser.goto(&format!("http://{}/", server.addr)).await;
    browser
        .eval("document.getElementById('start').click()")
        .await;
    // Let the fake microphone play for a few seconds, then stop: the page sends `stop`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    browser
        .eval("document.getElementById('stop').click()")
        .await;
    let mut finals = String::new();
    for _ in 0..100 {
        finals = browser
            .eval("return document.getElementById('finals').textContent")
            .await
            .as_str()
            .unwrap_or("")
            .to_string();
        if !finals.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (samples, _) =
        parse_counts(finals.trim()).unwrap_or_else(|| panic!("no final shown: {finals:?}"));
    // About three seconds of 16 kHz audio went through the page's worklet and the server.
    assert!(
        (16_000..=5 * 16_000).contains(&samples),
        "{samples} samples"
    );
    let engine = browser
        .eval("return document.getElementById('engine').textContent")
        .await;
    assert_eq!(engine, "counting");
}
