//! The WebSocket wire protocol (see `docs/protocol.md`). Keep it stable.
//!
//! Client → server text frames are JSON objects with a `type`; a message without `type` but
//! with `content` is audio, so clients written for the Python tutorial keep working. Binary
//! frames are audio in the session's encoding. Server → client frames are [`ServerMessage`]s.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::Encoding;
use crate::session::{SessionError, close_code};

/// Fields of a `start` message (all optional; each defaults from config). The same names are
/// accepted as URL query parameters.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartFields {
    pub audio_id: Option<String>,
    pub encoding: Option<String>,
    pub sample_rate_hertz: Option<u32>,
    pub audio_channel_count: Option<u16>,
    pub language_code: Option<String>,
    pub alternative_language_codes: Option<Vec<String>>,
    pub model: Option<String>,
    pub interim_results: Option<bool>,
    pub enable_automatic_punctuation: Option<bool>,
    pub profanity_filter: Option<bool>,
    pub enable_word_time_offsets: Option<bool>,
    pub phrase_hints: Option<Vec<String>>,
}

/// One parsed client text message. Audio content borrows from the frame when it can.
#[derive(Debug, PartialEq)]
pub enum ClientMessage<'a> {
    Start(Box<StartFields>),
    Audio {
        audio_id: Option<Cow<'a, str>>,
        content: Cow<'a, str>,
    },
    Finalize,
    Stop,
    KeepAlive,
}

/// Every key any message may carry; which keys a type allows is checked after parsing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    audio_id: Option<Text<'a>>,
    #[serde(borrow, default)]
    content: Option<Text<'a>>,
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default)]
    sample_rate_hertz: Option<u32>,
    #[serde(default)]
    audio_channel_count: Option<u16>,
    #[serde(default)]
    language_code: Option<String>,
    #[serde(default)]
    alternative_language_codes: Option<Vec<String>>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    interim_results: Option<bool>,
    #[serde(default)]
    enable_automatic_punctuation: Option<bool>,
    #[serde(default)]
    profanity_filter: Option<bool>,
    #[serde(default)]
    enable_word_time_offsets: Option<bool>,
    #[serde(default)]
    phrase_hints: Option<Vec<String>>,
}

/// A JSON string that borrows from the frame unless it had escapes. (serde's own `Cow` impl
/// always copies when nested in an `Option`; audio content is the hot path.)
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visitor(std::marker::PhantomData))
    }
}

impl Raw<'_> {
    fn has_start_fields(&self) -> bool {
        self.encoding.is_some()
            || self.sample_rate_hertz.is_some()
            || self.audio_channel_count.is_some()
            || self.language_code.is_some()
            || self.alternative_language_codes.is_some()
            || self.model.is_some()
            || self.interim_results.is_some()
            || self.enable_automatic_punctuation.is_some()
            || self.profanity_filter.is_some()
            || self.enable_word_time_offsets.is_some()
            || self.phrase_hints.is_some()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("invalid JSON message: {0}")]
    Json(String),
    #[error("unknown message type {0:?}; expected start, audio, finalize, stop or keepalive")]
    UnknownType(String),
    #[error("{0}")]
    Invalid(String),
    #[error("unsupported encoding {0:?}; expected one of LINEAR16, OPUS, MULAW, ALAW, FLOAT32")]
    Encoding(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Violation(String),
}

impl ProtocolError {
    /// The `error` message and close code for this error.
    pub fn to_session_error(&self) -> SessionError {
        let (code, close) = match self {
            ProtocolError::Json(_) => ("invalid_json", close_code::INVALID_PAYLOAD),
            ProtocolError::UnknownType(_) => ("unknown_type", close_code::POLICY_VIOLATION),
            ProtocolError::Invalid(_) => ("invalid_message", close_code::POLICY_VIOLATION),
            ProtocolError::Encoding(_) | ProtocolError::Unsupported(_) => {
                ("unsupported_audio", close_code::UNSUPPORTED_DATA)
            }
            ProtocolError::Violation(_) => ("protocol_error", close_code::POLICY_VIOLATION),
        };
        SessionError {
            code,
            message: self.to_string(),
            close_code: close,
        }
    }
}

