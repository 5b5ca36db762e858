//! Turning the client's audio bytes into what the model eats: mono f32 samples at 16 kHz.
//!
//! Audio is stored exactly as the client sent it (ARCHITECTURE.md, "Events"); the format
//! is recorded once, in `SessionOpened`, and repeated in the assignment. [`InputFormat`]
//! checks once, at the start of a session, that the format is one this build converts,
//! then converts chunk by chunk.
//!
//! Only 16 kHz `pcm_s16le` is accepted today. The shape leaves room for the rest:
//! `pcm_f32le` is one more arm in [`InputFormat::decode`], and integer-ratio resampling
//! (8 kHz up by 2, 48 kHz down by 3) fits behind [`InputFormat::model_to_client`], which
//! the replay point uses to map the segmenter's boundary (model rate) back to the
//! client's samples. A stateful resampler would be reset at the same boundary as the
//! VAD (invariant 6), which an integer ratio makes exact.

use eventlog::{AudioEncoding, AudioFormat};
use thiserror::Error;

/// The sample rate every model of this crate runs at.
pub const MODEL_SAMPLE_RATE: u32 = 16_000;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AudioError {
    #[error(
        "unsupported audio format {encoding:?} at {sample_rate} Hz (this build decodes pcm_s16le at 16000 Hz)"
    )]
    Unsupported {
        encoding: AudioEncoding,
        sample_rate: u32,
    },
    #[error("unknown audio encoding {0:?} (expected pcm_s16le or pcm_f32le)")]
    UnknownEncoding(String),
}

/// Parses the encoding names used on the gRPC API and in the client protocol.
pub fn parse_encoding(name: &str) -> Result<AudioEncoding, AudioError> {
    AudioEncoding::from_name(name).ok_or_else(|| AudioError::UnknownEncoding(name.to_string()))
}

/// One chunk's samples at the model rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub samples: Vec<f32>,
    /// Bytes at the end of the chunk that do not make a whole sample. They are dropped
    /// (the caller reports it): a chunk boundary is always a sample boundary, which keeps
    /// `sample_in_chunk` of a replay point meaningful on its own.
    pub trailing_bytes: usize,
}

/// A session's input format, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputFormat {
    format: AudioFormat,
}

impl InputFormat {
    pub fn new(format: AudioFormat) -> Result<Self, AudioError> {
        match (format.encoding, format.sample_rate) {
            (AudioEncoding::PcmS16le, MODEL_SAMPLE_RATE) => Ok(Self { format }),
            (encoding, sample_rate) => Err(AudioError::Unsupported {
                encoding,
                sample_rate,
            }),
        }
    }

    pub fn format(&self) -> AudioFormat {
        self.format
    }

    /// Number of client samples in a chunk of `len` bytes.
    pub fn client_samples(&self, len: usize) -> usize {
        len / self.format.encoding.bytes_per_sample()
    }

    /// Converts a chunk of the client's bytes.
    pub fn decode(&self, bytes: &[u8]) -> Decoded {
        let width = self.format.encoding.bytes_per_sample();
        let whole = bytes.len() - bytes.len() % width;
        let samples = match self.format.encoding {
            AudioEncoding::PcmS16le => bytes[..whole]
                .chunks_exact(2)
                .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
                .collect(),
            // Refused by `new` until it is needed; kept exhaustive so adding it is local.
            AudioEncoding::PcmF32le => bytes[..whole]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        };
        Decoded {
            samples,
            trailing_bytes: bytes.len() - whole,
        }
    }

    /// Maps a sample index at the model rate to the client's rate (identity at 16 kHz).
    pub fn model_to_client(&self, model_sample: u64) -> u64 {
        model_sample * u64::from(self.format.sample_rate) / u64::from(MODEL_SAMPLE_RATE)
    }

    /// Maps a sample index at the client's rate to the model rate (identity at 16 kHz).
    pub fn client_to_model(&self, client_sample: u64) -> u64 {
        client_sample * u64::from(MODEL_SAMPLE_RATE) / u64::from(self.format.sample_rate)
    }
}

/// Milliseconds of audio in `samples` at the model rate.
pub fn samples_to_ms(samples: u64) -> u64 {
    samples * 1000 / u64::from(MODEL_SAMPLE_RATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s16(rate: u32) -> AudioFormat {
        AudioFormat {
            sample_rate: rate,
            encoding: AudioEncoding::PcmS16le,
        }
    }

    #[test]
    fn s16le_at_16k_converts_to_unit_floats() {
        let input = InputFormat::new(s16(16_000)).unwrap();
        let bytes: Vec<u8> = [0i16, i16::MAX, i16::MIN, -16384]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let decoded = input.decode(&bytes);
        assert_eq!(decoded.trailing_bytes, 0);
        assert_eq!(decoded.samples, vec![0.0, 32767.0 / 32768.0, -1.0, -0.5]);
        assert_eq!(input.client_samples(bytes.len()), 4);
    }

    #[test]
    fn a_trailing_half_sample_is_reported_not_decoded() {
        let input = InputFormat::new(s16(16_000)).unwrap();
        let decoded = input.decode(&[0, 0, 1]);
        assert_eq!(decoded.samples.len(), 1);
        assert_eq!(decoded.trailing_bytes, 1);
    }

    #[test]
    fn other_formats_are_refused_with_a_typed_error() {
        assert_eq!(
            InputFormat::new(s16(8_000)),
            Err(AudioError::Unsupported {
                encoding: AudioEncoding::PcmS16le,
                sample_rate: 8_000
            })
        );
        let f32le = AudioFormat {
            sample_rate: 16_000,
            encoding: AudioEncoding::PcmF32le,
        };
        assert!(matches!(
            InputFormat::new(f32le),
            Err(AudioError::Unsupported { .. })
        ));
        assert_eq!(
            parse_encoding("opus"),
            Err(AudioError::UnknownEncoding("opus".into()))
        );
        assert_eq!(parse_encoding("pcm_s16le"), Ok(AudioEncoding::PcmS16le));
    }

    #[test]
    fn sample_times() {
        assert_eq!(samples_to_ms(16_000), 1000);
        assert_eq!(samples_to_ms(8), 0);
        let input = InputFormat::new(s16(16_000)).unwrap();
        assert_eq!(input.model_to_client(12345), 12345);
        assert_eq!(input.client_to_model(12345), 12345);
    }
}
