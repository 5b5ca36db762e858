//! The projector against real RabbitMQ streams and a real PostgreSQL: synthetic
//! sessions (`testkit::synthetic`, written straight to the streams, no recognition)
//! become the read models their specs say, through the acceptance rules (a failover's
//! duplicate and zombie finals, a deposed leader's events, a resumed client's second
//! copy of a chunk never count).
//!
//! The expected rows come from the session specs, not from the projector's code. The
//! audit API is tested over HTTP on the same read models: filters, paging, tenant
//! isolation, bad parameters, the WAV download, the OpenAPI document.

use std::time::Duration;

use clap::Parser;
use eventlog::SessionId;
use eventlog::log::StreamLog;
use projector::ProjectorArgs;
use sqlx::{PgPool, Row};
use testkit::synthetic::{self, SessionSpec, Writer};
use tokio::sync::oneshot;
use uuid::Uuid;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    projector: ProjectorArgs,
}

const WAIT: Duration = Duration::from_secs(60);
const KEY: &str = "synthetic-key-0123456789";
const OTHER_TENANT: &str = "other";
const OTHER_KEY: &str = "other-key-0123456789";

/// A projector in this process, on its own namespace and schema.
struct Harness {
    args: ProjectorArgs,
    http: String,
    log: StreamLog,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// With extra flags (a short retention).
    async fn start_with(extra: &[&str]) -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let http = format!("127.0.0.1:{}", testkit::free_port());
        let keys = format!("{}={KEY},{OTHER_TENANT}={OTHER_KEY}", synthetic::TENANT);
        let (namespace, schema) = (format!("t-{id}"), format!("t_{id}"));
        let mut flags = vec![
            "projector",
            "--namespace",
            &namespace,
            "--database-schema",
            &schema,
            "--http-addr",
            &http,
            "--api-keys",
            &keys,
        ];
        if !extra.contains(&"--partitions") {
            flags.extend(["--partitions", "2"]);
        }
        flags.extend_from_slice(extra);
        let args = Cli::parse_from(flags).projector;
        let log = StreamLog::connect(&args.shared.log_config()).await.unwrap();
        log.ensure_streams(&args.shared.layout().all_streams())
            .await
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(projector::run(args.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            args,
            http,
            log,
            stop: Some(stop),
            task,
        }
    }

