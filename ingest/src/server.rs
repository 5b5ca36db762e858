//! The HTTP side: `GET /v1/stream` upgrades to a WebSocket served by
//! [`crate::connection`], beside the operator endpoints (`/metrics`, `/healthz`,
//! `/readyz`) on the same listener.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::response::Response;
use axum::routing::get;
use eventlog::checkpoint::CheckpointStore;
use eventlog::log::StreamLog;
use eventlog::streams::StreamLayout;
use orchestrator::discovery::LeaderClient;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::appenders::AudioAppenders;
use crate::config::IngestArgs;
use crate::connection;
use crate::protocol::Secret;
use crate::quota::TenantQuota;
use crate::results_hub::ResultsHub;
use crate::session::SessionConfig;
use crate::tenants::KeyError;
use crate::writers::Writers;

/// The WebSocket read buffer's size (it grows for a larger frame).
const SOCKET_BUFFER_BYTES: usize = 4 * 1024;

/// How long a stopping node waits for its sessions to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Log(#[from] eventlog::log::LogError),
    #[error("connecting to Redis at {url} (where the orchestrator leader is found): {source}")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("serving HTTP: {0}")]
    Http(#[source] std::io::Error),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(
        "no API keys configured, so no client could open a session: pass --api-keys-file FILE (lines `tenant key`) or --api-keys tenant=key (ASR_API_KEYS), or --allow-anonymous on a trusted network"
    )]
    NoKeys,
}

/// What every connection of the node shares.
pub struct Node {
    pub(crate) session_config: Arc<SessionConfig>,
    pub(crate) node_id: String,
    pub(crate) layout: StreamLayout,
    pub(crate) log: StreamLog,
    pub(crate) appenders: AudioAppenders,
    pub(crate) results: Arc<ResultsHub>,
    /// Where recognizers checkpoint: a resume scans the session's input from there.
    pub(crate) checkpoints: CheckpointStore,
    /// The connection allowed to append each session's input.
    pub(crate) writers: Writers,
    pub(crate) orchestrator: LeaderClient,
    pub(crate) max_connections: usize,
    pub(crate) tenant_quota: Arc<TenantQuota>,
    /// Places for sessions waiting for a worker (`--max-waiting-sessions`).
    pub(crate) waiting: Arc<Semaphore>,
    pub(crate) max_waiting: usize,
    pub(crate) ping_interval: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) shutdown: watch::Receiver<bool>,
    connections: Arc<Semaphore>,
    max_frame_bytes: usize,
}

impl Node {
    /// Connects to the broker (creating the deployment's streams if needed) and to
    /// Redis, where the orchestrator leader is found: ingest starts, and reports not
    /// ready, while there is no leader.
    pub async fn start(
        args: &IngestArgs,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, ServeError> {
        let layout = args.shared.layout();
        let log = StreamLog::connect(&args.shared.log_config()).await?;
        log.ensure_streams(&layout.all_streams()).await?;
        let redis = args
            .shared
            .redis()
            .await
            .map_err(|source| ServeError::Redis {
                url: args.shared.redis_url.clone(),
                source,
            })?;
        let session_config = args.session_config()?;
        if session_config.keys.locks_everyone_out() {
            return Err(ServeError::NoKeys);
        }
        tracing::info!(
            tenants = session_config.keys.tenants(),
            anonymous = args.keys.allow_anonymous,
            "API keys loaded"
        );
        if args.resume_secret.is_none() {
            tracing::warn!(
                "no --resume-secret (ASR_RESUME_SECRET): sessions resume only on this node, until it restarts"
            );
        }
        Ok(Arc::new(Self {
            session_config,
            node_id: args.node_id.clone(),
            appenders: AudioAppenders::new(
                log.clone(),
                layout.clone(),
                &args.node_id,
                args.max_frame_bytes,
            ),
            results: ResultsHub::new(log.clone(), layout.clone()),
            checkpoints: CheckpointStore::new(redis.clone(), args.shared.namespace.clone()),
            writers: Writers::default(),
            layout,
            log,
            orchestrator: LeaderClient::new(redis, &args.shared.namespace),
            max_connections: args.max_connections,
            tenant_quota: TenantQuota::new(args.max_sessions_per_tenant),
            waiting: Arc::new(Semaphore::new(args.max_waiting_sessions)),
            max_waiting: args.max_waiting_sessions,
            ping_interval: args.ping_interval(),
            idle_timeout: args.idle_timeout(),
            shutdown,
            connections: Arc::new(Semaphore::new(args.max_connections)),
            max_frame_bytes: args.max_frame_bytes,
        }))
    }

    /// `/v1/stream` and the operator endpoints.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/stream", get(upgrade))
            .with_state(self.clone())
            .merge(observability::ops_router(Arc::new(Readiness(self.clone()))))
    }
}

async fn upgrade(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|key| Secret(key.trim().to_string()));
    // Over the limit, the upgrade still completes so the client gets a proper error
    // and close code rather than a bare HTTP status.
    let permit = node.connections.clone().try_acquire_owned().ok();
    // Frames above max_frame_bytes are refused by the session with an error message;
    // the transport only stops frames too large to buffer at all.
    let transport_limit = node.max_frame_bytes.saturating_mul(4).max(1 << 16);
    ws.max_message_size(transport_limit)
        .max_frame_size(transport_limit)
        // tungstenite's defaults (128 KiB each) would be most of an idle session's
        // memory; audio frames are a few KiB, and the buffers grow when a frame needs it.
        .read_buffer_size(SOCKET_BUFFER_BYTES)
        .write_buffer_size(0)
        .on_upgrade(move |socket| connection::serve(node, socket, permit, bearer))
}

/// Ready when the broker answers a metadata query and an orchestrator leader is
/// known.
struct Readiness(Arc<Node>);

#[async_trait::async_trait]
impl observability::Readiness for Readiness {
    async fn check(&self) -> Result<(), String> {
        let node = &self.0;
        node.log
            .last_publishing_id(&node.node_id, &node.layout.control_stream())
            .await
            .map_err(|e| format!("broker: {e}"))?;
        match node.orchestrator.leader().await {
            Ok(Some(_)) => {}
            Ok(None) => return Err("orchestrator: no leader at the moment".into()),
            Err(status) => return Err(format!("orchestrator: {}", status.message())),
        }
        Ok(())
    }
}

/// Serves on `listener` until `shutdown` resolves; open sessions are then closed with
/// `shutting_down` (1001) so their clients reconnect elsewhere, and this returns once
/// they are gone.
pub async fn serve(
    listener: TcpListener,
    args: IngestArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (stop, stopped) = watch::channel(false);
    let node = Node::start(&args, stopped.clone()).await?;
    tracing::info!(addr = ?listener.local_addr().ok(), node = %node.node_id, "ingest serving");
    let mut stopping = stopped;
    let server = axum::serve(listener, node.router())
        .with_graceful_shutdown(async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        })
        .into_future();
    tokio::pin!(server);
    let served = tokio::select! {
        result = &mut server => result,
        () = shutdown => {
            let _ = stop.send(true);
            server.await
        }
    };
    // The HTTP server does not track upgraded sockets: wait for the sessions to close
    // (each does within seconds of the stop signal) before closing their producers.
    let _ = stop.send(true);
    let all = u32::try_from(node.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, node.connections.acquire_many(all)).await;
    node.appenders.close().await;
    served.map_err(ServeError::Http)
}
