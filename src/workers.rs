//! `asr workers`: the recognizer workers as the orchestrator's registry holds them, and
//! draining one for maintenance (it takes no new sessions; the autoscaler retires it
//! once its sessions end, or hands them off after the drain timeout, and replaces its
//! capacity).

use anyhow::Context as _;
use clap::{Args, Subcommand};
use eventlog::config::SharedArgs;
use orchestrator::api::DrainWorkerRequest;
use orchestrator::discovery::LeaderClient;
use orchestrator::registry::{Fence, Registry};

#[derive(Args, Debug)]
pub struct WorkersArgs {
    #[command(subcommand)]
    command: WorkersCommand,
}

#[derive(Subcommand, Debug)]
enum WorkersCommand {
    /// Every registered worker: model, sessions served out of capacity, draining.
    List {
        #[command(flatten)]
        shared: SharedArgs,
    },
    /// Take a worker out of service without losing any of its sessions.
    Drain {
        /// The worker id (`asr workers list` shows them).
        worker: String,
        #[command(flatten)]
        shared: SharedArgs,
    },
}

pub async fn run(args: WorkersArgs) -> anyhow::Result<()> {
    let shared = match &args.command {
        WorkersCommand::List { shared } | WorkersCommand::Drain { shared, .. } => shared,
    };
    let redis = shared
        .redis()
        .await
        .with_context(|| format!("connecting to Redis at {}", shared.redis_url))?;
    let namespace = shared.namespace.clone();
    match args.command {
        WorkersCommand::List { .. } => {
            let registry = Registry::new(redis, namespace, Fence::default());
            let workers = registry.workers().await?;
            if workers.is_empty() {
                println!("no worker is registered (is the system up?)");
            }
            for w in workers {
                println!(
                    "{}\t{}\t{}/{} sessions{}",
                    w.id,
                    w.model,
                    w.sessions.len(),
                    w.capacity,
                    if w.draining { "\tdraining" } else { "" }
                );
            }
        }
        WorkersCommand::Drain { worker, .. } => {
            let leaders = LeaderClient::new(redis, &namespace);
            let (leader, mut client) = leaders
                .client_of_leader()
                .await
                .map_err(|s| anyhow::anyhow!("no orchestrator leader: {}", s.message()))?;
            let drained = client
                .drain_worker(DrainWorkerRequest {
                    worker_id: worker.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{} refused: {}", leader.replica, s.message()))?
                .into_inner();
            if !drained.found {
                anyhow::bail!("no worker {worker} is registered (see `asr workers list`)");
            }
            println!(
                "{worker} is draining: {} session(s) to finish or hand off",
                drained.sessions
            );
        }
    }
    Ok(())
}
