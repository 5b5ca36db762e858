//! `asr-bench`: benchmarks of the real system, as commands (never run by the test
//! suite). Each starts its own system (separate processes of the release `asr` binary
//! next to this one) in a fresh namespace and prints a Markdown table for
//! docs/BENCHMARKS.md.
//!
//! `asr-bench pipeline --sessions 1,4,8`: for N concurrent sessions streaming real
//! speech at real-time pace, the time from the frame carrying a segment's last audio
//! being sent to its final arriving, beside the same model decoding the same segments
//! in-process (no VAD wait, no broker, no network), as a ratio; the model's real-time
//! factor; and the chunk acknowledgement latency (client send → broker-confirmed ack).
//!
//! `asr-bench layout --sessions 200`: the stream layouts of ARCHITECTURE.md compared
//! (see `layout`).
//!
//! `asr-bench heartbeats --sessions 4 --seconds 300`: heartbeat inter-arrival gaps at
//! the orchestrator on a loaded machine, against the interval and the timeout (see
//! `heartbeats`).
//!
//! `asr-bench failover --kills 50`: the failover gap when the serving recognizer is
//! SIGKILLed inside speech (see `failover`).
//!
//! `asr-bench decode --tail-paddings 50,100,300,1000`: Whisper's decode time and
//! accuracy per tail padding, in-process (see `decode`).
//!
//! `asr-bench ingest --sessions 200 --seconds 60`: one ingest node's CPU, memory and
//! acknowledgement latency under many live sessions, no recognition (see
//! `ingest_load`).
//!
//! `asr-bench idle --sessions 10000`: memory per open idle session on an ingest node,
//! and how fast sessions open (see `idle`).
//!
//! `asr-bench leader --kills 20`: how long the system is without an orchestrator
//! leader when the leader is SIGKILLed (see `leader`).
//!
//! `asr-bench resume --resumes 50`: from a client's reconnect to the session resumed
//! and to the first result it missed (see `resume`).
//!
//! `asr-bench catchup --sessions 100 --minutes 10` and `asr-bench audit --sessions
//! 100000`: the projector catching up on a backlog, and the audit API's queries (see
//! `projector`).
//!
//! `asr-bench startup --runs 10`: a recognizer's start-up time, the horizon of the
//! predictive scaling policy (see `startup`).
//!
//! `asr-bench scaling --seeds 5`: the scaling policies on the same generated
//! call-centre days, in the simulator: allocation wait, SLO violations, worker-seconds
//! (see `scaling`).

