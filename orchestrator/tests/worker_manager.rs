//! The WorkerManager API end to end, against real Redis and RabbitMQ: the server runs
//! in-process on ephemeral ports, each test under its own namespace (`t-<uuid>`) for
//! streams and Redis keys; fake workers use the real gRPC client.

use std::net::SocketAddr;
use std::time::Duration;

#[path = "support/fake_kubernetes.rs"]
mod fake_kubernetes;

use clap::Parser;
use eventlog::log::{ReadFrom, StreamLog};
use eventlog::streams::StreamLayout;
use eventlog::{Envelope, Event, SessionId};
use orchestrator::api::allocate_worker_response::Outcome;
use orchestrator::api::worker_manager_client::WorkerManagerClient;
use orchestrator::api::{
    AllocateWorkerRequest, Allocation, Assign, DrainWorkerRequest, DrainWorkerResponse, Queued,
    RegisterWorkerRequest, ReleaseWorkerRequest, Revoke, SendHeartbeatRequest, SessionProgress,
    WorkerCommand, worker_command::Command,
};
use orchestrator::discovery::LeaderClient;
use orchestrator::registry::{Fence, Registry, RegistryError, WorkerRecord};
use orchestrator::{Orchestrator, OrchestratorArgs};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::Channel;
use uuid::Uuid;

const MODEL: &str = "whisper-tiny";
const WAIT: Duration = Duration::from_secs(10);
/// Long enough that tests not about silent workers need not heartbeat.
const NO_TIMEOUT_MS: u64 = 600_000;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: OrchestratorArgs,
}

/// One orchestrator under a fresh namespace.
struct Harness {
    args: OrchestratorArgs,
    grpc: SocketAddr,
    http: SocketAddr,
    log: StreamLog,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    /// An orchestrator leading a fresh namespace.
    async fn start(heartbeat_timeout_ms: u64) -> Self {
        Self::start_with(heartbeat_timeout_ms, &[]).await
    }

    /// [`Self::start`] with `extra` flags. The lease is 3 s, not 500 ms: a dozen
    /// orchestrators of parallel tests on two cores once missed a renewal, and these
    /// tests are about a leader, not about changing it.
    async fn start_with(heartbeat_timeout_ms: u64, extra: &[&str]) -> Self {
        let namespace = format!("t-{}", Uuid::new_v4());
        let mut flags = vec!["--lease-ms=3000"];
        flags.extend_from_slice(extra);
        let harness = Self::replica_with(&namespace, heartbeat_timeout_ms, &flags).await;
        harness.wait_until_leading().await;
        harness
    }

    /// With an autoscaler acting on `workload` (`KIND/NAME`) through the fake API
    /// server: one worker per caller (at least one), checked every 50 ms, scaled down
    /// at once, drains never timing out.
    async fn start_scaling_on(api: &fake_kubernetes::FakeApi, workload: &str) -> Self {
        let workload = format!("{MODEL}={workload}");
        Self::start_with(
            NO_TIMEOUT_MS,
            &[
                "--scaling-backend=kubernetes",
                "--kubernetes-api-url",
                &api.url,
                "--kubernetes-namespace",
                fake_kubernetes::NAMESPACE,
                "--kubernetes-workload",
                &workload,
                "--scaling-target=0",
                "--scaling-min-workers=1",
                "--scaling-check-interval-ms=50",
                "--scaling-down-after-secs=0",
                "--drain-timeout-secs=600",
            ],
        )
        .await
    }

    /// An orchestrator replica of `namespace`, leading or not.
    async fn replica(namespace: &str, heartbeat_timeout_ms: u64) -> Self {
        Self::replica_with(namespace, heartbeat_timeout_ms, &[]).await
    }

