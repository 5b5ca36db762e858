//! `asr-bench failover --kills 50`: the failover gap when the recognizer serving a
//! live session is SIGKILLed inside speech.
//!
//! Three recognizers run (one serving, two idle); sessions stream a 21 s conversation
//! at real-time pace, and each session's current worker is SIGKILLed at seeded random
//! positions inside its speech, several times per session, the positions reached by
//! the audio the client has had acknowledged ([`testkit::failover::Killer`], as in
//! `tests/failover.rs`: capacity comes back in the background, a restarted process
//! under the killed id or a new worker, alternately, right after the kill or, with
//! `--respawn after-catch-up`, once the replacement has caught up). One failover at a
//! time: a kill waits until the previous replacement has caught up. For each kill,
//! from the moment just before the SIGKILL:
//!
//! - the steps, from the streams' own timestamps: the worker declared lost and the
//!   session reassigned (control stream), the replacement's `EpochStarted` and its
//!   first result appended (results stream);
//! - **first result at the client**: the first partial or final the client receives
//!   after the kill that is one of the new epoch's results (matched by kind, segment,
//!   text and audio range against the results stream, which carries the epochs);
//! - **caught up**: the first heartbeat in which the replacement (the new epoch)
//!   reports the session decoded to the audio that had been acknowledged, so
//!   appended, at the kill (heartbeats carry each session's decoded position every
//!   interval, so this is late by up to one interval); when the session ends first,
//!   its `TranscriptCompleted`;
//! - the replay: audio between the checkpoint the replacement resumed from (read from
//!   Redis right after the kill) and the kill position.
//!
//! Every session's transcript is compared with the no-failure one.

use std::path::Path;
use std::time::Duration;

use eventlog::log::ReadFrom;
use eventlog::{Envelope, Event, now_ms};
use testkit::failover::{self, Heard, Kill, KillPositions, Killer, Reference, Step};
use testkit::system::{System, SystemConfig};

use crate::{HeartbeatSettings, SENTENCES, copy_logs, percentile};

/// When a killed recognizer's capacity comes back (a fresh process loading its model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Respawn {
    /// Right after the kill, as a supervisor restarts a dead child: its model load
    /// competes with the replacement's catching up for the two cores.
    AtKill,
    /// Once the replacement has caught up: the failover alone.
    AfterCatchUp,
}

#[derive(clap::Args)]
pub struct Args {
    /// SIGKILLs in all.
    #[arg(long, default_value_t = 50)]
    pub kills: usize,
    /// SIGKILLs per session, at most.
    #[arg(long, default_value_t = 4)]
    pub per_session: usize,
    /// Audio between two kills of a session, at least (ms).
    #[arg(long, default_value_t = 3000)]
    pub spacing_ms: u64,
    /// Seed of the kill positions (random when absent; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Streaming pace (1.0 = real time).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    #[command(flatten)]
    pub settings: HeartbeatSettings,
    /// When a killed recognizer's capacity comes back.
    #[arg(long, value_enum, default_value_t = Respawn::AtKill)]
    pub respawn: Respawn,
    /// Copy every process's log here before the system stops.
    #[arg(long)]
    pub logs: Option<std::path::PathBuf>,
}

/// Which figure of a [`Gap`] a table row shows.
type Figure = fn(&Gap) -> Option<f64>;

/// A result event's identity as the client sees it: final?, segment, text, range.
type Seen<'a> = (bool, u32, &'a str, u64, u64);

/// One kill, measured: milliseconds from just before the SIGKILL (`None`: did not
/// happen, for instance the replacement was killed first).
#[derive(Default)]
struct Gap {
    reaped: Option<f64>,
    lost: Option<f64>,
    reassigned: Option<f64>,
    started: Option<f64>,
    appended: Option<f64>,
    at_client: Option<f64>,
    first_is_final: bool,
    caught_up: Option<f64>,
    replay_ms: Option<f64>,
}

