//! The worker process: loads the model once, serves /metrics and health, registers
//! with the orchestrator leader (found through Redis) and keeps that stream open
//! (registering again, with the sessions it still serves, when it breaks), heartbeats,
//! and runs one task per assigned session ([`session`]).
//!
//! Sessions keep running while the orchestrator stream is down (a leader failover,
//! Redis losing its data): on registering again the worker lists what it serves, and
//! the leader keeps it or revokes it. If the session was given to someone else
//! meanwhile, the newer epoch fences this worker's results and checkpoints.

mod partials;
mod session;
pub mod tracking;

use std::collections::HashMap;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use eventlog::checkpoint::CheckpointStore;
use eventlog::log::{Appender, LogError, StreamLog};
use eventlog::streams::StreamLayout;
use eventlog::{AudioFormat, Envelope, Event, SessionId, now_ms};
use orchestrator::api::worker_command::Command;
use orchestrator::api::{
    Assign, RegisterWorkerRequest, ReleaseWorkerRequest, Revoke, SendHeartbeatRequest,
    SessionProgress, Stop,
};
use orchestrator::discovery::LeaderClient;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::audio::parse_encoding;
use crate::config::RecognizerArgs;
use crate::engine::sherpa::{SileroVadFactory, WhisperModel};
pub use session::{Assignment, SessionError};

/// Upper bound of a result message (text of at most a 20 s segment, plus the header).
const MAX_RESULT_BYTES: usize = 16 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Registering again after the stream broke: quickly, since a new leader times the
/// workers out a heartbeat timeout after its term began, and at most a fifth of that
/// apart while no leader answers (a Redis GET and a refused connection: cheap).
const REGISTER_BACKOFF_MIN: Duration = Duration::from_millis(50);
const REGISTER_BACKOFF_MAX: Duration = Duration::from_millis(200);
/// A leader that has not answered a registration in this time is presumed paused.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a finished session's release keeps being retried (through leader
/// failovers) before the slot is left for the orchestrator to reclaim.
const RELEASE_PATIENCE: Duration = Duration::from_secs(30);

/// What every session task of the process shares.
pub(crate) struct Ctx {
    worker_id: String,
    /// Fresh per process start: producer names must never be shared by two processes
    /// (the broker drops publishing ids lower than the last one it saw for a name).
    incarnation: String,
    log: StreamLog,
    layout: StreamLayout,
    checkpoints: CheckpointStore,
    model: WhisperModel,
    vads: SileroVadFactory,
    partial_interval: Option<Duration>,
    /// Input silence after which a session counts as abandoned.
    abandon_after: Duration,
    /// One long-lived producer per results partition.
    appenders: tokio::sync::Mutex<HashMap<u16, Appender>>,
}

impl Ctx {
    fn envelope(&self, session: SessionId, event: Event) -> Envelope {
        Envelope {
            session: Some(session),
            at_ms: now_ms(),
            producer: self.worker_id.clone(),
            event,
        }
    }

    async fn results_appender(&self, session: SessionId) -> Result<Appender, LogError> {
        let partition = self.layout.partition_of(session);
        let mut appenders = self.appenders.lock().await;
        if let Some(appender) = appenders.get(&partition) {
            return Ok(appender.clone());
        }
        let name = format!(
            "{}.{}.results.{partition}",
            self.worker_id, self.incarnation
        );
        let stream = self.layout.results_partition(partition);
        let appender = self
            .log
            .appender(&stream, &name, true, MAX_RESULT_BYTES)
            .await?;
        appenders.insert(partition, appender.clone());
        Ok(appender)
    }

    /// Drops a partition's producer after a broker error, so the next use reconnects
    /// (under the same name: its publishing ids continue where the broker is).
    async fn forget_appender(&self, session: SessionId) {
        let partition = self.layout.partition_of(session);
        self.appenders.lock().await.remove(&partition);
    }
}

/// A session task of this process.
struct Running {
    assignment: Assignment,
    decoded_ms: Arc<AtomicU64>,
    task: tokio::task::AbortHandle,
}

/// The sessions this process serves.
#[derive(Clone, Default)]
struct Sessions {
    inner: Arc<Mutex<HashMap<SessionId, Running>>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Running>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_gauge(map: &HashMap<SessionId, Running>) {
        metrics::gauge!("recognizer_sessions_active").set(map.len() as f64);
    }

