//! `asr-bench resume --resumes 50`: how long a client that lost its connection waits
//! until the session carries on.
//!
//! Real speech streams at real-time pace through the whole system (one ingest node,
//! one recognizer, the real model). Each time a result arrives, the client drops the
//! connection (no close frame, as a network failure), reconnects at once and resumes
//! with the result before it as its last one, so that result is the first it missed.
//! Measured from the start of the reconnect: until `resumed` (the node took the
//! session over and read its input up to the resume marker), and until the first
//! missed result arrives (its own results reader caught up).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use testkit::system::{System, SystemConfig};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::{SENTENCES, percentile};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const FRAME_MS: u64 = 100;
/// 100 ms of 16 kHz pcm_s16le.
const FRAME_BYTES: usize = 3_200;

/// One resume: from the reconnect to `resumed`, and to the first missed result (ms).
struct Trial {
    resumed_ms: f64,
    first_result_ms: f64,
}

pub async fn run(bin: &Path, resumes: usize) -> anyhow::Result<()> {
    let system = System::start(
        bin,
        SystemConfig {
            env: vec![("RUST_LOG".into(), "warn".into())],
            ..SystemConfig::default()
        },
    )
    .await;
    let recording = testkit::speech::sentences(SENTENCES, 800);
    let mut trials = Vec::new();
    let mut sessions = 0;
    while trials.len() < resumes {
        sessions += 1;
        eprintln!(
            "session {sessions}: {} of {resumes} resumes so far",
            trials.len()
        );
        session(&system, &recording.pcm, &mut trials, resumes)
            .await
            .with_context(|| format!("session {sessions}\n{}", system.all_logs()))?;
    }
    system.stop().await;

    let (mut resumed, mut first): (Vec<f64>, Vec<f64>) = trials
        .iter()
        .map(|t| (t.resumed_ms, t.first_result_ms))
        .unzip();
    println!(
        "| resumes | sessions | to `resumed` p50 (ms) | p99 | max | to first missed result p50 (ms) | p99 | max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {sessions} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        trials.len(),
        percentile(&mut resumed, 50.0),
        percentile(&mut resumed, 99.0),
        percentile(&mut resumed, 100.0),
        percentile(&mut first, 50.0),
        percentile(&mut first, 99.0),
        percentile(&mut first, 100.0),
    );
    Ok(())
}

/// Streams `pcm` as one session, dropping and resuming after each result until
/// `want` trials are recorded; returns when the session completed.
async fn session(
    system: &System,
    pcm: &[u8],
    trials: &mut Vec<Trial>,
    want: usize,
) -> anyhow::Result<()> {
    let url = system.ws_url();
    let frames: Vec<&[u8]> = pcm.chunks(FRAME_BYTES).collect();
    let (mut ws, _) = connect_async(&url).await?;
    let open = json!({"type": "open", "model": "whisper-tiny.en", "sample_rate": 16_000,
        "encoding": "pcm_s16le", "api_key": system.api_key});
    ws.send(Message::text(open.to_string())).await?;
    let opened = next_json(&mut ws).await?;
    anyhow::ensure!(opened["type"] == "opened", "not opened: {opened}");
    let (session, token) = (opened["session_id"].clone(), opened["resume_token"].clone());

    let start = Instant::now();
    let (mut next, mut end_sent) = (0usize, false);
    loop {
        let due = start + Duration::from_millis(FRAME_MS * next as u64);
        tokio::select! {
            () = tokio::time::sleep_until(due), if next < frames.len() => {
                let mut frame = (next as u64).to_le_bytes().to_vec();
                frame.extend_from_slice(frames[next]);
                ws.send(Message::binary(frame)).await?;
                next += 1;
            }
            () = std::future::ready(()), if next == frames.len() && !end_sent => {
                ws.send(Message::text(json!({"type": "end"}).to_string())).await?;
                end_sent = true;
            }
            message = next_json(&mut ws) => {
                let message = message?;
                match message["type"].as_str() {
                    Some("completed") => return Ok(()),
                    Some("error") => anyhow::bail!("session failed: {message}"),
                    _ => {}
                }
                let Some(result) = message["result"].as_u64().filter(|r| *r > 0) else {
                    continue;
                };
                if trials.len() >= want {
                    continue;
                }
                drop(ws);
                let reconnect = Instant::now();
                let (mut resumed_ws, _) = connect_async(&url).await?;
                let resume = json!({"type": "resume", "session_id": session,
                    "resume_token": token, "last_result": result - 1,
                    "api_key": system.api_key});
                resumed_ws.send(Message::text(resume.to_string())).await?;
                let resumed = next_json(&mut resumed_ws).await?;
                anyhow::ensure!(resumed["type"] == "resumed", "not resumed: {resumed}");
                let resumed_ms = reconnect.elapsed().as_secs_f64() * 1000.0;
                loop {
                    let message = next_json(&mut resumed_ws).await?;
                    if message["result"].as_u64().is_some() {
                        anyhow::ensure!(
                            message["result"] == result,
                            "first result after resuming: {message}, expected {result}"
                        );
                        break;
                    }
                }
                trials.push(Trial {
                    resumed_ms,
                    first_result_ms: reconnect.elapsed().as_secs_f64() * 1000.0,
                });
                ws = resumed_ws;
                next = resumed["next_seq"].as_u64().context("next_seq")? as usize;
                end_sent = resumed["ended"] == true;
            }
        }
    }
}

/// The next text frame as JSON.
async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match ws.next().await.context("the connection ended")?? {
            Message::Text(text) => return Ok(serde_json::from_str(&text)?),
            Message::Close(frame) => anyhow::bail!("closed: {frame:?}"),
            _ => continue,
        }
    }
}
