//! The real model on real (synthetic) speech: accuracy, determinism across replay
//! points, and the numbers worth knowing (load time, decode time, real-time factor).

mod common;

use std::time::Instant;

use common::*;
use recognizer::engine::sherpa::{SileroVadFactory, VadSettings, WhisperModel, WhisperSettings};
use recognizer::engine::{DecoderEvent, ResumePoint, SessionDecoder, Transcript};
use recognizer::segmenter::{Segmenter, SegmenterConfig};

const SENTENCES: &[&str] = &[
    "there is a fire in the kitchen",
    "please send an ambulance to the main street",
    "the children are safe at home now",
    "the weather is cold and windy today",
    "we need help right now",
];

fn segmenter(model: &WhisperModel, from: ResumePoint) -> Segmenter<WhisperModel, SileroVadFactory> {
    let vads = SileroVadFactory::new(VadSettings::new(vad_model())).unwrap();
    Segmenter::new(model.clone(), vads, SegmenterConfig::default(), from).unwrap()
}

/// Decodes `audio` in chunks of `chunk` samples, as the worker does.
fn decode(decoder: &mut impl SessionDecoder, audio: &[f32], chunk: usize) -> Vec<DecoderEvent> {
    let mut events = Vec::new();
    for c in audio.chunks(chunk) {
        events.extend(decoder.accept(c).unwrap());
    }
    events.extend(decoder.finish().unwrap());
    events
}

