//! Turning the client's audio bytes into what the model eats: mono f32 samples at 16 kHz.
//!
//! Audio is stored exactly as the client sent it (ARCHITECTURE.md, "Events"); the format
//! is recorded once, in `SessionOpened`, and repeated in the assignment. [`InputFormat`]
//! checks once, at the start of a session, that the format is one this build converts;
//! a [`Converter`] then converts chunk by chunk.
//!
//! Accepted: `pcm_s16le` and `pcm_f32le`, mono, at 8, 16 or 48 kHz. The rates are
//! integer ratios of the model's, and the conversions are chosen so that a replay point
//! stays exact (invariant 6): every model sample depends only on client samples at or
//! after the replay point's, so a converter started fresh there produces the same
//! samples as one that ran from the session's start.
//!
//! - 48 kHz: each model sample is the mean of three client samples (`3m..3m+3`). A
//!   replay point is a model sample `m`, so client sample `3m` starts a group in both
//!   runs.
//! - 8 kHz: model samples `2k` and `2k+1` are client sample `k` and the midpoint of `k`
//!   and `k+1` (linear interpolation). Replay points fall on even model samples (the
//!   VAD's 512-sample windows), so client sample `m/2` is where both runs start.
//!
//! The price of exactness is filtering quality: a 3-sample mean is a weak anti-alias
//! filter (it lets part of 8-16 kHz fold into the band), and linear interpolation a
//! weak reconstruction. Speech carries little energy up there; the end-to-end tests
//! hold the word error rate at every rate to the same bound as at 16 kHz.

use eventlog::{AudioEncoding, AudioFormat};
use thiserror::Error;

/// The sample rate every model of this crate runs at.
pub const MODEL_SAMPLE_RATE: u32 = 16_000;

/// Client sample rates a session may declare (the system's list, converted here).
pub const SUPPORTED_RATES: [u32; 3] = AudioFormat::SAMPLE_RATES;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AudioError {
    #[error(
        "unsupported sample rate {sample_rate} Hz for {encoding:?} (this build takes 8000, 16000 or 48000)"
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

/// How client samples become model samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ratio {
    /// 16 kHz: one for one.
    Same,
    /// 8 kHz: two model samples per client sample.
    Up2,
    /// 48 kHz: one model sample per three client samples.
    Down3,
}

/// A session's input format, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputFormat {
    format: AudioFormat,
    ratio: Ratio,
}

impl InputFormat {
    pub fn new(format: AudioFormat) -> Result<Self, AudioError> {
        let ratio = match format.sample_rate {
            8_000 => Ratio::Up2,
            16_000 => Ratio::Same,
            48_000 => Ratio::Down3,
            sample_rate => {
                return Err(AudioError::Unsupported {
                    encoding: format.encoding,
                    sample_rate,
                });
            }
        };
        Ok(Self { format, ratio })
    }

    pub fn format(&self) -> AudioFormat {
        self.format
    }

    /// Number of client samples in a chunk of `len` bytes.
    pub fn client_samples(&self, len: usize) -> usize {
        len / self.format.encoding.bytes_per_sample()
    }

    /// Bytes of `samples` client samples.
    pub fn client_bytes(&self, samples: usize) -> usize {
        samples * self.format.encoding.bytes_per_sample()
    }

    /// A converter for a run that starts at the session's start or at a replay point.
    pub fn converter(&self) -> Converter {
        Converter {
            input: *self,
            pending: Vec::with_capacity(3),
        }
    }

    /// Maps a sample index at the model rate to the client's rate. Exact at replay
    /// points (see the module documentation).
    pub fn model_to_client(&self, model_sample: u64) -> u64 {
        match self.ratio {
            Ratio::Same => model_sample,
            Ratio::Up2 => model_sample / 2,
            Ratio::Down3 => model_sample * 3,
        }
    }

