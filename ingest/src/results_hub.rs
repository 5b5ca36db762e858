//! The node's tails of the results partitions, fanned out to its sessions.
//!
//! A consumer is a broker connection of its own, so one per session would cost the node
//! a connection (and the broker a reader) per session. Instead the node reads each
//! results partition once, from the first session that needs it on, and hands every
//! event to the session it names, if that session is served here.
//!
//! Nothing is missed by subscribing late: a session subscribes right after its
//! `SessionOpened` is confirmed and before it asks for a worker, so every result of it
//! is appended after the subscription, and the tail reads it later still. A new tail
//! starts a little in the past (the broker's timestamps are per chunk of messages).
//!
//! When a partition's tail fails (the broker went away), its sessions' channels close
//! and each session ends with `broker_unavailable`; the next subscription starts a new
//! tail. An event that does not decode goes to the session its header names, as an
//! error (the session ends: skipping it could hide a final). A session whose channel is
//! full (its connection stopped taking results) is dropped from the tail, and its
//! channel closes.
//!
//! A resumed session needs its results from its start, which the tails (started later)
//! may not have seen: it gets a reader of its own ([`ResultsHub::history`]), from the
//! session's opening on. Resumes are rare next to opens, so that connection is paid
//! only then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use eventlog::log::{LogError, ReadFrom, StreamLog};
use eventlog::streams::StreamLayout;
use eventlog::{Envelope, SessionId, now_ms};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A new tail starts this far back: the broker finds timestamps per chunk.
const LOOKBACK_MS: u64 = 5_000;
/// Results a session may have waiting before its connection takes them.
const SESSION_BACKLOG: usize = 1024;

type Subscribers = Arc<Mutex<Routes>>;

/// A result event, or why the one in its place could not be read.
pub type ResultItem = Result<Envelope, String>;

/// A tail's sessions; `closed` once the tail has ended and takes no one any more.
#[derive(Default)]
struct Routes {
    sessions: HashMap<SessionId, mpsc::Sender<ResultItem>>,
    closed: bool,
}

impl Routes {
    /// Ends the tail: every session's channel closes.
    fn close(&mut self) {
        self.closed = true;
        self.sessions.clear();
    }
}

pub struct ResultsHub {
    log: StreamLog,
    layout: StreamLayout,
    tails: Mutex<HashMap<u16, Tail>>,
}

struct Tail {
    subscribers: Subscribers,
    task: JoinHandle<()>,
}

/// One session's results, for as long as it is held.
pub struct Subscription {
    pub results: mpsc::Receiver<ResultItem>,
    source: Source,
}

/// Where a subscription's results come from, undone when it is dropped.
enum Source {
    /// A route on the partition's shared tail.
    Tail {
        session: SessionId,
        subscribers: Subscribers,
    },
    /// A reader of the session's own.
    Reader(JoinHandle<()>),
}

impl ResultsHub {
    pub fn new(log: StreamLog, layout: StreamLayout) -> Arc<Self> {
        Arc::new(Self {
            log,
            layout,
            tails: Mutex::new(HashMap::new()),
        })
    }

    /// Starts delivering `session`'s result events, in log order.
    pub fn subscribe(&self, session: SessionId) -> Subscription {
        let partition = self.layout.partition_of(session);
        let (tx, results) = mpsc::channel(SESSION_BACKLOG);
        let mut tails = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        let tail = tails
            .entry(partition)
            .or_insert_with(|| self.start(partition));
        let mut routes = lock(&tail.subscribers);
        if routes.closed {
            drop(routes);
            *tail = self.start(partition);
            routes = lock(&tail.subscribers);
        }
        routes.sessions.insert(session, tx);
        drop(routes);
        Subscription {
            results,
            source: Source::Tail {
                session,
                subscribers: tail.subscribers.clone(),
            },
        }
    }

    /// Delivers `session`'s result events from its start (it opened at
    /// `opened_at_ms`) on, in log order, through a reader of its own.
    pub fn history(&self, session: SessionId, opened_at_ms: u64) -> Subscription {
        let (tx, results) = mpsc::channel(SESSION_BACKLOG);
        let stream = self.layout.results_stream(session);
        let from = ReadFrom::Timestamp(opened_at_ms.saturating_sub(LOOKBACK_MS));
        let log = self.log.clone();
        let task = tokio::spawn(async move {
            let mut reader = match log.reader(&stream, from, Some(session)).await {
                Ok(reader) => reader,
                Err(e) => {
                    tracing::warn!(%session, %stream, error = %e, "cannot read the session's results");
                    return;
                }
            };
            while let Some(item) = reader.next().await {
                let item = match item {
                    Ok(record) => Ok(record.envelope),
                    Err(e @ LogError::Decode { .. }) => Err(e.to_string()),
                    Err(e) => {
                        tracing::warn!(%session, %stream, error = %e, "the session's results reader failed");
                        break;
                    }
                };
                // A full channel is a connection that stopped reading: it ends, as
                // on the shared tail, rather than holding the reader.
                if tx.try_send(item).is_err() {
                    break;
                }
            }
            reader.close().await;
        });
        Subscription {
            results,
            source: Source::Reader(task),
        }
    }

    fn start(&self, partition: u16) -> Tail {
        let subscribers = Subscribers::default();
        let task = tokio::spawn(follow(
            self.log.clone(),
            self.layout.results_partition(partition),
            subscribers.clone(),
        ));
        Tail { subscribers, task }
    }
}

impl Drop for ResultsHub {
    fn drop(&mut self) {
        let tails = self.tails.get_mut().unwrap_or_else(|p| p.into_inner());
        for tail in tails.values() {
            tail.task.abort();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        match &self.source {
            Source::Tail {
                session,
                subscribers,
            } => {
                lock(subscribers).sessions.remove(session);
            }
            Source::Reader(task) => task.abort(),
        }
    }
}

fn lock(subscribers: &Subscribers) -> std::sync::MutexGuard<'_, Routes> {
    subscribers.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one results partition and hands each event to its session's subscriber.
async fn follow(log: StreamLog, stream: String, subscribers: Subscribers) {
    let from = ReadFrom::Timestamp(now_ms().saturating_sub(LOOKBACK_MS));
    let mut reader = match log.reader(&stream, from, None).await {
        Ok(reader) => reader,
        Err(e) => {
            tracing::error!(%stream, error = %e, "cannot follow the results partition");
            lock(&subscribers).close();
            return;
        }
    };
    tracing::debug!(%stream, "following the results partition");
    while let Some(item) = reader.next().await {
        let (session, item) = match item {
            Ok(record) => (record.envelope.session, Ok(record.envelope)),
            Err(e @ LogError::Decode { session, .. }) => {
                tracing::error!(%stream, error = %e, "undecodable result event");
                (session, Err(e.to_string()))
            }
            Err(e) => {
                tracing::error!(%stream, error = %e, "the results partition failed");
                break;
            }
        };
        let Some(session) = session else {
            continue;
        };
        let mut routes = lock(&subscribers);
        let Some(tx) = routes.sessions.get(&session) else {
            continue;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(item) {
            tracing::warn!(%session, backlog = SESSION_BACKLOG, "a session stopped taking its results: dropped from the tail");
            routes.sessions.remove(&session);
        }
    }
    lock(&subscribers).close();
    reader.close().await;
}
