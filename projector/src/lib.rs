//! The projector: turns the event streams into PostgreSQL read models for audit and
//! replay (sessions, their archived audio, transcripts, workers, the raw event history,
//! the load per model and minute).
//!
//! Every audio partition, results partition, the control stream and the heartbeats
//! are projected by a task of its own, in transactions that also store the stream's next offset: a
//! projector SIGKILLed at any moment and started again produces the same rows as one
//! that never stopped.
//!
//! - [`api`]: the audit HTTP API and its OpenAPI document;
//! - [`audit`]: reading them back (a session's archived audio, …);
//! - [`projection`]: events to row writes, per kind of stream (pure);
//! - [`store`]: the schema (`migrations/`), positions, and batches committed with
//!   their offsets;
//! - [`runner`]: one stream's read–fold–commit loop;
//! - [`config`]: the flags, [`ProjectorArgs`];
//! - [`metrics`]: metric names.

pub mod api;
pub mod audit;
pub mod config;
pub mod metrics;
pub mod projection;
pub mod runner;
pub mod store;

use std::future::Future;
use std::sync::Arc;

pub use config::ProjectorArgs;
use eventlog::log::StreamLog;
use projection::StreamKind;
use store::Store;

/// Runs the projector until `shutdown` resolves or a stream's projection fails.
pub async fn run(
    args: ProjectorArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let store = args.database.connect().await?;
    let keys = args.keys.load()?;
    if keys.locks_everyone_out() {
        tracing::warn!(
            "no API keys (--api-keys-file, --api-keys): the audit API refuses every request"
        );
    }
    let log = StreamLog::connect(&args.shared.log_config()).await?;
    let layout = args.shared.layout();
    log.ensure_streams(&layout.all_streams()).await?;

    let mut streams = vec![
        (layout.control_stream(), StreamKind::Control),
        (layout.heartbeat_stream(), StreamKind::Heartbeats),
    ];
    for p in 0..layout.partitions {
        streams.push((layout.audio_partition(p), StreamKind::Audio));
        streams.push((layout.results_partition(p), StreamKind::Results));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (stream, kind) in streams {
        tasks.spawn(runner::project(
            log.clone(),
            store.clone(),
            stream,
            kind,
            args.batch.max(1),
        ));
    }
    let readiness = Arc::new(Readiness(store.clone()));
    let router =
        api::router(store.pool().clone(), keys).merge(observability::ops_router(readiness));
    let addr = observability::serve(args.http_addr, router).await?;
    tracing::info!(%addr, schema = %args.database.database_schema, "projector running");
    tokio::select! {
        () = shutdown => {
            tracing::info!("projector stopping");
            Ok(())
        }
        Some(ended) = tasks.join_next() => {
            match ended {
                Ok(Ok(())) => anyhow::bail!("a projection ended"),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Ready when PostgreSQL answers.
struct Readiness(Store);

#[async_trait::async_trait]
impl observability::Readiness for Readiness {
    async fn check(&self) -> Result<(), String> {
        sqlx::query("SELECT 1")
            .execute(self.0.pool())
            .await
            .map(|_| ())
            .map_err(|e| format!("postgres: {e}"))
    }
}
