//! Driving one session through recognizer failures, shared by `tests/failover.rs` and
//! `asr-bench failover`: stream a recording while watching what the client hears
//! ([`stream`], [`Watch`]), ask the registry who holds the session ([`holder`]), draw
//! kill moments inside the speech ([`KillPositions`]) and kill there ([`Killer`]),
//! follow decoding progress ([`Progress`]), compare a run with
//! the no-failure one ([`Reference`]), and read back what the workers appended
//! ([`session_results`]).
//!
//! Moments are fixed by the audio the client has had acknowledged, never by guessed
//! sleeps: a position in the audio is reached when the frame carrying it is acked.

use std::future::Future;
use std::time::Duration;

use client::{ClientError, Outcome, Recording, StreamOptions};
use eventlog::log::{LogConfig, ReadFrom, StreamLog};
use eventlog::{Envelope, Event};
use ingest::protocol::{Segment, ServerMessage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use crate::system::System;

/// No step of a session (an assignment, a failpoint, the next client message) takes
/// this long.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A conversation's outcome with no failure: what every failover run must equal.
#[derive(Clone, Debug)]
pub struct Reference {
    pub transcript: String,
    pub finals: Vec<Segment>,
}

impl Reference {
    pub fn of(outcome: &Outcome) -> Self {
        Self {
            transcript: outcome.transcript.clone(),
            finals: outcome.finals.iter().map(|f| f.segment.clone()).collect(),
        }
    }

    /// The audio ranges (ms) of the speech: the reference finals' ranges.
    pub fn speech(&self) -> Vec<(u64, u64)> {
        self.finals.iter().map(|s| (s.start_ms, s.end_ms)).collect()
    }

    /// What differs between `outcome` and this reference, or `None` when the failover
    /// guarantees hold: the same finals (index, text, audio range) in order, every
    /// index once, none reported missing, the same transcript.
    pub fn differences(&self, outcome: &Outcome) -> Option<String> {
        let finals: Vec<&Segment> = outcome.finals.iter().map(|f| &f.segment).collect();
        let indices: Vec<u32> = finals.iter().map(|s| s.segment).collect();
        let expected: Vec<u32> = (0..self.finals.len() as u32).collect();
        let what = if indices != expected {
            format!("segment indices {indices:?}, expected {expected:?}")
        } else if !outcome.missing_segments.is_empty() {
            format!("missing segments {:?}", outcome.missing_segments)
        } else if outcome.transcript != self.transcript {
            "transcripts differ".to_string()
        } else if finals
            .iter()
            .zip(&self.finals)
            .any(|(a, b)| !same_words(a, b))
        {
            "finals differ".to_string()
        } else {
            return None;
        };
        Some(format!(
            "{what}\nheard:    {:?}\nexpected: {:?}\nfinals:   {finals:?}\nreference finals: {:?}",
            outcome.transcript, self.transcript, self.finals
        ))
    }
}

/// The same final: index, text and audio range. Its `result` index counts the
/// partials before it too, and how many partials a run gets depends on its timing.
fn same_words(a: &Segment, b: &Segment) -> bool {
    (a.segment, &a.text, a.start_ms, a.end_ms) == (b.segment, &b.text, b.start_ms, b.end_ms)
}

/// A partial or final as the client received it.
#[derive(Clone, Debug)]
pub struct Heard {
    pub at: Instant,
    pub is_final: bool,
    pub segment: Segment,
}

/// The session as its controller follows it, from what the client receives.
#[derive(Debug)]
pub struct Watch {
    seen: mpsc::UnboundedReceiver<(Instant, ServerMessage)>,
    pub session: Option<Uuid>,
    /// Highest acknowledged frame + 1.
    pub acked: u64,
    /// Every partial and final so far, in arrival order.
    pub results: Vec<Heard>,
}

impl Watch {
    /// Consumes what the client received until `done` holds; panics after
    /// [`STEP_TIMEOUT`] without a message, or if the session ends first.
    pub async fn until(&mut self, what: &str, done: impl Fn(&Watch) -> bool) {
        while !done(self) {
            let next = tokio::time::timeout(STEP_TIMEOUT, self.seen.recv()).await;
            match next {
                Ok(Some(seen)) => self.note(seen),
                Ok(None) => panic!("the session ended while waiting for {what}"),
                Err(_) => panic!("nothing from the client for {STEP_TIMEOUT:?} waiting for {what}"),
            }
        }
    }

    /// Takes in what the client received so far, without waiting.
    pub fn drain(&mut self) {
        while let Ok(seen) = self.seen.try_recv() {
            self.note(seen);
        }
    }

    /// Takes in everything until the client is done (its sender dropped).
    pub async fn finish(&mut self) {
        while let Some(seen) = self.seen.recv().await {
            self.note(seen);
        }
    }

    fn note(&mut self, (at, message): (Instant, ServerMessage)) {
        match message {
            ServerMessage::Opened { session_id, .. } => self.session = Some(session_id),
            ServerMessage::Ack { seq } => self.acked = self.acked.max(seq + 1),
            ServerMessage::Partial(segment) => self.results.push(Heard {
                at,
                is_final: false,
                segment,
            }),
            ServerMessage::Final(segment) => self.results.push(Heard {
                at,
                is_final: true,
                segment,
            }),
            _ => {}
        }
    }

    /// Finals received so far.
    pub fn finals(&self) -> usize {
        self.results.iter().filter(|h| h.is_final).count()
    }

    /// The session id, once the client has it.
    pub async fn session(&mut self) -> Uuid {
        self.until("the session id", |w| w.session.is_some()).await;
        self.session.expect("opened")
    }
}

/// Starts streaming `recording` to the system at `speed` (1.0 = real time): the
/// client's future, and the [`Watch`] that sees every server message as it arrives.
pub fn stream(
    system: &System,
    recording: Recording,
    speed: f64,
) -> (
    impl Future<Output = Result<Outcome, ClientError>> + use<>,
    Watch,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let options = StreamOptions {
        speed,
        completion_timeout: Duration::from_secs(120),
        ..system.stream_options()
    };
    let client = async move {
        client::stream(&options, &recording, |message| {
            let _ = tx.send((Instant::now(), message.clone()));
        })
        .await
    };
    let watch = Watch {
        seen: rx,
        session: None,
        acked: 0,
        results: Vec::new(),
    };
    (client, watch)
}

/// Who holds a session, from the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub worker: String,
    pub epoch: u64,
    /// The session is already finished (a fast replacement can decode what is left
    /// before the controller looks).
    pub done: bool,
}

