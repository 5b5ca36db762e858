//! `asr-bench leader --kills 20`: how long the system is without an orchestrator
//! leader when the leader is SIGKILLed.
//!
//! Two orchestrator replicas and one recognizer run; each round SIGKILLs the replica
//! holding the leader lock, measures the time until the other holds it (the lock in
//! Redis names the new leader) and until the recognizer has registered with the new
//! leader (its registry record's `registered_at_ms`), then starts the killed replica
//! again as the next round's standby. No session runs: a leader's death does not pause
//! decoding (workers append results straight to the log), so what this measures is
//! the window in which allocations and failovers wait.

use std::path::Path;
use std::time::{Duration, Instant};

use eventlog::now_ms;
use orchestrator::registry::{Fence, Registry};
use testkit::system::{System, SystemConfig};

use crate::percentile;

/// Polling period of the lock and the registry.
const POLL: Duration = Duration::from_millis(2);
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(bin: &Path, kills: usize, lease_ms: u64) -> anyhow::Result<()> {
    let mut system = System::start(
        bin,
        SystemConfig {
            orchestrators: 2,
            recognizers: 1,
            env: vec![("ASR_ORCHESTRATOR_LEASE_MS".into(), lease_ms.to_string())],
            ..SystemConfig::default()
        },
    )
    .await;
    // Read only: a registry that does not lead writes nothing.
    let redis =
        redis::aio::ConnectionManager::new(redis::Client::open(system.redis_url.as_str())?).await?;
    let registry = Registry::new(redis, system.namespace.clone(), Fence::default());
    let mut elected = Vec::with_capacity(kills);
    let mut reregistered = Vec::with_capacity(kills);
    for round in 1..=kills {
        let (leader, token) = system.leader().await.expect("a leader");
        // The standby must be up (campaigning) before its predecessor dies.
        wait_registered_after(&registry, 0).await?;
        let killed_ms = now_ms();
        let killed = Instant::now();
        system.kill(&leader).await;
        let (successor, new_token) = system.leader_after(Some(token)).await;
        let to_leader = killed.elapsed();
        wait_registered_after(&registry, killed_ms).await?;
        let to_registered = killed.elapsed();
        anyhow::ensure!(successor != leader, "{leader} led again after its SIGKILL");
        eprintln!(
            "[{round}/{kills}] killed {leader} (token {token}): {successor} leads (token {new_token}) after {} ms, recognizer registered after {} ms",
            to_leader.as_millis(),
            to_registered.as_millis()
        );
        elected.push(to_leader.as_secs_f64() * 1000.0);
        reregistered.push(to_registered.as_secs_f64() * 1000.0);
        system.restart(&leader).await;
        // Let the restarted replica connect and campaign before the next kill.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    system.stop().await;

    println!(
        "\n{kills} SIGKILLs of the orchestrator leader, lease {lease_ms} ms (renewed and campaigned for every {} ms)\n",
        lease_ms / 5
    );
    println!("| from SIGKILL of the leader to | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (what, values) in [
        ("the standby holding the lock", &mut elected),
        ("the recognizer registered with it", &mut reregistered),
    ] {
        let max = values.iter().copied().fold(0.0, f64::max);
        println!(
            "| {what} | {:.0} ms | {:.0} ms | {max:.0} ms |",
            percentile(values, 50.0),
            percentile(values, 99.0)
        );
    }
    Ok(())
}

/// Waits until the recognizer's registration is newer than `after_ms`.
async fn wait_registered_after(registry: &Registry, after_ms: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + ROUND_TIMEOUT;
    loop {
        let worker = registry.worker("recognizer-1").await?;
        if worker.is_some_and(|w| w.registered_at_ms > after_ms) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the recognizer did not register again within {ROUND_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}
