//! The projector's benchmarks.
//!
//! `asr-bench catchup --sessions 100 --minutes 10`: a backlog of synthetic sessions
//! (`testkit::synthetic`: events written straight to the streams, 100 ms audio chunks
//! at 16 kHz, no recognition) is written first; then `asr projector` starts on it and
//! is timed until every event is committed: events per second, and audio archived per
//! second.
//!
//! `asr-bench audit --sessions 100000`: the read models filled with that many sessions
//! (two transcript segments each, words drawn from a small vocabulary), then timed
//! requests to the audit API of a running `asr projector`: the session list unfiltered,
//! by status, by time range, and by a word of the transcript; p50 and p99.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use eventlog::log::{LogConfig, StreamLog};
use eventlog::streams::StreamLayout;
use sqlx::PgPool;
use testkit::synthetic::{SessionSpec, Writer};
use testkit::system::DATABASE_URL;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::percentile;

const PARTITIONS: u16 = 16;

/// `asr projector` into `schema` on `namespace`, serving on `port`.
fn projector(
    bin: &Path,
    namespace: &str,
    schema: &str,
    port: u16,
    keys: Option<&str>,
) -> anyhow::Result<Child> {
    let mut command = Command::new(bin);
    if let Some(keys) = keys {
        command.env("ASR_API_KEYS", keys);
    }
    Ok(command
        .arg("projector")
        .env("ASR_NAMESPACE", namespace)
        .env("ASR_PARTITIONS", PARTITIONS.to_string())
        .env("ASR_DATABASE_SCHEMA", schema)
        .env("ASR_PROJECTOR_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

async fn pool(schema: &str) -> anyhow::Result<PgPool> {
    Ok(projector::store::Store::connect(DATABASE_URL, schema)
        .await?
        .pool()
        .clone())
}

pub async fn catchup(bin: &Path, sessions: usize, minutes: u64) -> anyhow::Result<()> {
    let id = Uuid::new_v4().simple().to_string();
    let (namespace, schema) = (format!("bench-{id}"), format!("bench_{id}"));
    let layout = StreamLayout::new(namespace.clone(), PARTITIONS);
    let log = StreamLog::connect(&LogConfig::default()).await?;
    log.ensure_streams(&layout.all_streams()).await?;
    let spec = SessionSpec {
        chunks: minutes * 600,
        chunk_bytes: 3_200,
        ..SessionSpec::default()
    };
    let total = spec.events() * sessions as u64;
    eprintln!("writing {sessions} sessions × {minutes} min of audio ({total} events)…");
    let written = Instant::now();
    let mut writer = Writer::new(log.clone(), layout.clone());
    for i in 0..sessions {
        writer.session(Uuid::new_v4(), &spec).await;
        if i % 10 == 9 {
            writer.flush().await;
            eprintln!("  {} sessions written", i + 1);
        }
    }
    writer.close().await;
    eprintln!(
        "written in {:.1} s; projecting…",
        written.elapsed().as_secs_f64()
    );

    let pool = pool(&schema).await?;
    let started = Instant::now();
    let mut child = projector(bin, &namespace, &schema, testkit::free_port(), None)?;
    let mut last_report = Instant::now();
    loop {
        let done: Option<i64> =
            sqlx::query_scalar("SELECT sum(next_offset)::bigint FROM projector_offsets")
                .fetch_one(&pool)
                .await?;
        let done = done.unwrap_or(0) as u64;
        if done >= total {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("  {done} of {total} events committed");
            last_report = Instant::now();
        }
        anyhow::ensure!(child.try_wait()?.is_none(), "the projector exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed().as_secs_f64();
    child.kill().await.ok();
    let audio_mb = (sessions as u64 * spec.chunks * spec.chunk_bytes as u64) as f64 / 1e6;
    println!(
        "| sessions × audio | events | projected in (s) | events/s | audio archived (MB/s) | audio per second of projection (call-hours) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {sessions} × {minutes} min | {total} | {took:.1} | {:.0} | {:.1} | {:.2} |",
        total as f64 / took,
        audio_mb / took,
        sessions as f64 * minutes as f64 / 60.0 / took,
    );
    log.delete_streams(&layout.all_streams()).await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await?;
    Ok(())
}

/// Words of the synthetic transcripts; `needle` is in one session of a thousand, and
/// one in twenty is closed, of tenant t3's among others.
const VOCABULARY: [&str; 16] = [
    "fire",
    "smoke",
    "kitchen",
    "ambulance",
    "street",
    "father",
    "stairs",
    "leg",
    "police",
    "crash",
    "road",
    "north",
    "child",
    "breathing",
    "door",
    "window",
];

pub async fn audit(bin: &Path, sessions: u64, requests: usize) -> anyhow::Result<()> {
    let id = Uuid::new_v4().simple().to_string();
    let schema = format!("bench_{id}");
    let pool = pool(&schema).await?;
    eprintln!("filling the read models with {sessions} sessions…");
    let filled = Instant::now();
    // Sessions over the last 30 days, tenants t0..t9, three in four completed.
    sqlx::query(
        "INSERT INTO sessions (session_id, tenant, model, sample_rate, encoding, opened_at, ended_at,
                               close_reason, chunks, audio_samples)
         SELECT md5(i::text)::uuid, 't' || (i % 10), 'whisper-tiny.en', 16000, 'pcm_s16le',
                now() - (i * interval '26 seconds'), now() - (i * interval '26 seconds') + interval '2 minutes',
                CASE WHEN i % 20 = 3 THEN 'idle_timeout' END, 1200, 1920000
         FROM generate_series(1, $1::bigint) i",
    )
    .bind(sessions as i64)
    .execute(&pool)
    .await?;
    let words = VOCABULARY.map(String::from).to_vec();
    sqlx::query(
        "INSERT INTO transcript_segments (session_id, segment, text, start_ms, end_ms, epoch, worker, at)
         SELECT md5(i::text)::uuid, s,
                CASE WHEN i % 1000 = 3 AND s = 1 THEN 'the needle is here'
                     ELSE $2[1 + (i * 7 + s) % 16] || ' ' || $2[1 + (i * 3 + s * 5) % 16] || ' at the ' || $2[1 + (i + s) % 16] END,
                s * 4000, s * 4000 + 3000, 1, 'recognizer-' || (i % 4), now()
         FROM generate_series(1, $1::bigint) i, generate_series(0, 1) s",
    )
    .bind(sessions as i64)
    .bind(&words)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO session_results (session_id, epoch, worker, completed_at, segments, transcript)
         SELECT s.session_id, 1, 'recognizer-0',
                CASE WHEN row_number() OVER (ORDER BY s.session_id) % 4 <> 0 THEN s.ended_at END, 2,
                (SELECT string_agg(text, ' ' ORDER BY segment) FROM transcript_segments t
                 WHERE t.session_id = s.session_id)
         FROM sessions s",
    )
    .execute(&pool)
    .await?;
    sqlx::query("ANALYZE").execute(&pool).await?;
    eprintln!(
        "filled in {:.1} s; starting the projector…",
        filled.elapsed().as_secs_f64()
    );

    let port = testkit::free_port();
    let key = "bench-key-0123456789";
    let namespace = format!("bench-{id}");
    let log = StreamLog::connect(&LogConfig::default()).await?;
    let layout = StreamLayout::new(namespace.clone(), PARTITIONS);
    let mut child = projector(bin, &namespace, &schema, port, Some(&format!("t3={key}")))?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}/v1/sessions");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(&base).send().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the projector never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let day_ago = eventlog::now_ms() - 86_400_000;
    let queries = [
        ("newest 50", "limit=50".to_string()),
        ("status=completed", "status=completed&limit=50".to_string()),
        ("status=closed", "status=closed&limit=50".to_string()),
        ("last 24 h", format!("from_ms={day_ago}&limit=50")),
        ("text: a common word", "q=ambulance&limit=50".to_string()),
        ("text: a rare word", "q=needle&limit=50".to_string()),
    ];
    println!("| query (tenant t3 of 10, {sessions} sessions) | rows | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|---|");
    for (name, query) in queries {
        let mut times = Vec::with_capacity(requests);
        let mut rows = 0;
        for _ in 0..requests {
            let started = Instant::now();
            let response = http
                .get(format!("{base}?{query}"))
                .bearer_auth(key)
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "{name}: {}",
                response.status()
            );
            let page: serde_json::Value = response.json().await?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            rows = page["sessions"].as_array().context("sessions")?.len();
        }
        println!(
            "| {name} | {rows} | {:.1} | {:.1} |",
            percentile(&mut times, 50.0),
            percentile(&mut times, 99.0)
        );
    }
    child.kill().await.ok();
    log.delete_streams(&layout.all_streams()).await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await?;
    Ok(())
}
