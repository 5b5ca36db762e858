//! Test helpers: synthetic speech (espeak-ng + sox), word error rate, model paths.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// One sentence spoken by espeak-ng, as 16 kHz mono f32 samples. The American voice at
/// 130 words per minute: tiny.en mishears espeak-ng's default British voice far more
/// (measured on 8 sentences: mean WER 0.31 with the default, 0.06 with these).
pub fn speak(sentence: &str) -> Vec<f32> {
    let dir = std::env::temp_dir().join(format!("recognizer-tts-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("raw.wav");
    let out = dir.join("out.wav");
    let status = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "130"])
        .arg("-w")
        .arg(&raw)
        .arg(sentence)
        .status()
        .expect("espeak-ng is installed (deploy/runtime.sh)");
    assert!(status.success(), "espeak-ng failed");
    // -R: repeatable. Without it sox seeds its dither from the clock, the speech differs
    // from run to run, and tiny.en's transcript of it with it.
    let status = Command::new("sox")
        .arg("-R")
        .arg(&raw)
        .args(["-r", "16000", "-c", "1", "-b", "16"])
        .arg(&out)
        .status()
        .expect("sox is installed (deploy/runtime.sh)");
    assert!(status.success(), "sox failed");
    let mut reader = hound::WavReader::open(&out).unwrap();
    assert_eq!(reader.spec().sample_rate as usize, RATE);
    let samples = reader
        .samples::<i16>()
        .map(|s| f32::from(s.unwrap()) / 32768.0)
        .collect();
    std::fs::remove_dir_all(&dir).ok();
    samples
}

/// The sentences spoken one after another, with `gap_s` of silence before, between and
/// after them (so the VAD closes a segment per sentence).
pub fn conversation(sentences: &[&str], gap_s: f32) -> Vec<f32> {
    let gap = vec![0.0; (gap_s * RATE as f32) as usize];
    let mut audio = gap.clone();
    for sentence in sentences {
        audio.extend(speak(sentence));
        audio.extend_from_slice(&gap);
    }
    audio
}

/// The audio as pcm_s16le bytes, as a client sends it.
pub fn to_s16le(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|s| ((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_le_bytes())
        .collect()
}

fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Word error rate: word-level Levenshtein distance over the reference's word count,
/// ignoring case and punctuation.
pub fn wer(reference: &str, hypothesis: &str) -> f64 {
    let r = words(reference);
    let h = words(hypothesis);
    if r.is_empty() {
        return if h.is_empty() { 0.0 } else { 1.0 };
    }
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    for (i, rw) in r.iter().enumerate() {
        let mut cur = vec![i + 1; h.len() + 1];
        for (j, hw) in h.iter().enumerate() {
            let substitution = prev[j] + usize::from(rw != hw);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[h.len()] as f64 / r.len() as f64
}

#[test]
fn wer_counts_edits_over_reference_words() {
    assert_eq!(wer("The cat sat.", "the cat sat"), 0.0);
    assert_eq!(wer("the cat sat", "the bat sat"), 1.0 / 3.0);
    assert_eq!(wer("the cat sat", "the cat"), 1.0 / 3.0);
    assert_eq!(wer("the cat", "the cat sat down"), 1.0);
}
