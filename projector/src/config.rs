//! The projector's settings: flags with environment fallbacks.

use std::net::SocketAddr;

use clap::Args;
use eventlog::config::SharedArgs;

/// Where the read models are: shared by the projector and the tools that read them.
#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// The PostgreSQL database of the read models.
    #[arg(
        long,
        env = "ASR_DATABASE_URL",
        default_value = "postgres://asr:asr@127.0.0.1:5432/asr_test",
        hide_env_values = true
    )]
    pub database_url: String,
    /// The schema the read models live in (created, and migrated, on first use).
    #[arg(long, env = "ASR_DATABASE_SCHEMA", default_value = "asr")]
    pub database_schema: String,
}

impl DatabaseArgs {
    pub async fn connect(&self) -> Result<crate::store::Store, crate::store::StoreError> {
        crate::store::Store::connect(&self.database_url, &self.database_schema).await
    }
}

#[derive(Args, Clone, Debug)]
pub struct ProjectorArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The tenants' keys, for the audit API (the same keys ingest uses).
    #[command(flatten)]
    pub keys: ingest::tenants::KeyArgs,
    /// Most events committed in one transaction.
    #[arg(long, env = "ASR_PROJECTOR_BATCH", default_value_t = 500)]
    pub batch: usize,
    /// Where the audit API (`/v1/sessions`, `/openapi.json`) and /metrics, /healthz and
    /// /readyz are served.
    #[arg(
        long,
        env = "ASR_PROJECTOR_HTTP_ADDR",
        default_value = "127.0.0.1:9301"
    )]
    pub http_addr: SocketAddr,
    #[command(flatten)]
    pub shared: SharedArgs,
}
