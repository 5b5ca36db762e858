//! The `WorkerManager` gRPC service: allocation, registration, heartbeats, release,
//! and the handling of lost workers.
//!
//! Every decision that gives or takes a slot runs inside one critical section (the
//! `connections` lock), reading the registry, deciding with [`crate::allocator`] and
//! writing the outcome back, so a slot is never given twice. Each decision is appended
//! to the control stream *before* it is committed to Redis: an append that fails
//! leaves the session waiting (to be retried with a fresh epoch), so the log never
//! misses an assignment that took effect.
//!
//! A connected worker's `RegisterWorker` stream is fed from an mpsc channel held in
//! `connections`. When tonic drops that stream (the worker's socket closed) a guard
//! reports it to [`WorkerManagerService::handle_disconnects`] and the worker is marked
//! lost; a worker that goes silent with its socket open is caught by
//! [`WorkerManagerService::expire_silent_workers`].
//!
//! Only the leader replica serves ([`WorkerManagerService::begin_term`]); the others
//! answer every call with `UNAVAILABLE` so that clients look the leader up again
//! ([`crate::discovery`]). A new leader starts from Redis as its predecessor left it:
//! workers re-register (their stream to the old leader broke) saying what they still
//! serve, which the leader keeps, and silent ones are timed from the term's start.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use eventlog::events::SessionLoad;
use eventlog::log::{Appender, LogError};
use eventlog::{AudioEncoding, AudioFormat, Envelope, Event, SessionId, now_ms};
use futures::Stream;
use thiserror::Error;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use uuid::Uuid;

use crate::allocator::{self, WorkerLoad};
use crate::api::worker_manager_server::WorkerManager;
use crate::api::{
    self, AllocateWorkerRequest, AllocateWorkerResponse, Allocation, DrainWorkerRequest,
    DrainWorkerResponse, Queued, RegisterWorkerRequest, ReleaseWorkerRequest,
    ReleaseWorkerResponse, SendHeartbeatRequest, SendHeartbeatResponse, WorkerCommand,
    allocate_worker_response, worker_command,
};
use crate::leadership::Leader;
use crate::registry::{Fence, Registry, RegistryError, SessionRecord, SessionState, WorkerRecord};
use crate::telemetry;

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Registry(RegistryError::Corrupt { .. }) => {
                Status::internal(e.to_string())
            }
            _ => Status::unavailable(e.to_string()),
        }
    }
}

/// Where the service appends, and who it says it is.
pub struct Appenders {
    /// `{prefix}.control`: registrations, allocations, queueing, releases, losses.
    pub control: Appender,
    /// `{prefix}.heartbeats`: the workers' load reports.
    pub heartbeats: Appender,
    /// The envelope producer, `orchestrator.{incarnation}`.
    pub producer: String,
}

type CommandSender = mpsc::UnboundedSender<Result<WorkerCommand, Status>>;

/// A worker's open `RegisterWorker` stream. The id tells a stream apart from a later
/// one of the same worker, whose registration must survive the old stream's close.
struct Connection {
    id: u64,
    commands: CommandSender,
}

type Connections = HashMap<String, Connection>;

/// A worker's stream ended: (worker, connection id).
type Disconnect = (String, u64);

/// The ends of worker streams, to be fed to [`WorkerManagerService::handle_disconnects`].
pub struct Disconnects(mpsc::UnboundedReceiver<Disconnect>);

/// The gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct WorkerManagerService {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    appenders: Appenders,
    heartbeat_timeout: Duration,
    /// The allocation critical section, and the push channels of connected workers.
    connections: Mutex<Connections>,
    next_connection: AtomicU64,
    disconnects: mpsc::UnboundedSender<Disconnect>,
    /// The fencing token of the term this replica leads; 0 while it does not lead.
    token: AtomicU64,
    /// When the current term began (Unix ms): workers are not timed out before they
    /// had a heartbeat timeout's time to reach the new leader.
    term_started_ms: AtomicU64,
}