/// Parse one client text frame.
///
/// # Errors
/// Invalid JSON, an unknown type or field, or fields that do not belong to the type.
pub fn parse(text: &str) -> Result<ClientMessage<'_>, ProtocolError> {
    let raw: Raw<'_> = serde_json::from_str(text).map_err(|e| {
        // Well-formed JSON with a misspelt key is a protocol mistake, not bad JSON.
        let message = e.to_string();
        if e.is_data() && message.starts_with("unknown field") {
            ProtocolError::Invalid(message)
        } else {
            ProtocolError::Json(message)
        }
    })?;
    let kind = raw.kind.as_ref().map(|k| k.0.as_ref());
    let only_type = |name: &str| {
        if raw.content.is_some() || raw.has_start_fields() {
            Err(ProtocolError::Invalid(format!(
                "a {name} message takes no other fields"
            )))
        } else {
            Ok(())
        }
    };
    match kind {
        Some("audio") | None => {
            if raw.has_start_fields() {
                return Err(ProtocolError::Invalid(
                    "audio messages carry only audio_id and content; send format fields in start"
                        .into(),
                ));
            }
            let content = raw.content.map(|c| c.0).ok_or_else(|| {
                ProtocolError::Invalid(if kind.is_none() {
                    "message has neither type nor content".into()
                } else {
                    "audio message without content".into()
                })
            })?;
            Ok(ClientMessage::Audio {
                audio_id: raw.audio_id.map(|a| a.0),
                content,
            })
        }
        Some("start") => {
            if raw.content.is_some() {
                return Err(ProtocolError::Invalid(
                    "start carries no content; send audio after it".into(),
                ));
            }
            Ok(ClientMessage::Start(Box::new(StartFields {
                audio_id: raw.audio_id.map(|a| a.0.into_owned()),
                encoding: raw.encoding,
                sample_rate_hertz: raw.sample_rate_hertz,
                audio_channel_count: raw.audio_channel_count,
                language_code: raw.language_code,
                alternative_language_codes: raw.alternative_language_codes,
                model: raw.model,
                interim_results: raw.interim_results,
                enable_automatic_punctuation: raw.enable_automatic_punctuation,
                profanity_filter: raw.profanity_filter,
                enable_word_time_offsets: raw.enable_word_time_offsets,
                phrase_hints: raw.phrase_hints,
            })))
        }
        Some("finalize") => only_type("finalize").map(|()| ClientMessage::Finalize),
        Some("stop") => only_type("stop").map(|()| ClientMessage::Stop),
        Some("keepalive") => only_type("keepalive").map(|()| ClientMessage::KeepAlive),
        Some(other) => Err(ProtocolError::UnknownType(other.to_string())),
    }
}

/// Parse an encoding name as clients send it.
///
/// # Errors
/// [`ProtocolError::Encoding`] for an unknown name.
pub fn parse_encoding(name: &str) -> Result<Encoding, ProtocolError> {
    Encoding::parse(name).ok_or_else(|| ProtocolError::Encoding(name.to_string()))
}

/// The effective session configuration, echoed in `ready`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectiveConfig {
    pub audio_id: String,
    pub encoding: Encoding,
    pub sample_rate_hertz: u32,
    pub audio_channel_count: u16,
    pub language_code: String,
    pub interim_results: bool,
    pub engine: &'static str,
    pub engine_sample_rate_hertz: u32,
}

