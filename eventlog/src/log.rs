//! Appending to and reading from the event log on RabbitMQ streams.
//!
//! [`StreamLog`] holds one broker environment plus a long-lived metadata connection
//! (stream creation, publisher sequence queries). Every [`Appender`] is a *named*
//! producer publishing with *explicit* publishing ids: on build it asks the broker for
//! the last id stored under its name and continues from there, so a message re-sent
//! with the same id (a retry after a lost confirm, or a restarted process) is dropped
//! by the broker instead of being stored twice. Ids are assigned and enqueued under one
//! lock, because the broker also drops any id lower than one it has already seen.
//!
//! A [`Reader`] is one consumer from a chosen position, optionally following a single
//! session on a partitioned stream: the broker's filter (probabilistic, per chunk)
//! does the coarse work and the reader checks every message's session id itself.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rabbitmq_stream_client::error::{ClientError, StreamCreateError};
use rabbitmq_stream_client::types::{ByteCapacity, Message, OffsetSpecification, ResponseCode};
use rabbitmq_stream_client::{
    Client, ClientOptions, Consumer, Dedup, Environment, FilterConfiguration, Producer,
};
use thiserror::Error;
use tokio::sync::{Mutex, oneshot};

use crate::codec::{self, DecodeError};
use crate::events::{Envelope, SessionId};

#[derive(Debug, Error)]
pub enum LogError {
    #[error(
        "cannot reach the RabbitMQ stream port at {addr}: {source} (is RabbitMQ running with the stream plugin? deploy/services.sh starts it)"
    )]
    Connect {
        addr: String,
        #[source]
        source: ClientError,
    },
    #[error("creating stream {stream}: {message}")]
    CreateStream { stream: String, message: String },
    #[error(transparent)]
    Retention(#[from] RetentionError),
    #[error("opening a producer on {stream}: {message}")]
    Producer { stream: String, message: String },
    #[error("opening a consumer on {stream}: {message}")]
    Consumer { stream: String, message: String },
    #[error("publishing to {stream}: {message}")]
    Publish { stream: String, message: String },
    #[error("the broker did not confirm message {publishing_id} on {stream}: {message}")]
    NotConfirmed {
        stream: String,
        publishing_id: u64,
        message: String,
    },
    #[error("reading {stream}: {message}")]
    Read { stream: String, message: String },
    #[error("undecodable event at offset {offset} of {stream}: {source}")]
    Decode {
        stream: String,
        offset: u64,
        /// The session its header names, when the header itself is readable.
        session: Option<SessionId>,
        #[source]
        source: DecodeError,
    },
}

/// How much history the broker keeps. Streams drop whole segments, oldest first, once
/// either limit is passed; see docs/decisions/stream-layout.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

/// A retention the broker cannot keep safely.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "a retention of {max_bytes} bytes per stream is less than two segments of {segment_bytes} bytes: \
     right after a segment rolls the broker could drop every event of a stream; \
     raise --retention-mb or lower --segment-mb"
)]
pub struct RetentionError {
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

impl Retention {
    /// Refuses a size limit under two segments. The broker keeps, besides the segment
    /// being written (empty just after a roll), only whole segments within the limit:
    /// with room for less than one, a stream can briefly hold no event at all, and
    /// events not yet archived by the projector are gone.
    pub fn check(&self) -> Result<(), RetentionError> {
        if self.max_bytes < self.segment_bytes.saturating_mul(2) {
            return Err(RetentionError {
                max_bytes: self.max_bytes,
                segment_bytes: self.segment_bytes,
            });
        }
        Ok(())
    }
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 20_000_000_000,
            segment_bytes: 100_000_000,
        }
    }
}

/// Where the broker is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub retention: Retention,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 5552,
            user: "guest".into(),
            password: "guest".into(),
            retention: Retention::default(),
        }
    }
}

/// Where a [`Reader`] starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom {
    /// The oldest message the broker still holds.
    Start,
    /// Exactly this offset (delivery starts at it, not at its chunk's first message).
    Offset(u64),
    /// The first chunk the broker stored at or after this Unix millisecond.
    Timestamp(u64),
    /// Only messages appended from now on.
    Next,
}

