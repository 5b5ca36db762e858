//! Synthetic sessions written straight to the streams, the way ingest, a recognizer and
//! the orchestrator would write them, with no recognition: for the projector's tests
//! and benchmarks (they are about projecting events, not producing them).
//!
//! A [`SessionSpec`] says what happens in a session: how much audio, whether its
//! recognizer fails over (a replacement re-deciding a final, a zombie's late final),
//! whether its client resumes (a chunk's second copy after the resume marker), and how
//! it ends. What the read models must then hold follows from the spec alone.

use std::collections::HashMap;

use bytes::Bytes;
use eventlog::events::{AudioChunk, SessionLoad};
use eventlog::log::{Appender, PendingAppend, StreamLog};
use eventlog::streams::StreamLayout;
use eventlog::{AudioEncoding, AudioFormat, Envelope, Event, SessionId};

pub const TENANT: &str = "synthetic";
pub const MODEL: &str = "whisper-tiny.en";
/// The fencing token of the current orchestrator term; a deposed leader writes with
/// one less.
pub const TOKEN: u64 = 7;

/// What happens in one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSpec {
    pub tenant: String,
    pub chunks: u64,
    /// Bytes of 16 kHz pcm_s16le per chunk.
    pub chunk_bytes: usize,
    /// Epoch 1 is replaced by epoch 2 after the first final.
    pub failover: bool,
    /// The client resumes after the first half of its chunks, sending one chunk again.
    pub resumed: bool,
    /// `None`: an end of stream and a completed transcript; `Some(code)`: closed with
    /// that error code after its audio, then completed by its recognizer.
    pub closed: Option<String>,
}

impl Default for SessionSpec {
    fn default() -> Self {
        Self {
            tenant: TENANT.into(),
            chunks: 10,
            chunk_bytes: 3_200,
            failover: false,
            resumed: false,
            closed: None,
        }
    }
}

impl SessionSpec {
    /// The finals that count, by segment: the text each must have.
    pub fn transcript(&self, session: SessionId) -> Vec<String> {
        (0..2).map(|segment| final_text(session, segment)).collect()
    }

    pub fn format() -> AudioFormat {
        AudioFormat {
            sample_rate: 16_000,
            encoding: AudioEncoding::PcmS16le,
        }
    }

    /// How many events [`Writer::session`] appends for this spec, over all streams.
    pub fn events(&self) -> u64 {
        let half = self.chunks / 2;
        // The resume marker comes with the chunk at `half`, and the second copy of the
        // chunk before it, if there is one.
        let resume = match (self.resumed, self.chunks > half) {
            (true, true) => 1 + u64::from(half > 0),
            _ => 0,
        };
        let audio = 1 + self.chunks + resume + 1;
        let results = 5 + if self.failover { 3 } else { 0 };
        let control = 2;
        let heartbeats = 2;
        audio + results + control + heartbeats
    }

    /// Milliseconds of audio in the session (16 kHz, 16-bit).
    pub fn audio_ms(&self) -> u64 {
        self.chunks * (self.chunk_bytes as u64 / 2) * 1000 / 16_000
    }

    /// The PCM of chunk `seq` (distinct per session and seq).
    pub fn pcm(&self, session: SessionId, seq: u64) -> Vec<u8> {
        let seed = session.as_bytes()[0] as u64 ^ seq;
        (0..self.chunk_bytes)
            .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64) % 251) as u8)
            .collect()
    }
}

pub fn final_text(session: SessionId, segment: u32) -> String {
    format!(
        "segment {segment} of {}",
        &session.simple().to_string()[..8]
    )
}

/// Writes synthetic sessions to a deployment's streams.
pub struct Writer {
    log: StreamLog,
    layout: StreamLayout,
    appenders: HashMap<String, Appender>,
    pending: Vec<PendingAppend>,
}

impl Writer {
    pub fn new(log: StreamLog, layout: StreamLayout) -> Self {
        Self {
            log,
            layout,
            appenders: HashMap::new(),
            pending: Vec::new(),
        }
    }

