//! What every service of the pipeline exposes to operators.
//!
//! - [`init_tracing`]: structured logs (`RUST_LOG` filter; JSON with `ASR_LOG_FORMAT=json`);
//! - [`install_metrics`]: the process-wide Prometheus recorder;
//! - [`ops_router`]: `/metrics`, `/healthz` (the process is alive) and `/readyz` (its
//!   real dependencies answer), to mount on a service's HTTP server or serve alone
//!   with [`serve`].

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); JSON lines when
/// `ASR_LOG_FORMAT=json`. Safe to call more than once.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("ASR_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Latency buckets (seconds) for every `*_seconds` histogram: from a broker confirm
/// (sub-millisecond) to a slow Whisper decode.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("static bucket list is non-empty")
                .set_buckets_for_metric(
                    Matcher::Suffix("_ratio".into()),
                    &[0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0],
                )
                .expect("static bucket list is non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// A check of the dependencies a service needs to do its work.
#[async_trait::async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// `Err` names what is missing.
    async fn check(&self) -> Result<(), String>;
}

#[derive(Clone)]
struct Ops {
    metrics: PrometheusHandle,
    readiness: Arc<dyn Readiness>,
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn ops_router(readiness: Arc<dyn Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Ops {
            metrics: install_metrics(),
            readiness,
        })
}

async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        ops.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        r#"{"status":"ok"}"#,
    )
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    let (status, body) = match ops.readiness.check().await {
        Ok(()) => (StatusCode::OK, serde_json::json!({"status": "ready"})),
        Err(missing) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "error": missing}),
        ),
    };
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
}

/// Binds `addr` and serves `router` in the background; returns the bound address
/// (useful with port 0).
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "ops HTTP server stopped");
        }
    });
    Ok(bound)
}