    fn progress(&self) -> Vec<SessionProgress> {
        self.lock()
            .iter()
            .map(|(id, r)| SessionProgress {
                session_id: id.to_string(),
                epoch: r.assignment.epoch,
                decoded_ms: r.decoded_ms.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The assignments being served, as a registration lists them.
    fn held(&self) -> Vec<Assign> {
        self.lock()
            .values()
            .map(|r| {
                let a = &r.assignment;
                Assign {
                    session_id: a.session.to_string(),
                    model_name: a.model.clone(),
                    tenant: a.tenant.clone(),
                    epoch: a.epoch,
                    opened_at_ms: a.opened_at_ms,
                    sample_rate: a.format.sample_rate,
                    encoding: a.format.encoding.name().to_string(),
                }
            })
            .collect()
    }

    /// Removes the session's entry if it is still the given epoch's.
    fn finished(&self, session: SessionId, epoch: u64) {
        let mut map = self.lock();
        if map
            .get(&session)
            .is_some_and(|r| r.assignment.epoch == epoch)
        {
            map.remove(&session);
        }
        Self::update_gauge(&map);
    }

    /// Stops the session's task if its epoch is at most `epoch`.
    fn revoke(&self, session: SessionId, epoch: u64) -> bool {
        let mut map = self.lock();
        let stop = map
            .get(&session)
            .is_some_and(|r| r.assignment.epoch <= epoch);
        if stop && let Some(r) = map.remove(&session) {
            r.task.abort();
        }
        Self::update_gauge(&map);
        stop
    }

    fn abort_all(&self) {
        let mut map = self.lock();
        for (_, r) in map.drain() {
            r.task.abort();
        }
        Self::update_gauge(&map);
    }
}

/// The process as the registration and heartbeat loops see it.
struct Worker {
    args: RecognizerArgs,
    ctx: Arc<Ctx>,
    leaders: LeaderClient,
    sessions: Sessions,
    registered: Arc<AtomicBool>,
    /// The fencing token of the leader the registration stream is open with.
    registered_with: AtomicU64,
    reregister: Notify,
    metrics_addr: String,
}

/// Runs a recognizer worker until `shutdown` resolves.
pub async fn run(
    args: RecognizerArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    observability::install_metrics();
    arm_failpoints()?;
    let layout = args.shared.layout();

    let started = Instant::now();
    let (model, vads) = args.model.load().await?;
    info!(
        model = %args.model_name,
        dir = %args.model.model_dir.display(),
        threads = args.model.threads,
        tail_padding_frames = args.model.tail_padding_frames,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );

    let log = StreamLog::connect(&args.shared.log_config()).await?;
    log.ensure_streams(&layout.all_streams()).await?;
    let redis = args.shared.redis().await.context("connecting to Redis")?;
    let checkpoints = CheckpointStore::new(redis.clone(), args.shared.namespace.clone());

    let registered = Arc::new(AtomicBool::new(false));
    let readiness = Arc::new(Ready {
        redis: redis.clone(),
        log: log.clone(),
        probe_stream: layout.control_stream(),
        registered: registered.clone(),
    });
    let http = observability::serve(args.http_addr, observability::ops_router(readiness))
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    info!(addr = %http, "ops HTTP listening (/metrics, /healthz, /readyz)");

    let leaders = LeaderClient::new(redis.clone(), &args.shared.namespace);
    let ctx = Arc::new(Ctx {
        worker_id: args.worker_id.clone(),
        incarnation: format!("{:08x}", rand::random::<u32>()),
        log,
        layout,
        checkpoints,
        model,
        vads,
        partial_interval: args.partial_interval(),
        abandon_after: args.abandon_after(),
        appenders: tokio::sync::Mutex::new(HashMap::new()),
    });
    let worker = Arc::new(Worker {
        args,
        ctx,
        leaders,
        sessions: Sessions::default(),
        registered,
        registered_with: AtomicU64::new(0),
        reregister: Notify::new(),
        metrics_addr: http.to_string(),
    });
    Sessions::update_gauge(&worker.sessions.lock());

    let heartbeats = tokio::spawn(worker.clone().heartbeats());
    let follower = tokio::spawn(worker.clone().follow_the_leader());
    tokio::select! {
        () = shutdown => info!("shutting down"),
        () = worker.clone().registration() => {}
    }
    heartbeats.abort();
    follower.abort();
    worker.sessions.abort_all();
    let appenders: Vec<Appender> = worker
        .ctx
        .appenders
        .lock()
        .await
        .drain()
        .map(|(_, a)| a)
        .collect();
    for appender in appenders {
        appender.close().await;
    }
    Ok(())
}

/// Arms the failpoints that the `FAILPOINTS` environment variable names
/// (`name=actions;…`, the fail crate's syntax), when the `failpoints` feature compiled
/// them in; without it the variable is ignored. Tests use this to stop a recognizer
/// process at an exact point of a session (see `session::stop_point`).
fn arm_failpoints() -> anyhow::Result<()> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    if !fail::has_failpoints() {
        warn!(%spec, "FAILPOINTS ignored: built without the failpoints feature");
        return Ok(());
    }
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .with_context(|| format!("FAILPOINTS entry {entry:?} is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim())
            .map_err(|e| anyhow::anyhow!("FAILPOINTS entry {entry:?}: {e}"))?;
        info!(
            failpoint = name.trim(),
            actions = actions.trim(),
            "failpoint armed"
        );
    }
    Ok(())
}

impl Worker {
    /// Keeps the registration stream open for the process's life, or until the
    /// orchestrator says stop (a drained worker retired by the autoscaler).
    async fn registration(self: Arc<Self>) {
        let mut backoff = REGISTER_BACKOFF_MIN;
        let mut failing = false;
        loop {
            let opened = Instant::now();
            match self.register_once().await {
                Ok(ControlFlow::Break(reason)) => {
                    info!(%reason, "stopped by the orchestrator: exiting");
                    return;
                }
                Ok(ControlFlow::Continue(())) => {
                    failing = false;
                    warn!("the registration stream ended: registering again")
                }
                // Quiet while the same failure repeats (no leader for a moment).
                Err(status) if !failing => {
                    failing = true;
                    warn!(code = ?status.code(), message = status.message(), "registration stream failed")
                }
                Err(_) => {}
            }
            self.registered.store(false, Ordering::Relaxed);
            self.leaders.forget();
            // A stream that stayed up a while was healthy: start the backoff over.
            if opened.elapsed() > REGISTER_BACKOFF_MAX * 2 {
                backoff = REGISTER_BACKOFF_MIN;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(REGISTER_BACKOFF_MAX);
        }
    }

    /// One registration stream, until it ends (`Continue`: register again) or the
    /// orchestrator says stop (`Break` with its reason).
    async fn register_once(&self) -> Result<ControlFlow<String>, tonic::Status> {
        let request = RegisterWorkerRequest {
            worker_id: self.args.worker_id.clone(),
            model_name: self.args.model_name.clone(),
            capacity: self.args.capacity,
            metrics_addr: self.metrics_addr.clone(),
            held: self.sessions.held(),
        };
        let held = request.held.len();
        let (leader, mut client) = self.leaders.client_of_leader().await?;
        // A paused leader accepts the connection and never answers.
        let mut commands = tokio::time::timeout(REGISTER_TIMEOUT, client.register_worker(request))
            .await
            .map_err(|_| tonic::Status::unavailable("the leader did not answer"))??
            .into_inner();
        self.registered_with.store(leader.token, Ordering::Relaxed);
        self.registered.store(true, Ordering::Relaxed);
        info!(worker = %self.args.worker_id, model = %self.args.model_name, capacity = self.args.capacity, held, leader = %leader.replica, token = leader.token, "registered with the orchestrator leader");
        loop {
            tokio::select! {
                message = commands.message() => match message? {
                    Some(command) => {
                        if let ControlFlow::Break(reason) = self.handle(command.command) {
                            return Ok(ControlFlow::Break(reason));
                        }
                    }
                    None => return Ok(ControlFlow::Continue(())),
                },
                () = self.reregister.notified() => return Ok(ControlFlow::Continue(())),
            }
        }
    }

    fn handle(&self, command: Option<Command>) -> ControlFlow<String> {
        match command {
            Some(Command::Assign(assign)) => match parse_assign(&assign) {
                Ok(a) => self.start(a),
                Err(message) => error!(?assign, %message, "unusable assignment ignored"),
            },
            Some(Command::Revoke(Revoke { session_id, epoch })) => {
                let Ok(session) = session_id.parse::<SessionId>() else {
                    error!(%session_id, "revoke with a malformed session id");
                    return ControlFlow::Continue(());
                };
                let sessions = self.sessions.clone();
                match revoke_delay() {
                    None => revoke(&sessions, session, epoch),
                    Some(delay) => {
                        warn!(%session, epoch, delay_ms = delay.as_millis() as u64, "failpoint: revoke held back");
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            revoke(&sessions, session, epoch);
                        });
                    }
                }
            }
            Some(Command::Stop(Stop { reason })) => return ControlFlow::Break(reason),
            None => warn!("empty command from the orchestrator"),
        }
        ControlFlow::Continue(())
    }

    fn start(&self, a: Assignment) {
        let mut map = self.sessions.lock();
        if let Some(running) = map.get(&a.session) {
            if running.assignment.epoch >= a.epoch {
                debug!(session = %a.session, epoch = a.epoch, "assignment already running");
                return;
            }
            running.task.abort();
        }
        if map.len() as u32 >= self.args.capacity {
            warn!(session = %a.session, capacity = self.args.capacity, "assigned beyond capacity; serving anyway");
        }
        info!(session = %a.session, epoch = a.epoch, tenant = %a.tenant, "assignment received");
        let decoded_ms = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve_session(
            self.ctx.clone(),
            self.leaders.clone(),
            self.sessions.clone(),
            a.clone(),
            decoded_ms.clone(),
        ));
        map.insert(
            a.session,
            Running {
                assignment: a.clone(),
                decoded_ms,
                task: task.abort_handle(),
            },
        );
        Sessions::update_gauge(&map);
    }

    /// Registers again when the leader lock names another term than the one the
    /// registration stream is with: the old leader may be paused or cut off, its
    /// stream still open, and a new leader would otherwise never hear of this worker
    /// (and time it out). Checked every heartbeat interval, apart from the heartbeats,
    /// which a paused leader holds up.
    async fn follow_the_leader(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.args.heartbeat_interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if !self.registered.load(Ordering::Relaxed) {
                continue;
            }
            if let Ok(Some(leader)) = self.leaders.leader().await
                && leader.token != self.registered_with.load(Ordering::Relaxed)
            {
                info!(leader = %leader.replica, token = leader.token, "a new orchestrator leader: registering with it");
                self.leaders.forget();
                self.reregister.notify_one();
            }
        }
    }

