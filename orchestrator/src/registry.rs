//! The worker registry and session assignments, in Redis.
//!
//! Redis is the orchestrator's state, so that a successor replica takes over from it.
//! Key layout, every key under the deployment namespace:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{ns}:worker:{id}` | hash | model, capacity, state (IDLE/BUSY), metrics_addr, registered_at_ms, last_heartbeat_ms |
//! | `{ns}:worker:{id}:sessions` | set | the sessions assigned to the worker |
//! | `{ns}:workers` | set | every registered worker id |
//! | `{ns}:model:{model}:workers` | set | the registered workers of a model |
//! | `{ns}:models` | set | every model seen (for queue and worker gauges) |
//! | `{ns}:session:{id}` | hash | tenant, model, opened_at_ms, sample_rate, encoding, requested_at_ms, queued_at_ms, epoch, worker, state (waiting/assigned/done) |
//! | `{ns}:epochs` | sorted set | per session, its last allocated epoch (the first is 1) |
//! | `{ns}:queue:{model}` | list | waiting sessions, head = next to serve |
//!
//! Epochs live apart from the session hash so that they outlive any rewrite of it: an
//! epoch is never handed out twice. After Redis lost its data they are raised back
//! (`ZADD GT`) to what the workers and ingest report from the log, so they continue
//! from the log's maximum rather than from zero.
//!
//! Every write is fenced: it runs inside one Lua script that first checks that the
//! leader lock still holds this replica's term ([`crate::leadership`]), so a deposed
//! leader changes nothing, and a decision's keys change together or not at all (a
//! crash never leaves a session half assigned). The leader serialises its decisions
//! itself; the scripts only make each one land whole, and only while it leads.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use eventlog::{AudioEncoding, AudioFormat, SessionId};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use thiserror::Error;
use uuid::Uuid;

use crate::allocator::{WorkerLoad, WorkerState};
use crate::leadership::leader_key;

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt registry entry {key}: {message}")]
    Corrupt { key: String, message: String },
    /// This replica does not lead (any more): nothing was written.
    #[error("not the orchestrator leader")]
    NotLeader,
}

/// A registered worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRecord {
    pub id: String,
    pub model: String,
    pub capacity: u32,
    pub metrics_addr: String,
    pub registered_at_ms: u64,
    pub last_heartbeat_ms: u64,
    /// Assigned sessions, sorted.
    pub sessions: Vec<SessionId>,
    /// Chosen by the autoscaler for removal: it takes no new sessions.
    pub draining: bool,
}

impl WorkerRecord {
    pub fn load(&self) -> WorkerLoad {
        WorkerLoad {
            worker: self.id.clone(),
            capacity: self.capacity,
            assigned: self.sessions.len() as u32,
        }
    }
}

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// In its model's wait queue.
    Waiting,
    /// Held by `worker` under `epoch`.
    Assigned,
    /// Released by its worker; `worker` and `epoch` name the last assignment.
    Done,
}

impl SessionState {
    fn as_str(self) -> &'static str {
        match self {
            SessionState::Waiting => "waiting",
            SessionState::Assigned => "assigned",
            SessionState::Done => "done",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "waiting" => Some(SessionState::Waiting),
            "assigned" => Some(SessionState::Assigned),
            "done" => Some(SessionState::Done),
            _ => None,
        }
    }
}

/// A session the orchestrator was asked to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: SessionId,
    pub tenant: String,
    pub model: String,
    pub opened_at_ms: u64,
    pub format: AudioFormat,
    /// When AllocateWorker first arrived (for the allocation-wait histogram and for
    /// ordering a lost worker's sessions).
    pub requested_at_ms: u64,
    /// When it last joined the wait queue: its first request, or its worker's loss.
    pub queued_at_ms: u64,
    /// The current (or last) assignment's epoch; 0 before the first.
    pub epoch: u64,
    /// The current (or last) assignment's worker.
    pub worker: Option<String>,
    pub state: SessionState,
}

/// The error a fenced script returns when the leader lock is not the writer's.
const FENCED: &str = "FENCED";

/// Runs a batch of commands if, and only if, the leader lock still holds the writer's
/// term. KEYS[1] = leader lock; ARGV[1] = the writer's lock value; then each command
/// as its argument count followed by its arguments. Returns the commands' replies.
const FENCED_BATCH: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this replica no longer leads')
end
local replies = {}
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  replies[#replies + 1] = redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return replies
"#;

/// Sets `last_heartbeat_ms` only if the worker is still registered, so a late
/// heartbeat cannot resurrect half a hash the orchestrator just removed. Fenced like
/// [`FENCED_BATCH`]: KEYS[1] = leader lock, KEYS[2] = worker; ARGV[1] = lock value,
/// ARGV[2] = now.
const TOUCH_WORKER: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this replica no longer leads')
end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'last_heartbeat_ms', ARGV[2])
return 1
"#;

