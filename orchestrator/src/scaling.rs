//! Scaling decisions as pure values (issue 6, first part): a model's load projection in,
//! a desired number of workers out. No I/O: the orchestrator feeds projections and acts
//! on decisions through a backend; the simulator drives the same code.
//!
//! Every policy is bounded by the model's minimum and maximum replicas, and protected
//! against flapping the same way: scaling up happens at once (a caller waiting is the
//! cost), scaling down only after the lower target has held for a cool-down (a worker
//! started is seconds of model load, not worth throwing away for a lull).

use std::time::Duration;

/// What the streams say about one model's load at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadProjection {
    /// Sessions assigned to a worker.
    pub active_sessions: u32,
    /// Sessions waiting for a worker.
    pub waiting_sessions: u32,
    /// Workers registered and serving (idle or busy), and workers starting.
    pub workers_ready: u32,
    pub workers_starting: u32,
    /// Sessions one worker serves at once.
    pub capacity_per_worker: u32,
}

impl LoadProjection {
    /// Free session slots of the ready workers.
    pub fn idle_slots(&self) -> u32 {
        (self.workers_ready * self.capacity_per_worker).saturating_sub(self.active_sessions)
    }
}

/// Replica bounds and the cool-down that keeps a policy from flapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub min_workers: u32,
    pub max_workers: u32,
    /// How long a lower target must hold before workers are removed.
    pub scale_down_after: Duration,
}

/// A policy's raw wish: how many workers it wants now, before bounds and cool-down.
pub trait ScalingPolicy {
    fn target(&mut self, now: Duration, load: &LoadProjection) -> u32;
}

/// The report's baseline: keep `idle_target` free session slots per model, on top of
/// what the active and waiting sessions need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTarget {
    pub idle_target: u32,
}

impl ScalingPolicy for IdleTarget {
    fn target(&mut self, _now: Duration, load: &LoadProjection) -> u32 {
        let needed = load.active_sessions + load.waiting_sessions + self.idle_target;
        needed.div_ceil(load.capacity_per_worker.max(1))
    }
}

/// Turns a policy's wishes into decisions: bounded, up at once, down after the
/// cool-down.
#[derive(Debug)]
pub struct Scaler<P> {
    policy: P,
    bounds: Bounds,
    /// Since when the wish has been below the current number of workers.
    lower_since: Option<Duration>,
}

impl<P: ScalingPolicy> Scaler<P> {
    pub fn new(policy: P, bounds: Bounds) -> Self {
        Self {
            policy,
            bounds,
            lower_since: None,
        }
    }

    /// The number of workers (ready and starting) the model should have now.
    pub fn decide(&mut self, now: Duration, load: &LoadProjection) -> u32 {
        let current = load.workers_ready + load.workers_starting;
        let wanted = self
            .policy
            .target(now, load)
            .clamp(self.bounds.min_workers, self.bounds.max_workers);
        if wanted >= current {
            self.lower_since = None;
            return wanted;
        }
        let since = *self.lower_since.get_or_insert(now);
        if now.saturating_sub(since) >= self.bounds.scale_down_after {
            self.lower_since = None;
            wanted
        } else {
            current.clamp(self.bounds.min_workers, self.bounds.max_workers)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn load(active: u32, waiting: u32, ready: u32) -> LoadProjection {
        LoadProjection {
            active_sessions: active,
            waiting_sessions: waiting,
            workers_ready: ready,
            workers_starting: 0,
            capacity_per_worker: 2,
        }
    }

    fn scaler(idle_target: u32) -> Scaler<IdleTarget> {
        Scaler::new(
            IdleTarget { idle_target },
            Bounds {
                min_workers: 1,
                max_workers: 5,
                scale_down_after: 30 * S,
            },
        )
    }

    #[test]
    fn idle_target_keeps_free_slots_beyond_active_and_waiting() {
        let mut s = scaler(2);
        // 3 active + 1 waiting + 2 idle = 6 slots = 3 workers of 2.
        assert_eq!(s.decide(Duration::ZERO, &load(3, 1, 2)), 3);
        assert_eq!(load(3, 0, 3).idle_slots(), 3);
    }

    #[test]
    fn bounds_hold_both_ways() {
        let mut s = scaler(0);
        assert_eq!(s.decide(Duration::ZERO, &load(0, 0, 0)), 1, "the minimum");
        assert_eq!(s.decide(Duration::ZERO, &load(20, 10, 5)), 5, "the maximum");
    }

    #[test]
    fn up_at_once_down_only_after_the_cool_down() {
        let mut s = scaler(1);
        assert_eq!(s.decide(Duration::ZERO, &load(7, 0, 2)), 4, "up at once");
        // The burst ends: the wish drops to 1, the workers stay for 30 s.
        assert_eq!(s.decide(10 * S, &load(0, 0, 4)), 4);
        assert_eq!(s.decide(39 * S, &load(0, 0, 4)), 4);
        assert_eq!(s.decide(40 * S, &load(0, 0, 4)), 1, "down after 30 s");
    }

    #[test]
    fn a_lull_shorter_than_the_cool_down_does_not_flap() {
        let mut s = scaler(1);
        assert_eq!(s.decide(Duration::ZERO, &load(5, 0, 3)), 3);
        for t in 1..=20 {
            // Calls come and go every few seconds: the wish swings between 1 and 3.
            let active = if t % 2 == 0 { 5 } else { 0 };
            assert_eq!(s.decide(t * S, &load(active, 0, 3)), 3, "at {t} s");
        }
    }
}