    /// Maps a sample index at the client's rate to the model rate.
    pub fn client_to_model(&self, client_sample: u64) -> u64 {
        match self.ratio {
            Ratio::Same => client_sample,
            Ratio::Up2 => client_sample * 2,
            Ratio::Down3 => client_sample / 3,
        }
    }
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

/// Converts one run of a session's chunks, in order, to model samples. Holds at most
/// two client samples between chunks (a 48 kHz group not yet complete, or the 8 kHz
/// sample waiting for its successor).
#[derive(Debug, Clone)]
pub struct Converter {
    input: InputFormat,
    pending: Vec<f32>,
}

impl Converter {
    /// Converts the next chunk of the client's bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Decoded {
        let width = self.input.format.encoding.bytes_per_sample();
        let whole = bytes.len() - bytes.len() % width;
        let client = bytes[..whole].chunks_exact(width).map(|b| match b {
            [lo, hi] => f32::from(i16::from_le_bytes([*lo, *hi])) / 32768.0,
            [a, b, c, d] => f32::from_le_bytes([*a, *b, *c, *d]).clamp(-1.0, 1.0),
            _ => unreachable!("chunks_exact yields samples of the encoding's width"),
        });
        let mut samples = Vec::with_capacity(whole / width * 2);
        match self.input.ratio {
            Ratio::Same => samples.extend(client),
            Ratio::Up2 => {
                for s in client {
                    if let Some(previous) = self.pending.pop() {
                        samples.push(previous);
                        samples.push((previous + s) / 2.0);
                    }
                    self.pending.push(s);
                }
            }
            Ratio::Down3 => {
                for s in client {
                    self.pending.push(s);
                    if self.pending.len() == 3 {
                        samples.push(self.pending.iter().sum::<f32>() / 3.0);
                        self.pending.clear();
                    }
                }
            }
        }
        Decoded {
            samples,
            trailing_bytes: bytes.len() - whole,
        }
    }

    /// The end of the session's audio: what is still held, as model samples.
    pub fn finish(&mut self) -> Vec<f32> {
        let held = std::mem::take(&mut self.pending);
        match (self.input.ratio, held.as_slice()) {
            (_, []) | (Ratio::Same, _) => Vec::new(),
            (Ratio::Up2, [last, ..]) => vec![*last, *last],
            (Ratio::Down3, rest) => vec![rest.iter().sum::<f32>() / rest.len() as f32],
        }
    }
}

