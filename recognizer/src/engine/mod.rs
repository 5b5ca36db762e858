//! The seams between the worker and the models.
//!
//! Two levels, so that either kind of model fits:
//!
//! - [`SessionDecoder`]: what the worker drives, one per session: audio in, partials,
//!   finals and replay points out. [`crate::segmenter::Segmenter`] implements it for
//!   offline models (VAD cuts segments, the recognizer decodes each one); a streaming
//!   (online) transducer would implement it directly, emitting a replay point at each
//!   of its endpoints, where it resets its stream.
//! - [`Recognizer`] and [`Vad`] (made by a [`VadFactory`]): the parts an offline
//!   [`SessionDecoder`] is built from. [`sherpa`] implements them with sherpa-rs
//!   (Whisper, silero VAD); unit tests implement them with fakes.
//!
//! Sample positions here are at the model rate ([`crate::audio::MODEL_SAMPLE_RATE`]),
//! counted from the start of the session's audio.

pub mod sherpa;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(
        "model file {path} is missing (run deploy/runtime.sh, or pass --model-dir/--vad-model)"
    )]
    MissingModel { path: String },
    #[error("loading {what}: {message}")]
    Load { what: &'static str, message: String },
    #[error("decoding: {0}")]
    Decode(String),
}

/// Where decoding can restart with no hidden state: a fresh decoder started at
/// `session_sample` with `next_segment` reproduces everything a straight run produces
/// after it (ARCHITECTURE.md invariant 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResumePoint {
    pub session_sample: u64,
    pub next_segment: u32,
}

/// A piece of transcript with its audio range (session samples, end exclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    pub segment: u32,
    pub text: String,
    pub start_sample: u64,
    pub end_sample: u64,
}

/// What a [`SessionDecoder`] reports, in the order it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecoderEvent {
    /// A provisional transcript of the segment still open; superseded by later ones.
    Partial(Transcript),
    /// A segment's transcript, final.
    Final(Transcript),
    /// The decoder reset all its state here; everything reported before this event
    /// belongs to audio before `session_sample`.
    ReplayPoint(ResumePoint),
}

/// One session's decoder: audio in, events out. Blocking (it runs models); call it
/// from a blocking thread.
pub trait SessionDecoder: Send {
    /// Feeds samples following the ones fed before.
    fn accept(&mut self, samples: &[f32]) -> Result<Vec<DecoderEvent>, EngineError>;
    /// Decodes the open segment now, if speech is ongoing. Expensive for offline models:
    /// the caller decides how often.
    fn partial(&mut self) -> Result<Option<Transcript>, EngineError>;
    /// End of the session's audio: closes the open segment and reports what remains.
    fn finish(&mut self) -> Result<Vec<DecoderEvent>, EngineError>;
    /// Whether a segment is open (speech ongoing).
    fn in_speech(&self) -> bool;
    /// Session samples accepted so far.
    fn position(&self) -> u64;
    /// Index the next final will carry.
    fn next_segment(&self) -> u32;
}

/// An offline recognizer: one call per segment.
pub trait Recognizer: Send {
    fn transcribe(&mut self, samples: &[f32]) -> Result<String, EngineError>;
}

/// A finished speech segment as a VAD hands it out.
#[derive(Clone, Debug, PartialEq)]
pub struct SpeechSegment {
    /// First sample of the segment, counted from the VAD's creation.
    pub start: u64,
    pub samples: Vec<f32>,
}

/// A voice-activity detector fed fixed windows of [`Vad::WINDOW`] samples.
pub trait Vad: Send {
    const WINDOW: usize;
    fn accept(&mut self, window: &[f32]);
    /// Whether the detector is inside speech right now.
    fn is_speech(&mut self) -> bool;
    /// The next finished segment, if any.
    fn pop(&mut self) -> Option<SpeechSegment>;
    /// Closes an open segment (end of audio), making it available to [`Vad::pop`].
    fn flush(&mut self);
}

/// Makes fresh VADs: resetting a VAD means replacing it (sherpa-rs's has no reset).
pub trait VadFactory: Send {
    type Vad: Vad;
    fn create(&self) -> Result<Self::Vad, EngineError>;
}
