//! `asr-bench ingest --sessions 200 --seconds 60`: one ingest node under many live
//! sessions, with no recognition running.
//!
//! The system runs without recognizers, so every session waits for a worker and ingest
//! only does its own work: accept frames, append them, acknowledge them once the broker
//! confirmed them, follow each session's results. Each session streams `--seconds` of
//! 16 kHz audio at real-time pace in 100 ms frames (starts spread over the first
//! second), then closes. Measured: the ingest process's CPU time over the streaming
//! window (from /proc, user + system) per session, its resident memory at the end, and
//! the acknowledgement latency of every frame (client send → `ack` back).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use testkit::system::{System, SystemConfig};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

use crate::percentile;

const FRAME_MS: u64 = 100;
const RATE: usize = 16_000;

pub async fn run(bin: &Path, sessions: usize, seconds: u64) -> anyhow::Result<()> {
    let system = System::start(
        bin,
        SystemConfig {
            recognizers: 0,
            env: vec![("RUST_LOG".into(), "warn".into())],
            ..SystemConfig::default()
        },
    )
    .await;
    let pid = system.pid_of("ingest").context("ingest runs")?;
    eprintln!("{sessions} sessions × {seconds} s of audio at real-time pace…");
    let (cpu_before, started) = (cpu_seconds(pid)?, Instant::now());
    let runs = (0..sessions).map(|i| {
        let (url, key) = (system.ws_url(), system.api_key.clone());
        let offset = Duration::from_millis((i as u64 * 1000) / sessions as u64);
        tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            stream(&url, &key, seconds).await
        })
    });
    let mut latencies = Vec::new();
    for run in futures::future::join_all(runs).await {
        latencies.extend(run??);
    }
    let (cpu, wall) = (
        cpu_seconds(pid)? - cpu_before,
        started.elapsed().as_secs_f64(),
    );
    let rss_kb = resident_kb(pid)?;
    system.stop().await;

    let frames = sessions as u64 * seconds * 1000 / FRAME_MS;
    anyhow::ensure!(
        latencies.len() as u64 == frames,
        "{} of {frames} frames acknowledged",
        latencies.len()
    );
    println!(
        "| sessions | frames acked | ingest CPU (cores) | CPU per session (% of a core) | ack p50 (ms) | ack p99 (ms) | ack max (ms) | ingest RSS (MB) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {sessions} | {} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} | {:.0} |",
        latencies.len(),
        cpu / wall,
        100.0 * cpu / wall / sessions as f64,
        percentile(&mut latencies, 50.0),
        percentile(&mut latencies, 99.0),
        percentile(&mut latencies, 100.0),
        rss_kb as f64 / 1024.0,
    );
    Ok(())
}

/// One session: open, stream paced frames, collect ack latencies (ms), close.
async fn stream(url: &str, key: &str, seconds: u64) -> anyhow::Result<Vec<f64>> {
    let (mut ws, _) = connect_async(url).await?;
    let open = json!({"type": "open", "model": "whisper-tiny.en", "sample_rate": RATE,
        "encoding": "pcm_s16le", "api_key": key});
    ws.send(Message::text(open.to_string())).await?;
    let frames = (seconds * 1000 / FRAME_MS) as usize;
    let samples = RATE * FRAME_MS as usize / 1000;
    let mut sent_at = Vec::with_capacity(frames);
    let mut latencies = Vec::with_capacity(frames);
    let start = tokio::time::Instant::now();
    let mut opened = false;
    while latencies.len() < frames {
        let due = start + Duration::from_millis(FRAME_MS * sent_at.len() as u64);
        let can_send = opened && sent_at.len() < frames;
        tokio::select! {
            () = tokio::time::sleep_until(due), if can_send => {
                let seq = sent_at.len() as u64;
                let mut frame = seq.to_le_bytes().to_vec();
                // Low noise rather than silence: nothing rests on the content.
                frame.extend((0..samples).flat_map(|i| (((i * 31 + seq as usize) % 64) as i16 - 32).to_le_bytes()));
                sent_at.push(Instant::now());
                ws.send(Message::binary(frame)).await?;
            }
            message = ws.next() => {
                let text = match message.context("the connection ended")?? {
                    Message::Text(text) => text,
                    _ => continue,
                };
                let message: Value = serde_json::from_str(&text)?;
                match message["type"].as_str() {
                    Some("opened") => opened = true,
                    Some("ack") => {
                        let seq = message["seq"].as_u64().context("ack seq")? as usize;
                        latencies.push(sent_at[seq].elapsed().as_secs_f64() * 1000.0);
                    }
                    Some("error") => anyhow::bail!("session refused: {message}"),
                    _ => {}
                }
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(latencies)
}

/// User + system CPU time of a process so far, from /proc/{pid}/stat (clock ticks of
/// 10 ms on Linux).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// Resident memory of a process, from /proc/{pid}/status.
pub fn resident_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}
