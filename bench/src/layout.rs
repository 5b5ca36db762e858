//! `asr-bench layout`: the two stream layouts of ARCHITECTURE.md side by side, through
//! the project's own log code (`eventlog::log`): a stream per session (its own producer
//! and consumer) against a fixed set of partitions (one long-lived producer per
//! partition, one session-filtered reader per session). Sessions publish 640-byte
//! chunks (20 ms of 16 kHz audio) every 20 ms; each reader measures publish → consume.

use std::time::{Duration, Instant};

use bytes::Bytes;
use eventlog::events::AudioChunk;
use eventlog::log::{Appender, LogConfig, ReadFrom, StreamLog};
use eventlog::{Envelope, Event, SessionId};
use futures::StreamExt;

use crate::percentile;

const CHUNK: usize = 640;
const PERIOD: Duration = Duration::from_millis(20);

struct LayoutResult {
    start_p50: f64,
    start_p99: f64,
    latency: Vec<f64>,
    received: u64,
    skipped: u64,
    broker_fds: Option<(usize, usize)>,
    broker_rss_mb: Option<(f64, f64)>,
}

pub async fn run(sessions: usize, seconds: u64, partitions: u16) -> anyhow::Result<()> {
    let log = StreamLog::connect(&LogConfig::default()).await?;
    println!(
        "| layout | sessions | session start p50 / p99 (ms) | publish→consume p50 / p99 (ms) | messages read per message wanted | broker open files before → during | broker RSS MB before → during |"
    );
    println!("|---|---|---|---|---|---|---|");
    for per_session in [true, false] {
        let r = measure(&log, sessions, seconds, partitions, per_session).await?;
        let mut latency = r.latency;
        let name = if per_session {
            "stream per session".to_string()
        } else {
            format!("{partitions} partitions")
        };
        println!(
            "| {name} | {sessions} | {:.0} / {:.0} | {:.1} / {:.1} | {:.2} | {} | {} |",
            r.start_p50,
            r.start_p99,
            percentile(&mut latency, 50.0),
            percentile(&mut latency, 99.0),
            (r.received + r.skipped) as f64 / r.received.max(1) as f64,
            r.broker_fds
                .map(|(a, b)| format!("{a} → {b}"))
                .unwrap_or_else(|| "n/a".into()),
            r.broker_rss_mb
                .map(|(a, b)| format!("{a:.0} → {b:.0}"))
                .unwrap_or_else(|| "n/a".into()),
        );
    }
    Ok(())
}

