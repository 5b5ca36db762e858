//! The gateway against a real RabbitMQ: acknowledgements only for chunks that are in
//! the stream, only accepted results reach the client, and every refusal carries its
//! documented error and close code while other sessions on the node keep working.
//!
//! The orchestrator is a tiny in-test tonic server answering AllocateWorker, and the
//! test itself plays the recognizer by appending result events. That is enough here:
//! these tests are about ingest's side of the pipeline, not about allocation or
//! decoding (those have their own tests).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use eventlog::log::{Appender, ReadFrom, StreamLog};
use eventlog::streams::StreamLayout;
use eventlog::{Envelope, Event, SessionId};
use futures::{SinkExt, StreamExt};
use ingest::IngestArgs;
use orchestrator::api::worker_manager_server::{WorkerManager, WorkerManagerServer};
use orchestrator::api::{
    AllocateWorkerRequest, AllocateWorkerResponse, DrainWorkerRequest, DrainWorkerResponse, Queued,
    RegisterWorkerRequest, ReleaseWorkerRequest, ReleaseWorkerResponse, SendHeartbeatRequest,
    SendHeartbeatResponse, WorkerCommand, allocate_worker_response::Outcome,
};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tonic::{Request, Response, Status};
use uuid::Uuid;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const MODEL: &str = "whisper-tiny.en";
const MAX_FRAME_BYTES: usize = 4096;
const WAIT: Duration = Duration::from_secs(15);
const MAX_SESSIONS_PER_TENANT: usize = 3;
/// The fake orchestrator queues every session: this many may wait on the node.
const MAX_WAITING_SESSIONS: usize = 4;

/// Answers every AllocateWorker with "queued, position 1" and remembers the requests.
#[derive(Clone, Default)]
struct FakeOrchestrator {
    requests: Arc<Mutex<Vec<AllocateWorkerRequest>>>,
}

#[tonic::async_trait]
impl WorkerManager for FakeOrchestrator {
    async fn allocate_worker(
        &self,
        request: Request<AllocateWorkerRequest>,
    ) -> Result<Response<AllocateWorkerResponse>, Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(Response::new(AllocateWorkerResponse {
            outcome: Some(Outcome::Queued(Queued {
                position: 1,
                reason: "no idle worker".into(),
            })),
        }))
    }

    type RegisterWorkerStream = futures::stream::BoxStream<'static, Result<WorkerCommand, Status>>;

    async fn register_worker(
        &self,
        _: Request<RegisterWorkerRequest>,
    ) -> Result<Response<Self::RegisterWorkerStream>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn send_heartbeat(
        &self,
        _: Request<SendHeartbeatRequest>,
    ) -> Result<Response<SendHeartbeatResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn release_worker(
        &self,
        _: Request<ReleaseWorkerRequest>,
    ) -> Result<Response<ReleaseWorkerResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
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
    ingest: IngestArgs,
}