impl WorkerManagerService {
    pub fn new(
        registry: Registry,
        appenders: Appenders,
        heartbeat_timeout: Duration,
    ) -> (Self, Disconnects) {
        let (disconnects, receiver) = mpsc::unbounded_channel();
        let service = Self {
            inner: Arc::new(Inner {
                registry,
                appenders,
                heartbeat_timeout,
                connections: Mutex::new(HashMap::new()),
                next_connection: AtomicU64::new(1),
                disconnects,
                token: AtomicU64::new(0),
                term_started_ms: AtomicU64::new(0),
            }),
        };
        (service, Disconnects(receiver))
    }

    /// Marks lost the workers whose stream ended, one at a time, until aborted.
    pub async fn handle_disconnects(self, mut disconnects: Disconnects) {
        while let Some((worker, connection)) = disconnects.0.recv().await {
            self.inner.stream_closed(&worker, connection).await;
        }
    }

    /// Closes the event-log producers once every other handle on the service is gone
    /// (the server stopped, its background tasks finished). The client library's
    /// drop of an open producer blocks its thread on the broker, so close them here.
    pub async fn close(self) {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => {
                inner.appenders.control.close().await;
                inner.appenders.heartbeats.close().await;
            }
            Err(_) => warn!("service still in use at close; its producers close on drop"),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Starts serving as the leader of `leader`'s term: the registry's fence now holds
    /// the term's lock value, and the term is announced on the control stream.
    pub async fn begin_term(&self, leader: &Leader, fence: &Fence) -> Result<(), ServiceError> {
        let inner = &self.inner;
        let _connections = inner.connections.lock().await;
        fence.set(Some(leader.value()));
        inner.token.store(leader.token, Ordering::Relaxed);
        inner.term_started_ms.store(now_ms(), Ordering::Relaxed);
        inner.mark_term(&leader.replica).await?;
        telemetry::term(leader.token);
        info!(token = leader.token, replica = %leader.replica, "leading");
        Ok(())
    }

    /// Appends the term's `LeaderElected` again (see [`crate::leadership`]).
    pub async fn mark_term(&self, replica: &str) -> Result<(), ServiceError> {
        Ok(self.inner.mark_term(replica).await?)
    }

    /// Stops serving: the fence is cleared first, so nothing more is written, then
    /// the workers' streams end and they look for the new leader.
    pub async fn end_term(&self, fence: &Fence) {
        fence.set(None);
        self.inner.token.store(0, Ordering::Relaxed);
        telemetry::term(0);
        self.disconnect_all().await;
    }

    /// Marks lost every worker whose last heartbeat is older than the timeout, revoking
    /// its sessions if its stream is still open, and reassigns them.
    pub async fn expire_silent_workers(&self) -> Result<(), ServiceError> {
        let inner = &self.inner;
        if !inner.registry.is_leading() {
            return Ok(());
        }
        let timeout_ms = inner.heartbeat_timeout.as_millis() as u64;
        let silent_for = |worker: &WorkerRecord| {
            let since = worker
                .last_heartbeat_ms
                .max(inner.term_started_ms.load(Ordering::Relaxed));
            now_ms().saturating_sub(since)
        };
        for worker in inner.registry.workers().await? {
            if silent_for(&worker) <= timeout_ms {
                continue;
            }
            let mut connections = inner.connections.lock().await;
            // Re-read under the lock: a heartbeat may have arrived meanwhile.
            let Some(current) = inner.registry.worker(&worker.id).await? else {
                continue;
            };
            let silent_ms = silent_for(&current);
            if silent_ms <= timeout_ms {
                continue;
            }
            let reason = format!("no heartbeat for {silent_ms} ms");
            inner.lose(&mut connections, current, &reason).await?;
        }
        Ok(())
    }

    /// Stops giving `worker` new sessions (`draining`), or starts again. Returns the
    /// sessions it serves, `None` when the worker is not registered.
    pub async fn set_draining(
        &self,
        worker: &str,
        draining: bool,
    ) -> Result<Option<u32>, ServiceError> {
        let inner = &self.inner;
        let connections = inner.connections.lock().await;
        let Some(record) = inner.registry.worker(worker).await? else {
            return Ok(None);
        };
        let sessions = record.sessions.len() as u32;
        if record.draining == draining {
            return Ok(Some(sessions));
        }
        inner
            .append_control(
                None,
                Event::WorkerDraining {
                    worker: worker.to_string(),
                    draining,
                    token: inner.token(),
                },
            )
            .await?;
        inner.registry.set_draining(worker, draining).await?;
        info!(
            worker,
            draining,
            sessions = record.sessions.len(),
            "worker draining changed"
        );
        if !draining {
            inner.serve_queue(&connections, &record.model).await?;
        }
        Ok(Some(sessions))
    }

    /// Removes a drained worker and tells it to stop. Sessions it still serves (the
    /// drain timed out) go back to the head of the queue and are revoked on the
    /// worker: their next worker resumes them from their checkpoints, as after a
    /// failure, so nothing is lost. Returns how many moved, `None` when the worker is
    /// not registered.
    pub async fn retire(&self, worker: &str) -> Result<Option<u32>, ServiceError> {
        let inner = &self.inner;
        let mut connections = inner.connections.lock().await;
        let Some(record) = inner.registry.worker(worker).await? else {
            return Ok(None);
        };
        let moving = inner.unfinished(&record, &[]).await?;
        let moved = moving.len() as u32;
        inner
            .append_control(
                None,
                Event::WorkerRetired {
                    worker: worker.to_string(),
                    moved,
                    token: inner.token(),
                },
            )
            .await?;
        inner.remove(&record, &moving).await?;
        if let Some(connection) = connections.remove(worker) {
            for session in &moving {
                revoke(&connection.commands, session.id, session.epoch);
            }
            let _ = connection.commands.send(Ok(WorkerCommand {
                command: Some(worker_command::Command::Stop(api::Stop {
                    reason: format!("drained and retired ({moved} sessions moved)"),
                })),
            }));
        }
        info!(worker, moved, "worker retired");
        inner.serve_queue(&connections, &record.model).await?;
        Ok(Some(moved))
    }

    /// Logs an autoscaler decision on the control stream.
    pub async fn log_scaling(
        &self,
        model: &str,
        policy: &str,
        workers: u32,
    ) -> Result<(), ServiceError> {
        let inner = &self.inner;
        inner
            .append_control(
                None,
                Event::ScalingDecided {
                    model: model.to_string(),
                    policy: policy.to_string(),
                    workers,
                    token: inner.token(),
                },
            )
            .await?;
        Ok(())
    }

    /// Ends every worker stream without marking anyone lost, so a graceful shutdown
    /// does not wait on streams that never finish. The workers re-register elsewhere.
    pub async fn disconnect_all(&self) {
        self.inner.connections.lock().await.clear();
    }
}

/// A session as a request describes it, validated: waiting, under no epoch yet.
fn session_record(
    session_id: &str,
    model: String,
    tenant: String,
    opened_at_ms: u64,
    sample_rate: u32,
    encoding: &str,
) -> Result<SessionRecord, Status> {
    let id = Uuid::parse_str(session_id)
        .map_err(|e| Status::invalid_argument(format!("session_id is not a UUID: {e}")))?;
    if model.is_empty() {
        return Err(Status::invalid_argument("model_name is empty"));
    }
    let encoding = AudioEncoding::from_name(encoding)
        .ok_or_else(|| Status::invalid_argument(format!("unknown encoding {encoding:?}")))?;
    if sample_rate == 0 {
        return Err(Status::invalid_argument("sample_rate is 0"));
    }
    let now = now_ms();
    Ok(SessionRecord {
        id,
        tenant,
        model,
        opened_at_ms,
        format: AudioFormat {
            sample_rate,
            encoding,
        },
        requested_at_ms: now,
        queued_at_ms: now,
        epoch: 0,
        worker: None,
        state: SessionState::Waiting,
    })
}

/// A validated AllocateWorker request, and its epoch floor.
fn new_session(request: AllocateWorkerRequest) -> Result<(SessionRecord, u64), Status> {
    let session = session_record(
        &request.session_id,
        request.model_name,
        request.tenant,
        request.opened_at_ms,
        request.sample_rate,
        &request.encoding,
    )?;
    Ok((session, request.min_epoch))
}

/// An assignment a re-registering worker says it serves, as the session it describes.
fn held_session(assign: api::Assign) -> Result<SessionRecord, Status> {
    let mut session = session_record(
        &assign.session_id,
        assign.model_name,
        assign.tenant,
        assign.opened_at_ms,
        assign.sample_rate,
        &assign.encoding,
    )?;
    if assign.epoch == 0 {
        return Err(Status::invalid_argument("a held assignment has epoch 0"));
    }
    session.epoch = assign.epoch;
    session.state = SessionState::Assigned;
    Ok(session)
}

fn parse_session(id: &str) -> Result<SessionId, Status> {
    Uuid::parse_str(id).map_err(|e| Status::invalid_argument(format!("bad session id: {e}")))
}

fn allocated(worker: String, epoch: u64) -> AllocateWorkerResponse {
    AllocateWorkerResponse {
        outcome: Some(allocate_worker_response::Outcome::Allocated(Allocation {
            worker_id: worker,
            epoch,
        })),
    }
}

fn queued(position: u32, model: &str) -> AllocateWorkerResponse {
    AllocateWorkerResponse {
        outcome: Some(allocate_worker_response::Outcome::Queued(Queued {
            position,
            reason: format!("no worker of model {model} has a free slot"),
        })),
    }
}

impl Inner {
    fn token(&self) -> u64 {
        self.token.load(Ordering::Relaxed)
    }

