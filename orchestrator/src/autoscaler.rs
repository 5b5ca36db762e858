//! The autoscaler: while this replica leads, every check interval, each model's load
//! projection goes through the scaling policy and the fleet is reconciled through the
//! backend (start workers, bring draining ones back, drain, retire drained ones).
//!
//! The projection is folded from the streams ([`LoadTracker`]), read from a recent
//! window when the term starts, so a new leader scales from the same facts as the old
//! one. Which workers exist, what they serve and whether they drain comes from the
//! registry, which the leader writes in step with the control events: the autoscaler
//! must see its own drains at once, not a stream round trip later.
//!
//! A drained worker is retired when its last session ends, or when the drain timeout
//! passes: its sessions then move to other workers through the checkpoint handoff
//! ([`WorkerManagerService::retire`]), as after a failure, so nothing is lost.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventlog::log::{ReadFrom, StreamLog};
use eventlog::streams::StreamLayout;
use eventlog::{Event, now_ms};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::load::LoadTracker;
use crate::registry::WorkerRecord;
use crate::scaling::{Scaler, ScalingArgs, ScalingPolicy, WorkerView, reconcile};
use crate::scaling_backend::{Backend, BackendError};
use crate::service::{ServiceError, WorkerManagerService};
use crate::telemetry;

/// How long a new term waits at most for the heartbeat stream to catch up before
/// acting on a projection that may still be missing workers.
const WARM_UP_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// Everything the autoscaler needs, built once at start-up.
pub struct Autoscaler {
    pub args: ScalingArgs,
    pub backend: Backend,
    pub service: WorkerManagerService,
    pub log: StreamLog,
    pub layout: StreamLayout,
    /// How far back a new term reads the streams.
    pub window: Duration,
    /// A worker without a heartbeat for this long drops out of the projection.
    pub stale_after: Duration,
    /// How long a draining worker may keep sessions before they are handed off.
    pub drain_timeout: Duration,
}

/// The state of one leadership term.
struct Term {
    tracker: Arc<Mutex<LoadTracker>>,
    readers: Vec<JoinHandle<()>>,
    scalers: HashMap<String, Scaler<Box<dyn ScalingPolicy + Send>>>,
    decided: HashMap<String, u32>,
    draining_since: HashMap<String, Instant>,
    /// Workers this term drained (and may bring back).
    drained_here: HashSet<String>,
    started: Instant,
    started_ms: u64,
    /// Unix ms of the newest heartbeat folded: caught up once it is from this term.
    newest_heartbeat_ms: Arc<AtomicU64>,
}

