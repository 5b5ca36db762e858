//! The scaling policies: a model's load projection in, the number of workers it wants
//! out. Pure; [`super::Scaler`] bounds them and keeps them from flapping.

use std::collections::VecDeque;
use std::time::Duration;

use super::{LoadProjection, ScalingPolicy};

/// The report's baseline: keep `idle_target` free session slots per model, on top of
/// what the active and waiting sessions need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTarget {
    pub idle_target: u32,
}

impl ScalingPolicy for IdleTarget {
    fn target(&mut self, _now: Duration, load: &LoadProjection) -> u32 {
        load.workers_for(load.active_sessions + load.waiting_sessions + self.idle_target)
    }
}

/// Provisions for the sessions expected to arrive before a worker started now could
/// serve them.
///
/// A worker asked for now is ready after the start-up time; until then, every arrival
/// must find a slot that already exists. So the spare slots wanted are the arrivals
/// forecast over that horizon, plus a margin of `margin_sigmas` standard deviations of
/// that forecast, and never fewer than `min_spare`:
///
/// - the rate is the higher of a short-window rate (a burst raises it within seconds)
///   and a long-window rate (the daily curve; it keeps capacity through a burst's
///   pauses);
/// - the variance is the forecast times the index of dispersion observed over the long
///   window (variance over mean of the arrivals per check): 1 for Poisson arrivals, more
///   for bursty ones, so a bursty line gets a wider margin than a steady one of the
///   same rate.
///
/// At a quiet hour this keeps a slot or two spare where the idle target keeps the
/// same number all day; at the peak, or as a burst builds, it keeps more.
#[derive(Clone, Debug)]
pub struct Predictive {
    /// Worker start-up plus one check interval: how far ahead arrivals must be covered.
    pub horizon: Duration,
    pub margin_sigmas: f64,
    pub min_spare: u32,
    pub short_window: Duration,
    pub long_window: Duration,
    /// `(when, arrivals_total)` observations, oldest first, spanning the long window.
    samples: VecDeque<(Duration, u64)>,
}

impl Predictive {
    /// `windows` are the short and the long rate windows.
    pub fn new(
        horizon: Duration,
        margin_sigmas: f64,
        min_spare: u32,
        (short_window, long_window): (Duration, Duration),
    ) -> Self {
        Self {
            horizon,
            margin_sigmas,
            min_spare,
            short_window,
            long_window,
            samples: VecDeque::new(),
        }
    }

    fn observe(&mut self, now: Duration, arrivals_total: u64) {
        // A restarted projection (a new leader) may count from a lower total: start over.
        if self
            .samples
            .back()
            .is_some_and(|&(t, total)| now < t || arrivals_total < total)
        {
            self.samples.clear();
        }
        self.samples.push_back((now, arrivals_total));
        // Keep one observation at or before the window's start, to measure across it.
        while self.samples.len() > 2 && now.saturating_sub(self.samples[1].0) >= self.long_window {
            self.samples.pop_front();
        }
    }

    /// Arrivals per second over the last `window` (or as much of it as observed).
    fn rate(&self, now: Duration, window: Duration) -> f64 {
        let Some(&(_, latest)) = self.samples.back() else {
            return 0.0;
        };
        let since = now.saturating_sub(window);
        let Some(&(from, total)) = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= since)
            .or_else(|| self.samples.front())
        else {
            return 0.0;
        };
        // Over the whole window even before it has all been observed: right after a
        // start (a new leader) two arrivals a moment apart are not a rate of several
        // calls a second.
        let span = now.saturating_sub(from).max(window).as_secs_f64();
        if span <= 0.0 {
            0.0
        } else {
            (latest - total) as f64 / span
        }
    }

    /// Variance over mean of the arrivals between consecutive observations; at least 1.
    fn dispersion(&self) -> f64 {
        let counts: Vec<f64> = self
            .samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|(a, b)| (b.1 - a.1) as f64)
            .collect();
        if counts.len() < 2 {
            return 1.0;
        }
        let n = counts.len() as f64;
        let mean = counts.iter().sum::<f64>() / n;
        if mean <= 0.0 {
            return 1.0;
        }
        let variance = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (variance / mean).max(1.0)
    }

    /// The spare slots wanted now: forecast arrivals over the horizon plus the margin.
    pub fn spare_slots(&self, now: Duration) -> u32 {
        let rate = self
            .rate(now, self.short_window)
            .max(self.rate(now, self.long_window));
        let forecast = rate * self.horizon.as_secs_f64();
        let margin = self.margin_sigmas * (forecast * self.dispersion()).sqrt();
        ((forecast + margin).ceil() as u32).max(self.min_spare)
    }
}

