//! The Google-compatible Speech-to-Text emulator (`voxflow emulator`). (Being written.)
