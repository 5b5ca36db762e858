//! Recognizer failover with real processes and SIGKILL (ARCHITECTURE.md invariants 2, 4
//! and 6; issue 3): a recognizer dies in the middle of a caller's conversation, another
//! takes over from the checkpoint under a new epoch, and the client's transcript is
//! word for word the one of the same audio with no failure, every segment index once.
//!
//! Kill moments are fixed by the audio, never by guessed sleeps: either the recognizer
//! stops itself at a named failpoint (built with `--features asr/failpoints`, as
//! `deploy/test.sh` does; without it those tests are ignored; armed through
//! `FAILPOINTS`) and the test SIGKILLs it once its log says it got there, or
//! the test SIGKILLs the session's current worker when the client's acknowledged audio
//! reaches a position drawn from a seeded RNG (`ASR_TEST_SEED` replays a run).
//!
//! A zombie too: the serving worker SIGSTOPped mid-sentence past the orchestrator's
//! heartbeat timeout, woken once its session moved, checked from the results stream.
//! The session-driving helpers are shared with `asr-bench failover`
//! (`testkit::failover`).

use std::path::Path;
use std::time::Duration;

use client::{ClientError, Outcome, Recording};
use testkit::failover::{
    self, Holder, KillPositions, Killer, Reference, STEP_TIMEOUT, Step, Watch, holder,
};
use testkit::system::{System, SystemConfig};
use testkit::wer::word_error_rate;
use tokio::sync::OnceCell;

const SENTENCES: [&str; 3] = [
    "there is a fire in the kitchen and the smoke is getting thicker",
    "please send an ambulance to the main street",
    "my father fell down the stairs and he cannot move his leg",
];
const GAP_MS: u32 = 1200;
/// tiny.en on espeak-ng's voice is imperfect; the issue sets this bound.
const MAX_WER: f64 = 0.35;
/// Faster than real time keeps the suite short; the recognizer keeps up at this pace.
const SPEED: f64 = 3.0;

fn asr() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_asr"))
}

fn recording() -> Recording {
    testkit::speech::sentences(&SENTENCES, GAP_MS)
}

static REFERENCE: OnceCell<Reference> = OnceCell::const_new();

/// The conversation's transcript with no failure, decoded once per test binary by
/// whichever test needs it first, on that test's system (same binary, same model:
/// decoding is deterministic).
async fn reference(system: &System) -> &'static Reference {
    REFERENCE
        .get_or_init(|| reference_of(system, recording(), "16 kHz pcm_s16le"))
        .await
}

/// Starts streaming the conversation at [`SPEED`].
/// `recording`'s transcript with no failure, decoded by `system`.
async fn reference_of(system: &System, recording: Recording, what: &str) -> Reference {
    let (client, _watch) = failover::stream(system, recording, SPEED);
    let reference = Reference::of(&expect_completed(system, client.await));
    println!("reference transcript ({what}): {:?}", reference.transcript);
    reference
}

/// A system with one idle recognizer, `recognizer-2`, on which the reference is decoded
/// before [`arm`] adds the recognizer under test.
async fn system_with_spare() -> System {
    let mut system = System::start(
        asr(),
        SystemConfig {
            recognizers: 0,
            ..SystemConfig::default()
        },
    )
    .await;
    system.start_recognizer("recognizer-2").await;
    system
}

/// Starts `recognizer-1` armed with `failpoints`: both idle, the allocator takes the
/// smallest worker id, so it serves the next session.
async fn arm(system: &mut System, failpoints: &str) {
    system
        .start_recognizer_with("recognizer-1", &[("FAILPOINTS", failpoints)])
        .await;
}

fn stream(
    system: &System,
) -> (
    impl Future<Output = Result<Outcome, ClientError>> + use<>,
    Watch,
) {
    failover::stream(system, recording(), SPEED)
}

fn expect_completed(system: &System, result: Result<Outcome, ClientError>) -> Outcome {
    match result {
        Ok(outcome) => outcome,
        Err(e) => panic!("session failed: {e}\n{}", system.all_logs()),
    }
}

