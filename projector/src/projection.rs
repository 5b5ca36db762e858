//! The projection as pure values: events in log order, per stream, become row writes.
//!
//! Each kind of stream has its own fold and writes its own tables, so streams are
//! projected independently, each in transactions with its own offset. What a fold
//! remembers across events is restorable from the tables it writes (a session's result
//! filter) or from its offset row (the control stream's highest fencing token), so a
//! restarted projector continues exactly where the last commit left it.

use std::collections::HashMap;

use bytes::Bytes;
use eventlog::control::ControlFilter;
use eventlog::results::{ResultFilter, Verdict};
use eventlog::{AudioFormat, Envelope, Event, SessionId};

/// Which fold a stream goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Audio,
    Results,
    Control,
    Heartbeats,
}

/// One row change. The store carries them out in order, in the batch's transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// A `sessions` row, and a session opened in `model_load`.
    Opened {
        session: SessionId,
        tenant: String,
        model: String,
        format: AudioFormat,
        at_ms: u64,
    },
    /// An `audio_chunks` row unless the session already has this `seq` (the first copy
    /// counts); when stored, the session's chunk and sample counts and its model's
    /// audio seconds grow.
    Chunk {
        session: SessionId,
        seq: u64,
        offset: u64,
        at_ms: u64,
        pcm: Bytes,
    },
    /// The session's input ended (end of stream, or closed with a reason); the first
    /// end counts.
    Ended {
        session: SessionId,
        at_ms: u64,
        reason: Option<String>,
    },
    Resumed {
        session: SessionId,
    },
    /// An accepted `EpochStarted`: the session's current epoch and worker.
    EpochStarted {
        session: SessionId,
        epoch: u64,
        worker: String,
        at_ms: u64,
    },
    /// An accepted final.
    Final {
        session: SessionId,
        segment: u32,
        text: String,
        start_ms: u64,
        end_ms: u64,
        epoch: u64,
        worker: String,
        at_ms: u64,
    },
    Completed {
        session: SessionId,
        at_ms: u64,
        segments: u32,
        transcript: String,
    },
    /// A session queued for a worker of `model`, in `model_load`.
    Queued {
        model: String,
        at_ms: u64,
    },
    /// How far a session is decoded, as its worker's heartbeat at `at_ms` says (the
    /// latest per minute counts).
    Progress {
        session: SessionId,
        at_ms: u64,
        decoded_ms: u64,
    },
    /// The event in the raw history (`session_events`).
    History {
        offset: u64,
        session: Option<SessionId>,
        at_ms: u64,
        producer: String,
        kind: String,
        accepted: bool,
        event: serde_json::Value,
    },
}

/// What the results fold needs of a session it has not seen since it started: the
/// accepted state as the tables hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredResults {
    pub epoch: Option<(u64, String)>,
    pub finals: Vec<(u32, String, u64, u64)>,
    pub completed: Option<u32>,
}

/// A session's results as the fold keeps them.
#[derive(Clone, Debug, Default)]
pub struct SessionResults {
    filter: ResultFilter,
    worker: String,
}

impl SessionResults {
    /// Rebuilds the fold's state from the tables, by replaying what they hold.
    pub fn restore(stored: &StoredResults) -> Self {
        let mut results = Self::default();
        if let Some((epoch, worker)) = &stored.epoch {
            results.filter.accept(&Event::EpochStarted {
                epoch: *epoch,
                worker: worker.clone(),
            });
            results.worker = worker.clone();
            for (segment, text, start_ms, end_ms) in &stored.finals {
                results.filter.accept(&Event::Final {
                    epoch: *epoch,
                    segment: *segment,
                    text: text.clone(),
                    start_ms: *start_ms,
                    end_ms: *end_ms,
                });
            }
            if let Some(segments) = stored.completed {
                results.filter.accept(&Event::TranscriptCompleted {
                    epoch: *epoch,
                    segments,
                });
            }
        }
        results
    }
}

/// The stream's fold. `sessions` (results) must hold every session an event names;
/// [`Fold::needs`] tells which ones to restore first.
pub enum Fold {
    Audio,
    Results {
        sessions: HashMap<SessionId, SessionResults>,
    },
    Control {
        filter: ControlFilter,
    },
    /// Heartbeats are fenced like control events, and only their sessions' progress is
    /// kept (not each heartbeat: five a second per worker).
    Heartbeats {
        filter: ControlFilter,
    },
}

impl Fold {
    pub fn new(kind: StreamKind, highest_token: Option<u64>) -> Self {
        match kind {
            StreamKind::Audio => Fold::Audio,
            StreamKind::Results => Fold::Results {
                sessions: HashMap::new(),
            },
            StreamKind::Control => Fold::Control {
                filter: ControlFilter::starting_at(highest_token),
            },
            StreamKind::Heartbeats => Fold::Heartbeats {
                filter: ControlFilter::starting_at(highest_token),
            },
        }
    }

