//! One connection's session as a state machine, apart from the socket.
//!
//! ```text
//! AwaitingOpen --open--> Opening --SessionOpened confirmed--> Open --end--> Ending --> Completed
//!      |                                                        ^              ^
//!      +--resume--> Resuming --input scanned--------------------+--(ended)-----+
//!        \________________________ any error ________________________________/ --> Failed
//! ```
//!
//! [`Session`] takes what happened (a client frame, a confirmation from the broker, a
//! result event from the log, an error on the server's side) and answers with
//! [`Action`]s for the server to carry out: append to the log, send to the client,
//! close. It never waits on anything, so unit tests drive it with plain values.
//!
//! It holds the two rules that keep acknowledgements honest: an `ack` is produced only
//! from a broker confirmation, in sequence order; and `completed` is held back until
//! every appended chunk has been acknowledged and the end of stream confirmed, so a
//! client never sees its session complete with a chunk it could think was lost.
//!
//! Every accepted result gets the next `result` index, counted from the session's
//! first result in log order; a resumed session counts the same way from the start and
//! sends only what comes after the client's `last_result`.

use std::sync::Arc;

use bytes::Bytes;
use eventlog::events::AudioChunk;
use eventlog::results::{ResultFilter, Verdict};
use eventlog::{AudioFormat, Event, SessionId};

use crate::protocol::{
    self, ClientMessage, Limits, OpenRequest, ResumeRequest, Secret, Segment, ServerMessage,
    SessionError,
};
use crate::resume::{ResumeClaims, ResumeTokens, StoredInput};
use crate::tenants::ApiKeys;

/// What a node serves, the same for all its sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Model names this node accepts in `open`.
    pub models: Vec<String>,
    pub limits: Limits,
    /// Who may open sessions, and as which tenant.
    pub keys: ApiKeys,
    /// Issues and checks the tokens that resume sessions.
    pub tokens: ResumeTokens,
}

/// What the server must do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Append `SessionOpened`, wait for its confirmation, then call
    /// [`Session::on_opened`] (or [`Session::fail`]).
    Open {
        session: SessionId,
        tenant: String,
        model: String,
        format: AudioFormat,
    },
    /// Take the session's input over from any earlier connection, find where its
    /// stored input ends and follow its results from the start; then call
    /// [`Session::on_resumed`] (or [`Session::fail`]).
    Resume {
        session: SessionId,
        tenant: String,
        claims: ResumeClaims,
    },
    /// Append the chunk; report its confirmation with [`Appended::Chunk`].
    AppendChunk(AudioChunk),
    /// Append `EndOfStream`; report its confirmation with [`Appended::End`].
    AppendEnd {
        last_seq: Option<u64>,
    },
    Send(ServerMessage),
    /// Close the connection: normally (1000) with `None`, otherwise send the error's
    /// `error` message and close with its code. Nothing follows a close.
    Close(Option<SessionError>),
}

/// A broker confirmation of something the session appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    Chunk(u64),
    End,
}

/// What the orchestrator answered to AllocateWorker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    Allocated,
    Queued { position: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    AwaitingOpen,
    Opening,
    Resuming,
    Open,
    Ending,
    Completed,
    Failed,
}

/// An audio frame that passed the checks.
enum Received {
    /// The next in sequence: to be appended.
    New(AudioChunk),
    /// A frame below the next sequence number, sent again because its ack was lost
    /// (on a dropped connection): it is in the log already and is never appended twice.
    Again(u64),
}

/// The session of one connection.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    id: SessionId,
    /// The key the connection's upgrade request carried (`Authorization: Bearer`).
    bearer: Option<Secret>,
    phase: Phase,
    tenant: String,
    model: String,
    format: Option<AudioFormat>,
    resume_token: Option<Secret>,
    /// The sequence number the next audio frame must carry.
    next_seq: u64,
    /// Audio received so far, in samples.
    samples: u64,
    /// The sequence number the next ack will carry.
    next_ack: u64,
    end_confirmed: bool,
    filter: ResultFilter,
    started_sent: bool,
    /// The index the next accepted result gets.
    next_result: u64,
    /// Results up to this index reached the client on an earlier connection.
    delivered_before: Option<u64>,
    /// An accepted completion waiting for outstanding acks, and whether the client
    /// still needs it (it may have had it before a resume).
    completion: Option<(ServerMessage, bool)>,
}