    /// Refuses calls while this replica does not lead.
    fn ensure_leading(&self) -> Result<(), Status> {
        if self.registry.is_leading() {
            Ok(())
        } else {
            Err(Status::unavailable(
                "this orchestrator replica is not the leader: look the leader up again",
            ))
        }
    }

    async fn mark_term(&self, replica: &str) -> Result<(), LogError> {
        self.append_control(
            None,
            Event::LeaderElected {
                replica: replica.to_string(),
                token: self.token(),
            },
        )
        .await
    }

    async fn append_control(
        &self,
        session: Option<SessionId>,
        event: Event,
    ) -> Result<(), LogError> {
        let envelope = Envelope {
            session,
            at_ms: now_ms(),
            producer: self.appenders.producer.clone(),
            event,
        };
        self.appenders.control.append_confirmed(&envelope).await?;
        Ok(())
    }

    /// What AllocateWorker answers for a session it already knows.
    async fn describe(
        &self,
        session: SessionRecord,
    ) -> Result<AllocateWorkerResponse, ServiceError> {
        match (session.state, session.worker) {
            (SessionState::Assigned | SessionState::Done, Some(worker)) => {
                Ok(allocated(worker, session.epoch))
            }
            _ => {
                let position = self
                    .registry
                    .queue_position(&session.model, session.id)
                    .await?
                    .unwrap_or(0);
                Ok(queued(position, &session.model))
            }
        }
    }

