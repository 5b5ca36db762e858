//! `asr`: the one binary of the pipeline. Each role runs as its own process
//! (`asr ingest`, `asr orchestrator`, `asr recognizer`, `asr projector`); `asr up`
//! supervises all of them on one machine; `asr transcribe` streams a WAV file through a
//! running system; `asr sessions` and `asr replay` read the audit trail; `asr simulate`
//! replays an arrival trace (`asr trace` generates one) through the scaling policies.

mod local_key;
mod replay;
mod sessions;
mod shutdown;
mod simulate;
mod transcribe;
mod up;
mod workers;

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
    /// Run the projector: the event streams into PostgreSQL read models.
    Projector(projector::ProjectorArgs),
    /// An archived session: its audio as a WAV file (`--wav`), or decoded again and
    /// compared with the transcript of record (`--retranscribe`).
    Replay(replay::ReplayArgs),
    /// List and show sessions through the audit API, as the key's tenant.
    Sessions(sessions::SessionsArgs),
    /// Stream a WAV file (16-bit or float PCM, 8/16/48 kHz) to ingest and print the
    /// transcript.
    Transcribe(transcribe::TranscribeArgs),
    /// Replay an arrival trace through scaling policies, in simulated time: allocation
    /// wait, SLO violations and worker-seconds, side by side.
    Simulate(simulate::SimulateArgs),
    /// Generate a call-centre arrival trace (CSV) for `asr simulate`.
    Trace(simulate::TraceArgs),
    /// List the recognizer workers, or drain one for maintenance.
    Workers(workers::WorkersArgs),
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
            Command::Projector(args) => projector::run(args, shutdown::signal()).await,
            Command::Replay(args) => replay::run(args).await,
            Command::Sessions(args) => sessions::run(args).await,
            Command::Transcribe(args) => transcribe::run(args).await,
            Command::Simulate(args) => simulate::run(args),
            Command::Trace(args) => simulate::write_trace(args),
            Command::Workers(args) => workers::run(args).await,
        }
    })
}
