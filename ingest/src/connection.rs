//! One WebSocket connection: feeds the [`Session`] state machine from the socket, the
//! broker's confirmations, the session's results and the clocks, and carries out the
//! actions it answers with.
//!
//! Acknowledgements come only from `PendingAppend::confirmed`, polled in append order
//! (a `FuturesOrdered`), so acks leave in sequence order and a chunk whose confirmation
//! failed or never came is never acknowledged: the session fails instead.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use eventlog::log::{LogError, PendingAppend};
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
use crate::server::Node;
use crate::session::{Action, Allocation, Appended, Session};

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
        Self {
            node,
            outbox,
            session,
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
        let node = self.node.clone();
        match node.tenant_quota.try_take(&tenant) {
            Some(slot) => self.tenant_slot = Some(slot),
            None => {
                let limit = node.tenant_quota.limit();
                return self
                    .session
                    .fail(SessionError::TenantSessionLimit { tenant, limit });
            }
        }
        let lease = match node.appenders.get(node.layout.partition_of(session)).await {
            Ok(lease) => lease,
            Err(e) => {
                return self
                    .session
                    .fail(SessionError::BrokerUnavailable(e.to_string()));
            }
        };
        let opened = Envelope {
            session: Some(session),
            at_ms: eventlog::now_ms(),
            producer: node.node_id.clone(),
            event: Event::SessionOpened {
                tenant: tenant.clone(),
                model: model.clone(),
                format,
            },
        };
        self.lease = Some(lease.clone());
        let appended = match lease.appender.append(&opened).await {
            Ok(pending) => confirmed(lease.appender.stream(), pending).await,
            Err(e) => Err(e),
        };
        if let Err(e) = appended {
            return self.broker_failed(e).await;
        }
        self.opened = true;
        metrics::session_opened();
        tracing::info!(%session, %model, "session opened");
        self.results = Some(node.results.subscribe(session));

        let mut actions = self.session.on_opened();
        self.allocation = Some(AllocateWorkerRequest {
            session_id: session.to_string(),
            model_name: model,
            tenant,
            opened_at_ms: opened.at_ms,
            sample_rate: format.sample_rate,
            encoding: format.encoding.name().into(),
            min_epoch: 0,
        });
        match self.allocate().await {
            Ok(allocation) => actions.extend(self.on_allocation(allocation)),
            Err(e) => actions.extend(self.session.fail(SessionError::OrchestratorUnavailable(e))),
        }
        actions
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
        let lease = self
            .lease
            .clone()
            .expect("appends follow a successful open");
        let envelope = Envelope {
            session: Some(self.session.id()),
            at_ms: eventlog::now_ms(),
            producer: self.node.node_id.clone(),
            event,
        };
        match lease.appender.append(&envelope).await {
            Ok(pending) => {
                let stream = lease.appender.stream().to_string();
                self.confirms.push_back(
                    async move { (appended, received, confirmed(&stream, pending).await) }.boxed(),
                );
                Vec::new()
            }
            Err(e) => self.broker_failed(e).await,
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
    /// A session that ends without completing is marked closed in the log, so that
    /// its worker stops waiting for audio (until resume exists, nothing can continue
    /// it).
    async fn finish(&mut self, end: &End) {
        self.results = None;
        if !self.opened {
            return;
        }
        metrics::session_gone();
        let reason = match end {
            End::Closed(None) | End::Closed(Some(SessionError::BrokerUnavailable(_))) => return,
            End::Closed(Some(error)) => error.code(),
            End::Disconnected => "client_disconnected",
        };
        let Some(lease) = &self.lease else { return };
        let closed = Envelope {
            session: Some(self.session.id()),
            at_ms: eventlog::now_ms(),
            producer: self.node.node_id.clone(),
            event: Event::SessionClosed {
                reason: reason.into(),
            },
        };
        // Best effort: when the broker is what failed, this fails too.
        if let Ok(pending) = lease.appender.append(&closed).await {
            let _ = confirmed(lease.appender.stream(), pending).await;
        }
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
