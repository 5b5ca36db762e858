//! End to end, with nothing faked: real speech (espeak-ng) streamed over WebSocket into
//! ingest, through RabbitMQ streams, to a recognizer process running Whisper tiny.en,
//! and back. Every role is a separate OS process of the built `asr` binary.

use std::path::Path;
use std::time::Duration;

use client::{Outcome, Recording, StreamOptions};
use testkit::system::{System, SystemConfig};
use testkit::wer::{word_error_rate, words};

/// tiny.en on espeak-ng's voice is imperfect; the issue sets this bound.
const MAX_WER: f64 = 0.35;

/// The bound for 8 kHz (telephone) audio. The band up to 4 kHz is all such a call
/// carries, and tiny.en hears espeak-ng's voice far worse in it: 0.43 on the
/// recording below after sox's own high-quality resampling to 16 kHz, 0.48 through
/// ours (`recognizer/tests/real_speech.rs` holds ours to sox's).
const MAX_WER_8KHZ: f64 = 0.75;

fn asr() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_asr"))
}

async fn transcribe(system: &System, recording: &Recording, speed: f64) -> Outcome {
    let options = StreamOptions {
        speed,
        completion_timeout: Duration::from_secs(90),
        ..system.stream_options()
    };
    match client::stream(&options, recording, |_| {}).await {
        Ok(outcome) => outcome,
        Err(e) => panic!("session failed: {e}\n{}", system.all_logs()),
    }
}

/// The first segment's earliest non-empty partial arrived before the frame carrying
/// the end of that segment was sent.
fn partial_preceded_last_chunk(outcome: &Outcome) -> bool {
    let Some(first) = outcome.finals.first() else {
        return false;
    };
    let last_frame = outcome.frame_at(first.segment.end_ms);
    outcome
        .partials
        .iter()
        .filter(|p| p.segment.segment == first.segment.segment && !p.segment.text.trim().is_empty())
        .any(|p| p.at < outcome.sent_at[last_frame])
}

