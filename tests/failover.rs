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

use std::path::Path;
use std::time::Duration;

use client::{ClientError, Outcome, Recording, StreamOptions};
use ingest::protocol::{Segment, ServerMessage};
use rand::{Rng, SeedableRng};
use testkit::system::{System, SystemConfig};
use testkit::wer::word_error_rate;
use tokio::sync::{OnceCell, mpsc};
use uuid::Uuid;

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
/// No step of a session (an assignment, a failpoint, the next result) takes this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn asr() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_asr"))
}

fn recording() -> Recording {
    testkit::speech::sentences(&SENTENCES, GAP_MS)
}

/// The conversation's transcript with no failure: what every failover run must equal.
#[derive(Debug)]
struct Reference {
    transcript: String,
    finals: Vec<Segment>,
}

static REFERENCE: OnceCell<Reference> = OnceCell::const_new();

/// The reference, decoded once per test binary by whichever test needs it first, on
/// that test's system (same binary, same model: decoding is deterministic).
async fn reference(system: &System) -> &'static Reference {
    REFERENCE
        .get_or_init(|| async {
            let (client, _seen) = stream(system);
            let outcome = expect_completed(system, client.await);
            let reference = Reference {
                transcript: outcome.transcript.clone(),
                finals: outcome.finals.iter().map(|f| f.segment.clone()).collect(),
            };
            println!("reference transcript: {:?}", reference.transcript);
            reference
        })
        .await
}

/// What the controller of a session learns from the client, as it happens.
#[derive(Debug)]
enum Seen {
    Opened(Uuid),
    Ack(u64),
    Final,
}

/// Starts streaming the conversation at [`SPEED`]; the receiver sees the session id,
/// every acknowledgement and every final as the client gets them.
fn stream(
    system: &System,
) -> (
    impl Future<Output = Result<Outcome, ClientError>> + use<>,
    mpsc::UnboundedReceiver<Seen>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let options = StreamOptions {
        url: system.ws_url(),
        speed: SPEED,
        completion_timeout: Duration::from_secs(120),
        ..StreamOptions::default()
    };
    let recording = recording();
    let client = async move {
        client::stream(&options, &recording, |message| {
            let seen = match message {
                ServerMessage::Opened { session_id, .. } => Seen::Opened(*session_id),
                ServerMessage::Ack { seq } => Seen::Ack(*seq),
                ServerMessage::Final(_) => Seen::Final,
                _ => return,
            };
            let _ = tx.send(seen);
        })
        .await
    };
    (client, rx)
}

fn expect_completed(system: &System, result: Result<Outcome, ClientError>) -> Outcome {
    match result {
        Ok(outcome) => outcome,
        Err(e) => panic!("session failed: {e}\n{}", system.all_logs()),
    }
}

/// The session as the controller follows it.
struct Watch {
    seen: mpsc::UnboundedReceiver<Seen>,
    session: Option<Uuid>,
    /// Highest acknowledged frame + 1.
    acked: u64,
    finals: usize,
}

impl Watch {
    fn new(seen: mpsc::UnboundedReceiver<Seen>) -> Self {
        Self {
            seen,
            session: None,
            acked: 0,
            finals: 0,
        }
    }

    /// Consumes what the client saw until `done` holds.
    async fn until(&mut self, what: &str, done: impl Fn(&Watch) -> bool) {
        while !done(self) {
            let next = tokio::time::timeout(STEP_TIMEOUT, self.seen.recv()).await;
            match next {
                Ok(Some(seen)) => self.note(seen),
                Ok(None) => panic!("the session ended while waiting for {what}"),
                Err(_) => panic!("nothing from the client for {STEP_TIMEOUT:?} waiting for {what}"),
            }
        }
    }

    /// Takes in what the client saw so far, without waiting.
    fn drain(&mut self) {
        while let Ok(seen) = self.seen.try_recv() {
            self.note(seen);
        }
    }

    fn note(&mut self, seen: Seen) {
        match seen {
            Seen::Opened(id) => self.session = Some(id),
            Seen::Ack(seq) => self.acked = self.acked.max(seq + 1),
            Seen::Final => self.finals += 1,
        }
    }

    async fn session(&mut self) -> Uuid {
        self.until("the session id", |w| w.session.is_some()).await;
        self.session.expect("opened")
    }
}

