//! Live counters shared by every client, for the progress line printed while a run goes on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets of 1 ms up to this; one more for everything above.
const BUCKETS_MS: usize = 1000;

pub struct Live {
    pub connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub errors: AtomicU64,
    pub behind: AtomicU64,
    pub frames: AtomicU64,
    pub dropped_ms: AtomicU64,
    markers: AtomicU64,
    /// Marker latencies since the last progress line.
    histogram: Vec<AtomicU64>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            connected: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            behind: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            dropped_ms: AtomicU64::new(0),
            markers: AtomicU64::new(0),
            histogram: (0..=BUCKETS_MS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Live {
    pub fn record(&self, latency: Duration) {
        self.markers.fetch_add(1, Ordering::Relaxed);
        let bucket = (latency.as_millis() as usize).min(BUCKETS_MS);
        self.histogram[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub fn markers(&self) -> u64 {
        self.markers.load(Ordering::Relaxed)
    }

    /// p50 and p99 (upper bucket edges, ms) of the latencies since the last call, and resets.
    pub fn take_percentiles(&self) -> Option<(u64, u64)> {
        let counts: Vec<u64> = self
            .histogram
            .iter()
            .map(|bucket| bucket.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let at = |q: f64| {
            let rank = (q * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (ms, &count) in counts.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return ms as u64 + 1;
                }
            }
            BUCKETS_MS as u64 + 1
        };
        Some((at(0.5), at(0.99)))
    }
}
