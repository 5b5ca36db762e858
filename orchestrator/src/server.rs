//! Start-up and serving: connects to the broker and Redis, creates the deployment's
//! streams, binds the gRPC API and the ops HTTP endpoints, campaigns for leadership
//! and, while it leads, runs the heartbeat monitor, until shutdown.

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
use crate::autoscaler::Autoscaler;
use crate::config::OrchestratorArgs;
use crate::kubernetes::KubernetesScaler;
use crate::leadership::{Elector, Leader, TERM_MARK_INTERVAL};
use crate::registry::{Fence, Registry};
use crate::scaling_backend::{Backend, BackendKind};
use crate::service::{Appenders, Disconnects, WorkerManagerService};
use crate::telemetry;

/// Bounds one encoded control or heartbeat event (a heartbeat lists a worker's
/// sessions, a few hundred bytes each).
const MAX_EVENT_BYTES: usize = 64 * 1024;

/// An orchestrator with its listeners bound, not serving yet.
pub struct Orchestrator {
    service: WorkerManagerService,
    disconnects: Disconnects,
    election: Election,
    grpc: TcpListener,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    monitor_period: Duration,
    autoscaler: Option<Autoscaler>,
}

/// What the leadership loop needs.
struct Election {
    elector: Elector,
    fence: Fence,
    log: StreamLog,
    control_stream: String,
    /// Renewal and campaign period: five per lease.
    period: Duration,
    lease: Duration,
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
        let fence = Fence::default();
        let registry = Registry::new(redis.clone(), args.shared.namespace.clone(), fence.clone());

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