/// Waits until the role's log says it stopped at `point`.
async fn stopped_at(system: &System, role: &str, point: &str) {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !system
        .log_of(role)
        .lines()
        .any(|l| l.contains("failpoint reached") && l.contains(point))
    {
        assert!(
            system.pid_of(role).is_some() && tokio::time::Instant::now() < deadline,
            "{role} never stopped at {point}\n{}",
            system.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The failover guarantees ([`Reference::differences`]), with every log when broken.
fn assert_unchanged(system: &System, outcome: &Outcome, reference: &Reference, what: &str) {
    if let Some(differences) = reference.differences(outcome) {
        panic!("{what}: {differences}\n{}", system.all_logs());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn baseline_transcript_without_failure() {
    let _serial = testkit::serial::heavy();
    let system = System::start(asr(), SystemConfig::default()).await;
    let reference = reference(&system).await;
    let wer = word_error_rate(&SENTENCES.join(" "), &reference.transcript);
    println!("baseline WER {wer:.2}: {:?}", reference.transcript);
    assert!(!reference.transcript.trim().is_empty());
    assert!(wer <= MAX_WER, "WER {wer:.2} > {MAX_WER}");
    assert_eq!(
        reference.finals.len(),
        SENTENCES.len(),
        "a segment per sentence: {:?}",
        reference.finals
    );
    // The same audio again gives the same transcript: what the failover tests rely on.
    let (client, _watch) = stream(&system);
    let again = expect_completed(&system, client.await);
    assert_unchanged(&system, &again, reference, "a second run with no failure");
    system.stop().await;
}

/// Runs the conversation on a recognizer armed with `FAILPOINTS=<point>=<actions>`,
/// SIGKILLs it once it stopped there, and checks the transcript; returns how many
/// finals the killed worker had appended.
async fn killed_at_failpoint(point: &str, actions: &str) -> usize {
    killed_at_failpoint_in(point, actions, None).await
}

/// [`killed_at_failpoint`] with the conversation sent in `format` (16 kHz
/// `pcm_s16le` when `None`), against the no-failure transcript of the same audio.
async fn killed_at_failpoint_in(
    point: &str,
    actions: &str,
    format: Option<eventlog::AudioFormat>,
) -> usize {
    let mut system = system_with_spare().await;
    let (recording, in_format);
    let reference = match format {
        None => {
            recording = self::recording();
            reference(&system).await
        }
        Some(format) => {
            recording = testkit::speech::sentences_as(&SENTENCES, GAP_MS, format);
            let what = format!("{} Hz {}", format.sample_rate, format.encoding.name());
            in_format = reference_of(&system, recording.clone(), &what).await;
            &in_format
        }
    };
    arm(&mut system, &format!("{point}={actions}")).await;

    let (client, mut watch) = failover::stream(&system, recording, SPEED);
    let control = async {
        let session = watch.session().await;
        let Holder {
            worker: first,
            epoch,
            ..
        } = holder(&system, session, 0).await;
        assert_eq!(first, "recognizer-1", "the armed worker took the session");
        stopped_at(&system, "recognizer-1", point).await;
        let pid = system.pid_of("recognizer-1");
        system.kill("recognizer-1").await;
        // Where it stopped, from its own account: the finals it appended.
        let finals = system
            .log_of("recognizer-1")
            .lines()
            .filter(|l| l.contains("session: final "))
            .count();
        watch.drain();
        println!(
            "SIGKILLed recognizer-1 (pid {pid:?}, epoch {epoch}) at {point}: it had appended {finals} finals; the client had {} finals, {} frames acknowledged",
            watch.finals(),
            watch.acked
        );
        let Holder {
            worker: next,
            epoch: next_epoch,
            ..
        } = holder(&system, session, epoch).await;
        assert_eq!(next, "recognizer-2", "the idle worker took over");
        assert_eq!(next_epoch, epoch + 1);
        // Capacity back for whatever comes next.
        system.start_recognizer("recognizer-3").await;
        finals
    };
    let (result, finals) = tokio::join!(client, control);
    let outcome = expect_completed(&system, result);
    assert_unchanged(
        &system,
        &outcome,
        reference,
        &format!("killed at {point} ({actions})"),
    );
    system.stop().await;
    finals
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features asr/failpoints"
)]
async fn killed_after_a_final_before_its_checkpoint() {
    let _serial = testkit::serial::heavy();
    // The second final is in the log, its checkpoint is not: the replacement decodes
    // segment 1 again from the checkpoint after segment 0, and the filter keeps one.
    let finals =
        killed_at_failpoint("recognizer::after_final_before_checkpoint", "1*off->return").await;
    assert_eq!(finals, 2, "stopped after the second final");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features asr/failpoints"
)]
async fn killed_in_the_middle_of_a_segment() {
    let _serial = testkit::serial::heavy();
    // The point is reached once per chunk (100 ms) inside speech: the first sentence
    // takes about 55 of them, so the 71st is in the middle of the second sentence.
    let finals = killed_at_failpoint("recognizer::mid_segment", "70*off->return").await;
    assert_eq!(finals, 1, "stopped inside the second segment");
}

/// Invariant 6 through the sample-rate conversion: a replacement resumes at a replay
/// point of 48 kHz and of 8 kHz float audio (client samples, mapped from the model's
/// 16 kHz) and the transcript equals the no-failure one of the same audio.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features asr/failpoints"
)]
async fn killed_in_the_middle_of_a_segment_at_48_and_8_khz() {
    use eventlog::{AudioEncoding, AudioFormat};
    let _serial = testkit::serial::heavy();
    for (sample_rate, encoding) in [
        (48_000, AudioEncoding::PcmS16le),
        (8_000, AudioEncoding::PcmF32le),
    ] {
        let format = AudioFormat {
            sample_rate,
            encoding,
        };
        let finals =
            killed_at_failpoint_in("recognizer::mid_segment", "70*off->return", Some(format)).await;
        assert_eq!(
            finals, 1,
            "{sample_rate} Hz: stopped inside the second segment"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features asr/failpoints"
)]
async fn killed_right_after_a_checkpoint() {
    let _serial = testkit::serial::heavy();
    let finals = killed_at_failpoint("recognizer::after_checkpoint", "1*off->return").await;
    assert_eq!(finals, 2, "stopped after the second checkpoint");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features asr/failpoints"
)]
async fn killed_while_handling_end_of_stream() {
    let _serial = testkit::serial::heavy();
    // At the end of stream the last segment is still open: its final comes from the
    // replacement's flush.
    let finals = killed_at_failpoint("recognizer::end_of_stream", "return").await;
    assert!(finals <= SENTENCES.len(), "{finals} finals");
}

/// Sessions of the random test, and kills in each.
const RANDOM_SESSIONS: usize = 6;
const KILLS_PER_SESSION: usize = 4;
/// Audio between two kills of a session, at least: the replacement gets going.
const MIN_KILL_SPACING_MS: u64 = 1500;

#[tokio::test(flavor = "multi_thread")]
async fn killed_at_random_moments_inside_speech() {
    let _serial = testkit::serial::heavy();
    let mut positions = KillPositions::new(
        std::env::var("ASR_TEST_SEED")
            .ok()
            .map(|s| s.parse::<u64>().expect("ASR_TEST_SEED is a u64")),
    );
    let seed = positions.seed();
    println!("random kills: seed {seed} (ASR_TEST_SEED={seed} repeats this run)");

    let mut system = System::start(
        asr(),
        SystemConfig {
            // One serving, two idle: a model loads in seconds, so a killed worker's
            // successor comes up in the background while an idle one takes over.
            recognizers: 3,
            ..SystemConfig::default()
        },
    )
    .await;
    let reference = reference(&system).await;
    let mut killer = Killer::new(3);
    let mut kills = 0;
    for round in 0..RANDOM_SESSIONS {
        let positions =
            positions.inside_speech(&reference.speech(), KILLS_PER_SESSION, MIN_KILL_SPACING_MS);
        let (client, mut watch) = stream(&system);
        let control = async {
            let session = watch.session().await;
            let mut epoch = 0;
            let mut log = Vec::new();
            for &ms in &positions {
                match killer
                    .kill_at(&mut system, &mut watch, session, epoch, ms)
                    .await
                {
                    Step::Killed(kill) => {
                        log.push(format!(
                            "{ms} ms: killed {} (epoch {}) with {} ms acknowledged, {} finals",
                            kill.worker, kill.epoch, kill.acked_ms, kill.finals_heard
                        ));
                        epoch = kill.epoch;
                    }
                    Step::Finished(h) => {
                        log.push(format!(
                            "{ms} ms: the session finished under {} (epoch {}) before this kill",
                            h.worker, h.epoch
                        ));
                        break;
                    }
                }
            }
            log
        };
        let (result, log) = tokio::join!(client, control);
        kills += log.iter().filter(|line| line.contains(": killed ")).count();
        println!("session {round}:\n  {}", log.join("\n  "));
        let outcome = expect_completed(&system, result);
        assert_unchanged(
            &system,
            &outcome,
            reference,
            &format!("seed {seed}, session {round}: {log:?}"),
        );
    }
    println!("{kills} random kills, transcript unchanged every time (seed {seed})");
    system.stop().await;
}

/// Zombie (invariant 4): the worker serving the session is SIGSTOPped in the middle of
/// a sentence and kept stopped until the orchestrator, hearing no heartbeat for its
/// timeout, has moved the session to the idle worker under a new epoch and the
/// replacement's `EpochStarted` is in the log; then it is woken with SIGCONT, with
/// the rest of its sentence waiting to be decoded and a final to append under its old
/// epoch. The client's transcript is unchanged, and from the session's results
/// stream, folded by the one acceptance rule (`ResultFilter`):
///
/// - every accepted result has the epoch of the latest `EpochStarted` before it (the
///   test tracks that epoch itself, not through the filter);
/// - everything of the zombie's epoch after the replacement's `EpochStarted` (what the
///   zombie appended after waking) is refused as stale;
/// - per segment, accepted results never go back from the replacement to the zombie,
///   nothing is accepted after the segment's final, and one final per index is
///   accepted, equal to the no-failure reference.
///
/// The zombie hears of its revoke late (the failpoint `recognizer::revoke`, as a
/// worker cut off from the orchestrator but not from the broker would): otherwise the
/// orchestrator's `Revoke`, waiting in its socket, stops the session task before its
/// decode finishes and the woken zombie appends nothing, which would leave the fence
/// untested. So it must append at least one stale event, and the test says so.
///
/// How it goes red (tried, never committed): with `ResultFilter` accepting any epoch up
/// to the latest, the zombie's results after the new `EpochStarted` are accepted and
/// the test fails. An orchestrator that did not expire a silent worker, or did not
/// bump the epoch, fails the wait for the new holder; a replacement that did not
/// resume from the checkpoint, or a lost or doubled final, fails the transcript
/// comparison.
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features asr/failpoints"
)]
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_worker_woken_after_its_session_moved_adds_nothing() {
    use eventlog::Event;
    use eventlog::log::ReadFrom;
    use eventlog::results::{Ignored, ResultFilter, Verdict};
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let _serial = testkit::serial::heavy();
    let mut system = system_with_spare().await;
    let reference = reference(&system).await;
    // The zombie-to-be hears of its revoke only 10 s late: woken, it decodes and
    // appends under its old epoch until its checkpoint is refused, so the fence in the
    // log is what keeps it out of the transcript.
    arm(&mut system, "recognizer::revoke=return(10000)").await;
    // Halfway through the second sentence, at real-time pace: the worker keeps up, so
    // the audio acknowledged to the client is about where its decoding is.
    let sentence = &reference.finals[1];
    let pause_ms = (sentence.start_ms + sentence.end_ms) / 2;
    let (client, mut watch) = failover::stream(&system, recording(), 1.0);
    let control = async {
        let mut progress = failover::Progress::follow(&system).await;
        let session = watch.session().await;
        watch
            .until("the pause position", |w| w.acked > pause_ms / 100)
            .await;
        let zombie = holder(&system, session, 0).await;
        assert!(!zombie.done, "the session finished before the pause");
        // The worker's decoding trails the acknowledged audio: wait until it says it
        // got there too.
        let decoded = progress
            .decoded_to(session, zombie.epoch, pause_ms, STEP_TIMEOUT)
            .await
            .expect("the worker decodes to the pause position");
        let pid = system.pid_of(&zombie.worker).expect("the holder runs");
        let pid = Pid::from_raw(pid as i32);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
        let stopped_at_ms = eventlog::now_ms();
        watch.drain();
        let (acked_ms, finals_heard) = (watch.acked * 100, watch.finals());
        let next = holder(&system, session, zombie.epoch).await;
        let moved_ms = eventlog::now_ms() - stopped_at_ms;
        assert_ne!(
            next.worker, zombie.worker,
            "the session moved to the idle worker"
        );
        assert_eq!(next.epoch, zombie.epoch + 1);
        // The replacement's EpochStarted fences the old epoch in the log itself.
        failover::session_results(&system, session, Duration::ZERO, |events| {
            events.iter().any(
                |e| matches!(e.event, Event::EpochStarted { epoch, .. } if epoch == next.epoch),
            )
        })
        .await;
        kill(pid, Signal::SIGCONT).expect("SIGCONT");
        progress.close().await;
        let stopped_ms = eventlog::now_ms() - stopped_at_ms;
        println!(
            "SIGSTOPped {} (epoch {}) decoded to {decoded} ms ({acked_ms} ms acknowledged, {finals_heard} finals heard), inside {sentence:?}; the registry gave the session to {} (epoch {}) {moved_ms} ms later; SIGCONT after {stopped_ms} ms",
            zombie.worker, zombie.epoch, next.worker, next.epoch
        );
        (session, zombie, next, stopped_at_ms)
    };
    let (result, (session, zombie, next, stopped_at_ms)) = tokio::join!(client, control);
    let outcome = expect_completed(&system, result);
    assert_unchanged(&system, &outcome, reference, "zombie woken after takeover");

    // The orchestrator's account: when it declared the zombie lost.
    let control = failover::read_stream(
        &system.layout.control_stream(),
        None,
        ReadFrom::Start,
        Duration::ZERO,
        |events| {
            events.iter().any(
                |e| matches!(&e.event, Event::WorkerLost { worker, .. } if *worker == zombie.worker),
            )
        },
    )
    .await;
    if let Some(lost) = control
        .iter()
        .find(|e| matches!(&e.event, Event::WorkerLost { worker, .. } if *worker == zombie.worker))
    {
        println!(
            "declared lost {} ms after SIGSTOP: {:?}",
            lost.at_ms.saturating_sub(stopped_at_ms),
            lost.event
        );
    }

    // The workers' account, through the acceptance rule. Two quiet seconds after the
    // completion: anything the zombie appended late is in.
    let events = failover::session_results(
        &system,
        session,
        Duration::from_secs(2),
        failover::completed,
    )
    .await;
    let report = |what: String| {
        let lines: Vec<String> = events.iter().map(|e| format!("{:?}", e.event)).collect();
        format!(
            "{what}\nresults:\n{}\n{}",
            lines.join("\n"),
            system.all_logs()
        )
    };
    let mut filter = ResultFilter::new();
    let mut latest_started: Option<u64> = None;
    let mut fenced = false;
    let mut stale_after_wake = 0;
    // Per segment: epoch of the last accepted result, and whether its final is in.
    let mut segments: std::collections::BTreeMap<u32, (u64, bool)> = Default::default();
    for envelope in &events {
        let event = &envelope.event;
        let verdict = filter.accept(event);
        if let Event::EpochStarted { epoch, .. } = event {
            latest_started = latest_started.max(Some(*epoch));
            fenced |= *epoch == next.epoch;
        }
        if fenced && event.epoch() == Some(zombie.epoch) {
            stale_after_wake += 1;
            assert_eq!(
                verdict,
                Verdict::Ignored(Ignored::StaleEpoch),
                "{}",
                report(format!(
                    "the zombie's {event:?} after the new epoch started"
                ))
            );
        }
        if verdict != Verdict::Accepted {
            continue;
        }
        let segment = match event {
            Event::Partial { segment, .. } | Event::Final { segment, .. } => Some(*segment),
            Event::TranscriptCompleted { .. } => None,
            _ => continue,
        };
        assert_eq!(
            event.epoch(),
            latest_started,
            "{}",
            report(format!(
                "accepted {event:?} while the latest started epoch is {latest_started:?}"
            ))
        );
        if let Some(segment) = segment {
            let epoch = event.epoch().expect("a result has an epoch");
            let is_final = matches!(event, Event::Final { .. });
            let entry = segments.entry(segment).or_insert((epoch, false));
            assert!(
                !entry.1 && entry.0 <= epoch,
                "{}",
                report(format!(
                    "segment {segment}: accepted {event:?} after (epoch {}, final {})",
                    entry.0, entry.1
                ))
            );
            *entry = (epoch, is_final);
        }
    }
    let accepted: Vec<(u32, String, u64, u64)> = filter
        .finals()
        .iter()
        .map(|(i, f)| (*i, f.text.clone(), f.start_ms, f.end_ms))
        .collect();
    let expected: Vec<(u32, String, u64, u64)> = reference
        .finals
        .iter()
        .map(|s| (s.segment, s.text.clone(), s.start_ms, s.end_ms))
        .collect();
    assert_eq!(
        accepted,
        expected,
        "{}",
        report("accepted finals in the log differ from the reference".into())
    );
    assert_eq!(filter.completed(), Some(reference.finals.len() as u32));
    assert_eq!(
        filter.epoch(),
        Some(next.epoch),
        "no epoch after the takeover"
    );
    let revoked = system
        .log_of(&zombie.worker)
        .lines()
        .any(|l| l.contains("assignment revoked"));
    println!(
        "the zombie appended {stale_after_wake} events of its stale epoch {} after waking, every one refused; its log {} the revoke",
        zombie.epoch,
        if revoked { "shows" } else { "does not show" }
    );
    assert!(
        stale_after_wake > 0,
        "{}",
        report(
            "the zombie appended nothing after waking: the fence was not put to the test".into()
        )
    );
    system.stop().await;
}