/// The worker holding the session under an epoch above `after_epoch`, once the
/// orchestrator assigned it, and whether the session is already finished (a fast
/// replacement can decode what is left before the test looks).
async fn holder(system: &System, session: Uuid, after_epoch: u64) -> (String, u64, bool) {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(a) = system.assignment(session).await
            && (a.state == "assigned" || a.state == "done")
            && a.epoch > after_epoch
            && let Some(worker) = a.worker
        {
            return (worker, a.epoch, a.state == "done");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {session} not assigned beyond epoch {after_epoch}\n{}",
            system.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
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

/// The failover guarantees: the same transcript as with no failure, the same finals
/// (index, text, audio range) in order, each index once, none reported missing.
fn assert_unchanged(system: &System, outcome: &Outcome, reference: &Reference, what: &str) {
    let finals: Vec<&Segment> = outcome.finals.iter().map(|f| &f.segment).collect();
    let indices: Vec<u32> = finals.iter().map(|s| s.segment).collect();
    let expected: Vec<u32> = (0..reference.finals.len() as u32).collect();
    let report = || {
        format!(
            "{what}\nheard:    {:?}\nexpected: {:?}\nfinals:   {finals:?}\nreference finals: {:?}\n{}",
            outcome.transcript,
            reference.transcript,
            reference.finals,
            system.all_logs()
        )
    };
    assert_eq!(indices, expected, "segment indices: {}", report());
    assert!(
        outcome.missing_segments.is_empty(),
        "missing segments {:?}: {}",
        outcome.missing_segments,
        report()
    );
    assert_eq!(outcome.transcript, reference.transcript, "{}", report());
    let same = finals.iter().zip(&reference.finals).all(|(a, b)| *a == b);
    assert!(same, "finals differ: {}", report());
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
    let (client, _seen) = stream(&system);
    let again = expect_completed(&system, client.await);
    assert_unchanged(&system, &again, reference, "a second run with no failure");
    system.stop().await;
}

/// Runs the conversation on a recognizer armed with `FAILPOINTS=<point>=<actions>`,
/// SIGKILLs it once it stopped there, and checks the transcript; returns how many
/// finals the killed worker had appended.
async fn killed_at_failpoint(point: &str, actions: &str) -> usize {
    let mut system = System::start(
        asr(),
        SystemConfig {
            recognizers: 0,
            ..SystemConfig::default()
        },
    )
    .await;
    system.start_recognizer("recognizer-2").await;
    let reference = reference(&system).await;
    // Both idle: the allocator takes the smallest worker id, the armed one.
    let failpoints = format!("{point}={actions}");
    system
        .start_recognizer_with("recognizer-1", &[("FAILPOINTS", failpoints.as_str())])
        .await;

    let (client, seen) = stream(&system);
    let control = async {
        let mut watch = Watch::new(seen);
        let session = watch.session().await;
        let (first, epoch, _) = holder(&system, session, 0).await;
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
            watch.finals, watch.acked
        );
        let (next, next_epoch, _) = holder(&system, session, epoch).await;
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

/// Kill positions (ms of audio) inside the reference's speech, sorted, spaced.
fn kill_positions(rng: &mut impl Rng, reference: &Reference) -> Vec<u64> {
    let speech: Vec<(u64, u64)> = reference
        .finals
        .iter()
        .map(|s| (s.start_ms, s.end_ms))
        .collect();
    let total: u64 = speech.iter().map(|(a, b)| b - a).sum();
    loop {
        let mut at: Vec<u64> = (0..KILLS_PER_SESSION)
            .map(|_| {
                let mut offset = rng.random_range(0..total);
                for (start, end) in &speech {
                    if offset < end - start {
                        return start + offset;
                    }
                    offset -= end - start;
                }
                unreachable!("offset within the speech")
            })
            .collect();
        at.sort_unstable();
        if at.windows(2).all(|w| w[1] - w[0] >= MIN_KILL_SPACING_MS) {
            return at;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_at_random_moments_inside_speech() {
    let _serial = testkit::serial::heavy();
    let seed = std::env::var("ASR_TEST_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("ASR_TEST_SEED is a u64"))
        .unwrap_or_else(rand::random);
    println!("random kills: seed {seed} (ASR_TEST_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

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
    let mut started = 3;
    let mut kills = 0;
    for round in 0..RANDOM_SESSIONS {
        let positions = kill_positions(&mut rng, reference);
        let (client, seen) = stream(&system);
        let control = async {
            let mut watch = Watch::new(seen);
            let session = watch.session().await;
            let mut epoch = 0;
            let mut log = Vec::new();
            for (i, &ms) in positions.iter().enumerate() {
                let frame = ms / 100;
                watch.until("the kill position", |w| w.acked > frame).await;
                let (worker, current, done) = holder(&system, session, epoch).await;
                if done {
                    log.push(format!(
                        "{ms} ms: the session finished under {worker} (epoch {current}) before this kill"
                    ));
                    break;
                }
                system.kill(&worker).await;
                log.push(format!(
                    "{ms} ms: killed {worker} (epoch {current}) with {} frames acknowledged, {} finals",
                    watch.acked, watch.finals
                ));
                epoch = current;
                // Capacity back, without pausing the kills (a model loads in
                // seconds): every other kill the same worker id comes back as a fresh
                // process, otherwise a new worker joins.
                if i % 2 == 0 {
                    system.restart(&worker).await;
                } else {
                    started += 1;
                    system.spawn_recognizer(&format!("recognizer-{started}"), &[]);
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
