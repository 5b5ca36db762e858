//! The worker against real RabbitMQ and Redis, with a fake orchestrator: it registers,
//! takes an assignment, decodes the session's audio from the log, appends results and
//! checkpoints, completes and releases. Then a second epoch of the same session (what a
//! failover does) resumes from the checkpoint and the transcript that counts is
//! unchanged. Each run uses its own namespace and deletes its streams.

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use common::*;
use eventlog::checkpoint::CheckpointStore;
use eventlog::events::AudioChunk;
use eventlog::log::{ReadFrom, StreamLog};
use eventlog::results::ResultFilter;
use eventlog::{AudioEncoding, AudioFormat, Envelope, Event, SessionId, now_ms};
use orchestrator::api::worker_manager_server::{WorkerManager, WorkerManagerServer};
use orchestrator::api::*;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

/// tiny.en's int8 output on espeak-ng speech depends a little on the CPU's kernels,
/// and short sentences suffer most: on an AVX-512 VNNI machine "there is a fire in the
/// kitchen" alone comes back as "and every life I will be in the kitchen". The longer
/// sentence gives the model the context it needs there.
const SENTENCES: &[&str] = &[
    "there is a fire in the kitchen and the smoke is getting thicker",
    "please send an ambulance to the main street",
    "the children are safe at home now",
];

/// Hands the registration stream's sender to the test; records releases.
#[derive(Clone)]
struct FakeOrchestrator {
    registrations: mpsc::Sender<(
        RegisterWorkerRequest,
        mpsc::Sender<Result<WorkerCommand, Status>>,
    )>,
    releases: mpsc::Sender<ReleaseWorkerRequest>,
    heartbeats: Arc<Mutex<Vec<SendHeartbeatRequest>>>,
}

