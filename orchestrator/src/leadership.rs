//! Leader election among orchestrator replicas: a lease in Redis with a fencing token.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{ns}:orchestrator:leader` | string with a TTL (the lease) | `{token}\|{replica}\|{grpc url}` of the current leader |
//! | `{ns}:orchestrator:token` | counter | the last term's fencing token |
//!
//! A replica campaigns by creating the leader key if it does not exist, under the next
//! token. The leader renews its lease well within its TTL; when a renewal finds another
//! value (or none: the lease expired, or Redis lost its data) the term is over and the
//! replica stops acting at once. The lease value is the fence: every registry write
//! checks it inside the same Lua script (see [`crate::registry`]), so a deposed leader
//! that has not noticed yet cannot change anything. Clients find the leader's address
//! in the same key ([`crate::discovery`]).
//!
//! Tokens never go back, even when Redis loses its data: with no counter, a candidate
//! first reads the control stream's recent past, where every leader's events carry its
//! token (and the leader repeats `LeaderElected` every [`TERM_MARK_INTERVAL`]), and
//! continues from the highest plus one.

use std::time::Duration;

use eventlog::control::ControlFilter;
use eventlog::log::{LogError, ReadFrom, StreamLog};
use redis::aio::ConnectionManager;
use thiserror::Error;

/// How often a leader appends `LeaderElected` again, so that the latest token is always
/// within [`TOKEN_LOOKBACK`] of the control stream's end.
pub const TERM_MARK_INTERVAL: Duration = Duration::from_secs(10);
/// How far back a candidate reads the control stream to recover the token floor.
const TOKEN_LOOKBACK: Duration = Duration::from_secs(60);
/// The control stream is caught up once nothing arrives for this long.
const CAUGHT_UP_AFTER: Duration = Duration::from_millis(300);

#[derive(Debug, Error)]
pub enum LeadershipError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The leader key of a deployment namespace.
pub fn leader_key(namespace: &str) -> String {
    format!("{namespace}:orchestrator:leader")
}

/// A leader as its lock's value names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    pub token: u64,
    pub replica: String,
    /// Where its gRPC API is reached.
    pub url: String,
}

impl Leader {
    /// The lock value (also the fence every registry write compares).
    pub fn value(&self) -> String {
        format!("{}|{}|{}", self.token, self.replica, self.url)
    }

    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.splitn(3, '|');
        let token = parts.next()?.parse().ok()?;
        let replica = parts.next()?.to_string();
        let url = parts.next()?.to_string();
        Some(Self {
            token,
            replica,
            url,
        })
    }
}

/// Takes the lock when it is free. KEYS[1] = leader, KEYS[2] = token counter;
/// ARGV[1] = `{replica}|{url}`, ARGV[2] = lease in ms, ARGV[3] = token floor (0: none
/// known). Returns the new token, 0 when someone holds the lock, -1 when the counter is
/// gone and no floor was given (Redis lost its data: recover the floor first).
const CAMPAIGN: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local floor = tonumber(ARGV[3])
if floor == 0 and redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local token = redis.call('INCR', KEYS[2])
if token < floor then
  token = floor
  redis.call('SET', KEYS[2], token)
end
redis.call('SET', KEYS[1], token .. '|' .. ARGV[1], 'PX', ARGV[2])
return token
"#;

/// Extends the lease if it is still ours. KEYS[1] = leader; ARGV[1] = our value,
/// ARGV[2] = lease in ms. Returns 1 when renewed.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Gives the lock up if it is still ours (a clean shutdown: no one waits for the TTL).
const RESIGN: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"#;

/// One replica's side of the election.
#[derive(Clone)]
pub struct Elector {
    redis: ConnectionManager,
    leader_key: String,
    token_key: String,
    replica: String,
    url: String,
    lease: Duration,
    campaign: redis::Script,
    renew: redis::Script,
    resign: redis::Script,
}

impl Elector {
    pub fn new(
        redis: ConnectionManager,
        namespace: &str,
        replica: impl Into<String>,
        url: impl Into<String>,
        lease: Duration,
    ) -> Self {
        Self {
            redis,
            leader_key: leader_key(namespace),
            token_key: format!("{namespace}:orchestrator:token"),
            replica: replica.into(),
            url: url.into(),
            lease,
            campaign: redis::Script::new(CAMPAIGN),
            renew: redis::Script::new(RENEW),
            resign: redis::Script::new(RESIGN),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// One attempt at the lock: `Some(leader)` when this replica won it. `control` is
    /// the control stream, read only when Redis lost the token counter.
    pub async fn try_lead(
        &self,
        log: &StreamLog,
        control: &str,
    ) -> Result<Option<Leader>, LeadershipError> {
        let mut token = self.invoke_campaign(0).await?;
        if token == -1 {
            let floor = recover_token_floor(log, control).await?;
            if floor > 1 {
                tracing::warn!(
                    floor,
                    "the fencing token counter is gone (Redis lost its data): continuing from the control stream's highest token"
                );
            } else {
                tracing::info!("no earlier term on the control stream: this deployment's first");
            }
            token = self.invoke_campaign(floor).await?;
        }
        Ok((token > 0).then(|| Leader {
            token: token as u64,
            replica: self.replica.clone(),
            url: self.url.clone(),
        }))
    }

    async fn invoke_campaign(&self, floor: u64) -> Result<i64, LeadershipError> {
        Ok(self
            .campaign
            .key(&self.leader_key)
            .key(&self.token_key)
            .arg(format!("{}|{}", self.replica, self.url))
            .arg(self.lease.as_millis() as u64)
            .arg(floor)
            .invoke_async(&mut self.redis.clone())
            .await?)
    }

    /// Extends the lease; `false` when it is no longer ours.
    pub async fn renew(&self, leader: &Leader) -> Result<bool, LeadershipError> {
        let renewed: i32 = self
            .renew
            .key(&self.leader_key)
            .arg(leader.value())
            .arg(self.lease.as_millis() as u64)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(renewed == 1)
    }

    pub async fn resign(&self, leader: &Leader) -> Result<(), LeadershipError> {
        let _: i32 = self
            .resign
            .key(&self.leader_key)
            .arg(leader.value())
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Leader>, LeadershipError> {
        let value: Option<String> = redis::cmd("GET")
            .arg(&self.leader_key)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(value.as_deref().and_then(Leader::parse))
    }
}

/// The highest fencing token in the control stream's recent past, plus one (1 when
/// there is none).
pub async fn recover_token_floor(log: &StreamLog, control: &str) -> Result<u64, LeadershipError> {
    let since = eventlog::now_ms().saturating_sub(TOKEN_LOOKBACK.as_millis() as u64);
    let mut reader = log
        .reader(control, ReadFrom::Timestamp(since), None)
        .await?;
    let mut filter = ControlFilter::new();
    while let Ok(Some(record)) = tokio::time::timeout(CAUGHT_UP_AFTER, reader.next()).await {
        filter.accept(&record?.envelope.event);
    }
    reader.close().await;
    Ok(filter.highest_token().map_or(1, |t| t + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_values_round_trip() {
        let leader = Leader {
            token: 12,
            replica: "orchestrator-b".into(),
            url: "http://127.0.0.1:50052".into(),
        };
        assert_eq!(Leader::parse(&leader.value()), Some(leader));
        assert_eq!(Leader::parse("x|a|b"), None);
        assert_eq!(Leader::parse("3|only-two"), None);
    }
}
