//! From a desired number of workers to what to do with the fleet, pure: how many to
//! start, which draining workers to bring back, which workers to drain.
//!
//! Capacity that already runs is cheapest: a scale-up first brings back workers being
//! drained (instantly ready) and starts new ones only for the rest. A scale-down never
//! stops a worker outright: it drains it (no new sessions), and the autoscaler stops it
//! once its sessions are finished or handed off. Workers still starting are not
//! cancelled: they are seconds from being useful, and the cool-down already decided
//! the lower target was worth acting on.

use std::cmp::Reverse;

/// A registered worker as the fleet reconciliation sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerView {
    pub id: String,
    /// Sessions it serves now.
    pub assigned: u32,
    pub draining: bool,
}

/// Which workers a scale-down drains first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovalOrder {
    /// The fewest sessions first (the least to hand off or wait for), then the highest
    /// ordinal, so that local worker ids stay compact.
    LeastLoaded,
    /// The highest ordinal first, whatever the load: a StatefulSet scaled down removes
    /// its highest-numbered pods, so those are the ones to drain.
    HighestOrdinal,
}

/// What to do to reach a desired number of workers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// New workers to ask the backend for.
    pub start: u32,
    /// Draining workers to take sessions again.
    pub undrain: Vec<String>,
    /// Workers to drain.
    pub drain: Vec<String>,
}

/// A worker's ordinal: the number after the last `-` of its id (`recognizer-12` → 12),
/// its StatefulSet ordinal or its index under `asr up`; `None` for an id without one,
/// such as a Deployment's pod (`recognizer-7f9c4-x2k8q`).
pub fn ordinal(worker: &str) -> Option<u32> {
    let (_, digits) = worker.rsplit_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The actions that bring `workers` (registered) plus `starting` to `desired`.
pub fn reconcile(
    desired: u32,
    workers: &[WorkerView],
    starting: u32,
    order: RemovalOrder,
) -> Reconciliation {
    let serving = workers.iter().filter(|w| !w.draining).count() as u32;
    let current = serving + starting;
    let mut plan = Reconciliation::default();
    if desired > current {
        let mut missing = desired - current;
        let mut draining: Vec<&WorkerView> = workers.iter().filter(|w| w.draining).collect();
        // The busiest draining workers back first: they hold sessions anyway.
        draining.sort_by_key(|w| (Reverse(w.assigned), ordinal(&w.id), w.id.clone()));
        for worker in draining.into_iter().take(missing as usize) {
            plan.undrain.push(worker.id.clone());
            missing -= 1;
        }
        plan.start = missing;
    } else if desired < current {
        // Only registered workers can be drained; starting ones are left to start.
        let excess = (current - desired).min(serving);
        let mut candidates: Vec<&WorkerView> = workers.iter().filter(|w| !w.draining).collect();
        match order {
            RemovalOrder::LeastLoaded => candidates
                .sort_by_key(|w| (w.assigned, Reverse(ordinal(&w.id)), Reverse(w.id.clone()))),
            RemovalOrder::HighestOrdinal => {
                candidates.sort_by_key(|w| (Reverse(ordinal(&w.id)), Reverse(w.id.clone())))
            }
        }
        plan.drain = candidates
            .into_iter()
            .take(excess as usize)
            .map(|w| w.id.clone())
            .collect();
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, assigned: u32, draining: bool) -> WorkerView {
        WorkerView {
            id: id.into(),
            assigned,
            draining,
        }
    }

    #[test]
    fn ordinals_are_the_number_after_the_last_dash() {
        assert_eq!(ordinal("recognizer-12"), Some(12));
        assert_eq!(ordinal("recognizer-0"), Some(0));
        assert_eq!(ordinal("whisper-tiny-3"), Some(3));
        assert_eq!(ordinal("recognizer"), None);
        assert_eq!(ordinal("recognizer-"), None);
        assert_eq!(ordinal("recognizer-7f9c4-x2k8q"), None);
        assert_eq!(ordinal("recognizer-+1"), None);
        assert_eq!(ordinal("recognizer-99999999999"), None);
    }

    #[test]
    fn at_the_desired_count_nothing_happens() {
        let fleet = [worker("r-1", 1, false), worker("r-2", 0, false)];
        assert_eq!(
            reconcile(3, &fleet, 1, RemovalOrder::LeastLoaded),
            Reconciliation::default()
        );
    }

    #[test]
    fn scaling_up_brings_draining_workers_back_before_starting_new_ones() {
        let fleet = [
            worker("r-1", 1, false),
            worker("r-2", 0, true),
            worker("r-3", 1, true),
        ];
        let plan = reconcile(4, &fleet, 0, RemovalOrder::LeastLoaded);
        assert_eq!(plan.undrain, ["r-3", "r-2"]);
        assert_eq!(plan.start, 1);
        assert!(plan.drain.is_empty());
    }

    #[test]
    fn scaling_down_drains_the_least_loaded_then_the_highest_ordinal() {
        let fleet = [
            worker("r-1", 0, false),
            worker("r-2", 1, false),
            worker("r-9", 0, false),
            worker("r-10", 0, false),
        ];
        let plan = reconcile(2, &fleet, 0, RemovalOrder::LeastLoaded);
        assert_eq!(plan.drain, ["r-10", "r-9"]);
        assert_eq!(plan.start, 0);
    }

    #[test]
    fn a_statefulset_drains_its_highest_ordinals_even_when_busy() {
        let fleet = [
            worker("r-0", 0, false),
            worker("r-1", 0, false),
            worker("r-2", 1, false),
        ];
        let plan = reconcile(1, &fleet, 0, RemovalOrder::HighestOrdinal);
        assert_eq!(plan.drain, ["r-2", "r-1"]);
    }

    #[test]
    fn starting_workers_are_never_drained_and_draining_ones_not_counted() {
        let fleet = [worker("r-1", 0, false), worker("r-2", 0, true)];
        // Desired 0 with 1 serving and 2 starting: only the serving one can go.
        let plan = reconcile(0, &fleet, 2, RemovalOrder::LeastLoaded);
        assert_eq!(plan.drain, ["r-1"]);
        // Desired 2 with 1 serving and 1 starting: nothing to do, r-2 keeps draining.
        assert_eq!(
            reconcile(2, &fleet, 1, RemovalOrder::LeastLoaded),
            Reconciliation::default()
        );
    }
}
