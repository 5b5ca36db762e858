//! The recognizer's command-line flags, each with an `ASR_...` environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use eventlog::config::SharedArgs;

use crate::engine::sherpa::{DEFAULT_TAIL_PADDING_FRAMES, WhisperSettings};

fn default_worker_id() -> String {
    format!("recognizer-{:08x}", rand::random::<u32>())
}

/// The model files and decoder settings: shared by the worker and offline decoding
/// (`asr replay --retranscribe`), which must decode alike.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Folder with the Whisper tiny.en int8 files (deploy/runtime.sh puts them here).
    #[arg(
        long,
        env = "ASR_MODEL_DIR",
        default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../.runtime/models/whisper-tiny.en")
    )]
    pub model_dir: PathBuf,
    /// The silero VAD model.
    #[arg(
        long,
        env = "ASR_VAD_MODEL",
        default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../.runtime/models/silero_vad.onnx")
    )]
    pub vad_model: PathBuf,
    /// Decoder threads. Fixed, which also keeps decoding deterministic.
    #[arg(long, env = "ASR_RECOGNIZER_THREADS", default_value_t = 2)]
    pub threads: u16,
    /// Silent frames (10 ms) Whisper decodes after each segment to find its end; the
    /// decode time grows with it (docs/BENCHMARKS.md, `asr-bench decode`).
    #[arg(
        long,
        env = "ASR_RECOGNIZER_TAIL_PADDING_FRAMES",
        default_value_t = DEFAULT_TAIL_PADDING_FRAMES
    )]
    pub tail_padding_frames: u16,
}

impl ModelArgs {
    pub fn whisper(&self) -> WhisperSettings {
        WhisperSettings {
            threads: self.threads,
            tail_padding_frames: self.tail_padding_frames,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct RecognizerArgs {
    /// This worker's id (stable across restarts if you want the orchestrator to see a
    /// restart as the same worker).
    #[arg(long, env = "ASR_WORKER_ID", default_value_t = default_worker_id())]
    pub worker_id: String,
    /// The model this worker serves (what sessions ask for).
    #[arg(long, env = "ASR_MODEL_NAME", default_value = "whisper-tiny.en")]
    pub model_name: String,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sessions served at once (they share one loaded model).
    #[arg(long, env = "ASR_RECOGNIZER_CAPACITY", default_value_t = 1)]
    pub capacity: u32,
    /// How often the open segment is re-decoded for a partial (0 disables partials).
    #[arg(
        long,
        env = "ASR_RECOGNIZER_PARTIAL_INTERVAL_MS",
        default_value_t = 600
    )]
    pub partial_interval_ms: u64,
    /// A session whose input stays silent this long (no audio, no end of stream) is
    /// completed with what was received: its client dropped and did not resume. Longer
    /// than clients keep reconnecting (`asr transcribe`: 60 s).
    #[arg(long, env = "ASR_RECOGNIZER_ABANDON_AFTER_SECS", default_value_t = 120)]
    pub abandon_after_secs: u64,
    /// Heartbeat period towards the orchestrator.
    #[arg(long, env = "ASR_HEARTBEAT_INTERVAL_MS", default_value_t = 200)]
    pub heartbeat_interval_ms: u64,
    /// Where /metrics, /healthz and /readyz are served (port 0: any free port).
    #[arg(long, env = "ASR_RECOGNIZER_HTTP_ADDR", default_value = "127.0.0.1:0")]
    pub http_addr: SocketAddr,
    #[command(flatten)]
    pub shared: SharedArgs,
}

impl RecognizerArgs {
    pub fn partial_interval(&self) -> Option<Duration> {
        (self.partial_interval_ms > 0).then(|| Duration::from_millis(self.partial_interval_ms))
    }

    pub fn abandon_after(&self) -> Duration {
        Duration::from_secs(self.abandon_after_secs.max(1))
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RecognizerArgs,
    }

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from(["recognizer"]).unwrap();
        let args = cli.args;
        assert!(args.worker_id.starts_with("recognizer-"));
        assert_eq!(args.worker_id.len(), "recognizer-".len() + 8);
        assert_eq!(args.capacity, 1);
        assert_eq!(args.partial_interval(), Some(Duration::from_millis(600)));
        assert!(
            args.model
                .model_dir
                .ends_with(".runtime/models/whisper-tiny.en")
        );
        assert_eq!(args.http_addr.port(), 0);
    }
}