async fn measure(
    log: &StreamLog,
    sessions: usize,
    seconds: u64,
    partitions: u16,
    per_session: bool,
) -> anyhow::Result<LayoutResult> {
    let prefix = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let ids: Vec<SessionId> = (0..sessions).map(|_| uuid::Uuid::new_v4()).collect();
    let stream_of = |i: usize| {
        if per_session {
            format!("{prefix}.session.{}", ids[i])
        } else {
            format!("{prefix}.audio.{}", i % usize::from(partitions))
        }
    };
    let broker_before = broker_usage();

    // Partitions exist before sessions start; a per-session stream is created at start.
    let mut shared: Vec<Appender> = Vec::new();
    if !per_session {
        let streams: Vec<String> = (0..partitions)
            .map(|p| format!("{prefix}.audio.{p}"))
            .collect();
        log.ensure_streams(&streams).await?;
        for (p, stream) in streams.iter().enumerate() {
            shared.push(
                log.appender(stream, &format!("{prefix}.p{p}"), true, 1024)
                    .await?,
            );
        }
    }

    // Start sessions, 20 at a time, timing each start until its reader is subscribed.
    let ids = &ids;
    let shared = &shared;
    let starts = futures::stream::iter(0..sessions)
        .map(|i| {
            let stream = stream_of(i);
            let shared = (!per_session).then(|| shared[i % usize::from(partitions)].clone());
            async move {
                let started = Instant::now();
                let appender = match shared {
                    Some(appender) => appender,
                    None => {
                        log.ensure_streams(std::slice::from_ref(&stream)).await?;
                        log.appender(&stream, &format!("s{i}"), false, 1024).await?
                    }
                };
                let session = (!per_session).then_some(ids[i]);
                let reader = log.reader(&stream, ReadFrom::Next, session).await?;
                anyhow::Ok((started.elapsed().as_secs_f64() * 1000.0, appender, reader))
            }
        })
        .buffer_unordered(20)
        .collect::<Vec<_>>()
        .await;
    let mut start_ms = Vec::new();
    let mut pairs = Vec::new();
    for (i, start) in starts.into_iter().enumerate() {
        let (ms, appender, reader) = start?;
        start_ms.push(ms);
        pairs.push((i, appender, reader));
    }

    let epoch = Instant::now();
    let deadline = epoch + Duration::from_secs(seconds);
    let tasks: Vec<_> = pairs
        .into_iter()
        .map(|(i, appender, mut reader)| {
            let session = ids[i];
            tokio::spawn(async move {
                let publish = async {
                    let mut tick = tokio::time::interval(PERIOD);
                    let mut seq = 0u64;
                    while Instant::now() < deadline {
                        tick.tick().await;
                        let mut bytes = vec![0u8; CHUNK];
                        let sent = epoch.elapsed().as_nanos() as u64;
                        bytes[..8].copy_from_slice(&sent.to_le_bytes());
                        let envelope = Envelope {
                            session: Some(session),
                            at_ms: eventlog::now_ms(),
                            producer: "bench".into(),
                            event: Event::AudioChunk(AudioChunk {
                                seq,
                                bytes: Bytes::from(bytes),
                            }),
                        };
                        let _ = appender.append(&envelope).await?;
                        seq += 1;
                    }
                    anyhow::Ok(seq)
                };
                let consume = async {
                    let mut latency = Vec::new();
                    let end = deadline + Duration::from_secs(2);
                    while let Ok(Some(record)) =
                        tokio::time::timeout_at(end.into(), reader.next()).await
                    {
                        if let Event::AudioChunk(chunk) = record?.envelope.event {
                            let sent = u64::from_le_bytes(chunk.bytes[..8].try_into()?);
                            let now = epoch.elapsed().as_nanos() as u64;
                            latency.push(now.saturating_sub(sent) as f64 / 1e6);
                        }
                    }
                    anyhow::Ok(latency)
                };
                let (published, latency) = tokio::join!(publish, consume);
                published?;
                let latency = latency?;
                let skipped = reader.skipped();
                reader.close().await;
                anyhow::Ok((latency, skipped, appender))
            })
        })
        .collect();
    // Sample the broker while every session is live.
    tokio::time::sleep(Duration::from_secs(seconds / 2)).await;
    let broker_during = broker_usage();

    let mut latency = Vec::new();
    let mut skipped = 0;
    let mut appenders = Vec::new();
    for task in tasks {
        let (l, s, appender) = task.await??;
        latency.extend(l);
        skipped += s;
        appenders.push(appender);
    }
    let received = latency.len() as u64;
    for appender in appenders {
        appender.close().await;
    }
    let streams: Vec<String> = if per_session {
        (0..sessions).map(stream_of).collect()
    } else {
        (0..partitions)
            .map(|p| format!("{prefix}.audio.{p}"))
            .collect()
    };
    log.delete_streams(&streams).await;

    Ok(LayoutResult {
        start_p50: percentile(&mut start_ms.clone(), 50.0),
        start_p99: percentile(&mut start_ms, 99.0),
        latency,
        received,
        skipped,
        broker_fds: broker_before.zip(broker_during).map(|(a, b)| (a.0, b.0)),
        broker_rss_mb: broker_before.zip(broker_during).map(|(a, b)| (a.1, b.1)),
    })
}

/// The broker's open files and resident memory (MB), read from /proc (the broker runs
/// on this machine: `beam.smp`).
fn broker_usage() -> Option<(usize, f64)> {
    let pid = std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then(|| entry.path())
    })?;
    let fds = std::fs::read_dir(pid.join("fd")).ok()?.count();
    let status = std::fs::read_to_string(pid.join("status")).ok()?;
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((fds, rss_kb / 1024.0))
}
