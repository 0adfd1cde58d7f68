use pipeline::{StreamConfig, SttEngine, SttError};

use super::session::{Segment, record_segment, to_session};
use super::{GoogleAuth, GoogleConfig, GoogleEngine, GoogleError};

fn emulator_config() -> GoogleConfig {
    GoogleConfig {
        endpoint: "http://127.0.0.1:9".into(),
        auth: GoogleAuth::None,
        ..GoogleConfig::default()
    }
}

fn stream_config() -> StreamConfig {
    StreamConfig {
        sample_rate_hz: 16_000,
        language_code: "en-US".into(),
        alternative_language_codes: Vec::new(),
        model: None,
        interim_results: true,
        punctuation: true,
        profanity_filter: false,
        word_time_offsets: false,
        phrase_hints: Vec::new(),
    }
}

#[test]
fn defaults_and_regional_endpoints_are_valid() {
    GoogleEngine::new(&GoogleConfig::default()).expect("defaults");
    let regional = GoogleConfig {
        endpoint: "https://eu-speech.googleapis.com".into(),
        ..GoogleConfig::default()
    };
    GoogleEngine::new(&regional).expect("regional");
    GoogleEngine::new(&emulator_config()).expect("emulator");
}

#[test]
fn bad_settings_are_refused_at_start_up() {
    for endpoint in [
        "speech.googleapis.com",
        "ftp://x",
        "https://x/v1",
        "http://",
    ] {
        let config = GoogleConfig {
            endpoint: endpoint.into(),
            ..GoogleConfig::default()
        };
        assert!(
            matches!(
                GoogleEngine::new(&config),
                Err(GoogleError::Endpoint { .. })
            ),
            "{endpoint}"
        );
    }
    let bad = [
        GoogleConfig {
            connections: 0,
            ..emulator_config()
        },
        GoogleConfig {
            max_streams_per_connection: 0,
            ..emulator_config()
        },
        GoogleConfig {
            rotate_after_secs: 305,
            ..emulator_config()
        },
        GoogleConfig {
            silence_close_ms: 10_000,
            ..emulator_config()
        },
        GoogleConfig {
            retry_initial_backoff_ms: 10_000,
            ..emulator_config()
        },
    ];
    for config in bad {
        assert!(
            matches!(GoogleEngine::new(&config), Err(GoogleError::Invalid { .. })),
            "{config:?}"
        );
    }
}

#[test]
fn config_parses_with_defaults_and_rejects_unknown_fields() {
    let config: GoogleConfig =
        serde_json::from_str(r#"{"endpoint": "http://127.0.0.1:50051", "auth": "none"}"#).unwrap();
    assert_eq!(config.auth, GoogleAuth::None);
    assert_eq!(config.rotate_after_secs, 240);
    assert!(serde_json::from_str::<GoogleConfig>(r#"{"timeout": 1}"#).is_err());
}

#[tokio::test]
async fn sessions_beyond_the_pool_are_refused_as_overloaded() {
    let config = GoogleConfig {
        connections: 2,
        max_streams_per_connection: 1,
        ..emulator_config()
    };
    let engine = GoogleEngine::new(&config).unwrap();
    let first = engine.open(stream_config()).unwrap();
    let _second = engine.open(stream_config()).unwrap();
    assert!(matches!(
        engine.open(stream_config()),
        Err(SttError::Overloaded(_))
    ));
    // Ending a session (no audio was sent: no I/O) returns its place.
    drop(first.audio);
    let mut results = first.results;
    assert!(results.recv().await.is_none());
    engine.open(stream_config()).expect("a place was returned");
}

#[test]
fn stream_positions_map_back_across_gaps() {
    let mut segments = Vec::new();
    record_segment(&mut segments, 0, 1_000, 320);
    record_segment(&mut segments, 320, 1_320, 320);
    // A gap on the session clock (the VAD gate kept silence back).
    record_segment(&mut segments, 640, 50_000, 320);
    assert_eq!(
        segments,
        [
            Segment {
                stream_start: 0,
                session_start: 1_000,
                len: 640
            },
            Segment {
                stream_start: 640,
                session_start: 50_000,
                len: 320
            },
        ]
    );
    assert_eq!(to_session(&segments, 0), Some(1_000));
    assert_eq!(to_session(&segments, 639), Some(1_639));
    assert_eq!(to_session(&segments, 640), Some(50_000));
    assert_eq!(to_session(&segments, 700), Some(50_060));
    assert_eq!(to_session(&segments, 10_000), Some(50_320));
    assert_eq!(to_session(&[], 10), None);
}

#[tokio::test]
async fn the_tls_pool_builds_without_connecting() {
    // rustls with ring, system and webpki roots; connecting waits for the first stream.
    let engine = GoogleEngine::new(&GoogleConfig::default()).unwrap();
    let pool = engine.shared.pool().unwrap();
    assert_eq!(pool.connections.len(), 4);
    let (_pool, connection, _slot) = engine.shared.pick().unwrap();
    assert_eq!(
        connection
            .streams
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