/// An ingest node on an ephemeral port with its own namespace, streams and fake
/// orchestrator.
struct Harness {
    addr: SocketAddr,
    log: StreamLog,
    layout: StreamLayout,
    orchestrator: FakeOrchestrator,
    stop: Option<oneshot::Sender<()>>,
    node: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start() -> Self {
        let orchestrator = FakeOrchestrator::default();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(WorkerManagerServer::new(orchestrator.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
        );

        let namespace = format!("t-{}", Uuid::new_v4());
        let args = Cli::parse_from([
            "ingest",
            "--namespace",
            &namespace,
            "--partitions",
            "2",
            "--max-frame-bytes",
            &MAX_FRAME_BYTES.to_string(),
            "--ping-interval-secs",
            "1",
            "--api-keys",
            &format!("north={NORTH_KEY},south={SOUTH_KEY}"),
            "--max-sessions-per-tenant",
            &MAX_SESSIONS_PER_TENANT.to_string(),
            "--max-waiting-sessions",
            &MAX_WAITING_SESSIONS.to_string(),
        ])
        .ingest;
        testkit::announce_fake_leader(
            &args.shared.redis_url,
            &namespace,
            &format!("http://{grpc_addr}"),
        )
        .await;
        let layout = args.shared.layout();
        let log = StreamLog::connect(&args.shared.log_config()).await.unwrap();
        log.ensure_streams(&layout.all_streams()).await.unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let node = tokio::spawn(async move {
            ingest::serve(listener, args, async {
                let _ = stopped.await;
            })
            .await
            .expect("ingest serves");
        });
        Self {
            addr,
            log,
            layout,
            orchestrator,
            stop: Some(stop),
            node,
        }
    }

    async fn connect(&self) -> Ws {
        self.connect_with(None).await
    }

    /// Connects, with `Authorization: Bearer {key}` on the upgrade request if given.
    async fn connect_with(&self, bearer: Option<&str>) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://{}/v1/stream", self.addr);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut request = url.as_str().into_client_request().unwrap();
            if let Some(key) = bearer {
                request
                    .headers_mut()
                    .insert("authorization", format!("Bearer {key}").parse().unwrap());
            }
            match connect_async(request).await {
                Ok((ws, _)) => return ws,
                Err(e) if tokio::time::Instant::now() > deadline => panic!("connect: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Connects and opens a session; returns its id.
    async fn open(&self) -> (Ws, SessionId) {
        let (ws, id, _) = self.open_resumable().await;
        (ws, id)
    }

    /// Connects and opens a session; returns its id and resume token.
    async fn open_resumable(&self) -> (Ws, SessionId, String) {
        let mut ws = self.connect().await;
        send(&mut ws, open_message(MODEL, 16000, "pcm_s16le")).await;
        let opened = next_json(&mut ws).await;
        assert_eq!(opened["type"], "opened", "{opened}");
        assert_eq!(opened["limits"]["max_frame_bytes"], MAX_FRAME_BYTES);
        let id = Uuid::parse_str(opened["session_id"].as_str().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 4);
        let queued = next_json(&mut ws).await;
        assert_eq!(queued, json!({"type": "queued", "position": 1}));
        let token = opened["resume_token"]
            .as_str()
            .expect("a resume token")
            .to_string();
        (ws, id, token)
    }

    /// A plain HTTP/1.1 GET; the whole response as text.
    async fn http_get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(self.addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: ingest\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        response
    }

    /// A producer playing the recognizer on the session's results partition.
    async fn recognizer(&self, session: SessionId) -> Appender {
        self.log
            .appender(
                &self.layout.results_stream(session),
                &format!("test-recognizer-{session}"),
                true,
                4096,
            )
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.node)
            .await
            .expect("ingest stops")
            .unwrap();
        self.log.delete_streams(&self.layout.all_streams()).await;
    }
}

/// The keys of the harness's two tenants.
const NORTH_KEY: &str = "north-key-0123456789";
const SOUTH_KEY: &str = "south-key-0123456789";

/// `open` as tenant north.
fn open_message(model: &str, rate: u32, encoding: &str) -> Value {
    json!({"type": "open", "model": model, "sample_rate": rate, "encoding": encoding, "api_key": NORTH_KEY})
}

/// A valid `open` presenting `key`, or no key at all.
fn open_as(key: Option<&str>) -> Value {
    let mut open = open_message(MODEL, 16000, "pcm_s16le");
    match key {
        Some(key) => open["api_key"] = key.into(),
        None => {
            open.as_object_mut().unwrap().remove("api_key");
        }
    }
    open
}

fn audio(seq: u64, samples: usize) -> Vec<u8> {
    let mut frame = seq.to_le_bytes().to_vec();
    frame
        .extend((0..samples).flat_map(|i| ((i as i16).wrapping_mul(7) ^ seq as i16).to_le_bytes()));
    frame
}

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

async fn send_audio(ws: &mut Ws, frame: Vec<u8>) {
    ws.send(Message::Binary(frame.into())).await.unwrap();
}

/// The next text frame as JSON (pings are answered by tungstenite on the way).
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the connection is open")
            .expect("a frame");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The close frame's code, skipping pings.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a close in time")
            .expect("a close frame before the end")
            .expect("a frame");
        match message {
            Message::Close(Some(frame)) => return frame.code.into(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Reads until an `error`, checks its code, then the close code.
async fn expect_refusal(ws: &mut Ws, code: &str, close: u16) {
    loop {
        let message = next_json(ws).await;
        if message["type"] == "error" {
            assert_eq!(message["code"], code, "{message}");
            assert!(message["message"].as_str().is_some_and(|m| !m.is_empty()));
            break;
        }
    }
    assert_eq!(close_code(ws).await, close, "close code for {code}");
}

async fn append(recognizer: &Appender, session: SessionId, event: Event) {
    let envelope = Envelope {
        session: Some(session),
        at_ms: eventlog::now_ms(),
        producer: "test-recognizer".into(),
        event,
    };
    recognizer.append_confirmed(&envelope).await.unwrap();
}

fn final_event(epoch: u64, segment: u32, text: &str) -> Event {
    Event::Final {
        epoch,
        segment,
        text: text.into(),
        start_ms: u64::from(segment) * 1000,
        end_ms: u64::from(segment) * 1000 + 900,
    }
}

/// The session's events on its audio partition, read until `until` matches one.
async fn read_audio(
    h: &Harness,
    session: SessionId,
    until: impl Fn(&Event) -> bool,
) -> Vec<Envelope> {
    let stream = h.layout.audio_stream(session);
    let mut reader = h
        .log
        .reader(&stream, ReadFrom::Start, Some(session))
        .await
        .unwrap();
    let mut events = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(record) = reader.next().await {
            let envelope = record.unwrap().envelope;
            let done = until(&envelope.event);
            events.push(envelope);
            if done {
                break;
            }
        }
    })
    .await
    .expect("the session's events are in the stream");
    reader.close().await;
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_gets_acks_for_stored_chunks_and_only_accepted_results() {
    let h = Harness::start().await;
    let (mut ws, session) = h.open().await;

    let allocations = h.orchestrator.requests.lock().unwrap().clone();
    assert_eq!(allocations.len(), 1);
    let request = &allocations[0];
    assert_eq!(request.session_id, session.to_string());
    assert_eq!(request.model_name, MODEL);
    assert_eq!(request.tenant, "north", "the key's tenant");
    assert_eq!(request.sample_rate, 16000);
    assert_eq!(request.encoding, "pcm_s16le");

    let frames: Vec<Vec<u8>> = (0..5).map(|seq| audio(seq, 320)).collect();
    for frame in &frames {
        send_audio(&mut ws, frame.clone()).await;
    }
    for seq in 0..5u64 {
        assert_eq!(next_json(&mut ws).await, json!({"type": "ack", "seq": seq}));
    }

    // Every acknowledged chunk is in the stream, exactly once, with the client's bytes.
    let stored = read_audio(
        &h,
        session,
        |e| matches!(e, Event::AudioChunk(c) if c.seq == 4),
    )
    .await;
    match &stored[0].event {
        Event::SessionOpened {
            tenant,
            model,
            format,
        } => {
            assert_eq!((tenant.as_str(), model.as_str()), ("north", MODEL));
            assert_eq!(format.sample_rate, 16000);
            assert_eq!(stored[0].at_ms, request.opened_at_ms);
        }
        other => panic!("the session starts with SessionOpened, not {other:?}"),
    }
    let chunks: Vec<_> = stored
        .iter()
        .filter_map(|e| match &e.event {
            Event::AudioChunk(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    for chunk in &chunks {
        assert_eq!(&chunk.bytes[..], &frames[chunk.seq as usize][8..]);
    }

    let recognizer = h.recognizer(session).await;
    append(
        &recognizer,
        session,
        Event::EpochStarted {
            epoch: 1,
            worker: "w1".into(),
        },
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "started", "result": 0})
    );
    let partial = Event::Partial {
        epoch: 1,
        segment: 0,
        text: "hel".into(),
        start_ms: 0,
        end_ms: 500,
    };
    append(&recognizer, session, partial).await;
    append(&recognizer, session, final_event(1, 0, "hello")).await;
    append(&recognizer, session, final_event(1, 0, "hello again")).await; // duplicate
    append(
        &recognizer,
        session,
        Event::EpochStarted {
            epoch: 2,
            worker: "w2".into(),
        },
    )
    .await;
    append(&recognizer, session, final_event(1, 1, "zombie")).await; // stale epoch
    append(&recognizer, session, final_event(2, 1, "world")).await;

    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "partial", "result": 1, "segment": 0, "text": "hel", "start_ms": 0, "end_ms": 500})
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "final", "result": 2, "segment": 0, "text": "hello", "start_ms": 0, "end_ms": 900})
    );
    // Neither the duplicate nor the zombie's final comes between these two; the
    // second epoch's start counts as a result (3) the client is not sent.
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "final", "result": 4, "segment": 1, "text": "world", "start_ms": 1000, "end_ms": 1900})
    );

    send(&mut ws, json!({"type": "end"})).await;
    let stored = read_audio(&h, session, |e| matches!(e, Event::EndOfStream { .. })).await;
    assert!(matches!(
        stored.last().unwrap().event,
        Event::EndOfStream { last_seq: Some(4) }
    ));
    append(
        &recognizer,
        session,
        Event::TranscriptCompleted {
            epoch: 1,
            segments: 2,
        },
    )
    .await; // stale
    append(
        &recognizer,
        session,
        Event::TranscriptCompleted {
            epoch: 2,
            segments: 2,
        },
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "completed", "result": 5, "segments": 2, "transcript": "hello world"})
    );
    assert_eq!(close_code(&mut ws).await, 1000);
    recognizer.close().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_documented_codes_while_others_keep_working() {
    let h = Harness::start().await;
    let (mut healthy, _) = h.open().await;
    send_audio(&mut healthy, audio(0, 160)).await;
    assert_eq!(
        next_json(&mut healthy).await,
        json!({"type": "ack", "seq": 0})
    );

    let mut ws = h.connect().await;
    ws.send(Message::Text("this is not json".into()))
        .await
        .unwrap();
    expect_refusal(&mut ws, "invalid_json", 4000).await;

    let mut ws = h.connect().await;
    send(&mut ws, json!({"type": "pause"})).await;
    expect_refusal(&mut ws, "unknown_message_type", 4001).await;

    let mut ws = h.connect().await;
    send(&mut ws, json!({"type": "resume", "session_id": "x"})).await;
    expect_refusal(&mut ws, "invalid_message", 4002).await;

    let mut ws = h.connect().await;
    send(&mut ws, open_message("whisper-huge", 16000, "pcm_s16le")).await;
    expect_refusal(&mut ws, "unknown_model", 4004).await;

    // Keys: none, a wrong one, one a character short; in `open` or on the upgrade.
    for (bearer, key) in [
        (None, None),
        (None, Some("north-key-012345678X")),
        (None, Some(&NORTH_KEY[1..])),
        (Some("south-key-0123456780"), None),
    ] {
        let mut ws = h.connect_with(bearer).await;
        send(&mut ws, open_as(key)).await;
        expect_refusal(&mut ws, "unauthorized", 4017).await;
    }
    // The bearer header alone opens a session, as its tenant.
    let mut ws = h.connect_with(Some(SOUTH_KEY)).await;
    send(&mut ws, open_as(None)).await;
    assert_eq!(next_json(&mut ws).await["type"], "opened");
    let requests = h.orchestrator.requests.lock().unwrap().clone();
    assert_eq!(requests.last().map(|r| r.tenant.as_str()), Some("south"));

    let mut ws = h.connect().await;
    send(&mut ws, open_message(MODEL, 44100, "pcm_s16le")).await;
    expect_refusal(&mut ws, "unsupported_sample_rate", 4005).await;

    let mut ws = h.connect().await;
    send(&mut ws, open_message(MODEL, 16000, "mulaw")).await;
    expect_refusal(&mut ws, "unsupported_encoding", 4006).await;

    let mut ws = h.connect().await;
    send_audio(&mut ws, audio(0, 160)).await;
    expect_refusal(&mut ws, "not_open", 4007).await;

    let (mut ws, _) = h.open().await;
    send_audio(&mut ws, audio(0, MAX_FRAME_BYTES)).await;
    expect_refusal(&mut ws, "frame_too_large", 1009).await;

    let (mut ws, _) = h.open().await;
    send_audio(&mut ws, audio(1, 160)).await;
    expect_refusal(&mut ws, "bad_sequence", 4009).await;

    let (mut ws, _) = h.open().await;
    send(&mut ws, json!({"type": "end"})).await;
    send_audio(&mut ws, audio(0, 160)).await;
    expect_refusal(&mut ws, "already_ended", 4008).await;

    // The first session never noticed.
    send_audio(&mut healthy, audio(1, 160)).await;
    assert_eq!(
        next_json(&mut healthy).await,
        json!({"type": "ack", "seq": 1})
    );
    healthy.close(None).await.unwrap();

    // The operator endpoints share the listener.
    let ready = h.http_get("/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = h.http_get("/metrics").await;
    for name in ["ingest_chunks_appended_total", "ingest_errors_total"] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(metrics.contains(r#"code="bad_sequence""#));

    h.stop().await;
}

/// A client that stops reading while its results keep coming: the node keeps at most
/// its bounded queue for it (partials may be dropped, a final may not), ends the
/// session with `client_too_slow`, and serves its other sessions all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_cut_off_while_others_are_served() {
    let h = Harness::start().await;
    let (mut slow, session) = h.open().await;
    let (mut healthy, _) = h.open().await;
    let recognizer = h
        .log
        .appender(
            &h.layout.results_stream(session),
            &format!("test-recognizer-slow-{session}"),
            true,
            16 * 1024,
        )
        .await
        .unwrap();
    let envelope = |event| Envelope {
        session: Some(session),
        at_ms: eventlog::now_ms(),
        producer: "test-recognizer".into(),
        event,
    };
    recognizer
        .append_confirmed(&envelope(Event::EpochStarted {
            epoch: 1,
            worker: "w".into(),
        }))
        .await
        .unwrap();
    // Finals of 3 KB, 500 at a time, until the node gives up on the reader: the
    // socket's buffers fill first, then the queue.
    let text = "word ".repeat(600);
    let too_slow = r#"ingest_errors_total{code="client_too_slow"} 1"#;
    let mut appended = 0u32;
    while !h.http_get("/metrics").await.contains(too_slow) {
        assert!(
            appended < 40_000,
            "{appended} finals of 3 KB and the node still queues for a client that does not read"
        );
        let mut pending = Vec::new();
        for _ in 0..500 {
            let event = final_event(1, appended, &text);
            pending.push(recognizer.append(&envelope(event)).await.unwrap());
            appended += 1;
        }
        for p in pending {
            p.confirmed().await.unwrap();
        }
    }
    // The other session on the node is served meanwhile.
    send_audio(&mut healthy, audio(0, 160)).await;
    assert_eq!(
        next_json(&mut healthy).await,
        json!({"type": "ack", "seq": 0})
    );
    // The slow client reads at last: what was queued, then the error and the close.
    let mut received = 0u32;
    loop {
        let message = next_json(&mut slow).await;
        match message["type"].as_str() {
            Some("final") => received += 1,
            Some("error") => {
                assert_eq!(message["code"], "client_too_slow", "{message}");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(close_code(&mut slow).await, 4013);
    println!("the slow client got {received} of {appended} finals before it was cut off");
    assert!(received < appended, "it was cut off before the end");
    recognizer.close().await;
    h.stop().await;
}

/// A tenant at its limit of sessions on the node is refused with a retry hint; other
/// tenants are not held back, and a closed session frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_session_limit_is_refused_with_a_retry_hint() {
    let h = Harness::start().await;
    let mut north = Vec::new();
    for _ in 0..MAX_SESSIONS_PER_TENANT {
        north.push(h.open().await.0);
    }
    let mut ws = h.connect().await;
    send(&mut ws, open_message(MODEL, 16000, "pcm_s16le")).await;
    let refusal = next_json(&mut ws).await;
    assert_eq!(refusal["code"], "tenant_session_limit", "{refusal}");
    assert_eq!(refusal["retry_after_secs"], 5, "{refusal}");
    assert!(
        !refusal.to_string().contains(NORTH_KEY),
        "no key in the refusal: {refusal}"
    );
    assert_eq!(close_code(&mut ws).await, 4018);

    // Another tenant opens.
    let mut ws = h.connect_with(Some(SOUTH_KEY)).await;
    send(&mut ws, open_as(None)).await;
    assert_eq!(next_json(&mut ws).await["type"], "opened");

    // One north session goes away: its place comes back.
    drop(north.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut ws = h.connect().await;
        send(&mut ws, open_message(MODEL, 16000, "pcm_s16le")).await;
        let answer = next_json(&mut ws).await;
        if answer["type"] == "opened" {
            break;
        }
        assert_eq!(answer["code"], "tenant_session_limit", "{answer}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed session's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}

/// The node follows each results partition once for all its sessions: sessions sharing
/// a partition each get their own results and nothing of the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_sharing_a_results_partition_get_only_their_own_results() {
    let h = Harness::start().await;
    // Three sessions on two partitions: two of them share one.
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(h.open().await);
    }
    let (a, b) = (0..3)
        .flat_map(|i| (i + 1..3).map(move |j| (i, j)))
        .find(|&(i, j)| {
            h.layout.partition_of(sessions[i].1) == h.layout.partition_of(sessions[j].1)
        })
        .expect("two of three sessions share one of two partitions");
    // Different segment indices, one epoch: a result handed to the wrong session would
    // pass its filter and show in its transcript.
    for (i, segment, word) in [(a, 0, "alpha"), (b, 1, "bravo")] {
        let session = sessions[i].1;
        send(&mut sessions[i].0, json!({"type": "end"})).await;
        let recognizer = h.recognizer(session).await;
        let started = Event::EpochStarted {
            epoch: 1,
            worker: "w".into(),
        };
        append(&recognizer, session, started).await;
        append(&recognizer, session, final_event(1, segment, word)).await;
        let completed = Event::TranscriptCompleted {
            epoch: 1,
            segments: segment + 1,
        };
        append(&recognizer, session, completed).await;
        recognizer.close().await;
    }
    for (i, word) in [(a, "alpha"), (b, "bravo")] {
        let ws = &mut sessions[i].0;
        let completed = loop {
            let message = next_json(ws).await;
            if message["type"] == "completed" {
                break message;
            }
        };
        assert_eq!(completed["transcript"], word, "session {i}: {completed}");
    }
    h.stop().await;
}

/// Past `--max-waiting-sessions` sessions waiting for a worker, the node refuses the
/// next one the orchestrator queues, with a retry hint, rather than letting the line
/// grow; a place comes back when a waiting session goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_the_waiting_limit_are_refused_with_a_retry_hint() {
    let h = Harness::start().await;
    let mut waiting = Vec::new();
    for key in [NORTH_KEY, NORTH_KEY, SOUTH_KEY, SOUTH_KEY] {
        let mut ws = h.connect().await;
        send(&mut ws, open_as(Some(key))).await;
        assert_eq!(next_json(&mut ws).await["type"], "opened");
        assert_eq!(next_json(&mut ws).await["type"], "queued");
        waiting.push(ws);
    }
    let mut ws = h.connect().await;
    send(&mut ws, open_as(Some(NORTH_KEY))).await;
    let refusal = loop {
        let message = next_json(&mut ws).await;
        if message["type"] == "error" {
            break message;
        }
    };
    assert_eq!(refusal["code"], "too_many_waiting", "{refusal}");
    assert_eq!(refusal["retry_after_secs"], 5, "{refusal}");
    assert_eq!(close_code(&mut ws).await, 4019);

    drop(waiting.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut ws = h.connect().await;
        send(&mut ws, open_as(Some(NORTH_KEY))).await;
        assert_eq!(next_json(&mut ws).await["type"], "opened");
        let answer = next_json(&mut ws).await;
        if answer["type"] == "queued" {
            break;
        }
        assert_eq!(answer["code"], "too_many_waiting", "{answer}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place of the session that went never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}

fn resume_message(session: SessionId, token: &str, last_result: Option<u64>, key: &str) -> Value {
    let mut resume = json!({
        "type": "resume", "session_id": session, "resume_token": token, "api_key": key
    });
    if let Some(last) = last_result {
        resume["last_result"] = last.into();
    }
    resume
}

/// Sends `resume` on a new connection and expects `resumed`.
async fn resume(h: &Harness, session: SessionId, token: &str, last: Option<u64>) -> (Ws, Value) {
    let mut ws = h.connect().await;
    send(&mut ws, resume_message(session, token, last, NORTH_KEY)).await;
    let resumed = next_json(&mut ws).await;
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    assert_eq!(resumed["session_id"], session.to_string());
    (ws, resumed)
}

/// A connection that drops mid-session: the client resumes on a new one, gets
/// exactly the results it missed and where to continue its audio; a frame it sends
/// again is acknowledged again and not stored twice; the log holds every chunk once.
/// Resuming the finished session gives what the client had not received, then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_resumes_with_exactly_what_was_missed() {
    let h = Harness::start().await;
    let (mut ws, session, token) = h.open_resumable().await;
    let recognizer = h.recognizer(session).await;
    for seq in 0..7 {
        send_audio(&mut ws, audio(seq, 160)).await;
        assert_eq!(next_json(&mut ws).await, json!({"type": "ack", "seq": seq}));
    }
    let started = Event::EpochStarted {
        epoch: 1,
        worker: "w1".into(),
    };
    append(&recognizer, session, started).await;
    append(&recognizer, session, final_event(1, 0, "hello")).await;
    assert_eq!(next_json(&mut ws).await["result"], 0);
    assert_eq!(next_json(&mut ws).await["result"], 1);
    // The connection drops without a close; a result comes while the client is away.
    drop(ws);
    append(&recognizer, session, final_event(1, 1, "world")).await;

    let (mut ws, resumed) = resume(&h, session, &token, Some(1)).await;
    assert_eq!(resumed["next_seq"], 7, "{resumed}");
    assert_eq!(resumed["ended"], false);
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "final", "result": 2, "segment": 1, "text": "world", "start_ms": 1000, "end_ms": 1900}),
        "only the result the client missed"
    );
    // Frame 6 again (as if its ack had been lost), then the next one.
    send_audio(&mut ws, audio(6, 160)).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "ack", "seq": 6}));
    send_audio(&mut ws, audio(7, 160)).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "ack", "seq": 7}));
    send(&mut ws, json!({"type": "end"})).await;

    let stored = read_audio(&h, session, |e| matches!(e, Event::EndOfStream { .. })).await;
    let seqs: Vec<u64> = stored
        .iter()
        .filter_map(|e| match &e.event {
            Event::AudioChunk(c) => Some(c.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, (0..8).collect::<Vec<_>>(), "every chunk once");
    let marker = stored
        .iter()
        .position(|e| matches!(e.event, Event::SessionResumed { .. }))
        .expect("the resume is in the log");
    let Event::SessionResumed { writer } = &stored[marker].event else {
        unreachable!()
    };
    assert_eq!(
        &stored.last().unwrap().producer,
        writer,
        "the new connection writes on"
    );
    assert_ne!(&stored[0].producer, writer);
    assert!(
        !stored
            .iter()
            .any(|e| matches!(e.event, Event::SessionClosed { .. })),
        "a drop does not close the session"
    );

    let completed = Event::TranscriptCompleted {
        epoch: 1,
        segments: 2,
    };
    append(&recognizer, session, completed).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "completed", "result": 3, "segments": 2, "transcript": "hello world"})
    );
    assert_eq!(close_code(&mut ws).await, 1000);

    // The finished session resumes too: the rest of its results, then a normal close.
    let (mut ws, resumed) = resume(&h, session, &token, Some(2)).await;
    assert_eq!(resumed["ended"], true);
    assert_eq!(resumed["next_seq"], 8);
    assert_eq!(next_json(&mut ws).await["type"], "completed");
    assert_eq!(close_code(&mut ws).await, 1000);
    let (mut ws, _) = resume(&h, session, &token, Some(3)).await;
    assert_eq!(close_code(&mut ws).await, 1000, "nothing left to send");

    recognizer.close().await;
    h.stop().await;
}

