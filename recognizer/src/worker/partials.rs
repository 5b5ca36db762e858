//! When to re-decode the open segment for a partial (pure).
//!
//! A partial costs a whole Whisper decode, so it is asked for at most once per
//! interval, and not at all while the worker is behind (the chunk in hand was appended
//! more than an interval ago): the cores then go to catching up, and the final comes
//! sooner. But a partial skipped while behind is owed: the first chunk decoded in
//! time gets one at once, without waiting out another interval. That is what a
//! replacement recognizer needs after a failover: it replays the open segment from
//! the checkpoint, behind all the way, and the caller should hear from it as soon as
//! it has caught up. A fresh run owes one from its start for the same reason.

use std::time::{Duration, Instant};

/// What to do about a partial for the chunk just decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartialDecision {
    /// Decode the open segment now.
    Decode,
    /// Due, but the worker is behind: skipped (counted once per interval).
    Skip,
    /// Not due yet, or skipped within the last interval already.
    Wait,
}

/// The partial clock of one session run.
#[derive(Clone, Debug)]
pub struct PartialSchedule {
    interval: Duration,
    /// The last partial decoded or skipped; `None` before the first.
    last_turn: Option<Instant>,
    /// A partial was skipped since the last one decoded.
    owed: bool,
}

impl PartialSchedule {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_turn: None,
            owed: false,
        }
    }

    /// Decides for a chunk decoded at `now` that was appended `lag` ago, inside speech.
    pub fn decide(&mut self, now: Instant, lag: Duration) -> PartialDecision {
        let turn_due = self
            .last_turn
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if lag > self.interval {
            if !turn_due {
                return PartialDecision::Wait;
            }
            self.last_turn = Some(now);
            self.owed = true;
            return PartialDecision::Skip;
        }
        if turn_due || self.owed {
            self.last_turn = Some(now);
            self.owed = false;
            return PartialDecision::Decode;
        }
        PartialDecision::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::PartialDecision::*;
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(600);
    const IN_TIME: Duration = Duration::from_millis(5);
    const BEHIND: Duration = Duration::from_millis(2_000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_fresh_run_decodes_at_once_then_once_per_interval() {
        let t0 = Instant::now();
        let mut s = PartialSchedule::new(INTERVAL);
        assert_eq!(s.decide(t0, IN_TIME), Decode);
        assert_eq!(s.decide(t0 + ms(100), IN_TIME), Wait);
        assert_eq!(s.decide(t0 + ms(599), IN_TIME), Wait);
        assert_eq!(s.decide(t0 + ms(600), IN_TIME), Decode);
        assert_eq!(s.decide(t0 + ms(700), IN_TIME), Wait);
    }

    #[test]
    fn behind_it_skips_once_per_interval() {
        let t0 = Instant::now();
        let mut s = PartialSchedule::new(INTERVAL);
        let decisions: Vec<_> = (0..13)
            .map(|i| s.decide(t0 + ms(100 * i), BEHIND))
            .collect();
        let skips = decisions.iter().filter(|d| **d == Skip).count();
        assert_eq!(skips, 3, "at 0, 600 and 1200 ms: {decisions:?}");
        assert!(!decisions.contains(&Decode));
    }

    #[test]
    fn caught_up_after_skipping_it_decodes_without_waiting_an_interval() {
        let t0 = Instant::now();
        let mut s = PartialSchedule::new(INTERVAL);
        assert_eq!(s.decide(t0, BEHIND), Skip);
        assert_eq!(s.decide(t0 + ms(30), BEHIND), Wait);
        // The replay reaches live audio 50 ms after the skip: a partial at once.
        assert_eq!(s.decide(t0 + ms(50), IN_TIME), Decode);
        // Then the usual cadence again.
        assert_eq!(s.decide(t0 + ms(150), IN_TIME), Wait);
        assert_eq!(s.decide(t0 + ms(650), IN_TIME), Decode);
    }

    #[test]
    fn a_lag_of_exactly_one_interval_is_in_time() {
        let mut s = PartialSchedule::new(INTERVAL);
        assert_eq!(s.decide(Instant::now(), INTERVAL), Decode);
    }
}
