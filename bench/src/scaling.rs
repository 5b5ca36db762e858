//! `asr-bench scaling --seeds 5`: the two scaling policies compared on the same
//! generated call-centre days, through the scaling simulator (the orchestrator's own
//! allocation, policy and fleet code, in simulated time).
//!
//! The comparison is fair by construction: the trace parameters are fixed (the
//! generator's defaults), every policy runs on the same seeds with the same bounds,
//! check interval and start-up delay, and idle-target gets the smallest
//! SCALING_TARGET whose allocation-wait p99 meets the SLO on every seed. The question
//! is whether predictive holds that p99 for at least 30 % fewer worker-seconds, or
//! reaches zero SLO violations at no more cost.

use std::time::Duration;

use orchestrator::scaling::simulation::{Report, SimulationError, SimulationSetup, simulate};
use orchestrator::scaling::trace::{Trace, TraceParams, generate};
use orchestrator::scaling::{PolicyKind, ScalingArgs};

#[derive(clap::Args)]
// The policy is the benchmark's to choose; and 16 workers (the orchestrator's default
// bound) are fewer than a generated day's busiest minutes need at capacity 1, which
// would measure the bound rather than the policies.
#[command(
    mut_arg("scaling_policy", |arg| arg.hide(true)),
    mut_arg("scaling_max_workers", |arg| arg.default_value("64")),
)]
pub struct Args {
    /// Generated days, seeds 1 to N.
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// The allocation wait a caller should not exceed.
    #[arg(long, default_value_t = 1000)]
    slo_ms: u64,
    /// Sessions one worker serves at once (the recognizer's default: 1).
    #[arg(long, default_value_t = 1)]
    capacity: u32,
    /// The largest SCALING_TARGET tried for idle-target.
    #[arg(long, default_value_t = 30)]
    max_target: u32,
    #[command(flatten)]
    scaling: ScalingArgs,
}

/// One policy's runs, one per seed.
struct Runs {
    label: String,
    reports: Vec<Report>,
}

impl Runs {
    fn mean(&self, value: impl Fn(&Report) -> f64) -> f64 {
        self.reports.iter().map(value).sum::<f64>() / self.reports.len() as f64
    }

    fn meets_slo(&self, slo: Duration) -> bool {
        self.reports.iter().all(|r| r.wait_p99 <= slo)
    }

    fn violations(&self) -> usize {
        self.reports.iter().map(|r| r.slo_violations).sum()
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.seeds > 0, "--seeds must be at least 1");
    let slo = Duration::from_millis(args.slo_ms);
    let params = TraceParams::default();
    let traces: Vec<(u64, Trace)> = (1..=args.seeds)
        .map(|seed| Ok((seed, generate(&params, seed)?)))
        .collect::<anyhow::Result<_>>()?;
    let setup = |policy, scaling_target| SimulationSetup {
        scaling: ScalingArgs {
            scaling_policy: policy,
            scaling_target,
            ..args.scaling.clone()
        },
        capacity_per_worker: args.capacity,
        slo,
    };

    print_parameters(&args, &params, &traces);

    // idle-target: the smallest target whose p99 meets the SLO on every seed.
    println!(
        "idle-target, the smallest SCALING_TARGET meeting the SLO (p99 <= {} ms on every seed):",
        slo.as_millis()
    );
    let mut idle = None;
    for target in 0..=args.max_target {
        let setup = setup(PolicyKind::IdleTarget, target);
        let runs = Runs {
            label: format!("idle-target {target}"),
            reports: run_all(&traces, |trace| simulate(trace, &setup))?,
        };
        let p99s: Vec<String> = runs
            .reports
            .iter()
            .map(|r| r.wait_p99.as_millis().to_string())
            .collect();
        let meets = runs.meets_slo(slo);
        println!(
            "  target {target}: p99 per seed (ms) {}, violations {}, mean worker-seconds {:.0}: {}",
            p99s.join(" "),
            runs.violations(),
            runs.mean(|r| r.worker_seconds),
            if meets { "meets the SLO" } else { "misses" }
        );
        if meets {
            idle = Some(runs);
            break;
        }
    }
    let Some(idle) = idle else {
        anyhow::bail!(
            "no SCALING_TARGET up to {} meets the SLO on every seed",
            args.max_target
        );
    };

    let predictive_setup = setup(PolicyKind::Predictive, args.scaling.scaling_target);
    let predictive = Runs {
        label: "predictive".into(),
        reports: run_all(&traces, |trace| simulate(trace, &predictive_setup))?,
    };

    println!();
    print_per_seed(&traces, &[&idle, &predictive]);
    println!();
    print_aggregate(&[&idle, &predictive], slo, args.seeds);
    println!();
    let floor = traces
        .iter()
        .map(|(_, trace)| busy_worker_seconds(trace, args.capacity))
        .sum::<f64>()
        / traces.len() as f64;
    print_verdict(&idle, &predictive, slo, floor);
    Ok(())
}

fn run_all(
    traces: &[(u64, Trace)],
    simulate: impl Fn(&Trace) -> Result<Report, SimulationError>,
) -> anyhow::Result<Vec<Report>> {
    traces
        .iter()
        .map(|(seed, trace)| simulate(trace).map_err(|e| anyhow::anyhow!("seed {seed}: {e}")))
        .collect()
}

