//! The node's audio producers: one long-lived [`Appender`] per audio partition, created
//! on first use and shared by every session on that partition.
//!
//! Producer names are `{node_id}.{incarnation}.audio.{partition}`, with an incarnation
//! drawn at random when the process starts. Broker deduplication is per producer name,
//! so two processes (a restarted node, or two nodes given the same id by mistake) must
//! never share one: a new process would otherwise continue an old publishing-id
//! sequence it knows nothing about.
//!
//! A producer whose append or confirmation failed is discarded, so the next session on
//! the partition gets a fresh one instead of inheriting a broken connection.

use eventlog::log::{Appender, LogError, StreamLog};
use eventlog::streams::StreamLayout;
use tokio::sync::Mutex;

/// Frames are at most this big by default; the client keeps batches under the broker's
/// frame limit with it.
fn max_message_bytes(max_frame_bytes: usize) -> usize {
    // Header (28 bytes + producer name) and the chunk's sequence number come on top.
    max_frame_bytes + 256
}

/// A producer handed out by [`AudioAppenders::get`], tagged with its generation so that
/// only the failing one is discarded.
#[derive(Clone)]
pub struct Lease {
    pub appender: Appender,
    partition: u16,
    generation: u64,
}

struct Slot {
    generation: u64,
    appender: Option<Appender>,
}

pub struct AudioAppenders {
    log: StreamLog,
    layout: StreamLayout,
    producer_prefix: String,
    max_message_bytes: usize,
    slots: Vec<Mutex<Slot>>,
}

impl AudioAppenders {
    pub fn new(
        log: StreamLog,
        layout: StreamLayout,
        node_id: &str,
        max_frame_bytes: usize,
    ) -> Self {
        let incarnation = format!("{:016x}", rand::random::<u64>());
        let slots = (0..layout.partitions)
            .map(|_| {
                Mutex::new(Slot {
                    generation: 0,
                    appender: None,
                })
            })
            .collect();
        Self {
            log,
            layout,
            producer_prefix: format!("{node_id}.{incarnation}"),
            max_message_bytes: max_message_bytes(max_frame_bytes),
            slots,
        }
    }

    /// The producer of `partition`, opened on first use. Concurrent callers wait for
    /// the one opening it rather than opening a second producer under the same name.
    pub async fn get(&self, partition: u16) -> Result<Lease, LogError> {
        let mut slot = self.slots[usize::from(partition)].lock().await;
        if let Some(appender) = &slot.appender {
            return Ok(Lease {
                appender: appender.clone(),
                partition,
                generation: slot.generation,
            });
        }
        let stream = self.layout.audio_partition(partition);
        let name = format!("{}.audio.{partition}", self.producer_prefix);
        let appender = self
            .log
            .appender(&stream, &name, true, self.max_message_bytes)
            .await?;
        slot.generation += 1;
        slot.appender = Some(appender.clone());
        Ok(Lease {
            appender,
            partition,
            generation: slot.generation,
        })
    }

    /// Forgets a producer that failed, unless it was already replaced.
    pub async fn discard(&self, lease: &Lease) {
        let mut slot = self.slots[usize::from(lease.partition)].lock().await;
        if slot.generation == lease.generation
            && let Some(appender) = slot.appender.take()
        {
            // Closed in the background: the broker may be slow to answer, and
            // dropping an open producer blocks its thread until it does.
            tokio::spawn(appender.close());
        }
    }

    /// Closes every producer, once no session uses them any more. The client library
    /// closes a producer that is dropped open by blocking on the broker, which hangs
    /// if the runtime is shutting down: they must be closed explicitly first.
    pub async fn close(&self) {
        for slot in &self.slots {
            if let Some(appender) = slot.lock().await.appender.take() {
                appender.close().await;
            }
        }
    }
}