impl From<ReadFrom> for OffsetSpecification {
    fn from(from: ReadFrom) -> Self {
        match from {
            ReadFrom::Start => OffsetSpecification::First,
            ReadFrom::Offset(o) => OffsetSpecification::Offset(o),
            ReadFrom::Timestamp(ms) => OffsetSpecification::Timestamp(ms as i64),
            ReadFrom::Next => OffsetSpecification::Next,
        }
    }
}

/// A connection to the event log.
#[derive(Clone)]
pub struct StreamLog {
    env: Environment,
    metadata: Arc<Client>,
    retention: Retention,
}

impl StreamLog {
    pub async fn connect(config: &LogConfig) -> Result<Self, LogError> {
        let addr = format!("{}:{}", config.host, config.port);
        let connect_error = |source| LogError::Connect {
            addr: addr.clone(),
            source,
        };
        let env = Environment::builder()
            .host(&config.host)
            .port(config.port)
            .username(&config.user)
            .password(&config.password)
            .build()
            .await
            .map_err(connect_error)?;
        let options = ClientOptions::builder()
            .host(&config.host)
            .port(config.port)
            .user(&config.user)
            .password(&config.password)
            .build();
        let metadata = Client::connect(options).await.map_err(connect_error)?;
        Ok(Self {
            env,
            metadata: Arc::new(metadata),
            retention: config.retention,
        })
    }

    /// Creates the streams that do not exist yet, with the configured retention (a
    /// retention under two segments is refused). Existing streams keep the retention
    /// they were created with.
    pub async fn ensure_streams(&self, streams: &[String]) -> Result<(), LogError> {
        self.retention.check()?;
        let creates = streams.iter().map(|stream| async move {
            let result = self
                .env
                .stream_creator()
                .max_age(self.retention.max_age)
                .max_length(ByteCapacity::B(self.retention.max_bytes))
                .max_segment_size(ByteCapacity::B(self.retention.segment_bytes))
                .create(stream)
                .await;
            match result {
                Ok(()) => Ok(()),
                Err(StreamCreateError::Create {
                    status: ResponseCode::StreamAlreadyExists,
                    ..
                }) => Ok(()),
                Err(e) => Err(LogError::CreateStream {
                    stream: stream.clone(),
                    message: e.to_string(),
                }),
            }
        });
        futures::future::try_join_all(creates).await.map(|_| ())
    }

    /// Deletes streams (tests and tools only; the pipeline never deletes its log).
    pub async fn delete_streams(&self, streams: &[String]) {
        for stream in streams {
            let _ = self.env.delete_stream(stream).await;
        }
    }

    /// The highest publishing id the broker stored for `producer` on `stream`, 0 if none.
    pub async fn last_publishing_id(&self, producer: &str, stream: &str) -> Result<u64, LogError> {
        self.metadata
            .query_publisher_sequence(producer, stream)
            .await
            .map_err(|e| LogError::Producer {
                stream: stream.into(),
                message: e.to_string(),
            })
    }

    /// Opens a named producer. `filter_by_session` makes the session id the broker-side
    /// filter value (for partitioned streams). `max_message_bytes` bounds one encoded
    /// message, so that a batch stays under the broker's 1 MiB frame.
    pub async fn appender(
        &self,
        stream: &str,
        producer_name: &str,
        filter_by_session: bool,
        max_message_bytes: usize,
    ) -> Result<Appender, LogError> {
        let producer_error = |message: String| LogError::Producer {
            stream: stream.into(),
            message,
        };
        let last = self.last_publishing_id(producer_name, stream).await?;
        // name() must come first: it resets the other builder settings.
        let mut builder = self
            .env
            .producer()
            .name(producer_name)
            .batch_size(batch_size_for(max_message_bytes))
            .client_provided_name(producer_name);
        if filter_by_session {
            builder = builder.filter_value_extractor(|message: &Message| {
                message
                    .data()
                    .and_then(codec::peek_session)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            });
        }
        let producer = builder
            .build(stream)
            .await
            .map_err(|e| producer_error(e.to_string()))?;
        Ok(Appender {
            stream: stream.into(),
            name: producer_name.into(),
            state: Arc::new(Mutex::new(AppenderState {
                producer: Some(producer),
                next_id: last + 1,
            })),
        })
    }

