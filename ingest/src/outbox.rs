//! The sending half of a connection: a bounded queue drained by a writer task.
//!
//! The connection task never waits on a slow client. When the queue is full, a
//! `partial` is dropped (a later partial or the segment's final supersedes it); any
//! other message not fitting means the client does not keep up, and the session ends
//! with `client_too_slow`. Nothing is lost for good by that: results stay in the log.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::metrics;
use crate::protocol::{CLOSE_NORMAL, ServerMessage, SessionError};

/// Messages a connection may have queued for its client.
pub const QUEUE_CAPACITY: usize = 512;

/// How long closing waits for the queue to drain into a slow socket.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

enum Outgoing {
    Text {
        json: String,
        /// `at_ms` of the result event this message carries, for the latency metric.
        result_at_ms: Option<u64>,
    },
    Ping,
    Close(CloseFrame),
}

pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    writer: JoinHandle<()>,
}

/// The queue could not take a message that must not be dropped.
#[derive(Debug)]
pub struct TooSlow;

impl Outbox {
    pub fn spawn(sink: SplitSink<WebSocket, Message>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer = tokio::spawn(write(sink, rx));
        Self { tx, writer }
    }

    /// Queues a message; see the module doc for what happens when the queue is full.
    pub fn send(&self, message: &ServerMessage, result_at_ms: Option<u64>) -> Result<(), TooSlow> {
        let outgoing = Outgoing::Text {
            json: message.to_json(),
            result_at_ms,
        };
        match self.tx.try_send(outgoing) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) if message.is_droppable() => {
                metrics::partial_dropped();
                Ok(())
            }
            // A closed queue means the writer stopped on a dead socket; the read side
            // sees the disconnection next.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(TooSlow),
        }
    }

    /// A keepalive ping. Skipped when the queue is full: the queue itself is traffic.
    pub fn ping(&self) {
        let _ = self.tx.try_send(Outgoing::Ping);
    }

    /// Sends what is queued, then the error (if any) and the close frame, waiting a
    /// bounded time for a slow socket before dropping it.
    pub async fn close(self, error: Option<&SessionError>) {
        let frame = match error {
            None => CloseFrame {
                code: CLOSE_NORMAL,
                reason: "completed".into(),
            },
            Some(e) => CloseFrame {
                code: e.close_code(),
                reason: e.code().into(),
            },
        };
        let Self { tx, mut writer } = self;
        let writer_ref = &mut writer;
        let closed = tokio::time::timeout(CLOSE_GRACE, async move {
            if let Some(e) = error {
                let error = Outgoing::Text {
                    json: e.to_message().to_json(),
                    result_at_ms: None,
                };
                let _ = tx.send(error).await;
            }
            let _ = tx.send(Outgoing::Close(frame)).await;
            drop(tx);
            let _ = writer_ref.await;
        })
        .await;
        if closed.is_err() {
            writer.abort();
        }
    }
}

async fn write(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(outgoing) = rx.recv().await {
        let (message, result_at_ms) = match outgoing {
            Outgoing::Text { json, result_at_ms } => (Message::Text(json.into()), result_at_ms),
            Outgoing::Ping => (Message::Ping(Default::default()), None),
            Outgoing::Close(frame) => {
                let _ = sink.send(Message::Close(Some(frame))).await;
                return;
            }
        };
        if sink.send(message).await.is_err() {
            return;
        }
        if let Some(at_ms) = result_at_ms {
            metrics::result_sent(at_ms);
        }
    }
}