/// Server → client messages.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Ready {
        session_id: &'a str,
        config: &'a EffectiveConfig,
    },
    Transcript {
        audio_id: &'a str,
        is_final: bool,
        transcript: &'a str,
        stability: f32,
        confidence: f32,
        start_ms: u64,
        end_ms: u64,
    },
    Warning {
        code: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        dropped_ms: Option<u64>,
    },
    Error {
        code: &'static str,
        message: &'a str,
        /// With close 1013: how long the client should wait before reconnecting.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Closed {
        reason: &'static str,
    },
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tutorial_form_is_audio() {
        let msg = parse(r#"{"audio_id":"a1","content":"AAAA"}"#).unwrap();
        assert_eq!(
            msg,
            ClientMessage::Audio {
                audio_id: Some("a1".into()),
                content: "AAAA".into()
            }
        );
        assert!(matches!(
            parse(r#"{"type":"audio","content":"AAAA"}"#),
            Ok(ClientMessage::Audio { .. })
        ));
    }

    #[test]
    fn a_retry_hint_is_sent_only_when_given() {
        let with = ServerMessage::Error {
            code: "overloaded",
            message: "busy",
            retry_after_ms: Some(1_000),
        }
        .to_json();
        assert!(with.contains(r#""retry_after_ms":1000"#), "{with}");
        let without = ServerMessage::Error {
            code: "invalid_json",
            message: "bad",
            retry_after_ms: None,
        }
        .to_json();
        assert!(!without.contains("retry_after_ms"), "{without}");
    }

    #[test]
    fn content_borrows_from_the_frame() {
        let text = r#"{"content":"AAAA"}"#.to_string();
        match parse(&text).unwrap() {
            ClientMessage::Audio {
                content: Cow::Borrowed(_),
                ..
            } => {}
            other => panic!("expected borrowed content, got {other:?}"),
        }
    }

    #[test]
    fn start_and_controls() {
        let msg = parse(r#"{"type":"start","encoding":"OPUS","sample_rate_hertz":48000,"interim_results":false}"#)
            .unwrap();
        let ClientMessage::Start(fields) = msg else {
            panic!()
        };
        assert_eq!(fields.encoding.as_deref(), Some("OPUS"));
        assert_eq!(fields.sample_rate_hertz, Some(48_000));
        assert_eq!(parse(r#"{"type":"finalize"}"#), Ok(ClientMessage::Finalize));
        assert_eq!(parse(r#"{"type":"stop"}"#), Ok(ClientMessage::Stop));
        assert_eq!(
            parse(r#"{"type":"keepalive"}"#),
            Ok(ClientMessage::KeepAlive)
        );
    }

    #[test]
    fn bad_messages_get_their_codes() {
        let code = |text: &str| parse(text).unwrap_err().to_session_error();
        assert_eq!(code("{not json").code, "invalid_json");
        assert_eq!(code("{not json").close_code, 1007);
        assert_eq!(code(r#"{"type":"dance"}"#).code, "unknown_type");
        assert_eq!(
            code(r#"{"type":"start","sample_rate":16000}"#).code,
            "invalid_message"
        );
        assert_eq!(
            code(r#"{"type":"stop","content":"AA"}"#).code,
            "invalid_message"
        );
        assert_eq!(code(r#"{"audio_id":"x"}"#).code, "invalid_message");
        assert_eq!(
            parse_encoding("FLAC")
                .unwrap_err()
                .to_session_error()
                .close_code,
            1003
        );
    }

    #[test]
    fn server_messages_are_tagged() {
        let json = ServerMessage::Closed { reason: "stop" }.to_json();
        assert_eq!(json, r#"{"type":"closed","reason":"stop"}"#);
    }
}

/// Property tests: the parser takes any text a client could send without panicking, and what it
/// returns is never larger than what it was given.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    const KEYS: [&str; 16] = [
        "type",
        "audio_id",
        "content",
        "encoding",
        "sample_rate_hertz",
        "audio_channel_count",
        "language_code",
        "alternative_language_codes",
        "model",
        "interim_results",
        "enable_automatic_punctuation",
        "profanity_filter",
        "enable_word_time_offsets",
        "phrase_hints",
        "sample_rate",
        "",
    ];

    /// JSON values of every kind, nested a little.
    fn value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            prop::sample::select(vec![
                "start",
                "audio",
                "stop",
                "finalize",
                "keepalive",
                "AAAA"
            ])
            .prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".{0,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Objects built mostly from the protocol's own keys, so parsing gets past the JSON layer.
    fn message() -> impl Strategy<Value = String> {
        prop::collection::btree_map(prop::sample::select(KEYS.to_vec()), value(), 0..6).prop_map(
            |fields| {
                serde_json::Value::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                )
                .to_string()
            },
        )
    }

    fn check(text: &str) -> Result<(), TestCaseError> {
        match parse(text) {
            Ok(ClientMessage::Audio { audio_id, content }) => {
                prop_assert!(content.len() <= text.len());
                prop_assert!(audio_id.is_none_or(|id| id.len() <= text.len()));
            }
            Ok(_) => {}
            // Every error maps to a documented code and close code.
            Err(error) => {
                let session = error.to_session_error();
                prop_assert!(!session.code.is_empty());
                prop_assert!((1000..=1015).contains(&session.close_code));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}") {
            check(&text)?;
        }

        #[test]
        fn protocol_shaped_json_never_panics(text in message()) {
            check(&text)?;
        }

        #[test]
        fn truncated_messages_never_panic(text in message(), cut in any::<prop::sample::Index>()) {
            let mut end = cut.index(text.len() + 1);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            check(&text[..end])?;
        }

        #[test]
        fn any_encoding_name_is_parsed_or_refused(name in ".{0,20}") {
            let _ = parse_encoding(&name);
        }
    }
}