    async fn allocate(
        &self,
        session: SessionRecord,
        min_epoch: u64,
    ) -> Result<AllocateWorkerResponse, ServiceError> {
        let connections = self.connections.lock().await;
        if let Some(known) = self.registry.session(session.id).await? {
            return self.describe(known).await;
        }
        // Queue first, then serve the queue: a newcomer never overtakes an older
        // waiting session, and a failure below leaves it safely waiting.
        self.registry
            .enqueue_new_session(&session, min_epoch)
            .await?;
        let assigned = self.serve_queue(&connections, &session.model).await?;
        if let Some((_, worker, epoch)) = assigned.into_iter().find(|(s, ..)| *s == session.id) {
            return Ok(allocated(worker, epoch));
        }
        let position = self
            .registry
            .queue_position(&session.model, session.id)
            .await?
            .unwrap_or(0);
        self.append_control(
            Some(session.id),
            Event::SessionQueued {
                model: session.model.clone(),
                position,
                token: self.token(),
            },
        )
        .await?;
        info!(session = %session.id, model = %session.model, position, "session queued");
        Ok(queued(position, &session.model))
    }

    /// Assigns a model's oldest waiting sessions to its connected workers' free slots.
    /// Returns the assignments made: (session, worker, epoch).
    async fn serve_queue(
        &self,
        connections: &Connections,
        model: &str,
    ) -> Result<Vec<(SessionId, String, u64)>, ServiceError> {
        // Only connected workers can be told about an assignment, and draining ones
        // take no new sessions.
        let mut loads: HashMap<String, WorkerLoad> = self
            .registry
            .workers_of(model)
            .await?
            .iter()
            .filter(|w| connections.contains_key(&w.id) && !w.draining)
            .map(|w| (w.id.clone(), w.load()))
            .collect();
        let free: u32 = loads.values().map(WorkerLoad::free_slots).sum();
        let waiting = self.registry.waiting(model, free as usize).await?;
        let plan = allocator::plan(&waiting, loads.values().cloned().collect());
        let mut assigned = Vec::with_capacity(plan.len());
        for (session_id, worker) in plan {
            let session =
                self.registry
                    .session(session_id)
                    .await?
                    .ok_or_else(|| RegistryError::Corrupt {
                        key: format!("queue of {model}"),
                        message: format!("waiting session {session_id} has no record"),
                    })?;
            let load = loads
                .get_mut(&worker)
                .expect("the plan only names given workers");
            load.assigned += 1;
            let epoch = self.assign(connections, &session, load).await?;
            assigned.push((session_id, worker, epoch));
        }
        Ok(assigned)
    }

