//! `asr`: the one binary of the pipeline. Each role runs as its own process
//! (`asr ingest`, `asr orchestrator`, `asr recognizer`); `asr up` supervises all of them
//! on one machine; `asr transcribe` streams a WAV file through a running system.

mod local_key;
mod shutdown;
mod transcribe;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "asr",
    version,
    about = "Live speech recognition on RabbitMQ streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole system on this machine: orchestrator, ingest and recognizer
    /// workers as supervised child processes.
    Up(up::UpArgs),
    /// Run the WebSocket ingest gateway.
    Ingest(ingest::IngestArgs),
    /// Run the orchestrator (worker manager, gRPC).
    Orchestrator(orchestrator::OrchestratorArgs),
    /// Run a recognition worker.
    Recognizer(recognizer::RecognizerArgs),
    /// Stream a WAV file (16-bit or float PCM, 8/16/48 kHz) to ingest and print the
    /// transcript.
    Transcribe(transcribe::TranscribeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    observability::init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Ingest(args) => ingest::run(args, shutdown::signal()).await,
            Command::Orchestrator(args) => orchestrator::run(args, shutdown::signal()).await,
            Command::Recognizer(args) => recognizer::run(args, shutdown::signal()).await,
            Command::Transcribe(args) => transcribe::run(args).await,
        }
    })
}
