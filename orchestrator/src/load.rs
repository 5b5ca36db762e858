//! Load projections derived from the event streams, pure: a fold of the audio,
//! control and heartbeat events into each model's load now (ARCHITECTURE.md, Scaling).
//!
//! Nothing here asks a process how busy it is: every number comes from events in the
//! log, so any replica (or a test, or a replay) derives the same projection from the
//! same events, and a new leader rebuilds it by reading a recent window of the streams.
//!
//! - active sessions: allocated and not released (`WorkerAllocated`, `WorkerReleased`),
//!   plus any session a heartbeat says a worker serves (a session allocated before the
//!   window the fold started from);
//! - waiting sessions: opened or queued and not allocated, and those of a lost worker;
//! - arrivals: `SessionOpened`, counted per model, and their rate over the last minute;
//! - backlog: per session, audio appended (`AudioChunk` bytes at the session's format)
//!   minus audio decoded (the heartbeats' `decoded_ms`), summed per model;
//! - real-time factor: wall time over audio decoded, measured between heartbeats while
//!   a session has a backlog (catching up, so the decoder is the limit, not the caller);
//! - workers: registered and heartbeating, draining or not, idle (a free slot) or busy.
//!
//! Control and heartbeat events go through [`ControlFilter`]: a deposed leader's late
//! events do not count.

use std::collections::{HashMap, HashSet, VecDeque};

use eventlog::control::ControlFilter;
use eventlog::{AudioFormat, Envelope, Event, SessionId};

use crate::scaling::{LoadProjection, WorkerView};

/// Arrivals within this long count towards the arrival rate.
const RATE_WINDOW_MS: u64 = 60_000;
/// A backlog shorter than this is the audio in flight, not a decoder falling behind.
const CATCHING_UP_MS: u64 = 1_000;
/// Weight of a new real-time-factor measurement in the running average.
const RTF_SMOOTHING: f64 = 0.2;
/// How long the ids of finished sessions are remembered, so that a heartbeat sent
/// just before a release does not bring the session back.
const FINISHED_MEMORY_MS: u64 = 120_000;

#[derive(Clone, Debug)]
enum SessionState {
    Waiting,
    Active { worker: String },
}

#[derive(Clone, Debug)]
struct SessionLoad {
    model: String,
    state: SessionState,
    /// Bytes per millisecond of the client's audio, once `SessionOpened` was seen.
    bytes_per_ms: Option<f64>,
    appended_bytes: u64,
    decoded_ms: u64,
    /// The last heartbeat's (time, decoded_ms), for the real-time factor.
    last_progress: Option<(u64, u64)>,
}

impl SessionLoad {
    fn new(model: String, state: SessionState) -> Self {
        Self {
            model,
            state,
            bytes_per_ms: None,
            appended_bytes: 0,
            decoded_ms: 0,
            last_progress: None,
        }
    }

    fn appended_ms(&self) -> Option<u64> {
        self.bytes_per_ms
            .map(|rate| (self.appended_bytes as f64 / rate) as u64)
    }

    /// Audio appended but not decoded yet; unknown before `SessionOpened` was seen.
    fn backlog_ms(&self) -> u64 {
        self.appended_ms()
            .map_or(0, |appended| appended.saturating_sub(self.decoded_ms))
    }
}

#[derive(Clone, Debug)]
struct WorkerLoad {
    model: String,
    capacity: u32,
    draining: bool,
    last_seen_ms: u64,
}

/// One model's load, everything the metrics show.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelLoad {
    pub projection: LoadProjection,
    /// Arrivals per minute over the last minute.
    pub arrivals_per_minute: f64,
    /// Audio appended but not yet decoded, in seconds, over the model's sessions.
    pub backlog_seconds: f64,
    /// Wall time per audio time while catching up; `None` until measured.
    pub real_time_factor: Option<f64>,
    pub workers_idle: u32,
    pub workers_busy: u32,
}

/// The fold. Feed it every event of the audio partitions, the control stream and the
/// heartbeat stream ([`LoadTracker::apply`]), in each stream's order.
#[derive(Debug)]
pub struct LoadTracker {
    /// A worker silent for this long no longer counts (the orchestrator will mark it
    /// lost, with an event, shortly).
    stale_after_ms: u64,
    control: ControlFilter,
    heartbeats: ControlFilter,
    sessions: HashMap<SessionId, SessionLoad>,
    finished: VecDeque<(u64, SessionId)>,
    finished_set: HashSet<SessionId>,
    workers: HashMap<String, WorkerLoad>,
    arrivals_total: HashMap<String, u64>,
    recent_arrivals: HashMap<String, VecDeque<u64>>,
    rtf: HashMap<String, f64>,
}

