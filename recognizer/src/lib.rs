//! The recognition worker.
//!
//! A worker registers with the orchestrator, takes session assignments, replays each
//! session's audio from its checkpoint, decodes it with Whisper and silero VAD, and
//! appends partial and final results to the session's result stream.
//!
//! - [`audio`]: the client's bytes to model samples (pure);
//! - [`engine`]: the decoder seams, and their sherpa-rs implementation;
//! - [`segmenter`]: VAD-cut offline decoding with exact replay points (pure);
//! - [`worker`]: the process: registration, heartbeats, one task per session;
//! - [`config`]: the flags (with environment fallbacks).
//!
//! [`run`] is the entry point the `asr recognizer` subcommand calls.

pub mod audio;
pub mod config;
pub mod engine;
pub mod offline;
pub mod segmenter;
pub mod worker;

pub use config::RecognizerArgs;
pub use worker::run;