/// The lock value of the term this replica leads, if it leads: what fenced writes
/// compare with the lock. Shared between the registry's clones and the election.
#[derive(Clone, Default)]
pub struct Fence(Arc<RwLock<Option<String>>>);

impl Fence {
    pub fn set(&self, lock_value: Option<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = lock_value;
    }

    fn get(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The registry of one deployment namespace.
#[derive(Clone)]
pub struct Registry {
    redis: ConnectionManager,
    ns: String,
    fence: Fence,
    batch: redis::Script,
    touch: redis::Script,
}

impl Registry {
    /// Reads freely; writes only while `fence` holds this replica's term.
    pub fn new(redis: ConnectionManager, namespace: impl Into<String>, fence: Fence) -> Self {
        Self {
            redis,
            ns: namespace.into(),
            fence,
            batch: redis::Script::new(FENCED_BATCH),
            touch: redis::Script::new(TOUCH_WORKER),
        }
    }

    /// Whether this replica believes it leads (Redis has the last word on each write).
    pub fn is_leading(&self) -> bool {
        self.fence.get().is_some()
    }

    fn lock_value(&self) -> Result<String, RegistryError> {
        self.fence.get().ok_or(RegistryError::NotLeader)
    }

    /// Runs the pipeline's commands as one fenced, atomic batch; returns their replies.
    async fn commit(&self, pipe: &redis::Pipeline) -> Result<Vec<redis::Value>, RegistryError> {
        let mut invocation = self.batch.key(leader_key(&self.ns));
        invocation.arg(self.lock_value()?);
        for cmd in pipe.cmd_iter() {
            let args: Vec<&[u8]> = cmd
                .args_iter()
                .filter_map(|arg| match arg {
                    redis::Arg::Simple(bytes) => Some(bytes),
                    // Only SCAN-style commands have cursors; the registry sends none.
                    _ => None,
                })
                .collect();
            invocation.arg(args.len());
            for arg in args {
                invocation.arg(arg);
            }
        }
        invocation
            .invoke_async(&mut self.redis.clone())
            .await
            .map_err(fenced_or_redis)
    }

    fn worker_key(&self, id: &str) -> String {
        format!("{}:worker:{id}", self.ns)
    }

    fn worker_sessions_key(&self, id: &str) -> String {
        format!("{}:worker:{id}:sessions", self.ns)
    }

    fn workers_key(&self) -> String {
        format!("{}:workers", self.ns)
    }

    fn model_workers_key(&self, model: &str) -> String {
        format!("{}:model:{model}:workers", self.ns)
    }

    fn models_key(&self) -> String {
        format!("{}:models", self.ns)
    }

    fn session_key(&self, id: SessionId) -> String {
        format!("{}:session:{id}", self.ns)
    }

    fn epochs_key(&self) -> String {
        format!("{}:epochs", self.ns)
    }

    fn queue_key(&self, model: &str) -> String {
        format!("{}:queue:{model}", self.ns)
    }

    fn local_workers_key(&self, model: &str) -> String {
        format!("{}:local:{model}:workers", self.ns)
    }

    /// Round-trips to Redis (readiness).
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// Records a worker with no sessions, replacing any previous record of that id.
    pub async fn put_worker(&self, worker: &WorkerRecord) -> Result<(), RegistryError> {
        let key = self.worker_key(&worker.id);
        let mut pipe = redis::pipe();
        pipe.del(&key)
            .del(self.worker_sessions_key(&worker.id))
            .hset_multiple(
                &key,
                &[
                    ("model", worker.model.clone()),
                    ("capacity", worker.capacity.to_string()),
                    ("state", worker.load().state().as_str().to_string()),
                    ("metrics_addr", worker.metrics_addr.clone()),
                    ("registered_at_ms", worker.registered_at_ms.to_string()),
                    ("last_heartbeat_ms", worker.last_heartbeat_ms.to_string()),
                    ("draining", u8::from(worker.draining).to_string()),
                ],
            )
            .sadd(self.workers_key(), &worker.id)
            .sadd(self.model_workers_key(&worker.model), &worker.id)
            .sadd(self.models_key(), &worker.model);
        self.commit(&pipe).await?;
        Ok(())
    }

    pub async fn worker(&self, id: &str) -> Result<Option<WorkerRecord>, RegistryError> {
        let key = self.worker_key(id);
        let (fields, sessions): (HashMap<String, String>, Vec<String>) = redis::pipe()
            .hgetall(&key)
            .smembers(self.worker_sessions_key(id))
            .query_async(&mut self.redis.clone())
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let hash = Hash { key: &key, fields };
        let mut sessions = sessions
            .iter()
            .map(|s| parse_session_id(&key, s))
            .collect::<Result<Vec<_>, _>>()?;
        sessions.sort();
        Ok(Some(WorkerRecord {
            id: id.to_string(),
            model: hash.text("model")?,
            capacity: hash.number("capacity")?,
            metrics_addr: hash.text("metrics_addr")?,
            registered_at_ms: hash.number("registered_at_ms")?,
            last_heartbeat_ms: hash.number("last_heartbeat_ms")?,
            sessions,
            // Absent in records written before draining existed.
            draining: hash.fields.get("draining").is_some_and(|v| v == "1"),
        }))
    }

    /// Every registered worker.
    pub async fn workers(&self) -> Result<Vec<WorkerRecord>, RegistryError> {
        let ids: Vec<String> = self.redis.clone().smembers(self.workers_key()).await?;
        self.records(ids).await
    }

    /// The registered workers of one model.
    pub async fn workers_of(&self, model: &str) -> Result<Vec<WorkerRecord>, RegistryError> {
        let ids: Vec<String> = self
            .redis
            .clone()
            .smembers(self.model_workers_key(model))
            .await?;
        self.records(ids).await
    }

    async fn records(&self, ids: Vec<String>) -> Result<Vec<WorkerRecord>, RegistryError> {
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            // A worker removed between the listing and the read is simply skipped.
            if let Some(record) = self.worker(&id).await? {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// Marks a registered worker draining (no new sessions) or serving again.
    pub async fn set_draining(&self, id: &str, draining: bool) -> Result<(), RegistryError> {
        let mut pipe = redis::pipe();
        pipe.hset(self.worker_key(id), "draining", u8::from(draining));
        self.commit(&pipe).await?;
        Ok(())
    }

    /// The worker ids the local-process backend wants running for `model` (what
    /// `asr up` keeps running).
    pub async fn local_workers(&self, model: &str) -> Result<Vec<String>, RegistryError> {
        let mut ids: Vec<String> = self
            .redis
            .clone()
            .smembers(self.local_workers_key(model))
            .await?;
        ids.sort();
        Ok(ids)
    }

    /// Seeds the local-process backend's worker set, unless it already has one (a
    /// restart keeps what the autoscaler decided). Not fenced: `asr up` calls it before
    /// any leader exists, and SADD of the same ids is harmless.
    pub async fn seed_local_workers(
        &self,
        model: &str,
        ids: &[String],
    ) -> Result<(), RegistryError> {
        let key = self.local_workers_key(model);
        let exists: bool = self.redis.clone().exists(&key).await?;
        if !exists && !ids.is_empty() {
            let _: () = self.redis.clone().sadd(&key, ids).await?;
        }
        Ok(())
    }

    /// Adds ids to, or removes them from, the local-process backend's worker set.
    pub async fn change_local_workers(
        &self,
        model: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<(), RegistryError> {
        let key = self.local_workers_key(model);
        let mut pipe = redis::pipe();
        for id in add {
            pipe.sadd(&key, id);
        }
        for id in remove {
            pipe.srem(&key, id);
        }
        self.commit(&pipe).await?;
        Ok(())
    }

    /// Records a heartbeat; `false` when the worker is not registered.
    pub async fn touch_worker(&self, id: &str, now_ms: u64) -> Result<bool, RegistryError> {
        let touched: i32 = self
            .touch
            .key(leader_key(&self.ns))
            .key(self.worker_key(id))
            .arg(self.lock_value()?)
            .arg(now_ms)
            .invoke_async(&mut self.redis.clone())
            .await
            .map_err(fenced_or_redis)?;
        Ok(touched == 1)
    }

    /// Removes a worker and puts its unfinished sessions back at the head of their
    /// queue, `head_first` being the order of the pushes (see
    /// [`crate::allocator::head_push_order`]), queued as of `now_ms`.
    pub async fn remove_worker(
        &self,
        worker: &WorkerRecord,
        head_first: &[SessionId],
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let mut pipe = redis::pipe();
        pipe.del(self.worker_key(&worker.id))
            .del(self.worker_sessions_key(&worker.id))
            .srem(self.workers_key(), &worker.id)
            .srem(self.model_workers_key(&worker.model), &worker.id);
        let queue = self.queue_key(&worker.model);
        for &session in head_first {
            pipe.hset_multiple(
                self.session_key(session),
                &[
                    ("state", SessionState::Waiting.as_str().to_string()),
                    ("queued_at_ms", now_ms.to_string()),
                ],
            )
            .hdel(self.session_key(session), "worker")
            .lpush(&queue, session.to_string());
        }
        self.commit(&pipe).await?;
        Ok(())
    }

    pub async fn session(&self, id: SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        let key = self.session_key(id);
        let fields: HashMap<String, String> = self.redis.clone().hgetall(&key).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let hash = Hash { key: &key, fields };
        let encoding = hash.text("encoding")?;
        let encoding =
            AudioEncoding::from_name(&encoding).ok_or_else(|| hash.corrupt("encoding"))?;
        let state =
            SessionState::parse(&hash.text("state")?).ok_or_else(|| hash.corrupt("state"))?;
        Ok(Some(SessionRecord {
            id,
            tenant: hash.text("tenant")?,
            model: hash.text("model")?,
            opened_at_ms: hash.number("opened_at_ms")?,
            format: AudioFormat {
                sample_rate: hash.number("sample_rate")?,
                encoding,
            },
            requested_at_ms: hash.number("requested_at_ms")?,
            queued_at_ms: hash.number("queued_at_ms")?,
            epoch: hash.number("epoch")?,
            worker: hash.fields.get("worker").cloned(),
            state,
        }))
    }

    /// Records a new session as waiting, at the tail of its model's queue.
    /// `min_epoch` is the highest epoch the caller saw in the log for it (0 for a new
    /// session): epochs continue above it even if Redis lost the session's counter.
    pub async fn enqueue_new_session(
        &self,
        session: &SessionRecord,
        min_epoch: u64,
    ) -> Result<(), RegistryError> {
        let mut pipe = redis::pipe();
        pipe.hset_multiple(self.session_key(session.id), &session_fields(session))
            .rpush(self.queue_key(&session.model), session.id.to_string())
            .sadd(self.models_key(), &session.model);
        if min_epoch > 0 {
            self.raise_epoch(&mut pipe, session.id, min_epoch);
        }
        self.commit(&pipe).await?;
        Ok(())
    }

    /// Records a session that a re-registering worker reports it is serving under
    /// `session.epoch` (the registry forgot it, or had requeued it meanwhile), as
    /// assigned to that worker; `worker_state` is the worker's state once it holds it.
    pub async fn adopt(
        &self,
        session: &SessionRecord,
        worker: &str,
        worker_state: WorkerState,
    ) -> Result<(), RegistryError> {
        let id = session.id.to_string();
        let mut pipe = redis::pipe();
        pipe.lrem(self.queue_key(&session.model), 0, &id)
            .hset_multiple(self.session_key(session.id), &session_fields(session))
            .hset(self.session_key(session.id), "worker", worker)
            .sadd(self.models_key(), &session.model)
            .sadd(self.worker_sessions_key(worker), &id)
            .hset(self.worker_key(worker), "state", worker_state.as_str());
        self.raise_epoch(&mut pipe, session.id, session.epoch);
        self.commit(&pipe).await?;
        Ok(())
    }

    /// Raises the session's epoch counter to at least `epoch`.
    fn raise_epoch(&self, pipe: &mut redis::Pipeline, session: SessionId, epoch: u64) {
        pipe.cmd("ZADD")
            .arg(self.epochs_key())
            .arg("GT")
            .arg(epoch)
            .arg(session.to_string());
    }

    /// Allocates the session's next epoch (1 for its first assignment).
    pub async fn next_epoch(&self, session: SessionId) -> Result<u64, RegistryError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZINCRBY")
            .arg(self.epochs_key())
            .arg(1)
            .arg(session.to_string());
        let replies = self.commit(&pipe).await?;
        let reply = replies.first().ok_or_else(|| RegistryError::Corrupt {
            key: self.epochs_key(),
            message: "ZINCRBY gave no reply".into(),
        })?;
        redis::from_redis_value_ref(reply).map_err(|e| RegistryError::Corrupt {
            key: self.epochs_key(),
            message: format!("epoch is not a whole number: {e}"),
        })
    }

    /// Moves a waiting session to `worker` under `epoch`; `worker_state` is the
    /// worker's state once it holds the session.
    pub async fn commit_assignment(
        &self,
        session: &SessionRecord,
        worker: &str,
        epoch: u64,
        worker_state: WorkerState,
    ) -> Result<(), RegistryError> {
        let id = session.id.to_string();
        let mut pipe = redis::pipe();
        pipe.lrem(self.queue_key(&session.model), 1, &id)
            .hset_multiple(
                self.session_key(session.id),
                &[
                    ("worker", worker.to_string()),
                    ("epoch", epoch.to_string()),
                    ("state", SessionState::Assigned.as_str().to_string()),
                ],
            )
            .sadd(self.worker_sessions_key(worker), &id)
            .hset(self.worker_key(worker), "state", worker_state.as_str());
        self.commit(&pipe).await?;
        Ok(())
    }

    /// Marks a session done and frees its slot on `worker`.
    pub async fn commit_release(
        &self,
        session: SessionId,
        worker: &str,
        worker_state: WorkerState,
    ) -> Result<(), RegistryError> {
        let mut pipe = redis::pipe();
        pipe.hset(
            self.session_key(session),
            "state",
            SessionState::Done.as_str(),
        )
        .srem(self.worker_sessions_key(worker), session.to_string())
        .hset(self.worker_key(worker), "state", worker_state.as_str());
        self.commit(&pipe).await?;
        Ok(())
    }

    /// The first `limit` waiting sessions of a model, oldest first.
    pub async fn waiting(
        &self,
        model: &str,
        limit: usize,
    ) -> Result<Vec<SessionId>, RegistryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.queue_key(model);
        let ids: Vec<String> = self
            .redis
            .clone()
            .lrange(&key, 0, limit as isize - 1)
            .await?;
        ids.iter().map(|s| parse_session_id(&key, s)).collect()
    }

    /// A waiting session's place in its queue, 1 = next.
    pub async fn queue_position(
        &self,
        model: &str,
        session: SessionId,
    ) -> Result<Option<u32>, RegistryError> {
        let index: Option<u32> = self
            .redis
            .clone()
            .lpos(
                self.queue_key(model),
                session.to_string(),
                redis::LposOptions::default(),
            )
            .await?;
        Ok(index.map(|i| i + 1))
    }

    pub async fn queue_len(&self, model: &str) -> Result<u32, RegistryError> {
        Ok(self.redis.clone().llen(self.queue_key(model)).await?)
    }

    /// Every model a worker registered for or a session asked for.
    pub async fn models(&self) -> Result<Vec<String>, RegistryError> {
        let mut models: Vec<String> = self.redis.clone().smembers(self.models_key()).await?;
        models.sort();
        Ok(models)
    }
}

/// A session hash's fields, the worker aside.
fn session_fields(session: &SessionRecord) -> [(&'static str, String); 9] {
    [
        ("tenant", session.tenant.clone()),
        ("model", session.model.clone()),
        ("opened_at_ms", session.opened_at_ms.to_string()),
        ("sample_rate", session.format.sample_rate.to_string()),
        ("encoding", session.format.encoding.name().to_string()),
        ("requested_at_ms", session.requested_at_ms.to_string()),
        ("queued_at_ms", session.queued_at_ms.to_string()),
        ("epoch", session.epoch.to_string()),
        ("state", session.state.as_str().to_string()),
    ]
}

/// A fenced script's refusal becomes [`RegistryError::NotLeader`].
fn fenced_or_redis(e: redis::RedisError) -> RegistryError {
    if e.code() == Some(FENCED) {
        RegistryError::NotLeader
    } else {
        RegistryError::Redis(e)
    }
}

/// A Redis hash read back, with typed field access.
struct Hash<'a> {
    key: &'a str,
    fields: HashMap<String, String>,
}

impl Hash<'_> {
    fn corrupt(&self, field: &str) -> RegistryError {
        RegistryError::Corrupt {
            key: self.key.to_string(),
            message: format!("field {field} is missing or malformed"),
        }
    }

    fn text(&self, field: &str) -> Result<String, RegistryError> {
        self.fields
            .get(field)
            .cloned()
            .ok_or_else(|| self.corrupt(field))
    }

    fn number<T: std::str::FromStr>(&self, field: &str) -> Result<T, RegistryError> {
        self.fields
            .get(field)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.corrupt(field))
    }
}

fn parse_session_id(key: &str, s: &str) -> Result<SessionId, RegistryError> {
    Uuid::parse_str(s).map_err(|e| RegistryError::Corrupt {
        key: key.to_string(),
        message: format!("bad session id {s:?}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_states_round_trip() {
        for state in [
            SessionState::Waiting,
            SessionState::Assigned,
            SessionState::Done,
        ] {
            assert_eq!(SessionState::parse(state.as_str()), Some(state));
        }
    }
}