    /// Writes one session's events; call [`Writer::flush`] to wait for them all.
    ///
    /// Its worker's heartbeat (stamped with the session's opening time) says half its
    /// audio is decoded; a deposed leader's heartbeat says something else.
    pub async fn session(&mut self, session: SessionId, spec: &SessionSpec) {
        let opened_at_ms = eventlog::now_ms();
        let audio = self.layout.audio_stream(session);
        let results = self.layout.results_stream(session);
        let control = self.layout.control_stream();
        let write = |event| (session, event);

        self.append(&control, "orchestrator", write(queued(TOKEN)))
            .await;
        // A deposed leader's late event: recorded, never counted.
        self.append(&control, "orchestrator-old", write(queued(TOKEN - 1)))
            .await;
        self.append(
            &audio,
            "ingest/1",
            write(Event::SessionOpened {
                tenant: spec.tenant.clone(),
                model: MODEL.into(),
                format: SessionSpec::format(),
            }),
        )
        .await;
        let half = spec.chunks / 2;
        for seq in 0..spec.chunks {
            let writer = if spec.resumed && seq >= half {
                "ingest/2"
            } else {
                "ingest/1"
            };
            if spec.resumed && seq == half {
                let marker = Event::SessionResumed {
                    writer: "ingest/2".into(),
                };
                self.append(&audio, "ingest/2", write(marker)).await;
                // The first copy of the last chunk before the marker, sent again.
                if let Some(again) = seq.checked_sub(1) {
                    let chunk = self.chunk(session, spec, again);
                    self.append(&audio, writer, write(chunk)).await;
                }
            }
            let chunk = self.chunk(session, spec, seq);
            self.append(&audio, writer, write(chunk)).await;
        }
        let end = match &spec.closed {
            None => Event::EndOfStream {
                last_seq: spec.chunks.checked_sub(1),
            },
            Some(code) => Event::SessionClosed {
                reason: code.clone(),
            },
        };
        self.append(&audio, "ingest/2", write(end)).await;

        let started = |epoch: u64| Event::EpochStarted {
            epoch,
            worker: format!("recognizer-{epoch}"),
        };
        let fin = |epoch: u64, segment: u32, text: String| Event::Final {
            epoch,
            segment,
            text,
            start_ms: u64::from(segment) * 1000,
            end_ms: u64::from(segment) * 1000 + 800,
        };
        self.append(&results, "recognizer-1", write(started(1)))
            .await;
        let partial = Event::Partial {
            epoch: 1,
            segment: 0,
            text: "segment".into(),
            start_ms: 0,
            end_ms: 400,
        };
        self.append(&results, "recognizer-1", write(partial)).await;
        self.append(
            &results,
            "recognizer-1",
            write(fin(1, 0, final_text(session, 0))),
        )
        .await;
        let last_epoch = if spec.failover {
            self.append(&results, "recognizer-2", write(started(2)))
                .await;
            let again = fin(2, 0, "re-decided, a duplicate".into());
            self.append(&results, "recognizer-2", write(again)).await;
            let zombie = fin(1, 1, "a zombie's late final".into());
            self.append(&results, "recognizer-1", write(zombie)).await;
            2
        } else {
            1
        };
        let worker = format!("recognizer-{last_epoch}");
        self.append(
            &results,
            &worker,
            write(fin(last_epoch, 1, final_text(session, 1))),
        )
        .await;
        let done = Event::TranscriptCompleted {
            epoch: last_epoch,
            segments: 2,
        };
        self.append(&results, &worker, write(done)).await;

        let heartbeats = self.layout.heartbeat_stream();
        for (token, decoded_ms) in [(TOKEN, spec.audio_ms() / 2), (TOKEN - 1, 0)] {
            let beat = Event::Heartbeat {
                worker: worker.clone(),
                model: MODEL.into(),
                capacity: 1,
                sessions: vec![SessionLoad {
                    session,
                    epoch: last_epoch,
                    decoded_ms,
                }],
                token,
            };
            let envelope = Envelope {
                session: None,
                at_ms: opened_at_ms,
                producer: "orchestrator".into(),
                event: beat,
            };
            self.append_envelope(&heartbeats, envelope).await;
        }
    }

    /// Waits for the broker to confirm everything written.
    pub async fn flush(&mut self) {
        for pending in self.pending.drain(..) {
            pending
                .confirmed()
                .await
                .expect("synthetic event confirmed");
        }
    }

    pub async fn close(mut self) {
        self.flush().await;
        for (_, appender) in self.appenders.drain() {
            appender.close().await;
        }
    }

    fn chunk(&self, session: SessionId, spec: &SessionSpec, seq: u64) -> Event {
        Event::AudioChunk(AudioChunk {
            seq,
            bytes: Bytes::from(spec.pcm(session, seq)),
        })
    }

    async fn append(&mut self, stream: &str, producer: &str, (session, event): (SessionId, Event)) {
        let envelope = Envelope {
            session: Some(session),
            at_ms: eventlog::now_ms(),
            producer: producer.into(),
            event,
        };
        self.append_envelope(stream, envelope).await;
    }

    async fn append_envelope(&mut self, stream: &str, envelope: Envelope) {
        if !self.appenders.contains_key(stream) {
            let name = format!("synthetic-{}-{stream}", uuid::Uuid::new_v4().simple());
            let appender = self
                .log
                .appender(stream, &name, true, 64 * 1024)
                .await
                .expect("synthetic appender");
            self.appenders.insert(stream.to_string(), appender);
        }
        let pending = self.appenders[stream]
            .append(&envelope)
            .await
            .expect("synthetic append");
        self.pending.push(pending);
    }
}

fn queued(token: u64) -> Event {
    Event::SessionQueued {
        model: MODEL.into(),
        position: 1,
        token,
    }
}
