//! The audio a client sends: a mono WAV file, 16-bit integer or 32-bit float PCM, kept
//! as little-endian bytes exactly as they go on the wire; and written back as a WAV
//! file from those bytes (replay of an archived session).

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
    #[error("cannot write {path}: {source}")]
    Write {
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

    /// Writes a mono WAV file whose samples are exactly these PCM bytes.
    pub fn write(&self, path: &Path) -> Result<(), WavError> {
        let file = std::fs::File::create(path).map_err(|e| WavError::Write {
            path: path.display().to_string(),
            source: hound::Error::IoError(e),
        })?;
        self.write_to(std::io::BufWriter::new(file), &path.display().to_string())
    }

    /// The WAV file [`Recording::write`] writes, in memory.
    pub fn to_wav(&self) -> Result<Vec<u8>, WavError> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        self.write_to(&mut bytes, "memory")?;
        Ok(bytes.into_inner())
    }

    fn write_to<W: std::io::Write + std::io::Seek>(
        &self,
        sink: W,
        name: &str,
    ) -> Result<(), WavError> {
        let write_error = |source| WavError::Write {
            path: name.to_string(),
            source,
        };
        let (bits_per_sample, sample_format) = match self.format.encoding {
            AudioEncoding::PcmS16le => (16, hound::SampleFormat::Int),
            AudioEncoding::PcmF32le => (32, hound::SampleFormat::Float),
        };
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: self.format.sample_rate,
            bits_per_sample,
            sample_format,
        };
        let mut writer = hound::WavWriter::new(sink, spec).map_err(write_error)?;
        match self.format.encoding {
            AudioEncoding::PcmS16le => {
                for pair in self.pcm.chunks_exact(2) {
                    writer
                        .write_sample(i16::from_le_bytes([pair[0], pair[1]]))
                        .map_err(write_error)?;
                }
            }
            AudioEncoding::PcmF32le => {
                for quad in self.pcm.chunks_exact(4) {
                    writer
                        .write_sample(f32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]))
                        .map_err(write_error)?;
                }
            }
        }
        writer.finalize().map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("asr-wav-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let float = Recording {
            format: AudioFormat {
                sample_rate: 48_000,
                encoding: AudioEncoding::PcmF32le,
            },
            pcm: [0.5f32, -0.25, 1.5, f32::MIN_POSITIVE]
                .iter()
                .flat_map(|s| s.to_le_bytes())
                .collect(),
        };
        for recording in [
            Recording::from_i16(8_000, &[1, -2, i16::MAX, i16::MIN]),
            float,
        ] {
            let path = dir.join("out.wav");
            recording.write(&path).unwrap();
            assert_eq!(Recording::read(&path).unwrap(), recording);
            assert_eq!(recording.to_wav().unwrap(), std::fs::read(&path).unwrap());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
