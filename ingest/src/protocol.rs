//! The client protocol of `GET /v1/stream` (docs/protocol.md), as pure values.
//!
//! Text frames parse into [`ClientMessage`]s, binary frames into [`AudioFrame`]s, and
//! everything the server says is a [`ServerMessage`]. Every way a session can end badly
//! is a [`SessionError`], which knows its stable code string and its WebSocket close
//! code. Nothing here does I/O, and no input makes the parser panic (a proptest below
//! checks it).

use std::borrow::Cow;

use bytes::Bytes;
use eventlog::{AudioEncoding, AudioFormat, SessionId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bytes of the sequence-number header in front of every audio frame.
pub const SEQ_HEADER_BYTES: usize = 8;

/// A message the client sends in a text frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Open(OpenRequest),
    Resume(ResumeRequest),
    End,
}

/// The `type` values of [`ClientMessage`]: the parser tells an unknown type apart from
/// a known one with bad fields.
const CLIENT_MESSAGE_TYPES: &[&str] = &["open", "resume", "end"];

/// `{"type":"open",...}`. Unknown fields are ignored, so that clients written against
/// a later protocol (a resume token) still open sessions here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    pub model: String,
    pub sample_rate: u32,
    /// Kept as text: an encoding this build does not know is a refusal with its own
    /// code, not a malformed message.
    pub encoding: String,
    /// The tenant's API key, unless the upgrade request carried it in an
    /// `Authorization: Bearer` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
}

/// `{"type":"resume",...}`: continue a session on a new connection, after a drop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRequest {
    pub session_id: SessionId,
    /// The token `opened` gave.
    pub resume_token: Secret,
    /// The `result` index of the last result the client received; absent when it
    /// received none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<u64>,
    /// The tenant's API key, unless the upgrade request carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
}

/// A credential on the wire: serialised as the plain string, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

impl OpenRequest {
    /// The requested format, if the system serves it: `pcm_s16le` or `pcm_f32le`, at
    /// one of [`AudioFormat::SAMPLE_RATES`].
    pub fn format(&self) -> Result<AudioFormat, SessionError> {
        let encoding = AudioEncoding::from_name(&self.encoding)
            .ok_or_else(|| SessionError::UnsupportedEncoding(self.encoding.clone()))?;
        if !AudioFormat::SAMPLE_RATES.contains(&self.sample_rate) {
            return Err(SessionError::UnsupportedSampleRate(self.sample_rate));
        }
        Ok(AudioFormat {
            sample_rate: self.sample_rate,
            encoding,
        })
    }
}

impl ClientMessage {
    /// The text frame a client sends (see the `client` crate).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("client messages serialise")
    }
}

/// Parses a text frame.
pub fn parse_text(text: &str) -> Result<ClientMessage, SessionError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| SessionError::NotJson(e.to_string()))?;
    let Some(object) = value.as_object() else {
        return Err(SessionError::NotJson("expected a JSON object".into()));
    };
    let kind = match object.get("type") {
        Some(serde_json::Value::String(kind)) => kind.clone(),
        Some(other) => return Err(SessionError::UnknownMessageType(other.to_string())),
        None => return Err(SessionError::UnknownMessageType("(missing)".into())),
    };
    if !CLIENT_MESSAGE_TYPES.contains(&kind.as_str()) {
        return Err(SessionError::UnknownMessageType(kind));
    }
    serde_json::from_value(value).map_err(|e| SessionError::InvalidMessage {
        kind,
        detail: e.to_string(),
    })
}

/// One binary frame: the client's sequence number and its PCM bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AudioFrame {
    pub seq: u64,
    pub pcm: Bytes,
}

impl AudioFrame {
    /// Samples in the frame (mono, so one sample per frame of audio).
    pub fn samples(&self, encoding: AudioEncoding) -> u64 {
        (self.pcm.len() / encoding.bytes_per_sample()) as u64
    }
}

/// Parses a binary frame: an 8-byte little-endian sequence number, then a whole number
/// of samples in the session's encoding. The PCM is a slice of `frame`, not a copy.
pub fn parse_audio(frame: Bytes, encoding: AudioEncoding) -> Result<AudioFrame, SessionError> {
    if frame.len() < SEQ_HEADER_BYTES {
        return Err(SessionError::BadAudioFrame(format!(
            "{} bytes is shorter than the {SEQ_HEADER_BYTES}-byte sequence number",
            frame.len()
        )));
    }
    let mut header = [0u8; SEQ_HEADER_BYTES];
    header.copy_from_slice(&frame[..SEQ_HEADER_BYTES]);
    let pcm = frame.slice(SEQ_HEADER_BYTES..);
    let width = encoding.bytes_per_sample();
    if !pcm.len().is_multiple_of(width) {
        return Err(SessionError::BadAudioFrame(format!(
            "{} bytes of audio is not a whole number of {width}-byte samples",
            pcm.len()
        )));
    }
    Ok(AudioFrame {
        seq: u64::from_le_bytes(header),
        pcm,
    })
}