impl LoadTracker {
    pub fn new(stale_after_ms: u64) -> Self {
        Self {
            stale_after_ms,
            control: ControlFilter::new(),
            heartbeats: ControlFilter::new(),
            sessions: HashMap::new(),
            finished: VecDeque::new(),
            finished_set: HashSet::new(),
            workers: HashMap::new(),
            arrivals_total: HashMap::new(),
            recent_arrivals: HashMap::new(),
            rtf: HashMap::new(),
        }
    }

    /// Folds one event in.
    pub fn apply(&mut self, envelope: &Envelope) {
        let at = envelope.at_ms;
        let session = envelope.session;
        match &envelope.event {
            Event::Heartbeat { .. } => {
                if self.heartbeats.accept(&envelope.event) {
                    self.heartbeat(at, &envelope.event);
                }
                return;
            }
            event if event.leader_token().is_some() && !self.control.accept(event) => return,
            _ => {}
        }
        // A finished session stays finished: a late event does not bring it back.
        if session.is_some_and(|id| self.finished_set.contains(&id)) {
            return;
        }
        match (&envelope.event, session) {
            (Event::SessionOpened { model, format, .. }, Some(id)) => {
                let entry = self
                    .sessions
                    .entry(id)
                    .or_insert_with(|| SessionLoad::new(model.clone(), SessionState::Waiting));
                entry.bytes_per_ms = Some(bytes_per_ms(format));
                *self.arrivals_total.entry(model.clone()).or_default() += 1;
                self.recent_arrivals
                    .entry(model.clone())
                    .or_default()
                    .push_back(at);
            }
            (Event::AudioChunk(chunk), Some(id)) => {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.appended_bytes += chunk.bytes.len() as u64;
                }
            }
            (Event::SessionClosed { .. }, Some(id)) => {
                // A caller who hung up while waiting needs no worker any more; an
                // active session still has audio to decode, until its release.
                if matches!(
                    self.sessions.get(&id).map(|s| &s.state),
                    Some(SessionState::Waiting)
                ) {
                    self.finish(at, id);
                }
            }
            (Event::SessionQueued { model, .. }, Some(id)) => {
                self.sessions
                    .entry(id)
                    .or_insert_with(|| SessionLoad::new(model.clone(), SessionState::Waiting))
                    .state = SessionState::Waiting;
            }
            (Event::WorkerAllocated { worker, model, .. }, Some(id)) => {
                let state = SessionState::Active {
                    worker: worker.clone(),
                };
                self.sessions
                    .entry(id)
                    .or_insert_with(|| SessionLoad::new(model.clone(), SessionState::Waiting))
                    .state = state;
            }
            (Event::WorkerReleased { .. }, Some(id)) => self.finish(at, id),
            (
                Event::WorkerRegistered {
                    worker,
                    model,
                    capacity,
                    ..
                },
                _,
            ) => {
                let draining = self.workers.get(worker).is_some_and(|w| w.draining);
                self.workers.insert(
                    worker.clone(),
                    WorkerLoad {
                        model: model.clone(),
                        capacity: *capacity,
                        draining,
                        last_seen_ms: at,
                    },
                );
            }
            (
                Event::WorkerDraining {
                    worker, draining, ..
                },
                _,
            ) => {
                if let Some(w) = self.workers.get_mut(worker) {
                    w.draining = *draining;
                }
            }
            (Event::WorkerLost { worker, .. } | Event::WorkerRetired { worker, .. }, _) => {
                self.workers.remove(worker);
                for s in self.sessions.values_mut() {
                    if matches!(&s.state, SessionState::Active { worker: w } if w == worker) {
                        s.state = SessionState::Waiting;
                    }
                }
            }
            _ => {}
        }
        self.forget_finished(at);
    }

    fn heartbeat(&mut self, at: u64, event: &Event) {
        let Event::Heartbeat {
            worker,
            model,
            capacity,
            sessions,
            ..
        } = event
        else {
            return;
        };
        let entry = self
            .workers
            .entry(worker.clone())
            .or_insert_with(|| WorkerLoad {
                model: model.clone(),
                capacity: *capacity,
                draining: false,
                last_seen_ms: at,
            });
        entry.capacity = (*capacity).max(1);
        entry.last_seen_ms = entry.last_seen_ms.max(at);
        for progress in sessions {
            if self.finished_set.contains(&progress.session) {
                continue;
            }
            let session = self.sessions.entry(progress.session).or_insert_with(|| {
                SessionLoad::new(
                    model.clone(),
                    SessionState::Active {
                        worker: worker.clone(),
                    },
                )
            });
            if let Some((then, decoded_then)) = session.last_progress
                && session.backlog_ms() > CATCHING_UP_MS
                && progress.decoded_ms > decoded_then
                && at > then
            {
                let measured = (at - then) as f64 / (progress.decoded_ms - decoded_then) as f64;
                let rtf = self.rtf.entry(model.clone()).or_insert(measured);
                *rtf += RTF_SMOOTHING * (measured - *rtf);
            }
            session.decoded_ms = session.decoded_ms.max(progress.decoded_ms);
            session.last_progress = Some((at, progress.decoded_ms));
        }
    }

    fn finish(&mut self, at: u64, id: SessionId) {
        self.sessions.remove(&id);
        if self.finished_set.insert(id) {
            self.finished.push_back((at, id));
        }
    }

    fn forget_finished(&mut self, now: u64) {
        while let Some(&(at, id)) = self.finished.front() {
            if now.saturating_sub(at) < FINISHED_MEMORY_MS {
                break;
            }
            self.finished.pop_front();
            self.finished_set.remove(&id);
        }
    }

    fn live_workers(
        &self,
        model: &str,
        now_ms: u64,
    ) -> impl Iterator<Item = (&String, &WorkerLoad)> {
        self.workers.iter().filter(move |(_, w)| {
            w.model == model && now_ms.saturating_sub(w.last_seen_ms) <= self.stale_after_ms
        })
    }

    /// Every model with sessions or workers.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .workers
            .values()
            .map(|w| w.model.clone())
            .chain(self.sessions.values().map(|s| s.model.clone()))
            .chain(self.arrivals_total.keys().cloned())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// The live workers of `model`, with their sessions, as the fleet reconciliation
    /// sees them.
    pub fn worker_views(&self, model: &str, now_ms: u64) -> Vec<WorkerView> {
        let mut views: Vec<WorkerView> = self
            .live_workers(model, now_ms)
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                assigned: self.assigned_to(id),
                draining: w.draining,
            })
            .collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    fn assigned_to(&self, worker: &str) -> u32 {
        self.sessions
            .values()
            .filter(|s| matches!(&s.state, SessionState::Active { worker: w } if w == worker))
            .count() as u32
    }

    /// `model`'s load at `now_ms`, with `starting` workers asked for and not yet
    /// registered (the autoscaler knows those, the events do not yet).
    pub fn load(&mut self, model: &str, starting: u32, now_ms: u64) -> ModelLoad {
        let recent = self.recent_arrivals.entry(model.to_string()).or_default();
        while recent
            .front()
            .is_some_and(|&at| now_ms.saturating_sub(at) > RATE_WINDOW_MS)
        {
            recent.pop_front();
        }
        let arrivals_per_minute = recent.len() as f64 * 60_000.0 / RATE_WINDOW_MS as f64;
        let (mut active, mut waiting, mut backlog_ms) = (0u32, 0u32, 0u64);
        for s in self.sessions.values().filter(|s| s.model == model) {
            match s.state {
                SessionState::Active { .. } => active += 1,
                SessionState::Waiting => waiting += 1,
            }
            backlog_ms += s.backlog_ms();
        }
        let (mut ready, mut draining, mut idle, mut busy, mut capacity) = (0, 0, 0, 0, 0);
        for (id, w) in self.live_workers(model, now_ms) {
            capacity = capacity.max(w.capacity);
            if w.draining {
                draining += 1;
                continue;
            }
            ready += 1;
            if self.assigned_to(id) < w.capacity {
                idle += 1;
            } else {
                busy += 1;
            }
        }
        ModelLoad {
            projection: LoadProjection {
                active_sessions: active,
                waiting_sessions: waiting,
                arrivals_total: self.arrivals_total.get(model).copied().unwrap_or(0),
                workers_ready: ready,
                workers_starting: starting,
                workers_draining: draining,
                // No worker seen yet: the recognizer's default, one session each.
                capacity_per_worker: capacity.max(1),
            },
            arrivals_per_minute,
            backlog_seconds: backlog_ms as f64 / 1000.0,
            real_time_factor: self.rtf.get(model).copied(),
            workers_idle: idle,
            workers_busy: busy,
        }
    }
}

