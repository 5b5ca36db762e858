//! Start-up and serving: connects to the broker and Redis, creates the deployment's
//! streams, binds the gRPC API and the ops HTTP endpoints, and runs the heartbeat
//! monitor until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use eventlog::log::StreamLog;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};
use uuid::Uuid;

use crate::api::worker_manager_server::WorkerManagerServer;
use crate::config::OrchestratorArgs;
use crate::registry::Registry;
use crate::service::{Appenders, Disconnects, WorkerManagerService};
use crate::telemetry;

/// Bounds one encoded control or heartbeat event (a heartbeat lists a worker's
/// sessions, a few hundred bytes each).
const MAX_EVENT_BYTES: usize = 64 * 1024;

/// An orchestrator with its listeners bound, not serving yet.
pub struct Orchestrator {
    service: WorkerManagerService,
    disconnects: Disconnects,
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    monitor_period: Duration,
}

impl Orchestrator {
    /// Connects to its dependencies, creates the streams and binds both listeners
    /// (port 0 picks a free port; see [`Self::grpc_addr`]).
    pub async fn bind(args: OrchestratorArgs) -> anyhow::Result<Self> {
        let layout = args.shared.layout();
        let log = StreamLog::connect(&args.shared.log_config()).await?;
        log.ensure_streams(&layout.all_streams()).await?;
        let redis = args
            .shared
            .redis()
            .await
            .with_context(|| format!("connecting to Redis at {}", args.shared.redis_url))?;
        let registry = Registry::new(redis, args.shared.namespace.clone());

        // A fresh incarnation per process: the broker deduplicates by producer name,
        // so two processes (or a restarted one) must never share a name.
        let producer = format!("orchestrator.{}", Uuid::new_v4().simple());
        let control = log
            .appender(
                &layout.control_stream(),
                &format!("{producer}.control"),
                false,
                MAX_EVENT_BYTES,
            )
            .await?;
        let heartbeats = log
            .appender(
                &layout.heartbeat_stream(),
                &format!("{producer}.heartbeats"),
                false,
                MAX_EVENT_BYTES,
            )
            .await?;
        let (service, disconnects) = WorkerManagerService::new(
            registry.clone(),
            Appenders {
                control: control.clone(),
                heartbeats,
                producer,
            },
            args.heartbeat_timeout(),
        );

        let readiness = Arc::new(Readiness {
            registry,
            producer: control.name().to_string(),
            stream: control.stream().to_string(),
            log,
        });
        let http_addr = observability::serve(args.http_addr, observability::ops_router(readiness))
            .await
            .with_context(|| format!("binding the ops HTTP server on {}", args.http_addr))?;
        let grpc = TcpListener::bind(args.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC API on {}", args.grpc_addr))?;
        let grpc_addr = grpc.local_addr()?;
        Ok(Self {
            service,
            disconnects,
            grpc,
            grpc_addr,
            http_addr,
            // Several checks per timeout keep detection close to the timeout itself.
            monitor_period: (args.heartbeat_timeout() / 4)
                .clamp(Duration::from_millis(10), Duration::from_secs(1)),
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let service = self.service;
        let monitor = tokio::spawn(monitor(service.clone(), self.monitor_period));
        let disconnects = tokio::spawn(service.clone().handle_disconnects(self.disconnects));
        let stopping = service.clone();
        let shutdown = async move {
            shutdown.await;
            info!("orchestrator shutting down");
            // Worker streams never end by themselves; end them so shutdown can finish.
            stopping.disconnect_all().await;
        };
        let served = tonic::transport::Server::builder()
            .add_service(WorkerManagerServer::new(service.clone()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.grpc), shutdown)
            .await;
        for task in [monitor, disconnects] {
            task.abort();
            let _ = task.await;
        }
        service.close().await;
        served.context("serving the gRPC API")
    }
}

/// Runs the orchestrator until `shutdown` resolves.
pub async fn run(
    args: OrchestratorArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let orchestrator = Orchestrator::bind(args).await?;
    info!(
        grpc = %orchestrator.grpc_addr(),
        http = %orchestrator.http_addr(),
        "orchestrator listening"
    );
    orchestrator.serve(shutdown).await
}

/// Detects silent workers and keeps the gauges current.
async fn monitor(service: WorkerManagerService, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(e) = service.expire_silent_workers().await {
            warn!(error = %e, "checking worker heartbeats");
        }
        if let Err(e) = telemetry::refresh_gauges(service.registry()).await {
            warn!(error = %e, "refreshing gauges");
        }
    }
}

/// Ready when Redis and the broker both answer.
struct Readiness {
    registry: Registry,
    log: StreamLog,
    /// The control appender's producer name and stream, for a harmless broker query.
    producer: String,
    stream: String,
}

#[async_trait::async_trait]
impl observability::Readiness for Readiness {
    async fn check(&self) -> Result<(), String> {
        self.registry
            .ping()
            .await
            .map_err(|e| format!("redis: {e}"))?;
        // A metadata round trip on the broker's stream connection.
        self.log
            .last_publishing_id(&self.producer, &self.stream)
            .await
            .map_err(|e| format!("rabbitmq: {e}"))?;
        Ok(())
    }
}
