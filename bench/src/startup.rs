//! `asr-bench startup --runs 10`: how long a recognizer takes from its process being
//! started to taking sessions (registered with the orchestrator leader): the worker
//! start-up time a scaling policy must look ahead by, and the default of
//! `--worker-startup-ms`.
//!
//! One orchestrator and ingest run with no recognizer; each run starts one recognizer
//! process (model load, connections, registration), waits for its registry record,
//! and SIGKILLs it.

use std::path::Path;
use std::time::{Duration, Instant};

use orchestrator::registry::{Fence, Registry};
use testkit::system::{System, SystemConfig};

use crate::percentile;

const POLL: Duration = Duration::from_millis(5);
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn run(bin: &Path, runs: usize) -> anyhow::Result<()> {
    let mut system = System::start(
        bin,
        SystemConfig {
            recognizers: 0,
            ..SystemConfig::default()
        },
    )
    .await;
    let redis =
        redis::aio::ConnectionManager::new(redis::Client::open(system.redis_url.as_str())?).await?;
    // Read only: a registry that does not lead writes nothing.
    let registry = Registry::new(redis, system.namespace.clone(), Fence::default());
    let mut startups = Vec::with_capacity(runs);
    for run in 1..=runs {
        let worker = format!("startup-{run}");
        let started = Instant::now();
        system.spawn_recognizer(&worker, &[]);
        while registry.worker(&worker).await?.is_none() {
            anyhow::ensure!(
                started.elapsed() < RUN_TIMEOUT,
                "{worker} did not register within {RUN_TIMEOUT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
        let took = started.elapsed();
        eprintln!(
            "[{run}/{runs}] {worker} registered {} ms after its start",
            took.as_millis()
        );
        startups.push(took.as_secs_f64() * 1000.0);
        system.kill(&worker).await;
    }
    system.stop().await;
    let max = startups.iter().copied().fold(0.0, f64::max);
    println!(
        "\n{runs} recognizer starts, from the process started to registered with the leader\n"
    );
    println!("| p50 | p99 | max |");
    println!("|---|---|---|");
    println!(
        "| {:.0} ms | {:.0} ms | {max:.0} ms |",
        percentile(&mut startups, 50.0),
        percentile(&mut startups, 99.0)
    );
    Ok(())
}
