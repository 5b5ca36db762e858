//! Scaling decisions as pure values (issue 6): a model's load projection in, a desired
//! number of workers out, and which workers to start, drain or keep. No I/O: the
//! orchestrator's autoscaler feeds projections and acts through a backend; the
//! simulator (`asr simulate`) drives the same code.
//!
//! - [`policies`]: the policies ([`IdleTarget`], [`Predictive`]);
//! - [`Scaler`]: bounds and anti-flapping, shared by every policy;
//! - [`fleet`]: from a desired count to the workers to start, drain or bring back;
//! - [`trace`] and [`simulation`]: call-centre arrival traces, and a simulator that
//!   replays one through the allocator and a policy (`asr simulate`);
//! - [`ScalingArgs`]: the flags that choose and tune all of it.
//!
//! Every policy is bounded by the model's minimum and maximum replicas, and protected
//! against flapping the same way: scaling up happens at once (a caller waiting is the
//! cost), scaling down only after the lower target has held for a cool-down (a worker
//! started is seconds of model load, not worth throwing away for a lull).

pub mod fleet;
pub mod policies;
pub mod simulation;
pub mod trace;

use std::time::Duration;

use clap::{Args, ValueEnum};

pub use fleet::{Reconciliation, RemovalOrder, WorkerView, reconcile};
pub use policies::{IdleTarget, Predictive};

/// What the events say about one model's load at one moment: the input of a policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadProjection {
    /// Sessions assigned to a worker.
    pub active_sessions: u32,
    /// Sessions waiting for a worker.
    pub waiting_sessions: u32,
    /// Sessions that ever arrived for the model, as far as the projection has seen: a
    /// counter, so a policy measures arrival rates over windows of its choice.
    pub arrivals_total: u64,
    /// Workers registered and taking sessions (idle or busy).
    pub workers_ready: u32,
    /// Workers asked for and not registered yet.
    pub workers_starting: u32,
    /// Workers finishing their sessions before they stop; they take no new ones.
    pub workers_draining: u32,
    /// Sessions one worker serves at once.
    pub capacity_per_worker: u32,
}

impl LoadProjection {
    /// Free session slots of the ready workers.
    pub fn idle_slots(&self) -> u32 {
        (self.workers_ready * self.capacity_per_worker).saturating_sub(self.active_sessions)
    }

    /// Workers needed to offer `slots` session slots.
    pub fn workers_for(&self, slots: u32) -> u32 {
        slots.div_ceil(self.capacity_per_worker.max(1))
    }
}

/// A policy's raw wish: how many workers it wants now, before bounds and cool-down.
pub trait ScalingPolicy {
    fn target(&mut self, now: Duration, load: &LoadProjection) -> u32;
}

impl<P: ScalingPolicy + ?Sized> ScalingPolicy for Box<P> {
    fn target(&mut self, now: Duration, load: &LoadProjection) -> u32 {
        (**self).target(now, load)
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

/// The policies `--scaling-policy` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyKind {
    /// Keep `--scaling-target` free slots (the report's policy).
    IdleTarget,
    /// Forecast arrivals over the worker start-up time (see [`Predictive`]).
    Predictive,
}

/// The flags that choose a policy and tune it, shared by the orchestrator and the
/// simulator so that both run exactly the same decisions.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct ScalingArgs {
    #[arg(long, env = "ASR_SCALING_POLICY", value_enum, default_value_t = PolicyKind::IdleTarget)]
    pub scaling_policy: PolicyKind,
    /// idle-target: free session slots to keep per model (the report's SCALING_TARGET).
    #[arg(long, env = "ASR_SCALING_TARGET", default_value_t = 1)]
    pub scaling_target: u32,
    /// How often the policy runs (the report's CHECK_INTERVAL).
    #[arg(long, env = "ASR_SCALING_CHECK_INTERVAL_MS", default_value_t = 500)]
    pub scaling_check_interval_ms: u64,
    /// Fewest workers per model, whatever the load.
    #[arg(long, env = "ASR_SCALING_MIN_WORKERS", default_value_t = 1)]
    pub scaling_min_workers: u32,
    /// Most workers per model, whatever the load.
    #[arg(long, env = "ASR_SCALING_MAX_WORKERS", default_value_t = 16)]
    pub scaling_max_workers: u32,
    /// How long a lower target must hold before workers are drained.
    #[arg(long, env = "ASR_SCALING_DOWN_AFTER_SECS", default_value_t = 60)]
    pub scaling_down_after_secs: u64,
    /// How long a draining worker may keep its sessions before they move to other
    /// workers through the checkpoint handoff.
    #[arg(long, env = "ASR_DRAIN_TIMEOUT_SECS", default_value_t = 300)]
    pub drain_timeout_secs: u64,
    /// How long a worker takes from being asked for to taking sessions: measured
    /// 1.04 s p50, 1.11 s p99 from process start to registered (`asr-bench startup`,
    /// docs/BENCHMARKS.md), plus up to 0.2 s for `asr up` to see the decision. The
    /// predictive policy's horizon, and the simulator's start-up delay.
    #[arg(long, env = "ASR_WORKER_STARTUP_MS", default_value_t = 1300)]
    pub worker_startup_ms: u64,
    /// predictive: the margin, in standard deviations of the forecast.
    #[arg(long, env = "ASR_PREDICTIVE_MARGIN_SIGMAS", default_value_t = 2.0)]
    pub predictive_margin_sigmas: f64,
    /// predictive: free slots kept even when no arrival is forecast. Two: with a
    /// start-up longer than the SLO, random clumps of arrivals are only absorbed by
    /// spares (docs/BENCHMARKS.md, scaling policies).
    #[arg(long, env = "ASR_PREDICTIVE_MIN_SPARE", default_value_t = 2)]
    pub predictive_min_spare: u32,
    /// predictive: the short arrival-rate window (how fast a burst is seen).
    #[arg(long, env = "ASR_PREDICTIVE_SHORT_WINDOW_SECS", default_value_t = 10)]
    pub predictive_short_window_secs: u64,
    /// predictive: the long arrival-rate window (the daily curve, and the variance).
    #[arg(long, env = "ASR_PREDICTIVE_LONG_WINDOW_SECS", default_value_t = 300)]
    pub predictive_long_window_secs: u64,
}

