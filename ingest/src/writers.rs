//! One writer per session on this node: the connection that resumes a session fences
//! the one before it.
//!
//! Every append of a connection's session input goes through its [`Writer`]'s gate,
//! and [`Writers::claim`] takes the previous writer's gate before it returns: once it
//! has, the old connection's appends are all in the node's producer, ahead of anything
//! the new one appends (the resume marker first), and the old connection appends
//! nothing more. Both use the node's one producer for the partition, so that order is
//! the log's order.
//!
//! A writer on another node is not reached from here: its late chunks (frames it had
//! received before its client left) land after the marker, the client sends the same
//! frames again, and every reader keeps the first copy of a sequence number
//! (docs/decisions/resume.md).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use eventlog::SessionId;
use tokio::sync::{MutexGuard, Notify};

/// A connection's right to append its session's input.
#[derive(Debug, Default)]
pub struct Writer {
    gate: tokio::sync::Mutex<()>,
    fenced: AtomicBool,
    superseded: Notify,
}

impl Writer {
    /// Holds the gate for one append; `None` once a newer connection took the session.
    pub async fn admit(&self) -> Option<MutexGuard<'_, ()>> {
        let gate = self.gate.lock().await;
        (!self.is_fenced()).then_some(gate)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Resolves once a newer connection took the session.
    pub async fn superseded(&self) {
        let notified = self.superseded.notified();
        if !self.is_fenced() {
            notified.await;
        }
    }

    async fn fence(&self) {
        let _gate = self.gate.lock().await;
        self.fenced.store(true, Ordering::Release);
        self.superseded.notify_waiters();
    }
}

/// The node's current writer of each session it serves.
#[derive(Debug, Default)]
pub struct Writers {
    current: Mutex<HashMap<SessionId, Arc<Writer>>>,
}

impl Writers {
    /// Makes a new writer the session's only one on this node, fencing the previous
    /// one after its append in progress, if any.
    pub async fn claim(&self, session: SessionId) -> Arc<Writer> {
        let writer = Arc::new(Writer::default());
        let previous = self.lock().insert(session, writer.clone());
        if let Some(previous) = previous {
            previous.fence().await;
        }
        writer
    }

    /// Forgets `writer`, unless a newer one already replaced it.
    pub fn release(&self, session: SessionId, writer: &Arc<Writer>) {
        let mut current = self.lock();
        if current
            .get(&session)
            .is_some_and(|w| Arc::ptr_eq(w, writer))
        {
            current.remove(&session);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Writer>>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use uuid::Uuid;

    #[tokio::test]
    async fn a_claim_waits_for_the_old_writers_append_then_fences_it() {
        let writers = Arc::new(Writers::default());
        let session = Uuid::new_v4();
        let old = writers.claim(session).await;
        let append = old.admit().await.expect("the first writer appends");

        let claiming = tokio::spawn({
            let writers = writers.clone();
            async move { writers.claim(session).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !claiming.is_finished(),
            "the claim waits for the append in progress"
        );
        assert!(!old.is_fenced());
        drop(append);
        let new = claiming.await.unwrap();

        assert!(
            old.admit().await.is_none(),
            "the old writer appends no more"
        );
        old.superseded().await; // resolves at once
        assert!(new.admit().await.is_some());

        writers.release(session, &old); // a stale release leaves the new writer
        let newest = writers.claim(session).await;
        assert!(new.is_fenced());
        writers.release(session, &newest);
        assert!(writers.lock().is_empty());
    }
}