        let registry_for_scaling = registry.clone();
        let readiness = Arc::new(Readiness {
            registry,
            producer: control.name().to_string(),
            stream: control.stream().to_string(),
            log: log.clone(),
        });
        let http_addr = observability::serve(args.http_addr, observability::ops_router(readiness))
            .await
            .with_context(|| format!("binding the ops HTTP server on {}", args.http_addr))?;
        let grpc = TcpListener::bind(args.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC API on {}", args.grpc_addr))?;
        let grpc_addr = grpc.local_addr()?;
        let replica = args
            .replica_id
            .clone()
            .unwrap_or_else(|| format!("orchestrator-{:08x}", rand_suffix()));
        let url = args
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{grpc_addr}"));
        let lease = args.lease();
        let election = Election {
            elector: Elector::new(redis, &args.shared.namespace, replica, url, lease),
            fence,
            log: log.clone(),
            control_stream: layout.control_stream(),
            period: lease / 5,
            lease,
        };
        let backend = match args.scaling_backend {
            BackendKind::Off => None,
            BackendKind::DryRun => Some(Backend::DryRun),
            BackendKind::Local => Some(Backend::Local(registry_for_scaling)),
            BackendKind::Kubernetes => Some(Backend::kubernetes(
                KubernetesScaler::connect(&args.kubernetes).await?,
            )),
        };
        let autoscaler = backend.map(|backend| Autoscaler {
            args: args.scaling.clone(),
            backend,
            service: service.clone(),
            log: log.clone(),
            layout: layout.clone(),
            window: Duration::from_secs(args.load_window_secs),
            // Two heartbeat timeouts: the monitor marks such a worker lost first.
            stale_after: args.heartbeat_timeout() * 2,
            drain_timeout: args.scaling.drain_timeout(),
        });
        Ok(Self {
            autoscaler,
            service,
            disconnects,
            election,
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

    /// This replica's name in the leader lock.
    pub fn replica(&self) -> &str {
        self.election.elector.replica()
    }

    /// Serves until `shutdown` resolves: the gRPC API all along (refusing calls while
    /// this replica follows), the election, and the monitor.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let service = self.service;
        let monitor = tokio::spawn(monitor(service.clone(), self.monitor_period));
        let autoscaler = self.autoscaler.map(|a| tokio::spawn(a.run()));
        let disconnects = tokio::spawn(service.clone().handle_disconnects(self.disconnects));
        let (elector, fence) = (self.election.elector.clone(), self.election.fence.clone());
        let leadership = tokio::spawn(lead(service.clone(), self.election));
        let stopping = service.clone();
        let shutdown = async move {
            shutdown.await;
            info!("orchestrator shutting down");
            // Hand the lock over at once rather than after its lease runs out.
            leadership.abort();
            let _ = leadership.await;
            stopping.end_term(&fence).await;
            if let Ok(Some(leader)) = elector.leader().await
                && leader.replica == elector.replica()
                && let Err(e) = elector.resign(&leader).await
            {
                warn!(error = %e, "could not give up the leader lock; it expires by itself");
            }
        };
        let served = tonic::transport::Server::builder()
            .add_service(WorkerManagerServer::new(service.clone()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.grpc), shutdown)
            .await;
        for task in [monitor, disconnects].into_iter().chain(autoscaler) {
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
        replica = orchestrator.replica(),
        "orchestrator listening; campaigning for leadership"
    );
    orchestrator.serve(shutdown).await
}

fn rand_suffix() -> u32 {
    Uuid::new_v4().as_u128() as u32
}

/// Campaigns for the leader lock, leads while it holds it (renewing the lease and
/// marking the term on the control stream), and campaigns again when it lost it.
async fn lead(service: WorkerManagerService, election: Election) {
    let Election {
        elector,
        fence,
        log,
        control_stream,
        period,
        lease,
    } = election;
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let leader: Leader = loop {
            ticks.tick().await;
            match tokio::time::timeout(lease, elector.try_lead(&log, &control_stream)).await {
                Ok(Ok(Some(leader))) => break leader,
                Ok(Ok(None)) => failing = false,
                Ok(Err(e)) if !failing => {
                    failing = true;
                    warn!(error = %e, "campaigning for the leader lock");
                }
                Err(_) if !failing => {
                    failing = true;
                    warn!("campaigning for the leader lock: no answer from Redis");
                }
                _ => {}
            }
        };
        if let Err(e) = service.begin_term(&leader, &fence).await {
            warn!(token = leader.token, error = %e, "could not start the term: giving the lock up");
            service.end_term(&fence).await;
            let _ = elector.resign(&leader).await;
            continue;
        }
        hold(&service, &elector, &leader, period, lease).await;
        service.end_term(&fence).await;
        warn!(token = leader.token, "stopped leading");
    }
}

/// Renews the lease until it is lost, or until renewals have failed for so long that
/// the lease may be about to expire: stepping down first keeps two replicas from both
/// believing they lead (the fence would refuse the older one's writes anyway).
async fn hold(
    service: &WorkerManagerService,
    elector: &Elector,
    leader: &Leader,
    period: Duration,
    lease: Duration,
) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed = tokio::time::Instant::now();
    let mut marked = tokio::time::Instant::now();
    loop {
        ticks.tick().await;
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(period, elector.renew(leader)).await {
            Ok(Ok(true)) => renewed = sent,
            Ok(Ok(false)) => {
                warn!(token = leader.token, "the leader lock is gone or taken");
                return;
            }
            Ok(Err(e)) => warn!(error = %e, "renewing the leader lock"),
            Err(_) => warn!("renewing the leader lock: no answer from Redis"),
        }
        if renewed.elapsed() + period >= lease {
            warn!(
                token = leader.token,
                "no renewal for most of the lease: stepping down"
            );
            return;
        }
        if marked.elapsed() >= TERM_MARK_INTERVAL {
            marked = tokio::time::Instant::now();
            if let Err(e) = service.mark_term(&leader.replica).await {
                warn!(error = %e, "marking the term on the control stream");
            }
        }
    }
}

/// While leading: detects silent workers and keeps the gauges current.
async fn monitor(service: WorkerManagerService, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !service.registry().is_leading() {
            continue;
        }
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
