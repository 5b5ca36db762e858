//! One WebSocket connection: feeds the [`Session`] state machine from the socket, the
//! broker's confirmations, the session's results and the clocks, and carries out the
//! actions it answers with.
//!
//! Acknowledgements come only from `PendingAppend::confirmed`, polled in append order
//! (a `FuturesOrdered`), so acks leave in sequence order and a chunk whose confirmation
//! failed or never came is never acknowledged: the session fails instead.
//!
//! A connection that drops leaves its session open for the client to resume, on this
//! node or another: only an error the client made closes the session in the log.
//! Resuming takes the session's input over ([`crate::writers`]), appends a
//! `SessionResumed` marker and reads the input up to it ([`crate::resume`]), so that
//! the client learns exactly which frames are stored.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use eventlog::log::{LogError, PendingAppend, ReadFrom};
use eventlog::{Envelope, Event, SessionId};
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, SplitStream};
use futures::{FutureExt, StreamExt};
use orchestrator::api::{AllocateWorkerRequest, allocate_worker_response::Outcome};
use orchestrator::discovery::LeaderClient;
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

use crate::appenders::Lease;
use crate::metrics;
use crate::outbox::Outbox;
use crate::protocol::{Secret, SessionError};
use crate::quota::Slot;
use crate::results_hub::{ResultItem, Subscription};
use crate::resume::{InputScan, ResumeClaims, StoredInput};
use crate::server::Node;
use crate::session::{Action, Allocation, Appended, Session};
use crate::writers::Writer;

/// How long the broker may take to confirm an append before the log counts as
/// unavailable.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long AllocateWorker may take, retries through an orchestrator leader failover
/// included.
const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(10);
/// While no worker has announced itself, AllocateWorker is sent again this often: it
/// is idempotent, and should Redis have lost the session it queues it anew.
const REALLOCATE_INTERVAL: Duration = Duration::from_secs(2);
/// After sending a close frame, how long to read (and discard) the client's remaining
/// frames while waiting for its close: closing a socket with unread input makes the
/// kernel reset it, and the client could lose the error message.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);
/// How long a resume may take to read the session's input up to its marker.
const SCAN_TIMEOUT: Duration = Duration::from_secs(10);
/// A session's first events are found this far before its `opened_at_ms`: the broker
/// finds timestamps per chunk of messages.
const LOOKBACK_MS: u64 = 5_000;

type Confirm = BoxFuture<'static, (Appended, Instant, Result<(), LogError>)>;

