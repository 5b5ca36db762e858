//! Which control events count: a deposed orchestrator leader's late events are
//! ignored (ARCHITECTURE.md, orchestrator failover).
//!
//! Every control and heartbeat event carries the fencing token of the leader term
//! that wrote it. A leader can still append for a moment after it lost its lock (the
//! broker knows nothing of Redis), so a consumer folding the control stream keeps the
//! highest token seen and ignores events with a lower one. The same fold tells a new
//! leader, after Redis lost its data, where tokens must continue from.

/// Folds control events, in log order.
#[derive(Clone, Copy, Debug, Default)]
pub struct ControlFilter {
    highest: Option<u64>,
}

impl ControlFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fold that has already seen `highest` (a consumer resuming where it stopped).
    pub fn starting_at(highest: Option<u64>) -> Self {
        Self { highest }
    }

    /// Whether the event counts: true for a control event whose token is at least the
    /// highest seen so far (the current term's), false for a deposed leader's event
    /// and for events that are not control events.
    pub fn accept(&mut self, event: &crate::Event) -> bool {
        let Some(token) = event.leader_token() else {
            return false;
        };
        if self.highest.is_some_and(|highest| token < highest) {
            return false;
        }
        self.highest = Some(token);
        true
    }

    /// The highest fencing token seen.
    pub fn highest_token(&self) -> Option<u64> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Event;

    fn lost(token: u64) -> Event {
        Event::WorkerLost {
            worker: "w".into(),
            reason: "test".into(),
            token,
        }
    }

    #[test]
    fn a_deposed_leaders_late_events_are_ignored() {
        let mut filter = ControlFilter::new();
        assert!(filter.accept(&lost(3)));
        assert!(filter.accept(&Event::LeaderElected {
            replica: "b".into(),
            token: 4,
        }));
        assert!(
            !filter.accept(&lost(3)),
            "the old term wrote after the new began"
        );
        assert!(filter.accept(&lost(4)));
        assert_eq!(filter.highest_token(), Some(4));
    }

    #[test]
    fn events_without_a_token_do_not_count() {
        let mut filter = ControlFilter::new();
        assert!(!filter.accept(&Event::EndOfStream { last_seq: None }));
        assert_eq!(filter.highest_token(), None);
    }
}