type Commands = Pin<Box<dyn futures::Stream<Item = Result<WorkerCommand, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerManager for FakeOrchestrator {
    type RegisterWorkerStream = Commands;

    async fn allocate_worker(
        &self,
        _: Request<AllocateWorkerRequest>,
    ) -> Result<Response<AllocateWorkerResponse>, Status> {
        Err(Status::unimplemented("not used by workers"))
    }

    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<Commands>, Status> {
        let (tx, rx) = mpsc::channel(8);
        self.registrations
            .send((request.into_inner(), tx))
            .await
            .unwrap();
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn send_heartbeat(
        &self,
        request: Request<SendHeartbeatRequest>,
    ) -> Result<Response<SendHeartbeatResponse>, Status> {
        self.heartbeats.lock().unwrap().push(request.into_inner());
        Ok(Response::new(SendHeartbeatResponse { known: true }))
    }

    async fn release_worker(
        &self,
        request: Request<ReleaseWorkerRequest>,
    ) -> Result<Response<ReleaseWorkerResponse>, Status> {
        self.releases.send(request.into_inner()).await.unwrap();
        Ok(Response::new(ReleaseWorkerResponse { released: true }))
    }

    async fn drain_worker(
        &self,
        _: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: recognizer::RecognizerArgs,
}

fn envelope(session: SessionId, event: Event) -> Envelope {
    Envelope {
        session: Some(session),
        at_ms: now_ms(),
        producer: "test-ingest".into(),
        event,
    }
}

fn assign(session: SessionId, epoch: u64, opened_at_ms: u64) -> WorkerCommand {
    WorkerCommand {
        command: Some(worker_command::Command::Assign(Assign {
            session_id: session.to_string(),
            model_name: "whisper-tiny.en".into(),
            tenant: "test".into(),
            epoch,
            opened_at_ms,
            sample_rate: 16_000,
            encoding: "pcm_s16le".into(),
        })),
    }
}

/// The session's result events, read until TranscriptCompleted of `epoch`.
async fn results_until_completed(
    log: &StreamLog,
    stream: &str,
    session: SessionId,
    epoch: u64,
) -> Vec<Event> {
    let mut reader = log
        .reader(stream, ReadFrom::Start, Some(session))
        .await
        .unwrap();
    let mut events = Vec::new();
    loop {
        let record = tokio::time::timeout(Duration::from_secs(30), reader.next())
            .await
            .expect("results arrive")
            .expect("reader open")
            .expect("decodes");
        let done = matches!(record.envelope.event, Event::TranscriptCompleted { epoch: e, .. } if e == epoch);
        events.push(record.envelope.event);
        if done {
            break;
        }
    }
    reader.close().await;
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_decodes_an_assigned_session_and_a_second_epoch_resumes_from_its_checkpoint() {
    observability::init_tracing();
    let namespace = format!("t-{}", uuid::Uuid::new_v4());
    let args = Cli::try_parse_from([
        "recognizer",
        "--namespace",
        &namespace,
        "--partitions",
        "2",
        "--heartbeat-interval-ms",
        "100",
    ])
    .unwrap()
    .args;

    // The fake orchestrator.
    let (registrations_tx, mut registrations) = mpsc::channel(4);
    let (releases_tx, mut releases) = mpsc::channel(4);
    let fake = FakeOrchestrator {
        registrations: registrations_tx,
        releases: releases_tx,
        heartbeats: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    testkit::announce_fake_leader(
        &args.shared.redis_url,
        &namespace,
        &format!("http://{}", listener.local_addr().unwrap()),
    )
    .await;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerManagerServer::new(fake.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // The session's audio, appended the way ingest does.
    let layout = args.shared.layout();
    let log = StreamLog::connect(&args.shared.log_config()).await.unwrap();
    log.ensure_streams(&layout.all_streams()).await.unwrap();
    let session = SessionId::new_v4();
    let audio = conversation(SENTENCES, 1.0);
    let bytes = to_s16le(&audio);
    let ingest = log
        .appender(&layout.audio_stream(session), "test-ingest", true, 8 * 1024)
        .await
        .unwrap();
    let opened_at_ms = now_ms();
    let format = AudioFormat {
        sample_rate: 16_000,
        encoding: AudioEncoding::PcmS16le,
    };
    let mut last_seq = None;
    let mut pending = vec![
        ingest
            .append(&envelope(
                session,
                Event::SessionOpened {
                    tenant: "test".into(),
                    model: "whisper-tiny.en".into(),
                    format,
                },
            ))
            .await
            .unwrap(),
    ];
    for (seq, chunk) in bytes.chunks(3200).enumerate() {
        let event = Event::AudioChunk(AudioChunk {
            seq: seq as u64,
            bytes: Bytes::copy_from_slice(chunk),
        });
        pending.push(ingest.append(&envelope(session, event)).await.unwrap());
        last_seq = Some(seq as u64);
    }
    pending.push(
        ingest
            .append(&envelope(session, Event::EndOfStream { last_seq }))
            .await
            .unwrap(),
    );
    for p in pending {
        p.confirmed().await.unwrap();
    }

    // The worker.
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(recognizer::run(args.clone(), async {
        stopped.await.ok();
    }));
    let (registration, commands) =
        tokio::time::timeout(Duration::from_secs(60), registrations.recv())
            .await
            .expect("the worker registers")
            .unwrap();
    assert_eq!(registration.worker_id, args.worker_id);
    assert_eq!(registration.capacity, 1);
    assert!(!registration.metrics_addr.is_empty());

    // Epoch 1: straight through.
    commands
        .send(Ok(assign(session, 1, opened_at_ms)))
        .await
        .unwrap();
    // Watch the checkpoints go by, to rewind to the first one later.
    let redis = args.shared.redis().await.unwrap();
    let checkpoints = CheckpointStore::new(redis.clone(), namespace.clone());
    let mut seen = Vec::new();
    let released = loop {
        if let Some(c) = checkpoints.load(session).await.unwrap()
            && seen.last() != Some(&c)
        {
            seen.push(c);
        }
        match tokio::time::timeout(Duration::from_millis(5), releases.recv()).await {
            Ok(released) => break released.unwrap(),
            Err(_) => assert!(seen.len() < 1000, "the worker finishes the session"),
        }
    };
    assert_eq!(
        (released.session_id.clone(), released.epoch),
        (session.to_string(), 1)
    );

    let results_stream = layout.results_stream(session);
    let first = results_until_completed(&log, &results_stream, session, 1).await;
    assert!(
        matches!(&first[0], Event::EpochStarted { epoch: 1, worker } if *worker == args.worker_id),
        "EpochStarted comes first: {:?}",
        first[0]
    );
    let mut filter = ResultFilter::new();
    for event in &first {
        filter.accept(event);
    }
    let transcript = filter.transcript();
    let wer = wer(&SENTENCES.join(" "), &transcript);
    println!("epoch 1 transcript (WER {wer:.3}): {transcript}");
    assert!(wer <= 0.35, "{transcript}");
    assert_eq!(filter.finals().len(), SENTENCES.len());
    assert_eq!(filter.completed(), Some(SENTENCES.len() as u32));

    println!("checkpoints of epoch 1: {seen:?}");
    assert_eq!(seen.len(), SENTENCES.len(), "one checkpoint per final");
    // Rewind to the first: as if the worker had died after appending the later finals
    // but before checkpointing them. The replacement decodes them again.
    let checkpoint = seen[0];
    assert_eq!(checkpoint.epoch, 1);
    assert_eq!(checkpoint.point.next_segment, 1);
    assert!(checkpoints.save(session, &checkpoint).await.unwrap());

    // Epoch 2: what a replacement does after a failover, from the checkpoint.
    commands
        .send(Ok(assign(session, 2, opened_at_ms)))
        .await
        .unwrap();
    let released = tokio::time::timeout(Duration::from_secs(120), releases.recv())
        .await
        .expect("the replacement finishes the session")
        .unwrap();
    assert_eq!(released.epoch, 2);
    let all = results_until_completed(&log, &results_stream, session, 2).await;
    let second: Vec<&Event> = all.iter().skip(first.len()).collect();
    assert!(matches!(second[0], Event::EpochStarted { epoch: 2, .. }));
    let resumed_segments: Vec<u32> = second
        .iter()
        .filter_map(|e| match e {
            Event::Final { segment, .. } => Some(*segment),
            _ => None,
        })
        .collect();
    let expected: Vec<u32> = (checkpoint.point.next_segment..SENTENCES.len() as u32).collect();
    assert_eq!(
        resumed_segments, expected,
        "only the finals after the checkpoint"
    );
    // Same finals (text and timings) as epoch 1 had for those segments.
    for event in &second {
        if let Event::Final {
            segment,
            text,
            start_ms,
            end_ms,
            ..
        } = event
        {
            let before = &filter.finals()[segment];
            assert_eq!(
                (&before.text, before.start_ms, before.end_ms),
                (text, *start_ms, *end_ms)
            );
        }
    }
    let mut after = ResultFilter::new();
    for event in &all {
        after.accept(event);
    }
    assert_eq!(after.epoch(), Some(2));
    assert_eq!(after.completed(), Some(SENTENCES.len() as u32));
    // The transcript that counts after the "failover" equals the straight one (the
    // filter keeps the first final per segment; epoch 2's re-decisions are equal anyway).
    assert_eq!(after.finals(), filter.finals());

    assert!(
        fake.heartbeats
            .lock()
            .unwrap()
            .iter()
            .any(|h| !h.sessions.is_empty()),
        "heartbeats carried the session's progress"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker stops")
        .unwrap()
        .unwrap();
    server.abort();
    checkpoints.clear(session).await.unwrap();
    log.delete_streams(&layout.all_streams()).await;
}