    async fn pool(&self) -> PgPool {
        self.args.database.connect().await.unwrap().pool().clone()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.task).await.unwrap().unwrap();
        self.log
            .delete_streams(&self.args.shared.layout().all_streams())
            .await;
        let pool = self.pool().await;
        sqlx::query(&format!(
            "DROP SCHEMA {} CASCADE",
            self.args.database.database_schema
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
}

/// Waits until `sessions` sessions are projected to their end: input ended and
/// transcript completed.
async fn projected(pool: &PgPool, sessions: i64) {
    let completed = "SELECT count(*) FROM session_results WHERE completed_at IS NOT NULL";
    until(pool, completed, sessions).await;
    until(
        pool,
        "SELECT count(*) FROM sessions WHERE ended_at IS NOT NULL",
        sessions,
    )
    .await;
}

/// Polls `query` (one integer) until it equals `expected`.
async fn until(pool: &PgPool, query: &str, expected: i64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value: Option<i64> = sqlx::query_scalar(query)
            .fetch_one(pool)
            .await
            .unwrap_or(None);
        if value == Some(expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{query}: {value:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_models_say_what_the_events_say() {
    let h = Harness::start().await;
    let specs = [
        SessionSpec::default(),
        SessionSpec {
            failover: true,
            chunks: 7,
            ..SessionSpec::default()
        },
        SessionSpec {
            resumed: true,
            closed: Some("bad_sequence".into()),
            chunks: 6,
            chunk_bytes: 1_600,
            ..SessionSpec::default()
        },
    ];
    let sessions: Vec<SessionId> = specs.iter().map(|_| Uuid::new_v4()).collect();
    let mut writer = Writer::new(h.log.clone(), h.args.shared.layout());
    for (session, spec) in sessions.iter().zip(&specs) {
        writer.session(*session, spec).await;
    }
    writer.close().await;

    let pool = h.pool().await;
    projected(&pool, 3).await;
    until(
        &pool,
        "SELECT sum(sessions_queued)::bigint FROM model_load",
        3,
    )
    .await;

    for (session, spec) in sessions.iter().zip(&specs) {
        let row = sqlx::query(
            "SELECT tenant, model, sample_rate, encoding, chunks, audio_samples, close_reason, resumes
             FROM sessions WHERE session_id = $1",
        )
        .bind(session)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(row.get::<String, _>("tenant"), synthetic::TENANT);
        assert_eq!(row.get::<String, _>("model"), synthetic::MODEL);
        assert_eq!(row.get::<i32, _>("sample_rate"), 16_000);
        assert_eq!(row.get::<String, _>("encoding"), "pcm_s16le");
        assert_eq!(
            row.get::<i64, _>("chunks") as u64,
            spec.chunks,
            "each chunk once"
        );
        let samples = spec.chunks * spec.chunk_bytes as u64 / 2;
        assert_eq!(row.get::<i64, _>("audio_samples") as u64, samples);
        assert_eq!(row.get::<Option<String>, _>("close_reason"), spec.closed);
        assert_eq!(row.get::<i32, _>("resumes"), i32::from(spec.resumed));

        // The archive holds the client's bytes, each seq once.
        let audio = projector::audit::session_audio(&pool, *session)
            .await
            .unwrap();
        let sent: Vec<u8> = (0..spec.chunks)
            .flat_map(|seq| spec.pcm(*session, seq))
            .collect();
        assert_eq!(audio.pcm, sent);

        let segments: Vec<(i32, String, i64, String)> = sqlx::query_as(
            "SELECT segment, text, epoch, worker FROM transcript_segments
             WHERE session_id = $1 ORDER BY segment",
        )
        .bind(session)
        .fetch_all(&pool)
        .await
        .unwrap();
        let last_epoch = if spec.failover { 2 } else { 1 };
        let expected: Vec<(i32, String, i64, String)> = spec
            .transcript(*session)
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                // Segment 0 was decided under epoch 1 in every run.
                let epoch = if i == 0 { 1 } else { last_epoch };
                (i as i32, text, epoch, format!("recognizer-{epoch}"))
            })
            .collect();
        assert_eq!(segments, expected);
        let transcript: String =
            sqlx::query_scalar("SELECT transcript FROM session_results WHERE session_id = $1")
                .bind(session)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(transcript, spec.transcript(*session).join(" "));
        let workers: Vec<String> = sqlx::query_scalar(
            "SELECT worker FROM session_workers WHERE session_id = $1 ORDER BY epoch",
        )
        .bind(session)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(workers.len(), last_epoch as usize);

        // The history has every event but the chunks; the ones that did not count say so.
        let rejected: Vec<String> = sqlx::query_scalar(
            "SELECT kind FROM session_events WHERE session_id = $1 AND NOT accepted ORDER BY at, stream, stream_offset",
        )
        .bind(session)
        .fetch_all(&pool)
        .await
        .unwrap();
        let mut expected_rejected = vec!["session_queued".to_string()]; // the deposed leader's
        if spec.failover {
            expected_rejected.extend(["final".to_string(), "final".to_string()]);
        }
        let mut rejected_sorted = rejected.clone();
        rejected_sorted.sort();
        expected_rejected.sort();
        assert_eq!(rejected_sorted, expected_rejected, "{session}");
    }

    let (opened, queued, audio_us): (i64, i64, i64) = sqlx::query_as(
        "SELECT sum(sessions_opened)::bigint, sum(sessions_queued)::bigint, sum(audio_us)::bigint
         FROM model_load WHERE model = $1",
    )
    .bind(synthetic::MODEL)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((opened, queued), (3, 3));
    let expected_us: u64 = specs
        .iter()
        .map(|s| s.chunks * (s.chunk_bytes as u64 / 2) * 1_000_000 / 16_000)
        .sum();
    assert_eq!(audio_us as u64, expected_us);
    // The series dashboards read: all three sessions were open in their minute(s).
    let active: i64 =
        sqlx::query_scalar("SELECT max(sessions_active) FROM model_load_series WHERE model = $1")
            .bind(synthetic::MODEL)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(active, 3);

    // Decoding progress from the heartbeats (the deposed leader's ignored), and the
    // backlog it gives in the session's minute: its audio minus what is decoded.
    for (session, spec) in sessions.iter().zip(&specs) {
        let (decoded, backlog): (i64, f64) = sqlx::query_as(
            "SELECT p.decoded_ms, l.backlog_seconds FROM session_progress p
             JOIN model_load_series l ON l.minute = p.minute AND l.model = $2
             WHERE p.session_id = $1",
        )
        .bind(session)
        .bind(synthetic::MODEL)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(decoded as u64, spec.audio_ms() / 2);
        // All three sessions' backlogs add up in their (shared) minute, unless the
        // writing crossed a minute; each is at least its own.
        assert!(
            backlog >= (spec.audio_ms() - spec.audio_ms() / 2) as f64 / 1000.0 - 1e-9,
            "{backlog}"
        );
    }

    let missing = projector::audit::session_audio(&pool, Uuid::new_v4()).await;
    assert!(matches!(
        missing,
        Err(projector::audit::AuditError::UnknownSession(_))
    ));
    h.stop().await;
}

/// A GET on the harness's HTTP port: the status and the body.
async fn get(h: &Harness, path: &str, key: Option<&str>) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(&h.http).await.unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: audit\r\n{auth}Connection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    assert!(
        !head.to_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );
    let status = head[9..12].parse().unwrap();
    (status, response[split + 4..].to_vec())
}

async fn get_json(h: &Harness, path: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let (status, body) = get(h, path, key).await;
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&body)));
    (status, json)
}

