//! The demo page in headless Chromium, its microphone fed from a WAV file: the page connects,
//! streams, and shows the results.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use pipeline::testing::{CountingEngine, parse_counts};
use serde_json::Value;
use support::webdriver::{self, Browser};
use support::*;

/// The fixture is about 7 s long and plays once; the page streams this much of it.
const STREAM_SECONDS: f64 = 2.5;

#[tokio::test]
async fn the_demo_page_streams_the_microphone_and_shows_finals() {
    if !webdriver::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium (scripts/setup installs it)"
        );
        eprintln!(
            "\n\n*** SKIPPED the browser test: /usr/bin/chromium and /usr/bin/chromedriver are \
             not installed; run scripts/setup ***\n\n"
        );
        return;
    }
    let began = Instant::now();
    let (engine, _stall) = CountingEngine::new();
    let server = TestServer::start(test_config(), Arc::new(engine)).await;
    let browser = Browser::launch(&fixture("speech-16k.wav")).await;
    browser.goto(&format!("http://{}/", server.addr)).await;
    browser
        .eval("document.getElementById('start').click()")
        .await;

    // The engine's name arrives with `ready`; then the microphone streams.
    let engine = wait_for(
        &browser,
        "the engine name",
        "return $('engine').textContent",
        |v| v != "–",
    )
    .await;
    assert_eq!(engine, "counting");
    wait_for(
        &browser,
        &format!("{STREAM_SECONDS} s of audio sent"),
        "return sentSamples / RATE",
        |v| v.as_f64().is_some_and(|s| s >= STREAM_SECONDS),
    )
    .await;
    // Stop: the page stops the microphone and sends `stop`; the server answers with the final.
    let sent = browser
        .eval("document.getElementById('stop').click(); return sentSamples")
        .await
        .as_u64()
        .expect("sentSamples is a number");
    let finals = wait_for(&browser, "a final", "return $('finals').textContent", |v| {
        v.as_str().is_some_and(|s| !s.trim().is_empty())
    })
    .await;
    let finals = finals.as_str().unwrap().to_string();
    // Each final is `samples=N sum=S` for the audio since the previous one.
    let words: Vec<&str> = finals.split_whitespace().collect();
    let samples: u64 = words
        .chunks(2)
        .map(|pair| {
            parse_counts(&pair.join(" "))
                .unwrap_or_else(|| panic!("not a counting final: {finals:?}"))
                .0
        })
        .sum();
    // Everything the page's worklet produced reached the engine, in 20 ms frames at 16 kHz.
    assert_eq!(samples, sent, "finals {finals:?}");
    assert_eq!(samples % 320, 0, "{samples} samples");
    assert!(
        (40_000..=7 * 16_000).contains(&samples),
        "{samples} samples"
    );
    eprintln!(
        "browser test: {samples} samples in {finals:?}, {:.1} s in all",
        began.elapsed().as_secs_f64()
    );
}

/// The default engine (offline Whisper, the real model) behind the page: the words spoken into
/// the fake microphone appear as text.
#[tokio::test]
async fn spoken_words_appear_in_the_demo_page() {
    if !webdriver::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium (scripts/setup installs it)"
        );
        eprintln!(
            "\n\n*** SKIPPED the browser test: chromium/chromedriver missing; run scripts/setup ***\n\n"
        );
        return;
    }
    let settings = test_config().validate().expect("defaults are valid");
    let engine = voxflow::server::engine(&settings)
        .expect("the Whisper model is installed (scripts/setup --test installs it)");
    assert_eq!(engine.name(), "whisper");
    let server = TestServer::start(test_config(), engine).await;
    let wav = spoken(SENTENCE);
    let browser = Browser::launch(&wav).await;
    browser.goto(&format!("http://{}/", server.addr)).await;
    browser
        .eval("document.getElementById('start').click()")
        .await;
    // The whole recording plays, then the page stops and waits for the last final.
    let seconds = read_wav(&wav).len() as f64 / 16_000.0;
    wait_for(
        &browser,
        "the recording to play",
        "return sentSamples / RATE",
        move |v| v.as_f64().is_some_and(|s| s >= seconds),
    )
    .await;
    browser
        .eval("document.getElementById('stop').click()")
        .await;
    let text = wait_for(
        &browser,
        "the closing of the session",
        "return $('state').textContent",
        |v| v.as_str().is_some_and(|s| s.starts_with("closed")),
    )
    .await;
    assert_eq!(text, "closed (1000)");
    let finals = browser.eval("return $('finals').textContent").await;
    let finals = finals.as_str().unwrap().to_lowercase();
    let expected: Vec<&str> = SENTENCE
        .split_whitespace()
        .filter(|w| w.len() > 3)
        .collect();
    let heard: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|w| finals.contains(w))
        .collect();
    // tiny.en on espeak's voice gets most words right (WER ~0.12 in the engine's own test).
    assert!(
        heard.len() * 4 >= expected.len() * 3,
        "only {heard:?} of {expected:?} in {finals:?}"
    );
    let _ = std::fs::remove_file(wav);
}

const SENTENCE: &str = "please send the report to the main office before friday";

/// `text` spoken by espeak-ng, as a 16 kHz mono WAV with silence around it.
fn spoken(text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir();
    let raw = dir.join(format!("voxflow-browser-raw-{}.wav", std::process::id()));
    let wav = dir.join(format!("voxflow-browser-{}.wav", std::process::id()));
    let ok = std::process::Command::new("espeak-ng")
        .args(["-v", "en", "-s", "160", "-w"])
        .arg(&raw)
        .arg(text)
        .status()
        .expect("espeak-ng runs (scripts/setup --test installs it)")
        .success();
    assert!(ok);
    let ok = std::process::Command::new("sox")
        .arg(&raw)
        .args(["-r", "16000", "-c", "1", "-b", "16"])
        .arg(&wav)
        .args(["pad", "0.5", "1.0"])
        .status()
        .expect("sox runs")
        .success();
    assert!(ok);
    let _ = std::fs::remove_file(raw);
    wav
}

/// Poll `script` until `ok` holds for its value (at most 15 s); fail with the page's state.
async fn wait_for(
    browser: &Browser,
    what: &str,
    script: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let value = browser.eval(script).await;
        if ok(&value) {
            return value;
        }
        if Instant::now() > deadline {
            let page = browser
                .eval(
                    "return ['state', 'log', 'sent', 'counts', 'finals', 'partial']\
                     .map((id) => id + ': ' + $(id).textContent).join(' | ')",
                )
                .await;
            panic!("no {what} within 15 s (last {value}); page: {page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