    /// Gives a waiting session to a worker under a fresh epoch and tells the worker.
    /// `load` is the worker's load including this session.
    async fn assign(
        &self,
        connections: &Connections,
        session: &SessionRecord,
        load: &WorkerLoad,
    ) -> Result<u64, ServiceError> {
        let worker = &load.worker;
        let epoch = self.registry.next_epoch(session.id).await?;
        self.append_control(
            Some(session.id),
            Event::WorkerAllocated {
                worker: worker.clone(),
                model: session.model.clone(),
                epoch,
                token: self.token(),
            },
        )
        .await?;
        self.registry
            .commit_assignment(session, worker, epoch, load.state())
            .await?;
        let waited_ms = now_ms().saturating_sub(session.queued_at_ms);
        telemetry::allocation(waited_ms, epoch == 1);
        info!(session = %session.id, worker = %worker, epoch, waited_ms, "session assigned");
        let assign = api::Assign {
            session_id: session.id.to_string(),
            model_name: session.model.clone(),
            tenant: session.tenant.clone(),
            epoch,
            opened_at_ms: session.opened_at_ms,
            sample_rate: session.format.sample_rate,
            encoding: session.format.encoding.name().to_string(),
        };
        // A failed send means the stream is closing; its close marks the worker lost
        // and puts this session back in the queue.
        if let Some(connection) = connections.get(worker) {
            let _ = connection.commands.send(Ok(WorkerCommand {
                command: Some(worker_command::Command::Assign(assign)),
            }));
        }
        Ok(epoch)
    }

    /// Marks a worker lost: logs it, removes it, puts its unfinished sessions back at
    /// the head of the queue, revokes them on its stream if that is still open, and
    /// reassigns them where slots are free.
    async fn lose(
        &self,
        connections: &mut Connections,
        worker: WorkerRecord,
        reason: &str,
    ) -> Result<(), ServiceError> {
        let unfinished = self.unfinished(&worker, &[]).await?;
        self.log_loss(&worker, reason, unfinished.len()).await?;
        self.remove(&worker, &unfinished).await?;
        // Dropping the connection after the revokes ends the stream once they are sent.
        if let Some(connection) = connections.remove(&worker.id) {
            for session in &unfinished {
                revoke(&connection.commands, session.id, session.epoch);
            }
        }
        self.serve_queue(connections, &worker.model).await?;
        Ok(())
    }