fn print_parameters(args: &Args, params: &TraceParams, traces: &[(u64, Trace)]) {
    let s = &args.scaling;
    println!(
        "trace: {} h from midnight, peak {} calls/min, trough {} of the peak at 04:00, \
         {} bursts/day of ~{} calls (decay {} s), call length log-normal median {} s \
         sigma {} capped at {} s; seeds 1..={}",
        params.duration_hours,
        params.peak_calls_per_minute,
        params.trough_fraction,
        params.bursts_per_day,
        params.burst_calls,
        params.burst_decay_secs,
        params.call_median_secs,
        params.call_sigma,
        params.call_max_secs,
        args.seeds,
    );
    for (seed, trace) in traces {
        let summary = trace.summary();
        println!(
            "  seed {seed}: {} calls, peak {} calls/min, call length p50 {} s, p99 {} s, \
             busy worker-seconds {:.0}",
            summary.calls,
            summary.peak_per_minute,
            summary.length_p50.as_secs(),
            summary.length_p99.as_secs(),
            busy_worker_seconds(trace, args.capacity)
        );
    }
    let fleet = SimulationSetup {
        scaling: s.clone(),
        capacity_per_worker: args.capacity,
        slo: Duration::from_millis(args.slo_ms),
    };
    println!("fleet: {fleet}");
    println!(
        "predictive: margin {} sigmas, min spare {}, rate windows {} s and {} s, horizon {} ms",
        s.predictive_margin_sigmas,
        s.predictive_min_spare,
        s.predictive_short_window_secs,
        s.predictive_long_window_secs,
        (s.worker_startup() + s.check_interval()).as_millis(),
    );
    println!();
}

/// The worker-seconds the calls themselves take: no policy can pay less.
fn busy_worker_seconds(trace: &Trace, capacity: u32) -> f64 {
    let talk: f64 = trace.calls().iter().map(|c| c.duration.as_secs_f64()).sum();
    talk / f64::from(capacity.max(1))
}

fn print_per_seed(traces: &[(u64, Trace)], policies: &[&Runs]) {
    println!(
        "| seed | policy | wait p50 (ms) | wait p99 (ms) | wait max (ms) | waits > SLO | drain handoffs (max pause ms) | worker-seconds | mean workers | peak workers |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, (seed, _)) in traces.iter().enumerate() {
        for runs in policies {
            let r = &runs.reports[i];
            println!(
                "| {seed} | {} | {} | {} | {} | {} | {} ({}) | {:.0} | {:.2} | {} |",
                runs.label,
                r.wait_p50.as_millis(),
                r.wait_p99.as_millis(),
                r.wait_max.as_millis(),
                r.slo_violations,
                r.handoffs,
                r.handoff_pause_max.as_millis(),
                r.worker_seconds,
                r.mean_workers,
                r.peak_workers
            );
        }
    }
}

fn print_aggregate(policies: &[&Runs], slo: Duration, seeds: u64) {
    let baseline = policies[0].mean(|r| r.worker_seconds);
    println!(
        "| policy ({seeds} seeds) | mean wait p50 (ms) | mean wait p99 (ms) | mean wait max (ms) | waits > SLO (total) | p99 <= {} ms on every seed | mean worker-seconds | worker-seconds / {} |",
        slo.as_millis(),
        policies[0].label
    );
    println!("|---|---|---|---|---|---|---|---|");
    for runs in policies {
        let worker_seconds = runs.mean(|r| r.worker_seconds);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {:.3} |",
            runs.label,
            runs.mean(|r| r.wait_p50.as_secs_f64() * 1000.0),
            runs.mean(|r| r.wait_p99.as_secs_f64() * 1000.0),
            runs.mean(|r| r.wait_max.as_secs_f64() * 1000.0),
            runs.violations(),
            if runs.meets_slo(slo) { "yes" } else { "no" },
            worker_seconds,
            worker_seconds / baseline
        );
    }
}

/// The target: idle-target's p99 held (no higher on average, and within the
/// SLO on every seed) with at least 30 % fewer worker-seconds, or zero SLO violations
/// at no more cost. `floor` is the mean busy worker-seconds, below which no policy
/// can go.
fn print_verdict(idle: &Runs, predictive: &Runs, slo: Duration, floor: f64) {
    let idle_cost = idle.mean(|r| r.worker_seconds);
    let ratio = predictive.mean(|r| r.worker_seconds) / idle_cost;
    let mean_p99 = |runs: &Runs| runs.mean(|r| r.wait_p99.as_secs_f64());
    let holds_p99 = mean_p99(predictive) <= mean_p99(idle) && predictive.meets_slo(slo);
    let met = |yes: bool| if yes { "MET" } else { "not met" };
    println!(
        "busy worker-seconds (the calls themselves, no policy pays less): {floor:.0}, \
         {:.3} of idle-target's; 30 % below idle-target would be {:.3} of the busy time",
        floor / idle_cost,
        0.7 * idle_cost / floor
    );
    println!(
        "target 1, idle-target's p99 held with >= 30 % fewer worker-seconds: {} \
         (p99 held: {}, worker-seconds x{ratio:.3})",
        met(holds_p99 && ratio <= 0.7),
        if holds_p99 { "yes" } else { "no" },
    );
    println!(
        "target 2, zero SLO violations at equal or lower cost: {} ({} violations, \
         worker-seconds x{ratio:.3})",
        met(predictive.violations() == 0 && ratio <= 1.0),
        predictive.violations(),
    );
}