fn bytes_per_ms(format: &AudioFormat) -> f64 {
    f64::from(format.sample_rate) * format.encoding.bytes_per_sample() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use eventlog::events::{AudioChunk, SessionLoad as Progress};
    use eventlog::{AudioEncoding, AudioFormat};
    use uuid::Uuid;

    const MODEL: &str = "m";

    fn at(at_ms: u64, session: Option<SessionId>, event: Event) -> Envelope {
        Envelope {
            session,
            at_ms,
            producer: "test".into(),
            event,
        }
    }

    fn opened(t: u64, id: SessionId) -> Envelope {
        at(
            t,
            Some(id),
            Event::SessionOpened {
                tenant: "t".into(),
                model: MODEL.into(),
                format: AudioFormat {
                    sample_rate: 16_000,
                    encoding: AudioEncoding::PcmS16le,
                },
            },
        )
    }

    /// `ms` of 16 kHz 16-bit audio.
    fn chunk(t: u64, id: SessionId, seq: u64, ms: usize) -> Envelope {
        at(
            t,
            Some(id),
            Event::AudioChunk(AudioChunk {
                seq,
                bytes: Bytes::from(vec![0u8; ms * 32]),
            }),
        )
    }

    fn registered(t: u64, worker: &str) -> Envelope {
        at(
            t,
            None,
            Event::WorkerRegistered {
                worker: worker.into(),
                model: MODEL.into(),
                capacity: 1,
                token: 1,
            },
        )
    }

    fn allocated(t: u64, id: SessionId, worker: &str) -> Envelope {
        at(
            t,
            Some(id),
            Event::WorkerAllocated {
                worker: worker.into(),
                model: MODEL.into(),
                epoch: 1,
                token: 1,
            },
        )
    }

    fn heartbeat(t: u64, worker: &str, sessions: &[(SessionId, u64)]) -> Envelope {
        at(
            t,
            None,
            Event::Heartbeat {
                worker: worker.into(),
                model: MODEL.into(),
                capacity: 1,
                sessions: sessions
                    .iter()
                    .map(|&(session, decoded_ms)| Progress {
                        session,
                        epoch: 1,
                        decoded_ms,
                    })
                    .collect(),
                token: 1,
            },
        )
    }

    fn fold(events: &[Envelope]) -> LoadTracker {
        let mut tracker = LoadTracker::new(2_000);
        for e in events {
            tracker.apply(e);
        }
        tracker
    }

    #[test]
    fn sessions_wait_until_allocated_and_leave_when_released() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut tracker = fold(&[
            registered(0, "w1"),
            opened(10, a),
            opened(20, b),
            allocated(30, a, "w1"),
        ]);
        let load = tracker.load(MODEL, 1, 100).projection;
        assert_eq!((load.active_sessions, load.waiting_sessions), (1, 1));
        assert_eq!((load.workers_ready, load.workers_starting), (1, 1));
        assert_eq!(load.arrivals_total, 2);
        tracker.apply(&at(
            200,
            Some(a),
            Event::WorkerReleased {
                worker: "w1".into(),
                epoch: 1,
                token: 1,
            },
        ));
        // A heartbeat sent before the release still names the session: it stays gone.
        tracker.apply(&heartbeat(210, "w1", &[(a, 5_000)]));
        let load = tracker.load(MODEL, 0, 300).projection;
        assert_eq!((load.active_sessions, load.waiting_sessions), (0, 1));
    }

    #[test]
    fn a_lost_workers_sessions_wait_again_and_the_worker_is_gone() {
        let a = Uuid::from_u128(1);
        let mut tracker = fold(&[
            registered(0, "w1"),
            opened(10, a),
            allocated(20, a, "w1"),
            at(
                500,
                None,
                Event::WorkerLost {
                    worker: "w1".into(),
                    reason: "killed".into(),
                    token: 1,
                },
            ),
        ]);
        let load = tracker.load(MODEL, 0, 600).projection;
        assert_eq!((load.active_sessions, load.waiting_sessions), (0, 1));
        assert_eq!(load.workers_ready, 0);
    }

    #[test]
    fn backlog_is_audio_appended_minus_audio_decoded() {
        let a = Uuid::from_u128(1);
        let mut events = vec![registered(0, "w1"), opened(0, a), allocated(0, a, "w1")];
        // 10 s of audio appended at once (an unpaced client), 4 s decoded.
        events.extend((0..10).map(|i| chunk(10, a, i, 1000)));
        events.push(heartbeat(1_000, "w1", &[(a, 4_000)]));
        let mut tracker = fold(&events);
        assert_eq!(tracker.load(MODEL, 0, 1_000).backlog_seconds, 6.0);
    }

    #[test]
    fn the_real_time_factor_is_measured_while_catching_up() {
        let a = Uuid::from_u128(1);
        let mut events = vec![registered(0, "w1"), opened(0, a), allocated(0, a, "w1")];
        events.extend((0..60).map(|i| chunk(10, a, i, 1000)));
        // 5 s of audio decoded per 1 s of wall time: RTF 0.2.
        events.extend((0..5).map(|i| heartbeat(1_000 * (i + 1), "w1", &[(a, 5_000 * (i + 1))])));
        let mut tracker = fold(&events);
        let rtf = tracker.load(MODEL, 0, 5_000).real_time_factor.unwrap();
        assert!((rtf - 0.2).abs() < 1e-9, "rtf {rtf}");
        // Live-paced audio (no backlog) does not count: the caller is the limit.
        let b = Uuid::from_u128(2);
        let mut live = fold(&[registered(0, "w1"), opened(0, b), allocated(0, b, "w1")]);
        for i in 1..=5 {
            live.apply(&chunk(i * 1_000, b, i, 1000));
            live.apply(&heartbeat(i * 1_000, "w1", &[(b, i * 1_000)]));
        }
        assert_eq!(live.load(MODEL, 0, 5_000).real_time_factor, None);
    }

    #[test]
    fn arrival_rate_counts_the_last_minute() {
        let events: Vec<Envelope> = (0..30)
            .map(|i| opened(i * 4_000, Uuid::from_u128(u128::from(i) + 1)))
            .collect();
        let mut tracker = fold(&events);
        // Arrivals at 0, 4, …, 116 s; at 120 s the last minute holds 60..116: 15.
        assert_eq!(tracker.load(MODEL, 0, 120_000).arrivals_per_minute, 15.0);
        assert_eq!(
            tracker.load(MODEL, 0, 120_000).projection.arrivals_total,
            30
        );
    }

    #[test]
    fn workers_are_idle_busy_or_draining_and_silent_ones_drop_out() {
        let a = Uuid::from_u128(1);
        let mut tracker = fold(&[
            registered(0, "w1"),
            registered(0, "w2"),
            registered(0, "w3"),
            opened(0, a),
            allocated(0, a, "w1"),
            at(
                0,
                None,
                Event::WorkerDraining {
                    worker: "w3".into(),
                    draining: true,
                    token: 1,
                },
            ),
            heartbeat(1_000, "w1", &[(a, 0)]),
            heartbeat(1_000, "w2", &[]),
        ]);
        let load = tracker.load(MODEL, 0, 1_500);
        assert_eq!((load.workers_busy, load.workers_idle), (1, 1));
        assert_eq!(load.projection.workers_draining, 1);
        // w3 has been silent for more than 2 s by 2 001 ms.
        let load = tracker.load(MODEL, 0, 2_001);
        assert_eq!(load.projection.workers_draining, 0);
        let views = tracker.worker_views(MODEL, 1_500);
        assert_eq!(
            views
                .iter()
                .map(|v| (v.id.as_str(), v.assigned, v.draining))
                .collect::<Vec<_>>(),
            [("w1", 1, false), ("w2", 0, false), ("w3", 0, true)]
        );
    }

    #[test]
    fn a_deposed_leaders_late_events_do_not_count() {
        let a = Uuid::from_u128(1);
        let mut tracker = fold(&[
            opened(0, a),
            at(
                0,
                None,
                Event::LeaderElected {
                    replica: "o2".into(),
                    token: 2,
                },
            ),
            // Token 1: written by the old leader after the new one took over.
            allocated(10, a, "w1"),
        ]);
        let load = tracker.load(MODEL, 0, 100).projection;
        assert_eq!((load.active_sessions, load.waiting_sessions), (0, 1));
    }

    #[test]
    fn sessions_older_than_the_window_appear_through_heartbeats() {
        let a = Uuid::from_u128(1);
        let mut tracker = fold(&[heartbeat(0, "w1", &[(a, 30_000)])]);
        let load = tracker.load(MODEL, 0, 100).projection;
        assert_eq!((load.active_sessions, load.workers_ready), (1, 1));
        assert_eq!(load.arrivals_total, 0);
    }
}
