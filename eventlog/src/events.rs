//! The event schema, version 1.
//!
//! Every event travels in an [`Envelope`] naming its session (when it has one), the
//! time it happened and the process that produced it. Audio chunks carry the client's
//! bytes exactly as sent; the session's original format is recorded once, in
//! [`Event::SessionOpened`], so replay can return the client's bytes and the recognizer
//! knows how to convert them.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Sessions are identified by UUIDs, chosen by ingest when a session opens.
pub type SessionId = Uuid;

/// Sample encodings a client may stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioEncoding {
    /// Signed 16-bit little-endian PCM.
    PcmS16le,
    /// 32-bit IEEE float little-endian PCM.
    PcmF32le,
}

impl AudioEncoding {
    /// The name used in events, on the gRPC API and in the client protocol.
    pub fn name(self) -> &'static str {
        match self {
            AudioEncoding::PcmS16le => "pcm_s16le",
            AudioEncoding::PcmF32le => "pcm_f32le",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [AudioEncoding::PcmS16le, AudioEncoding::PcmF32le]
            .into_iter()
            .find(|e| e.name() == name)
    }

    pub fn bytes_per_sample(self) -> usize {
        match self {
            AudioEncoding::PcmS16le => 2,
            AudioEncoding::PcmF32le => 4,
        }
    }
}

/// The client's audio format, mono.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudioFormat {
    pub sample_rate: u32,
    pub encoding: AudioEncoding,
}

impl AudioFormat {
    /// The sample rates a session may declare, in either encoding: the recognizer
    /// converts each to its model's 16 kHz (`recognizer::audio`), and ingest refuses
    /// the others at the door.
    pub const SAMPLE_RATES: [u32; 3] = [8_000, 16_000, 48_000];
}

/// Who produced an event and when, plus the event itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// The session the event belongs to; `None` for worker-level events (heartbeats,
    /// registrations, losses).
    pub session: Option<SessionId>,
    /// Unix milliseconds at the producer.
    pub at_ms: u64,
    /// The producing process, for instance `ingest-7f3a` or `recognizer-2`.
    pub producer: String,
    pub event: Event,
}

/// A chunk of the client's audio, bytes as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AudioChunk {
    /// The client's sequence number, from 0, one per binary frame.
    pub seq: u64,
    pub bytes: Bytes,
}

/// A session's decoding progress, as reported in heartbeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionLoad {
    pub session: SessionId,
    pub epoch: u64,
    pub decoded_ms: u64,
}

/// Every event of the pipeline. Audio is encoded in binary by [`crate::codec`]; every
/// other variant is JSON on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    // --- session input (audio partitions), written by ingest ---
    SessionOpened {
        tenant: String,
        model: String,
        format: AudioFormat,
    },
    #[serde(skip)]
    AudioChunk(AudioChunk),
    EndOfStream {
        /// Sequence number of the last chunk; `None` when no audio was sent.
        last_seq: Option<u64>,
    },
    SessionClosed {
        reason: String,
    },
    /// A client reconnected and resumed the session through a new connection,
    /// `writer`, the producer of the session's input from here on. Everything an
    /// earlier connection appended is before this marker in the log.
    SessionResumed {
        writer: String,
    },

    // --- results (result partitions), written by the assigned recognizer ---
    /// Written by a worker before its first result for an assignment.
    EpochStarted {
        epoch: u64,
        worker: String,
    },
    Partial {
        epoch: u64,
        segment: u32,
        text: String,
        start_ms: u64,
        end_ms: u64,
    },
    Final {
        epoch: u64,
        segment: u32,
        text: String,
        start_ms: u64,
        end_ms: u64,
    },
    TranscriptCompleted {
        epoch: u64,
        /// Number of final segments in the transcript.
        segments: u32,
    },

    // --- control stream, written by the orchestrator leader ---
    //
    // Every control and heartbeat event carries the fencing token of the leader term
    // that wrote it: consumers ignore a deposed leader's late events (see
    // [`crate::control`]).
    /// A replica won the leader lock; repeated now and then during the term, so the
    /// latest token is always in the stream's recent past.
    LeaderElected {
        replica: String,
        token: u64,
    },
    WorkerRegistered {
        worker: String,
        model: String,
        capacity: u32,
        token: u64,
    },
    WorkerAllocated {
        worker: String,
        model: String,
        epoch: u64,
        token: u64,
    },
    SessionQueued {
        model: String,
        position: u32,
        token: u64,
    },
    WorkerReleased {
        worker: String,
        epoch: u64,
        token: u64,
    },
    WorkerLost {
        worker: String,
        reason: String,
        token: u64,
    },
    /// The autoscaler changed how many workers it wants for a model (`policy` decided).
    ScalingDecided {
        model: String,
        policy: String,
        workers: u32,
        token: u64,
    },
    /// A worker takes no new sessions (`draining`), or takes them again.
    WorkerDraining {
        worker: String,
        draining: bool,
        token: u64,
    },
    /// A drained worker was removed and told to stop; `moved` sessions it still served
    /// went back to the queue, to resume elsewhere from their checkpoints.
    WorkerRetired {
        worker: String,
        moved: u32,
        token: u64,
    },

    // --- heartbeat stream, written by the orchestrator leader on behalf of workers ---
    Heartbeat {
        worker: String,
        model: String,
        capacity: u32,
        sessions: Vec<SessionLoad>,
        token: u64,
    },
}

impl Event {
    /// The assignment epoch of a result event.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Event::EpochStarted { epoch, .. }
            | Event::Partial { epoch, .. }
            | Event::Final { epoch, .. }
            | Event::TranscriptCompleted { epoch, .. }
            | Event::WorkerAllocated { epoch, .. }
            | Event::WorkerReleased { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// The fencing token of the leader term that wrote a control or heartbeat event.
    pub fn leader_token(&self) -> Option<u64> {
        match self {
            Event::LeaderElected { token, .. }
            | Event::WorkerRegistered { token, .. }
            | Event::WorkerAllocated { token, .. }
            | Event::SessionQueued { token, .. }
            | Event::WorkerReleased { token, .. }
            | Event::WorkerLost { token, .. }
            | Event::ScalingDecided { token, .. }
            | Event::WorkerDraining { token, .. }
            | Event::WorkerRetired { token, .. }
            | Event::Heartbeat { token, .. } => Some(*token),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_names_match_the_serde_names() {
        for encoding in [AudioEncoding::PcmS16le, AudioEncoding::PcmF32le] {
            assert_eq!(serde_json::to_value(encoding).unwrap(), encoding.name());
            assert_eq!(AudioEncoding::from_name(encoding.name()), Some(encoding));
        }
        assert_eq!(AudioEncoding::from_name("mp3"), None);
    }
}
