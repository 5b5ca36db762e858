//! Wire encoding of [`Envelope`]s, version 1.
//!
//! Every message starts with the same header, so any consumer (and the broker's filter
//! extractor) can read the session id without parsing the body:
//!
//! ```text
//! offset  size  field
//! 0       1     schema version (1)
//! 1       1     body kind: 0 = JSON event, 1 = audio chunk
//! 2       16    session id (UUID bytes; all zero for worker-level events)
//! 18      8     at_ms, u64 little-endian
//! 26      2     producer name length n, u16 little-endian
//! 28      n     producer name, UTF-8
//! 28+n    ...   body
//! ```
//!
//! An audio body is the chunk's sequence number (u64 little-endian) followed by the
//! client's bytes, untouched. A JSON body is the serde encoding of [`Event`]. Decoding
//! never panics: an unknown version, an unknown kind, a truncated header or a body that
//! does not parse is a [`DecodeError`].

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;
use uuid::Uuid;

use crate::events::{AudioChunk, Envelope, Event, SessionId};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u8 = 1;
const KIND_JSON: u8 = 0;
const KIND_AUDIO: u8 = 1;
const HEADER_LEN: usize = 28;
const SESSION_RANGE: std::ops::Range<usize> = 2..18;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message of {0} bytes is shorter than the event header")]
    Truncated(usize),
    #[error("unsupported event schema version {0} (this build reads version {SCHEMA_VERSION})")]
    UnknownVersion(u8),
    #[error("unknown event body kind {0}")]
    UnknownKind(u8),
    #[error("producer name is not UTF-8")]
    BadProducer,
    #[error("corrupt event body: {0}")]
    Corrupt(String),
}

/// Encodes an envelope into one broker message.
pub fn encode(envelope: &Envelope) -> Bytes {
    let producer = envelope.producer.as_bytes();
    let producer_len = producer.len().min(u16::MAX as usize);
    let mut out = BytesMut::with_capacity(HEADER_LEN + producer_len + 64);
    out.put_u8(SCHEMA_VERSION);
    out.put_u8(match envelope.event {
        Event::AudioChunk(_) => KIND_AUDIO,
        _ => KIND_JSON,
    });
    out.put_slice(envelope.session.unwrap_or(Uuid::nil()).as_bytes());
    out.put_u64_le(envelope.at_ms);
    out.put_u16_le(producer_len as u16);
    out.put_slice(&producer[..producer_len]);
    match &envelope.event {
        Event::AudioChunk(chunk) => {
            out.reserve(8 + chunk.bytes.len());
            out.put_u64_le(chunk.seq);
            out.put_slice(&chunk.bytes);
        }
        event => {
            // Serialising a plain enum of strings and numbers into memory cannot fail.
            let json = serde_json::to_vec(event).expect("control events serialise");
            out.put_slice(&json);
        }
    }
    out.freeze()
}

/// Reads the session id from an encoded message's header without decoding the rest;
/// `None` for worker-level events and for messages too short to carry a header.
pub fn peek_session(message: &[u8]) -> Option<SessionId> {
    let bytes: [u8; 16] = message.get(SESSION_RANGE)?.try_into().ok()?;
    let id = Uuid::from_bytes(bytes);
    (!id.is_nil()).then_some(id)
}

