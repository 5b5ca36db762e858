//! Orchestrator failover and Redis loss with real processes (issue 3): the leader
//! replica is SIGKILLed in the middle of a caller's conversation, or Redis loses all
//! its data, and the caller's transcript is still word for word the one of the same
//! audio with no failure, every segment index once. A recognizer is SIGKILLed after
//! each of those too, so the new leader (or the emptied Redis) has to carry a
//! recognizer failover: replay from the checkpoint, or from the session's start when
//! Redis lost it, with epochs above the log's.
//!
//! Moments are fixed by the audio the client has had acknowledged, never by sleeps.

use std::path::Path;
use std::time::{Duration, Instant};

use eventlog::Event;
use eventlog::control::ControlFilter;
use eventlog::log::ReadFrom;
use testkit::failover::{
    Holder, Reference, Watch, completed, holder, read_stream, session_results, stream,
};
use testkit::system::{System, SystemConfig};
use testkit::wer::word_error_rate;
use tokio::sync::OnceCell;
use uuid::Uuid;

const SENTENCES: [&str; 3] = [
    "a car hit the wall near the school and the driver is not breathing",
    "we need the police and a fire truck right now",
    "the road is blocked by the crash so come from the north side",
];
const GAP_MS: u32 = 1200;
const MAX_WER: f64 = 0.35;
/// Faster than real time keeps the suite short; the recognizer keeps up at this pace.
const SPEED: f64 = 3.0;
/// A Redis database of this test binary's own, so that wiping it wipes nothing else.
const WIPED_REDIS_DB: u8 = 9;

fn asr() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_asr"))
}

static REFERENCE: OnceCell<Reference> = OnceCell::const_new();

/// The conversation's transcript with no failure, decoded once per test binary on the
/// first test's system (same binary, same model: decoding is deterministic).
async fn reference(system: &System) -> &'static Reference {
    REFERENCE
        .get_or_init(|| async {
            let (client, _watch) = stream(system, recording(), SPEED);
            let outcome = client
                .await
                .unwrap_or_else(|e| panic!("reference run: {e}\n{}", system.all_logs()));
            let reference = Reference::of(&outcome);
            let wer = word_error_rate(&SENTENCES.join(" "), &reference.transcript);
            println!("reference (WER {wer:.2}): {:?}", reference.transcript);
            assert!(wer <= MAX_WER, "WER {wer:.2}: {:?}", reference.transcript);
            assert_eq!(reference.finals.len(), SENTENCES.len(), "{reference:?}");
            reference
        })
        .await
}

fn recording() -> client::Recording {
    testkit::speech::sentences(&SENTENCES, GAP_MS)
}

/// The frame holding the point `fraction` of the way through the reference's
/// `segment`.
fn within(reference: &Reference, segment: usize, fraction: f64) -> u64 {
    let s = &reference.finals[segment];
    let ms = s.start_ms as f64 + (s.end_ms - s.start_ms) as f64 * fraction;
    ms as u64 / 100
}

async fn acked_past(watch: &mut Watch, frame: u64) {
    watch
        .until("the moment in the audio", |w| w.acked > frame)
        .await;
}

/// SIGKILLs the session's current worker (above `after_epoch`), starting it again in
/// the background if `restart`; returns the killed assignment.
async fn kill_the_worker(
    system: &mut System,
    session: Uuid,
    after_epoch: u64,
    restart: bool,
) -> Holder {
    let held = holder(system, session, after_epoch).await;
    assert!(!held.done, "the session finished before the kill");
    system.kill(&held.worker).await;
    if restart {
        system.restart(&held.worker).await;
    }
    println!("SIGKILLed {} (epoch {})", held.worker, held.epoch);
    held
}

