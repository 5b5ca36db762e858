//! The worker registry and session assignments, in Redis.
//!
//! Redis is the orchestrator's state, so that a successor (leader election is a later
//! issue) can take over from it. Key layout, every key under the deployment namespace:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{ns}:worker:{id}` | hash | model, capacity, state (IDLE/BUSY), metrics_addr, registered_at_ms, last_heartbeat_ms |
//! | `{ns}:worker:{id}:sessions` | set | the sessions assigned to the worker |
//! | `{ns}:workers` | set | every registered worker id |
//! | `{ns}:model:{model}:workers` | set | the registered workers of a model |
//! | `{ns}:models` | set | every model seen (for queue and worker gauges) |
//! | `{ns}:session:{id}` | hash | tenant, model, opened_at_ms, sample_rate, encoding, requested_at_ms, queued_at_ms, epoch, worker, state (waiting/assigned/done) |
//! | `{ns}:session:{id}:epoch` | counter | the session's last allocated epoch (INCR; the first is 1) |
//! | `{ns}:queue:{model}` | list | waiting sessions, head = next to serve |
//!
//! The epoch counter is a key of its own so that it outlives any rewrite of the
//! session hash: an epoch must never be handed out twice. Multi-key changes go in
//! MULTI/EXEC transactions, so a crash never leaves a session half assigned. The
//! orchestrator serialises its decisions itself; these transactions only make each
//! decision land whole.

use std::collections::HashMap;

use eventlog::{AudioEncoding, AudioFormat, SessionId};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use thiserror::Error;
use uuid::Uuid;

use crate::allocator::{WorkerLoad, WorkerState};

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt registry entry {key}: {message}")]
    Corrupt { key: String, message: String },
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

/// The wire name of an encoding, as in `SessionOpened` and the gRPC API.
pub fn encoding_name(encoding: AudioEncoding) -> &'static str {
    match encoding {
        AudioEncoding::PcmS16le => "pcm_s16le",
        AudioEncoding::PcmF32le => "pcm_f32le",
    }
}

pub fn parse_encoding(name: &str) -> Option<AudioEncoding> {
    match name {
        "pcm_s16le" => Some(AudioEncoding::PcmS16le),
        "pcm_f32le" => Some(AudioEncoding::PcmF32le),
        _ => None,
    }
}

/// Sets `last_heartbeat_ms` only if the worker is still registered, so a late
/// heartbeat cannot resurrect half a hash the orchestrator just removed.
const TOUCH_WORKER: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_heartbeat_ms', ARGV[1])
return 1
"#;

/// The registry of one deployment namespace.
#[derive(Clone)]
pub struct Registry {
    redis: ConnectionManager,
    ns: String,
    touch: redis::Script,
}

impl Registry {
    pub fn new(redis: ConnectionManager, namespace: impl Into<String>) -> Self {
        Self {
            redis,
            ns: namespace.into(),
            touch: redis::Script::new(TOUCH_WORKER),
        }
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

    fn epoch_key(&self, id: SessionId) -> String {
        format!("{}:session:{id}:epoch", self.ns)
    }

    fn queue_key(&self, model: &str) -> String {
        format!("{}:queue:{model}", self.ns)
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
        let _: () = redis::pipe()
            .atomic()
            .del(&key)
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
                ],
            )
            .sadd(self.workers_key(), &worker.id)
            .sadd(self.model_workers_key(&worker.model), &worker.id)
            .sadd(self.models_key(), &worker.model)
            .query_async(&mut self.redis.clone())
            .await?;
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

    /// Records a heartbeat; `false` when the worker is not registered.
    pub async fn touch_worker(&self, id: &str, now_ms: u64) -> Result<bool, RegistryError> {
        let touched: i32 = self
            .touch
            .key(self.worker_key(id))
            .arg(now_ms)
            .invoke_async(&mut self.redis.clone())
            .await?;
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
        pipe.atomic()
            .del(self.worker_key(&worker.id))
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
        let _: () = pipe.query_async(&mut self.redis.clone()).await?;
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
        let encoding = parse_encoding(&encoding).ok_or_else(|| hash.corrupt("encoding"))?;
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
    pub async fn enqueue_new_session(&self, session: &SessionRecord) -> Result<(), RegistryError> {
        let _: () = redis::pipe()
            .atomic()
            .hset_multiple(
                self.session_key(session.id),
                &[
                    ("tenant", session.tenant.clone()),
                    ("model", session.model.clone()),
                    ("opened_at_ms", session.opened_at_ms.to_string()),
                    ("sample_rate", session.format.sample_rate.to_string()),
                    (
                        "encoding",
                        encoding_name(session.format.encoding).to_string(),
                    ),
                    ("requested_at_ms", session.requested_at_ms.to_string()),
                    ("queued_at_ms", session.queued_at_ms.to_string()),
                    ("epoch", session.epoch.to_string()),
                    ("state", SessionState::Waiting.as_str().to_string()),
                ],
            )
            .rpush(self.queue_key(&session.model), session.id.to_string())
            .sadd(self.models_key(), &session.model)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// Allocates the session's next epoch (1 for its first assignment).
    pub async fn next_epoch(&self, session: SessionId) -> Result<u64, RegistryError> {
        Ok(self.redis.clone().incr(self.epoch_key(session), 1).await?)
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
        let _: () = redis::pipe()
            .atomic()
            .lrem(self.queue_key(&session.model), 1, &id)
            .hset_multiple(
                self.session_key(session.id),
                &[
                    ("worker", worker.to_string()),
                    ("epoch", epoch.to_string()),
                    ("state", SessionState::Assigned.as_str().to_string()),
                ],
            )
            .sadd(self.worker_sessions_key(worker), &id)
            .hset(self.worker_key(worker), "state", worker_state.as_str())
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// Marks a session done and frees its slot on `worker`.
    pub async fn commit_release(
        &self,
        session: SessionId,
        worker: &str,
        worker_state: WorkerState,
    ) -> Result<(), RegistryError> {
        let _: () = redis::pipe()
            .atomic()
            .hset(
                self.session_key(session),
                "state",
                SessionState::Done.as_str(),
            )
            .srem(self.worker_sessions_key(worker), session.to_string())
            .hset(self.worker_key(worker), "state", worker_state.as_str())
            .query_async(&mut self.redis.clone())
            .await?;
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
    fn encoding_names_match_the_event_schema() {
        for encoding in [AudioEncoding::PcmS16le, AudioEncoding::PcmF32le] {
            let name = encoding_name(encoding);
            assert_eq!(serde_json::to_value(encoding).unwrap(), name);
            assert_eq!(parse_encoding(name), Some(encoding));
        }
        assert_eq!(parse_encoding("mp3"), None);
    }

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
