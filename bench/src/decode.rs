//! `asr-bench decode --tail-paddings 50,100,200,300,500,1000`: what Whisper's tail
//! padding costs and buys, in-process (no broker, no VAD).
//!
//! sherpa-onnx appends silent feature frames after the audio so that Whisper finds
//! the end of the text; the encoder runs over audio + padding, so the padding sets
//! much of a short segment's decode time. For each padding the model is loaded with
//! it and decodes every sentence of a fixed set (espeak-ng speech) whole, as a final,
//! and its first 1, 2 and 3 seconds, as partials of an open segment; the table gives
//! the decode times and the word error rate of the finals against the text spoken.

use std::time::Instant;

use recognizer::engine::Recognizer;
use recognizer::engine::sherpa::{WhisperModel, WhisperSettings};

use crate::{model_dir, percentile};

/// Calls of the kind the service takes: short, plain sentences.
pub const SENTENCES: &[&str] = &[
    "there is a fire in the kitchen and the smoke is getting thicker",
    "please send an ambulance to the main street",
    "my father fell down the stairs and he cannot move his leg",
    "the children are safe at home now",
    "the weather is cold and windy today",
    "we need help right now",
    "a car hit a tree near the school and the driver is bleeding",
    "my neighbour has not answered the door for two days",
    "the water is rising in the basement",
    "someone is trying to break into the house",
    "she is breathing but she does not wake up",
    "the road is blocked by a fallen power line",
];

/// Prefix lengths decoded as partials, seconds.
const PARTIAL_SECONDS: &[f64] = &[1.0, 2.0, 3.0];

pub fn run(paddings: &[u16], threads: u16) -> anyhow::Result<()> {
    eprintln!("synthesising {} sentences…", SENTENCES.len());
    let spoken: Vec<Vec<f32>> = SENTENCES
        .iter()
        .map(|s| testkit::speech::to_f32(&testkit::speech::speak(s)))
        .collect();
    let seconds: Vec<f64> = spoken.iter().map(|s| s.len() as f64 / 16_000.0).collect();
    eprintln!(
        "sentences {:.1}-{:.1} s long; {threads} decoder threads",
        seconds.iter().copied().fold(f64::INFINITY, f64::min),
        seconds.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "| tail padding (frames) | WER (all finals) | sentences misheard | final decode p50 / max (ms) | partial decode p50 / max (ms) |"
    );
    println!("|---|---|---|---|---|");
    for &padding in paddings {
        let settings = WhisperSettings {
            threads,
            tail_padding_frames: padding,
        };
        let mut model = WhisperModel::load(&model_dir(), settings)?;
        // One decode first: the first run of an ONNX session allocates.
        model.transcribe(&spoken[0])?;
        let (mut finals, mut partials) = (Vec::new(), Vec::new());
        let (mut heard, mut misheard) = (Vec::new(), 0);
        for (audio, sentence) in spoken.iter().zip(SENTENCES) {
            let started = Instant::now();
            let text = model.transcribe(audio)?;
            finals.push(started.elapsed().as_secs_f64() * 1000.0);
            if testkit::wer::word_error_rate(sentence, &text) > 0.0 {
                misheard += 1;
                eprintln!("  padding {padding}: {sentence:?} heard as {text:?}");
            }
            heard.push(text);
            for &s in PARTIAL_SECONDS {
                let n = (s * 16_000.0) as usize;
                if n < audio.len() {
                    let started = Instant::now();
                    model.transcribe(&audio[..n])?;
                    partials.push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
        let wer = testkit::wer::word_error_rate(&SENTENCES.join(" "), &heard.join(" "));
        println!(
            "| {padding} | {wer:.3} | {misheard} of {} | {:.0} / {:.0} | {:.0} / {:.0} |",
            SENTENCES.len(),
            percentile(&mut finals, 50.0),
            percentile(&mut finals, 100.0),
            percentile(&mut partials, 50.0),
            percentile(&mut partials, 100.0),
        );
    }
    Ok(())
}
