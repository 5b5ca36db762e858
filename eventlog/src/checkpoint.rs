//! The replay point (ARCHITECTURE.md invariant 6) and its store in Redis.
//!
//! A recognizer checkpoints where its voice-activity detector had consumed audio when
//! it closed the last finished segment. There it resets VAD, resampler and decoder, so
//! a replacement that starts decoding at exactly that sample reproduces the output of
//! a straight run. Saves are fenced by epoch: a worker whose assignment moved on
//! cannot overwrite its successor's checkpoint.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::events::SessionId;

/// Where decoding of a session resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayPoint {
    /// Offset, in the session's audio partition, of the chunk holding the resume sample.
    pub chunk_offset: u64,
    /// The client's sequence number of that chunk.
    pub chunk_seq: u64,
    /// The resume sample's index within that chunk (in the client's sample rate).
    pub sample_in_chunk: u32,
    /// The resume sample's index within the session's audio (client's rate).
    pub session_sample: u64,
    /// Index of the next final segment to be produced.
    pub next_segment: u32,
}

/// A replay point together with the epoch of the worker that saved it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub epoch: u64,
    pub point: ReplayPoint,
}

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt checkpoint for session {session}: {message}")]
    Corrupt { session: SessionId, message: String },
}

/// Writes the checkpoint unless one of a newer epoch is already stored.
/// KEYS[1] = checkpoint key; ARGV[1] = epoch; ARGV[2] = JSON. Returns 1 if written.
const SAVE_FENCED: &str = r#"
local current = redis.call('HGET', KEYS[1], 'epoch')
if current and tonumber(current) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'point', ARGV[2])
return 1
"#;

/// Checkpoints in Redis under `{namespace}:checkpoint:{session}`.
#[derive(Clone)]
pub struct CheckpointStore {
    redis: redis::aio::ConnectionManager,
    namespace: String,
    save: redis::Script,
}

impl CheckpointStore {
    pub fn new(redis: redis::aio::ConnectionManager, namespace: impl Into<String>) -> Self {
        Self {
            redis,
            namespace: namespace.into(),
            save: redis::Script::new(SAVE_FENCED),
        }
    }

    fn key(&self, session: SessionId) -> String {
        format!("{}:checkpoint:{session}", self.namespace)
    }

    /// Saves a checkpoint; `Ok(false)` when a newer epoch's checkpoint is stored (the
    /// caller has been fenced out).
    pub async fn save(
        &self,
        session: SessionId,
        checkpoint: &Checkpoint,
    ) -> Result<bool, CheckpointError> {
        let json = serde_json::to_string(&checkpoint.point).expect("plain struct serialises");
        let written: i32 = self
            .save
            .key(self.key(session))
            .arg(checkpoint.epoch)
            .arg(json)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(written == 1)
    }

    pub async fn load(&self, session: SessionId) -> Result<Option<Checkpoint>, CheckpointError> {
        let (epoch, point): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(self.key(session))
            .arg("epoch")
            .arg("point")
            .query_async(&mut self.redis.clone())
            .await?;
        let (Some(epoch), Some(point)) = (epoch, point) else {
            return Ok(None);
        };
        let point = serde_json::from_str(&point).map_err(|e| CheckpointError::Corrupt {
            session,
            message: e.to_string(),
        })?;
        Ok(Some(Checkpoint { epoch, point }))
    }

    pub async fn clear(&self, session: SessionId) -> Result<(), CheckpointError> {
        let _: () = self.redis.clone().del(self.key(session)).await?;
        Ok(())
    }
}