pub async fn run(bin: &Path, args: Args) -> anyhow::Result<()> {
    let mut kill_positions = KillPositions::new(args.seed);
    let seed = kill_positions.seed();
    eprintln!("synthesising speech…");
    let recording = testkit::speech::sentences(SENTENCES, 1200);
    let mut env = args.settings.env();
    env.push(("RUST_LOG".into(), "info".into()));
    let recognizers = 3;
    let mut system = System::start(
        bin,
        SystemConfig {
            recognizers,
            env,
            ..SystemConfig::default()
        },
    )
    .await;

    eprintln!("the conversation with no failure…");
    let (client, _watch) = failover::stream(&system, recording.clone(), args.speed);
    let baseline = client.await?;
    let reference = Reference::of(&baseline);
    // What the client gets with no failure: a result of the open segment every so often.
    let mut cadence = result_cadence(&baseline);
    anyhow::ensure!(
        !reference.finals.is_empty(),
        "the no-failure run has no finals"
    );
    eprintln!("reference: {:?}", reference.transcript);

    let cpu_before = crate::heartbeats::Cpu::sample(&system);
    let mut killer = match args.respawn {
        Respawn::AtKill => Killer::new(recognizers),
        Respawn::AfterCatchUp => Killer::deferred(recognizers),
    };
    let mut gaps: Vec<Gap> = Vec::new();
    let (mut sessions, mut changed) = (0, 0);
    while gaps.len() < args.kills {
        let positions =
            kill_positions.inside_speech(&reference.speech(), args.per_session, args.spacing_ms);
        let session_start_ms = now_ms();
        let (client, mut watch) = failover::stream(&system, recording.clone(), args.speed);
        let control = async {
            let mut progress = failover::Progress::follow(&system).await;
            let session = watch.session().await;
            let mut kills: Vec<(Kill, Option<u64>)> = Vec::new();
            let mut epoch = 0;
            for &ms in &positions {
                if gaps.len() + kills.len() >= args.kills {
                    break;
                }
                match killer
                    .kill_at(&mut system, &mut watch, session, epoch, ms)
                    .await
                {
                    Step::Killed(kill) => {
                        let checkpoint = failover::checkpoint(&system, session)
                            .await
                            .map(|c| c.point.session_sample * 1000 / 16_000);
                        eprintln!(
                            "kill {}/{}: {} (epoch {}) at {:.1} s of audio (unix ms {}, reaped after {} ms), checkpoint at {:.1} s",
                            gaps.len() + kills.len() + 1,
                            args.kills,
                            kill.worker,
                            kill.epoch,
                            kill.acked_ms as f64 / 1000.0,
                            kill.at_ms,
                            kill.reaped_after.as_millis(),
                            checkpoint.unwrap_or(0) as f64 / 1000.0
                        );
                        epoch = kill.epoch;
                        // One failover at a time: the next kill waits until this
                        // replacement has caught up (or the session ended).
                        let next = failover::holder(&system, session, kill.epoch).await;
                        if !next.done {
                            let within = Duration::from_secs(30);
                            progress
                                .decoded_to(session, next.epoch, kill.acked_ms, within)
                                .await;
                        }
                        if args.respawn == Respawn::AfterCatchUp {
                            killer.bring_back(&mut system).await;
                        }
                        kills.push((kill, checkpoint));
                    }
                    Step::Finished(_) => break,
                }
            }
            progress.close().await;
            (session, kills, watch)
        };
        let (outcome, (session, kills, mut watch)) = tokio::join!(client, control);
        let outcome = outcome?;
        watch.finish().await;
        sessions += 1;
        if let Some(differences) = reference.differences(&outcome) {
            changed += 1;
            eprintln!("session {session}: transcript changed: {differences}");
        }

        let results = failover::session_results(
            &system,
            session,
            Duration::from_millis(500),
            failover::completed,
        )
        .await;
        let since = ReadFrom::Timestamp(session_start_ms.saturating_sub(2_000));
        let until = now_ms();
        let heartbeats = failover::read_stream(
            &system.layout.heartbeat_stream(),
            None,
            since,
            Duration::ZERO,
            |events| events.last().is_some_and(|e| e.at_ms > until),
        )
        .await;
        let control = failover::read_stream(
            &system.layout.control_stream(),
            None,
            since,
            Duration::from_secs(1),
            |_| true,
        )
        .await;
        for (kill, checkpoint) in &kills {
            let gap = measure(
                kill,
                *checkpoint,
                session,
                &results,
                &heartbeats,
                &control,
                &watch.results,
            );
            eprintln!(
                "  {} epoch {} at {:.1} s: lost {}, reassigned {}, started {}, first result appended {}, at the client {} ({}), caught up {}",
                kill.worker,
                kill.epoch,
                kill.acked_ms as f64 / 1000.0,
                ms(gap.lost),
                ms(gap.reassigned),
                ms(gap.started),
                ms(gap.appended),
                ms(gap.at_client),
                if gap.first_is_final {
                    "final"
                } else {
                    "partial"
                },
                ms(gap.caught_up),
            );
            gaps.push(gap);
        }
    }
    let busy = crate::heartbeats::Cpu::sample(&system).machine_busy_percent(&cpu_before);
    if let Some(dir) = &args.logs {
        copy_logs(&system, dir)?;
    }
    system.stop().await;

    println!(
        "{} SIGKILLs of the serving recognizer inside speech over {sessions} sessions at speed {} (seed {seed}), {}, capacity back {:?}; transcript unchanged in {}/{sessions} sessions; the machine was {busy:.0} % busy",
        gaps.len(),
        args.speed,
        args.settings,
        args.respawn,
        sessions - changed
    );
    println!();
    println!("| from SIGKILL to | n | p50 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---|---|---|---|");
    let rows: [(&str, Figure); 7] = [
        ("process reaped (its sockets closed)", |g| g.reaped),
        ("worker declared lost (control stream)", |g| g.lost),
        ("session reassigned, new epoch (control stream)", |g| {
            g.reassigned
        }),
        ("replacement's EpochStarted appended", |g| g.started),
        ("first result of the new epoch appended", |g| g.appended),
        ("**first result of the new epoch at the client**", |g| {
            g.at_client
        }),
        (
            "**replacement decoded to the audio appended at the kill** (heartbeat)",
            |g| g.caught_up,
        ),
    ];
    for (name, get) in rows {
        let mut values: Vec<f64> = gaps.iter().filter_map(get).collect();
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.0} |",
            values.len(),
            percentile(&mut values, 50.0),
            percentile(&mut values, 99.0),
            values.iter().copied().fold(f64::NAN, f64::max),
        );
    }
    let mut replay: Vec<f64> = gaps.iter().filter_map(|g| g.replay_ms).collect();
    println!(
        "| (audio replayed: kill position − checkpoint, ms of audio) | {} | {:.0} | {:.0} | {:.0} |",
        replay.len(),
        percentile(&mut replay, 50.0),
        percentile(&mut replay, 99.0),
        replay.iter().copied().fold(f64::NAN, f64::max),
    );
    println!(
        "| (no failure: between two results of one segment at the client) | {} | {:.0} | {:.0} | {:.0} |",
        cadence.len(),
        percentile(&mut cadence, 50.0),
        percentile(&mut cadence, 99.0),
        cadence.iter().copied().fold(f64::NAN, f64::max),
    );
    let finals = gaps
        .iter()
        .filter(|g| g.at_client.is_some() && g.first_is_final)
        .count();
    println!();
    println!(
        "the first new-epoch result at the client was a final {finals} times, a partial {} times",
        gaps.iter().filter(|g| g.at_client.is_some()).count() - finals
    );
    Ok(())
}

