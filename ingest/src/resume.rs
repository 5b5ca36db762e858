//! Resuming a session on a new connection, as pure values: the resume token, and the
//! fold that finds where a session's stored input ends (docs/decisions/resume.md).
//!
//! The token is `{claims}.{mac}`: the claims (when the session opened, its model and
//! audio format) in base64url JSON, and an HMAC-SHA256 over the session id, the tenant
//! and the claims with the secret every ingest node shares. Nothing is stored, so a
//! token survives Redis losing its data and works on every node; it is bound to its
//! session and tenant, so another tenant's key, another session's id or an altered
//! claim all fail the same way.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use eventlog::{AudioFormat, Event, SessionId};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Separates the MAC's fields: none of them contains a NUL.
const DOMAIN: &[u8] = b"asr-resume-v1\0";

/// What a token says about its session, enough to serve it without reading its start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeClaims {
    pub opened_at_ms: u64,
    pub model: String,
    pub format: AudioFormat,
}

/// Why a token does not resume the session asked for; deliberately one case, so a
/// refusal tells a guesser nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidToken;

/// Issues and checks resume tokens with the nodes' shared secret.
#[derive(Clone)]
pub struct ResumeTokens {
    secret: Vec<u8>,
}

impl std::fmt::Debug for ResumeTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeTokens(<secret>)")
    }
}

impl PartialEq for ResumeTokens {
    fn eq(&self, other: &Self) -> bool {
        self.secret == other.secret
    }
}

impl Eq for ResumeTokens {}

impl ResumeTokens {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: secret.into(),
        }
    }

    /// A secret of this process's own: tokens then resume only on this node, until it
    /// restarts.
    pub fn random() -> Self {
        Self::new(rand::random::<[u8; 32]>().to_vec())
    }

    pub fn issue(&self, session: SessionId, tenant: &str, claims: &ResumeClaims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialise"));
        let tag = self.mac(session, tenant, &payload).finalize().into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The claims of `token`, if this secret issued it for `session` of `tenant`. The
    /// MAC is compared in constant time.
    pub fn verify(
        &self,
        token: &str,
        session: SessionId,
        tenant: &str,
    ) -> Result<ResumeClaims, InvalidToken> {
        let (payload, tag) = token.split_once('.').ok_or(InvalidToken)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| InvalidToken)?;
        self.mac(session, tenant, payload)
            .verify_slice(&tag)
            .map_err(|_| InvalidToken)?;
        let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| InvalidToken)?;
        serde_json::from_slice(&json).map_err(|_| InvalidToken)
    }

    fn mac(&self, session: SessionId, tenant: &str, payload: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(DOMAIN);
        mac.update(session.as_bytes());
        mac.update(tenant.as_bytes());
        mac.update(b"\0");
        mac.update(payload.as_bytes());
        mac
    }
}

/// Where a session's stored input ends, as the resumed connection needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredInput {
    /// The sequence number the client sends next: one past the highest stored.
    pub next_seq: u64,
    /// Client samples stored (for the session length limit).
    pub samples: u64,
    /// `EndOfStream` is stored: the client sends no more audio.
    pub ended: bool,
}

/// Folds the session's input events, read from a known point up to the new writer's
/// `SessionResumed`, into [`StoredInput`]. A chunk whose sequence number was seen
/// already (a second copy) counts once, as every reader counts it.
#[derive(Clone, Debug)]
pub struct InputScan {
    stored: StoredInput,
    bytes_per_sample: u64,
    writer: String,
    done: bool,
}

impl InputScan {
    /// A scan starting at chunk `first_seq`, `samples_before` samples into the session,
    /// that ends at `writer`'s marker.
    pub fn new(format: AudioFormat, first_seq: u64, samples_before: u64, writer: &str) -> Self {
        Self {
            stored: StoredInput {
                next_seq: first_seq,
                samples: samples_before,
                ended: false,
            },
            bytes_per_sample: format.encoding.bytes_per_sample() as u64,
            writer: writer.into(),
            done: false,
        }
    }