/// Session limits, announced in `opened` so clients can size their frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest text or binary frame accepted, in bytes (header included).
    pub max_frame_bytes: usize,
    /// Most audio one session may carry, in seconds of audio.
    pub max_session_secs: u64,
    /// The server pings this often; the client's WebSocket library answers.
    pub ping_interval_secs: u64,
    /// A connection from which nothing (not even a pong) arrives for this long is closed.
    pub idle_timeout_secs: u64,
}

/// Everything the server sends, as a text frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Opened {
        session_id: SessionId,
        model: String,
        sample_rate: u32,
        encoding: AudioEncoding,
        limits: Limits,
        /// Presented with the session id in `resume` to continue after a drop.
        resume_token: Secret,
    },
    /// The answer to `resume`: results after `last_result` follow, and the client sends
    /// audio from `next_seq` on (or nothing, when `ended`).
    Resumed {
        session_id: SessionId,
        /// Every frame below it is stored; frames below it sent again are acknowledged
        /// again and not stored twice.
        next_seq: u64,
        /// The end of stream is stored: the session only finishes.
        ended: bool,
        limits: Limits,
    },
    Queued {
        position: u32,
    },
    Started {
        result: u64,
    },
    Ack {
        seq: u64,
    },
    Partial(Segment),
    Final(Segment),
    Completed {
        result: u64,
        segments: u32,
        transcript: String,
        /// Segment indices below `segments` that never got an accepted final: a gap
        /// reported, never papered over. Absent when there is none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        missing_segments: Vec<u32>,
    },
    Error {
        code: Cow<'static, str>,
        message: String,
        /// For refusals that pass with time (a node or tenant at its limit): seconds
        /// after which trying again is worth it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
    },
}

/// The body of `partial` and `final`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The result's index among the session's results (`started`, `partial`, `final`,
    /// `completed`): increasing, the same on every node, the client's place in `resume`.
    pub result: u64,
    pub segment: u32,
    pub text: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

impl ServerMessage {
    /// The text frame. Serialising these plain values into memory cannot fail.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages serialise")
    }

    /// Parses a server text frame (for clients).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Partials may be dropped for a slow reader (a later partial or the final
    /// supersedes them); nothing else may.
    pub fn is_droppable(&self) -> bool {
        matches!(self, ServerMessage::Partial(_))
    }
}

/// The retry hint of refusals at a limit: sessions last minutes, so seconds is the
/// scale on which a slot may free up (or another node be tried).
pub const RETRY_AFTER_SECS: u64 = 5;

/// Normal closure, after `completed`.
pub const CLOSE_NORMAL: u16 = 1000;

