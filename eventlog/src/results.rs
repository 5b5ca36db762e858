//! Which result events count: the one rule every consumer applies (ingest when it
//! streams results to the client, the projector, the CLI).
//!
//! Rule: an `EpochStarted` with an epoch above every earlier one opens that epoch;
//! results count only when their epoch equals the latest opened epoch; per segment
//! index, the first such `Final` wins and later ones (a replacement re-deciding a
//! segment its predecessor had already appended) are duplicates. Everything from an
//! older epoch (a zombie worker that woke up) is ignored, and so is anything from an
//! epoch that never announced itself.

use std::collections::BTreeMap;

use crate::events::Event;

/// Why an event does not count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// From an epoch other than the latest started one.
    StaleEpoch,
    /// A final for a segment that already has one, or a second completion.
    Duplicate,
    /// A partial for a segment that is already final.
    AlreadyFinal,
    /// Not a result event.
    NotAResult,
}

/// The verdict on one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Ignored(Ignored),
}

/// An accepted final segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedFinal {
    pub epoch: u64,
    pub text: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Folds a session's result events, in log order, into the transcript that counts.
#[derive(Clone, Debug, Default)]
pub struct ResultFilter {
    epoch: Option<u64>,
    finals: BTreeMap<u32, AcceptedFinal>,
    completed: Option<u32>,
}

impl ResultFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Judges the next event of the session's results, updating the transcript.
    pub fn accept(&mut self, event: &Event) -> Verdict {
        use Verdict::{Accepted, Ignored as No};
        match event {
            Event::EpochStarted { epoch, .. } => {
                if self.epoch.is_some_and(|current| *epoch <= current) {
                    No(Ignored::StaleEpoch)
                } else {
                    self.epoch = Some(*epoch);
                    Accepted
                }
            }
            Event::Partial { epoch, segment, .. } => {
                if !self.is_current(*epoch) {
                    No(Ignored::StaleEpoch)
                } else if self.finals.contains_key(segment) {
                    No(Ignored::AlreadyFinal)
                } else {
                    Accepted
                }
            }
            Event::Final {
                epoch,
                segment,
                text,
                start_ms,
                end_ms,
            } => {
                if !self.is_current(*epoch) {
                    No(Ignored::StaleEpoch)
                } else if self.finals.contains_key(segment) {
                    No(Ignored::Duplicate)
                } else {
                    self.finals.insert(
                        *segment,
                        AcceptedFinal {
                            epoch: *epoch,
                            text: text.clone(),
                            start_ms: *start_ms,
                            end_ms: *end_ms,
                        },
                    );
                    Accepted
                }
            }
            Event::TranscriptCompleted { epoch, segments } => {
                if !self.is_current(*epoch) {
                    No(Ignored::StaleEpoch)
                } else if self.completed.is_some() {
                    No(Ignored::Duplicate)
                } else {
                    self.completed = Some(*segments);
                    Accepted
                }
            }
            _ => No(Ignored::NotAResult),
        }
    }

    fn is_current(&self, epoch: u64) -> bool {
        self.epoch == Some(epoch)
    }

    /// The latest started epoch.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Accepted finals by segment index.
    pub fn finals(&self) -> &BTreeMap<u32, AcceptedFinal> {
        &self.finals
    }

    /// The segment count announced by the accepted completion, once there is one.
    pub fn completed(&self) -> Option<u32> {
        self.completed
    }

    /// Segment indices below the announced count that have no accepted final: a gap
    /// the consumer must report rather than paper over.
    pub fn missing_segments(&self) -> Vec<u32> {
        let Some(count) = self.completed else {
            return Vec::new();
        };
        (0..count)
            .filter(|i| !self.finals.contains_key(i))
            .collect()
    }

    /// The transcript: accepted finals in segment order, non-empty texts joined by
    /// single spaces.
    pub fn transcript(&self) -> String {
        join_finals(self.finals.values().map(|f| f.text.as_str()))
    }
}

