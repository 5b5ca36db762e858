//! Reading the audio a client sends: a mono WAV file, 16-bit integer or 32-bit float
//! PCM, kept as little-endian bytes exactly as they will go on the wire.

use std::path::Path;

use eventlog::{AudioEncoding, AudioFormat};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WavError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: hound::Error,
    },
    #[error(
        "{path} has {channels} channels; send mono audio (for instance `sox in.wav -c 1 out.wav`)"
    )]
    NotMono { path: String, channels: u16 },
    #[error(
        "{path} is {bits}-bit {format}; send 16-bit integer or 32-bit float PCM (for instance `sox in.wav -b 16 -e signed-integer out.wav`)"
    )]
    UnsupportedSamples {
        path: String,
        bits: u16,
        format: &'static str,
    },
}

/// Audio ready to stream: its format and its PCM bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    pub format: AudioFormat,
    pub pcm: Vec<u8>,
}

impl Recording {
    pub fn duration_secs(&self) -> f64 {
        let samples = self.pcm.len() / self.format.encoding.bytes_per_sample();
        samples as f64 / f64::from(self.format.sample_rate)
    }

    /// From 16-bit samples at a sample rate.
    pub fn from_i16(sample_rate: u32, samples: &[i16]) -> Self {
        Self {
            format: AudioFormat {
                sample_rate,
                encoding: AudioEncoding::PcmS16le,
            },
            pcm: samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
        }
    }

    pub fn read(path: &Path) -> Result<Self, WavError> {
        let name = path.display().to_string();
        let read_error = |source| WavError::Read {
            path: name.clone(),
            source,
        };
        let mut reader = hound::WavReader::open(path).map_err(read_error)?;
        let spec = reader.spec();
        if spec.channels != 1 {
            return Err(WavError::NotMono {
                path: name,
                channels: spec.channels,
            });
        }
        match (spec.sample_format, spec.bits_per_sample) {
            (hound::SampleFormat::Int, 16) => {
                let samples = reader
                    .samples::<i16>()
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(read_error)?;
                Ok(Self::from_i16(spec.sample_rate, &samples))
            }
            (hound::SampleFormat::Float, 32) => {
                let samples = reader
                    .samples::<f32>()
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(read_error)?;
                Ok(Self {
                    format: AudioFormat {
                        sample_rate: spec.sample_rate,
                        encoding: AudioEncoding::PcmF32le,
                    },
                    pcm: samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
                })
            }
            (format, bits) => Err(WavError::UnsupportedSamples {
                path: name,
                bits,
                format: match format {
                    hound::SampleFormat::Int => "integer",
                    hound::SampleFormat::Float => "float",
                },
            }),
        }
    }
}