/// Why a session ends with an error. Each variant has a stable code string (sent in the
/// `error` message) and a close code (sent in the close frame that follows it).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("text frame is not a JSON object: {0}")]
    NotJson(String),
    #[error("unknown message type {0}")]
    UnknownMessageType(String),
    #[error("invalid {kind} message: {detail}")]
    InvalidMessage { kind: String, detail: String },
    #[error("the session is already open")]
    AlreadyOpen,
    #[error("missing or unknown API key")]
    Unauthorized,
    #[error("model {requested:?} is not served here (served: {served})")]
    UnknownModel { requested: String, served: String },
    #[error("sample rate {0} Hz is not supported (supported: 8000, 16000, 48000)")]
    UnsupportedSampleRate(u32),
    #[error("encoding {0:?} is not supported (supported: pcm_s16le, pcm_f32le)")]
    UnsupportedEncoding(String),
    #[error("{0} before open")]
    NotOpen(&'static str),
    #[error("{0} after end")]
    AlreadyEnded(&'static str),
    #[error("expected audio frame seq {expected}, got {got}")]
    BadSequence { expected: u64, got: u64 },
    #[error("bad audio frame: {0}")]
    BadAudioFrame(String),
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { size: usize, max: usize },
    #[error("the session exceeded its limit of {0} seconds of audio")]
    SessionTooLong(u64),
    #[error("nothing received for {0} seconds")]
    IdleTimeout(u64),
    #[error("the client does not read its messages fast enough")]
    ClientTooSlow,
    #[error("this node serves at most {0} connections; retry later or on another node")]
    TooManyConnections(usize),
    #[error(
        "tenant {tenant:?} already has {limit} sessions open on this node; retry later or on another node"
    )]
    TenantSessionLimit { tenant: String, limit: usize },
    #[error(
        "{limit} sessions of this node are already waiting for a worker; retry later or on another node"
    )]
    TooManyWaiting { limit: usize },
    #[error("the event log is unavailable: {0}")]
    BrokerUnavailable(String),
    #[error("the orchestrator is unavailable: {0}")]
    OrchestratorUnavailable(String),
    #[error("unknown session or invalid resume token")]
    InvalidResume,
    #[error("the session was resumed on another connection")]
    Superseded,
    #[error("the server is shutting down; reconnect to another node")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl SessionError {
    /// The stable, snake_case code of the `error` message.
    pub fn code(&self) -> &'static str {
        self.codes().0
    }

    /// The WebSocket close code sent after the `error` message.
    pub fn close_code(&self) -> u16 {
        self.codes().1
    }

    /// One table, so a code string and its close code cannot drift apart.
    fn codes(&self) -> (&'static str, u16) {
        use SessionError::*;
        match self {
            NotJson(_) => ("invalid_json", 4000),
            UnknownMessageType(_) => ("unknown_message_type", 4001),
            InvalidMessage { .. } => ("invalid_message", 4002),
            AlreadyOpen => ("already_open", 4003),
            UnknownModel { .. } => ("unknown_model", 4004),
            UnsupportedSampleRate(_) => ("unsupported_sample_rate", 4005),
            UnsupportedEncoding(_) => ("unsupported_encoding", 4006),
            NotOpen(_) => ("not_open", 4007),
            AlreadyEnded(_) => ("already_ended", 4008),
            BadSequence { .. } => ("bad_sequence", 4009),
            BadAudioFrame(_) => ("bad_audio_frame", 4010),
            SessionTooLong(_) => ("session_too_long", 4011),
            IdleTimeout(_) => ("idle_timeout", 4012),
            ClientTooSlow => ("client_too_slow", 4013),
            TooManyConnections(_) => ("too_many_connections", 4014),
            BrokerUnavailable(_) => ("broker_unavailable", 4015),
            OrchestratorUnavailable(_) => ("orchestrator_unavailable", 4016),
            Unauthorized => ("unauthorized", 4017),
            TenantSessionLimit { .. } => ("tenant_session_limit", 4018),
            TooManyWaiting { .. } => ("too_many_waiting", 4019),
            InvalidResume => ("invalid_resume", 4020),
            Superseded => ("superseded", 4021),
            FrameTooLarge { .. } => ("frame_too_large", 1009),
            ShuttingDown => ("shutting_down", 1001),
            Internal(_) => ("internal_error", 1011),
        }
    }

    /// Seconds after which the same request may succeed, for refusals that pass.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            SessionError::TooManyConnections(_)
            | SessionError::TenantSessionLimit { .. }
            | SessionError::TooManyWaiting { .. } => Some(RETRY_AFTER_SECS),
            _ => None,
        }
    }

    /// Whether the session outlives this error: the client may `resume` it. The
    /// connection, not the session, failed (it went quiet, read too slowly, or the
    /// node or a service it needs is going away); anything the client got wrong
    /// ends the session.
    pub fn is_resumable(&self) -> bool {
        use SessionError::*;
        matches!(
            self,
            IdleTimeout(_)
                | ClientTooSlow
                | Superseded
                | ShuttingDown
                | BrokerUnavailable(_)
                | OrchestratorUnavailable(_)
                | Internal(_)
        )
    }

    /// The `error` message announcing this error.
    pub fn to_message(&self) -> ServerMessage {
        ServerMessage::Error {
            code: Cow::Borrowed(self.code()),
            message: self.to_string(),
            retry_after_secs: self.retry_after_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn open(model: &str, rate: u32, encoding: &str) -> OpenRequest {
        OpenRequest {
            model: model.into(),
            sample_rate: rate,
            encoding: encoding.into(),
            api_key: None,
        }
    }

    #[test]
    fn parses_open_and_end() {
        let m = parse_text(
            r#"{"type":"open","model":"whisper-tiny.en","sample_rate":16000,"encoding":"pcm_s16le"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::Open(open("whisper-tiny.en", 16000, "pcm_s16le"))
        );
        assert_eq!(parse_text(r#"{"type":"end"}"#).unwrap(), ClientMessage::End);
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let m = parse_text(
            r#"{"type":"open","model":"m","sample_rate":16000,"encoding":"pcm_s16le","resume_token":"r"}"#,
        )
        .unwrap();
        assert_eq!(m, ClientMessage::Open(open("m", 16000, "pcm_s16le")));
    }

    #[test]
    fn the_api_key_is_read_and_never_shown() {
        let m = parse_text(
            r#"{"type":"open","model":"m","sample_rate":16000,"encoding":"pcm_s16le","api_key":"k-123"}"#,
        )
        .unwrap();
        let ClientMessage::Open(open) = m else {
            panic!("an open message")
        };
        assert_eq!(open.api_key, Some(Secret("k-123".into())));
        assert!(!format!("{open:?}").contains("k-123"));
    }

    #[test]
    fn parses_resume_and_hides_its_token() {
        let id = uuid::Uuid::new_v4();
        let m = parse_text(&format!(
            r#"{{"type":"resume","session_id":"{id}","resume_token":"t.x","last_result":7}}"#
        ))
        .unwrap();
        let ClientMessage::Resume(resume) = m else {
            panic!("a resume message")
        };
        assert_eq!(resume.session_id, id);
        assert_eq!(resume.last_result, Some(7));
        assert_eq!(resume.resume_token, Secret("t.x".into()));
        assert!(!format!("{resume:?}").contains("t.x"));
        let bad = parse_text(r#"{"type":"resume","session_id":"not-a-uuid","resume_token":"t"}"#);
        assert_eq!(bad.unwrap_err().code(), "invalid_message");
    }

    #[test]
    fn tells_bad_json_unknown_types_and_bad_fields_apart() {
        assert_eq!(parse_text("hello").unwrap_err().code(), "invalid_json");
        assert_eq!(parse_text("[1,2]").unwrap_err().code(), "invalid_json");
        assert_eq!(
            parse_text(r#"{"type":"resume"}"#).unwrap_err().code(),
            "invalid_message"
        );
        assert_eq!(
            parse_text(r#"{"type":"pause"}"#).unwrap_err().code(),
            "unknown_message_type"
        );
        assert_eq!(
            parse_text(r#"{"model":"m"}"#).unwrap_err().code(),
            "unknown_message_type"
        );
        assert_eq!(
            parse_text(r#"{"type":7}"#).unwrap_err().code(),
            "unknown_message_type"
        );
        let e = parse_text(r#"{"type":"open","model":"m","sample_rate":"fast"}"#).unwrap_err();
        assert_eq!(e.code(), "invalid_message");
        assert_eq!(e.close_code(), 4002);
    }

    #[test]
    fn both_encodings_at_8_16_and_48_khz_are_served() {
        for rate in [8000, 16000, 48000] {
            for (name, encoding) in [
                ("pcm_s16le", AudioEncoding::PcmS16le),
                ("pcm_f32le", AudioEncoding::PcmF32le),
            ] {
                assert_eq!(
                    open("m", rate, name).format(),
                    Ok(AudioFormat {
                        sample_rate: rate,
                        encoding
                    })
                );
            }
        }
        for rate in [0, 11025, 22050, 44100, 96000] {
            assert_eq!(
                open("m", rate, "pcm_s16le").format(),
                Err(SessionError::UnsupportedSampleRate(rate))
            );
        }
        assert_eq!(
            open("m", 16000, "mulaw").format().unwrap_err().close_code(),
            4006
        );
        assert_eq!(
            open("m", 16000, "opus").format().unwrap_err().code(),
            "unsupported_encoding"
        );
    }

    #[test]
    fn parses_audio_frames() {
        let mut raw = 5u64.to_le_bytes().to_vec();
        raw.extend_from_slice(&[1, 0, 2, 0]);
        let f = parse_audio(Bytes::from(raw), AudioEncoding::PcmS16le).unwrap();
        assert_eq!(f.seq, 5);
        assert_eq!(&f.pcm[..], &[1, 0, 2, 0]);
        assert_eq!(f.samples(AudioEncoding::PcmS16le), 2);

        let short = parse_audio(Bytes::from_static(&[0; 7]), AudioEncoding::PcmS16le);
        assert_eq!(short.unwrap_err().code(), "bad_audio_frame");
        let odd = parse_audio(Bytes::from_static(&[0; 9]), AudioEncoding::PcmS16le);
        assert_eq!(odd.unwrap_err().close_code(), 4010);
        let empty = parse_audio(Bytes::from_static(&[0; 8]), AudioEncoding::PcmS16le);
        assert_eq!(empty.unwrap().pcm.len(), 0);
    }

    #[test]
    fn server_messages_have_the_documented_shape() {
        let ack = ServerMessage::Ack { seq: 3 }.to_json();
        assert_eq!(ack, r#"{"type":"ack","seq":3}"#);
        let fin = ServerMessage::Final(Segment {
            result: 4,
            segment: 1,
            text: "hi".into(),
            start_ms: 10,
            end_ms: 20,
        });
        assert_eq!(
            fin.to_json(),
            r#"{"type":"final","result":4,"segment":1,"text":"hi","start_ms":10,"end_ms":20}"#
        );
        let done = ServerMessage::Completed {
            result: 5,
            segments: 2,
            transcript: "a b".into(),
            missing_segments: vec![],
        };
        assert_eq!(
            done.to_json(),
            r#"{"type":"completed","result":5,"segments":2,"transcript":"a b"}"#
        );
        assert_eq!(
            ServerMessage::Started { result: 0 }.to_json(),
            r#"{"type":"started","result":0}"#
        );
        let err = SessionError::FrameTooLarge { size: 9, max: 8 };
        assert_eq!(err.close_code(), 1009);
        let json: serde_json::Value = serde_json::from_str(&err.to_message().to_json()).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["code"], "frame_too_large");
    }

    #[test]
    fn codes_are_unique_snake_case_and_close_codes_valid() {
        let all = [
            SessionError::NotJson(String::new()),
            SessionError::UnknownMessageType(String::new()),
            SessionError::InvalidMessage {
                kind: String::new(),
                detail: String::new(),
            },
            SessionError::AlreadyOpen,
            SessionError::Unauthorized,
            SessionError::TenantSessionLimit {
                tenant: String::new(),
                limit: 0,
            },
            SessionError::TooManyWaiting { limit: 0 },
            SessionError::UnknownModel {
                requested: String::new(),
                served: String::new(),
            },
            SessionError::UnsupportedSampleRate(0),
            SessionError::UnsupportedEncoding(String::new()),
            SessionError::NotOpen("audio"),
            SessionError::AlreadyEnded("audio"),
            SessionError::BadSequence {
                expected: 0,
                got: 1,
            },
            SessionError::BadAudioFrame(String::new()),
            SessionError::FrameTooLarge { size: 0, max: 0 },
            SessionError::SessionTooLong(0),
            SessionError::IdleTimeout(0),
            SessionError::ClientTooSlow,
            SessionError::TooManyConnections(0),
            SessionError::BrokerUnavailable(String::new()),
            SessionError::OrchestratorUnavailable(String::new()),
            SessionError::ShuttingDown,
            SessionError::Internal(String::new()),
            SessionError::InvalidResume,
            SessionError::Superseded,
        ];
        let mut codes: Vec<_> = all.iter().map(SessionError::code).collect();
        let mut close: Vec<_> = all.iter().map(SessionError::close_code).collect();
        assert!(
            codes
                .iter()
                .all(|c| c.chars().all(|c| c == '_' || c.is_ascii_lowercase()))
        );
        // 1000 is normal closure and 1005/1006 cannot be sent; application codes are 4xxx.
        assert!(
            close
                .iter()
                .all(|c| [1001, 1009, 1011].contains(c) || (4000..5000).contains(c))
        );
        codes.sort();
        codes.dedup();
        close.sort();
        close.dedup();
        assert_eq!(codes.len(), all.len());
        assert_eq!(close.len(), all.len());
    }

    proptest! {
        #[test]
        fn text_parser_never_panics(text in any::<String>()) {
            let _ = parse_text(&text);
        }

        #[test]
        fn json_like_text_never_panics(
            kind in prop::sample::select(vec!["open", "resume", "end", "x", ""]),
            model in ".*",
            rate in any::<i64>(),
            encoding in ".*",
        ) {
            let text = serde_json::json!({
                "type": kind, "model": model, "sample_rate": rate, "encoding": encoding,
                "session_id": model, "resume_token": encoding, "last_result": rate,
            }).to_string();
            if let Ok(ClientMessage::Open(open)) = parse_text(&text) {
                let _ = open.format();
            }
        }

        #[test]
        fn audio_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            for encoding in [AudioEncoding::PcmS16le, AudioEncoding::PcmF32le] {
                if let Ok(frame) = parse_audio(Bytes::from(bytes.clone()), encoding) {
                    prop_assert_eq!(frame.pcm.len() + SEQ_HEADER_BYTES, bytes.len());
                    prop_assert_eq!(frame.pcm.len() % encoding.bytes_per_sample(), 0);
                }
            }
        }
    }
}
