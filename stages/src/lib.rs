//! voxflow's stages, one folder each, in graph order:
//!
//! `ingress → decode → resample → vad → batch → stt → egress`
//!
//! # Layout
//! Each stage folder has `mod.rs` (the runtime: a [`pipeline::Processor`] for pure transforms,
//! an async `run` where timers or I/O live), its `config.rs` where it has settings, and `tests.rs`.
//! Stages depend on `pipeline` only, never on each other.

pub mod batch;
pub mod decode;
pub mod egress;
pub mod ingress;
pub mod resample;
pub mod stt;
pub mod vad;

#[cfg(test)]
mod test_audio;
