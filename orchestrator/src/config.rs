//! The orchestrator's command-line flags, each with an environment fallback.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use eventlog::config::SharedArgs;

use crate::kubernetes::KubernetesArgs;
use crate::scaling::ScalingArgs;
use crate::scaling_backend::BackendKind;

#[derive(Args, Clone, Debug)]
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
    /// This replica's name in the leader lock and in logs (default: `orchestrator-`
    /// and a random suffix). Run two or more replicas for high availability.
    #[arg(long, env = "ASR_ORCHESTRATOR_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// The gRPC URL clients reach this replica at, published in the leader lock
    /// (default: `http://` and the bound gRPC address).
    #[arg(long, env = "ASR_ORCHESTRATOR_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// How long the leader lock outlives its holder: a SIGKILLed leader is replaced
    /// this long after its last renewal (renewals run five times per lease).
    #[arg(long, env = "ASR_ORCHESTRATOR_LEASE_MS", default_value_t = 500)]
    pub lease_ms: u64,
    /// Where scaling decisions take effect: `off` (no autoscaler), `dry-run` (log
    /// them), `local` (`asr up`'s processes), `kubernetes`.
    #[arg(long, env = "ASR_SCALING_BACKEND", value_enum, default_value_t = BackendKind::Off)]
    pub scaling_backend: BackendKind,
    /// How far back a new leader reads the streams to rebuild the load projection.
    #[arg(long, env = "ASR_LOAD_WINDOW_SECS", default_value_t = 120)]
    pub load_window_secs: u64,
    #[command(flatten)]
    pub scaling: ScalingArgs,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
    #[command(flatten)]
    pub shared: SharedArgs,
}

impl OrchestratorArgs {
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.max(50))
    }
}
