//! The stream layout: which stream an event goes to.
//!
//! Sessions are spread over a fixed number of partitions by session id (see
//! docs/decisions/stream-layout.md for the measurements behind this choice):
//!
//! - `{prefix}.audio.{p}`: SessionOpened, AudioChunk, EndOfStream, SessionClosed of the
//!   sessions on partition `p`, written by ingest, read by the assigned recognizer;
//! - `{prefix}.results.{p}`: EpochStarted, Partial, Final, TranscriptCompleted, written
//!   by recognizers, tailed by ingest;
//! - `{prefix}.control`: allocations, queueing, releases, registrations and losses,
//!   written by the orchestrator;
//! - `{prefix}.heartbeats`: worker load and per-session decoded position.
//!
//! The session id is the broker-side filter value on partitioned streams, so a reader
//! of one session receives mostly that session's chunks; readers check the id too,
//! because the broker's filter is probabilistic.

use crate::events::SessionId;

/// Names of every stream of one deployment. The prefix keeps deployments (and tests)
/// on one broker apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLayout {
    pub prefix: String,
    pub partitions: u16,
}

impl StreamLayout {
    pub fn new(prefix: impl Into<String>, partitions: u16) -> Self {
        Self {
            prefix: prefix.into(),
            partitions: partitions.max(1),
        }
    }

    /// The partition a session's audio and results live on. Stable across processes
    /// and builds: the low 64 bits of the UUID, modulo the partition count.
    pub fn partition_of(&self, session: SessionId) -> u16 {
        let low = session.as_u128() as u64;
        (low % u64::from(self.partitions)) as u16
    }

    pub fn audio_stream(&self, session: SessionId) -> String {
        self.audio_partition(self.partition_of(session))
    }

    pub fn results_stream(&self, session: SessionId) -> String {
        self.results_partition(self.partition_of(session))
    }

    pub fn audio_partition(&self, partition: u16) -> String {
        format!("{}.audio.{partition}", self.prefix)
    }

    pub fn results_partition(&self, partition: u16) -> String {
        format!("{}.results.{partition}", self.prefix)
    }

    pub fn control_stream(&self) -> String {
        format!("{}.control", self.prefix)
    }

    pub fn heartbeat_stream(&self) -> String {
        format!("{}.heartbeats", self.prefix)
    }

    /// Every stream of the deployment, for creating them at start-up.
    pub fn all_streams(&self) -> Vec<String> {
        let mut all: Vec<String> = (0..self.partitions)
            .flat_map(|p| [self.audio_partition(p), self.results_partition(p)])
            .collect();
        all.push(self.control_stream());
        all.push(self.heartbeat_stream());
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn partition_is_stable_and_in_range() {
        let layout = StreamLayout::new("asr", 16);
        let id = Uuid::parse_str("7d444840-9dc0-11d1-b245-5ffdce74fad2").unwrap();
        // the low 64 bits of this UUID are b245-5ffdce74fad2
        assert_eq!(
            layout.partition_of(id),
            (0xb245_5ffd_ce74_fad2u64 % 16) as u16
        );
        for _ in 0..1000 {
            assert!(layout.partition_of(Uuid::new_v4()) < 16);
        }
        assert_eq!(
            layout.audio_stream(id),
            format!("asr.audio.{}", layout.partition_of(id))
        );
    }

    #[test]
    fn all_streams_are_distinct() {
        let layout = StreamLayout::new("t1", 4);
        let mut all = layout.all_streams();
        assert_eq!(all.len(), 10);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 10);
    }
}
