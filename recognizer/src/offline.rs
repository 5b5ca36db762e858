//! Decoding a whole recording at once, as a worker decodes it live: the same
//! conversion, voice-activity segmentation and model settings, so the same audio gives
//! the same finals (replay tooling: `asr replay --retranscribe`).

use anyhow::Context as _;
use eventlog::AudioFormat;

use crate::audio::InputFormat;
use crate::config::ModelArgs;
use crate::engine::sherpa::{SileroVadFactory, VadSettings, WhisperModel};
use crate::engine::{DecoderEvent, ResumePoint, SessionDecoder, Transcript, VadFactory};
use crate::segmenter::{Segmenter, SegmenterConfig};

impl ModelArgs {
    /// Loads the Whisper model and the VAD (checked by creating one).
    pub async fn load(&self) -> anyhow::Result<(WhisperModel, SileroVadFactory)> {
        let (dir, whisper) = (self.model_dir.clone(), self.whisper());
        let model = tokio::task::spawn_blocking(move || WhisperModel::load(&dir, whisper))
            .await?
            .with_context(|| {
                format!(
                    "loading the Whisper model from {}",
                    self.model_dir.display()
                )
            })?;
        let vads = SileroVadFactory::new(VadSettings::new(self.vad_model.clone()))?;
        vads.create().context("loading the silero VAD model")?;
        Ok((model, vads))
    }
}

/// Decodes `pcm` (the client's bytes, in `format`) from its start, handing progress
/// (decoded, total, in the model's samples) to `progress`; returns the finals.
pub fn transcribe(
    model: WhisperModel,
    vads: SileroVadFactory,
    format: AudioFormat,
    pcm: &[u8],
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<Vec<Transcript>> {
    let input = InputFormat::new(format)?;
    let mut converter = input.converter();
    let mut samples = converter.push(pcm).samples;
    samples.extend(converter.finish());
    let mut decoder = Segmenter::new(
        model,
        vads,
        SegmenterConfig::default(),
        ResumePoint::default(),
    )?;
    let total = samples.len() as u64;
    let mut events = Vec::new();
    // Chunks of a tenth of a second at 16 kHz: any chunking decodes alike.
    for chunk in samples.chunks(1_600) {
        events.extend(decoder.accept(chunk)?);
        progress(decoder.position(), total);
    }
    events.extend(decoder.finish()?);
    Ok(events
        .into_iter()
        .filter_map(|e| match e {
            DecoderEvent::Final(t) => Some(t),
            _ => None,
        })
        .collect())
}
