//! The ingest node: a WebSocket gateway between live audio clients and the event log.
//!
//! A client opens a session, streams audio frames and gets each one acknowledged once
//! the broker confirmed it; partial and final transcripts stream back as the assigned
//! recognizer appends them. The node keeps no session state beyond its connections:
//! everything a session is lives in the log. The wire protocol is docs/protocol.md.
//!
//! - [`protocol`]: client and server messages, frame parsing, error codes (pure);
//! - [`session`]: one connection's state machine (pure);
//! - [`connection`]: drives a session from its socket, the broker and its results;
//! - [`outbox`]: the bounded sending queue and the slow-reader policy;
//! - [`appenders`]: the node's shared audio producers, one per partition;
//! - [`results_hub`]: the node's tails of the results partitions, fanned out to sessions;
//! - [`server`]: the axum router, readiness, and serving until shutdown;
//! - [`tenants`]: API keys and the tenants they name (pure);
//! - [`quota`]: sessions per tenant on this node, capped;
//! - [`resume`]: resume tokens and the scan of a session's stored input (pure);
//! - [`writers`]: one writer per session on this node (a resume fences the old one);
//! - [`config`]: the flags, [`IngestArgs`];
//! - [`metrics`]: metric names.

pub mod appenders;
pub mod config;
pub mod connection;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod quota;
pub mod results_hub;
pub mod resume;
pub mod server;
pub mod session;
pub mod tenants;
pub mod writers;

use std::future::Future;

use anyhow::Context;

pub use config::IngestArgs;
pub use server::{ServeError, serve};

/// Runs an ingest node on `args.listen` until `shutdown` resolves (`asr ingest`).
pub async fn run(
    args: IngestArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    serve(listener, args, shutdown)
        .await
        .context("ingest node stopped")
}