#[tokio::test(flavor = "multi_thread")]
async fn sentences_are_transcribed_live_through_the_whole_pipeline() {
    let _serial = testkit::serial::heavy();
    let sentences = [
        "there is a fire in the kitchen and the smoke is getting thicker",
        "please send an ambulance to the main street",
        "my father fell down the stairs and he cannot move his leg",
    ];
    let system = System::start(asr(), SystemConfig::default()).await;
    for sentence in sentences {
        let recording = testkit::speech::sentences(&[sentence], 1200);
        let outcome = transcribe(&system, &recording, 1.0).await;
        let wer = word_error_rate(sentence, &outcome.transcript);
        println!(
            "WER {wer:.2}  said: {sentence:?}  heard: {:?}  ({} finals, {} partials)",
            outcome.transcript,
            outcome.finals.len(),
            outcome.partials.len()
        );
        assert!(
            wer <= MAX_WER,
            "WER {wer:.2} > {MAX_WER} for {sentence:?}: {:?}",
            outcome.transcript
        );
        assert!(outcome.missing_segments.is_empty());
        assert!(
            outcome.acked_at.iter().all(Option::is_some),
            "every chunk is acknowledged"
        );
        assert!(
            partial_preceded_last_chunk(&outcome),
            "a partial of the first segment arrives while it is still being spoken: partials {:?}, finals {:?}",
            outcome
                .partials
                .iter()
                .map(|p| (&p.segment, p.at))
                .collect::<Vec<_>>(),
            outcome
                .finals
                .iter()
                .map(|f| &f.segment)
                .collect::<Vec<_>>()
        );
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_sessions_do_not_mix() {
    let _serial = testkit::serial::heavy();
    let a = "the weather is cold and windy today";
    let b = "we need a police car at the bank";
    let content = |s: &str| -> Vec<String> {
        let stop = ["a", "the", "is", "and", "we", "at"];
        words(s)
            .into_iter()
            .filter(|w| !stop.contains(&w.as_str()))
            .collect()
    };
    let system = System::start(
        asr(),
        SystemConfig {
            recognizers: 2,
            ..SystemConfig::default()
        },
    )
    .await;
    let (ra, rb) = (
        testkit::speech::sentences(&[a], 1000),
        testkit::speech::sentences(&[b], 1000),
    );
    let (oa, ob) = tokio::join!(transcribe(&system, &ra, 2.0), transcribe(&system, &rb, 2.0));
    for (said, other, outcome) in [(a, b, &oa), (b, a, &ob)] {
        let wer = word_error_rate(said, &outcome.transcript);
        println!(
            "WER {wer:.2}  said: {said:?}  heard: {:?}",
            outcome.transcript
        );
        assert!(
            wer <= MAX_WER,
            "WER {wer:.2} for {said:?}: {:?}",
            outcome.transcript
        );
        let heard = words(&outcome.transcript);
        for word in content(other) {
            assert!(
                !heard.contains(&word),
                "{word:?} of the other session leaked into {heard:?}"
            );
        }
    }
    assert_ne!(oa.session_id, ob.session_id);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_prints_the_transcript_and_fails_clearly() {
    let _serial = testkit::serial::heavy();
    let sentence = "call the fire department now";
    let system = System::start(asr(), SystemConfig::default()).await;
    let dir = std::env::temp_dir().join(format!("asr-cli-{}", system.namespace));
    std::fs::create_dir_all(&dir).unwrap();
    let wav = dir.join("call.wav");
    testkit::speech::write_wav(&testkit::speech::sentences(&[sentence], 800), &wav);

    let output = tokio::process::Command::new(asr())
        .arg("transcribe")
        .arg(&wav)
        .args(["--speed", "0", "--url", &system.ws_url()])
        .args(["--api-key", &system.api_key])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let wer = word_error_rate(sentence, stdout.trim());
    println!("CLI WER {wer:.2}: {stdout:?}");
    assert!(wer <= MAX_WER);

    let refused = tokio::process::Command::new(asr())
        .arg("transcribe")
        .arg(&wav)
        .args([
            "--speed",
            "0",
            "--model",
            "klingon-xl",
            "--url",
            &system.ws_url(),
            "--api-key",
            &system.api_key,
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("unknown_model"), "stderr: {stderr}");
    assert!(refused.stdout.is_empty());

    // Several endpoints: the first does not answer, the second takes the session.
    let dead = format!("ws://127.0.0.1:{}/v1/stream", testkit::free_port());
    let output = tokio::process::Command::new(asr())
        .arg("transcribe")
        .arg(&wav)
        .args(["--speed", "0", "--api-key", &system.api_key])
        .arg(format!("--url={dead},{}", system.ws_url()))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(word_error_rate(sentence, String::from_utf8_lossy(&output.stdout).trim()) <= MAX_WER);
    // Only dead endpoints: it keeps trying for its patience, then says which.
    let started = std::time::Instant::now();
    let output = tokio::process::Command::new(asr())
        .arg("transcribe")
        .arg(&wav)
        .args(["--api-key", &system.api_key, "--connect-patience-secs", "1"])
        .arg(format!("--url={dead}"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&dead), "stderr: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // A wrong key: refused with the documented code, and the key is not echoed.
    let wrong = "not-the-right-key-0123456789";
    let unauthorized = tokio::process::Command::new(asr())
        .arg("transcribe")
        .arg(&wav)
        .args([
            "--speed",
            "0",
            "--url",
            &system.ws_url(),
            "--api-key",
            wrong,
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&unauthorized.stderr);
    assert!(!unauthorized.status.success());
    assert!(stderr.contains("unauthorized"), "stderr: {stderr}");
    assert!(!stderr.contains(wrong), "the key is echoed: {stderr}");
    assert!(unauthorized.stdout.is_empty());

    let _ = std::fs::remove_dir_all(&dir);
    system.stop().await;
}

/// Telephone (8 kHz), sound-card (48 kHz) and float audio: the log keeps the client's
/// bytes exactly as sent, and the recognizer's conversion to 16 kHz hears the same words.
#[tokio::test(flavor = "multi_thread")]
async fn every_accepted_rate_and_encoding_is_stored_as_sent_and_transcribed() {
    use eventlog::log::ReadFrom;
    use eventlog::{AudioEncoding, AudioFormat, Event};

    let _serial = testkit::serial::heavy();
    let sentences = [
        "there is a fire in the kitchen and the smoke is getting thicker",
        "please send an ambulance to the main street",
    ];
    let system = System::start(asr(), SystemConfig::default()).await;
    for (sample_rate, encoding) in [
        (8_000, AudioEncoding::PcmS16le),
        (48_000, AudioEncoding::PcmS16le),
        (16_000, AudioEncoding::PcmF32le),
        (8_000, AudioEncoding::PcmF32le),
        (48_000, AudioEncoding::PcmF32le),
    ] {
        let format = AudioFormat {
            sample_rate,
            encoding,
        };
        let recording = testkit::speech::sentences_as(&sentences, 1000, format);
        let outcome = transcribe(&system, &recording, 0.0).await;
        let said = sentences.join(" ");
        let wer = word_error_rate(&said, &outcome.transcript);
        println!(
            "{sample_rate} Hz {}: WER {wer:.2}, heard {:?}",
            encoding.name(),
            outcome.transcript
        );
        let bound = if sample_rate == 8_000 {
            MAX_WER_8KHZ
        } else {
            MAX_WER
        };
        assert!(
            wer <= bound,
            "{sample_rate} Hz {}: WER {wer:.2}: {:?}",
            encoding.name(),
            outcome.transcript
        );
        assert!(outcome.missing_segments.is_empty());

        // The audio in the log, chunk by chunk, is the client's bytes.
        let events = testkit::failover::read_stream(
            &system.layout.audio_stream(outcome.session_id),
            Some(outcome.session_id),
            ReadFrom::Start,
            Duration::from_millis(200),
            |events| {
                events
                    .iter()
                    .any(|e| matches!(e.event, Event::EndOfStream { .. }))
            },
        )
        .await;
        let mut stored = Vec::new();
        for e in &events {
            match &e.event {
                Event::SessionOpened { format: f, .. } => assert_eq!(*f, format),
                Event::AudioChunk(chunk) => stored.extend_from_slice(&chunk.bytes),
                _ => {}
            }
        }
        assert!(
            stored == recording.pcm,
            "{sample_rate} Hz {}: the log holds {} bytes, the client sent {}",
            encoding.name(),
            stored.len(),
            recording.pcm.len()
        );
    }
    system.stop().await;
}

/// Two ingest nodes share nothing but the log and Redis: sessions opened on either are
/// served by the same recognizers. SIGKILLing one node while its client is sending
/// moves that session to the other node: the client resumes there and gets the
/// uninterrupted run's transcript, no result twice, and the log holds each chunk once;
/// the other node's session never notices.
#[tokio::test(flavor = "multi_thread")]
async fn two_ingest_nodes_serve_side_by_side_and_a_session_resumes_on_one_when_the_other_dies() {
    let _serial = testkit::serial::heavy();
    let (a, b) = (
        "please send an ambulance to the main street",
        "there is a fire in the kitchen and the smoke is getting thicker",
    );
    let mut system = System::start(
        asr(),
        SystemConfig {
            ingests: 2,
            recognizers: 2,
            ..SystemConfig::default()
        },
    )
    .await;
    let on_node = |i: usize, speed: f64| StreamOptions {
        urls: vec![system.ws_url_of(i)],
        speed,
        completion_timeout: Duration::from_secs(90),
        ..system.stream_options()
    };
    // One session on each node, at once.
    let (ra, rb) = (
        testkit::speech::sentences(&[a], 1000),
        testkit::speech::sentences(&[b], 1000),
    );
    let (first, second) = (on_node(0, 2.0), on_node(1, 2.0));
    let (oa, ob) = tokio::join!(
        client::stream(&first, &ra, |_| {}),
        client::stream(&second, &rb, |_| {})
    );
    let mut transcripts = Vec::new();
    for (said, outcome) in [(a, oa), (b, ob)] {
        let outcome = outcome.unwrap_or_else(|e| panic!("{e}\n{}", system.all_logs()));
        let wer = word_error_rate(said, &outcome.transcript);
        println!("WER {wer:.2}: {:?}", outcome.transcript);
        assert!(wer <= MAX_WER, "{said:?} heard as {:?}", outcome.transcript);
        transcripts.push(outcome.transcript);
    }
    let oa_transcript = transcripts.swap_remove(0);

    // Node 1 dies while both nodes stream at real-time pace, once a second of its
    // session's audio is acknowledged; that client knows both nodes.
    let (mut slow_a, slow_b) = (on_node(0, 1.0), on_node(1, 1.0));
    slow_a.urls = vec![system.ws_url_of(0), system.ws_url_of(1)];
    let (acked, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let doomed = client::stream(&slow_a, &ra, move |message| {
        if let ingest::protocol::ServerMessage::Ack { seq } = message {
            let _ = acked.send(*seq);
        }
    });
    let survivor = client::stream(&slow_b, &rb, |_| {});
    let kill = async {
        acked_rx
            .wait_for(|seq| *seq >= 10)
            .await
            .expect("the doomed session's acks");
        system.kill("ingest").await;
    };
    let (moved, survivor, ()) = tokio::join!(doomed, survivor, kill);
    let moved = moved.unwrap_or_else(|e| panic!("{e}\n{}", system.all_logs()));
    println!(
        "after node 1 died, its session resumed on node 2: {:?}",
        moved.transcript
    );
    assert_eq!(moved.resumes, 1);
    assert_eq!(
        moved.transcript, oa_transcript,
        "the uninterrupted run's transcript"
    );
    assert_eq!(moved.repeated_results, Vec::<u64>::new(), "no result twice");
    let stored = testkit::failover::stored_chunks(&system, moved.session_id).await;
    let frames = moved.acked_at.len() as u64;
    assert_eq!(stored, (0..frames).collect::<Vec<_>>(), "every chunk once");
    assert!(moved.acked_at.iter().all(Option::is_some));
    let survivor = survivor.unwrap_or_else(|e| panic!("{e}\n{}", system.all_logs()));
    let wer = word_error_rate(b, &survivor.transcript);
    println!(
        "after node 1 died, node 2's session: WER {wer:.2}: {:?}",
        survivor.transcript
    );
    assert!(wer <= MAX_WER, "{b:?} heard as {:?}", survivor.transcript);
    assert!(survivor.acked_at.iter().all(Option::is_some));
    system.stop().await;
}