/// Waits until the API serves (the projector binds its port after connecting).
async fn serving(h: &Harness) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(&h.http).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_api_filters_pages_and_keeps_tenants_apart() {
    let h = Harness::start().await;
    let ours = [
        SessionSpec::default(),
        SessionSpec {
            closed: Some("bad_sequence".into()),
            ..SessionSpec::default()
        },
        SessionSpec {
            failover: true,
            chunks: 4,
            ..SessionSpec::default()
        },
    ];
    let theirs = SessionSpec {
        tenant: OTHER_TENANT.into(),
        ..SessionSpec::default()
    };
    let mut writer = Writer::new(h.log.clone(), h.args.shared.layout());
    let mut sessions = Vec::new();
    for spec in &ours {
        let session = Uuid::new_v4();
        writer.session(session, spec).await;
        sessions.push(session);
        // Distinct opening times, so the order is the writing order.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let foreign = Uuid::new_v4();
    writer.session(foreign, &theirs).await;
    writer.close().await;
    let pool = h.pool().await;
    projected(&pool, 4).await;
    serving(&h).await;

    // Keys first: none, or a wrong one, is a 401 with a JSON body.
    for key in [None, Some("not-a-key-0123456789")] {
        let (status, body) = get_json(&h, "/v1/sessions", key).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized"))
        );
    }

    // Newest first, only this tenant's, paged.
    let (status, page) = get_json(&h, "/v1/sessions?limit=2", Some(KEY)).await;
    assert_eq!(status, 200, "{page}");
    let ids = |page: &serde_json::Value| -> Vec<String> {
        page["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["session_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(&page),
        vec![sessions[2].to_string(), sessions[1].to_string()]
    );
    let token = page["next_page_token"].as_str().expect("a second page");
    let (_, second) = get_json(
        &h,
        &format!("/v1/sessions?limit=2&page_token={token}"),
        Some(KEY),
    )
    .await;
    assert_eq!(ids(&second), vec![sessions[0].to_string()]);
    assert!(second["next_page_token"].is_null());
    let (_, theirs_page) = get_json(&h, "/v1/sessions", Some(OTHER_KEY)).await;
    assert_eq!(ids(&theirs_page), vec![foreign.to_string()]);

    // Filters: status, text in the transcript, time range.
    let (_, closed) = get_json(&h, "/v1/sessions?status=closed", Some(KEY)).await;
    assert_eq!(ids(&closed), vec![sessions[1].to_string()]);
    assert_eq!(closed["sessions"][0]["close_reason"], "bad_sequence");
    let (_, completed) = get_json(&h, "/v1/sessions?status=completed", Some(KEY)).await;
    assert_eq!(completed["sessions"].as_array().unwrap().len(), 2);
    let word = &sessions[0].simple().to_string()[..8];
    let (_, found) = get_json(&h, &format!("/v1/sessions?q={word}"), Some(KEY)).await;
    assert_eq!(ids(&found), vec![sessions[0].to_string()]);
    let (_, nothing) = get_json(&h, &format!("/v1/sessions?q={word}"), Some(OTHER_KEY)).await;
    assert_eq!(
        ids(&nothing),
        Vec::<String>::new(),
        "another tenant's transcript"
    );
    let (_, future) = get_json(
        &h,
        &format!("/v1/sessions?from_ms={}", eventlog::now_ms() + 60_000),
        Some(KEY),
    )
    .await;
    assert_eq!(ids(&future), Vec::<String>::new());
    let (_, past) = get_json(
        &h,
        &format!("/v1/sessions?to_ms={}", eventlog::now_ms()),
        Some(KEY),
    )
    .await;
    assert_eq!(past["sessions"].as_array().unwrap().len(), 3);

    // Bad parameters: 400 and a message naming the parameter.
    for (query, names) in [
        ("status=lost", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("from_ms=yesterday", "from_ms"),
        ("page_token=xyz", "page_token"),
    ] {
        let (status, body) = get_json(&h, &format!("/v1/sessions?{query}"), Some(KEY)).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "bad_request");
        assert!(body["message"].as_str().unwrap().contains(names), "{body}");
    }

    // One session: transcript with timings, workers, timeline with the failover.
    let failover = sessions[2];
    let (status, detail) = get_json(&h, &format!("/v1/sessions/{failover}"), Some(KEY)).await;
    assert_eq!(status, 200, "{detail}");
    let texts: Vec<&str> = detail["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ours[2].transcript(failover));
    assert_eq!(detail["segments"][1]["worker"], "recognizer-2");
    assert_eq!(detail["workers"].as_array().unwrap().len(), 2);
    let kinds: Vec<&str> = detail["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "session_opened",
        "session_queued",
        "epoch_started",
        "final",
        "end_of_stream",
        "transcript_completed",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    assert!(!kinds.contains(&"partial"));
    assert_eq!(detail["session"]["status"], "completed");
    assert_eq!(detail["session"]["audio_seconds"], 0.4);

    // Another tenant's session and an unknown one look the same; a bad id is a 400.
    let (status, a) = get_json(&h, &format!("/v1/sessions/{foreign}"), Some(KEY)).await;
    let unknown = Uuid::new_v4();
    let (status_unknown, b) = get_json(&h, &format!("/v1/sessions/{unknown}"), Some(KEY)).await;
    assert_eq!((status, status_unknown), (404, 404));
    assert_eq!(a["error"], b["error"]);
    assert!(!a.to_string().contains(OTHER_TENANT));
    let (status, _) = get_json(&h, "/v1/sessions/not-a-uuid", Some(KEY)).await;
    assert_eq!(status, 400);

    // The raw history, paged: every event but the chunks, partials included.
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM session_events WHERE session_id = $1")
            .bind(failover)
            .fetch_one(&pool)
            .await
            .unwrap();
    let (mut after, mut seen) = (Some(0i64), 0);
    while let Some(from) = after {
        let path = format!("/v1/sessions/{failover}/events?limit=4&after={from}");
        let (status, page) = get_json(&h, &path, Some(KEY)).await;
        assert_eq!(status, 200, "{page}");
        seen += page["events"].as_array().unwrap().len() as i64;
        after = page["next_after"].as_i64();
    }
    assert_eq!(seen, history);
    let (status, _) = get_json(
        &h,
        &format!("/v1/sessions/{failover}/events?after=-1"),
        Some(KEY),
    )
    .await;
    assert_eq!(status, 400);

    // The audio as a WAV file, the client's bytes.
    let (status, wav) = get(
        &h,
        &format!("/v1/sessions/{}/audio.wav", sessions[0]),
        Some(KEY),
    )
    .await;
    assert_eq!(status, 200);
    let dir = std::env::temp_dir().join(format!("asr-api-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.wav"), &wav).unwrap();
    let recording = client::Recording::read(&dir.join("a.wav")).unwrap();
    let sent: Vec<u8> = (0..ours[0].chunks)
        .flat_map(|seq| ours[0].pcm(sessions[0], seq))
        .collect();
    assert_eq!(recording.pcm, sent);
    std::fs::remove_dir_all(&dir).unwrap();
    let (status, _) = get(&h, &format!("/v1/sessions/{foreign}/audio.wav"), Some(KEY)).await;
    assert_eq!(status, 404, "another tenant's audio");

    // The OpenAPI document names every route.
    let (status, openapi) = get_json(&h, "/openapi.json", None).await;
    assert_eq!(status, 200);
    for path in [
        "/v1/sessions",
        "/v1/sessions/{id}",
        "/v1/sessions/{id}/events",
        "/v1/sessions/{id}/audio.wav",
    ] {
        assert!(openapi["paths"].get(path).is_some(), "{path} undocumented");
    }
    h.stop().await;
}

/// With the streams' retention shortened to two megabytes, the broker drops a projected
/// session's events once more audio follows; its archive still replays, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_the_stream_retention_in_the_archive() {
    // Twice the segment size: the broker keeps whole segments within the retention
    // besides the one being written, which can be empty just after a roll; with
    // retention equal to one segment it sometimes dropped every event.
    let h = Harness::start_with(&[
        "--partitions",
        "1",
        "--retention-mb",
        "2",
        "--segment-mb",
        "1",
    ])
    .await;
    let pool = h.pool().await;
    let (kept, spec) = (Uuid::new_v4(), SessionSpec::default());
    let mut writer = Writer::new(h.log.clone(), h.args.shared.layout());
    writer.session(kept, &spec).await;
    writer.flush().await;
    until(
        &pool,
        "SELECT count(*) FROM session_results WHERE completed_at IS NOT NULL",
        1,
    )
    .await;

    // Four megabytes of other sessions' audio after it.
    let filler = SessionSpec {
        chunks: 100,
        chunk_bytes: 8_000,
        ..SessionSpec::default()
    };
    for _ in 0..5 {
        writer.session(Uuid::new_v4(), &filler).await;
        writer.flush().await;
    }
    writer.close().await;
    let audio = h.args.shared.layout().audio_partition(0);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut reader = h
            .log
            .reader(&audio, eventlog::log::ReadFrom::Start, None)
            .await
            .unwrap();
        let first = tokio::time::timeout(WAIT, reader.next())
            .await
            .expect("the stream holds events")
            .unwrap()
            .unwrap();
        reader.close().await;
        if first.envelope.session != Some(kept) {
            println!(
                "the broker's oldest audio event is now at offset {}",
                first.offset
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never dropped the first session"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    until(
        &pool,
        "SELECT count(*) FROM session_results WHERE completed_at IS NOT NULL",
        6,
    )
    .await;

    let archived = projector::audit::session_audio(&pool, kept).await.unwrap();
    let sent: Vec<u8> = (0..spec.chunks)
        .flat_map(|seq| spec.pcm(kept, seq))
        .collect();
    assert_eq!(archived.pcm, sent);
    let transcript = projector::audit::session_transcript(&pool, kept)
        .await
        .unwrap();
    assert_eq!(transcript, spec.transcript(kept).join(" "));
    h.stop().await;
}
