//! `asr transcribe FILE.wav`: streams a recording through a running system, shows
//! partials live on stderr and prints the final transcript on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use client::{Recording, StreamOptions};
use ingest::protocol::{Secret, ServerMessage};

use crate::local_key::StateDir;

#[derive(Args, Debug)]
pub struct TranscribeArgs {
    /// A mono WAV file, 16-bit integer or 32-bit float PCM.
    file: PathBuf,
    /// Ingest endpoints, comma-separated: the session goes to the first that accepts the
    /// connection, in order, and after a dropped connection resumes on the first that
    /// accepts one.
    #[arg(
        long = "url",
        env = "ASR_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/v1/stream"
    )]
    urls: Vec<String>,
    /// How long to keep trying the endpoints (with backoff) while none accepts a
    /// connection: at the start, and after each drop before the session resumes.
    #[arg(long, env = "ASR_CONNECT_PATIENCE_SECS", default_value_t = 60)]
    connect_patience_secs: u64,
    /// The model to transcribe with.
    #[arg(long, env = "ASR_MODEL", default_value = "whisper-tiny.en")]
    model: String,
    /// 1 = real time, N = N times faster, 0 = as fast as acknowledgements allow.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Audio per frame, in milliseconds.
    #[arg(long, default_value_t = 100)]
    chunk_ms: u32,
    /// Seconds to wait for the transcript once all audio is sent.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Do not show partials and progress on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// The tenant's API key. Without it, the local key `asr up` created is used.
    #[arg(long, env = "ASR_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    state: StateDir,
}

pub async fn run(args: TranscribeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.speed >= 0.0, "--speed must be 0 (unpaced) or positive");
    let recording = Recording::read(&args.file)?;
    let api_key = args.state.key_or_local(args.api_key.clone())?;
    let options = StreamOptions {
        urls: args.urls.clone(),
        reconnect_patience: Duration::from_secs(args.connect_patience_secs),
        api_key: api_key.map(Secret),
        model: args.model.clone(),
        chunk_ms: args.chunk_ms.max(10),
        speed: args.speed,
        completion_timeout: Duration::from_secs(args.timeout_secs),
        ..StreamOptions::default()
    };
    let quiet = args.quiet;
    let mut stderr = std::io::stderr();
    let show = |message: &ServerMessage| {
        if quiet {
            return;
        }
        // One live line for the open segment, a fresh line for each final.
        let _ = match message {
            ServerMessage::Queued { position } => {
                writeln!(stderr, "waiting for a worker (position {position})")
            }
            ServerMessage::Resumed { next_seq, .. } => writeln!(
                stderr,
                "\r\x1b[2Kconnection lost: session resumed, sending again from frame {next_seq}"
            ),
            ServerMessage::Partial(s) => write!(stderr, "\r\x1b[2K… {}", s.text),
            ServerMessage::Final(s) => writeln!(
                stderr,
                "\r\x1b[2K[{:>7.2}s – {:>7.2}s] {}",
                s.start_ms as f64 / 1000.0,
                s.end_ms as f64 / 1000.0,
                s.text
            ),
            _ => Ok(()),
        };
    };
    let outcome = client::stream(&options, &recording, show)
        .await
        .with_context(|| format!("transcribing {}", args.file.display()))?;
    if !outcome.missing_segments.is_empty() {
        anyhow::bail!(
            "the transcript of session {} is missing segments {:?}",
            outcome.session_id,
            outcome.missing_segments
        );
    }
    println!("{}", outcome.transcript);
    Ok(())
}
