//! `asr simulate`: replays an arrival trace through one or more scaling policies in
//! simulated time (the orchestrator's own allocation and scaling code) and prints the
//! allocation wait, the SLO violations and the worker-seconds side by side.
//!
//! `asr trace`: writes a generated call-centre trace (a daily curve, bursts,
//! heavy-tailed call lengths) for it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use orchestrator::scaling::simulation::{Report, SimulationSetup, simulate};
use orchestrator::scaling::trace::{Trace, TraceParams, generate};
use orchestrator::scaling::{PolicyKind, ScalingArgs};
use serde_json::json;

#[derive(Args)]
// `--policy` names the policies; the flattened flags' own choice would only confuse.
#[command(mut_arg("scaling_policy", |arg| arg.hide(true)))]
pub struct SimulateArgs {
    /// The arrival trace: CSV with the header `arrival_ms,duration_ms` (`asr trace`
    /// writes one).
    #[arg(long)]
    trace: PathBuf,
    /// A policy to run; repeat it to compare several on the same trace. Every run gets
    /// the same flags below, but the policy.
    #[arg(long = "policy", value_enum, required = true)]
    policies: Vec<PolicyKind>,
    #[command(flatten)]
    scaling: ScalingArgs,
    /// Sessions one worker serves at once (the recognizer's default: 1).
    #[arg(long, default_value_t = 1)]
    capacity: u32,
    /// The allocation wait a caller should not exceed.
    #[arg(long, default_value_t = 1000)]
    slo_ms: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TraceArgs {
    /// The generator's seed: the same seed, the same trace.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the CSV.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    params: TraceParams,
}

impl SimulateArgs {
    /// What one policy's run simulates.
    fn setup(&self, scaling: ScalingArgs) -> SimulationSetup {
        SimulationSetup {
            scaling,
            capacity_per_worker: self.capacity,
            slo: Duration::from_millis(self.slo_ms),
        }
    }
}

/// `asr simulate`.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let trace = read_trace(&args.trace)?;
    let mut runs = Vec::with_capacity(args.policies.len());
    for &policy in &args.policies {
        let setup = args.setup(ScalingArgs {
            scaling_policy: policy,
            ..args.scaling.clone()
        });
        let report = simulate(&trace, &setup)
            .with_context(|| format!("simulating {}", setup.scaling.policy_name()))?;
        runs.push((setup.scaling, report));
    }
    if args.json {
        println!("{:#}", json_output(&args, &trace, &runs));
    } else {
        print_table(&args, &trace, &runs);
    }
    Ok(())
}

/// `asr trace`.
pub fn write_trace(args: TraceArgs) -> anyhow::Result<()> {
    let trace = generate(&args.params, args.seed)?;
    let file =
        File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut out = BufWriter::new(file);
    trace
        .write_csv(&mut out)
        .and_then(|()| out.flush())
        .with_context(|| format!("writing {}", args.out.display()))?;
    let summary = trace.summary();
    println!(
        "{}: {} calls over {:.1} h (seed {}), peak {} calls/min, call length p50 {} s, p99 {} s",
        args.out.display(),
        summary.calls,
        summary.span.as_secs_f64() / 3600.0,
        args.seed,
        summary.peak_per_minute,
        summary.length_p50.as_secs(),
        summary.length_p99.as_secs(),
    );
    Ok(())
}

fn read_trace(path: &Path) -> anyhow::Result<Trace> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the trace {}", path.display()))?;
    text.parse()
        .with_context(|| format!("in the trace {}", path.display()))
}

/// What a policy was tuned with, for the reader of the results.
fn policy_tuning(scaling: &ScalingArgs) -> String {
    match scaling.scaling_policy {
        PolicyKind::IdleTarget => format!("target {}", scaling.scaling_target),
        PolicyKind::Predictive => format!(
            "margin {} sigmas, min spare {}",
            scaling.predictive_margin_sigmas, scaling.predictive_min_spare
        ),
    }
}

fn print_table(args: &SimulateArgs, trace: &Trace, runs: &[(ScalingArgs, Report)]) {
    let s = &args.scaling;
    println!(
        "trace {}: {} calls over {:.2} h",
        args.trace.display(),
        trace.calls().len(),
        trace.span().as_secs_f64() / 3600.0
    );
    println!("{}", args.setup(s.clone()));
    for (scaling, _) in runs {
        println!("{}: {}", scaling.policy_name(), policy_tuning(scaling));
    }
    println!();
    let row = |label: &str, value: &dyn Fn(&Report) -> String| {
        let values: String = runs
            .iter()
            .map(|(_, report)| format!("{:>16}", value(report)))
            .collect();
        println!("{label:<28}{values}");
    };
    let names: String = runs
        .iter()
        .map(|(scaling, _)| format!("{:>16}", scaling.policy_name()))
        .collect();
    println!("{:<28}{names}", "");
    row("sessions", &|r| r.sessions.to_string());
    row("allocation wait p50 (ms)", &|r| {
        r.wait_p50.as_millis().to_string()
    });
    row("allocation wait p99 (ms)", &|r| {
        r.wait_p99.as_millis().to_string()
    });
    row("allocation wait max (ms)", &|r| {
        r.wait_max.as_millis().to_string()
    });
    row(&format!("waits over {} ms", args.slo_ms), &|r| {
        r.slo_violations.to_string()
    });
    row("drain handoffs", &|r| r.handoffs.to_string());
    row("handoff pause max (ms)", &|r| {
        r.handoff_pause_max.as_millis().to_string()
    });
    row("worker-seconds", &|r| format!("{:.0}", r.worker_seconds));
    row("mean workers", &|r| format!("{:.2}", r.mean_workers));
    row("peak workers", &|r| r.peak_workers.to_string());
}

fn json_output(
    args: &SimulateArgs,
    trace: &Trace,
    runs: &[(ScalingArgs, Report)],
) -> serde_json::Value {
    let s = &args.scaling;
    json!({
        "trace": args.trace.display().to_string(),
        "calls": trace.calls().len(),
        "span_s": trace.span().as_secs_f64(),
        "capacity": args.capacity,
        "slo_ms": args.slo_ms,
        "scaling": {
            "check_interval_ms": s.scaling_check_interval_ms,
            "min_workers": s.scaling_min_workers,
            "max_workers": s.scaling_max_workers,
            "down_after_secs": s.scaling_down_after_secs,
            "drain_timeout_secs": s.drain_timeout_secs,
            "worker_startup_ms": s.worker_startup_ms,
            "scaling_target": s.scaling_target,
            "predictive_margin_sigmas": s.predictive_margin_sigmas,
            "predictive_min_spare": s.predictive_min_spare,
        },
        "runs": runs.iter().map(|(scaling, r)| json!({
            "policy": scaling.policy_name(),
            "sessions": r.sessions,
            "wait_p50_ms": r.wait_p50.as_millis(),
            "wait_p99_ms": r.wait_p99.as_millis(),
            "wait_max_ms": r.wait_max.as_millis(),
            "slo_violations": r.slo_violations,
            "handoffs": r.handoffs,
            "handoff_pause_max_ms": r.handoff_pause_max.as_millis(),
            "worker_seconds": r.worker_seconds,
            "mean_workers": r.mean_workers,
            "peak_workers": r.peak_workers,
            "simulated_s": r.simulated.as_secs_f64(),
        })).collect::<Vec<_>>(),
    })
}
