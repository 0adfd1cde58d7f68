use std::time::Duration;

use pipeline::{AudioBatch, EngineInput, EngineResult};

use super::LatencyClock;

fn batch(start_sample: u64, samples: usize) -> EngineInput {
    EngineInput::Audio(AudioBatch {
        samples: vec![0; samples],
        sample_rate_hz: 16_000,
        start_sample,
        speech: true,
    })
}

fn result(is_final: bool, end_sample: u64) -> EngineResult {
    EngineResult {
        is_final,
        transcript: String::new(),
        stability: 1.0,
        confidence: 1.0,
        start_sample: 0,
        end_sample,
    }
}

/// A final is timed from the moment the batch holding its last sample reached the engine.
#[tokio::test(start_paused = true)]
async fn finals_are_timed_from_their_last_batch() {
    let mut clock = LatencyClock::new("test");
    clock.handed_over(&batch(0, 1600));
    tokio::time::advance(Duration::from_millis(100)).await;
    clock.handed_over(&batch(1600, 1600));
    tokio::time::advance(Duration::from_millis(100)).await;
    clock.handed_over(&EngineInput::Finalize);
    assert_eq!(
        clock.received(&result(false, 3200)),
        None,
        "interims are not finals"
    );
    tokio::time::advance(Duration::from_millis(250)).await;
    // Covers the first batch only: timed from t=0.
    assert_eq!(
        clock.received(&result(true, 1600)),
        Some(Duration::from_millis(450))
    );
    // The rest: timed from the second batch at t=100 ms.
    assert_eq!(
        clock.received(&result(true, 3200)),
        Some(Duration::from_millis(350))
    );
    // Nothing left to time.
    assert_eq!(clock.received(&result(true, 3200)), None);
    // A final ending inside a batch is timed from that batch, which stays for the next final.
    clock.handed_over(&batch(3200, 1600));
    tokio::time::advance(Duration::from_millis(50)).await;
    assert_eq!(
        clock.received(&result(true, 4000)),
        Some(Duration::from_millis(50))
    );
    assert_eq!(
        clock.received(&result(true, 4800)),
        Some(Duration::from_millis(50))
    );
}
