//! A client of the streaming protocol (docs/protocol.md).
//!
//! [`wav`] reads the audio to send; [`stream`] opens a session, sends the audio at a
//! chosen pace (real time, N times faster, or as fast as acknowledgements allow),
//! reports what the server says as it arrives, and returns the session's
//! [`Outcome`] with the timings tests and benchmarks need; [`words`] compares
//! transcripts (word error rate, word diff).

pub mod stream;
pub mod wav;
pub mod words;

pub use stream::{ClientError, Observed, Outcome, StreamOptions, stream};
pub use wav::{Recording, WavError};