/// The worker holding the session under an epoch above `after_epoch`, once the
/// orchestrator assigned it; panics with every log after [`STEP_TIMEOUT`].
pub async fn holder(system: &System, session: Uuid, after_epoch: u64) -> Holder {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(a) = system.assignment(session).await
            && (a.state == "assigned" || a.state == "done")
            && a.epoch > after_epoch
            && let Some(worker) = a.worker
        {
            return Holder {
                worker,
                epoch: a.epoch,
                done: a.state == "done",
            };
        }
        assert!(
            Instant::now() < deadline,
            "session {session} not assigned beyond epoch {after_epoch}\n{}",
            system.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Seeded kill positions inside speech: a run repeats with the same seed.
#[derive(Debug)]
pub struct KillPositions {
    seed: u64,
    rng: StdRng,
}

impl KillPositions {
    /// Seeded with `seed`, or with a random seed when `None` (print
    /// [`seed`](Self::seed), so the run can be repeated).
    pub fn new(seed: Option<u64>) -> Self {
        let seed = seed.unwrap_or_else(rand::random);
        Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// `count` positions (ms of audio) drawn uniformly over the speech ranges, sorted,
    /// at least `min_spacing_ms` apart.
    pub fn inside_speech(
        &mut self,
        speech: &[(u64, u64)],
        count: usize,
        min_spacing_ms: u64,
    ) -> Vec<u64> {
        let total: u64 = speech.iter().map(|(a, b)| b - a).sum();
        assert!(
            total > min_spacing_ms * count.saturating_sub(1) as u64,
            "{count} positions {min_spacing_ms} ms apart do not fit in {total} ms of speech"
        );
        loop {
            let mut at: Vec<u64> = (0..count)
                .map(|_| {
                    let mut offset = self.rng.random_range(0..total);
                    for (start, end) in speech {
                        if offset < end - start {
                            return start + offset;
                        }
                        offset -= end - start;
                    }
                    unreachable!("offset within the speech")
                })
                .collect();
            at.sort_unstable();
            if at.windows(2).all(|w| w[1] - w[0] >= min_spacing_ms) {
                return at;
            }
        }
    }
}

/// The session's result events (EpochStarted, Partial, Final, TranscriptCompleted), in
/// log order, read from the start of its results partition: see [`read_stream`].
pub async fn session_results(
    system: &System,
    session: Uuid,
    quiet: Duration,
    done: impl Fn(&[Envelope]) -> bool,
) -> Vec<Envelope> {
    let stream = system.layout.results_stream(session);
    read_stream(&stream, Some(session), ReadFrom::Start, quiet, done).await
}

/// Events of `stream` (only `session`'s, if given), in log order from `from`, read
/// until `done` holds for what was read and then nothing more came for `quiet` (late
/// appends, for instance a zombie's, are in by then; on a stream that never goes quiet,
/// such as the heartbeats, `done` must look at a time and `quiet` be zero). Panics
/// after [`STEP_TIMEOUT`] without an event before `done`.
pub async fn read_stream(
    stream: &str,
    session: Option<Uuid>,
    from: ReadFrom,
    quiet: Duration,
    done: impl Fn(&[Envelope]) -> bool,
) -> Vec<Envelope> {
    let log = StreamLog::connect(&LogConfig::default())
        .await
        .expect("connecting to the broker");
    let mut reader = log
        .reader(stream, from, session)
        .await
        .unwrap_or_else(|e| panic!("reading {stream}: {e}"));
    let mut events = Vec::new();
    loop {
        let finished = done(&events);
        let wait = if finished { quiet } else { STEP_TIMEOUT };
        match tokio::time::timeout(wait, reader.next()).await {
            Ok(Some(Ok(record))) => {
                if session.is_none() || record.envelope.session == session {
                    events.push(record.envelope);
                }
            }
            Ok(Some(Err(e))) => panic!("reading {stream}: {e}"),
            Ok(None) => panic!("{stream} closed"),
            Err(_) if finished => break,
            Err(_) => panic!(
                "no event for {wait:?} on {stream} before the end ({} read)",
                events.len()
            ),
        }
    }
    reader.close().await;
    events
}

/// The sequence numbers of the session's audio chunks in the log, in log order, read
/// up to its end of stream: each exactly once when nothing was lost or doubled.
pub async fn stored_chunks(system: &System, session: Uuid) -> Vec<u64> {
    let stream = system.layout.audio_stream(session);
    let ended = |events: &[Envelope]| {
        events
            .iter()
            .any(|e| matches!(e.event, Event::EndOfStream { .. }))
    };
    read_stream(
        &stream,
        Some(session),
        ReadFrom::Start,
        Duration::from_millis(500),
        ended,
    )
    .await
    .into_iter()
    .filter_map(|e| match e.event {
        Event::AudioChunk(chunk) => Some(chunk.seq),
        _ => None,
    })
    .collect()
}

/// The heartbeat stream from now on: each worker's own account of its sessions'
/// decoded positions, every heartbeat interval.
pub struct Progress {
    reader: eventlog::log::Reader,
}

impl Progress {
    /// Follows the heartbeats appended from now on (open it before the moment it is
    /// to see: a consumer takes a while to start).
    pub async fn follow(system: &System) -> Self {
        let log = StreamLog::connect(&LogConfig::default())
            .await
            .expect("connecting to the broker");
        let stream = system.layout.heartbeat_stream();
        let reader = log
            .reader(&stream, ReadFrom::Next, None)
            .await
            .unwrap_or_else(|e| panic!("reading {stream}: {e}"));
        Self { reader }
    }

    /// Waits for a heartbeat saying the session is decoded to at least `ms` of its
    /// audio under `epoch`; returns the reported position, or `None` when there was
    /// none `within` (for instance because the session ended first).
    pub async fn decoded_to(
        &mut self,
        session: Uuid,
        epoch: u64,
        ms: u64,
        within: Duration,
    ) -> Option<u64> {
        let deadline = Instant::now() + within;
        loop {
            let record = tokio::time::timeout_at(deadline, self.reader.next())
                .await
                .ok()?;
            let envelope = match record {
                Some(Ok(record)) => record.envelope,
                Some(Err(e)) => panic!("reading the heartbeats: {e}"),
                None => panic!("the heartbeat stream closed"),
            };
            if let Event::Heartbeat { sessions, .. } = envelope.event
                && let Some(load) = sessions
                    .iter()
                    .find(|s| s.session == session && s.epoch == epoch && s.decoded_ms >= ms)
            {
                return Some(load.decoded_ms);
            }
        }
    }

    pub async fn close(self) {
        self.reader.close().await;
    }
}

/// Whether a session's results include a `TranscriptCompleted` of the latest started
/// epoch: a `done` for [`session_results`].
pub fn completed(events: &[Envelope]) -> bool {
    let latest = events
        .iter()
        .filter_map(|e| match e.event {
            Event::EpochStarted { epoch, .. } => Some(epoch),
            _ => None,
        })
        .max();
    events.iter().any(
        |e| matches!(e.event, Event::TranscriptCompleted { epoch, .. } if Some(epoch) == latest),
    )
}

/// One SIGKILL of a session's worker, as the controller saw it.
#[derive(Clone, Debug)]
pub struct Kill {
    /// The audio position (ms) the kill was aimed at.
    pub aimed_ms: u64,
    pub worker: String,
    pub epoch: u64,
    /// Just before the SIGKILL, on this process's monotonic and wall clocks.
    pub at: Instant,
    pub at_ms: u64,
    /// From the SIGKILL until the process was reaped (its sockets close on the way).
    pub reaped_after: Duration,
    /// Audio acknowledged to the client (so appended to the log) at the kill, ms.
    pub acked_ms: u64,
    /// Finals the client had received at the kill.
    pub finals_heard: usize,
}

/// What [`Killer::kill_at`] did.
#[derive(Clone, Debug)]
pub enum Step {
    Killed(Kill),
    /// The session had finished under this holder before the position was reached
    /// (a fast replacement can decode what is left before the controller looks).
    Finished(Holder),
}

/// SIGKILLs a session's current worker at chosen audio positions, and brings the
/// capacity back without pausing the session (a model loads in seconds): every other
/// killed worker id comes back as a fresh process, otherwise a new worker joins. At
/// once ([`Killer::new`]: the model load then competes with the replacement's
/// catching up for the cores, as under a supervisor that restarts a dead child), or
/// when the controller says ([`Killer::deferred`], [`Killer::bring_back`]).
#[derive(Debug)]
pub struct Killer {
    /// Recognizers started so far, for the next new worker id.
    started: usize,
    kills: usize,
    deferred: bool,
    /// Killed workers whose capacity is not back yet.
    pending: Vec<String>,
}

impl Killer {
    /// For a system started with `recognizers` recognizers (`recognizer-1`…); brings
    /// capacity back right after each kill.
    pub fn new(recognizers: usize) -> Self {
        Self {
            started: recognizers,
            kills: 0,
            deferred: false,
            pending: Vec::new(),
        }
    }

    /// Like [`new`](Self::new), but capacity comes back only on [`bring_back`](Self::bring_back).
    pub fn deferred(recognizers: usize) -> Self {
        Self {
            deferred: true,
            ..Self::new(recognizers)
        }
    }

    /// Waits until the audio at `ms` is acknowledged, then SIGKILLs the session's
    /// holder (under an epoch above `after_epoch`: the previous kill's).
    pub async fn kill_at(
        &mut self,
        system: &mut System,
        watch: &mut Watch,
        session: Uuid,
        after_epoch: u64,
        ms: u64,
    ) -> Step {
        let frame = ms / 100;
        watch.until("the kill position", |w| w.acked > frame).await;
        let holder = holder(system, session, after_epoch).await;
        if holder.done {
            return Step::Finished(holder);
        }
        watch.drain();
        let (at, at_ms) = (Instant::now(), eventlog::now_ms());
        system.kill(&holder.worker).await;
        let kill = Kill {
            aimed_ms: ms,
            worker: holder.worker,
            epoch: holder.epoch,
            at,
            at_ms,
            reaped_after: at.elapsed(),
            acked_ms: watch.acked * 100,
            finals_heard: watch.finals(),
        };
        self.pending.push(kill.worker.clone());
        if !self.deferred {
            self.bring_back(system).await;
        }
        Step::Killed(kill)
    }

    /// Brings back the capacity of every kill so far (returns at once: the processes
    /// load their model in the background).
    pub async fn bring_back(&mut self, system: &mut System) {
        for worker in std::mem::take(&mut self.pending) {
            if self.kills.is_multiple_of(2) {
                system.restart(&worker).await;
            } else {
                self.started += 1;
                system.spawn_recognizer(&format!("recognizer-{}", self.started), &[]);
            }
            self.kills += 1;
        }
    }
}

/// The session's checkpoint in Redis, as the recognizers store it.
pub async fn checkpoint(
    system: &System,
    session: Uuid,
) -> Option<eventlog::checkpoint::Checkpoint> {
    let client = redis::Client::open(system.redis_url.as_str()).expect("redis url");
    let redis = redis::aio::ConnectionManager::new(client)
        .await
        .expect("redis connection");
    eventlog::checkpoint::CheckpointStore::new(redis, system.namespace.clone())
        .load(session)
        .await
        .expect("reading the checkpoint")
}