/// Serves one upgraded socket to its end. `permit` is `None` when the node is full.
pub async fn serve(
    node: Arc<Node>,
    socket: WebSocket,
    permit: Option<OwnedSemaphorePermit>,
    bearer: Option<Secret>,
) {
    let (sink, mut stream) = socket.split();
    let outbox = Outbox::spawn(sink);
    let error = match permit {
        None => Some(SessionError::TooManyConnections(node.max_connections)),
        Some(_permit) => {
            let mut connection = Connection::new(node.clone(), &outbox, bearer);
            let end = connection.run(&mut stream).await;
            connection.finish(&end).await;
            match end {
                End::Closed(error) => error,
                End::Disconnected => return,
            }
        }
    };
    if let Some(e) = &error {
        metrics::error(e);
        tracing::info!(code = e.code(), error = %e, "closing connection");
    }
    outbox.close(error.as_ref()).await;
    let _ = tokio::time::timeout(CLOSE_DRAIN, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

enum End {
    /// The session produced a close (normal with `None`).
    Closed(Option<SessionError>),
    /// The client went away; there is no one to tell anything.
    Disconnected,
}

struct Connection<'a> {
    node: Arc<Node>,
    outbox: &'a Outbox,
    session: Session,
    /// This connection's name as the producer of what it appends (the node's id and a
    /// connection number): the writer a `SessionResumed` names.
    writer_id: String,
    /// Its right to append the session's input, once it has a session.
    writer: Option<Arc<Writer>>,
    lease: Option<Lease>,
    confirms: FuturesOrdered<Confirm>,
    results: Option<Subscription>,
    opened: bool,
    /// What AllocateWorker is asked, once the session is open.
    allocation: Option<AllocateWorkerRequest>,
    /// The session's place in its tenant's quota on this node.
    tenant_slot: Option<Slot>,
    /// Held while the orchestrator has the session waiting for a worker.
    waiting: Option<OwnedSemaphorePermit>,
}

impl<'a> Connection<'a> {
    fn new(node: Arc<Node>, outbox: &'a Outbox, bearer: Option<Secret>) -> Self {
        let session = Session::new(node.session_config.clone(), Uuid::new_v4(), bearer);
        let writer_id = format!("{}/{:08x}", node.node_id, rand::random::<u32>());
        Self {
            node,
            outbox,
            session,
            writer_id,
            writer: None,
            lease: None,
            confirms: FuturesOrdered::new(),
            results: None,
            opened: false,
            allocation: None,
            tenant_slot: None,
            waiting: None,
        }
    }

    async fn run(&mut self, stream: &mut SplitStream<WebSocket>) -> End {
        let mut shutdown = self.node.shutdown.clone();
        let mut ping = tokio::time::interval(self.node.ping_interval);
        ping.reset(); // the first tick would fire at once
        let idle_timeout = self.node.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut reallocate = tokio::time::interval(REALLOCATE_INTERVAL);
        reallocate.reset();
        loop {
            // When the frame that led to an append arrived: the start of its ack latency.
            let mut received = Instant::now();
            let (actions, result_at_ms) = tokio::select! {
                () = stopping(&mut shutdown) => {
                    (self.session.fail(SessionError::ShuttingDown), None)
                }
                Some((appended, received, outcome)) = self.confirms.next() => {
                    (self.on_confirm(appended, received, outcome).await, None)
                }
                frame = stream.next() => {
                    received = Instant::now();
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                    match frame {
                        Some(Ok(Message::Text(text))) => (self.session.on_text(&text), None),
                        Some(Ok(Message::Binary(bytes))) => (self.session.on_binary(bytes), None),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => (Vec::new(), None),
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                            return End::Disconnected;
                        }
                    }
                }
                item = recv_result(&mut self.results) => match item {
                    Some(Ok(envelope)) => (self.session.on_result(&envelope.event), Some(envelope.at_ms)),
                    // Skipping an unreadable result could hide a final: the session ends.
                    Some(Err(unreadable)) => (self.session.fail(SessionError::Internal(unreadable)), None),
                    None => (
                        self.session.fail(SessionError::BrokerUnavailable("results stream closed".into())),
                        None,
                    ),
                },
                _ = ping.tick() => {
                    self.outbox.ping();
                    (Vec::new(), None)
                }
                _ = reallocate.tick(), if self.session.awaiting_worker() => {
                    (self.reallocate().await, None)
                }
                _ = &mut idle => {
                    (self.session.fail(SessionError::IdleTimeout(idle_timeout.as_secs())), None)
                }
                () = superseded(&self.writer) => (self.session.fail(SessionError::Superseded), None),
            };
            if let Some(error) = self.perform(actions, received, result_at_ms).await {
                return End::Closed(error);
            }
            if !self.session.awaiting_worker() {
                self.waiting = None;
            }
        }
    }

    /// Carries out actions (and the actions they lead to) until the queue is empty or
    /// the session closes; returns the close.
    async fn perform(
        &mut self,
        actions: Vec<Action>,
        received: Instant,
        result_at_ms: Option<u64>,
    ) -> Option<Option<SessionError>> {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            let next = match action {
                Action::Open {
                    session,
                    tenant,
                    model,
                    format,
                } => self.open(session, tenant, model, format).await,
                Action::Resume {
                    session,
                    tenant,
                    claims,
                } => self.resume(session, tenant, claims, received).await,
                Action::AppendChunk(chunk) => {
                    self.append(
                        Appended::Chunk(chunk.seq),
                        Event::AudioChunk(chunk),
                        received,
                    )
                    .await
                }
                Action::AppendEnd { last_seq } => {
                    self.append(Appended::End, Event::EndOfStream { last_seq }, received)
                        .await
                }
                Action::Send(message) => match self.outbox.send(&message, result_at_ms) {
                    Ok(()) => Vec::new(),
                    Err(_) => self.session.fail(SessionError::ClientTooSlow),
                },
                Action::Close(error) => return Some(error),
            };
            queue.extend(next);
        }
        None
    }

    /// Appends SessionOpened, waits for it, starts following the results and asks the
    /// orchestrator for a worker.
    async fn open(
        &mut self,
        session: SessionId,
        tenant: String,
        model: String,
        format: eventlog::AudioFormat,
    ) -> Vec<Action> {
        if let Err(refused) = self.take_session(session, &tenant).await {
            return refused;
        }
        let opened_at_ms = eventlog::now_ms();
        let opened = Event::SessionOpened {
            tenant: tenant.clone(),
            model: model.clone(),
            format,
        };
        if let Err(refused) = self.append_now(opened, opened_at_ms).await {
            return refused;
        }
        self.opened = true;
        metrics::session_opened();
        tracing::info!(%session, %model, writer = %self.writer_id, "session opened");
        self.results = Some(self.node.results.subscribe(session));

        let mut actions = self.session.on_opened(opened_at_ms);
        self.allocation = Some(allocation_request(
            session,
            tenant,
            model,
            format,
            opened_at_ms,
        ));
        match self.allocate().await {
            Ok(allocation) => actions.extend(self.on_allocation(allocation)),
            Err(e) => actions.extend(self.session.fail(SessionError::OrchestratorUnavailable(e))),
        }
        actions
    }

    /// Continues a session a client opened on an earlier connection: takes its input
    /// over (fencing the earlier connection if it is on this node), marks the takeover
    /// in the log, reads the input up to the marker to learn what is stored, and
    /// follows the session's results from its start.
    async fn resume(
        &mut self,
        session: SessionId,
        tenant: String,
        claims: ResumeClaims,
        received: Instant,
    ) -> Vec<Action> {
        if let Err(refused) = self.take_session(session, &tenant).await {
            return refused;
        }
        // The results reader opens while the input is scanned; what it delivers waits
        // in its channel until the session is resumed.
        self.results = Some(self.node.results.history(session, claims.opened_at_ms));
        let stored = match self.scan_input(session, &claims).await {
            Ok(stored) => stored,
            Err(refused) => return refused,
        };
        self.opened = true;
        metrics::session_resumed(received.elapsed());
        tracing::info!(%session, writer = %self.writer_id, next_seq = stored.next_seq, ended = stored.ended, "session resumed");
        let ResumeClaims {
            opened_at_ms,
            model,
            format,
        } = claims;
        self.allocation = Some(allocation_request(
            session,
            tenant,
            model,
            format,
            opened_at_ms,
        ));
        self.session.on_resumed(stored)
    }

    /// Appends this writer's `SessionResumed` and reads the session's input up to it,
    /// from the recognizer's checkpoint when there is one (everything before it is
    /// decoded, so stored) or else from the session's start.
    async fn scan_input(
        &mut self,
        session: SessionId,
        claims: &ResumeClaims,
    ) -> Result<StoredInput, Vec<Action>> {
        let checkpoint = self.node.checkpoints.load(session).await.unwrap_or_else(|e| {
            tracing::warn!(%session, error = %e, "no checkpoint to start the scan from: scanning from the start");
            None
        });
        let (from, mut scan) = match checkpoint {
            Some(checkpoint) => {
                let point = checkpoint.point;
                let samples_before = point.session_sample - u64::from(point.sample_in_chunk);
                (
                    ReadFrom::Offset(point.chunk_offset),
                    InputScan::new(
                        claims.format,
                        point.chunk_seq,
                        samples_before,
                        &self.writer_id,
                    ),
                )
            }
            None => (
                ReadFrom::Timestamp(claims.opened_at_ms.saturating_sub(LOOKBACK_MS)),
                InputScan::new(claims.format, 0, 0, &self.writer_id),
            ),
        };
        let marker = Event::SessionResumed {
            writer: self.writer_id.clone(),
        };
        self.append_now(marker, eventlog::now_ms()).await?;
        let stream = self.node.layout.audio_stream(session);
        let scanned = tokio::time::timeout(SCAN_TIMEOUT, async {
            let mut reader = self.node.log.reader(&stream, from, Some(session)).await?;
            while let Some(record) = reader.next().await {
                if scan.push(&record?.envelope.event) {
                    reader.close().await;
                    return Ok(scan.stored());
                }
            }
            Err(LogError::Consumer {
                stream: stream.clone(),
                message: "the stream ended before the resume marker".into(),
            })
        })
        .await;
        match scanned {
            Ok(Ok(stored)) => Ok(stored),
            Ok(Err(e)) => Err(self.broker_failed(e).await),
            Err(_) => Err(self.session.fail(SessionError::BrokerUnavailable(format!(
                "the resume marker was not read back within {SCAN_TIMEOUT:?}"
            )))),
        }
    }

    /// Takes the tenant's quota slot, the partition's producer and the session's
    /// writer for this connection.
    async fn take_session(&mut self, session: SessionId, tenant: &str) -> Result<(), Vec<Action>> {
        let node = self.node.clone();
        match node.tenant_quota.try_take(tenant) {
            Some(slot) => self.tenant_slot = Some(slot),
            None => {
                let limit = node.tenant_quota.limit();
                return Err(self.session.fail(SessionError::TenantSessionLimit {
                    tenant: tenant.into(),
                    limit,
                }));
            }
        }
        match node.appenders.get(node.layout.partition_of(session)).await {
            Ok(lease) => self.lease = Some(lease),
            Err(e) => {
                return Err(self
                    .session
                    .fail(SessionError::BrokerUnavailable(e.to_string())));
            }
        }
        self.writer = Some(node.writers.claim(session).await);
        Ok(())
    }

    /// Appends an event as this session's writer and waits for its confirmation.
    async fn append_now(&mut self, event: Event, at_ms: u64) -> Result<(), Vec<Action>> {
        let pending = match self.enqueue(event, at_ms).await {
            Ok(pending) => pending,
            Err(refused) => return Err(refused),
        };
        let lease = self.lease.clone().expect("a writer has a producer");
        match confirmed(lease.appender.stream(), pending).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.broker_failed(e).await),
        }
    }

    /// Hands an event to the broker as this session's writer: refused once a newer
    /// connection took the session over.
    async fn enqueue(&mut self, event: Event, at_ms: u64) -> Result<PendingAppend, Vec<Action>> {
        let writer = self
            .writer
            .clone()
            .expect("appends follow taking the session");
        let lease = self.lease.clone().expect("a writer has a producer");
        let Some(_gate) = writer.admit().await else {
            return Err(self.session.fail(SessionError::Superseded));
        };
        let envelope = Envelope {
            session: Some(self.session.id()),
            at_ms,
            producer: self.writer_id.clone(),
            event,
        };
        match lease.appender.append(&envelope).await {
            Ok(pending) => Ok(pending),
            Err(e) => Err(self.broker_failed(e).await),
        }
    }

    /// The orchestrator's answer: a queued session takes one of the node's waiting
    /// places, or is refused when there is none left.
    fn on_allocation(&mut self, allocation: Allocation) -> Vec<Action> {
        if matches!(allocation, Allocation::Queued { .. }) && self.waiting.is_none() {
            match self.node.waiting.clone().try_acquire_owned() {
                Ok(permit) => self.waiting = Some(permit),
                Err(_) => {
                    let limit = self.node.max_waiting;
                    return self.session.fail(SessionError::TooManyWaiting { limit });
                }
            }
        }
        self.session.on_allocation(allocation)
    }

    /// Asks the orchestrator leader for a worker, through leader failovers.
    fn allocate(&self) -> impl Future<Output = Result<Allocation, String>> + Send + use<> {
        let mut request = self
            .allocation
            .clone()
            .expect("allocation follows a successful open");
        request.min_epoch = self.session.latest_epoch();
        allocate(self.node.orchestrator.clone(), request)
    }

    /// Asks again for a session still waiting for its worker; a failure here is not
    /// the session's: the session stays queued and the next attempt follows.
    async fn reallocate(&mut self) -> Vec<Action> {
        match self.allocate().await {
            Ok(allocation) => self.on_allocation(allocation),
            Err(e) => {
                tracing::warn!(session = %self.session.id(), error = %e, "asking again for a worker failed");
                Vec::new()
            }
        }
    }

    /// Hands an event to the broker and queues its confirmation.
    async fn append(&mut self, appended: Appended, event: Event, received: Instant) -> Vec<Action> {
        match self.enqueue(event, eventlog::now_ms()).await {
            Ok(pending) => {
                let lease = self.lease.as_ref().expect("a writer has a producer");
                let stream = lease.appender.stream().to_string();
                self.confirms.push_back(
                    async move { (appended, received, confirmed(&stream, pending).await) }.boxed(),
                );
                Vec::new()
            }
            Err(refused) => refused,
        }
    }

    async fn on_confirm(
        &mut self,
        appended: Appended,
        received: Instant,
        outcome: Result<(), LogError>,
    ) -> Vec<Action> {
        match outcome {
            Ok(()) => {
                if let Appended::Chunk(_) = appended {
                    metrics::chunk_confirmed(received.elapsed());
                }
                self.session.on_confirmed(appended)
            }
            Err(e) => self.broker_failed(e).await,
        }
    }

    async fn broker_failed(&mut self, error: LogError) -> Vec<Action> {
        tracing::warn!(session = %self.session.id(), %error, "append failed");
        if let Some(lease) = &self.lease {
            self.node.appenders.discard(lease).await;
        }
        self.session
            .fail(SessionError::BrokerUnavailable(error.to_string()))
    }

    /// Stops the session's background work; unconfirmed appends are dropped unacked.
    /// A dropped connection leaves the session to be resumed (its recognizer
    /// completes it if no one comes back); a session that failed through the
    /// client's fault is marked closed in the log, so that its worker completes it at
    /// once.
    async fn finish(&mut self, end: &End) {
        self.results = None;
        if self.opened {
            metrics::session_gone();
            if let End::Closed(Some(error)) = end
                && !error.is_resumable()
            {
                let closed = Event::SessionClosed {
                    reason: error.code().into(),
                };
                // Best effort: a broker failure here leaves the session to the
                // recognizer's abandonment timeout.
                let _ = self.append_now(closed, eventlog::now_ms()).await;
            }
        }
        if let Some(writer) = self.writer.take() {
            self.node.writers.release(self.session.id(), &writer);
        }
    }
}

