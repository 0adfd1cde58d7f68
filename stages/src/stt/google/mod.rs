//! Google Cloud Speech-to-Text v1 `StreamingRecognize` engine. (Being written.)

mod config;

pub use config::GoogleConfig;