    /// Opens a consumer on `stream` from `from`; with `session`, only that session's
    /// events are returned.
    pub async fn reader(
        &self,
        stream: &str,
        from: ReadFrom,
        session: Option<SessionId>,
    ) -> Result<Reader, LogError> {
        let mut builder = self.env.consumer().offset(from.into());
        if let Some(session) = session {
            // No client-side post_filter here: in rabbitmq-stream-client 0.11 it shifts
            // the offsets of the messages that pass. The Reader checks ids itself.
            builder = builder.filter_input(Some(FilterConfiguration::new(
                vec![session.to_string()],
                false,
            )));
        }
        let consumer = builder
            .build(stream)
            .await
            .map_err(|e| LogError::Consumer {
                stream: stream.into(),
                message: e.to_string(),
            })?;
        Ok(Reader {
            stream: stream.into(),
            session,
            consumer: Some(consumer),
            skipped: 0,
        })
    }
}

/// Keeps a batch of messages under the broker's 1 MiB frame limit (the client does
/// not split batches itself).
fn batch_size_for(max_message_bytes: usize) -> usize {
    const FRAME_BUDGET: usize = 900 * 1024;
    (FRAME_BUDGET / max_message_bytes.max(1)).clamp(1, 256)
}

struct AppenderState {
    /// `None` only once closed.
    producer: Option<Producer<Dedup>>,
    next_id: u64,
}

impl Drop for AppenderState {
    fn drop(&mut self) {
        let unclosed = LeakIfUnclosed(self.producer.take());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut unclosed = unclosed;
                if let Some(producer) = unclosed.0.take() {
                    // Closing marks the producer closed on its first poll, so even if
                    // this task is cancelled mid-close, its drop returns at once.
                    let _ = producer.close().await;
                }
            });
        }
    }
}

/// rabbitmq-stream-client closes a producer whose last reference is dropped by
/// blocking the dropping thread on the broker's answer, which hangs a runtime that is
/// shutting down (the connection's task is gone). A producer that was never closed is
/// therefore leaked rather than dropped: when the close task above never runs (the
/// runtime shut down first), or when there is no runtime at all.
struct LeakIfUnclosed(Option<Producer<Dedup>>);

impl Drop for LeakIfUnclosed {
    fn drop(&mut self) {
        if let Some(producer) = self.0.take()
            && !producer.is_closed()
        {
            std::mem::forget(producer);
        }
    }
}

/// A named producer on one stream. Cheap to clone; clones share the producer and its
/// publishing-id sequence.
#[derive(Clone)]
pub struct Appender {
    stream: String,
    name: String,
    state: Arc<Mutex<AppenderState>>,
}

/// A message handed to the broker, not yet confirmed.
#[must_use = "an append is only durable once its confirmation resolves"]
pub struct PendingAppend {
    stream: String,
    pub publishing_id: u64,
    confirm: oneshot::Receiver<Result<(), String>>,
}

impl PendingAppend {
    /// Resolves once the broker confirmed the message as stored (or dropped as a
    /// duplicate of one already stored).
    pub async fn confirmed(self) -> Result<u64, LogError> {
        let not_confirmed = |message: String| LogError::NotConfirmed {
            stream: self.stream.clone(),
            publishing_id: self.publishing_id,
            message,
        };
        match self.confirm.await {
            Ok(Ok(())) => Ok(self.publishing_id),
            Ok(Err(message)) => Err(not_confirmed(message)),
            Err(_) => Err(not_confirmed("producer closed".into())),
        }
    }
}

impl Appender {
    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Enqueues an event with the next publishing id.
    pub async fn append(&self, envelope: &Envelope) -> Result<PendingAppend, LogError> {
        let mut state = self.state.lock().await;
        let id = state.next_id;
        let pending = self.send_locked(&mut state, id, envelope).await?;
        state.next_id = id + 1;
        Ok(pending)
    }

    /// Enqueues an event with an explicit publishing id, for re-sending a message whose
    /// confirmation was lost. Ids at or below the last one the broker stored for this
    /// producer name are confirmed but not stored again.
    pub async fn append_with_id(
        &self,
        publishing_id: u64,
        envelope: &Envelope,
    ) -> Result<PendingAppend, LogError> {
        let mut state = self.state.lock().await;
        let pending = self
            .send_locked(&mut state, publishing_id, envelope)
            .await?;
        state.next_id = state.next_id.max(publishing_id + 1);
        Ok(pending)
    }