/// Resume is refused, with one message that tells nothing, to another tenant's key
/// with a valid token, to a guessed session id and to an altered token; a valid resume
/// while the first connection is still up takes the session from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_is_refused_across_tenants_and_takes_over_from_a_live_connection() {
    let h = Harness::start().await;
    let (mut first, session, token) = h.open_resumable().await;
    send_audio(&mut first, audio(0, 160)).await;
    assert_eq!(
        next_json(&mut first).await,
        json!({"type": "ack", "seq": 0})
    );

    let mut messages = Vec::new();
    let forged = format!("{}A", token);
    for (id, token, key) in [
        (session, token.as_str(), SOUTH_KEY),
        (Uuid::new_v4(), token.as_str(), NORTH_KEY),
        (session, forged.as_str(), NORTH_KEY),
    ] {
        let mut ws = h.connect().await;
        send(&mut ws, resume_message(id, token, None, key)).await;
        let refusal = next_json(&mut ws).await;
        assert_eq!(refusal["code"], "invalid_resume", "{refusal}");
        assert_eq!(close_code(&mut ws).await, 4020);
        let text = refusal.to_string();
        assert!(
            !text.contains(&session.to_string()) && !text.contains("north"),
            "{text}"
        );
        messages.push(refusal);
    }
    assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
    let mut ws = h.connect().await;
    send(
        &mut ws,
        resume_message(session, &token, None, "wrong-key-0123456789"),
    )
    .await;
    expect_refusal(&mut ws, "unauthorized", 4017).await;

    // The refusals changed nothing: the first connection still streams.
    send_audio(&mut first, audio(1, 160)).await;
    assert_eq!(
        next_json(&mut first).await,
        json!({"type": "ack", "seq": 1})
    );

    let (mut second, resumed) = resume(&h, session, &token, None).await;
    assert_eq!(resumed["next_seq"], 2);
    expect_refusal(&mut first, "superseded", 4021).await;
    send_audio(&mut second, audio(2, 160)).await;
    assert_eq!(
        next_json(&mut second).await,
        json!({"type": "ack", "seq": 2})
    );
    h.stop().await;
}