    /// Takes the next event; true once the marker was reached.
    pub fn push(&mut self, event: &Event) -> bool {
        if self.done {
            return true;
        }
        match event {
            Event::AudioChunk(chunk) if chunk.seq >= self.stored.next_seq => {
                self.stored.next_seq = chunk.seq + 1;
                self.stored.samples += chunk.bytes.len() as u64 / self.bytes_per_sample;
            }
            Event::EndOfStream { .. } => self.stored.ended = true,
            Event::SessionResumed { writer } if *writer == self.writer => self.done = true,
            _ => {}
        }
        self.done
    }

    pub fn stored(&self) -> StoredInput {
        self.stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use eventlog::AudioEncoding;
    use eventlog::events::AudioChunk;
    use uuid::Uuid;

    fn claims() -> ResumeClaims {
        ResumeClaims {
            opened_at_ms: 1_700_000_000_000,
            model: "whisper-tiny.en".into(),
            format: AudioFormat {
                sample_rate: 16_000,
                encoding: AudioEncoding::PcmS16le,
            },
        }
    }

    #[test]
    fn a_token_resumes_its_own_session_for_its_own_tenant_only() {
        let tokens = ResumeTokens::new(b"shared secret".to_vec());
        let session = Uuid::new_v4();
        let token = tokens.issue(session, "north", &claims());
        assert_eq!(tokens.verify(&token, session, "north"), Ok(claims()));

        assert_eq!(tokens.verify(&token, session, "south"), Err(InvalidToken));
        assert_eq!(
            tokens.verify(&token, Uuid::new_v4(), "north"),
            Err(InvalidToken)
        );
        let other_node = ResumeTokens::new(b"another secret".to_vec());
        assert_eq!(
            other_node.verify(&token, session, "north"),
            Err(InvalidToken)
        );
        // The tenant is delimited: "nor" + "th…" cannot be shifted into the claims.
        assert_eq!(tokens.verify(&token, session, "nort"), Err(InvalidToken));
    }

    #[test]
    fn altered_or_malformed_tokens_are_refused() {
        let tokens = ResumeTokens::new(b"s".to_vec());
        let session = Uuid::new_v4();
        let token = tokens.issue(session, "north", &claims());
        let (payload, tag) = token.split_once('.').unwrap();

        let mut forged = claims();
        forged.model = "whisper-large".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        for bad in [
            format!("{forged_payload}.{tag}"),
            format!("{payload}.{}", &tag[1..]),
            format!("{payload}."),
            payload.to_string(),
            String::new(),
            "..".into(),
            format!("{payload}.{tag}.x"),
        ] {
            assert_eq!(
                tokens.verify(&bad, session, "north"),
                Err(InvalidToken),
                "{bad}"
            );
        }
        assert_eq!(format!("{tokens:?}"), "ResumeTokens(<secret>)");
    }

    fn chunk(seq: u64, samples: usize) -> Event {
        Event::AudioChunk(AudioChunk {
            seq,
            bytes: Bytes::from(vec![0; samples * 2]),
        })
    }

    #[test]
    fn the_scan_counts_each_chunk_once_and_stops_at_its_marker() {
        let format = claims().format;
        let mut scan = InputScan::new(format, 3, 300, "ingest-b/2");
        let events = [
            chunk(3, 100),
            chunk(4, 100),
            chunk(4, 100), // a second copy: counted once
            Event::SessionResumed {
                writer: "ingest-a/1".into(),
            },
            chunk(5, 50),
        ];
        for event in &events {
            assert!(!scan.push(event));
        }
        assert!(scan.push(&Event::SessionResumed {
            writer: "ingest-b/2".into()
        }));
        // Whatever comes after the marker is the new writer's business.
        assert!(scan.push(&chunk(6, 100)));
        assert_eq!(
            scan.stored(),
            StoredInput {
                next_seq: 6,
                samples: 550,
                ended: false
            }
        );
    }

    #[test]
    fn the_scan_sees_the_end_of_stream() {
        let mut scan = InputScan::new(claims().format, 0, 0, "w");
        scan.push(&chunk(0, 10));
        scan.push(&Event::EndOfStream { last_seq: Some(0) });
        scan.push(&Event::SessionResumed { writer: "w".into() });
        assert_eq!(
            scan.stored(),
            StoredInput {
                next_seq: 1,
                samples: 10,
                ended: true
            }
        );
    }
}