    /// Appends and waits for the broker's confirmation.
    pub async fn append_confirmed(&self, envelope: &Envelope) -> Result<u64, LogError> {
        self.append(envelope).await?.confirmed().await
    }

    async fn send_locked(
        &self,
        state: &mut AppenderState,
        id: u64,
        envelope: &Envelope,
    ) -> Result<PendingAppend, LogError> {
        let (tx, rx) = oneshot::channel();
        let message = Message::builder()
            .body(codec::encode(envelope).to_vec())
            .publishing_id(id)
            .build();
        let Some(producer) = state.producer.as_mut() else {
            return Err(LogError::Publish {
                stream: self.stream.clone(),
                message: "appender closed".into(),
            });
        };
        producer
            .send(message, move |result| async move {
                let outcome = match result {
                    Ok(status) if status.confirmed() => Ok(()),
                    Ok(status) => Err(format!("broker answered {:?}", status.status())),
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx.send(outcome);
            })
            .await
            .map_err(|e| LogError::Publish {
                stream: self.stream.clone(),
                message: e.to_string(),
            })?;
        Ok(PendingAppend {
            stream: self.stream.clone(),
            publishing_id: id,
            confirm: rx,
        })
    }

    /// Closes the producer (its connection to the broker), for every clone: appends
    /// through any clone fail from now on.
    pub async fn close(self) {
        let producer = self.state.lock().await.producer.take();
        if let Some(producer) = producer {
            let _ = producer.close().await;
        }
    }
}

/// One event read from a stream, with its offset.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub offset: u64,
    pub envelope: Envelope,
}

/// A consumer of one stream.
pub struct Reader {
    stream: String,
    session: Option<SessionId>,
    consumer: Option<Consumer>,
    /// Messages of other sessions the broker's filter let through.
    skipped: u64,
}

impl Reader {
    /// The next event (of the followed session, if any). `None` once the consumer
    /// closed. An undecodable message is an error naming its offset; the reader stays
    /// usable after it.
    pub async fn next(&mut self) -> Option<Result<Record, LogError>> {
        let consumer = self.consumer.as_mut()?;
        loop {
            let delivery = match consumer.next().await? {
                Ok(delivery) => delivery,
                Err(e) => {
                    return Some(Err(LogError::Read {
                        stream: self.stream.clone(),
                        message: e.to_string(),
                    }));
                }
            };
            let offset = delivery.offset();
            let data = delivery.message().data().unwrap_or_default();
            if let Some(wanted) = self.session
                && codec::peek_session(data) != Some(wanted)
            {
                self.skipped += 1;
                continue;
            }
            return Some(
                codec::decode(data)
                    .map(|envelope| Record { offset, envelope })
                    .map_err(|source| LogError::Decode {
                        stream: self.stream.clone(),
                        offset,
                        session: codec::peek_session(data),
                        source,
                    }),
            );
        }
    }

    /// Messages of other sessions received and dropped so far: the read amplification
    /// of following one session on a shared partition.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Closes the consumer and its connection.
    pub async fn close(mut self) {
        if let Some(consumer) = self.consumer.take() {
            let _ = consumer.handle().close().await;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // The client keeps a consumer's connection alive until it is closed explicitly.
        if let Some(consumer) = self.consumer.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = consumer.handle().close().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention(max_mb: u64, segment_mb: u64) -> Retention {
        Retention {
            max_bytes: max_mb * 1_000_000,
            segment_bytes: segment_mb * 1_000_000,
            ..Retention::default()
        }
    }

    #[test]
    fn a_retention_of_two_segments_or_more_is_kept() {
        assert_eq!(Retention::default().check(), Ok(()));
        assert_eq!(retention(2, 1).check(), Ok(()));
        assert_eq!(retention(200, 100).check(), Ok(()));
    }

    #[test]
    fn a_retention_under_two_segments_is_refused_saying_what_to_change() {
        for (max_mb, segment_mb) in [(1, 1), (150, 100), (0, 1)] {
            let error = retention(max_mb, segment_mb).check().unwrap_err();
            assert_eq!(
                error,
                RetentionError {
                    max_bytes: max_mb * 1_000_000,
                    segment_bytes: segment_mb * 1_000_000,
                }
            );
            let message = error.to_string();
            assert!(message.contains("--retention-mb"), "{message}");
        }
    }
}
