//! The projector's exactly-once promise with real processes: `asr projector`
//! SIGKILLed at 10 random moments while sessions are written to the streams, and
//! started again each time, ends with read models equal, row for row, to those of a
//! projector of the same streams that never stopped.
//!
//! The sessions are synthetic (`testkit::synthetic`: events written straight to the
//! streams, no recognition): this is about projecting, not producing. Kill moments are
//! positions in the projection (events committed), drawn from a seeded RNG
//! (`ASR_TEST_SEED` replays a run).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use eventlog::log::{LogConfig, StreamLog};
use eventlog::streams::StreamLayout;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use testkit::synthetic::{SessionSpec, Writer};
use tokio::process::{Child, Command};
use uuid::Uuid;

const PARTITIONS: u16 = 2;
const SESSIONS: usize = 40;
const KILLS: usize = 10;
const WAIT: Duration = Duration::from_secs(120);
/// Every table of the read models, with the order that makes a dump deterministic.
const TABLES: [(&str, &str); 9] = [
    ("projector_offsets", "stream"),
    ("sessions", "session_id"),
    ("audio_chunks", "session_id, seq"),
    ("session_results", "session_id"),
    ("transcript_segments", "session_id, segment"),
    ("session_workers", "session_id, epoch"),
    ("session_events", "stream, stream_offset"),
    ("model_load", "model, minute"),
    ("session_progress", "session_id, minute"),
];

fn asr() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_asr"))
}

/// An `asr projector` process on `namespace`, into `schema`.
fn projector(namespace: &str, schema: &str, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(asr())
        .arg("projector")
        .env("ASR_NAMESPACE", namespace)
        .env("ASR_PARTITIONS", PARTITIONS.to_string())
        .env("ASR_DATABASE_SCHEMA", schema)
        .env("ASR_PROJECTOR_HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn asr projector")
}

async fn pool(schema: &str) -> PgPool {
    projector::store::Store::connect(testkit::system::DATABASE_URL, schema)
        .await
        .unwrap()
        .pool()
        .clone()
}

/// Events committed so far, over every stream.
async fn committed(pool: &PgPool) -> u64 {
    sqlx::query_scalar::<_, Option<i64>>("SELECT sum(next_offset)::bigint FROM projector_offsets")
        .fetch_one(pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(0) as u64
}

async fn until_committed(pool: &PgPool, at_least: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while committed(pool).await < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {} of {at_least} events committed",
            committed(pool).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A digest and row count of every table, in a deterministic order.
async fn dump(pool: &PgPool) -> Vec<(String, i64, String)> {
    let mut tables = Vec::new();
    for (table, order) in TABLES {
        let (rows, digest): (i64, Option<String>) = sqlx::query_as(&format!(
            "SELECT count(*), md5(string_agg(row_to_json(t)::text, E'\\n' ORDER BY {order})) FROM {table} t"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        tables.push((table.to_string(), rows, digest.unwrap_or_default()));
    }
    tables
}

#[tokio::test(flavor = "multi_thread")]
async fn a_projector_killed_at_random_moments_ends_with_the_same_rows() {
    let _serial = testkit::serial::heavy();
    let id = Uuid::new_v4().simple().to_string();
    let namespace = format!("t-{id}");
    let (reference, killed) = (format!("t_{id}_reference"), format!("t_{id}_killed"));
    let logs = std::env::temp_dir().join(format!("asr-{namespace}"));
    std::fs::create_dir_all(&logs).unwrap();
    let layout = StreamLayout::new(namespace.clone(), PARTITIONS);
    let log = StreamLog::connect(&LogConfig::default()).await.unwrap();
    log.ensure_streams(&layout.all_streams()).await.unwrap();

    let seed = std::env::var("ASR_TEST_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("ASR_TEST_SEED is a u64"))
        .unwrap_or_else(rand::random);
    println!("sessions and kill moments seeded with ASR_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let specs: Vec<(Uuid, SessionSpec)> = (0..SESSIONS)
        .map(|_| {
            let spec = SessionSpec {
                chunks: rng.random_range(1..30),
                chunk_bytes: 640 * rng.random_range(1..6),
                failover: rng.random_bool(0.3),
                resumed: rng.random_bool(0.3),
                closed: rng.random_bool(0.2).then(|| "idle_timeout".to_string()),
                ..SessionSpec::default()
            };
            (Uuid::new_v4(), spec)
        })
        .collect();
    let total: u64 = specs.iter().map(|(_, s)| s.events()).sum();
    let mut moments: Vec<u64> = (0..KILLS).map(|_| rng.random_range(1..total)).collect();
    moments.sort();

    let (reference_pool, killed_pool) = (pool(&reference).await, pool(&killed).await);
    let _reference = projector(&namespace, &reference, &logs.join("reference.log"));
    let mut victim = projector(&namespace, &killed, &logs.join("killed.log"));

    // Sessions are written while the projectors run, a few at a time.
    let writing = tokio::spawn({
        let (log, layout) = (log.clone(), layout.clone());
        async move {
            let mut writer = Writer::new(log, layout);
            for batch in specs.chunks(4) {
                for (session, spec) in batch {
                    writer.session(*session, spec).await;
                }
                writer.flush().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            writer.close().await;
        }
    });
    let mut last_kill = 0;
    for (i, moment) in moments.iter().enumerate() {
        // Each kill after the restarted projector committed something of its own (while
        // there is something left to commit), so kills do not pile up at start-ups.
        let at = (*moment).max(last_kill + 1).min(total);
        until_committed(&killed_pool, at, "before a kill").await;
        victim.kill().await.expect("SIGKILL the projector");
        last_kill = committed(&killed_pool).await;
        println!(
            "kill {}: SIGKILLed at {last_kill} of {total} events committed",
            i + 1
        );
        victim = projector(&namespace, &killed, &logs.join("killed.log"));
    }
    writing.await.unwrap();
    until_committed(&reference_pool, total, "the reference projector").await;
    until_committed(&killed_pool, total, "the killed projector").await;

    let (expected, got) = (dump(&reference_pool).await, dump(&killed_pool).await);
    for (e, g) in expected.iter().zip(&got) {
        println!(
            "{:<20} {:>6} rows {}",
            e.0,
            e.1,
            if e == g { "equal" } else { "DIFFER" }
        );
    }
    assert_eq!(
        got, expected,
        "read models after {KILLS} kills vs the uninterrupted run"
    );
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(&killed_pool)
        .await
        .unwrap();
    assert_eq!(sessions, SESSIONS as i64);

    victim.kill().await.ok();
    log.delete_streams(&layout.all_streams()).await;
    for schema in [&reference, &killed] {
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&reference_pool)
            .await
            .unwrap();
    }
}
