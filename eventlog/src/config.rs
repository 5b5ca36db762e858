//! Settings every process of the pipeline shares: where the broker and Redis are, the
//! deployment's namespace, and the stream layout. Flags with environment fallbacks.

use std::time::Duration;

use clap::Args;

use crate::log::{LogConfig, Retention};
use crate::streams::StreamLayout;

#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct SharedArgs {
    /// RabbitMQ host (stream protocol).
    #[arg(long, env = "ASR_RABBITMQ_HOST", default_value = "localhost")]
    pub rabbitmq_host: String,
    /// RabbitMQ stream protocol port.
    #[arg(long, env = "ASR_RABBITMQ_STREAM_PORT", default_value_t = 5552)]
    pub rabbitmq_stream_port: u16,
    /// RabbitMQ user.
    #[arg(long, env = "ASR_RABBITMQ_USER", default_value = "guest")]
    pub rabbitmq_user: String,
    /// RabbitMQ password (never logged).
    #[arg(
        long,
        env = "ASR_RABBITMQ_PASSWORD",
        default_value = "guest",
        hide_env_values = true
    )]
    pub rabbitmq_password: String,
    /// Redis URL (checkpoints, worker registry, session assignments).
    #[arg(
        long,
        env = "ASR_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    pub redis_url: String,
    /// Prefix of every stream and Redis key of this deployment.
    #[arg(long, env = "ASR_NAMESPACE", default_value = "asr")]
    pub namespace: String,
    /// Number of audio (and result) stream partitions. Fixed for a deployment's life.
    #[arg(long, env = "ASR_PARTITIONS", default_value_t = 16)]
    pub partitions: u16,
    /// Stream retention by age, in hours.
    #[arg(long, env = "ASR_RETENTION_HOURS", default_value_t = 168)]
    pub retention_hours: u64,
    /// Stream retention by size, per stream, in megabytes.
    #[arg(long, env = "ASR_RETENTION_MB", default_value_t = 20_000)]
    pub retention_mb: u64,
    /// Stream segment size in megabytes (retention drops whole segments;
    /// `--retention-mb` must be at least twice this).
    #[arg(long, env = "ASR_SEGMENT_MB", default_value_t = 100)]
    pub segment_mb: u64,
}

impl SharedArgs {
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            host: self.rabbitmq_host.clone(),
            port: self.rabbitmq_stream_port,
            user: self.rabbitmq_user.clone(),
            password: self.rabbitmq_password.clone(),
            retention: Retention {
                max_age: Duration::from_secs(self.retention_hours * 3600),
                max_bytes: self.retention_mb * 1_000_000,
                segment_bytes: self.segment_mb * 1_000_000,
            },
        }
    }

    pub fn layout(&self) -> StreamLayout {
        StreamLayout::new(self.namespace.clone(), self.partitions)
    }

    /// The same settings as environment variables, for handing them to child processes.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ASR_RABBITMQ_HOST", self.rabbitmq_host.clone()),
            (
                "ASR_RABBITMQ_STREAM_PORT",
                self.rabbitmq_stream_port.to_string(),
            ),
            ("ASR_RABBITMQ_USER", self.rabbitmq_user.clone()),
            ("ASR_RABBITMQ_PASSWORD", self.rabbitmq_password.clone()),
            ("ASR_REDIS_URL", self.redis_url.clone()),
            ("ASR_NAMESPACE", self.namespace.clone()),
            ("ASR_PARTITIONS", self.partitions.to_string()),
            ("ASR_RETENTION_HOURS", self.retention_hours.to_string()),
            ("ASR_RETENTION_MB", self.retention_mb.to_string()),
            ("ASR_SEGMENT_MB", self.segment_mb.to_string()),
        ]
    }

    /// Connects to Redis with automatic reconnection.
    pub async fn redis(&self) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
        let client = redis::Client::open(self.redis_url.as_str())?;
        redis::aio::ConnectionManager::new(client).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        shared: SharedArgs,
    }

    /// Every variable `to_env` hands a child is the env fallback of the flag with the
    /// same name, so parsing the pairs as flags must give back the same settings.
    #[test]
    fn env_round_trips_through_the_flags() {
        let original = Cli::parse_from([
            "x",
            "--namespace=n1",
            "--partitions=3",
            "--redis-url=redis://h/2",
        ])
        .shared;
        let as_flags: Vec<String> = std::iter::once("x".to_string())
            .chain(original.to_env().into_iter().map(|(k, v)| {
                let flag = k
                    .trim_start_matches("ASR_")
                    .to_lowercase()
                    .replace('_', "-");
                format!("--{flag}={v}")
            }))
            .collect();
        assert_eq!(Cli::parse_from(as_flags).shared, original);
    }
}