/// Fixed settings for the policy and simulator tests: idle-target 1, checks every
/// 500 ms, 1..8 workers, scale-down after 5 s, drain timeout 300 s, start-up 2.5 s,
/// predictive margin 2 sigmas with one spare, rate windows 10 s and 300 s. Tests
/// change what they are about.
#[cfg(test)]
pub(crate) fn test_args() -> ScalingArgs {
    ScalingArgs {
        scaling_policy: PolicyKind::IdleTarget,
        scaling_target: 1,
        scaling_check_interval_ms: 500,
        scaling_min_workers: 1,
        scaling_max_workers: 8,
        scaling_down_after_secs: 5,
        drain_timeout_secs: 300,
        worker_startup_ms: 2500,
        predictive_margin_sigmas: 2.0,
        predictive_min_spare: 1,
        predictive_short_window_secs: 10,
        predictive_long_window_secs: 300,
    }
}

impl ScalingArgs {
    pub fn check_interval(&self) -> Duration {
        Duration::from_millis(self.scaling_check_interval_ms.max(10))
    }

    pub fn worker_startup(&self) -> Duration {
        Duration::from_millis(self.worker_startup_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    pub fn bounds(&self) -> Bounds {
        Bounds {
            min_workers: self.scaling_min_workers,
            max_workers: self.scaling_max_workers.max(self.scaling_min_workers),
            scale_down_after: Duration::from_secs(self.scaling_down_after_secs),
        }
    }

    /// The policy's name, as `--scaling-policy` spells it.
    pub fn policy_name(&self) -> String {
        self.scaling_policy
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string())
    }

    /// The same settings as command-line flags, for a child process (`asr up`).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            format!("--scaling-policy={}", self.policy_name()),
            format!("--scaling-target={}", self.scaling_target),
            format!(
                "--scaling-check-interval-ms={}",
                self.scaling_check_interval_ms
            ),
            format!("--scaling-min-workers={}", self.scaling_min_workers),
            format!("--scaling-max-workers={}", self.scaling_max_workers),
            format!("--scaling-down-after-secs={}", self.scaling_down_after_secs),
            format!("--drain-timeout-secs={}", self.drain_timeout_secs),
            format!("--worker-startup-ms={}", self.worker_startup_ms),
            format!(
                "--predictive-margin-sigmas={}",
                self.predictive_margin_sigmas
            ),
            format!("--predictive-min-spare={}", self.predictive_min_spare),
            format!(
                "--predictive-short-window-secs={}",
                self.predictive_short_window_secs
            ),
            format!(
                "--predictive-long-window-secs={}",
                self.predictive_long_window_secs
            ),
        ]
    }

    /// The chosen policy, bounded and protected against flapping.
    pub fn scaler(&self) -> Scaler<Box<dyn ScalingPolicy + Send>> {
        let policy: Box<dyn ScalingPolicy + Send> = match self.scaling_policy {
            PolicyKind::IdleTarget => Box::new(IdleTarget {
                idle_target: self.scaling_target,
            }),
            PolicyKind::Predictive => Box::new(Predictive::new(
                self.worker_startup() + self.check_interval(),
                self.predictive_margin_sigmas,
                self.predictive_min_spare,
                (
                    Duration::from_secs(self.predictive_short_window_secs.max(1)),
                    Duration::from_secs(self.predictive_long_window_secs.max(1)),
                ),
            )),
        };
        Scaler::new(policy, self.bounds())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    const S: Duration = Duration::from_secs(1);

    fn load(active: u32, waiting: u32, ready: u32) -> LoadProjection {
        LoadProjection {
            active_sessions: active,
            waiting_sessions: waiting,
            workers_ready: ready,
            capacity_per_worker: 2,
            ..LoadProjection::default()
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
    fn idle_slots_count_free_slots_of_ready_workers() {
        assert_eq!(load(3, 0, 3).idle_slots(), 3);
        assert_eq!(load(7, 2, 3).idle_slots(), 0);
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

    #[test]
    fn the_predictive_policy_is_bounded_too() {
        let args = ScalingArgs {
            scaling_policy: PolicyKind::Predictive,
            scaling_min_workers: 2,
            scaling_max_workers: 6,
            scaling_down_after_secs: 30,
            ..test_args()
        };
        let mut s = args.scaler();
        let quiet = LoadProjection {
            capacity_per_worker: 1,
            ..LoadProjection::default()
        };
        assert_eq!(s.decide(Duration::ZERO, &quiet), 2, "the minimum");
        let flood = LoadProjection {
            active_sessions: 40,
            waiting_sessions: 9,
            arrivals_total: 49,
            ..quiet
        };
        assert_eq!(s.decide(S, &flood), 6, "the maximum");
    }

    #[test]
    fn flags_round_trip_through_a_child_command_line() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            scaling: ScalingArgs,
        }
        let args = Cli::parse_from([
            "x",
            "--scaling-policy=predictive",
            "--scaling-target=3",
            "--predictive-margin-sigmas=1.5",
        ])
        .scaling;
        let again = Cli::parse_from(std::iter::once("x".to_string()).chain(args.to_args()));
        assert_eq!(again.scaling, args);
        assert_eq!(args.policy_name(), "predictive");
    }
}
