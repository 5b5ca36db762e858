//! The engine on sherpa-rs 0.6.8: Whisper (offline) and silero VAD.
//!
//! The Whisper model is loaded once per process ([`WhisperModel::load`]) and shared by
//! every session; decodes are serialised on a mutex. That costs nothing on this
//! machine's two cores (one decode already uses both threads) and avoids relying on
//! sherpa-onnx's thread-safety for concurrent decodes of one recognizer. The VAD is per
//! session and cheap to create (~1 ms), which is how it is reset.
//!
//! ABI note: sherpa-rs 0.6.8's bindings predate the `durations` field that the 1.12.9
//! runtime's `SherpaOnnxOfflineRecognizerResult` has after `timestamps`. Only `text` (the
//! first field, unshifted) is read here; Whisper leaves `durations` null, so the
//! wrapper's token count reads as 0 and it touches nothing else.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sherpa_rs::silero_vad::{SileroVad, SileroVadConfig};
use sherpa_rs::whisper::{WhisperConfig, WhisperRecognizer};

use super::{EngineError, Recognizer, SpeechSegment, Vad, VadFactory};
use crate::audio::MODEL_SAMPLE_RATE;

/// File names of a sherpa-onnx Whisper tiny.en int8 export.
pub const WHISPER_ENCODER: &str = "tiny.en-encoder.int8.onnx";
pub const WHISPER_DECODER: &str = "tiny.en-decoder.int8.onnx";
pub const WHISPER_TOKENS: &str = "tiny.en-tokens.txt";

fn existing(path: PathBuf) -> Result<String, EngineError> {
    if path.is_file() {
        Ok(path.to_string_lossy().into_owned())
    } else {
        Err(EngineError::MissingModel {
            path: path.display().to_string(),
        })
    }
}

/// How the Whisper recognizer is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WhisperSettings {
    /// Decoder threads. Fixed, which also keeps decoding deterministic.
    pub threads: u16,
    /// Silent feature frames (10 ms each) appended after the audio so that Whisper
    /// finds the end of text. sherpa-onnx pads with 1000 (10 s) when not told; the
    /// encoder's cost grows with audio + padding, so fewer frames decode faster
    /// (`asr-bench decode` measures speed and accuracy per value; see
    /// docs/BENCHMARKS.md).
    pub tail_padding_frames: u16,
}

impl WhisperSettings {
    /// The recognizer's defaults (`asr recognizer --help`).
    pub const DEFAULT: Self = Self {
        threads: 2,
        tail_padding_frames: DEFAULT_TAIL_PADDING_FRAMES,
    };
}

/// See [`WhisperSettings::tail_padding_frames`].
pub const DEFAULT_TAIL_PADDING_FRAMES: u16 = 1000;

/// The process's one Whisper recognizer. Cheap to clone; clones share the model.
#[derive(Clone)]
pub struct WhisperModel {
    inner: Arc<Mutex<WhisperRecognizer>>,
}

impl WhisperModel {
    /// Loads the model from `dir`. Blocking, ~0.5 s.
    pub fn load(dir: &Path, settings: WhisperSettings) -> Result<Self, EngineError> {
        let config = WhisperConfig {
            encoder: existing(dir.join(WHISPER_ENCODER))?,
            decoder: existing(dir.join(WHISPER_DECODER))?,
            tokens: existing(dir.join(WHISPER_TOKENS))?,
            language: "en".into(),
            num_threads: Some(i32::from(settings.threads.max(1))),
            tail_paddings: Some(i32::from(settings.tail_padding_frames.max(1))),
            ..Default::default()
        };
        let recognizer = WhisperRecognizer::new(config).map_err(|e| EngineError::Load {
            what: "whisper",
            message: e.to_string(),
        })?;
        Ok(Self {
            inner: Arc::new(Mutex::new(recognizer)),
        })
    }
}

impl Recognizer for WhisperModel {
    fn transcribe(&mut self, samples: &[f32]) -> Result<String, EngineError> {
        if samples.is_empty() {
            return Ok(String::new());
        }
        // A panic inside a decode leaves the recognizer itself intact (sherpa-onnx keeps
        // no state between streams), so a poisoned lock is still usable.
        let mut recognizer = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let result = recognizer.transcribe(MODEL_SAMPLE_RATE, samples);
        drop(recognizer);
        let seconds = started.elapsed().as_secs_f64();
        let audio_seconds = samples.len() as f64 / f64::from(MODEL_SAMPLE_RATE);
        metrics::histogram!("recognizer_decode_seconds").record(seconds);
        metrics::histogram!("recognizer_decode_rtf_ratio").record(seconds / audio_seconds);
        Ok(result.text.trim().to_string())
    }
}

/// Silero VAD settings.
#[derive(Clone, Debug, PartialEq)]
pub struct VadSettings {
    pub model: PathBuf,
    /// Speech probability above which a window counts as speech.
    pub threshold: f32,
    /// Silence that closes a segment, seconds.
    pub min_silence: f32,
    /// Shorter bursts are not speech, seconds.
    pub min_speech: f32,
    /// Longer speech is cut here, seconds; well below Whisper's 30 s window.
    pub max_speech: f32,
}

impl VadSettings {
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            threshold: 0.5,
            min_silence: 0.5,
            min_speech: 0.25,
            max_speech: 20.0,
        }
    }
}

/// Makes silero VADs.
#[derive(Clone, Debug)]
pub struct SileroVadFactory {
    settings: VadSettings,
    model: String,
}

impl SileroVadFactory {
    pub fn new(settings: VadSettings) -> Result<Self, EngineError> {
        let model = existing(settings.model.clone())?;
        Ok(Self { settings, model })
    }
}

impl VadFactory for SileroVadFactory {
    type Vad = Silero;

    fn create(&self) -> Result<Silero, EngineError> {
        let config = SileroVadConfig {
            model: self.model.clone(),
            threshold: self.settings.threshold,
            min_silence_duration: self.settings.min_silence,
            min_speech_duration: self.settings.min_speech,
            max_speech_duration: self.settings.max_speech,
            sample_rate: MODEL_SAMPLE_RATE,
            window_size: Silero::WINDOW as i32,
            num_threads: Some(1),
            ..Default::default()
        };
        // The buffer must hold the longest segment plus the silence closing it.
        let buffer_seconds = self.settings.max_speech + 10.0;
        let vad = SileroVad::new(config, buffer_seconds).map_err(|e| EngineError::Load {
            what: "silero vad",
            message: e.to_string(),
        })?;
        Ok(Silero { vad })
    }
}

/// One session's silero VAD.
pub struct Silero {
    vad: SileroVad,
}

impl Vad for Silero {
    const WINDOW: usize = 512;

    fn accept(&mut self, window: &[f32]) {
        self.vad.accept_waveform(window.to_vec());
    }

    fn is_speech(&mut self) -> bool {
        self.vad.is_speech()
    }

    fn pop(&mut self) -> Option<SpeechSegment> {
        if self.vad.is_empty() {
            return None;
        }
        let segment = self.vad.front();
        self.vad.pop();
        Some(SpeechSegment {
            start: u64::try_from(segment.start).unwrap_or(0),
            samples: segment.samples,
        })
    }

    fn flush(&mut self) {
        self.vad.flush();
    }
}