/// Milliseconds of audio in `samples` at the model rate.
pub fn samples_to_ms(samples: u64) -> u64 {
    samples * 1000 / u64::from(MODEL_SAMPLE_RATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(rate: u32, encoding: AudioEncoding) -> InputFormat {
        InputFormat::new(AudioFormat {
            sample_rate: rate,
            encoding,
        })
        .unwrap()
    }

    fn s16_bytes(samples: &[i16]) -> Vec<u8> {
        samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    /// Converts `bytes` in chunks of `chunk` bytes, then finishes.
    fn convert(input: InputFormat, bytes: &[u8], chunk: usize) -> Vec<f32> {
        let mut converter = input.converter();
        let mut out = Vec::new();
        for c in bytes.chunks(chunk) {
            let decoded = converter.push(c);
            assert_eq!(decoded.trailing_bytes, 0);
            out.extend(decoded.samples);
        }
        out.extend(converter.finish());
        out
    }

    /// A signal with no two equal neighbours, as 16-bit samples.
    fn ramp(n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| ((i * 7919) % 20_000) as i16 - 10_000)
            .collect()
    }

    #[test]
    fn s16le_at_16k_converts_to_unit_floats() {
        let input = format(16_000, AudioEncoding::PcmS16le);
        let bytes = s16_bytes(&[0, i16::MAX, i16::MIN, -16384]);
        let decoded = input.converter().push(&bytes);
        assert_eq!(decoded.trailing_bytes, 0);
        assert_eq!(decoded.samples, vec![0.0, 32767.0 / 32768.0, -1.0, -0.5]);
        assert_eq!(input.client_samples(bytes.len()), 4);
    }

    #[test]
    fn f32le_is_taken_as_is_and_clamped() {
        let input = format(16_000, AudioEncoding::PcmF32le);
        let bytes: Vec<u8> = [0.25f32, -0.5, 3.0]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        assert_eq!(
            input.converter().push(&bytes).samples,
            vec![0.25, -0.5, 1.0]
        );
        assert_eq!(input.client_samples(bytes.len()), 3);
    }

    #[test]
    fn a_trailing_partial_sample_is_reported_not_decoded() {
        let input = format(16_000, AudioEncoding::PcmS16le);
        let decoded = input.converter().push(&[0, 0, 1]);
        assert_eq!(decoded.samples.len(), 1);
        assert_eq!(decoded.trailing_bytes, 1);
        let input = format(8_000, AudioEncoding::PcmF32le);
        assert_eq!(input.converter().push(&[0; 7]).trailing_bytes, 3);
    }

    #[test]
    fn forty_eight_khz_averages_groups_of_three() {
        let input = format(48_000, AudioEncoding::PcmS16le);
        let bytes = s16_bytes(&[3, 6, 9, 300, 300, 300, 30, 60]);
        let out: Vec<f32> = convert(input, &bytes, 4)
            .iter()
            .map(|s| s * 32768.0)
            .collect();
        // Two whole groups, then the last two samples flushed as one.
        assert_eq!(out, vec![6.0, 300.0, 45.0]);
    }

    #[test]
    fn eight_khz_interpolates_between_neighbours() {
        let input = format(8_000, AudioEncoding::PcmS16le);
        let bytes = s16_bytes(&[0, 100, 50]);
        let out: Vec<f32> = convert(input, &bytes, 2)
            .iter()
            .map(|s| s * 32768.0)
            .collect();
        // The last sample is held to the end of the audio.
        assert_eq!(out, vec![0.0, 50.0, 100.0, 75.0, 50.0, 50.0]);
    }

    #[test]
    fn chunking_never_changes_the_output() {
        let bytes = s16_bytes(&ramp(1000));
        for rate in SUPPORTED_RATES {
            let input = format(rate, AudioEncoding::PcmS16le);
            let whole = convert(input, &bytes, bytes.len());
            // 48 kHz: 333 whole groups and the last sample flushed on its own.
            let expected = match rate {
                8_000 => 2000,
                16_000 => 1000,
                _ => 334,
            };
            assert_eq!(whole.len(), expected, "{rate} Hz");
            for chunk in [2, 4, 6, 10, 34, 1998] {
                assert_eq!(convert(input, &bytes, chunk), whole, "{rate} Hz in {chunk}");
            }
        }
    }

    /// Invariant 6 for the conversion: a converter started fresh at any replay point
    /// (an even model sample, as the VAD's 512-sample windows make them) produces the
    /// straight run's samples from there on.
    #[test]
    fn a_run_from_a_replay_point_reproduces_the_straight_run() {
        let client = ramp(3000);
        for rate in SUPPORTED_RATES {
            let input = format(rate, AudioEncoding::PcmS16le);
            let straight = convert(input, &s16_bytes(&client), 62);
            for model_point in (0..straight.len() as u64 - 4).step_by(512) {
                let client_point = input.model_to_client(model_point) as usize;
                assert_eq!(input.client_to_model(client_point as u64), model_point);
                let resumed = convert(input, &s16_bytes(&client[client_point..]), 38);
                assert_eq!(
                    resumed,
                    straight[model_point as usize..],
                    "{rate} Hz from model sample {model_point}"
                );
            }
        }
    }

    #[test]
    fn other_rates_and_encodings_are_refused_with_a_typed_error() {
        for rate in [0, 11_025, 22_050, 44_100, 96_000] {
            assert_eq!(
                InputFormat::new(AudioFormat {
                    sample_rate: rate,
                    encoding: AudioEncoding::PcmS16le,
                }),
                Err(AudioError::Unsupported {
                    encoding: AudioEncoding::PcmS16le,
                    sample_rate: rate
                })
            );
        }
        assert_eq!(
            parse_encoding("opus"),
            Err(AudioError::UnknownEncoding("opus".into()))
        );
        assert_eq!(parse_encoding("pcm_f32le"), Ok(AudioEncoding::PcmF32le));
    }

    #[test]
    fn sample_times() {
        assert_eq!(samples_to_ms(16_000), 1000);
        assert_eq!(samples_to_ms(8), 0);
        let at_48k = format(48_000, AudioEncoding::PcmS16le);
        assert_eq!(at_48k.model_to_client(512), 1536);
        assert_eq!(at_48k.client_to_model(1536), 512);
        let at_8k = format(8_000, AudioEncoding::PcmF32le);
        assert_eq!(at_8k.model_to_client(512), 256);
        assert_eq!(at_8k.client_to_model(256), 512);
    }
}