    /// The sessions the registry gives `worker` that are not finished, except those in
    /// `kept` (which it says it still serves, under the recorded epoch).
    async fn unfinished(
        &self,
        worker: &WorkerRecord,
        kept: &[SessionRecord],
    ) -> Result<Vec<SessionRecord>, ServiceError> {
        let mut unfinished = Vec::new();
        for &id in &worker.sessions {
            if let Some(session) = self.registry.session(id).await?
                && session.state == SessionState::Assigned
                && session.worker.as_deref() == Some(worker.id.as_str())
                && !kept
                    .iter()
                    .any(|k| k.id == session.id && k.epoch == session.epoch)
            {
                unfinished.push(session);
            }
        }
        Ok(unfinished)
    }

    async fn log_loss(
        &self,
        worker: &WorkerRecord,
        reason: &str,
        sessions: usize,
    ) -> Result<(), ServiceError> {
        self.append_control(
            None,
            Event::WorkerLost {
                worker: worker.id.clone(),
                reason: reason.to_string(),
                token: self.token(),
            },
        )
        .await?;
        telemetry::worker_lost();
        warn!(worker = %worker.id, reason, sessions, "worker lost");
        Ok(())
    }

    /// Removes a worker's record and puts `moving` back at the head of the queue.
    async fn remove(
        &self,
        worker: &WorkerRecord,
        moving: &[SessionRecord],
    ) -> Result<(), ServiceError> {
        let order =
            allocator::head_push_order(moving.iter().map(|s| (s.id, s.requested_at_ms)).collect());
        self.registry
            .remove_worker(worker, &order, now_ms())
            .await?;
        Ok(())
    }

    async fn register(&self, request: RegisterWorkerRequest) -> Result<WorkerStream, ServiceError> {
        let mut connections = self.connections.lock().await;
        let mut held = Vec::with_capacity(request.held.len());
        for assign in request.held {
            match held_session(assign) {
                Ok(session) => held.push(session),
                Err(status) => {
                    warn!(worker = %request.worker_id, message = status.message(), "unusable held assignment ignored")
                }
            }
        }
        connections.remove(&request.worker_id);
        let previous = self.registry.worker(&request.worker_id).await?;
        // A draining worker stays draining through a re-registration (a new leader).
        let draining = previous.as_ref().is_some_and(|p| p.draining);
        if let Some(previous) = previous {
            // The same id again: a new process (whatever the old one held moves on,
            // with a new epoch) or the same one after its stream broke (a new leader,
            // Redis lost its data: what it still serves stays).
            let moving = self.unfinished(&previous, &held).await?;
            if !moving.is_empty() {
                self.log_loss(
                    &previous,
                    "registered again without its sessions",
                    moving.len(),
                )
                .await?;
            }
            self.remove(&previous, &moving).await?;
        }
        // proto3 has no "unset": a capacity of 0 means the default, one session.
        let capacity = request.capacity.max(1);
        self.append_control(
            None,
            Event::WorkerRegistered {
                worker: request.worker_id.clone(),
                model: request.model_name.clone(),
                capacity,
                token: self.token(),
            },
        )
        .await?;
        let now = now_ms();
        let record = WorkerRecord {
            id: request.worker_id.clone(),
            model: request.model_name.clone(),
            capacity,
            metrics_addr: request.metrics_addr,
            registered_at_ms: now,
            last_heartbeat_ms: now,
            sessions: Vec::new(),
            draining,
        };
        self.registry.put_worker(&record).await?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let adopted = self.adopt_held(&record, held, &commands).await?;
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        connections.insert(record.id.clone(), Connection { id, commands });
        info!(worker = %record.id, model = %record.model, capacity, adopted, "worker registered");
        let stream = WorkerStream {
            commands: UnboundedReceiverStream::new(receiver),
            _guard: CloseGuard {
                disconnects: self.disconnects.clone(),
                worker: record.id.clone(),
                connection: id,
            },
        };
        self.serve_queue(&connections, &record.model).await?;
        Ok(stream)
    }

