//! The ingest node's settings: flags with environment fallbacks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use eventlog::config::SharedArgs;

use crate::protocol::Limits;
use crate::resume::ResumeTokens;
use crate::session::SessionConfig;
use crate::tenants::{KeyArgs, KeyError};

#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct IngestArgs {
    /// Address of the WebSocket endpoint and of /metrics, /healthz, /readyz.
    #[arg(long, env = "ASR_INGEST_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// This node's name in events and producer names; unique per node.
    #[arg(long, env = "ASR_INGEST_NODE_ID", default_value_t = default_node_id())]
    pub node_id: String,
    /// Models this node accepts in `open`, comma-separated.
    #[arg(
        long,
        env = "ASR_INGEST_MODELS",
        value_delimiter = ',',
        default_value = "whisper-tiny.en"
    )]
    pub models: Vec<String>,
    /// Largest text or binary frame accepted, in bytes.
    #[arg(long, env = "ASR_INGEST_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,
    /// Most audio one session may carry, in seconds.
    #[arg(long, env = "ASR_INGEST_MAX_SESSION_SECS", default_value_t = 14_400)]
    pub max_session_secs: u64,
    /// Most sessions one tenant may have open on this node at once (more are refused
    /// with `tenant_session_limit` and a retry hint).
    #[arg(
        long,
        env = "ASR_INGEST_MAX_SESSIONS_PER_TENANT",
        default_value_t = 1_000
    )]
    pub max_sessions_per_tenant: usize,
    /// Most sessions of this node waiting for a worker at once; a session the
    /// orchestrator queues beyond that is refused (`too_many_waiting`, with a retry
    /// hint) rather than left waiting.
    #[arg(long, env = "ASR_INGEST_MAX_WAITING_SESSIONS", default_value_t = 1_000)]
    pub max_waiting_sessions: usize,
    /// Most WebSocket connections served at once.
    #[arg(long, env = "ASR_INGEST_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Seconds between server pings.
    #[arg(long, env = "ASR_INGEST_PING_INTERVAL_SECS", default_value_t = 20)]
    pub ping_interval_secs: u64,
    /// A connection from which nothing (not even a pong) arrives for this many seconds
    /// is closed.
    #[arg(long, env = "ASR_INGEST_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// The secret resume tokens are signed with. Every ingest node of a deployment
    /// needs the same one, for a session to resume on any node and after a restart;
    /// without it the node draws its own, and its sessions resume only on it until it
    /// restarts. `asr up` writes one to its state folder.
    #[arg(long, env = "ASR_RESUME_SECRET", hide_env_values = true)]
    pub resume_secret: Option<String>,
    #[command(flatten)]
    pub shared: SharedArgs,
}

fn default_node_id() -> String {
    format!("ingest-{:08x}", rand::random::<u32>())
}

impl IngestArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_session_secs: self.max_session_secs,
            ping_interval_secs: self.ping_interval_secs.max(1),
            idle_timeout_secs: self.idle_timeout_secs.max(1),
        }
    }

    pub fn session_config(&self) -> Result<Arc<SessionConfig>, KeyError> {
        Ok(Arc::new(SessionConfig {
            models: self.models.clone(),
            limits: self.limits(),
            keys: self.keys.load()?,
            tokens: match &self.resume_secret {
                Some(secret) => ResumeTokens::new(secret.as_bytes()),
                None => ResumeTokens::random(),
            },
        }))
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.limits().ping_interval_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.limits().idle_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ingest: IngestArgs,
    }

    #[test]
    fn defaults_and_model_list() {
        let cli = Cli::parse_from(["ingest", "--models", "a,b"]);
        let args = cli.ingest;
        assert_eq!(args.models, vec!["a".to_string(), "b".to_string()]);
        assert!(args.node_id.starts_with("ingest-") && args.node_id.len() == 15);
        assert_eq!(args.limits().max_frame_bytes, 65_536);
        assert!(args.keys.load().unwrap().locks_everyone_out());
    }

    #[test]
    fn keys_from_the_flag_and_a_file() {
        let dir = std::env::temp_dir().join(format!("asr-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "# local\nlocal local-key-0123456789\n").unwrap();
        let cli = Cli::parse_from([
            "ingest",
            "--api-keys",
            "a=a-key-0123456789ab,b=b-key-0123456789ab",
            "--api-keys-file",
            file.to_str().unwrap(),
        ]);
        let keys = cli.ingest.keys.load().unwrap();
        assert_eq!(keys.tenants(), 3);
        assert_eq!(
            keys.authenticate(Some("local-key-0123456789")),
            Ok("local".into())
        );
        assert_eq!(
            keys.authenticate(Some("b-key-0123456789ab")),
            Ok("b".into())
        );
        assert!(Cli::try_parse_from(["ingest", "--api-keys", "a=short"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
