//! Offline decoding of a live session: a VAD cuts speech segments, a recognizer decodes
//! each one, and every closed segment is a replay point.
//!
//! The invariant this module exists for (ARCHITECTURE.md invariant 6): decoding that
//! starts at any replay point this segmenter reported produces exactly the finals
//! (indices, texts, timings) that decoding straight through produced after it. It
//! holds because nothing survives a replay point:
//!
//! - the VAD is fed fixed windows of [`Vad::WINDOW`] samples counted from the last
//!   reset, so a decoder started at the reset sample sees the same windows;
//! - when the VAD hands out a finished segment, the segment is decoded, and the VAD is
//!   replaced by a fresh one at exactly the sample it had consumed (the end of the
//!   window that closed the segment); samples not yet fed (less than a window) simply
//!   go to the new VAD;
//! - the recognizer is stateless between segments (offline: one call per segment, fixed
//!   thread count);
//! - the partial buffer is only used for partials, which are not part of the transcript.
//!
//! Pure: no clock, no I/O; the worker decides when partials are worth their cost.

use crate::engine::{
    DecoderEvent, EngineError, Recognizer, ResumePoint, SessionDecoder, Transcript, Vad, VadFactory,
};

/// Tunables of a [`Segmenter`] (all in model-rate samples).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmenterConfig {
    /// The partial buffer keeps at most this much of the open segment (Whisper decodes
    /// 30 s windows; older audio is dropped from partials, never from finals).
    pub max_partial_samples: usize,
    /// Audio before the VAD's speech onset kept in the partial buffer (the VAD itself
    /// looks back a little before the onset).
    pub partial_lookback_samples: usize,
}

impl Default for SegmenterConfig {
    fn default() -> Self {
        Self {
            max_partial_samples: 30 * 16_000,
            partial_lookback_samples: 8_000,
        }
    }
}

/// A [`SessionDecoder`] over a VAD and an offline recognizer.
pub struct Segmenter<R: Recognizer, F: VadFactory> {
    recognizer: R,
    vads: F,
    vad: F::Vad,
    config: SegmenterConfig,
    /// Session sample where the current VAD was created.
    reset_at: u64,
    /// Samples fed to the current VAD (whole windows).
    fed: u64,
    /// Samples accepted but not fed yet (less than one window).
    pending: Vec<f32>,
    next_segment: u32,
    in_speech: bool,
    /// The open segment's audio for partials, and the session sample of its first sample.
    partial: Vec<f32>,
    partial_start: u64,
}

impl<R: Recognizer, F: VadFactory> Segmenter<R, F> {
    /// A segmenter starting at `from` (the session's start, or a replay point).
    pub fn new(
        recognizer: R,
        vads: F,
        config: SegmenterConfig,
        from: ResumePoint,
    ) -> Result<Self, EngineError> {
        let vad = vads.create()?;
        Ok(Self {
            recognizer,
            vads,
            vad,
            config,
            reset_at: from.session_sample,
            fed: 0,
            pending: Vec::with_capacity(F::Vad::WINDOW),
            next_segment: from.next_segment,
            in_speech: false,
            partial: Vec::new(),
            partial_start: from.session_sample,
        })
    }

    /// Gives the recognizer back (tests, tools).
    pub fn into_recognizer(self) -> R {
        self.recognizer
    }

    fn window_end(&self) -> u64 {
        self.reset_at + self.fed
    }

    /// Feeds one window and handles what it closed.
    fn feed_window(
        &mut self,
        window: &[f32],
        events: &mut Vec<DecoderEvent>,
    ) -> Result<(), EngineError> {
        self.vad.accept(window);
        self.fed += window.len() as u64;
        self.in_speech = self.vad.is_speech();
        self.keep_for_partials(window);
        if self.drain_finals(events)? {
            self.reset(events)?;
        }
        Ok(())
    }

    /// Decodes every finished segment the VAD holds; true if there was one.
    fn drain_finals(&mut self, events: &mut Vec<DecoderEvent>) -> Result<bool, EngineError> {
        let mut any = false;
        while let Some(segment) = self.vad.pop() {
            any = true;
            let start_sample = self.reset_at + segment.start;
            // The VAD never reports audio it was not given; clamp defensively anyway, a
            // final must not claim audio beyond what was decoded.
            let end_sample = (start_sample + segment.samples.len() as u64).min(self.window_end());
            let text = self.recognizer.transcribe(&segment.samples)?;
            // A segment Whisper hears nothing in (noise, a cough) is no transcript; it
            // still closes a segment, so the replay point moves on.
            if text.is_empty() {
                continue;
            }
            events.push(DecoderEvent::Final(Transcript {
                segment: self.next_segment,
                text,
                start_sample,
                end_sample,
            }));
            self.next_segment += 1;
        }
        Ok(any)
    }

