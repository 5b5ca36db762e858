//! Test helpers: model paths, and the workspace's speech and word-error-rate helpers
//! (`testkit`) in the shapes these tests use.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const RATE: usize = 16_000;

pub fn runtime_models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.runtime/models")
}

pub fn whisper_dir() -> PathBuf {
    runtime_models().join("whisper-tiny.en")
}

pub fn vad_model() -> PathBuf {
    runtime_models().join("silero_vad.onnx")
}

/// One sentence spoken by espeak-ng (see `testkit::speech`), as 16 kHz mono f32.
pub fn speak(sentence: &str) -> Vec<f32> {
    testkit::speech::to_f32(&testkit::speech::speak(sentence))
}

/// The sentences spoken one after another, with `gap_s` of silence before, between and
/// after them (so the VAD closes a segment per sentence).
pub fn conversation(sentences: &[&str], gap_s: f32) -> Vec<f32> {
    let gap_ms = (gap_s * 1000.0) as u32;
    testkit::speech::to_f32(&testkit::speech::conversation(sentences, gap_ms))
}

/// The audio as pcm_s16le bytes, as a client sends it.
pub fn to_s16le(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|s| ((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_le_bytes())
        .collect()
}

pub use testkit::wer::word_error_rate as wer;