/// Decodes one broker message.
pub fn decode(message: &[u8]) -> Result<Envelope, DecodeError> {
    if message.len() < 2 {
        return Err(DecodeError::Truncated(message.len()));
    }
    if message[0] != SCHEMA_VERSION {
        return Err(DecodeError::UnknownVersion(message[0]));
    }
    let kind = message[1];
    if kind != KIND_JSON && kind != KIND_AUDIO {
        return Err(DecodeError::UnknownKind(kind));
    }
    if message.len() < HEADER_LEN {
        return Err(DecodeError::Truncated(message.len()));
    }
    let session = peek_session(message);
    let at_ms = u64::from_le_bytes(message[18..26].try_into().expect("8 bytes"));
    let producer_len = u16::from_le_bytes(message[26..28].try_into().expect("2 bytes")) as usize;
    let body_start = HEADER_LEN + producer_len;
    let producer = message
        .get(HEADER_LEN..body_start)
        .ok_or(DecodeError::Truncated(message.len()))?;
    let producer = std::str::from_utf8(producer)
        .map_err(|_| DecodeError::BadProducer)?
        .to_owned();
    let body = &message[body_start..];
    let event = if kind == KIND_AUDIO {
        let seq: [u8; 8] = body
            .get(..8)
            .ok_or(DecodeError::Truncated(message.len()))?
            .try_into()
            .expect("8 bytes");
        Event::AudioChunk(AudioChunk {
            seq: u64::from_le_bytes(seq),
            bytes: Bytes::copy_from_slice(&body[8..]),
        })
    } else {
        serde_json::from_slice(body).map_err(|e| DecodeError::Corrupt(e.to_string()))?
    };
    Ok(Envelope {
        session,
        at_ms,
        producer,
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{AudioEncoding, AudioFormat, SessionLoad};

    fn envelope(event: Event) -> Envelope {
        Envelope {
            session: Some(Uuid::new_v4()),
            at_ms: 1_733_000_000_123,
            producer: "ingest-test".into(),
            event,
        }
    }

    fn every_kind() -> Vec<Envelope> {
        let s = Uuid::new_v4();
        let mut all = vec![
            envelope(Event::SessionOpened {
                tenant: "t".into(),
                model: "whisper-tiny.en".into(),
                format: AudioFormat {
                    sample_rate: 16_000,
                    encoding: AudioEncoding::PcmS16le,
                },
            }),
            envelope(Event::AudioChunk(AudioChunk {
                seq: 42,
                bytes: Bytes::from_static(&[1, 2, 3, 255, 0]),
            })),
            envelope(Event::AudioChunk(AudioChunk {
                seq: 0,
                bytes: Bytes::new(),
            })),
            envelope(Event::EndOfStream { last_seq: Some(9) }),
            envelope(Event::EndOfStream { last_seq: None }),
            envelope(Event::SessionClosed {
                reason: "done".into(),
            }),
            envelope(Event::SessionResumed {
                writer: "ingest-1/5f0e".into(),
            }),
            envelope(Event::EpochStarted {
                epoch: 3,
                worker: "w".into(),
            }),
            envelope(Event::Partial {
                epoch: 3,
                segment: 1,
                text: "hel".into(),
                start_ms: 10,
                end_ms: 20,
            }),
            envelope(Event::Final {
                epoch: 3,
                segment: 1,
                text: "héllo \"world\"".into(),
                start_ms: 10,
                end_ms: 900,
            }),
            envelope(Event::TranscriptCompleted {
                epoch: 3,
                segments: 2,
            }),
            envelope(Event::WorkerAllocated {
                worker: "w".into(),
                model: "m".into(),
                epoch: 1,
                token: 4,
            }),
            envelope(Event::SessionQueued {
                model: "m".into(),
                position: 2,
                token: 4,
            }),
            envelope(Event::WorkerReleased {
                worker: "w".into(),
                epoch: 1,
                token: 4,
            }),
        ];
        for event in [
            Event::LeaderElected {
                replica: "orchestrator-a".into(),
                token: 4,
            },
            Event::WorkerRegistered {
                worker: "w".into(),
                model: "m".into(),
                capacity: 1,
                token: 4,
            },
            Event::WorkerLost {
                worker: "w".into(),
                reason: "stream closed".into(),
                token: 4,
            },
            Event::ScalingDecided {
                model: "m".into(),
                policy: "predictive".into(),
                workers: 3,
                token: 4,
            },
            Event::WorkerDraining {
                worker: "w".into(),
                draining: true,
                token: 4,
            },
            Event::WorkerRetired {
                worker: "w".into(),
                moved: 1,
                token: 4,
            },
            Event::Heartbeat {
                worker: "w".into(),
                model: "m".into(),
                capacity: 2,
                sessions: vec![SessionLoad {
                    session: s,
                    epoch: 1,
                    decoded_ms: 1500,
                }],
                token: 4,
            },
        ] {
            all.push(Envelope {
                session: None,
                ..envelope(event)
            });
        }
        all
    }

    #[test]
    fn every_event_round_trips() {
        for e in every_kind() {
            let bytes = encode(&e);
            assert_eq!(decode(&bytes).unwrap(), e, "{e:?}");
            assert_eq!(peek_session(&bytes), e.session);
        }
    }

    #[test]
    fn audio_is_binary_not_base64() {
        let payload = vec![7u8; 640];
        let e = envelope(Event::AudioChunk(AudioChunk {
            seq: 1,
            bytes: Bytes::from(payload.clone()),
        }));
        let bytes = encode(&e);
        assert_eq!(bytes.len(), HEADER_LEN + "ingest-test".len() + 8 + 640);
        assert!(bytes.ends_with(&payload));
    }

    #[test]
    fn unknown_version_is_an_error() {
        let mut bytes = encode(&every_kind()[0]).to_vec();
        bytes[0] = 2;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownVersion(2)));
        bytes[0] = 0;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownVersion(0)));
    }

    #[test]
    fn unknown_kind_is_an_error() {
        let mut bytes = encode(&every_kind()[0]).to_vec();
        bytes[1] = 9;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownKind(9)));
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        for e in every_kind() {
            let bytes = encode(&e);
            for len in 0..bytes.len() {
                let r = decode(&bytes[..len]);
                // Audio payloads may legitimately be cut at any byte after the seq:
                // the prefix then decodes as a shorter chunk. Everything else must fail.
                if let (
                    Ok(Envelope {
                        event: Event::AudioChunk(c),
                        ..
                    }),
                    Event::AudioChunk(orig),
                ) = (&r, &e.event)
                {
                    assert!(orig.bytes.starts_with(&c.bytes));
                } else {
                    assert!(r.is_err(), "prefix of {len} bytes of {e:?} decoded: {r:?}");
                }
            }
        }
    }

    #[test]
    fn corrupt_bodies_are_errors() {
        let e = every_kind()[3].clone();
        let mut bytes = encode(&e).to_vec();
        let last = bytes.len() - 1;
        bytes[last] = b'!';
        assert!(matches!(decode(&bytes), Err(DecodeError::Corrupt(_))));
        // a JSON body naming the audio variant must not sneak in as text
        let mut fake = encode(&e).to_vec();
        fake.truncate(HEADER_LEN + e.producer.len());
        fake.extend_from_slice(br#"{"type":"audio_chunk","seq":1}"#);
        assert!(matches!(decode(&fake), Err(DecodeError::Corrupt(_))));
        // producer length pointing past the end
        let mut bad = encode(&e).to_vec();
        bad[26] = 0xff;
        bad[27] = 0xff;
        assert!(decode(&bad).is_err());
        // random garbage with a valid version byte
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..2000 {
            let len = (state % 200) as usize;
            let mut junk = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                junk.push(state as u8);
            }
            if let Some(b) = junk.first_mut() {
                *b = SCHEMA_VERSION;
            }
            let _ = decode(&junk);
        }
    }
}
