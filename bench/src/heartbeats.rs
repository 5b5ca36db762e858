//! `asr-bench heartbeats`: how regularly workers' heartbeats reach the orchestrator on
//! a loaded machine, against the heartbeat interval and the orchestrator's timeout.
//!
//! The real system (release binary, two recognizers) decodes `--sessions` concurrent
//! sessions of real speech at real-time pace for `--seconds`, so both cores are busy
//! decoding. Afterwards the heartbeat stream (`{ns}.heartbeats`: one `Heartbeat` per
//! heartbeat the orchestrator accepted, stamped with its arrival time at the
//! orchestrator, which is what its timeout compares against) gives each worker's
//! inter-arrival gaps; the control stream says whether any worker was declared lost
//! (a false alarm: nobody was killed).

use std::path::Path;
use std::time::{Duration, Instant};

use eventlog::log::ReadFrom;
use eventlog::{Event, now_ms};
use testkit::failover;
use testkit::system::{System, SystemConfig};

use crate::{HeartbeatSettings, SENTENCES, copy_logs, percentile, real_time, stagger};

pub async fn run(
    bin: &Path,
    sessions: usize,
    seconds: u64,
    recognizers: usize,
    settings: HeartbeatSettings,
    logs: Option<&Path>,
) -> anyhow::Result<()> {
    eprintln!("synthesising speech…");
    let recording = testkit::speech::sentences(SENTENCES, 1200);
    let capacity = sessions.div_ceil(recognizers).max(1);
    let mut env = settings.env();
    env.push(("ASR_RECOGNIZER_CAPACITY".into(), capacity.to_string()));
    env.push(("RUST_LOG".into(), "warn".into()));
    let system = System::start(
        bin,
        SystemConfig {
            recognizers,
            env,
            ..SystemConfig::default()
        },
    )
    .await;
    eprintln!(
        "{sessions} sessions on {recognizers} recognizers (capacity {capacity}) for {seconds} s, {settings}…"
    );

    let started_ms = now_ms();
    let cpu_before = Cpu::sample(&system);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let runs = (0..sessions).map(|i| {
        let options = real_time(&system);
        let recording = &recording;
        async move {
            stagger(i).await;
            let (mut done, mut failed) = (0, 0);
            while Instant::now() < deadline {
                match client::stream(&options, recording, |_| {}).await {
                    Ok(_) => done += 1,
                    Err(e) => {
                        failed += 1;
                        eprintln!("session {i}: {e}");
                    }
                }
                if i == 0 {
                    eprintln!(
                        "  {:.0} s of {seconds} s",
                        (now_ms() - started_ms) as f64 / 1000.0
                    );
                }
            }
            (done, failed)
        }
    });
    let counts = futures::future::join_all(runs).await;
    let ended_ms = now_ms();
    let cpu_after = Cpu::sample(&system);
    let (done, failed) = counts
        .iter()
        .fold((0, 0), |(d, f), (dd, ff)| (d + dd, f + ff));

    let heartbeats = failover::read_stream(
        &system.layout.heartbeat_stream(),
        None,
        ReadFrom::Start,
        Duration::ZERO,
        |events| events.last().is_some_and(|e| e.at_ms > ended_ms),
    )
    .await;
    let control = failover::read_stream(
        &system.layout.control_stream(),
        None,
        ReadFrom::Start,
        Duration::from_secs(1),
        |_| true,
    )
    .await;
    if let Some(dir) = logs {
        copy_logs(&system, dir)?;
    }
    system.stop().await;

    // Arrival times per worker, within the loaded window.
    let mut arrivals: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for e in &heartbeats {
        if let Event::Heartbeat { worker, .. } = &e.event
            && (started_ms..=ended_ms).contains(&e.at_ms)
        {
            arrivals.entry(worker.clone()).or_default().push(e.at_ms);
        }
    }
    let lost: Vec<String> = control
        .iter()
        .filter(|e| (started_ms..=ended_ms).contains(&e.at_ms))
        .filter_map(|e| match &e.event {
            Event::WorkerLost { worker, reason, .. } => Some(format!("{worker} ({reason})")),
            _ => None,
        })
        .collect();

    let wall = (ended_ms - started_ms) as f64 / 1000.0;
    println!(
        "{sessions} sessions × {wall:.0} s on {recognizers} recognizers (capacity {capacity}), {settings}; {done} sessions completed, {failed} failed"
    );
    println!(
        "CPU over the run: recognizers {:.2} cores, whole machine {:.0} % busy of {} cores",
        cpu_after.recognizers.saturating_sub(cpu_before.recognizers) as f64 / 100.0 / wall,
        cpu_after.machine_busy_percent(&cpu_before),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!();
    println!("| worker | heartbeats | gap p50 (ms) | p99 | p99.9 | max | max / timeout |");
    println!("|---|---|---|---|---|---|---|");
    let mut all = Vec::new();
    for (worker, times) in &arrivals {
        let mut gaps: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
        all.extend_from_slice(&gaps);
        print_row(
            worker,
            times.len(),
            &mut gaps,
            settings.heartbeat_timeout_ms,
        );
    }
    let count = arrivals.values().map(Vec::len).sum();
    print_row("all", count, &mut all, settings.heartbeat_timeout_ms);
    println!();
    // The timeout firing on a live worker is a false alarm; other losses (a stream that
    // ended) are listed with their reason.
    let (timeouts, others): (Vec<&String>, Vec<&String>) =
        lost.iter().partition(|l| l.contains("no heartbeat"));
    println!(
        "heartbeat timeouts during the run (false alarms: nobody was killed): {}{}",
        timeouts.len(),
        list(&timeouts)
    );
    println!(
        "other losses during the run: {}{}",
        others.len(),
        list(&others)
    );
    Ok(())
}

fn list(items: &[&String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        let items: Vec<&str> = items.iter().map(|s| s.as_str()).collect();
        format!(": {}", items.join(", "))
    }
}

fn print_row(name: &str, count: usize, gaps: &mut [f64], timeout_ms: u64) {
    let max = gaps.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "| {name} | {count} | {:.0} | {:.0} | {:.0} | {max:.0} | {:.2} |",
        percentile(gaps, 50.0),
        percentile(gaps, 99.0),
        percentile(gaps, 99.9),
        max / timeout_ms as f64,
    );
}

/// CPU time so far: the recognizer processes' (clock ticks, 100 per second), and the
/// machine's busy and total ticks.
pub(crate) struct Cpu {
    recognizers: u64,
    machine_busy: u64,
    machine_total: u64,
}

impl Cpu {
    pub(crate) fn sample(system: &System) -> Self {
        let recognizers = system
            .processes
            .iter()
            .filter(|p| p.role.starts_with("recognizer"))
            .filter_map(|p| p.child.id())
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map(|stat| {
                // Fields after the parenthesised command: utime and stime are the
                // 12th and 13th.
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let fields: Vec<u64> = rest
                    .split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|f| f.parse().ok())
                    .collect();
                fields.iter().sum::<u64>()
            })
            .sum();
        let line = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = line
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let total: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        Self {
            recognizers,
            machine_busy: total - idle,
            machine_total: total,
        }
    }

    pub(crate) fn machine_busy_percent(&self, before: &Cpu) -> f64 {
        let busy = self.machine_busy.saturating_sub(before.machine_busy) as f64;
        let total = self.machine_total.saturating_sub(before.machine_total) as f64;
        100.0 * busy / total.max(1.0)
    }
}