/// What AllocateWorker is asked for a session.
fn allocation_request(
    session: SessionId,
    tenant: String,
    model: String,
    format: eventlog::AudioFormat,
    opened_at_ms: u64,
) -> AllocateWorkerRequest {
    AllocateWorkerRequest {
        session_id: session.to_string(),
        model_name: model,
        tenant,
        opened_at_ms,
        sample_rate: format.sample_rate,
        encoding: format.encoding.name().into(),
        min_epoch: 0,
    }
}

/// Resolves once a newer connection took the session over; never without a session.
async fn superseded(writer: &Option<Arc<Writer>>) {
    match writer {
        Some(writer) => writer.superseded().await,
        None => std::future::pending().await,
    }
}

/// Resolves once the node is shutting down.
async fn stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard wait_for returns is not Send; it must not live across the select.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Waits for the broker's confirmation, bounded by [`CONFIRM_TIMEOUT`].
async fn confirmed(stream: &str, pending: PendingAppend) -> Result<(), LogError> {
    let publishing_id = pending.publishing_id;
    match tokio::time::timeout(CONFIRM_TIMEOUT, pending.confirmed()).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => Err(LogError::NotConfirmed {
            stream: stream.into(),
            publishing_id,
            message: format!("no confirmation within {CONFIRM_TIMEOUT:?}"),
        }),
    }
}

/// The next result, or never when the session has no results to follow yet.
async fn recv_result(results: &mut Option<Subscription>) -> Option<ResultItem> {
    match results {
        Some(subscription) => subscription.results.recv().await,
        None => std::future::pending().await,
    }
}

/// One AllocateWorker call, retried through leader failovers for up to
/// [`ALLOCATE_TIMEOUT`].
async fn allocate(
    orchestrator: LeaderClient,
    request: AllocateWorkerRequest,
) -> Result<Allocation, String> {
    let answer = tokio::time::timeout(
        ALLOCATE_TIMEOUT,
        orchestrator.call(ALLOCATE_TIMEOUT, |mut client| {
            let request = request.clone();
            async move { client.allocate_worker(request).await }
        }),
    )
    .await;
    match answer {
        Ok(Ok(response)) => match response.outcome {
            Some(Outcome::Allocated(_)) => Ok(Allocation::Allocated),
            Some(Outcome::Queued(q)) => Ok(Allocation::Queued {
                position: q.position,
            }),
            None => Err("AllocateWorker answered without an outcome".to_string()),
        },
        Ok(Err(status)) => Err(status.to_string()),
        Err(_) => Err(format!("AllocateWorker took over {ALLOCATE_TIMEOUT:?}")),
    }
}
