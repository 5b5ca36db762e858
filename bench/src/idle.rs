//! `asr-bench idle --sessions 10000`: what an open session that sends nothing costs an
//! ingest node, and how fast sessions open.
//!
//! One `asr ingest` process, its orchestrator played by this process (every session is
//! allocated at once), and this process playing the recognizer too: right after a
//! session opens it appends the session's `EpochStarted`, so the session is started
//! and waits for no worker. Sessions open `--concurrency` at a time; each then sits
//! idle (the server's pings are answered by the WebSocket library). Measured: the time
//! to open them all (open → `opened`), and the ingest process's resident memory before
//! the first session and with all of them open, per session.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use eventlog::log::{Appender, LogConfig, StreamLog};
use eventlog::streams::StreamLayout;
use eventlog::{Envelope, Event, SessionId};
use futures::{SinkExt, StreamExt};
use orchestrator::api::worker_manager_server::{WorkerManager, WorkerManagerServer};
use orchestrator::api::{
    AllocateWorkerRequest, AllocateWorkerResponse, Allocation, DrainWorkerRequest,
    DrainWorkerResponse, RegisterWorkerRequest, ReleaseWorkerRequest, ReleaseWorkerResponse,
    SendHeartbeatRequest, SendHeartbeatResponse, WorkerCommand, allocate_worker_response::Outcome,
};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tonic::{Request, Response, Status};

use crate::percentile;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const PARTITIONS: u16 = 16;
const KEY: &str = "bench-key-0123456789";

pub async fn run(bin: &Path, sessions: usize, concurrency: usize) -> anyhow::Result<()> {
    let namespace = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let layout = StreamLayout::new(namespace.clone(), PARTITIONS);
    let log = StreamLog::connect(&LogConfig::default()).await?;
    log.ensure_streams(&layout.all_streams()).await?;

    // The orchestrator, played here: every session allocated at once.
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let grpc_url = format!("http://{}", grpc.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerManagerServer::new(AllocateAll))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    testkit::announce_fake_leader("redis://127.0.0.1:6379/0", &namespace, &grpc_url).await;

    let port = testkit::free_port();
    let url = format!("ws://127.0.0.1:{port}/v1/stream");
    let mut ingest = tokio::process::Command::new(bin)
        .args(["ingest", &format!("--listen=127.0.0.1:{port}")])
        .env("ASR_NAMESPACE", &namespace)
        .env("ASR_PARTITIONS", PARTITIONS.to_string())
        .env("ASR_API_KEYS", format!("bench={KEY}"))
        .env(
            "ASR_INGEST_MAX_SESSIONS_PER_TENANT",
            (sessions + 1).to_string(),
        )
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .context("starting asr ingest")?;
    let pid = ingest.id().context("ingest's pid")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "ingest did not start listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kb = crate::ingest_load::resident_kb(pid)?;

    // The recognizer, played here: one producer per results partition.
    let mut producers = Vec::new();
    for p in 0..PARTITIONS {
        let stream = layout.results_partition(p);
        producers.push(
            log.appender(&stream, &format!("{namespace}-bench-{p}"), true, 4096)
                .await?,
        );
    }
    let producers = Arc::new(producers);

    eprintln!("opening {sessions} idle sessions, {concurrency} at a time…");
    let started = Instant::now();
    let mut open_ms = Vec::with_capacity(sessions);
    let mut sockets = Vec::with_capacity(sessions);
    for batch in (0..sessions).collect::<Vec<_>>().chunks(concurrency) {
        let opens = batch.iter().map(|_| {
            let (url, layout, producers) = (url.clone(), layout.clone(), producers.clone());
            async move { open(&url, &layout, &producers).await }
        });
        for result in futures::future::join_all(opens).await {
            let (ws, ms) = result?;
            open_ms.push(ms);
            sockets.push(ws);
        }
    }
    let opening = started.elapsed().as_secs_f64();
    // Let the last `started` messages and any allocation retries settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_kb = crate::ingest_load::resident_kb(pid)?;
    anyhow::ensure!(ingest.try_wait()?.is_none(), "ingest exited");

    println!(
        "| sessions | opened in (s) | sessions opened per second | open → opened p50 / p99 (ms) | ingest RSS before / with all open (MB) | RSS per session (KB) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {sessions} | {opening:.1} | {:.0} | {:.1} / {:.1} | {:.0} / {:.0} | {:.1} |",
        sessions as f64 / opening,
        percentile(&mut open_ms, 50.0),
        percentile(&mut open_ms, 99.0),
        before_kb as f64 / 1024.0,
        after_kb as f64 / 1024.0,
        (after_kb.saturating_sub(before_kb)) as f64 / sessions as f64,
    );
    drop(sockets);
    ingest.kill().await?;
    log.delete_streams(&layout.all_streams()).await;
    Ok(())
}