impl ScalingPolicy for Predictive {
    fn target(&mut self, now: Duration, load: &LoadProjection) -> u32 {
        self.observe(now, load.arrivals_total);
        load.workers_for(load.active_sessions + load.waiting_sessions + self.spare_slots(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const WINDOWS: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(300));

    fn load(active: u32, arrivals_total: u64) -> LoadProjection {
        LoadProjection {
            active_sessions: active,
            arrivals_total,
            capacity_per_worker: 1,
            ..LoadProjection::default()
        }
    }

    #[test]
    fn idle_target_keeps_free_slots_beyond_active_and_waiting() {
        let mut policy = IdleTarget { idle_target: 2 };
        let load = LoadProjection {
            active_sessions: 3,
            waiting_sessions: 1,
            capacity_per_worker: 2,
            ..LoadProjection::default()
        };
        // 3 active + 1 waiting + 2 idle = 6 slots = 3 workers of 2.
        assert_eq!(policy.target(Duration::ZERO, &load), 3);
    }

    #[test]
    fn predictive_without_arrivals_keeps_only_the_minimum_spare() {
        let mut policy = Predictive::new(3 * S, 2.0, 1, WINDOWS);
        for t in 0..60 {
            assert_eq!(policy.target(t * S, &load(4, 100)), 5, "at {t} s");
        }
    }

    #[test]
    fn predictive_covers_a_steady_rate_over_the_horizon_with_a_margin() {
        // One arrival per second, perfectly regular: forecast 3 over a 3 s horizon,
        // dispersion 1, margin 2 * sqrt(3) = 3.46: 7 spare slots.
        let mut policy = Predictive::new(3 * S, 2.0, 1, WINDOWS);
        let mut wanted = 0;
        for t in 0..=120 {
            wanted = policy.target(t * S, &load(10, u64::from(t)));
        }
        assert_eq!(wanted, 10 + 7);
    }

    #[test]
    fn predictive_reacts_to_a_burst_within_the_short_window() {
        let mut policy = Predictive::new(3 * S, 2.0, 1, WINDOWS);
        // A quiet line: one call a minute for ten minutes.
        let mut total = 0;
        for t in 0..600 {
            if t % 60 == 0 {
                total += 1;
            }
            policy.target(t * S, &load(1, total));
        }
        let quiet = policy.spare_slots(599 * S);
        // Then 2 calls a second for 5 s.
        for t in 600..605 {
            total += 2;
            policy.target(t * S, &load(1, total));
        }
        let burst = policy.spare_slots(604 * S);
        assert!(quiet <= 2, "quiet spare {quiet}");
        assert!(
            burst >= 6,
            "burst spare {burst}: forecast 2/s x 3 s plus margin"
        );
    }

    #[test]
    fn bursty_arrivals_get_a_wider_margin_than_steady_ones_of_the_same_rate() {
        let mut steady = Predictive::new(3 * S, 2.0, 0, WINDOWS);
        let mut bursty = Predictive::new(3 * S, 2.0, 0, WINDOWS);
        let (mut steady_total, mut bursty_total) = (0, 0);
        for t in 0..300 {
            steady_total += 1;
            // Same mean rate, 10 calls at once every 10 s.
            if t % 10 == 0 {
                bursty_total += 10;
            }
            steady.target(t * S, &load(0, steady_total));
            bursty.target(t * S, &load(0, bursty_total));
        }
        // Look between bursts, where the short window does not dominate.
        assert!(bursty.spare_slots(299 * S) > steady.spare_slots(299 * S));
    }

    #[test]
    fn a_fresh_start_does_not_read_a_few_arrivals_as_a_flood() {
        // Three calls 100 ms apart right after a start (a new leader): over the 10 s
        // window that is 0.3 calls/s, not 10.
        let mut policy = Predictive::new(3 * S, 2.0, 1, WINDOWS);
        let ms = Duration::from_millis(100);
        for i in 0..3u32 {
            policy.target(i * ms, &load(0, u64::from(i) + 1));
        }
        assert!(
            policy.spare_slots(2 * ms) <= 4,
            "{}",
            policy.spare_slots(2 * ms)
        );
    }

    #[test]
    fn a_projection_that_starts_over_does_not_confuse_the_rates() {
        let mut policy = Predictive::new(3 * S, 2.0, 1, WINDOWS);
        for t in 0..30 {
            policy.target(t * S, &load(0, 1000 + u64::from(t)));
        }
        // A new leader counts arrivals from zero again.
        assert_eq!(policy.target(30 * S, &load(0, 0)), 1);
    }
}
