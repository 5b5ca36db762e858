//! The orchestrator's Prometheus metrics, named in one place.

use crate::allocator::WorkerState;
use crate::load::ModelLoad;
use crate::registry::{Registry, RegistryError};

const WORKERS: &str = "orchestrator_workers";
const SESSIONS_WAITING: &str = "orchestrator_sessions_waiting";
const ALLOCATIONS: &str = "orchestrator_allocations_total";
const WORKERS_LOST: &str = "orchestrator_workers_lost_total";
const ALLOCATION_WAIT: &str = "orchestrator_allocation_wait_seconds";
const LEADER: &str = "orchestrator_leader";
const TERM_TOKEN: &str = "orchestrator_term_token";
const TERMS: &str = "orchestrator_terms_total";
const LOAD_SESSIONS: &str = "orchestrator_load_sessions";
const LOAD_ARRIVALS: &str = "orchestrator_load_arrivals_per_minute";
const LOAD_BACKLOG: &str = "orchestrator_load_backlog_seconds";
const LOAD_RTF: &str = "orchestrator_load_real_time_factor";
const LOAD_WORKERS: &str = "orchestrator_load_workers";
const DESIRED_WORKERS: &str = "orchestrator_scaling_desired_workers";
const SCALING_ACTIONS: &str = "orchestrator_scaling_actions_total";
const SCALING_HANDOFFS: &str = "orchestrator_scaling_handoffs_total";

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

/// A model's load projection, as the autoscaler saw it at its last check.
pub fn load(model: &str, load: &ModelLoad) {
    let p = &load.projection;
    let model = model.to_string();
    for (state, n) in [
        ("active", p.active_sessions),
        ("waiting", p.waiting_sessions),
    ] {
        metrics::gauge!(LOAD_SESSIONS, "model" => model.clone(), "state" => state)
            .set(f64::from(n));
    }
    metrics::gauge!(LOAD_ARRIVALS, "model" => model.clone()).set(load.arrivals_per_minute);
    metrics::gauge!(LOAD_BACKLOG, "model" => model.clone()).set(load.backlog_seconds);
    if let Some(rtf) = load.real_time_factor {
        metrics::gauge!(LOAD_RTF, "model" => model.clone()).set(rtf);
    }
    for (state, n) in [
        ("idle", load.workers_idle),
        ("busy", load.workers_busy),
        ("starting", p.workers_starting),
        ("draining", p.workers_draining),
    ] {
        metrics::gauge!(LOAD_WORKERS, "model" => model.clone(), "state" => state).set(f64::from(n));
    }
}

pub fn desired_workers(model: &str, workers: u32) {
    metrics::gauge!(DESIRED_WORKERS, "model" => model.to_string()).set(f64::from(workers));
}

/// The autoscaler started, drained, brought back or retired a worker.
pub fn scaling_action(model: &str, action: &'static str) {
    scaling_action_n(model, action, 1);
}

pub fn scaling_action_n(model: &str, action: &'static str, n: u32) {
    metrics::counter!(SCALING_ACTIONS, "model" => model.to_string(), "action" => action)
        .increment(u64::from(n));
}

/// Sessions a retired worker still served (its drain timed out), moved to others
/// through the checkpoint handoff.
pub fn drain_handoffs(model: &str, sessions: u32) {
    metrics::counter!(SCALING_HANDOFFS, "model" => model.to_string())
        .increment(u64::from(sessions));
}