    async fn heartbeats(self: Arc<Self>) {
        let period = self.args.heartbeat_interval();
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            ticker.tick().await;
            // Nobody to tell yet: a heartbeat overtaking the registration would be
            // answered "unknown" and start the registration over.
            if !self.registered.load(Ordering::Relaxed) {
                continue;
            }
            let request = SendHeartbeatRequest {
                worker_id: self.args.worker_id.clone(),
                model_name: self.args.model_name.clone(),
                sessions: self.sessions.progress(),
                capacity: self.args.capacity,
            };
            let sent = tokio::time::timeout(period * 5, async {
                self.leaders.client().await?.send_heartbeat(request).await
            })
            .await;
            if !matches!(&sent, Ok(Ok(_))) {
                self.leaders.forget();
            }
            match sent {
                Ok(Ok(response)) => {
                    failing = false;
                    if !response.into_inner().known && self.registered.load(Ordering::Relaxed) {
                        warn!("the orchestrator does not know this worker: registering again");
                        self.reregister.notify_one();
                    }
                }
                Ok(Err(status)) if !failing => {
                    failing = true;
                    warn!(code = ?status.code(), message = status.message(), "heartbeat failed");
                }
                Err(_) if !failing => {
                    failing = true;
                    warn!("heartbeat timed out");
                }
                _ => {}
            }
        }
    }
}