/// The session's assignments as the control stream tells them (a deposed leader's
/// events ignored): epochs strictly increase, so no two workers ever held one epoch.
async fn assignments(system: &System, session: Uuid) -> Vec<(String, u64)> {
    let events = read_stream(
        &system.layout.control_stream(),
        None,
        ReadFrom::Start,
        Duration::from_millis(300),
        |events| {
            events.iter().any(|e| {
                e.session == Some(session) && matches!(e.event, Event::WorkerReleased { .. })
            })
        },
    )
    .await;
    let mut filter = ControlFilter::new();
    let allocated: Vec<(String, u64)> = events
        .iter()
        .filter(|e| filter.accept(&e.event) && e.session == Some(session))
        .filter_map(|e| match &e.event {
            Event::WorkerAllocated { worker, epoch, .. } => Some((worker.clone(), *epoch)),
            _ => None,
        })
        .collect();
    assert!(
        allocated.windows(2).all(|w| w[0].1 < w[1].1),
        "epochs must increase: {allocated:?}"
    );
    allocated
}

fn assert_unchanged(system: &System, reference: &Reference, outcome: &client::Outcome) {
    if let Some(differences) = reference.differences(outcome) {
        panic!("{differences}\n{}", system.all_logs());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_is_sigkilled_mid_session_and_the_standby_carries_on() {
    let _serial = testkit::serial::heavy();
    let mut system = System::start(
        asr(),
        SystemConfig {
            orchestrators: 2,
            recognizers: 2,
            ..SystemConfig::default()
        },
    )
    .await;
    let reference = reference(&system).await;

    let (client, mut watch) = stream(&system, recording(), SPEED);
    let control = async {
        let session = watch.session().await;
        acked_past(&mut watch, within(reference, 0, 0.5)).await;
        let (leader, token) = system.leader().await.expect("a leader");
        let killed_at = Instant::now();
        system.kill(&leader).await;
        let (successor, new_token) = system.leader_after(Some(token)).await;
        let takeover = killed_at.elapsed();
        println!(
            "SIGKILLed leader {leader} (token {token}); {successor} leads (token {new_token}) after {takeover:?}"
        );
        assert_ne!(successor, leader);
        assert_eq!(new_token, token + 1);
        // Well within the heartbeat timeout on an idle machine (lease 500 ms); the
        // bound leaves room for a loaded one.
        assert!(takeover < Duration::from_secs(3), "takeover {takeover:?}");

        // A recognizer failover under the new leader.
        acked_past(&mut watch, within(reference, 1, 0.5)).await;
        let epoch = kill_the_worker(&mut system, session, 0, true).await.epoch;
        let next = holder(&system, session, epoch).await;
        assert_eq!(next.epoch, epoch + 1);
        watch.finish().await;
        session
    };
    let (outcome, session) = tokio::join!(client, control);
    let outcome = outcome.unwrap_or_else(|e| panic!("session failed: {e}\n{}", system.all_logs()));
    assert_unchanged(&system, reference, &outcome);
    let allocated = assignments(&system, session).await;
    assert_eq!(allocated.len(), 2, "one failover: {allocated:?}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_loses_its_data_mid_session_and_the_session_carries_on() {
    let _serial = testkit::serial::heavy();
    let mut system = System::start(
        asr(),
        SystemConfig {
            orchestrators: 2,
            recognizers: 2,
            redis_db: WIPED_REDIS_DB,
            ..SystemConfig::default()
        },
    )
    .await;
    let reference = reference(&system).await;
    let checkpoints = eventlog::checkpoint::CheckpointStore::new(
        redis::aio::ConnectionManager::new(redis::Client::open(system.redis_url.as_str()).unwrap())
            .await
            .unwrap(),
        system.namespace.clone(),
    );

    // Real time: the wipe and the kill both fall inside the second sentence, after
    // the first one's checkpoint and before the second's, with time in between for
    // the new term to begin.
    let (client, mut watch) = stream(&system, recording(), 1.0);
    let control = async {
        let session = watch.session().await;
        // The first sentence is final and checkpointed.
        watch.until("the first final", |w| w.finals() >= 1).await;
        while checkpoints.load(session).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = holder(&system, session, 0).await;
        let (_, token) = system.leader().await.expect("a leader");
        // FLUSHDB on the system's own database: all it ever wrote to Redis is gone.
        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut system.redis().await)
            .await
            .expect("FLUSHDB");
        let (leader, new_token) = system.leader_after(Some(token)).await;
        println!("Redis wiped under token {token}: {leader} leads under token {new_token}");
        // The worker registers again, listing the session: the leader adopts it under
        // its epoch.
        let adopted = holder(&system, session, before.epoch - 1).await;
        assert_eq!(
            (adopted.worker.as_str(), adopted.epoch),
            (before.worker.as_str(), before.epoch)
        );

        // A recognizer failover with no checkpoint: the replacement decodes from the
        // session's start, the finals deduplicated, under the log's epoch plus one.
        acked_past(&mut watch, within(reference, 1, 0.7)).await;
        assert_eq!(
            checkpoints.load(session).await.unwrap(),
            None,
            "the wiped checkpoint is not back yet: the replacement starts from the beginning"
        );
        let epoch = kill_the_worker(&mut system, session, 0, true).await.epoch;
        assert_eq!(
            epoch, before.epoch,
            "the adopted assignment was the one killed"
        );
        let next = holder(&system, session, epoch).await;
        assert_eq!(next.epoch, epoch + 1, "epochs continue from the log's");
        watch.finish().await;
        session
    };
    let (outcome, session) = tokio::join!(client, control);
    let outcome = outcome.unwrap_or_else(|e| panic!("session failed: {e}\n{}", system.all_logs()));
    assert_unchanged(&system, reference, &outcome);
    let allocated = assignments(&system, session).await;
    assert_eq!(
        allocated.iter().map(|(_, e)| *e).collect::<Vec<_>>(),
        vec![1, 2],
        "{allocated:?}"
    );
    // The replacement decoded the first sentence again, and only one of its finals
    // counted.
    let results = session_results(&system, session, Duration::from_millis(300), completed).await;
    let first_finals: Vec<u64> = results
        .iter()
        .filter_map(|e| match e.event {
            Event::Final {
                segment: 0, epoch, ..
            } => Some(epoch),
            _ => None,
        })
        .collect();
    assert_eq!(first_finals, vec![1, 2], "segment 0 decoded by both epochs");
    system.stop().await;
}

fn signal(system: &System, role: &str, signal: nix::sys::signal::Signal) {
    let pid = system.pid_of(role).expect("running") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .unwrap_or_else(|e| panic!("{signal} to {role}: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_is_replaced_and_wakes_up_fenced() {
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};
    let _serial = testkit::serial::heavy();
    let mut system = System::start(
        asr(),
        SystemConfig {
            orchestrators: 2,
            recognizers: 2,
            ..SystemConfig::default()
        },
    )
    .await;
    let reference = reference(&system).await;

    let (client, mut watch) = stream(&system, recording(), SPEED);
    let control = async {
        let session = watch.session().await;
        acked_past(&mut watch, within(reference, 0, 0.5)).await;
        // Paused, its sockets stay open: nobody sees a connection break.
        let (paused, token) = system.leader().await.expect("a leader");
        signal(&system, &paused, SIGSTOP);
        let (successor, _) = system.leader_after(Some(token)).await;
        println!("SIGSTOPped leader {paused} (token {token}); {successor} leads");

        // The workers find the new leader by themselves: the killed one is not started
        // again, so the idle one, registered with the old leader when it was paused,
        // can only take over if it registered with the new one.
        acked_past(&mut watch, within(reference, 1, 0.5)).await;
        let killed = kill_the_worker(&mut system, session, 0, false).await;
        let next = holder(&system, session, killed.epoch).await;
        assert_eq!(next.epoch, killed.epoch + 1);
        assert_ne!(next.worker, killed.worker);

        // The old leader wakes up: it finds its lock gone and stops leading, having
        // changed nothing.
        signal(&system, &paused, SIGCONT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !system.log_of(&paused).contains("stopped leading") {
            assert!(
                Instant::now() < deadline,
                "{paused} never stepped down\n{}",
                system.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(system.leader().await.map(|(r, _)| r), Some(successor));
        watch.finish().await;
        session
    };
    let (outcome, session) = tokio::join!(client, control);
    let outcome = outcome.unwrap_or_else(|e| panic!("session failed: {e}\n{}", system.all_logs()));
    assert_unchanged(&system, reference, &outcome);
    let allocated = assignments(&system, session).await;
    assert_eq!(allocated.len(), 2, "one failover, no more: {allocated:?}");
    system.stop().await;
}
