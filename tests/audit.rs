//! The audit trail end to end, with nothing faked: real speech through the whole
//! system with `asr projector` running; the read models then hold the session, its
//! transcript as the client got it and the worker that decoded it, `asr replay --wav`
//! writes the audio back byte for byte as the client sent it, and `asr replay
//! --retranscribe` decodes it again to the same words, or shows exactly what differs
//! from the transcript of record.

use std::path::Path;
use std::time::Duration;

use client::{Recording, StreamOptions};
use eventlog::{AudioEncoding, AudioFormat};
use sqlx::PgPool;
use testkit::system::{DATABASE_URL, System, SystemConfig};

fn asr() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_asr"))
}

const WAIT: Duration = Duration::from_secs(60);

/// Runs `asr` with `args` and the system's read-model schema; its stdout, after
/// checking it succeeded.
async fn asr_ok(system: &System, args: &[&str]) -> String {
    let output = tokio::process::Command::new(asr())
        .args(args)
        .env("ASR_DATABASE_SCHEMA", &system.database_schema)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "asr {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Polls until the projector has the session's completed transcript and its end.
async fn projected(pool: &PgPool, session: uuid::Uuid) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row: Option<(Option<String>,)> = sqlx::query_as(
            "SELECT r.transcript FROM session_results r JOIN sessions s USING (session_id)
             WHERE session_id = $1 AND r.completed_at IS NOT NULL AND s.ended_at IS NOT NULL",
        )
        .bind(session)
        .fetch_optional(pool)
        .await
        .unwrap_or(None);
        if let Some((Some(transcript),)) = row {
            return transcript;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {session} not projected within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_is_audited_and_replayed_byte_for_byte() {
    let _serial = testkit::serial::heavy();
    let system = System::start(
        asr(),
        SystemConfig {
            projector: true,
            ..SystemConfig::default()
        },
    )
    .await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .after_connect({
            let schema = system.database_schema.clone();
            move |conn, _| {
                let schema = schema.clone();
                Box::pin(async move {
                    sqlx::query(&format!("SET search_path TO {schema}"))
                        .execute(conn)
                        .await
                        .map(|_| ())
                })
            }
        })
        .connect(DATABASE_URL)
        .await
        .unwrap();
    let sentences = ["please send an ambulance to the main street"];
    let recordings = [
        testkit::speech::sentences(&sentences, 800),
        testkit::speech::sentences_as(
            &sentences,
            800,
            AudioFormat {
                sample_rate: 48_000,
                encoding: AudioEncoding::PcmF32le,
            },
        ),
    ];
    let dir = std::env::temp_dir().join(format!("asr-audit-{}", system.namespace));
    std::fs::create_dir_all(&dir).unwrap();
    let mut last_session = None;
    for recording in recordings {
        let options = StreamOptions {
            speed: 0.0,
            ..system.stream_options()
        };
        let outcome = client::stream(&options, &recording, |_| {})
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", system.all_logs()));
        let session = outcome.session_id;
        last_session = Some(session);
        let transcript = projected(&pool, session).await;
        assert_eq!(
            transcript, outcome.transcript,
            "the transcript the client got"
        );
        let workers: Vec<String> =
            sqlx::query_scalar("SELECT worker FROM session_workers WHERE session_id = $1")
                .bind(session)
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(workers, vec!["recognizer-1".to_string()]);

        let wav = dir.join(format!("{session}.wav"));
        let (id, path) = (session.to_string(), wav.display().to_string());
        asr_ok(&system, &["replay", &id, "--wav", &path]).await;
        let replayed = Recording::read(&wav).unwrap();
        assert_eq!(replayed.format, recording.format);
        assert!(
            replayed.pcm == recording.pcm,
            "the PCM differs from what was sent"
        );
        println!(
            "{} Hz {}: {} bytes replayed identically; {transcript:?}",
            recording.format.sample_rate,
            recording.format.encoding.name(),
            replayed.pcm.len()
        );
    }
    // Decoded again: the words of record; then, with the record altered, the diff
    // shows exactly the alteration.
    let session = last_session.expect("a session ran");
    let session_text = session.to_string();
    let retranscribe = || async {
        let stdout = asr_ok(&system, &["replay", &session_text, "--retranscribe"]).await;
        let line = |prefix: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in {stdout}"))
                .trim()
                .to_string()
        };
        (
            line("diff:"),
            line("word error rate:"),
            line("retranscribed:"),
        )
    };
    let (diff, wer, again) = retranscribe().await;
    println!("retranscribed: {again:?}; diff: {diff}; WER {wer}");
    assert!(!diff.contains("[-") && !diff.contains("{+"), "{diff}");
    assert!(wer.starts_with("0.000"), "{wer}");
    sqlx::query("UPDATE transcript_segments SET text = replace(text, 'ambulance', 'taxi') WHERE session_id = $1")
        .bind(session)
        .execute(&pool)
        .await
        .unwrap();
    let (diff, wer, _) = retranscribe().await;
    println!("after altering the record: diff: {diff}; WER {wer}");
    let changes: Vec<&str> = diff
        .split_whitespace()
        .filter(|w| w.starts_with("[-") || w.starts_with("{+"))
        .collect();
    assert_eq!(changes, vec!["[-taxi-]", "{+ambulance+}"], "{diff}");
    assert!(!wer.starts_with("0.000"), "{wer}");

    // The audit API from the command line, as the test tenant.
    let audit_url = format!("http://127.0.0.1:{}", system.projector_port.unwrap());
    let key = system.api_key.clone();
    let sessions = |args: &[&str]| {
        let mut all: Vec<String> = std::iter::once("sessions")
            .chain(args.iter().copied())
            .map(String::from)
            .collect();
        all.extend([
            "--url".into(),
            audit_url.clone(),
            "--api-key".into(),
            key.clone(),
        ]);
        let system = &system;
        async move {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            asr_ok(system, &all).await
        }
    };
    let list = sessions(&["list", "--status", "completed"]).await;
    assert_eq!(
        list.lines().count(),
        3,
        "a header and both sessions:\n{list}"
    );
    assert!(list.contains(&session.to_string()), "{list}");
    let found = sessions(&["list", "--text", "ambulance"]).await;
    assert_eq!(
        found.lines().count(),
        2,
        "only the session whose record still says it:\n{found}"
    );
    let show = sessions(&["show", &session_text]).await;
    for expected in [
        "taxi",
        "recognizer-1",
        "epoch_started",
        "transcript_completed",
    ] {
        assert!(show.contains(expected), "{expected} missing from:\n{show}");
    }
    let refused = tokio::process::Command::new(asr())
        .args([
            "sessions",
            "list",
            "--url",
            &audit_url,
            "--api-key",
            "wrong-key-0123456789",
        ])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unauthorized"));

    // An unknown session: a clear message, not a WAV.
    let unknown = tokio::process::Command::new(asr())
        .args(["replay", &uuid::Uuid::new_v4().to_string(), "--wav"])
        .arg(dir.join("none.wav"))
        .env("ASR_DATABASE_SCHEMA", &system.database_schema)
        .output()
        .await
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no session"));
    let _ = std::fs::remove_dir_all(&dir);
    system.stop().await;
}