fn revoke(sessions: &Sessions, session: SessionId, epoch: u64) {
    if sessions.revoke(session, epoch) {
        info!(%session, epoch, "assignment revoked: session task stopped");
    } else {
        debug!(%session, epoch, "revoke for a session not running here");
    }
}

/// The failpoint `recognizer::revoke=return(MS)` holds every revoke back for MS
/// milliseconds: the worker then goes on decoding and appending a session that has
/// moved on, as one cut off from the orchestrator but not from the broker would. The
/// zombie test uses it so that fencing, not the revoke, is what keeps it out of the
/// transcript. Without the `failpoints` feature this is always `None`.
fn revoke_delay() -> Option<Duration> {
    fail::fail_point!("recognizer::revoke", |ms| ms
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis));
    None
}

/// Serves one assignment to its end, retrying transient failures from the checkpoint,
/// then releases the slot.
async fn serve_session(
    ctx: Arc<Ctx>,
    leaders: LeaderClient,
    sessions: Sessions,
    a: Assignment,
    decoded_ms: Arc<AtomicU64>,
) {
    let (session, epoch) = (a.session, a.epoch);
    let mut backoff = BACKOFF_MIN;
    loop {
        match session::run(ctx.clone(), a.clone(), decoded_ms.clone()).await {
            Ok(segments) => {
                info!(%session, epoch, segments, "session done");
                break;
            }
            Err(SessionError::Fenced) => {
                // A newer epoch owns the session; its worker releases it.
                warn!(%session, epoch, "fenced by a newer epoch: stopping");
                sessions.finished(session, epoch);
                return;
            }
            Err(e) if e.is_permanent() => {
                error!(%session, epoch, error = %e, "session cannot be decoded here");
                break;
            }
            Err(e) => {
                warn!(%session, epoch, error = %e, retry_in_ms = backoff.as_millis() as u64, "session failed; retrying from its checkpoint");
                if matches!(e, SessionError::Log(_)) {
                    ctx.forget_appender(session).await;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    sessions.finished(session, epoch);
    let request = ReleaseWorkerRequest {
        worker_id: ctx.worker_id.clone(),
        session_id: session.to_string(),
        epoch,
    };
    let released = leaders
        .call(RELEASE_PATIENCE, |mut client| {
            let request = request.clone();
            async move { client.release_worker(request).await }
        })
        .await;
    match released {
        Ok(response) => info!(%session, epoch, released = response.released, "worker released"),
        // The slot stays taken until this worker registers again (its registration
        // lists what it serves) or is lost.
        Err(status) => warn!(%session, epoch, message = status.message(), "release failed"),
    }
}

fn parse_assign(assign: &Assign) -> Result<Assignment, String> {
    let session = assign
        .session_id
        .parse::<SessionId>()
        .map_err(|e| format!("session id: {e}"))?;
    let encoding = parse_encoding(&assign.encoding).map_err(|e| e.to_string())?;
    Ok(Assignment {
        session,
        epoch: assign.epoch,
        tenant: assign.tenant.clone(),
        model: assign.model_name.clone(),
        opened_at_ms: assign.opened_at_ms,
        format: AudioFormat {
            sample_rate: assign.sample_rate,
            encoding,
        },
    })
}

/// /readyz: Redis answers, the broker answers, the orchestrator stream is open.
struct Ready {
    redis: redis::aio::ConnectionManager,
    log: StreamLog,
    probe_stream: String,
    registered: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl observability::Readiness for Ready {
    async fn check(&self) -> Result<(), String> {
        let timeout = Duration::from_secs(1);
        let mut redis = self.redis.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(timeout, ping.query_async::<String>(&mut redis)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("redis: {e}")),
            Err(_) => return Err("redis: no answer within 1 s".into()),
        }
        let query = self
            .log
            .last_publishing_id("readyz-probe", &self.probe_stream);
        match tokio::time::timeout(timeout, query).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("broker: {e}")),
            Err(_) => return Err("broker: no answer within 1 s".into()),
        }
        if !self.registered.load(Ordering::Relaxed) {
            return Err("not registered with the orchestrator".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_parse_and_bad_ones_are_refused() {
        let mut assign = Assign {
            session_id: "7d444840-9dc0-11d1-b245-5ffdce74fad2".into(),
            model_name: "whisper-tiny.en".into(),
            tenant: "t".into(),
            epoch: 3,
            opened_at_ms: 1000,
            sample_rate: 16000,
            encoding: "pcm_s16le".into(),
        };
        let a = parse_assign(&assign).unwrap();
        assert_eq!(a.epoch, 3);
        assert_eq!(a.format.sample_rate, 16000);
        assign.encoding = "mp3".into();
        assert!(parse_assign(&assign).is_err());
        assign.encoding = "pcm_s16le".into();
        assign.session_id = "nope".into();
        assert!(parse_assign(&assign).is_err());
    }
}
