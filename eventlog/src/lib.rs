//! The session event log: what the pipeline's processes say to each other, and where.
//!
//! - [`events`]: the versioned event schema (v1);
//! - [`codec`]: its compact wire encoding (binary audio, JSON control events);
//! - [`config`]: the command-line and environment settings every process shares;
//! - [`streams`]: the stream layout (partitioned audio and result streams, control and
//!   heartbeat streams) and which partition a session lives on;
//! - [`results`]: the one rule deciding which result events count (epoch fencing and
//!   per-segment deduplication), shared by every consumer;
//! - [`control`]: which control events count (a deposed leader's late events do not);
//! - [`checkpoint`]: the replay point and its Redis store;
//! - [`log`]: append and read over RabbitMQ streams.

pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod control;
pub mod events;
pub mod log;
pub mod results;
pub mod streams;

pub use events::{AudioEncoding, AudioFormat, Envelope, Event, SessionId};

/// Milliseconds since the Unix epoch, the clock every event is stamped with.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