    /// Sessions of `events` whose results state must be restored before folding them.
    pub fn needs(&self, events: &[(u64, Envelope)]) -> Vec<SessionId> {
        let Fold::Results { sessions } = self else {
            return Vec::new();
        };
        let mut needed: Vec<SessionId> = events
            .iter()
            .filter_map(|(_, e)| e.session)
            .filter(|s| !sessions.contains_key(s))
            .collect();
        needed.sort();
        needed.dedup();
        needed
    }

    /// Adds a restored session (see [`Fold::needs`]).
    pub fn restore(&mut self, session: SessionId, stored: &StoredResults) {
        if let Fold::Results { sessions } = self {
            sessions.insert(session, SessionResults::restore(stored));
        }
    }

    /// The highest fencing token of the control fold, for its offset row.
    pub fn highest_token(&self) -> Option<u64> {
        match self {
            Fold::Control { filter } | Fold::Heartbeats { filter } => filter.highest_token(),
            _ => None,
        }
    }

    /// The writes of one event at `offset`.
    pub fn apply(&mut self, offset: u64, envelope: &Envelope) -> Vec<Write> {
        let (session, at_ms, event) = (envelope.session, envelope.at_ms, &envelope.event);
        let mut writes = Vec::new();
        let accepted = match self {
            Fold::Audio => {
                let Some(session) = session else {
                    return writes;
                };
                match event {
                    Event::SessionOpened {
                        tenant,
                        model,
                        format,
                    } => writes.push(Write::Opened {
                        session,
                        tenant: tenant.clone(),
                        model: model.clone(),
                        format: *format,
                        at_ms,
                    }),
                    Event::AudioChunk(chunk) => {
                        writes.push(Write::Chunk {
                            session,
                            seq: chunk.seq,
                            offset,
                            at_ms,
                            pcm: chunk.bytes.clone(),
                        });
                        // Chunks are the archive, not the history.
                        return writes;
                    }
                    Event::EndOfStream { .. } => writes.push(Write::Ended {
                        session,
                        at_ms,
                        reason: None,
                    }),
                    Event::SessionClosed { reason } => writes.push(Write::Ended {
                        session,
                        at_ms,
                        reason: Some(reason.clone()),
                    }),
                    Event::SessionResumed { .. } => writes.push(Write::Resumed { session }),
                    _ => {}
                }
                true
            }
            Fold::Results { sessions } => {
                let Some(session) = session else {
                    return writes;
                };
                let results = sessions.entry(session).or_default();
                let accepted = results.filter.accept(event) == Verdict::Accepted;
                if accepted {
                    match event {
                        Event::EpochStarted { epoch, worker } => {
                            results.worker = worker.clone();
                            writes.push(Write::EpochStarted {
                                session,
                                epoch: *epoch,
                                worker: worker.clone(),
                                at_ms,
                            });
                        }
                        Event::Final {
                            epoch,
                            segment,
                            text,
                            start_ms,
                            end_ms,
                        } => writes.push(Write::Final {
                            session,
                            segment: *segment,
                            text: text.clone(),
                            start_ms: *start_ms,
                            end_ms: *end_ms,
                            epoch: *epoch,
                            worker: results.worker.clone(),
                            at_ms,
                        }),
                        Event::TranscriptCompleted { segments, .. } => {
                            writes.push(Write::Completed {
                                session,
                                at_ms,
                                segments: *segments,
                                transcript: results.filter.transcript(),
                            })
                        }
                        _ => {}
                    }
                }
                accepted
            }
            Fold::Heartbeats { filter } => {
                if let (true, Event::Heartbeat { sessions, .. }) = (filter.accept(event), event) {
                    writes.extend(sessions.iter().map(|load| Write::Progress {
                        session: load.session,
                        at_ms,
                        decoded_ms: load.decoded_ms,
                    }));
                }
                return writes;
            }
            Fold::Control { filter } => {
                let accepted = filter.accept(event);
                if let (true, Event::SessionQueued { model, .. }) = (accepted, event) {
                    writes.push(Write::Queued {
                        model: model.clone(),
                        at_ms,
                    });
                }
                accepted
            }
        };
        // Chunks returned above: every event here serialises, and its `type` names it.
        let json = serde_json::to_value(event).unwrap_or(serde_json::Value::Null);
        let kind = json["type"].as_str().unwrap_or("unknown").to_string();
        writes.push(Write::History {
            offset,
            session,
            at_ms,
            producer: envelope.producer.clone(),
            kind,
            accepted,
            event: json,
        });
        writes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventlog::AudioEncoding;
    use eventlog::events::AudioChunk;
    use uuid::Uuid;

    fn envelope(session: SessionId, event: Event) -> Envelope {
        Envelope {
            session: Some(session),
            at_ms: 1_000,
            producer: "p".into(),
            event,
        }
    }

    fn fin(epoch: u64, segment: u32, text: &str) -> Event {
        Event::Final {
            epoch,
            segment,
            text: text.into(),
            start_ms: 0,
            end_ms: 10,
        }
    }

    #[test]
    fn audio_events_become_session_rows_chunks_and_history() {
        let s = Uuid::new_v4();
        let mut fold = Fold::new(StreamKind::Audio, None);
        let format = AudioFormat {
            sample_rate: 16_000,
            encoding: AudioEncoding::PcmS16le,
        };
        let opened = fold.apply(
            0,
            &envelope(
                s,
                Event::SessionOpened {
                    tenant: "t".into(),
                    model: "m".into(),
                    format,
                },
            ),
        );
        assert!(
            matches!(&opened[..], [Write::Opened { .. }, Write::History { kind, accepted: true, .. }] if kind == "session_opened")
        );
        let chunk = fold.apply(
            1,
            &envelope(
                s,
                Event::AudioChunk(AudioChunk {
                    seq: 0,
                    bytes: Bytes::from_static(&[1, 0]),
                }),
            ),
        );
        assert!(matches!(
            &chunk[..],
            [Write::Chunk {
                seq: 0,
                offset: 1,
                ..
            }]
        ));
        let closed = fold.apply(
            2,
            &envelope(
                s,
                Event::SessionClosed {
                    reason: "bad_sequence".into(),
                },
            ),
        );
        assert!(matches!(&closed[0], Write::Ended { reason: Some(r), .. } if r == "bad_sequence"));
    }

    #[test]
    fn results_go_through_the_acceptance_rule_and_survive_a_restore() {
        let s = Uuid::new_v4();
        let mut fold = Fold::new(StreamKind::Results, None);
        let started = Event::EpochStarted {
            epoch: 1,
            worker: "w1".into(),
        };
        assert_eq!(fold.needs(&[(0, envelope(s, started.clone()))]), vec![s]);
        let w = fold.apply(0, &envelope(s, started));
        assert!(matches!(&w[0], Write::EpochStarted { epoch: 1, .. }));
        let w = fold.apply(1, &envelope(s, fin(1, 0, "hello")));
        assert!(matches!(&w[0], Write::Final { segment: 0, worker, .. } if worker == "w1"));
        let w = fold.apply(2, &envelope(s, fin(1, 0, "again")));
        assert!(matches!(
            &w[..],
            [Write::History {
                accepted: false,
                ..
            }]
        ));

        // A restarted projector restores the session from its rows and judges alike.
        let mut restarted = Fold::new(StreamKind::Results, None);
        restarted.restore(
            s,
            &StoredResults {
                epoch: Some((1, "w1".into())),
                finals: vec![(0, "hello".into(), 0, 10)],
                completed: None,
            },
        );
        assert!(
            restarted
                .needs(&[(3, envelope(s, fin(1, 1, "x")))])
                .is_empty()
        );
        let w = restarted.apply(3, &envelope(s, fin(1, 0, "again")));
        assert!(matches!(
            &w[..],
            [Write::History {
                accepted: false,
                ..
            }]
        ));
        let w = restarted.apply(4, &envelope(s, fin(0, 1, "zombie")));
        assert!(matches!(
            &w[..],
            [Write::History {
                accepted: false,
                ..
            }]
        ));
        let w = restarted.apply(
            5,
            &envelope(
                s,
                Event::TranscriptCompleted {
                    epoch: 1,
                    segments: 1,
                },
            ),
        );
        assert!(matches!(&w[0], Write::Completed { transcript, .. } if transcript == "hello"));
    }

    #[test]
    fn heartbeats_give_progress_and_nothing_else() {
        let s = Uuid::new_v4();
        let beat = |token, decoded_ms| Envelope {
            session: None,
            at_ms: 60_000,
            producer: "o".into(),
            event: Event::Heartbeat {
                worker: "w".into(),
                model: "m".into(),
                capacity: 1,
                sessions: vec![eventlog::events::SessionLoad {
                    session: s,
                    epoch: 1,
                    decoded_ms,
                }],
                token,
            },
        };
        let mut fold = Fold::new(StreamKind::Heartbeats, Some(3));
        assert!(fold.apply(0, &beat(2, 9)).is_empty(), "a deposed leader's");
        assert_eq!(
            fold.apply(1, &beat(3, 1_500)),
            vec![Write::Progress {
                session: s,
                at_ms: 60_000,
                decoded_ms: 1_500
            }]
        );
    }

    #[test]
    fn a_deposed_leaders_control_events_are_recorded_but_not_counted() {
        let queued = |token| Envelope {
            session: Some(Uuid::nil()),
            at_ms: 0,
            producer: "o".into(),
            event: Event::SessionQueued {
                model: "m".into(),
                position: 1,
                token,
            },
        };
        let mut fold = Fold::new(StreamKind::Control, Some(5));
        assert!(matches!(
            &fold.apply(0, &queued(4))[..],
            [Write::History {
                accepted: false,
                ..
            }]
        ));
        assert!(matches!(
            &fold.apply(1, &queued(5))[..],
            [Write::Queued { .. }, Write::History { accepted: true, .. }]
        ));
        assert_eq!(fold.highest_token(), Some(5));
    }
}