impl Drop for Term {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

impl Autoscaler {
    /// Runs until aborted, acting only while this replica leads.
    pub async fn run(self) {
        info!(
            backend = self.backend.name(),
            policy = ?self.args.scaling_policy,
            check_interval_ms = self.args.check_interval().as_millis() as u64,
            "autoscaler on"
        );
        let mut ticker = tokio::time::interval(self.args.check_interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut term: Option<Term> = None;
        loop {
            ticker.tick().await;
            if !self.service.registry().is_leading() {
                term = None;
                continue;
            }
            let current = match &mut term {
                Some(t) => t,
                None => term.insert(self.begin_term()),
            };
            if !current.caught_up() {
                continue;
            }
            if let Err(e) = self.check(current).await {
                warn!(error = %e, "autoscaler check failed; retrying next interval");
            }
        }
    }

    fn begin_term(&self) -> Term {
        let started_ms = now_ms();
        let from = ReadFrom::Timestamp(started_ms.saturating_sub(self.window.as_millis() as u64));
        let tracker = Arc::new(Mutex::new(LoadTracker::new(
            self.stale_after.as_millis() as u64
        )));
        let newest_heartbeat_ms = Arc::new(AtomicU64::new(0));
        let streams = (0..self.layout.partitions)
            .map(|p| self.layout.audio_partition(p))
            .chain([self.layout.control_stream(), self.layout.heartbeat_stream()]);
        let readers = streams
            .map(|stream| {
                let (log, tracker, newest) = (
                    self.log.clone(),
                    tracker.clone(),
                    newest_heartbeat_ms.clone(),
                );
                tokio::spawn(async move { fold_stream(log, stream, from, tracker, newest).await })
            })
            .collect();
        Term {
            tracker,
            readers,
            scalers: HashMap::new(),
            decided: HashMap::new(),
            draining_since: HashMap::new(),
            drained_here: HashSet::new(),
            started: Instant::now(),
            started_ms,
            newest_heartbeat_ms,
        }
    }

    async fn check(&self, term: &mut Term) -> Result<(), CheckError> {
        let now_ms = now_ms();
        let registry = self.service.registry();
        let mut models = term.tracker.lock().expect("tracker lock").models();
        for model in registry.models().await? {
            if !models.contains(&model) {
                models.push(model);
            }
        }
        for model in models {
            let workers = registry.workers_of(&model).await?;
            let views: Vec<WorkerView> = workers.iter().map(view).collect();
            let starting = self.backend.starting(&model, &views).await?;
            let mut load = term
                .tracker
                .lock()
                .expect("tracker lock")
                .load(&model, starting, now_ms);
            // Membership from the registry (see the module doc); the rest from events.
            load.projection.workers_ready = views.iter().filter(|v| !v.draining).count() as u32;
            load.projection.workers_draining = views.iter().filter(|v| v.draining).count() as u32;
            if let Some(capacity) = workers.iter().map(|w| w.capacity).max() {
                load.projection.capacity_per_worker = capacity;
            }
            telemetry::load(&model, &load);

            let scaler = term
                .scalers
                .entry(model.clone())
                .or_insert_with(|| self.args.scaler());
            let desired = scaler.decide(term.started.elapsed(), &load.projection);
            telemetry::desired_workers(&model, desired);
            if term.decided.insert(model.clone(), desired) != Some(desired) {
                let policy = self.args.policy_name();
                info!(%model, desired, backend = self.backend.name(), policy, load = ?load.projection, "scaling decision");
                self.service.log_scaling(&model, &policy, desired).await?;
            }
            if !self.backend.acts() {
                continue;
            }
            self.reconcile(term, &model, desired, &views, starting)
                .await?;
        }
        Ok(())
    }

    async fn reconcile(
        &self,
        term: &mut Term,
        model: &str,
        desired: u32,
        views: &[WorkerView],
        starting: u32,
    ) -> Result<(), CheckError> {
        // Only workers this term drained can be brought back: one an operator
        // drained (or an earlier term) is on its way out, and its capacity is
        // replaced instead.
        let own: Vec<WorkerView> = views
            .iter()
            .filter(|v| !v.draining || term.drained_here.contains(&v.id))
            .cloned()
            .collect();
        let plan = reconcile(desired, &own, starting, self.backend.removal_order(model));
        for worker in &plan.undrain {
            self.service.set_draining(worker, false).await?;
            term.draining_since.remove(worker);
            term.drained_here.remove(worker);
            telemetry::scaling_action(model, "undrain");
        }
        for worker in &plan.drain {
            self.service.set_draining(worker, true).await?;
            term.draining_since.insert(worker.clone(), Instant::now());
            term.drained_here.insert(worker.clone());
            telemetry::scaling_action(model, "drain");
        }
        if plan.start > 0 {
            info!(model, count = plan.start, "starting workers");
            self.backend.start(model, plan.start, views).await?;
            telemetry::scaling_action_n(model, "start", plan.start);
        }
        for worker in views.iter().filter(|v| v.draining) {
            // Drained in an earlier term: its timeout starts over with this one.
            let since = *term
                .draining_since
                .entry(worker.id.clone())
                .or_insert_with(Instant::now);
            let timed_out = since.elapsed() >= self.drain_timeout;
            if (worker.assigned > 0 && !timed_out)
                || !self.backend.can_retire(model, &worker.id, views)
            {
                continue;
            }
            if self.backend.retire(model, &worker.id, views).await? {
                let moved = self.service.retire(&worker.id).await?.unwrap_or(0);
                term.draining_since.remove(&worker.id);
                term.drained_here.remove(&worker.id);
                info!(model, worker = %worker.id, moved, timed_out, "worker retired");
                telemetry::scaling_action(model, "retire");
                telemetry::drain_handoffs(model, moved);
            }
        }
        Ok(())
    }
}

impl Term {
    fn caught_up(&self) -> bool {
        self.newest_heartbeat_ms.load(Ordering::Relaxed) >= self.started_ms
            || self.started.elapsed() >= WARM_UP_MAX
    }
}

fn view(worker: &WorkerRecord) -> WorkerView {
    WorkerView {
        id: worker.id.clone(),
        assigned: worker.sessions.len() as u32,
        draining: worker.draining,
    }
}

/// Folds one stream into the tracker, from `from` on, until aborted.
async fn fold_stream(
    log: StreamLog,
    stream: String,
    from: ReadFrom,
    tracker: Arc<Mutex<LoadTracker>>,
    newest_heartbeat_ms: Arc<AtomicU64>,
) {
    let mut reader = match log.reader(&stream, from, None).await {
        Ok(reader) => reader,
        Err(e) => {
            warn!(%stream, error = %e, "autoscaler cannot read a stream; its load is missing");
            return;
        }
    };
    while let Some(record) = reader.next().await {
        match record {
            Ok(record) => {
                if matches!(record.envelope.event, Event::Heartbeat { .. }) {
                    newest_heartbeat_ms.fetch_max(record.envelope.at_ms, Ordering::Relaxed);
                }
                tracker
                    .lock()
                    .expect("tracker lock")
                    .apply(&record.envelope);
            }
            Err(e) => warn!(%stream, error = %e, "undecodable event skipped by the autoscaler"),
        }
    }
}