fn finals(events: &[DecoderEvent]) -> Vec<Transcript> {
    events
        .iter()
        .filter_map(|e| match e {
            DecoderEvent::Final(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn load(threads: u16) -> WhisperModel {
    let started = Instant::now();
    let settings = WhisperSettings {
        threads,
        ..WhisperSettings::DEFAULT
    };
    let model = WhisperModel::load(&whisper_dir(), settings).unwrap();
    println!(
        "model load ({threads} threads): {:.3} s",
        started.elapsed().as_secs_f64()
    );
    model
}

#[test]
fn transcript_is_accurate_with_one_segment_per_sentence() {
    let audio = conversation(SENTENCES, 1.0);
    let model = load(2);
    let started = Instant::now();
    let events = decode(&mut segmenter(&model, ResumePoint::default()), &audio, 1600);
    let elapsed = started.elapsed().as_secs_f64();
    let finals = finals(&events);
    for f in &finals {
        println!(
            "segment {} [{:.2}-{:.2} s]: {}",
            f.segment,
            f.start_sample as f64 / RATE as f64,
            f.end_sample as f64 / RATE as f64,
            f.text
        );
    }
    let transcript: Vec<&str> = finals.iter().map(|f| f.text.as_str()).collect();
    let transcript = transcript.join(" ");
    let reference = SENTENCES.join(" ");
    let wer = wer(&reference, &transcript);
    let audio_s = audio.len() as f64 / RATE as f64;
    println!(
        "WER {wer:.3}; {audio_s:.1} s audio decoded in {elapsed:.2} s (RTF {:.3})",
        elapsed / audio_s
    );
    assert!(wer <= 0.35, "WER {wer} for {transcript:?}");
    assert_eq!(finals.len(), SENTENCES.len(), "one segment per sentence");
    for (i, f) in finals.iter().enumerate() {
        assert_eq!(f.segment, i as u32);
        assert!(f.start_sample < f.end_sample && f.end_sample <= audio.len() as u64);
        if i > 0 {
            assert!(
                finals[i - 1].end_sample <= f.start_sample,
                "segments in order"
            );
        }
    }
}

/// What a replacement worker does: start fresh at a replay point (VAD, decoder and
/// segment index as the checkpoint says) and decode the rest.
#[test]
fn decoding_from_every_replay_point_reproduces_the_straight_run() {
    let audio = conversation(SENTENCES, 1.0);
    let model = load(2);
    let straight = decode(&mut segmenter(&model, ResumePoint::default()), &audio, 1600);
    let points: Vec<ResumePoint> = straight
        .iter()
        .filter_map(|e| match e {
            DecoderEvent::ReplayPoint(p) => Some(*p),
            _ => None,
        })
        .collect();
    let all = finals(&straight);
    assert!(points.len() >= SENTENCES.len() - 1, "{points:?}");
    for point in points {
        let rest = &audio[point.session_sample as usize..];
        // A different chunking too: the replacement's first chunk starts mid-chunk.
        let resumed = finals(&decode(&mut segmenter(&model, point), rest, 1000));
        let expected: Vec<Transcript> = all
            .iter()
            .filter(|f| f.segment >= point.next_segment)
            .cloned()
            .collect();
        println!(
            "resumed at sample {} (segment {}): {} finals",
            point.session_sample,
            point.next_segment,
            resumed.len()
        );
        assert_eq!(resumed, expected, "resumed at {point:?}");
    }
}

/// Prints decode time per segment with 1 and 2 threads.
#[test]
fn measure_decode_time_by_thread_count() {
    let audio = conversation(&SENTENCES[..2], 1.0);
    let vads = SileroVadFactory::new(VadSettings::new(vad_model())).unwrap();
    // Cut the segments once, then time the recognizer alone on them.
    let mut cut = Segmenter::new(
        Recorder::default(),
        vads,
        SegmenterConfig::default(),
        ResumePoint::default(),
    )
    .unwrap();
    decode(&mut cut, &audio, 1600);
    let segments = cut_segments(cut);
    assert!(!segments.is_empty());
    for threads in [1u16, 2] {
        let mut model = load(threads);
        for segment in &segments {
            let started = Instant::now();
            let text = recognizer::engine::Recognizer::transcribe(&mut model, segment).unwrap();
            let dt = started.elapsed().as_secs_f64();
            let audio_s = segment.len() as f64 / RATE as f64;
            println!(
                "{threads} threads: {audio_s:.2} s segment decoded in {dt:.3} s (RTF {:.3}): {text}",
                dt / audio_s
            );
        }
    }
}

/// A recognizer that keeps the segments it is given.
#[derive(Default)]
struct Recorder {
    segments: Vec<Vec<f32>>,
}

impl recognizer::engine::Recognizer for Recorder {
    fn transcribe(&mut self, samples: &[f32]) -> Result<String, recognizer::engine::EngineError> {
        self.segments.push(samples.to_vec());
        Ok("x".into())
    }
}

fn cut_segments(segmenter: Segmenter<Recorder, SileroVadFactory>) -> Vec<Vec<f32>> {
    segmenter.into_recognizer().segments
}

/// The conversion from 8 and 48 kHz (`recognizer::audio`, exact at replay points but
/// with simple filters) hears what sox's high-quality resampling to 16 kHz hears, on
/// the same recording. At 8 kHz both hear worse than at 16 kHz: the telephone band
/// (up to 4 kHz) itself costs tiny.en on espeak-ng's voice.
#[test]
fn every_rate_converts_to_what_a_reference_resampler_gives() {
    use eventlog::{AudioEncoding, AudioFormat};
    use recognizer::audio::{InputFormat, SUPPORTED_RATES};
    use recognizer::engine::Recognizer;

    let sentences = [
        "there is a fire in the kitchen and the smoke is getting thicker",
        "please send an ambulance to the main street",
    ];
    let said = sentences.join(" ");
    let mut model = load(2);
    let dir = std::env::temp_dir().join(format!("asr-rates-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    for rate in SUPPORTED_RATES {
        let format = AudioFormat {
            sample_rate: rate,
            encoding: AudioEncoding::PcmS16le,
        };
        let recording = testkit::speech::sentences_as(&sentences, 1000, format);
        let mut converter = InputFormat::new(format).unwrap().converter();
        let mut ours = converter.push(&recording.pcm).samples;
        ours.extend(converter.finish());
        let ours = model.transcribe(&ours).unwrap();

        let (original, resampled) = (dir.join("original.wav"), dir.join("resampled.wav"));
        testkit::speech::write_wav(&recording, &original);
        let status = std::process::Command::new("sox")
            .arg("-R")
            .arg(&original)
            .args(["-r", "16000"])
            .arg(&resampled)
            .status()
            .unwrap();
        assert!(status.success());
        let reference = testkit::speech::read_wav(&resampled);
        let by_sox = model
            .transcribe(&testkit::speech::to_f32(&reference))
            .unwrap();

        let (wer_ours, wer_sox) = (wer(&said, &ours), wer(&said, &by_sox));
        println!("{rate} Hz: ours WER {wer_ours:.2} {ours:?}; sox WER {wer_sox:.2} {by_sox:?}");
        // At 8 kHz one or two words swing with the CPU's kernels (tiny.en int8): sox's
        // audio was heard at 0.43 on one machine and 0.33 on another, ours at 0.48 on
        // both; a wider margin there keeps the test about the conversion.
        let margin = if rate == 8_000 { 0.2 } else { 0.1 };
        assert!(
            wer_ours <= wer_sox + margin,
            "{rate} Hz: our conversion hears {ours:?} (WER {wer_ours:.2}), sox's {by_sox:?} (WER {wer_sox:.2})"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
