//! How clients (ingest, recognizers) find the orchestrator leader: the leader lock in
//! Redis names its gRPC URL ([`crate::leadership`]). A client keeps a channel to the
//! leader it found and looks the leader up again when a call is answered with
//! `UNAVAILABLE` (the leader died and the connection is refused, or the replica it
//! reached does not lead any more and refuses every call) or not answered at all (a
//! paused or partitioned leader).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

use crate::api::worker_manager_client::WorkerManagerClient;
use crate::leadership::{Leader, leader_key};

/// Connecting to a leader that does not answer: a SIGKILLed one refuses at once, a
/// partitioned one must not hold a caller for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One attempt of a call: a leader that does not answer in this time is presumed gone.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pauses between retries of a call while there is no reachable leader.
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(200);

/// The leader found, and a client of it.
type Found = (Leader, WorkerManagerClient<Channel>);

/// A gRPC client of whichever replica leads. Cheap to clone.
#[derive(Clone)]
pub struct LeaderClient {
    redis: ConnectionManager,
    key: String,
    cached: Arc<Mutex<Option<Found>>>,
}

impl LeaderClient {
    pub fn new(redis: ConnectionManager, namespace: &str) -> Self {
        Self {
            redis,
            key: leader_key(namespace),
            cached: Arc::default(),
        }
    }

    /// The current leader, as the lock says.
    pub async fn leader(&self) -> Result<Option<Leader>, Status> {
        let value: Option<String> = redis::cmd("GET")
            .arg(&self.key)
            .query_async(&mut self.redis.clone())
            .await
            .map_err(|e| Status::unavailable(format!("looking the orchestrator leader up: {e}")))?;
        Ok(value.as_deref().and_then(Leader::parse))
    }

    /// A client of the leader: the one found before, or a new one.
    pub async fn client(&self) -> Result<WorkerManagerClient<Channel>, Status> {
        Ok(self.client_of_leader().await?.1)
    }

    /// A client of the leader, with the leader it talks to.
    pub async fn client_of_leader(&self) -> Result<Found, Status> {
        if let Some(cached) = self.lock().clone() {
            return Ok(cached);
        }
        let leader = self
            .leader()
            .await?
            .ok_or_else(|| Status::unavailable("no orchestrator leader at the moment"))?;
        let endpoint = Endpoint::from_shared(leader.url.clone())
            .map_err(|e| {
                Status::internal(format!(
                    "the leader lock names a bad URL {:?}: {e}",
                    leader.url
                ))
            })?
            .connect_timeout(CONNECT_TIMEOUT);
        let client = WorkerManagerClient::new(endpoint.connect_lazy());
        *self.lock() = Some((leader.clone(), client.clone()));
        Ok((leader, client))
    }

    /// Drops the leader found before: the next call looks it up again.
    pub fn forget(&self) {
        *self.lock() = None;
    }

    /// Runs `call` on the leader; while the answer is `UNAVAILABLE` (no leader, a dead
    /// one, a replica that stepped down) or does not come within [`ATTEMPT_TIMEOUT`]
    /// (a paused one), looks the leader up again and retries, for up to `patience`.
    /// Other errors are returned at once.
    pub async fn call<T, F, Fut>(&self, patience: Duration, mut call: F) -> Result<T, Status>
    where
        F: FnMut(WorkerManagerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + patience;
        let mut pause = RETRY_MIN;
        loop {
            let result = match self.client().await {
                Ok(client) => match tokio::time::timeout(ATTEMPT_TIMEOUT, call(client)).await {
                    Ok(answer) => answer.map(Response::into_inner),
                    Err(_) => Err(Status::unavailable(format!(
                        "the orchestrator leader did not answer within {ATTEMPT_TIMEOUT:?}"
                    ))),
                },
                Err(status) => Err(status),
            };
            match result {
                Err(status) if status.code() == Code::Unavailable => {
                    self.forget();
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(status);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                }
                other => return other,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Found>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }
}