    async fn replica_with(namespace: &str, heartbeat_timeout_ms: u64, extra: &[&str]) -> Self {
        observability::init_tracing();
        let timeout = heartbeat_timeout_ms.to_string();
        let mut argv = vec![
            "orchestrator",
            "--namespace",
            namespace,
            "--partitions",
            "2",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--heartbeat-timeout-ms",
            &timeout,
        ];
        argv.extend_from_slice(extra);
        let args = Cli::parse_from(argv).args;
        let orchestrator = Orchestrator::bind(args.clone())
            .await
            .expect("orchestrator starts");
        let (grpc, http) = (orchestrator.grpc_addr(), orchestrator.http_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(orchestrator.serve(async {
            let _ = stopped.await;
        }));
        let log = StreamLog::connect(&args.shared.log_config()).await.unwrap();
        Self {
            args,
            grpc,
            http,
            log,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    async fn leaders(&self) -> LeaderClient {
        let redis = self.args.shared.redis().await.unwrap();
        LeaderClient::new(redis, &self.args.shared.namespace)
    }

    /// Waits until this replica holds the leader lock (its first campaign is at most a
    /// fifth of the lease away).
    async fn wait_until_leading(&self) {
        let leaders = self.leaders().await;
        let url = self.url();
        let deadline = tokio::time::Instant::now() + WAIT;
        while leaders.leader().await.unwrap().map(|l| l.url) != Some(url.clone()) {
            assert!(tokio::time::Instant::now() < deadline, "{url} never led");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn layout(&self) -> StreamLayout {
        self.args.shared.layout()
    }

    /// The orchestrator's registry, read behind its back (unfenced: tests only read).
    async fn registry(&self) -> Registry {
        Registry::new(
            self.args.shared.redis().await.unwrap(),
            self.args.shared.namespace.clone(),
            Fence::default(),
        )
    }

    /// `DrainWorker` as `asr workers drain` sends it.
    async fn drain(&self, worker: &str) -> DrainWorkerResponse {
        self.client()
            .await
            .drain_worker(DrainWorkerRequest {
                worker_id: worker.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn client(&self) -> WorkerManagerClient<Channel> {
        WorkerManagerClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    async fn register(&self, id: &str, capacity: u32) -> FakeWorker {
        self.register_holding(id, capacity, Vec::new()).await
    }

    /// Registers a worker that says it is serving `held` already.
    async fn register_holding(&self, id: &str, capacity: u32, held: Vec<Assign>) -> FakeWorker {
        let mut client = self.client().await;
        let commands = client
            .register_worker(RegisterWorkerRequest {
                worker_id: id.into(),
                model_name: MODEL.into(),
                capacity,
                metrics_addr: "127.0.0.1:0".into(),
                held,
            })
            .await
            .unwrap()
            .into_inner();
        FakeWorker { commands }
    }

    async fn allocate(&self, session: SessionId) -> Outcome {
        self.try_allocate(session, 0)
            .await
            .unwrap()
            .outcome
            .expect("an outcome")
    }

    async fn try_allocate(
        &self,
        session: SessionId,
        min_epoch: u64,
    ) -> Result<orchestrator::api::AllocateWorkerResponse, tonic::Status> {
        self.client()
            .await
            .allocate_worker(AllocateWorkerRequest {
                session_id: session.to_string(),
                model_name: MODEL.into(),
                tenant: "tenant-1".into(),
                opened_at_ms: 1_700_000_000_000,
                sample_rate: 8000,
                encoding: "pcm_s16le".into(),
                min_epoch,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn release(&self, worker: &str, session: SessionId, epoch: u64) -> bool {
        self.client()
            .await
            .release_worker(ReleaseWorkerRequest {
                worker_id: worker.into(),
                session_id: session.to_string(),
                epoch,
            })
            .await
            .unwrap()
            .into_inner()
            .released
    }

    async fn heartbeat(&self, worker: &str, sessions: Vec<SessionProgress>) -> bool {
        heartbeat(&mut self.client().await, worker, sessions).await
    }

    /// The first `n` events of a stream.
    async fn read(&self, stream: &str, n: usize) -> Vec<Envelope> {
        let mut reader = self
            .log
            .reader(stream, ReadFrom::Start, None)
            .await
            .unwrap();
        let mut events = Vec::new();
        while events.len() < n {
            let record = tokio::time::timeout(WAIT, reader.next())
                .await
                .unwrap_or_else(|_| panic!("only {} events on {stream}: {events:?}", events.len()))
                .expect("reader open")
                .unwrap();
            events.push(record.envelope);
        }
        reader.close().await;
        events
    }

    /// The first `n` control events after the term's `LeaderElected`.
    async fn control_events(&self, n: usize) -> Vec<(Option<SessionId>, Event)> {
        let mut events: Vec<_> = self
            .read(&self.layout().control_stream(), n + 1)
            .await
            .into_iter()
            .map(|e| (e.session, e.event))
            .collect();
        assert!(
            matches!(events[0], (None, Event::LeaderElected { token: 1, .. })),
            "the term comes first: {events:?}"
        );
        events.remove(0);
        events
    }

    /// Stops the server (gracefully: it gives the leader lock up), once.
    async fn stop(&mut self) {
        if let (Some(stop), Some(server)) = (self.stop.take(), self.server.take()) {
            let _ = stop.send(());
            tokio::time::timeout(WAIT, server)
                .await
                .expect("server stops")
                .unwrap()
                .unwrap();
        }
    }

    /// Deletes the namespace's Redis keys, as a Redis that lost its data would.
    async fn wipe_redis(&self) {
        let mut redis = self.args.shared.redis().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.args.shared.namespace))
            .query_async(&mut redis)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    }

    /// Stops the server and deletes the namespace's streams and keys.
    async fn finish(mut self) {
        self.stop().await;
        self.log
            .delete_streams(&self.args.shared.layout().all_streams())
            .await;
        self.wipe_redis().await;
    }
}

async fn heartbeat(
    client: &mut WorkerManagerClient<Channel>,
    worker: &str,
    sessions: Vec<SessionProgress>,
) -> bool {
    client
        .send_heartbeat(SendHeartbeatRequest {
            worker_id: worker.into(),
            model_name: MODEL.into(),
            sessions,
            capacity: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .known
}

/// A worker's end of its RegisterWorker stream, on its own connection (dropping it
/// closes the socket, as a killed process would).
struct FakeWorker {
    commands: Streaming<WorkerCommand>,
}

impl FakeWorker {
    async fn next(&mut self) -> Option<Command> {
        tokio::time::timeout(WAIT, self.commands.message())
            .await
            .expect("a command in time")
            .expect("stream healthy")
            .map(|c| c.command.expect("a command"))
    }

    async fn assign(&mut self) -> Assign {
        match self.next().await {
            Some(Command::Assign(assign)) => assign,
            other => panic!("expected an Assign, got {other:?}"),
        }
    }

    async fn quiet(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(300), self.commands.message()).await;
        assert!(got.is_err(), "expected no command, got {got:?}");
    }
}

fn allocation(worker: &str, epoch: u64) -> Outcome {
    Outcome::Allocated(Allocation {
        worker_id: worker.into(),
        epoch,
    })
}

fn position(outcome: &Outcome) -> u32 {
    match outcome {
        Outcome::Queued(Queued { position, .. }) => *position,
        other => panic!("expected Queued, got {other:?}"),
    }
}

fn registered(worker: &str, capacity: u32) -> (Option<SessionId>, Event) {
    (
        None,
        Event::WorkerRegistered {
            worker: worker.into(),
            model: MODEL.into(),
            capacity,
            token: 1,
        },
    )
}

fn allocated(session: SessionId, worker: &str, epoch: u64) -> (Option<SessionId>, Event) {
    (
        Some(session),
        Event::WorkerAllocated {
            worker: worker.into(),
            model: MODEL.into(),
            epoch,
            token: 1,
        },
    )
}

fn sessions(n: usize) -> Vec<SessionId> {
    (0..n).map(|_| Uuid::new_v4()).collect()
}

#[tokio::test]
async fn allocates_within_capacity_queues_the_rest_and_serves_the_queue_on_release() {
    let h = Harness::start(NO_TIMEOUT_MS).await;
    let mut a = h.register("w-a", 2).await;
    let mut b = h.register("w-b", 1).await;
    let s = sessions(5);

    // Both idle: the one with more free slots; then the least loaded share.
    assert_eq!(h.allocate(s[0]).await, allocation("w-a", 1));
    let assign = a.assign().await;
    assert_eq!(
        assign,
        Assign {
            session_id: s[0].to_string(),
            model_name: MODEL.into(),
            tenant: "tenant-1".into(),
            epoch: 1,
            opened_at_ms: 1_700_000_000_000,
            sample_rate: 8000,
            encoding: "pcm_s16le".into(),
        }
    );
    assert_eq!(h.allocate(s[1]).await, allocation("w-b", 1));
    assert_eq!(b.assign().await.session_id, s[1].to_string());
    assert_eq!(h.allocate(s[2]).await, allocation("w-a", 1));
    assert_eq!(a.assign().await.session_id, s[2].to_string());

    // Every slot taken: queued in arrival order.
    assert_eq!(position(&h.allocate(s[3]).await), 1);
    assert_eq!(position(&h.allocate(s[4]).await), 2);

    // Idempotent per session.
    assert_eq!(h.allocate(s[1]).await, allocation("w-b", 1));
    assert_eq!(position(&h.allocate(s[3]).await), 1);

    // Stale releases (wrong epoch, wrong worker) change nothing.
    assert!(!h.release("w-a", s[0], 2).await);
    assert!(!h.release("w-b", s[0], 1).await);
    a.quiet().await;

    // A real release frees the slot for the oldest waiting session.
    assert!(h.release("w-a", s[0], 1).await);
    let assign = a.assign().await;
    assert_eq!((assign.session_id, assign.epoch), (s[3].to_string(), 1));
    // A retried release is acknowledged and frees nothing more.
    assert!(h.release("w-a", s[0], 1).await);
    assert_eq!(h.allocate(s[3]).await, allocation("w-a", 1));
    assert_eq!(position(&h.allocate(s[4]).await), 1);
    a.quiet().await;
    b.quiet().await;

    let queued = |session, position| {
        (
            Some(session),
            Event::SessionQueued {
                model: MODEL.into(),
                position,
                token: 1,
            },
        )
    };
    assert_eq!(
        h.control_events(9).await,
        vec![
            registered("w-a", 2),
            registered("w-b", 1),
            allocated(s[0], "w-a", 1),
            allocated(s[1], "w-b", 1),
            allocated(s[2], "w-a", 1),
            queued(s[3], 1),
            queued(s[4], 2),
            (
                Some(s[0]),
                Event::WorkerReleased {
                    worker: "w-a".into(),
                    epoch: 1,
                    token: 1,
                }
            ),
            allocated(s[3], "w-a", 1),
        ]
    );
    h.finish().await;
}

#[tokio::test]
async fn a_worker_whose_stream_drops_is_lost_and_its_session_moves_with_a_new_epoch() {
    let h = Harness::start(NO_TIMEOUT_MS).await;
    let mut a = h.register("w-a", 1).await;
    let mut b = h.register("w-b", 1).await;
    let s = Uuid::new_v4();

    // A tie: the smaller id.
    assert_eq!(h.allocate(s).await, allocation("w-a", 1));
    assert_eq!(a.assign().await.session_id, s.to_string());

    drop(a);
    let assign = b.assign().await;
    assert_eq!((assign.session_id, assign.epoch), (s.to_string(), 2));
    assert_eq!(h.allocate(s).await, allocation("w-b", 2));
    // The lost worker is fenced out and forgotten.
    assert!(!h.release("w-a", s, 1).await);
    assert!(!h.heartbeat("w-a", vec![]).await);

    let events = h.control_events(5).await;
    assert_eq!(
        events[..3],
        [
            registered("w-a", 1),
            registered("w-b", 1),
            allocated(s, "w-a", 1)
        ]
    );
    match &events[3] {
        (None, Event::WorkerLost { worker, reason, .. }) => {
            assert_eq!(worker, "w-a");
            assert!(reason.contains("stream"), "{reason}");
        }
        other => panic!("expected WorkerLost, got {other:?}"),
    }
    assert_eq!(events[4], allocated(s, "w-b", 2));
    h.finish().await;
}

#[tokio::test]
async fn sessions_of_a_lost_worker_go_back_to_the_head_of_the_queue() {
    let h = Harness::start(NO_TIMEOUT_MS).await;
    let mut a = h.register("w-a", 1).await;
    let mut b = h.register("w-b", 1).await;
    let s = sessions(3);
    assert_eq!(h.allocate(s[0]).await, allocation("w-a", 1));
    assert_eq!(h.allocate(s[1]).await, allocation("w-b", 1));
    assert_eq!(position(&h.allocate(s[2]).await), 1);
    a.assign().await;
    b.assign().await;

    drop(a);
    // No free slot anywhere: the lost session waits, ahead of the later arrival.
    let deadline = tokio::time::Instant::now() + WAIT;
    while position(&h.allocate(s[2]).await) != 2 {
        assert!(tokio::time::Instant::now() < deadline, "loss not detected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(position(&h.allocate(s[0]).await), 1);

    assert!(h.release("w-b", s[1], 1).await);
    let assign = b.assign().await;
    assert_eq!((assign.session_id, assign.epoch), (s[0].to_string(), 2));
    assert_eq!(position(&h.allocate(s[2]).await), 1);
    h.finish().await;
}

#[tokio::test]
async fn a_silent_worker_is_revoked_and_its_session_reassigned() {
    let h = Harness::start(300).await;
    let mut a = h.register("w-a", 1).await;
    let s = Uuid::new_v4();
    assert_eq!(h.allocate(s).await, allocation("w-a", 1));
    a.assign().await;

    // w-b heartbeats; w-a, whose socket stays open, does not.
    let mut b = h.register("w-b", 1).await;
    let mut client = h.client().await;
    let beating = tokio::spawn(async move {
        loop {
            heartbeat(&mut client, "w-b", vec![]).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    assert_eq!(
        a.next().await,
        Some(Command::Revoke(Revoke {
            session_id: s.to_string(),
            epoch: 1
        }))
    );
    assert_eq!(a.next().await, None, "the silent worker's stream ends");
    let assign = b.assign().await;
    assert_eq!((assign.session_id, assign.epoch), (s.to_string(), 2));
    assert!(!h.heartbeat("w-a", vec![]).await);
    beating.abort();

    let lost: Vec<_> = h
        .control_events(5)
        .await
        .into_iter()
        .filter_map(|(_, e)| match e {
            Event::WorkerLost { worker, reason, .. } => Some((worker, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].0, "w-a");
    assert!(lost[0].1.contains("no heartbeat"), "{}", lost[0].1);
    h.finish().await;
}

#[tokio::test]
async fn heartbeats_are_recorded_and_the_ops_endpoints_answer() {
    let h = Harness::start(NO_TIMEOUT_MS).await;
    assert!(!h.heartbeat("nobody", vec![]).await);

    let mut a = h.register("w-a", 1).await;
    let s = Uuid::new_v4();
    assert_eq!(h.allocate(s).await, allocation("w-a", 1));
    a.assign().await;
    let progress = SessionProgress {
        session_id: s.to_string(),
        epoch: 1,
        decoded_ms: 1234,
    };
    assert!(h.heartbeat("w-a", vec![progress]).await);

    let beats = h.read(&h.layout().heartbeat_stream(), 1).await;
    assert_eq!(beats[0].session, None);
    assert_eq!(
        beats[0].event,
        Event::Heartbeat {
            worker: "w-a".into(),
            model: MODEL.into(),
            capacity: 1,
            sessions: vec![eventlog::events::SessionLoad {
                session: s,
                epoch: 1,
                decoded_ms: 1234
            }],
            token: 1,
        }
    );

    // Malformed requests are refused, not recorded.
    let status = h
        .client()
        .await
        .allocate_worker(AllocateWorkerRequest {
            session_id: "not-a-uuid".into(),
            model_name: MODEL.into(),
            sample_rate: 8000,
            encoding: "pcm_s16le".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    assert_eq!(http_get(h.http, "/healthz").await.0, 200);
    let (status, body) = http_get(h.http, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    // The monitor refreshes the gauges within a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, metrics) = http_get(h.http, "/metrics").await;
    for name in [
        "orchestrator_allocations_total",
        "orchestrator_allocation_wait_seconds",
        "orchestrator_workers{",
        "orchestrator_sessions_waiting{",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    h.finish().await;
}

/// A bare HTTP/1.1 GET: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// What a worker lists when it registers again while serving `session` under `epoch`.
fn held(session: SessionId, epoch: u64) -> Assign {
    Assign {
        session_id: session.to_string(),
        model_name: MODEL.into(),
        tenant: "tenant-1".into(),
        epoch,
        opened_at_ms: 1_700_000_000_000,
        sample_rate: 8000,
        encoding: "pcm_s16le".into(),
    }
}

/// The `LeaderElected` tokens on the control stream, in order (the first `n` events).
async fn terms(h: &Harness, n: usize) -> Vec<u64> {
    h.read(&h.layout().control_stream(), n)
        .await
        .into_iter()
        .filter_map(|e| match e.event {
            Event::LeaderElected { token, .. } => Some(token),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_standby_replica_refuses_calls_then_takes_over_and_keeps_what_workers_still_serve() {
    let mut first = Harness::start(NO_TIMEOUT_MS).await;
    let second = Harness::replica(&first.args.shared.namespace, NO_TIMEOUT_MS).await;
    let s = Uuid::new_v4();

    // The standby answers UNAVAILABLE, so that clients look the leader up again.
    let refused = second.try_allocate(s, 0).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    let mut a = first.register("w-a", 1).await;
    assert_eq!(first.allocate(s).await, allocation("w-a", 1));
    a.assign().await;

    // The leader steps down: its workers' streams end and the standby takes over
    // under the next token.
    first.stop().await;
    assert_eq!(a.next().await, None, "the old leader's stream ends");
    second.wait_until_leading().await;
    let leaders = second.leaders().await;
    assert_eq!(leaders.leader().await.unwrap().unwrap().token, 2);

    // The worker registers again, still serving its session: it keeps it, under the
    // same epoch, and is not told anything new.
    let mut a = second.register_holding("w-a", 1, vec![held(s, 1)]).await;
    a.quiet().await;
    assert_eq!(second.allocate(s).await, allocation("w-a", 1));
    assert!(second.release("w-a", s, 1).await);

    // A worker that comes back claiming an assignment that moved on is told to stop.
    let t = Uuid::new_v4();
    let mut b = second.register("w-b", 1).await;
    assert_eq!(second.allocate(t).await, allocation("w-a", 1));
    a.assign().await;
    drop(a);
    let assign = b.assign().await;
    assert_eq!((assign.session_id, assign.epoch), (t.to_string(), 2));
    let mut a = second.register_holding("w-a", 1, vec![held(t, 1)]).await;
    assert_eq!(
        a.next().await,
        Some(Command::Revoke(Revoke {
            session_id: t.to_string(),
            epoch: 1
        }))
    );
    assert_eq!(second.allocate(t).await, allocation("w-b", 2));

    // Registered, allocated, then the second term.
    assert_eq!(terms(&second, 4).await, vec![1, 2]);
    second.finish().await;
    first.finish().await;
}

#[tokio::test]
async fn after_redis_lost_its_data_tokens_and_epochs_continue_from_the_log() {
    let h = Harness::start(NO_TIMEOUT_MS).await;
    let mut a = h.register("w-a", 1).await;
    let mut b = h.register("w-b", 1).await;
    let s = Uuid::new_v4();
    assert_eq!(h.allocate(s).await, allocation("w-a", 1));
    a.assign().await;
    drop(a);
    let assign = b.assign().await;
    assert_eq!((assign.session_id, assign.epoch), (s.to_string(), 2));
    let waiting = Uuid::new_v4();
    assert_eq!(position(&h.allocate(waiting).await), 1);

    h.wipe_redis().await;
    // The leader notices its lock is gone, steps down (ending the workers' streams)
    // and is elected again, under a token recovered from the control stream.
    assert_eq!(b.next().await, None, "the stream ends when the term does");
    h.wait_until_leading().await;
    let token = h.leaders().await.leader().await.unwrap().unwrap().token;
    assert_eq!(token, 2, "the log's highest token plus one, not 1");

    // The worker registers again with what it serves; ingest asks again for the
    // session with the latest epoch it saw: the assignment stands.
    let mut b = h.register_holding("w-b", 1, vec![held(s, 2)]).await;
    b.quiet().await;
    let answer = h.try_allocate(s, 2).await.unwrap().outcome.unwrap();
    assert_eq!(answer, allocation("w-b", 2));

    // Redis forgot the waiting session too: ingest asking again queues it anew, and
    // the next worker serves it.
    assert_eq!(position(&h.allocate(waiting).await), 1);
    let mut c = h.register("w-c", 2).await;
    let assign = c.assign().await;
    assert_eq!((assign.session_id, assign.epoch), (waiting.to_string(), 1));

    // The next failover continues from epoch 2, as the log does.
    drop(b);
    let assign = c.assign().await;
    assert_eq!((assign.session_id, assign.epoch), (s.to_string(), 3));
    h.finish().await;
}

#[tokio::test]
async fn a_deposed_leaders_registry_writes_nothing() {
    observability::init_tracing();
    let namespace = format!("t-{}", Uuid::new_v4());
    let args = Cli::parse_from(["orchestrator", "--namespace", &namespace]).args;
    let mut redis = args.shared.redis().await.unwrap();
    let current = orchestrator::leadership::Leader {
        token: 7,
        replica: "new".into(),
        url: "http://127.0.0.1:1".into(),
    };
    let _: () = redis::cmd("SET")
        .arg(orchestrator::leadership::leader_key(&namespace))
        .arg(current.value())
        .query_async(&mut redis)
        .await
        .unwrap();
    let fence = Fence::default();
    let registry = Registry::new(redis.clone(), namespace.clone(), fence.clone());
    let worker = WorkerRecord {
        id: "w-a".into(),
        model: MODEL.into(),
        capacity: 1,
        metrics_addr: String::new(),
        registered_at_ms: 0,
        last_heartbeat_ms: 0,
        sessions: Vec::new(),
        draining: false,
    };

    // Not leading at all: refused without asking Redis.
    assert!(matches!(
        registry.put_worker(&worker).await,
        Err(RegistryError::NotLeader)
    ));
    // The previous term's fence: Redis refuses it.
    fence.set(Some(
        orchestrator::leadership::Leader {
            token: 6,
            ..current.clone()
        }
        .value(),
    ));
    assert!(matches!(
        registry.put_worker(&worker).await,
        Err(RegistryError::NotLeader)
    ));
    assert!(matches!(
        registry.touch_worker("w-a", 1).await,
        Err(RegistryError::NotLeader)
    ));
    assert_eq!(
        registry.worker("w-a").await.unwrap(),
        None,
        "nothing written"
    );
    // The current term's fence writes.
    fence.set(Some(current.value()));
    registry.put_worker(&worker).await.unwrap();
    assert_eq!(registry.worker("w-a").await.unwrap(), Some(worker));

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut redis)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_draining_worker_gets_no_new_sessions() {
    let h = Harness::start(NO_TIMEOUT_MS).await;
    let mut a = h.register("w-a", 1).await;
    let mut b = h.register("w-b", 1).await;
    let drained = h.drain("w-a").await;
    assert!(drained.found);
    assert_eq!(drained.sessions, 0);
    let s = sessions(2);
    // w-a is idle and sorts first, but drains: w-b takes the session, then nobody.
    assert_eq!(h.allocate(s[0]).await, allocation("w-b", 1));
    assert_eq!(b.assign().await.session_id, s[0].to_string());
    assert_eq!(position(&h.allocate(s[1]).await), 1);
    a.quiet().await;
    let unknown = h.drain("nobody").await;
    assert!(!unknown.found);
    let events = h.control_events(3).await;
    assert_eq!(
        events[2],
        (
            None,
            Event::WorkerDraining {
                worker: "w-a".into(),
                draining: true,
                token: 1,
            }
        )
    );
    h.finish().await;
}

#[tokio::test]
async fn a_dry_run_autoscaler_decides_from_the_streams_and_changes_nothing() {
    let h = Harness::start_with(
        NO_TIMEOUT_MS,
        &[
            "--scaling-backend=dry-run",
            "--scaling-target=2",
            "--scaling-check-interval-ms=50",
        ],
    )
    .await;
    let mut a = h.register("w-a", 1).await;
    assert!(h.heartbeat("w-a", Vec::new()).await);
    let s = sessions(3);
    assert_eq!(h.allocate(s[0]).await, allocation("w-a", 1));
    a.assign().await;
    for &session in &s[1..] {
        h.allocate(session).await;
    }
    // 1 active + 2 waiting + 2 free slots kept = 5 workers of one slot, decided from
    // the control stream's allocations and queueing.
    let mut reader = h
        .log
        .reader(&h.layout().control_stream(), ReadFrom::Start, None)
        .await
        .unwrap();
    let decided = tokio::time::timeout(WAIT, async {
        loop {
            let event = reader.next().await.unwrap().unwrap().envelope.event;
            if let Event::ScalingDecided {
                workers: 5,
                model,
                policy,
                ..
            } = event
            {
                return (model, policy);
            }
        }
    })
    .await
    .expect("a decision for 5 workers");
    assert_eq!(decided, (MODEL.to_string(), "idle-target".to_string()));
    reader.close().await;
    // Nothing acted on it: still one worker, nobody drained, the queue as it was.
    let registry = h.registry().await;
    let workers = registry.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert!(!workers[0].draining);
    assert!(registry.local_workers(MODEL).await.unwrap().is_empty());
    assert_eq!(position(&h.allocate(s[2]).await), 2);
    h.finish().await;
}

#[tokio::test]
async fn the_autoscaler_scales_a_statefulset_up_for_waiting_callers_and_down_from_the_top() {
    let api = fake_kubernetes::FakeApi::start(&[("statefulsets", "recognizer", 1)]).await;
    let h = Harness::start_scaling_on(&api, "statefulset/recognizer").await;
    let wait_for = async |what: &str, check: &dyn Fn() -> bool| {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {:?}",
                api.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Pod 0 serves one caller; two more wait: the StatefulSet goes to 3 replicas.
    let mut pods = vec![h.register("recognizer-0", 1).await];
    let s = sessions(3);
    assert_eq!(h.allocate(s[0]).await, allocation("recognizer-0", 1));
    pods[0].assign().await;
    h.allocate(s[1]).await;
    h.allocate(s[2]).await;
    wait_for("scaled to 3", &|| {
        api.replicas("statefulsets", "recognizer") == 3
    })
    .await;
    for (i, session) in s.iter().enumerate().skip(1) {
        let mut pod = h.register(&format!("recognizer-{i}"), 1).await;
        assert_eq!(pod.assign().await.session_id, session.to_string());
        pods.push(pod);
    }
    // Calls end on pods 0 and 2 first: only the highest ordinal may go, so pod 2 is
    // drained and retired (the StatefulSet then removes exactly that pod), while pod
    // 1, still serving, is drained but stays until its call ends.
    assert!(h.release("recognizer-0", s[0], 1).await);
    assert!(h.release("recognizer-2", s[2], 1).await);
    wait_for("scaled to 2", &|| {
        api.replicas("statefulsets", "recognizer") == 2
    })
    .await;
    assert!(matches!(pods[2].next().await, Some(Command::Stop(_))));
    assert_eq!(api.patched(), [3, 2], "pod 1 still serves its caller");
    assert!(h.release("recognizer-1", s[1], 1).await);
    wait_for("scaled to 1", &|| {
        api.replicas("statefulsets", "recognizer") == 1
    })
    .await;
    assert!(matches!(pods[1].next().await, Some(Command::Stop(_))));
    assert_eq!(api.patched(), [3, 2, 1]);
    for request in api.requests() {
        // Only the scale subresource, and only plain merge patches.
        assert_eq!(
            request.path,
            fake_kubernetes::scale_path("statefulsets", "recognizer")
        );
        assert_eq!(request.query.as_deref().unwrap_or(""), "");
        if request.method == axum::http::Method::PATCH {
            assert_eq!(
                request.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
        }
    }
    pods[0].quiet().await;
    h.finish().await;
}

#[tokio::test]
async fn the_autoscaler_has_a_deployment_remove_the_pods_it_drained() {
    const A: &str = "recognizer-7f9c4-aaaaa";
    const B: &str = "recognizer-7f9c4-bbbbb";
    const C: &str = "recognizer-7f9c4-ccccc";
    let api = fake_kubernetes::FakeApi::start(&[("deployments", "recognizer", 3)]).await;
    api.add_pods(&[A, B, C]);
    let h = Harness::start_scaling_on(&api, "deployment/recognizer").await;
    let registry = h.registry().await;
    // Three replicas, no caller, one worker wanted: the two registered pods are
    // drained while the third still starts. A ReplicaSet removes a pod that is not
    // ready before any other, so neither drained pod may go yet.
    let mut pods = vec![h.register(A, 1).await, h.register(B, 1).await];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !registry
        .workers()
        .await
        .unwrap()
        .iter()
        .all(|worker| worker.draining)
    {
        assert!(tokio::time::Instant::now() < deadline, "never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.replicas("deployments", "recognizer"), 3);
    assert!(
        api.requests()
            .iter()
            .all(|request| request.method != axum::http::Method::PATCH),
        "{:?}",
        api.requests()
    );

    // The third pod is ready: each drained pod gets the lowest deletion cost, then
    // the replicas go down by one, and the worker is told to stop.
    let mut c = h.register(C, 1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while api.replicas("deployments", "recognizer") != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for pod in &mut pods {
        assert!(matches!(pod.next().await, Some(Command::Stop(_))));
    }
    let cheapest = json!({ "controller.kubernetes.io/pod-deletion-cost": "-2147483648" });
    assert_eq!(api.pod_annotations(A), cheapest);
    assert_eq!(api.pod_annotations(B), cheapest);
    assert_eq!(api.pod_annotations(C), json!({}));
    let patches: Vec<(String, serde_json::Value)> = api
        .requests()
        .into_iter()
        .filter(|request| request.method == axum::http::Method::PATCH)
        .map(|request| (request.path, request.body))
        .collect();
    let scale = fake_kubernetes::scale_path("deployments", "recognizer");
    let first = if patches[0].0 == fake_kubernetes::pod_path(A) {
        A
    } else {
        B
    };
    let second = if first == A { B } else { A };
    assert_eq!(
        patches,
        [
            (
                fake_kubernetes::pod_path(first),
                json!({ "metadata": { "annotations": cheapest } })
            ),
            (scale.clone(), json!({ "spec": { "replicas": 2 } })),
            (
                fake_kubernetes::pod_path(second),
                json!({ "metadata": { "annotations": cheapest } })
            ),
            (scale, json!({ "spec": { "replicas": 1 } })),
        ]
    );
    let workers = registry.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!((workers[0].id.as_str(), workers[0].draining), (C, false));
    c.quiet().await;
    h.finish().await;
}