    /// Keeps on a re-registering worker the sessions it still serves under their
    /// current epoch (or whose record Redis lost: the worker's epoch is then the log's
    /// latest), and revokes the others there. Returns how many it kept.
    async fn adopt_held(
        &self,
        worker: &WorkerRecord,
        held: Vec<SessionRecord>,
        commands: &CommandSender,
    ) -> Result<usize, ServiceError> {
        let mut load = worker.load();
        for session in held {
            let kept = match self.registry.session(session.id).await? {
                // Redis lost it: the worker's account is all there is.
                None => Some(session.clone()),
                Some(known) => {
                    let keep = known.epoch == session.epoch
                        && match known.state {
                            SessionState::Assigned => {
                                known.worker.as_deref() == Some(worker.id.as_str())
                            }
                            // Requeued while its worker was out of touch, and not yet
                            // given to anyone else: it can stay where it is.
                            SessionState::Waiting => true,
                            SessionState::Done => false,
                        };
                    keep.then_some(SessionRecord {
                        state: SessionState::Assigned,
                        ..known
                    })
                }
            };
            if let Some(record) = kept {
                load.assigned += 1;
                self.registry
                    .adopt(&record, &worker.id, load.state())
                    .await?;
                info!(session = %session.id, worker = %worker.id, epoch = session.epoch, "held session kept");
            } else {
                info!(session = %session.id, worker = %worker.id, epoch = session.epoch, "held session has moved on: revoked");
                revoke(commands, session.id, session.epoch);
            }
        }
        Ok(load.assigned as usize)
    }