/// Final texts in segment order as one transcript: trimmed, empty ones skipped, joined
/// by single spaces. Everyone who shows a transcript joins it this way.
pub fn join_finals<'a>(texts: impl Iterator<Item = &'a str>) -> String {
    texts
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(epoch: u64) -> Event {
        Event::EpochStarted {
            epoch,
            worker: format!("w{epoch}"),
        }
    }
    fn fin(epoch: u64, segment: u32, text: &str) -> Event {
        Event::Final {
            epoch,
            segment,
            text: text.into(),
            start_ms: 0,
            end_ms: 1,
        }
    }
    fn partial(epoch: u64, segment: u32) -> Event {
        Event::Partial {
            epoch,
            segment,
            text: "p".into(),
            start_ms: 0,
            end_ms: 1,
        }
    }
    fn done(epoch: u64, segments: u32) -> Event {
        Event::TranscriptCompleted { epoch, segments }
    }

    fn run(events: &[Event]) -> (ResultFilter, Vec<Verdict>) {
        let mut f = ResultFilter::new();
        let v = events.iter().map(|e| f.accept(e)).collect();
        (f, v)
    }

    #[test]
    fn straight_run() {
        let (f, v) = run(&[
            started(1),
            partial(1, 0),
            fin(1, 0, "a"),
            fin(1, 1, "b"),
            done(1, 2),
        ]);
        assert!(v.iter().all(|v| *v == Verdict::Accepted));
        assert_eq!(f.transcript(), "a b");
        assert!(f.missing_segments().is_empty());
    }

    #[test]
    fn nothing_counts_before_an_epoch_starts() {
        let (f, v) = run(&[fin(1, 0, "a"), started(1), fin(1, 0, "b")]);
        assert_eq!(v[0], Verdict::Ignored(Ignored::StaleEpoch));
        assert_eq!(f.transcript(), "b");
    }

    #[test]
    fn replacement_redoing_a_segment_is_deduplicated() {
        // worker 1 appended final 1 and died before checkpointing; worker 2 replays
        // from the checkpoint before segment 1 and appends it again.
        let (f, v) = run(&[
            started(1),
            fin(1, 0, "a"),
            fin(1, 1, "b"),
            started(2),
            fin(2, 1, "b"),
            fin(2, 2, "c"),
            done(2, 3),
        ]);
        assert_eq!(v[4], Verdict::Ignored(Ignored::Duplicate));
        assert_eq!(f.transcript(), "a b c");
        assert_eq!(f.epoch(), Some(2));
    }

    #[test]
    fn zombie_results_are_ignored() {
        let (f, v) = run(&[
            started(1),
            fin(1, 0, "a"),
            started(2),
            fin(1, 1, "zombie"),
            partial(1, 2),
            done(1, 2),
            fin(2, 1, "b"),
            done(2, 2),
        ]);
        assert_eq!(v[3], Verdict::Ignored(Ignored::StaleEpoch));
        assert_eq!(v[4], Verdict::Ignored(Ignored::StaleEpoch));
        assert_eq!(v[5], Verdict::Ignored(Ignored::StaleEpoch));
        assert_eq!(f.transcript(), "a b");
        assert_eq!(f.completed(), Some(2));
    }

    #[test]
    fn an_old_epoch_cannot_restart() {
        let (_, v) = run(&[started(2), started(1), started(2)]);
        assert_eq!(v[1], Verdict::Ignored(Ignored::StaleEpoch));
        assert_eq!(v[2], Verdict::Ignored(Ignored::StaleEpoch));
    }

    #[test]
    fn unannounced_newer_epoch_is_ignored() {
        let (f, v) = run(&[started(1), fin(2, 0, "x")]);
        assert_eq!(v[1], Verdict::Ignored(Ignored::StaleEpoch));
        assert_eq!(f.transcript(), "");
    }

    #[test]
    fn partial_after_final_and_second_completion() {
        let (f, v) = run(&[
            started(1),
            fin(1, 0, "a"),
            partial(1, 0),
            done(1, 2),
            done(1, 2),
        ]);
        assert_eq!(v[2], Verdict::Ignored(Ignored::AlreadyFinal));
        assert_eq!(v[4], Verdict::Ignored(Ignored::Duplicate));
        assert_eq!(f.missing_segments(), vec![1]);
    }

    #[test]
    fn empty_finals_do_not_add_spaces() {
        let (f, _) = run(&[started(1), fin(1, 0, " a "), fin(1, 1, ""), fin(1, 2, "c")]);
        assert_eq!(f.transcript(), "a c");
    }

    #[test]
    fn non_results_are_not_results() {
        let (_, v) = run(&[Event::EndOfStream { last_seq: None }]);
        assert_eq!(v[0], Verdict::Ignored(Ignored::NotAResult));
    }
}