/// Milliseconds between consecutive results (partials, then the final) of the same
/// segment, as the client received them.
fn result_cadence(outcome: &client::Outcome) -> Vec<f64> {
    let mut results: Vec<&client::Observed> =
        outcome.partials.iter().chain(&outcome.finals).collect();
    results.sort_by_key(|r| r.at);
    results
        .windows(2)
        .filter(|w| w[0].segment.segment == w[1].segment.segment)
        .map(|w| (w[1].at - w[0].at).as_secs_f64() * 1000.0)
        .collect()
}

fn ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("+{v:.0} ms"))
}

fn measure(
    kill: &Kill,
    checkpoint: Option<u64>,
    session: uuid::Uuid,
    results: &[Envelope],
    heartbeats: &[Envelope],
    control: &[Envelope],
    heard: &[Heard],
) -> Gap {
    let since = |at_ms: u64| Some(at_ms.saturating_sub(kill.at_ms) as f64);
    let epoch = results
        .iter()
        .filter_map(|e| match e.event {
            Event::EpochStarted { epoch, .. } if epoch > kill.epoch => Some(epoch),
            _ => None,
        })
        .min();
    let mut gap = Gap {
        reaped: Some(kill.reaped_after.as_secs_f64() * 1000.0),
        // No checkpoint yet: the replacement replays from the session's start.
        replay_ms: Some(kill.acked_ms.saturating_sub(checkpoint.unwrap_or(0)) as f64),
        ..Gap::default()
    };
    gap.lost = control
        .iter()
        .find(|e| {
            e.at_ms + 5 >= kill.at_ms
                && matches!(&e.event, Event::WorkerLost { worker, .. } if *worker == kill.worker)
        })
        .and_then(|e| since(e.at_ms));
    let Some(epoch) = epoch else {
        return gap;
    };
    gap.reassigned = control
        .iter()
        .find(|e| {
            e.session == Some(session)
                && matches!(e.event, Event::WorkerAllocated { epoch: a, .. } if a == epoch)
        })
        .and_then(|e| since(e.at_ms));
    gap.started = results
        .iter()
        .find(|e| matches!(e.event, Event::EpochStarted { epoch: a, .. } if a == epoch))
        .and_then(|e| since(e.at_ms));
    // The new epoch's results, as (is final, segment, text, start, end).
    let new_results: Vec<(&Envelope, Seen)> = results
        .iter()
        .filter_map(|e| match &e.event {
            Event::Partial {
                epoch: a,
                segment,
                text,
                start_ms,
                end_ms,
            } if *a == epoch => Some((e, (false, *segment, text.as_str(), *start_ms, *end_ms))),
            Event::Final {
                epoch: a,
                segment,
                text,
                start_ms,
                end_ms,
            } if *a == epoch => Some((e, (true, *segment, text.as_str(), *start_ms, *end_ms))),
            _ => None,
        })
        .collect();
    gap.appended = new_results.first().and_then(|(e, _)| since(e.at_ms));
    if let Some(h) = heard.iter().find(|h| {
        h.at > kill.at
            && new_results.iter().any(|(_, r)| {
                *r == (
                    h.is_final,
                    h.segment.segment,
                    h.segment.text.as_str(),
                    h.segment.start_ms,
                    h.segment.end_ms,
                )
            })
    }) {
        gap.at_client = Some((h.at - kill.at).as_secs_f64() * 1000.0);
        gap.first_is_final = h.is_final;
    }
    let decoded = heartbeats
        .iter()
        .find(|e| match &e.event {
            Event::Heartbeat { sessions, .. } => sessions
                .iter()
                .any(|s| s.session == session && s.epoch == epoch && s.decoded_ms >= kill.acked_ms),
            _ => false,
        })
        .map(|e| e.at_ms);
    let completed = results
        .iter()
        .find(|e| matches!(e.event, Event::TranscriptCompleted { epoch: a, .. } if a == epoch))
        .map(|e| e.at_ms);
    gap.caught_up = match (decoded, completed) {
        (Some(a), Some(b)) => since(a.min(b)),
        (a, b) => a.or(b).and_then(since),
    };
    gap
}