mod decode;
mod failover;
mod heartbeats;
mod idle;
mod ingest_load;
mod layout;
mod leader;
mod projector;
mod resume;
mod scaling;
mod startup;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use client::{Outcome, StreamOptions};
use recognizer::engine::Recognizer;
use recognizer::engine::sherpa::{WhisperModel, WhisperSettings};
use testkit::system::{System, SystemConfig};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Final-result latency through the pipeline vs in-process decoding.
    Pipeline {
        /// Concurrency levels to measure, one system run each.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
        sessions: Vec<usize>,
        /// Recognizer processes; their capacity is sized so every session has a slot.
        #[arg(long, default_value_t = 2)]
        recognizers: usize,
        /// Decoder threads per recognizer (and for the in-process baseline).
        #[arg(long, default_value_t = 1)]
        threads: u16,
        /// Times each session streams the conversation.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// Heartbeat inter-arrival gaps at the orchestrator while recognizers decode.
    Heartbeats {
        /// Concurrent sessions, each streaming the conversation again and again.
        #[arg(long, default_value_t = 4)]
        sessions: usize,
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Recognizer processes; their capacity is sized so every session has a slot.
        #[arg(long, default_value_t = 2)]
        recognizers: usize,
        #[command(flatten)]
        settings: HeartbeatSettings,
        /// Copy every process's log here before the system stops.
        #[arg(long)]
        logs: Option<PathBuf>,
    },
    /// The failover gap: SIGKILLs of the serving recognizer inside speech.
    Failover(failover::Args),
    /// Time without an orchestrator leader when the leader is SIGKILLed.
    Leader {
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// The leader lock's lease (ASR_ORCHESTRATOR_LEASE_MS).
        #[arg(long, default_value_t = 500)]
        lease_ms: u64,
    },
    /// The projector catching up on a backlog of synthetic sessions.
    Catchup {
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        /// Minutes of audio per session.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Audit API queries over a large read model.
    Audit {
        #[arg(long, default_value_t = 100_000)]
        sessions: u64,
        /// Requests per query kind.
        #[arg(long, default_value_t = 200)]
        requests: usize,
    },
    /// From a client's reconnect to its session resumed and its first missed result.
    Resume {
        #[arg(long, default_value_t = 50)]
        resumes: usize,
    },
    /// Memory per open, idle session on one ingest node, and the opening rate.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Sessions opened at once.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
    },
    /// One ingest node under many live sessions, with no recognition running.
    Ingest {
        #[arg(long, default_value_t = 200)]
        sessions: usize,
        /// Audio each session streams at real-time pace.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Whisper's decode time and word error rate per tail padding, in-process.
    Decode {
        /// Tail paddings to compare, in feature frames (10 ms).
        #[arg(long, value_delimiter = ',', default_value = "50,100,200,300,500,1000")]
        tail_paddings: Vec<u16>,
        #[arg(long, default_value_t = 2)]
        threads: u16,
    },
    /// Stream per session vs partitioned streams, through the project's log code.
    Layout {
        #[arg(long, default_value_t = 200)]
        sessions: usize,
        /// Seconds every session publishes.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 16)]
        partitions: u16,
    },
    /// The scaling policies on generated call-centre days, in the simulator.
    Scaling(scaling::Args),
    /// A recognizer's start-up: process started to registered with the leader.
    Startup {
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
}

/// The heartbeat settings every process of a benchmark's system gets.
#[derive(clap::Args, Clone, Copy, Debug)]
struct HeartbeatSettings {
    /// The recognizers' heartbeat period (ASR_HEARTBEAT_INTERVAL_MS).
    #[arg(long, default_value_t = 200)]
    heartbeat_interval_ms: u64,
    /// The orchestrator's heartbeat timeout (ASR_ORCHESTRATOR_HEARTBEAT_TIMEOUT_MS).
    #[arg(long, default_value_t = 1000)]
    heartbeat_timeout_ms: u64,
}

impl HeartbeatSettings {
    fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "ASR_HEARTBEAT_INTERVAL_MS".into(),
                self.heartbeat_interval_ms.to_string(),
            ),
            (
                "ASR_ORCHESTRATOR_HEARTBEAT_TIMEOUT_MS".into(),
                self.heartbeat_timeout_ms.to_string(),
            ),
        ]
    }
}

impl std::fmt::Display for HeartbeatSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "heartbeat interval {} ms, timeout {} ms",
            self.heartbeat_interval_ms, self.heartbeat_timeout_ms
        )
    }
}

const SENTENCES: &[&str] = &[
    "there is a fire in the kitchen and the smoke is getting thicker",
    "please send an ambulance to the main street",
    "my father fell down the stairs and he cannot move his leg",
    "the children are safe at home now",
];

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank]
}

fn model_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.runtime/models/whisper-tiny.en"
    ))
}