    /// Replaces the VAD at the sample it consumed and reports the replay point.
    fn reset(&mut self, events: &mut Vec<DecoderEvent>) -> Result<(), EngineError> {
        self.vad = self.vads.create()?;
        self.reset_at += self.fed;
        self.fed = 0;
        self.in_speech = false;
        self.partial.clear();
        self.partial_start = self.reset_at;
        events.push(DecoderEvent::ReplayPoint(ResumePoint {
            session_sample: self.reset_at,
            next_segment: self.next_segment,
        }));
        Ok(())
    }

    /// Keeps the open segment's audio: everything since the speech onset (plus a little
    /// before), at most `max_partial_samples`.
    fn keep_for_partials(&mut self, window: &[f32]) {
        self.partial.extend_from_slice(window);
        let keep = if self.in_speech {
            self.config.max_partial_samples
        } else {
            self.config.partial_lookback_samples
        };
        if self.partial.len() > keep {
            let excess = self.partial.len() - keep;
            self.partial.drain(..excess);
            self.partial_start += excess as u64;
        }
    }
}

impl<R: Recognizer, F: VadFactory> SessionDecoder for Segmenter<R, F> {
    fn accept(&mut self, samples: &[f32]) -> Result<Vec<DecoderEvent>, EngineError> {
        let mut events = Vec::new();
        let window = F::Vad::WINDOW;
        let mut rest = samples;
        // Complete a window started by the previous call, then feed whole windows
        // straight from the input.
        if !self.pending.is_empty() {
            let take = (window - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == window {
                let full = std::mem::take(&mut self.pending);
                self.feed_window(&full, &mut events)?;
                self.pending = full;
                self.pending.clear();
            }
        }
        let mut windows = rest.chunks_exact(window);
        for w in &mut windows {
            self.feed_window(w, &mut events)?;
        }
        self.pending.extend_from_slice(windows.remainder());
        Ok(events)
    }

    fn partial(&mut self) -> Result<Option<Transcript>, EngineError> {
        if !self.in_speech || self.partial.is_empty() {
            return Ok(None);
        }
        let text = self.recognizer.transcribe(&self.partial)?;
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(Transcript {
            segment: self.next_segment,
            text,
            start_sample: self.partial_start,
            end_sample: self.partial_start + self.partial.len() as u64,
        }))
    }

    fn finish(&mut self) -> Result<Vec<DecoderEvent>, EngineError> {
        let mut events = Vec::new();
        if !self.pending.is_empty() {
            // The last partial window, padded with silence so the VAD sees whole windows.
            let mut last = std::mem::take(&mut self.pending);
            let real = last.len() as u64;
            last.resize(F::Vad::WINDOW, 0.0);
            self.vad.accept(&last);
            self.fed += real;
        }
        self.vad.flush();
        self.drain_finals(&mut events)?;
        self.in_speech = false;
        Ok(events)
    }

    fn in_speech(&self) -> bool {
        self.in_speech
    }

    fn position(&self) -> u64 {
        self.window_end() + self.pending.len() as u64
    }

    fn next_segment(&self) -> u32 {
        self.next_segment
    }
}

#[cfg(test)]
pub(crate) mod fakes {
    //! A VAD and a recognizer simple enough to reason about exactly.

    use super::*;
    use crate::engine::SpeechSegment;

    pub const WINDOW: usize = 4;

    /// Energy VAD: a window whose first sample is non-zero is speech; `close_after`
    /// silent windows close a segment, which spans from the first speech window to the
    /// end of the last speech window. `start` counts from creation, like silero's.
    pub struct EnergyVad {
        close_after: usize,
        consumed: u64,
        open: Option<(u64, Vec<f32>)>,
        silent_run: usize,
        trailing: Vec<f32>,
        done: Vec<SpeechSegment>,
    }

    impl Vad for EnergyVad {
        const WINDOW: usize = WINDOW;

        fn accept(&mut self, window: &[f32]) {
            assert_eq!(window.len(), WINDOW, "the segmenter feeds whole windows");
            let speech = window[0] != 0.0;
            match (&mut self.open, speech) {
                (None, true) => {
                    self.open = Some((self.consumed, window.to_vec()));
                    self.silent_run = 0;
                }
                (None, false) => {}
                (Some((_, samples)), true) => {
                    samples.append(&mut self.trailing);
                    samples.extend_from_slice(window);
                    self.silent_run = 0;
                }
                (Some(_), false) => {
                    self.trailing.extend_from_slice(window);
                    self.silent_run += 1;
                    if self.silent_run >= self.close_after {
                        self.close();
                    }
                }
            }
            self.consumed += WINDOW as u64;
        }

