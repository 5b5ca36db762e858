//! `asr replay SESSION`: an archived session from the read models. `--wav FILE` writes
//! its audio exactly as the client sent it; `--retranscribe` decodes that audio again
//! with the recognizer's model and settings and compares the result with the
//! transcript of record (word diff, word error rate).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use client::Recording;
use client::words::{WordEdit, word_diff, word_error_rate, words};
use indicatif::{ProgressBar, ProgressStyle};
use projector::config::DatabaseArgs;
use recognizer::config::ModelArgs;

#[derive(Args, Debug)]
#[group(id = "output", required = true, multiple = true, args = ["wav", "retranscribe"])]
pub struct ReplayArgs {
    /// The session id (from `opened`, the logs or the audit API).
    session: uuid::Uuid,
    /// Write the session's audio to this WAV file: the same PCM bytes the client sent,
    /// in its format.
    #[arg(long)]
    wav: Option<PathBuf>,
    /// Decode the archived audio again and compare with the transcript of record.
    #[arg(long)]
    retranscribe: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let store = args
        .database
        .connect()
        .await
        .context("opening the read models (is PostgreSQL up? `asr up` runs the projector)")?;
    let audio = projector::audit::session_audio(store.pool(), args.session).await?;
    let recording = Recording {
        format: audio.format,
        pcm: audio.pcm,
    };
    eprintln!(
        "session {}: {} chunks, {:.1} s of {} Hz {} audio",
        args.session,
        audio.chunks,
        recording.duration_secs(),
        recording.format.sample_rate,
        recording.format.encoding.name()
    );
    if let Some(wav) = &args.wav {
        recording.write(wav)?;
        eprintln!("wrote {}", wav.display());
    }
    if args.retranscribe {
        let original = projector::audit::session_transcript(store.pool(), args.session).await?;
        let again = retranscribe(&args.model, recording).await?;
        print_comparison(&original, &again);
    }
    Ok(())
}

/// Decodes the recording as a worker would, showing progress on stderr.
async fn retranscribe(model: &ModelArgs, recording: Recording) -> anyhow::Result<String> {
    let spinner = ProgressBar::new_spinner().with_message("loading the model");
    let (whisper, vads) = model.load().await?;
    spinner.finish_and_clear();
    tokio::task::spawn_blocking(move || {
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("decoding {bar:40} {percent:>3}% ({eta} left)")
                .expect("a valid template"),
        );
        let finals = recognizer::offline::transcribe(
            whisper,
            vads,
            recording.format,
            &recording.pcm,
            |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        );
        bar.finish_and_clear();
        let finals = finals?;
        Ok(eventlog::results::join_finals(
            finals.iter().map(|f| f.text.as_str()),
        ))
    })
    .await?
}

/// The transcript of record, the new one, their word diff (`[-removed-]`, `{+added+}`)
/// and the word error rate of the new one against the record.
fn print_comparison(original: &str, again: &str) {
    println!("original:      {original}");
    println!("retranscribed: {again}");
    let diff: Vec<String> = word_diff(original, again)
        .into_iter()
        .map(|edit| match edit {
            WordEdit::Same(w) => w,
            WordEdit::Removed(w) => format!("[-{w}-]"),
            WordEdit::Added(w) => format!("{{+{w}+}}"),
        })
        .collect();
    println!("diff:          {}", diff.join(" "));
    println!(
        "word error rate: {:.3} ({} words of record)",
        word_error_rate(original, again),
        words(original).len()
    );
}