impl Session {
    /// A session that will be called `id` once it opens; `bearer` is the API key of
    /// the connection's upgrade request, if it had one (`open` may carry it instead).
    pub fn new(config: Arc<SessionConfig>, id: SessionId, bearer: Option<Secret>) -> Self {
        Self {
            config,
            id,
            bearer,
            phase: Phase::AwaitingOpen,
            tenant: String::new(),
            model: String::new(),
            format: None,
            resume_token: None,
            next_seq: 0,
            samples: 0,
            next_ack: 0,
            end_confirmed: false,
            filter: ResultFilter::new(),
            started_sent: false,
            next_result: 0,
            delivered_before: None,
            completion: None,
        }
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Opened, and no worker has announced itself yet (queued, or just allocated).
    pub fn awaiting_worker(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Ending) && !self.started_sent
    }

    /// The latest assignment epoch the session's results announced (0 before any).
    pub fn latest_epoch(&self) -> u64 {
        self.filter.epoch().unwrap_or(0)
    }

    /// True once a close was produced; the server stops feeding the session.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Completed | Phase::Failed)
    }

    /// A text frame from the client.
    pub fn on_text(&mut self, text: &str) -> Vec<Action> {
        if self.is_closed() {
            return Vec::new();
        }
        if let Err(e) = self.check_size(text.len()) {
            return self.fail(e);
        }
        match protocol::parse_text(text) {
            Ok(ClientMessage::Open(open)) => self.open(open),
            Ok(ClientMessage::Resume(resume)) => self.resume(resume),
            Ok(ClientMessage::End) => self.end(),
            Err(e) => self.fail(e),
        }
    }

    /// A binary (audio) frame from the client.
    pub fn on_binary(&mut self, frame: Bytes) -> Vec<Action> {
        if self.is_closed() {
            return Vec::new();
        }
        if let Err(e) = self.check_size(frame.len()) {
            return self.fail(e);
        }
        match self.phase {
            Phase::AwaitingOpen | Phase::Opening | Phase::Resuming => {
                self.fail(SessionError::NotOpen("audio"))
            }
            Phase::Ending => self.fail(SessionError::AlreadyEnded("audio")),
            Phase::Open => match self.audio(frame) {
                Ok(Received::New(chunk)) => vec![Action::AppendChunk(chunk)],
                // Stored and confirmed: acknowledged again. Still unconfirmed: its ack
                // follows its confirmation, as for the first copy.
                Ok(Received::Again(seq)) if seq < self.next_ack => {
                    vec![Action::Send(ServerMessage::Ack { seq })]
                }
                Ok(Received::Again(_)) => Vec::new(),
                Err(e) => self.fail(e),
            },
            Phase::Completed | Phase::Failed => Vec::new(),
        }
    }

    /// `SessionOpened`, stamped `opened_at_ms`, is confirmed by the broker: the session
    /// exists.
    pub fn on_opened(&mut self, opened_at_ms: u64) -> Vec<Action> {
        let Some(format) = self.format.filter(|_| self.phase == Phase::Opening) else {
            return Vec::new();
        };
        self.phase = Phase::Open;
        let claims = ResumeClaims {
            opened_at_ms,
            model: self.model.clone(),
            format,
        };
        let token = Secret(self.config.tokens.issue(self.id, &self.tenant, &claims));
        vec![Action::Send(ServerMessage::Opened {
            session_id: self.id,
            model: self.model.clone(),
            sample_rate: format.sample_rate,
            encoding: format.encoding,
            limits: self.config.limits,
            resume_token: token,
        })]
    }

    /// The session's input is taken over and scanned: every frame below
    /// `stored.next_seq` is in the log.
    pub fn on_resumed(&mut self, stored: StoredInput) -> Vec<Action> {
        if self.phase != Phase::Resuming {
            return Vec::new();
        }
        self.next_seq = stored.next_seq;
        self.next_ack = stored.next_seq;
        self.samples = stored.samples;
        self.end_confirmed = stored.ended;
        self.phase = if stored.ended {
            Phase::Ending
        } else {
            Phase::Open
        };
        let mut actions = vec![Action::Send(ServerMessage::Resumed {
            session_id: self.id,
            next_seq: stored.next_seq,
            ended: stored.ended,
            limits: self.config.limits,
        })];
        actions.extend(self.flush_completion());
        actions
    }

    /// The orchestrator's answer. An allocated worker announces itself with
    /// EpochStarted on the results, which is what produces `started`.
    pub fn on_allocation(&mut self, allocation: Allocation) -> Vec<Action> {
        match allocation {
            // A worker that was quicker than this answer already said `started`.
            Allocation::Queued { position } if !self.started_sent && !self.is_closed() => {
                vec![Action::Send(ServerMessage::Queued { position })]
            }
            _ => Vec::new(),
        }
    }

    /// The broker confirmed an append: acknowledge it to the client.
    pub fn on_confirmed(&mut self, appended: Appended) -> Vec<Action> {
        if self.is_closed() {
            return Vec::new();
        }
        let mut actions = Vec::new();
        match appended {
            Appended::Chunk(seq) => {
                // The server reports confirmations in append order; anything else would
                // be a bug there, and acks must stay in order.
                debug_assert_eq!(seq, self.next_ack, "confirmations out of order");
                self.next_ack = seq + 1;
                actions.push(Action::Send(ServerMessage::Ack { seq }));
            }
            Appended::End => self.end_confirmed = true,
        }
        actions.extend(self.flush_completion());
        actions
    }

    /// The next event of the session's results, in log order. Only what the shared
    /// acceptance rule accepts reaches the client, and only once: results a resumed
    /// client already had are counted, not sent.
    pub fn on_result(&mut self, event: &Event) -> Vec<Action> {
        if self.is_closed() || self.filter.accept(event) != Verdict::Accepted {
            return Vec::new();
        }
        let result = self.next_result;
        self.next_result += 1;
        let deliver = self.delivered_before.is_none_or(|last| result > last);
        let message = match event {
            Event::EpochStarted { .. } if !self.started_sent => {
                // A failover starts a new epoch; the client sees one `started` only.
                self.started_sent = true;
                ServerMessage::Started { result }
            }
            Event::Partial {
                segment,
                text,
                start_ms,
                end_ms,
                ..
            } => ServerMessage::Partial(Segment {
                result,
                segment: *segment,
                text: text.clone(),
                start_ms: *start_ms,
                end_ms: *end_ms,
            }),
            Event::Final {
                segment,
                text,
                start_ms,
                end_ms,
                ..
            } => ServerMessage::Final(Segment {
                result,
                segment: *segment,
                text: text.clone(),
                start_ms: *start_ms,
                end_ms: *end_ms,
            }),
            Event::TranscriptCompleted { segments, .. } => {
                let done = ServerMessage::Completed {
                    result,
                    segments: *segments,
                    transcript: self.filter.transcript(),
                    missing_segments: self.filter.missing_segments(),
                };
                self.completion = Some((done, deliver));
                return self.flush_completion();
            }
            _ => return Vec::new(),
        };
        if deliver {
            vec![Action::Send(message)]
        } else {
            Vec::new()
        }
    }

    /// Ends the session with an error (the client's or the server's).
    pub fn fail(&mut self, error: SessionError) -> Vec<Action> {
        if self.is_closed() {
            return Vec::new();
        }
        self.phase = Phase::Failed;
        vec![Action::Close(Some(error))]
    }

    fn check_size(&self, size: usize) -> Result<(), SessionError> {
        let max = self.config.limits.max_frame_bytes;
        if size > max {
            return Err(SessionError::FrameTooLarge { size, max });
        }
        Ok(())
    }

    /// The tenant of the key the client presented (in the message or the upgrade
    /// request).
    fn authenticate(&self, in_message: Option<&Secret>) -> Result<String, SessionError> {
        let presented = in_message.or(self.bearer.as_ref());
        self.config
            .keys
            .authenticate(presented.map(|k| k.0.as_str()))
            .map_err(|_| SessionError::Unauthorized)
    }

    fn open(&mut self, open: OpenRequest) -> Vec<Action> {
        if self.phase != Phase::AwaitingOpen {
            return self.fail(SessionError::AlreadyOpen);
        }
        // First: nothing about the node (its models, its formats) is told to a client
        // that has not shown a key.
        let tenant = match self.authenticate(open.api_key.as_ref()) {
            Ok(tenant) => tenant,
            Err(e) => return self.fail(e),
        };
        if !self.config.models.contains(&open.model) {
            let served = self.config.models.join(", ");
            return self.fail(SessionError::UnknownModel {
                requested: open.model,
                served,
            });
        }
        let format = match open.format() {
            Ok(format) => format,
            Err(e) => return self.fail(e),
        };
        self.phase = Phase::Opening;
        self.tenant = tenant.clone();
        self.model = open.model.clone();
        self.format = Some(format);
        vec![Action::Open {
            session: self.id,
            tenant,
            model: open.model,
            format,
        }]
    }

    fn resume(&mut self, resume: ResumeRequest) -> Vec<Action> {
        if self.phase != Phase::AwaitingOpen {
            return self.fail(SessionError::AlreadyOpen);
        }
        let tenant = match self.authenticate(resume.api_key.as_ref()) {
            Ok(tenant) => tenant,
            Err(e) => return self.fail(e),
        };
        let tokens = &self.config.tokens;
        let Ok(claims) = tokens.verify(&resume.resume_token.0, resume.session_id, &tenant) else {
            return self.fail(SessionError::InvalidResume);
        };
        if !self.config.models.contains(&claims.model) {
            let served = self.config.models.join(", ");
            return self.fail(SessionError::UnknownModel {
                requested: claims.model,
                served,
            });
        }
        self.id = resume.session_id;
        self.phase = Phase::Resuming;
        self.tenant = tenant.clone();
        self.model = claims.model.clone();
        self.format = Some(claims.format);
        self.resume_token = Some(resume.resume_token);
        self.delivered_before = resume.last_result;
        vec![Action::Resume {
            session: self.id,
            tenant,
            claims,
        }]
    }

    fn end(&mut self) -> Vec<Action> {
        match self.phase {
            Phase::AwaitingOpen | Phase::Opening | Phase::Resuming => {
                self.fail(SessionError::NotOpen("end"))
            }
            Phase::Ending => self.fail(SessionError::AlreadyEnded("end")),
            Phase::Open => {
                self.phase = Phase::Ending;
                vec![Action::AppendEnd {
                    last_seq: self.next_seq.checked_sub(1),
                }]
            }
            Phase::Completed | Phase::Failed => Vec::new(),
        }
    }

    /// Checks an audio frame against the sequence and the session's length.
    fn audio(&mut self, frame: Bytes) -> Result<Received, SessionError> {
        let format = self.format.expect("an open session has a format");
        let frame = protocol::parse_audio(frame, format.encoding)?;
        if frame.seq < self.next_seq {
            return Ok(Received::Again(frame.seq));
        }
        if frame.seq != self.next_seq {
            return Err(SessionError::BadSequence {
                expected: self.next_seq,
                got: frame.seq,
            });
        }
        let max_secs = self.config.limits.max_session_secs;
        let samples = self.samples + frame.samples(format.encoding);
        if samples > max_secs * u64::from(format.sample_rate) {
            return Err(SessionError::SessionTooLong(max_secs));
        }
        self.samples = samples;
        self.next_seq += 1;
        Ok(Received::New(AudioChunk {
            seq: frame.seq,
            bytes: frame.pcm,
        }))
    }

    /// Sends the completion once nothing appended is left unacknowledged.
    fn flush_completion(&mut self) -> Vec<Action> {
        let settled = match self.phase {
            Phase::Open => self.next_ack == self.next_seq,
            Phase::Ending => self.next_ack == self.next_seq && self.end_confirmed,
            _ => false,
        };
        match self.completion.take() {
            Some((done, deliver)) if settled => {
                self.phase = Phase::Completed;
                let mut actions = Vec::new();
                if deliver {
                    actions.push(Action::Send(done));
                }
                actions.push(Action::Close(None));
                actions
            }
            pending => {
                self.completion = pending;
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventlog::AudioEncoding;
    use uuid::Uuid;

    const OPEN: &str = r#"{"type":"open","model":"whisper-tiny.en","sample_rate":16000,"encoding":"pcm_s16le","api_key":"north-key-0123456789"}"#;
    const KEY: &str = "north-key-0123456789";
    const OPENED_AT_MS: u64 = 1_700_000_000_000;

    fn config() -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            models: vec!["whisper-tiny.en".into()],
            limits: Limits {
                max_frame_bytes: 1024,
                max_session_secs: 1,
                ping_interval_secs: 20,
                idle_timeout_secs: 60,
            },
            keys: ApiKeys::new(
                vec![
                    crate::tenants::ApiKey::new("north", KEY).unwrap(),
                    crate::tenants::ApiKey::new("south", "south-key-0123456789").unwrap(),
                ],
                false,
            )
            .unwrap(),
            tokens: ResumeTokens::new(b"test secret".to_vec()),
        })
    }

    fn frame(seq: u64, samples: usize) -> Bytes {
        let mut raw = seq.to_le_bytes().to_vec();
        raw.resize(8 + samples * 2, 0);
        Bytes::from(raw)
    }

    fn error_code(actions: &[Action]) -> Option<&'static str> {
        match actions {
            [Action::Close(Some(e))] => Some(e.code()),
            _ => None,
        }
    }

    fn open_session() -> Session {
        let mut s = Session::new(config(), Uuid::new_v4(), None);
        let actions = s.on_text(OPEN);
        assert!(matches!(
            &actions[..],
            [Action::Open { tenant, format, .. }]
                if tenant == "north" && format.encoding == AudioEncoding::PcmS16le
        ));
        let opened = s.on_opened(OPENED_AT_MS);
        assert!(matches!(
            &opened[..],
            [Action::Send(ServerMessage::Opened { session_id, .. })] if *session_id == s.id()
        ));
        assert_eq!(s.phase(), Phase::Open);
        s
    }

    fn fin(epoch: u64, segment: u32, text: &str) -> Event {
        Event::Final {
            epoch,
            segment,
            text: text.into(),
            start_ms: 0,
            end_ms: 100,
        }
    }

    fn started(epoch: u64) -> Event {
        Event::EpochStarted {
            epoch,
            worker: "w".into(),
        }
    }

    #[test]
    fn audio_is_appended_in_order_and_acked_only_on_confirmation() {
        let mut s = open_session();
        let a = s.on_binary(frame(0, 4));
        assert!(matches!(&a[..], [Action::AppendChunk(c)] if c.seq == 0 && c.bytes.len() == 8));
        assert!(matches!(
            &s.on_binary(frame(1, 4))[..],
            [Action::AppendChunk(_)]
        ));
        assert_eq!(
            s.on_confirmed(Appended::Chunk(0)),
            vec![Action::Send(ServerMessage::Ack { seq: 0 })]
        );
        assert_eq!(
            s.on_confirmed(Appended::Chunk(1)),
            vec![Action::Send(ServerMessage::Ack { seq: 1 })]
        );
    }

    #[test]
    fn sequence_gaps_are_refused_and_repeats_never_appended_twice() {
        let mut s = open_session();
        s.on_binary(frame(0, 1));
        assert_eq!(error_code(&s.on_binary(frame(2, 1))), Some("bad_sequence"));
        assert!(s.is_closed());
        assert!(s.on_binary(frame(1, 1)).is_empty(), "nothing after a close");

        let mut s = open_session();
        s.on_binary(frame(0, 1));
        s.on_binary(frame(1, 1));
        assert!(
            s.on_binary(frame(0, 1)).is_empty(),
            "unconfirmed: no ack yet"
        );
        s.on_confirmed(Appended::Chunk(0));
        assert_eq!(
            s.on_binary(frame(0, 1)),
            vec![Action::Send(ServerMessage::Ack { seq: 0 })],
            "confirmed: acknowledged again, not appended"
        );
        assert!(matches!(&s.on_binary(frame(2, 1))[..], [Action::AppendChunk(c)] if c.seq == 2));
    }

    fn token_of(opened: &[Action]) -> Secret {
        match opened {
            [Action::Send(ServerMessage::Opened { resume_token, .. })] => resume_token.clone(),
            other => panic!("expected opened, got {other:?}"),
        }
    }

    fn resume_text(session: SessionId, token: &Secret, last: Option<u64>, key: &str) -> String {
        let mut resume = serde_json::json!({
            "type": "resume", "session_id": session, "resume_token": token.0, "api_key": key
        });
        if let Some(last) = last {
            resume["last_result"] = last.into();
        }
        resume.to_string()
    }

    /// A session opened on one connection, and a second connection resuming it.
    fn opened_and_resumed(last: Option<u64>, stored: StoredInput) -> (SessionId, Session) {
        let id = Uuid::new_v4();
        let mut first = Session::new(config(), id, None);
        first.on_text(OPEN);
        let token = token_of(&first.on_opened(OPENED_AT_MS));
        let mut second = Session::new(config(), Uuid::new_v4(), None);
        let actions = second.on_text(&resume_text(id, &token, last, KEY));
        assert_eq!(
            actions,
            vec![Action::Resume {
                session: id,
                tenant: "north".into(),
                claims: ResumeClaims {
                    opened_at_ms: OPENED_AT_MS,
                    model: "whisper-tiny.en".into(),
                    format: AudioFormat {
                        sample_rate: 16_000,
                        encoding: AudioEncoding::PcmS16le
                    },
                },
            }]
        );
        assert_eq!(second.phase(), Phase::Resuming);
        assert_eq!(second.id(), id);
        assert!(matches!(
            &second.on_resumed(stored)[..],
            [Action::Send(ServerMessage::Resumed { session_id, next_seq, ended, .. })]
                if *session_id == id && *next_seq == stored.next_seq && *ended == stored.ended
        ));
        (id, second)
    }

    #[test]
    fn a_resumed_session_continues_from_the_stored_input() {
        let stored = StoredInput {
            next_seq: 5,
            samples: 15_900,
            ended: false,
        };
        let (_, mut s) = opened_and_resumed(None, stored);
        assert_eq!(s.phase(), Phase::Open);
        assert_eq!(
            s.on_binary(frame(3, 1)),
            vec![Action::Send(ServerMessage::Ack { seq: 3 })],
            "stored before the drop: acknowledged again"
        );
        assert!(matches!(&s.on_binary(frame(5, 100))[..], [Action::AppendChunk(c)] if c.seq == 5));
        // The stored samples count towards the length limit (16,000 at most).
        assert_eq!(
            error_code(&s.on_binary(frame(6, 1))),
            Some("session_too_long")
        );
    }

    #[test]
    fn a_resumed_session_sends_only_the_results_after_the_last_received() {
        let (_, mut s) = opened_and_resumed(Some(1), StoredInput::default());
        assert!(s.on_result(&started(1)).is_empty(), "result 0 was received");
        assert!(
            s.on_result(&fin(1, 0, "a")).is_empty(),
            "result 1 was received"
        );
        assert!(s.on_result(&fin(1, 0, "again")).is_empty(), "not accepted");
        assert!(matches!(
            &s.on_result(&fin(1, 1, "b"))[..],
            [Action::Send(ServerMessage::Final(f))] if f.result == 2 && f.text == "b"
        ));
        assert!(
            !s.awaiting_worker(),
            "the worker announced itself before the drop"
        );
    }

    #[test]
    fn resuming_a_finished_session_sends_the_rest_and_closes() {
        let ended = StoredInput {
            next_seq: 0,
            samples: 0,
            ended: true,
        };
        let (_, mut s) = opened_and_resumed(Some(0), ended);
        assert_eq!(s.phase(), Phase::Ending);
        assert_eq!(error_code(&s.on_binary(frame(0, 1))), Some("already_ended"));

        let (_, mut s) = opened_and_resumed(Some(0), ended);
        s.on_result(&started(1));
        s.on_result(&fin(1, 0, "hi"));
        let actions = s.on_result(&Event::TranscriptCompleted {
            epoch: 1,
            segments: 1,
        });
        assert!(matches!(
            &actions[..],
            [Action::Send(ServerMessage::Completed { result: 2, transcript, .. }), Action::Close(None)]
                if transcript == "hi"
        ));

        // It had everything: the connection just closes.
        let (_, mut s) = opened_and_resumed(Some(2), ended);
        s.on_result(&started(1));
        s.on_result(&fin(1, 0, "hi"));
        let actions = s.on_result(&Event::TranscriptCompleted {
            epoch: 1,
            segments: 1,
        });
        assert_eq!(actions, vec![Action::Close(None)]);
    }

    #[test]
    fn resume_is_refused_to_other_tenants_guessed_sessions_and_altered_tokens() {
        let id = Uuid::new_v4();
        let mut first = Session::new(config(), id, None);
        first.on_text(OPEN);
        let token = token_of(&first.on_opened(OPENED_AT_MS));
        let refused = |text: String| {
            let mut s = Session::new(config(), Uuid::new_v4(), None);
            let actions = s.on_text(&text);
            let [Action::Close(Some(e))] = &actions[..] else {
                panic!("refused: {actions:?}")
            };
            (e.code(), e.to_string())
        };
        let invalid = (
            "invalid_resume",
            "unknown session or invalid resume token".to_string(),
        );
        assert_eq!(
            refused(resume_text(id, &token, None, "south-key-0123456789")),
            invalid
        );
        assert_eq!(
            refused(resume_text(Uuid::new_v4(), &token, None, KEY)),
            invalid
        );
        let altered = Secret(format!("{}A", token.0));
        assert_eq!(refused(resume_text(id, &altered, None, KEY)), invalid);
        assert_eq!(
            refused(resume_text(id, &token, None, "wrong-key-0123456789")).0,
            "unauthorized"
        );
        // Resuming on a connection that already has a session is refused too.
        let mut s = open_session();
        assert_eq!(
            error_code(&s.on_text(&resume_text(id, &token, None, KEY))),
            Some("already_open")
        );
    }

    #[test]
    fn a_key_opens_a_session_as_its_tenant_and_nothing_else_does() {
        let open = |key: Option<&str>| {
            let mut request = serde_json::json!({
                "type": "open", "model": "whisper-tiny.en",
                "sample_rate": 16000, "encoding": "pcm_s16le"
            });
            if let Some(key) = key {
                request["api_key"] = key.into();
            }
            request.to_string()
        };
        let tenant_of = |actions: &[Action]| match actions {
            [Action::Open { tenant, .. }] => Some(tenant.clone()),
            _ => None,
        };
        let mut s = Session::new(config(), Uuid::new_v4(), None);
        assert_eq!(
            tenant_of(&s.on_text(&open(Some("south-key-0123456789")))),
            Some("south".into())
        );
        // The upgrade request's bearer key serves when `open` has none.
        let mut s = Session::new(config(), Uuid::new_v4(), Some(Secret(KEY.into())));
        assert_eq!(tenant_of(&s.on_text(&open(None))), Some("north".into()));
        for (bearer, key) in [
            (None, None),
            (None, Some("north-key-01234567")),
            (Some("wrong-key-0123456789"), None),
            (None, Some("")),
        ] {
            let mut s = Session::new(config(), Uuid::new_v4(), bearer.map(|b| Secret(b.into())));
            let actions = s.on_text(&open(key));
            let [Action::Close(Some(e))] = &actions[..] else {
                panic!("refused: {actions:?}")
            };
            assert_eq!((e.code(), e.close_code()), ("unauthorized", 4017));
            assert_eq!(e.to_string(), "missing or unknown API key");
            assert_eq!(s.phase(), Phase::Failed);
        }
        // Refused before anything about the node is told: an unknown model with a
        // wrong key is `unauthorized`, not `unknown_model`.
        let mut s = Session::new(config(), Uuid::new_v4(), None);
        let wrong = r#"{"type":"open","model":"nope","sample_rate":1,"encoding":"x","api_key":"bad-key-0123456789"}"#;
        assert_eq!(error_code(&s.on_text(wrong)), Some("unauthorized"));
    }

    #[test]
    fn refusals_at_open() {
        let cases = [
            ("{", "invalid_json"),
            (r#"{"type":"hello"}"#, "unknown_message_type"),
            (
                r#"{"type":"open","model":"large","sample_rate":16000,"encoding":"pcm_s16le"}"#,
                "unknown_model",
            ),
            (
                r#"{"type":"open","model":"whisper-tiny.en","sample_rate":44100,"encoding":"pcm_s16le"}"#,
                "unsupported_sample_rate",
            ),
            (
                r#"{"type":"open","model":"whisper-tiny.en","sample_rate":16000,"encoding":"mulaw"}"#,
                "unsupported_encoding",
            ),
            (r#"{"type":"end"}"#, "not_open"),
        ];
        for (text, code) in cases {
            let mut s = Session::new(config(), Uuid::new_v4(), Some(Secret(KEY.into())));
            assert_eq!(error_code(&s.on_text(text)), Some(code), "{text}");
        }
        let mut s = Session::new(config(), Uuid::new_v4(), None);
        assert_eq!(error_code(&s.on_binary(frame(0, 1))), Some("not_open"));
    }

    #[test]
    fn open_twice_and_input_after_end() {
        let mut s = open_session();
        assert_eq!(error_code(&s.on_text(OPEN)), Some("already_open"));

        let mut s = open_session();
        assert_eq!(
            s.on_text(r#"{"type":"end"}"#),
            vec![Action::AppendEnd { last_seq: None }]
        );
        assert_eq!(error_code(&s.on_binary(frame(0, 1))), Some("already_ended"));

        let mut s = open_session();
        s.on_binary(frame(0, 1));
        assert_eq!(
            s.on_text(r#"{"type":"end"}"#),
            vec![Action::AppendEnd { last_seq: Some(0) }]
        );
        assert_eq!(
            error_code(&s.on_text(r#"{"type":"end"}"#)),
            Some("already_ended")
        );
    }

    #[test]
    fn frame_and_session_limits() {
        let mut s = open_session();
        assert_eq!(
            error_code(&s.on_binary(frame(0, 600))),
            Some("frame_too_large")
        );

        // 1 second at 16 kHz is 16000 samples; frames of 500 samples fit 32 times.
        let mut s = open_session();
        for seq in 0..32 {
            assert!(matches!(
                &s.on_binary(frame(seq, 500))[..],
                [Action::AppendChunk(_)]
            ));
        }
        assert_eq!(
            error_code(&s.on_binary(frame(32, 1))),
            Some("session_too_long")
        );

        let mut s = open_session();
        assert_eq!(
            error_code(&s.on_binary(frame(0, 3).slice(..13))),
            Some("bad_audio_frame")
        );
    }

    #[test]
    fn only_accepted_results_reach_the_client() {
        let mut s = open_session();
        assert_eq!(
            s.on_allocation(Allocation::Queued { position: 2 }),
            vec![Action::Send(ServerMessage::Queued { position: 2 })]
        );
        assert!(
            s.on_result(&fin(1, 0, "early")).is_empty(),
            "before any epoch"
        );
        assert_eq!(
            s.on_result(&started(1)),
            vec![Action::Send(ServerMessage::Started { result: 0 })]
        );
        assert!(
            matches!(&s.on_result(&fin(1, 0, "a"))[..], [Action::Send(ServerMessage::Final(f))] if f.text == "a")
        );
        assert!(s.on_result(&fin(1, 0, "a again")).is_empty(), "duplicate");
        assert!(
            s.on_result(&started(2)).is_empty(),
            "one started per session"
        );
        assert!(s.on_result(&fin(1, 1, "zombie")).is_empty(), "stale epoch");
        let partial = Event::Partial {
            epoch: 2,
            segment: 1,
            text: "b".into(),
            start_ms: 0,
            end_ms: 1,
        };
        assert!(matches!(
            &s.on_result(&partial)[..],
            [Action::Send(ServerMessage::Partial(_))]
        ));
        assert!(matches!(
            &s.on_result(&fin(2, 1, "b"))[..],
            [Action::Send(ServerMessage::Final(_))]
        ));
    }

    #[test]
    fn completion_waits_for_every_ack_and_the_end() {
        let mut s = open_session();
        s.on_binary(frame(0, 1));
        s.on_result(&started(1));
        s.on_result(&fin(1, 0, "hello"));
        s.on_result(&fin(1, 1, "world"));
        s.on_text(r#"{"type":"end"}"#);
        let done = Event::TranscriptCompleted {
            epoch: 1,
            segments: 2,
        };
        assert!(s.on_result(&done).is_empty(), "chunk 0 not acked yet");
        assert_eq!(s.on_confirmed(Appended::Chunk(0)).len(), 1, "just the ack");
        let actions = s.on_confirmed(Appended::End);
        assert_eq!(
            actions,
            vec![
                Action::Send(ServerMessage::Completed {
                    result: 3,
                    segments: 2,
                    transcript: "hello world".into(),
                    missing_segments: vec![],
                }),
                Action::Close(None),
            ]
        );
        assert_eq!(s.phase(), Phase::Completed);
    }

    #[test]
    fn a_gap_in_the_transcript_is_reported() {
        let mut s = open_session();
        s.on_text(r#"{"type":"end"}"#);
        s.on_confirmed(Appended::End);
        s.on_result(&started(1));
        s.on_result(&fin(1, 1, "b"));
        let actions = s.on_result(&Event::TranscriptCompleted {
            epoch: 1,
            segments: 2,
        });
        assert!(matches!(
            &actions[..],
            [Action::Send(ServerMessage::Completed { missing_segments, .. }), Action::Close(None)]
                if missing_segments == &vec![0]
        ));
    }

    #[test]
    fn server_side_failures_close_once() {
        let mut s = open_session();
        assert_eq!(
            error_code(&s.fail(SessionError::BrokerUnavailable("down".into()))),
            Some("broker_unavailable")
        );
        assert!(s.fail(SessionError::ClientTooSlow).is_empty());
        assert!(s.on_confirmed(Appended::Chunk(0)).is_empty());
    }
}