        fn is_speech(&mut self) -> bool {
            self.open.is_some()
        }

        fn pop(&mut self) -> Option<SpeechSegment> {
            (!self.done.is_empty()).then(|| self.done.remove(0))
        }

        fn flush(&mut self) {
            self.close();
        }
    }

    impl EnergyVad {
        fn close(&mut self) {
            if let Some((start, samples)) = self.open.take() {
                self.done.push(SpeechSegment { start, samples });
            }
            self.trailing.clear();
            self.silent_run = 0;
        }
    }

    pub struct EnergyVads {
        pub close_after: usize,
    }

    impl VadFactory for EnergyVads {
        type Vad = EnergyVad;
        fn create(&self) -> Result<EnergyVad, EngineError> {
            Ok(EnergyVad {
                close_after: self.close_after,
                consumed: 0,
                open: None,
                silent_run: 0,
                trailing: Vec::new(),
                done: Vec::new(),
            })
        }
    }

    /// "Transcribes" a segment as its distinct sample values, so a test can tell which
    /// audio a final was decoded from.
    #[derive(Default)]
    pub struct EchoRecognizer {
        pub calls: usize,
    }

    impl Recognizer for EchoRecognizer {
        fn transcribe(&mut self, samples: &[f32]) -> Result<String, EngineError> {
            self.calls += 1;
            let mut words: Vec<String> = Vec::new();
            for s in samples.iter().filter(|s| **s != 0.0) {
                let word = format!("w{s}");
                if words.last() != Some(&word) {
                    words.push(word);
                }
            }
            Ok(words.join(" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fakes::{EchoRecognizer, EnergyVads, WINDOW};
    use super::*;

    type Fake = Segmenter<EchoRecognizer, EnergyVads>;

    fn segmenter(from: ResumePoint) -> Fake {
        let config = SegmenterConfig {
            max_partial_samples: 64,
            partial_lookback_samples: 4,
        };
        Segmenter::new(
            EchoRecognizer::default(),
            EnergyVads { close_after: 2 },
            config,
            from,
        )
        .unwrap()
    }

    /// Audio of `n` windows of value `v` (0 = silence).
    fn run(parts: &[(f32, usize)]) -> Vec<f32> {
        parts
            .iter()
            .flat_map(|&(v, n)| std::iter::repeat_n(v, n * WINDOW))
            .collect()
    }

    fn decode_in_chunks(seg: &mut Fake, audio: &[f32], chunk: usize) -> Vec<DecoderEvent> {
        let mut events = Vec::new();
        for c in audio.chunks(chunk) {
            events.extend(seg.accept(c).unwrap());
        }
        events.extend(seg.finish().unwrap());
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

    fn replay_points(events: &[DecoderEvent]) -> Vec<ResumePoint> {
        events
            .iter()
            .filter_map(|e| match e {
                DecoderEvent::ReplayPoint(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn t(segment: u32, text: &str, start_window: u64, end_window: u64) -> Transcript {
        Transcript {
            segment,
            text: text.into(),
            start_sample: start_window * WINDOW as u64,
            end_sample: end_window * WINDOW as u64,
        }
    }

    #[test]
    fn segments_get_indices_timings_and_replay_points() {
        // windows: 2 silence, 3 speech(1), 3 silence, 2 speech(2), 4 silence
        let audio = run(&[(0.0, 2), (1.0, 3), (0.0, 3), (2.0, 2), (0.0, 4)]);
        let mut seg = segmenter(ResumePoint::default());
        let events = decode_in_chunks(&mut seg, &audio, 7);
        assert_eq!(
            finals(&events),
            vec![t(0, "w1", 2, 5), t(1, "w2", 8, 10)],
            "session-time ranges, counted across the VAD reset"
        );
        // The second silent window after each segment (window 7, window 12) closed it:
        // the VAD had consumed audio up to their ends.
        assert_eq!(
            replay_points(&events),
            vec![
                ResumePoint {
                    session_sample: 7 * WINDOW as u64,
                    next_segment: 1
                },
                ResumePoint {
                    session_sample: 12 * WINDOW as u64,
                    next_segment: 2
                },
            ]
        );
        // Each replay point comes right after the final(s) it follows.
        assert!(matches!(events[0], DecoderEvent::Final(_)));
        assert!(matches!(events[1], DecoderEvent::ReplayPoint(_)));
        assert_eq!(seg.position(), audio.len() as u64);
        assert_eq!(seg.next_segment(), 2);
    }

    #[test]
    fn chunking_does_not_change_the_output() {
        let audio = run(&[(3.0, 2), (0.0, 2), (1.0, 5), (0.0, 1), (1.0, 1), (0.0, 3)]);
        let reference = decode_in_chunks(&mut segmenter(ResumePoint::default()), &audio, 1000);
        for chunk in [1, 3, WINDOW, WINDOW + 1, 17] {
            let events = decode_in_chunks(&mut segmenter(ResumePoint::default()), &audio, chunk);
            assert_eq!(events, reference, "chunk size {chunk}");
        }
    }

    #[test]
    fn resuming_at_any_replay_point_reproduces_the_rest() {
        let audio = run(&[
            (1.0, 2),
            (0.0, 2),
            (2.0, 3),
            (0.0, 5),
            (3.0, 1),
            (0.0, 2),
            (4.0, 4),
        ]);
        let straight = decode_in_chunks(&mut segmenter(ResumePoint::default()), &audio, 5);
        let all = finals(&straight);
        assert_eq!(all.len(), 4, "{straight:?}");
        for point in replay_points(&straight) {
            let mut resumed = segmenter(point);
            let rest = &audio[point.session_sample as usize..];
            let events = decode_in_chunks(&mut resumed, rest, 3);
            let expected: Vec<_> = all
                .iter()
                .filter(|f| f.segment >= point.next_segment)
                .cloned()
                .collect();
            assert_eq!(finals(&events), expected, "resumed at {point:?}");
        }
    }

    #[test]
    fn end_of_stream_flushes_the_open_segment() {
        // speech runs into the end, with a trailing partial window
        let mut audio = run(&[(0.0, 1), (5.0, 2)]);
        audio.extend([5.0, 5.0]);
        let mut seg = segmenter(ResumePoint {
            session_sample: 100,
            next_segment: 7,
        });
        let events = decode_in_chunks(&mut seg, &audio, 3);
        assert_eq!(
            finals(&events),
            vec![Transcript {
                segment: 7,
                text: "w5".into(),
                start_sample: 100 + WINDOW as u64,
                end_sample: 100 + audio.len() as u64,
            }]
        );
        assert!(replay_points(&events).is_empty());
    }

    #[test]
    fn partials_cover_the_open_segment_only_while_speech_is_ongoing() {
        let mut seg = segmenter(ResumePoint::default());
        assert_eq!(seg.accept(&run(&[(0.0, 5)])).unwrap(), vec![]);
        assert!(!seg.in_speech());
        assert_eq!(seg.partial().unwrap(), None, "no speech, no decode");
        assert_eq!(seg.recognizer.calls, 0);
        seg.accept(&run(&[(1.0, 2), (2.0, 1)])).unwrap();
        assert!(seg.in_speech());
        let partial = seg.partial().unwrap().unwrap();
        // one window of lookback before the onset (window 4), then windows 5..8
        assert_eq!(partial, t(0, "w1 w2", 4, 8));
        let events = seg.accept(&run(&[(0.0, 2)])).unwrap();
        assert_eq!(finals(&events), vec![t(0, "w1 w2", 5, 8)]);
        assert_eq!(seg.partial().unwrap(), None);
    }

    #[test]
    fn the_partial_buffer_is_capped() {
        let mut seg = segmenter(ResumePoint::default());
        seg.accept(&run(&[(1.0, 10), (2.0, 10), (3.0, 10)]))
            .unwrap();
        let partial = seg.partial().unwrap().unwrap();
        assert_eq!(partial.end_sample - partial.start_sample, 64);
        assert_eq!(partial.text, "w2 w3");
        // finals still get the whole segment
        let events = seg.finish().unwrap();
        assert_eq!(finals(&events), vec![t(0, "w1 w2 w3", 0, 30)]);
    }

    #[test]
    fn segments_without_text_close_but_take_no_index() {
        struct Deaf;
        impl Recognizer for Deaf {
            fn transcribe(&mut self, _: &[f32]) -> Result<String, EngineError> {
                Ok(String::new())
            }
        }
        let mut seg = Segmenter::new(
            Deaf,
            EnergyVads { close_after: 1 },
            SegmenterConfig::default(),
            ResumePoint::default(),
        )
        .unwrap();
        let events = seg.accept(&run(&[(1.0, 1), (0.0, 1)])).unwrap();
        assert_eq!(
            events,
            vec![DecoderEvent::ReplayPoint(ResumePoint {
                session_sample: 2 * WINDOW as u64,
                next_segment: 0
            })]
        );
    }
}