fn asr_binary() -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .context("binary folder")?
        .join("asr");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --release --bin asr`",
        bin.display()
    );
    Ok(bin)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Pipeline {
            sessions,
            recognizers,
            threads,
            rounds,
        } => pipeline(&sessions, recognizers, threads, rounds).await,
        Command::Heartbeats {
            sessions,
            seconds,
            recognizers,
            settings,
            logs,
        } => {
            let bin = asr_binary()?;
            heartbeats::run(
                &bin,
                sessions,
                seconds,
                recognizers,
                settings,
                logs.as_deref(),
            )
            .await
        }
        Command::Failover(args) => failover::run(&asr_binary()?, args).await,
        Command::Leader { kills, lease_ms } => leader::run(&asr_binary()?, kills, lease_ms).await,
        Command::Resume { resumes } => resume::run(&asr_binary()?, resumes).await,
        Command::Startup { runs } => startup::run(&asr_binary()?, runs).await,
        Command::Catchup { sessions, minutes } => {
            projector::catchup(&asr_binary()?, sessions, minutes).await
        }
        Command::Audit { sessions, requests } => {
            projector::audit(&asr_binary()?, sessions, requests).await
        }
        Command::Idle {
            sessions,
            concurrency,
        } => idle::run(&asr_binary()?, sessions, concurrency).await,
        Command::Ingest { sessions, seconds } => {
            ingest_load::run(&asr_binary()?, sessions, seconds).await
        }
        Command::Decode {
            tail_paddings,
            threads,
        } => decode::run(&tail_paddings, threads),
        Command::Layout {
            sessions,
            seconds,
            partitions,
        } => layout::run(sessions, seconds, partitions).await,
        Command::Scaling(args) => scaling::run(args),
    }
}

async fn pipeline(
    levels: &[usize],
    recognizers: usize,
    threads: u16,
    rounds: usize,
) -> anyhow::Result<()> {
    let bin = asr_binary()?;
    eprintln!("synthesising speech…");
    let recording = testkit::speech::sentences(SENTENCES, 1200);
    println!(
        "| sessions | finals | pipeline final latency p50 / p99 (s) | in-process decode p50 / p99 (s) | ratio p50 / p99 | model RTF p50 | chunk ack p50 / p99 (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &level in levels {
        let capacity = level.div_ceil(recognizers).max(1);
        let system = System::start(
            &bin,
            SystemConfig {
                recognizers,
                env: vec![
                    ("ASR_RECOGNIZER_CAPACITY".into(), capacity.to_string()),
                    ("ASR_RECOGNIZER_THREADS".into(), threads.to_string()),
                    ("RUST_LOG".into(), "warn".into()),
                ],
                ..SystemConfig::default()
            },
        )
        .await;
        eprintln!(
            "{level} sessions × {rounds} rounds of {:.1} s…",
            recording.duration_secs()
        );
        let mut outcomes: Vec<Outcome> = Vec::new();
        for _ in 0..rounds {
            let runs = (0..level).map(|i| {
                let options = real_time(&system);
                let recording = &recording;
                async move {
                    stagger(i).await;
                    client::stream(&options, recording, |_| {}).await
                }
            });
            for result in futures::future::join_all(runs).await {
                outcomes.push(result.with_context(|| system.all_logs())?);
            }
        }
        system.stop().await;

        let mut latency = Vec::new();
        let mut acks = Vec::new();
        let mut segments = Vec::new();
        for outcome in &outcomes {
            for fin in &outcome.finals {
                let last = outcome.sent_at[outcome.frame_at(fin.segment.end_ms)];
                latency.push(fin.at.saturating_duration_since(last).as_secs_f64());
                segments.push((fin.segment.start_ms, fin.segment.end_ms));
            }
            for (sent, acked) in outcome.sent_at.iter().zip(&outcome.acked_at) {
                if let Some(acked) = acked {
                    acks.push(acked.saturating_duration_since(*sent).as_secs_f64() * 1000.0);
                }
            }
        }
        // The same segments, decoded in this process by the same model.
        let settings = WhisperSettings {
            threads,
            ..WhisperSettings::DEFAULT
        };
        let mut model = WhisperModel::load(&model_dir(), settings)?;
        let samples = testkit::speech::to_f32(&i16_samples(&recording.pcm));
        let mut decode = Vec::new();
        let mut rtf = Vec::new();
        for (start_ms, end_ms) in &segments {
            let range = (*start_ms as usize * 16)..(*end_ms as usize * 16).min(samples.len());
            let started = Instant::now();
            model.transcribe(&samples[range])?;
            let seconds = started.elapsed().as_secs_f64();
            decode.push(seconds);
            rtf.push(seconds / ((end_ms - start_ms) as f64 / 1000.0));
        }
        let (l50, l99) = (
            percentile(&mut latency, 50.0),
            percentile(&mut latency, 99.0),
        );
        let (d50, d99) = (percentile(&mut decode, 50.0), percentile(&mut decode, 99.0));
        println!(
            "| {level} | {} | {l50:.3} / {l99:.3} | {d50:.3} / {d99:.3} | {:.2} / {:.2} | {:.3} | {:.2} / {:.2} |",
            latency.len(),
            l50 / d50,
            l99 / d99,
            percentile(&mut rtf, 50.0),
            percentile(&mut acks, 50.0),
            percentile(&mut acks, 99.0),
        );
    }
    Ok(())
}

/// Streaming at real-time pace to the system's ingest.
fn real_time(system: &System) -> StreamOptions {
    StreamOptions {
        speed: 1.0,
        ..system.stream_options()
    }
}

/// Staggers the start of concurrent session `i`, so sessions do not decode in
/// lockstep.
async fn stagger(i: usize) {
    tokio::time::sleep(Duration::from_millis(370 * i as u64)).await;
}

/// Copies every process's log (the system removes them when it stops).
fn copy_logs(system: &System, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for p in &system.processes {
        if let Some(name) = p.log.file_name() {
            std::fs::copy(&p.log, dir.join(name))?;
        }
    }
    eprintln!("logs copied to {}", dir.display());
    Ok(())
}

fn i16_samples(pcm: &[u8]) -> Vec<i16> {
    pcm.chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}