/// Opens one session, then plays its recognizer's `EpochStarted`; returns the socket
/// and the time from sending `open` to `opened`.
async fn open(
    url: &str,
    layout: &StreamLayout,
    producers: &[Appender],
) -> anyhow::Result<(Ws, f64)> {
    let (mut ws, _) = connect_async(url).await?;
    let open = json!({"type": "open", "model": "whisper-tiny.en", "sample_rate": 16000,
        "encoding": "pcm_s16le", "api_key": KEY});
    let sent = Instant::now();
    ws.send(Message::text(open.to_string())).await?;
    let session: SessionId = loop {
        let Message::Text(text) = ws.next().await.context("the connection ended")?? else {
            continue;
        };
        let message: Value = serde_json::from_str(&text)?;
        match message["type"].as_str() {
            Some("opened") => {
                break message["session_id"]
                    .as_str()
                    .context("session id")?
                    .parse()?;
            }
            Some("error") => anyhow::bail!("session refused: {message}"),
            _ => {}
        }
    };
    let opened_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let started = Envelope {
        session: Some(session),
        at_ms: eventlog::now_ms(),
        producer: "bench-recognizer".into(),
        event: Event::EpochStarted {
            epoch: 1,
            worker: "bench".into(),
        },
    };
    producers[usize::from(layout.partition_of(session))]
        .append_confirmed(&started)
        .await?;
    Ok((ws, opened_ms))
}

/// Allocates every session at once (epoch 1, worker `bench`).
#[derive(Clone)]
struct AllocateAll;

#[tonic::async_trait]
impl WorkerManager for AllocateAll {
    async fn allocate_worker(
        &self,
        _: Request<AllocateWorkerRequest>,
    ) -> Result<Response<AllocateWorkerResponse>, Status> {
        Ok(Response::new(AllocateWorkerResponse {
            outcome: Some(Outcome::Allocated(Allocation {
                worker_id: "bench".into(),
                epoch: 1,
            })),
        }))
    }

    type RegisterWorkerStream = futures::stream::BoxStream<'static, Result<WorkerCommand, Status>>;

    async fn register_worker(
        &self,
        _: Request<RegisterWorkerRequest>,
    ) -> Result<Response<Self::RegisterWorkerStream>, Status> {
        Err(Status::unimplemented("a benchmark's stand-in"))
    }

    async fn send_heartbeat(
        &self,
        _: Request<SendHeartbeatRequest>,
    ) -> Result<Response<SendHeartbeatResponse>, Status> {
        Err(Status::unimplemented("a benchmark's stand-in"))
    }

    async fn release_worker(
        &self,
        _: Request<ReleaseWorkerRequest>,
    ) -> Result<Response<ReleaseWorkerResponse>, Status> {
        Err(Status::unimplemented("a benchmark's stand-in"))
    }

    async fn drain_worker(
        &self,
        _: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        Err(Status::unimplemented("a benchmark's stand-in"))
    }
}
