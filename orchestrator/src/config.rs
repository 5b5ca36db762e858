//! The orchestrator's command-line flags, each with an environment fallback.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use eventlog::config::SharedArgs;

#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct OrchestratorArgs {
    /// Where the WorkerManager gRPC API listens.
    #[arg(
        long,
        env = "ASR_ORCHESTRATOR_GRPC_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub grpc_addr: SocketAddr,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(
        long,
        env = "ASR_ORCHESTRATOR_HTTP_ADDR",
        default_value = "127.0.0.1:9101"
    )]
    pub http_addr: SocketAddr,
    /// A worker with no heartbeat for this long is presumed dead and its sessions move.
    #[arg(
        long,
        env = "ASR_ORCHESTRATOR_HEARTBEAT_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub heartbeat_timeout_ms: u64,
    #[command(flatten)]
    pub shared: SharedArgs,
}

impl OrchestratorArgs {
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
}
