//! The orchestrator's Prometheus metrics, named in one place.

use crate::allocator::WorkerState;
use crate::registry::{Registry, RegistryError};

const WORKERS: &str = "orchestrator_workers";
const SESSIONS_WAITING: &str = "orchestrator_sessions_waiting";
const ALLOCATIONS: &str = "orchestrator_allocations_total";
const WORKERS_LOST: &str = "orchestrator_workers_lost_total";
const ALLOCATION_WAIT: &str = "orchestrator_allocation_wait_seconds";
const LEADER: &str = "orchestrator_leader";
const TERM_TOKEN: &str = "orchestrator_term_token";
const TERMS: &str = "orchestrator_terms_total";

/// This replica began leading the term with fencing token `token`, or (0) stopped.
pub fn term(token: u64) {
    metrics::gauge!(LEADER).set(if token > 0 { 1.0 } else { 0.0 });
    metrics::gauge!(TERM_TOKEN).set(token as f64);
    if token > 0 {
        metrics::counter!(TERMS).increment(1);
    }
}

/// A session got a worker, `waited_ms` after it joined the queue: on its first
/// request (`first`), or when its previous worker was lost (a failover's wait).
pub fn allocation(waited_ms: u64, first: bool) {
    let assignment = if first { "first" } else { "reassignment" };
    metrics::counter!(ALLOCATIONS, "assignment" => assignment).increment(1);
    metrics::histogram!(ALLOCATION_WAIT, "assignment" => assignment)
        .record(waited_ms as f64 / 1000.0);
}

pub fn worker_lost() {
    metrics::counter!(WORKERS_LOST).increment(1);
}

/// Sets the worker and queue gauges from the registry. Every model gets a value for
/// both states, so a gauge drops to 0 instead of keeping its last non-zero value.
pub async fn refresh_gauges(registry: &Registry) -> Result<(), RegistryError> {
    for model in registry.models().await? {
        let workers = registry.workers_of(&model).await?;
        for state in [WorkerState::Idle, WorkerState::Busy] {
            let count = workers.iter().filter(|w| w.load().state() == state).count();
            metrics::gauge!(WORKERS, "model" => model.clone(), "state" => state.as_str())
                .set(count as f64);
        }
        let waiting = registry.queue_len(&model).await?;
        metrics::gauge!(SESSIONS_WAITING, "model" => model.clone()).set(f64::from(waiting));
    }
    Ok(())
}
