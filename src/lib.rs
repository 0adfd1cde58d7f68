//! voxflow: a gateway for live speech transcription.
//!
//! `ws ingress → decode → resample → vad → batch → stt → egress`
//!
//! Clients stream audio over a WebSocket (`/v1/stream`); each session runs the stages above as
//! tasks joined by bounded edges and gets partial and final transcripts back on the same socket.
//!
//! # Layout
//! - `main.rs`: the CLI (`serve`, `models`, `emulator`), logging, signals.
//! - [`config`]: the TOML/env configuration and its validation.
//! - [`server`]: listeners, HTTP upgrade, the per-session graph, `/metrics` and health.
//! - [`client`]: `voxflow stream`, a command-line client.
//! - [`models`]: `voxflow models install|convert`, the offline Whisper model and its converter.
//! - [`emulator`]: a Google-compatible Speech-to-Text server for development and tests.
//! - [`loadtest`]: `voxflow loadtest`, real-time clients measuring latency, loss, CPU, memory.
//! - [`logging`]: text or JSON log lines, one span per session.
//! - `pipeline` (crate): edges, processors, metrics catalog, shared types.
//! - `stages` (crate): one folder per stage.

pub mod client;
pub mod config;
pub mod emulator;
pub mod loadtest;
pub mod logging;
pub mod models;
pub mod server;

pub use config::{Config, Settings};
pub use server::{Server, run};
