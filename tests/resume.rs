//! Resume with real processes, real speech and the real model (ARCHITECTURE.md
//! invariant 5; issue 4): the caller's connection drops again and again, or every
//! process of the system is SIGKILLed at once and started again, and the client ends
//! with the transcript of the same audio streamed without a hitch, no result received
//! twice, and each audio chunk once in the log.
//!
//! Drop moments are message positions drawn from a seeded RNG (`ASR_TEST_SEED` replays
//! a run); the crash moment is an acknowledged audio position.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::{Outcome, Recording, StreamOptions};
use ingest::protocol::ServerMessage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::failover::{Reference, stored_chunks};
use testkit::proxy::Proxy;
use testkit::system::{System, SystemConfig};

const SENTENCES: [&str; 3] = [
    "there is a fire in the kitchen and the smoke is getting thicker",
    "please send an ambulance to the main street",
    "my father fell down the stairs and he cannot move his leg",
];
const GAP_MS: u32 = 1200;
/// Faster than real time keeps the suite short; the recognizer keeps up at this pace.
const SPEED: f64 = 3.0;

fn asr() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_asr"))
}

fn recording() -> Recording {
    testkit::speech::sentences(&SENTENCES, GAP_MS)
}

fn options(system: &System, urls: Vec<String>) -> StreamOptions {
    StreamOptions {
        urls,
        speed: SPEED,
        completion_timeout: Duration::from_secs(120),
        ..system.stream_options()
    }
}

/// The conversation streamed with no failure.
async fn reference(system: &System) -> Reference {
    let outcome = client::stream(
        &options(system, vec![system.ws_url()]),
        &recording(),
        |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("reference run: {e}\n{}", system.all_logs()));
    let reference = Reference::of(&outcome);
    println!("reference transcript: {:?}", reference.transcript);
    reference
}

/// The resume guarantees: the reference's finals and transcript, no result twice,
/// every frame acknowledged, each chunk once in the log.
async fn assert_whole(system: &System, reference: &Reference, outcome: &Outcome) {
    if let Some(difference) = reference.differences(outcome) {
        panic!("{difference}");
    }
    assert_eq!(
        outcome.repeated_results,
        Vec::<u64>::new(),
        "results received twice"
    );
    assert!(
        outcome.acked_at.iter().all(Option::is_some),
        "unacknowledged frames"
    );
    let frames = outcome.acked_at.len() as u64;
    let stored = stored_chunks(system, outcome.session_id).await;
    assert_eq!(
        stored,
        (0..frames).collect::<Vec<_>>(),
        "each chunk once, in order"
    );
}

/// Twenty and more drops of the client's connection (not of the node) in one session,
/// at random message positions: acknowledgements while audio flows, results while it
/// is decoded, and after the end while the transcript completes.
#[tokio::test(flavor = "multi_thread")]
async fn twenty_random_drops_in_one_session_lose_and_double_nothing() {
    let _serial = testkit::serial::heavy();
    let system = System::start(asr(), SystemConfig::default()).await;
    let reference = reference(&system).await;

    let seed = std::env::var("ASR_TEST_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("ASR_TEST_SEED is a u64"))
        .unwrap_or_else(rand::random);
    println!("drop positions seeded with ASR_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    const DROPS: usize = 20;
    // Messages to let through after each resume before the next drop.
    let gaps: Vec<usize> = (0..DROPS).map(|_| rng.random_range(1..=6)).collect();

    let target = format!("127.0.0.1:{}", system.ingest_ports[0])
        .parse()
        .unwrap();
    let proxy = Arc::new(Proxy::start(target).await);
    let drops = Arc::new(Mutex::new(Vec::new()));
    let on_message = {
        let (proxy, drops) = (proxy.clone(), drops.clone());
        let mut countdown = Some(gaps[0]);
        move |message: &ServerMessage| {
            let mut drops = drops.lock().unwrap();
            match message {
                // A new connection: the next drop counts down from here.
                ServerMessage::Resumed { .. } => countdown = gaps.get(drops.len()).copied(),
                _ => {
                    if let Some(left) = countdown.as_mut() {
                        *left -= 1;
                        if *left == 0 {
                            drops.push(format!("{message:?}").chars().take(60).collect::<String>());
                            proxy.cut();
                            // Messages still buffered from the cut connection do not count.
                            countdown = None;
                        }
                    }
                }
            }
        }
    };
    let outcome = client::stream(
        &options(&system, vec![proxy.ws_url()]),
        &recording(),
        on_message,
    )
    .await
    .unwrap_or_else(|e| panic!("session failed: {e}\n{}", system.all_logs()));
    let drops = drops.lock().unwrap().clone();
    println!("{} drops, after: {drops:#?}", drops.len());
    assert!(drops.len() >= DROPS, "only {} drops happened", drops.len());
    assert_eq!(outcome.resumes as usize, drops.len(), "one resume per drop");
    assert_whole(&system, &reference, &outcome).await;
    system.stop().await;
}

/// Every process of the system (orchestrator, ingest, recognizer) SIGKILLed at once
/// while the client is sending, then started again: the client reconnects, resumes,
/// and finishes as if nothing had happened, because all state lives in the streams and
/// Redis.
#[tokio::test(flavor = "multi_thread")]
async fn a_whole_system_crash_mid_session_is_survived() {
    let _serial = testkit::serial::heavy();
    let mut system = System::start(asr(), SystemConfig::default()).await;
    let reference = reference(&system).await;

    let crash_at = reference.speech()[1].0 / 100; // a frame inside the second sentence
    let (acked, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let (options, recording) = (options(&system, vec![system.ws_url()]), recording());
    let session = client::stream(&options, &recording, move |m| {
        if let ServerMessage::Ack { seq } = m {
            acked.send_modify(|a| *a = (*a).max(*seq));
        }
    });
    let crash = async {
        acked_rx
            .wait_for(|seq| *seq >= crash_at)
            .await
            .expect("acknowledgements");
        let roles = system.kill_all().await;
        println!("SIGKILLed {roles:?} at frame {crash_at}; starting them again");
        system.restart_all(&roles).await;
    };
    let (outcome, ()) = tokio::join!(session, crash);
    let outcome = outcome.unwrap_or_else(|e| panic!("session failed: {e}\n{}", system.all_logs()));
    println!("after the crash: {:?}", outcome.transcript);
    assert!(outcome.resumes >= 1);
    assert_whole(&system, &reference, &outcome).await;
    system.stop().await;
}