    /// A worker's stream was dropped by tonic: unless a newer registration replaced it
    /// (or the worker was already marked lost), the worker is lost.
    async fn stream_closed(&self, worker: &str, connection: u64) {
        let mut connections = self.connections.lock().await;
        if connections.get(worker).map(|c| c.id) != Some(connection) {
            return;
        }
        let result = match self.registry.worker(worker).await {
            Ok(Some(record)) => {
                self.lose(&mut connections, record, "registration stream closed")
                    .await
            }
            Ok(None) => {
                connections.remove(worker);
                Ok(())
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            // The heartbeat monitor retries: this worker sends no more heartbeats.
            warn!(worker, error = %e, "could not mark a disconnected worker lost");
        }
    }

    async fn heartbeat(&self, request: SendHeartbeatRequest) -> Result<bool, Status> {
        let sessions = request
            .sessions
            .iter()
            .map(|s| {
                Ok(SessionLoad {
                    session: parse_session(&s.session_id)?,
                    epoch: s.epoch,
                    decoded_ms: s.decoded_ms,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let now = now_ms();
        let known = self
            .registry
            .touch_worker(&request.worker_id, now)
            .await
            .map_err(ServiceError::from)?;
        if known {
            let envelope = Envelope {
                session: None,
                at_ms: now,
                producer: self.appenders.producer.clone(),
                event: Event::Heartbeat {
                    worker: request.worker_id,
                    model: request.model_name,
                    capacity: request.capacity,
                    sessions,
                    token: self.token(),
                },
            };
            self.appenders
                .heartbeats
                .append_confirmed(&envelope)
                .await
                .map_err(ServiceError::from)?;
        }
        Ok(known)
    }

    async fn release(
        &self,
        worker: &str,
        session: SessionId,
        epoch: u64,
    ) -> Result<bool, ServiceError> {
        let connections = self.connections.lock().await;
        let Some(record) = self.registry.session(session).await? else {
            return Ok(false);
        };
        let current = record.worker.as_deref() == Some(worker) && record.epoch == epoch;
        match record.state {
            SessionState::Assigned if current => {}
            // A retry of a release that went through.
            SessionState::Done if current => return Ok(true),
            _ => {
                info!(%session, worker, epoch, current_epoch = record.epoch,
                    "stale release refused");
                return Ok(false);
            }
        }
        let Some(holder) = self.registry.worker(worker).await? else {
            return Ok(false);
        };
        self.append_control(
            Some(session),
            Event::WorkerReleased {
                worker: worker.to_string(),
                epoch,
                token: self.token(),
            },
        )
        .await?;
        let mut load = holder.load();
        load.assigned = load.assigned.saturating_sub(1);
        self.registry
            .commit_release(session, worker, load.state())
            .await?;
        info!(%session, worker, epoch, "session released");
        self.serve_queue(&connections, &record.model).await?;
        Ok(true)
    }
}

#[tonic::async_trait]
impl WorkerManager for WorkerManagerService {
    async fn allocate_worker(
        &self,
        request: Request<AllocateWorkerRequest>,
    ) -> Result<Response<AllocateWorkerResponse>, Status> {
        self.inner.ensure_leading()?;
        let (session, min_epoch) = new_session(request.into_inner())?;
        Ok(Response::new(
            self.inner.allocate(session, min_epoch).await?,
        ))
    }

    type RegisterWorkerStream = WorkerStream;

    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<WorkerStream>, Status> {
        self.inner.ensure_leading()?;
        let request = request.into_inner();
        if request.worker_id.is_empty() || request.model_name.is_empty() {
            return Err(Status::invalid_argument(
                "worker_id and model_name are required",
            ));
        }
        Ok(Response::new(self.inner.register(request).await?))
    }

    async fn send_heartbeat(
        &self,
        request: Request<SendHeartbeatRequest>,
    ) -> Result<Response<SendHeartbeatResponse>, Status> {
        self.inner.ensure_leading()?;
        let known = self.inner.heartbeat(request.into_inner()).await?;
        Ok(Response::new(SendHeartbeatResponse { known }))
    }

    async fn drain_worker(
        &self,
        request: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        self.inner.ensure_leading()?;
        let worker = request.into_inner().worker_id;
        let drained = self.set_draining(&worker, true).await?;
        Ok(Response::new(DrainWorkerResponse {
            found: drained.is_some(),
            sessions: drained.unwrap_or(0),
        }))
    }

    async fn release_worker(
        &self,
        request: Request<ReleaseWorkerRequest>,
    ) -> Result<Response<ReleaseWorkerResponse>, Status> {
        self.inner.ensure_leading()?;
        let request = request.into_inner();
        let session = parse_session(&request.session_id)?;
        let released = self
            .inner
            .release(&request.worker_id, session, request.epoch)
            .await?;
        Ok(Response::new(ReleaseWorkerResponse { released }))
    }
}

/// Tells a worker to stop serving a session (epoch `epoch` or older).
fn revoke(commands: &CommandSender, session: SessionId, epoch: u64) {
    // A failed send means the stream is closing: the worker is being lost anyway.
    let _ = commands.send(Ok(WorkerCommand {
        command: Some(worker_command::Command::Revoke(api::Revoke {
            session_id: session.to_string(),
            epoch,
        })),
    }));
}

/// The command stream of one registered worker.
pub struct WorkerStream {
    commands: UnboundedReceiverStream<Result<WorkerCommand, Status>>,
    _guard: CloseGuard,
}

impl Stream for WorkerStream {
    type Item = Result<WorkerCommand, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.commands).poll_next(cx)
    }
}

/// Reports the stream's end (tonic drops it when the worker's connection goes away).
struct CloseGuard {
    disconnects: mpsc::UnboundedSender<Disconnect>,
    worker: String,
    connection: u64,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        // Fails only once the service is shutting down, when nobody needs to know.
        let _ = self
            .disconnects
            .send((std::mem::take(&mut self.worker), self.connection));
    }
}
