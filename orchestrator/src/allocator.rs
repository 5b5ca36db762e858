//! The allocation rules, pure: which worker takes a session, and in which order
//! waiting sessions are served.
//!
//! - A worker with a free slot (idle capacity) may take a session; among those, the
//!   least loaded one does (lowest share of its capacity in use, then most free slots,
//!   then the smallest id, so the choice is deterministic and tests can predict it).
//! - A session that finds no free slot waits in its model's queue, in arrival order,
//!   and is never dropped. Whenever slots free up (a release, a new registration) the
//!   oldest waiting sessions of that model are served first.
//! - The unfinished sessions of a lost worker go back to the *head* of the queue: they
//!   were admitted before anyone still waiting, and their callers are mid-sentence.
//!
//! The service applies these decisions to Redis; nothing here waits on a socket.

use std::cmp::Ordering;

use eventlog::SessionId;

/// A worker's state as the registry reports it: BUSY once every slot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    Idle,
    Busy,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Idle => "IDLE",
            WorkerState::Busy => "BUSY",
        }
    }
}

/// How much of a worker's capacity is in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerLoad {
    pub worker: String,
    pub capacity: u32,
    pub assigned: u32,
}

impl WorkerLoad {
    pub fn free_slots(&self) -> u32 {
        self.capacity.saturating_sub(self.assigned)
    }

    pub fn state(&self) -> WorkerState {
        if self.free_slots() == 0 {
            WorkerState::Busy
        } else {
            WorkerState::Idle
        }
    }

    /// Orders by preference: less loaded first.
    fn preference(&self, other: &Self) -> Ordering {
        // assigned/capacity compared without floats; capacity is at least 1 for any
        // worker with a free slot, and the u64 products cannot overflow.
        let mine = u64::from(self.assigned) * u64::from(other.capacity);
        let theirs = u64::from(other.assigned) * u64::from(self.capacity);
        mine.cmp(&theirs)
            .then_with(|| other.free_slots().cmp(&self.free_slots()))
            .then_with(|| self.worker.cmp(&other.worker))
    }
}

/// The index of the worker that should take the next session, if any has a free slot.
pub fn pick(workers: &[WorkerLoad]) -> Option<usize> {
    workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.free_slots() > 0)
        .min_by(|(_, a), (_, b)| a.preference(b))
        .map(|(i, _)| i)
}

/// Serves a model's wait queue (oldest first) from its workers' free slots: the
/// `(session, worker)` assignments to make, in order. Stops at the first session that
/// finds no slot, so nobody is ever overtaken.
pub fn plan(waiting: &[SessionId], mut workers: Vec<WorkerLoad>) -> Vec<(SessionId, String)> {
    let mut assignments = Vec::new();
    for &session in waiting {
        let Some(i) = pick(&workers) else { break };
        workers[i].assigned += 1;
        assignments.push((session, workers[i].worker.clone()));
    }
    assignments
}

/// The order in which a lost worker's sessions are pushed onto the head of the queue
/// (each push goes in front of the previous one), given `(session, requested_at_ms)`:
/// newest first, so that the oldest ends up at the very head.
pub fn head_push_order(mut sessions: Vec<(SessionId, u64)>) -> Vec<SessionId> {
    sessions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    sessions.into_iter().map(|(s, _)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn load(worker: &str, capacity: u32, assigned: u32) -> WorkerLoad {
        WorkerLoad {
            worker: worker.into(),
            capacity,
            assigned,
        }
    }

    fn sessions(n: u128) -> Vec<SessionId> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    #[test]
    fn no_worker_or_no_free_slot_picks_nothing() {
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&[load("a", 1, 1), load("b", 2, 2)]), None);
        assert_eq!(pick(&[load("zero", 0, 0)]), None);
    }

    #[test]
    fn prefers_the_least_loaded_share_of_capacity() {
        // a: 1 of 2 in use (50 %), b: 1 of 4 (25 %), c: full.
        let workers = [load("a", 2, 1), load("b", 4, 1), load("c", 1, 1)];
        assert_eq!(pick(&workers), Some(1));
    }

    #[test]
    fn ties_go_to_more_free_slots_then_the_smallest_id() {
        // Both idle: the bigger worker first.
        assert_eq!(pick(&[load("a", 1, 0), load("b", 2, 0)]), Some(1));
        // Same share and same free slots: by id, whatever the input order.
        assert_eq!(pick(&[load("w2", 2, 1), load("w1", 2, 1)]), Some(1));
        assert_eq!(pick(&[load("w1", 2, 1), load("w2", 2, 1)]), Some(0));
    }

    #[test]
    fn plan_serves_the_queue_in_order_and_respects_capacity() {
        let waiting = sessions(5);
        let plan = plan(&waiting, vec![load("a", 2, 0), load("b", 1, 0)]);
        // a (2 free) first; then a at 50 % vs b at 0 %: b; then a; then nothing.
        assert_eq!(
            plan,
            vec![
                (waiting[0], "a".to_string()),
                (waiting[1], "b".to_string()),
                (waiting[2], "a".to_string()),
            ]
        );
    }

    #[test]
    fn plan_without_free_slots_keeps_everyone_waiting() {
        assert!(plan(&sessions(3), vec![load("a", 1, 1)]).is_empty());
        assert!(plan(&sessions(3), vec![]).is_empty());
        assert!(plan(&[], vec![load("a", 1, 0)]).is_empty());
    }

    #[test]
    fn lost_sessions_are_pushed_newest_first_so_the_oldest_is_at_the_head() {
        let s = sessions(3);
        let order = head_push_order(vec![(s[1], 20), (s[0], 10), (s[2], 30)]);
        assert_eq!(order, vec![s[2], s[1], s[0]]);
        // Simulate the pushes onto a queue that already holds a later arrival.
        let mut queue = std::collections::VecDeque::from([Uuid::from_u128(99)]);
        for session in order {
            queue.push_front(session);
        }
        assert_eq!(
            Vec::from(queue),
            vec![s[0], s[1], s[2], Uuid::from_u128(99)]
        );
    }

    #[test]
    fn state_is_busy_only_without_a_free_slot() {
        assert_eq!(load("a", 2, 1).state(), WorkerState::Idle);
        assert_eq!(load("a", 2, 2).state(), WorkerState::Busy);
        assert_eq!(load("a", 1, 3).state(), WorkerState::Busy);
    }
}
