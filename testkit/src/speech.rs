//! Real speech for tests: espeak-ng speaks each sentence, sox converts it to 16 kHz mono
//! 16-bit, and sentences are joined with silence so that voice activity detection sees
//! separate segments. Both tools come from Debian (deploy/runtime.sh installs them).

use std::path::Path;
use std::process::Command;

use client::Recording;
use eventlog::{AudioEncoding, AudioFormat};

pub const SAMPLE_RATE: u32 = 16_000;

/// Speaks one sentence; 16 kHz mono 16-bit samples. The American voice at 130 words
/// per minute: tiny.en mishears espeak-ng's default voice far more (measured on 8
/// sentences: mean WER 0.31 with the default, 0.06 with this one).
pub fn speak(sentence: &str) -> Vec<i16> {
    let dir = std::env::temp_dir().join(format!("asr-speech-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let raw = dir.join("espeak.wav");
    let converted = dir.join("16k.wav");
    run(Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "130", "-w"])
        .arg(&raw)
        .arg(sentence));
    // -R: repeatable. Without it sox seeds its dither from the clock, so the speech,
    // and tiny.en's transcript of it, would differ from run to run.
    run(Command::new("sox")
        .arg("-R")
        .arg(&raw)
        .args(["-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer"])
        .arg(&converted));
    let samples = read_wav(&converted);
    let _ = std::fs::remove_dir_all(&dir);
    samples
}

/// The sentences spoken one after another, with `gap_ms` of silence before, between
/// and after them (so the VAD closes a segment per sentence); 16 kHz samples.
pub fn conversation(sentences: &[&str], gap_ms: u32) -> Vec<i16> {
    let gap = vec![0i16; (SAMPLE_RATE * gap_ms / 1000) as usize];
    let mut samples = gap.clone();
    for sentence in sentences {
        samples.extend(speak(sentence));
        samples.extend_from_slice(&gap);
    }
    samples
}

/// [`conversation`] as a recording a client streams.
pub fn sentences(sentences: &[&str], gap_ms: u32) -> Recording {
    Recording::from_i16(SAMPLE_RATE, &conversation(sentences, gap_ms))
}

/// [`sentences`] in another format a client may send: sox resamples the 16 kHz
/// conversation to `format`'s rate (with its own proper filtering) and encoding, so the
/// recording is what a telephone line (8 kHz) or a sound card (48 kHz, float) gives.
pub fn sentences_as(sentences: &[&str], gap_ms: u32, format: AudioFormat) -> Recording {
    let dir = std::env::temp_dir().join(format!("asr-speech-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (at_16k, converted) = (dir.join("16k.wav"), dir.join("converted.wav"));
    write_wav(&self::sentences(sentences, gap_ms), &at_16k);
    let (bits, encoding) = match format.encoding {
        AudioEncoding::PcmS16le => ("16", "signed-integer"),
        AudioEncoding::PcmF32le => ("32", "floating-point"),
    };
    run(Command::new("sox")
        .arg("-R")
        .arg(&at_16k)
        .args(["-r", &format.sample_rate.to_string(), "-c", "1"])
        .args(["-b", bits, "-e", encoding])
        .arg(&converted));
    let recording = Recording::read(&converted).expect("sox output");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(recording.format, format);
    recording
}

/// Samples as the model takes them, in [-1, 1).
pub fn to_f32(samples: &[i16]) -> Vec<f32> {
    samples.iter().map(|s| f32::from(*s) / 32768.0).collect()
}

/// Writes a recording as a WAV file.
pub fn write_wav(recording: &Recording, path: &Path) {
    recording.write(path).expect("write wav");
}

/// The samples of a 16-bit WAV file.
pub fn read_wav(path: &Path) -> Vec<i16> {
    hound::WavReader::open(path)
        .expect("sox output")
        .samples::<i16>()
        .collect::<Result<_, _>>()
        .expect("16-bit samples")
}

fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| {
        panic!("{command:?}: {e} (deploy/runtime.sh installs espeak-ng and sox)")
    });
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
