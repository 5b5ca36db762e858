//! Where scaling decisions take effect: the backends the autoscaler acts through.
//!
//! - [`Backend::DryRun`]: decisions are logged (and appended to the control stream as
//!   `ScalingDecided`); no worker is started, drained or stopped.
//! - [`Backend::Local`]: the worker ids to run live in a Redis set per model
//!   ([`Registry::local_workers`]); `asr up` keeps exactly those recognizer
//!   processes running. Starting a worker adds an id; retiring one removes its id
//!   before the worker is told to stop, so its supervisor lets it go.
//! - [`Backend::Kubernetes`]: the scale subresource of the model's StatefulSet or
//!   Deployment ([`KubernetesScaler`]). A StatefulSet removes its highest ordinals,
//!   so those are drained first and retired from the top down. A Deployment removes
//!   the pod with the lowest deletion cost among ready ones, so a drained pod is given
//!   the lowest cost just before the replicas go down, and only while no pod of the
//!   workload is starting (a pod not ready yet would be removed first).

use std::collections::HashMap;

use clap::ValueEnum;
use thiserror::Error;
use tokio::sync::Mutex;
use tracing::warn;

use crate::kubernetes::{KubernetesError, KubernetesScaler, WorkloadKind};
use crate::registry::{Registry, RegistryError};
use crate::scaling::{RemovalOrder, WorkerView, fleet::ordinal};

/// The backends `--scaling-backend` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// No autoscaler: the workers that register are the workers there are.
    Off,
    /// Decide and log, change nothing.
    DryRun,
    /// Recognizer processes of `asr up`.
    Local,
    /// A StatefulSet or Deployment per model (`--kubernetes-workload`).
    Kubernetes,
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Kubernetes(#[from] KubernetesError),
}

/// Acts on decisions for one deployment.
pub enum Backend {
    DryRun,
    Local(Registry),
    Kubernetes {
        scaler: KubernetesScaler,
        /// Each model's `spec.replicas` as last read or set.
        replicas: Mutex<HashMap<String, u32>>,
    },
}

/// The prefix of the worker ids the local backend hands out (`recognizer-1`, …), the
/// ids `asr up` has always given its recognizers.
const LOCAL_WORKER_PREFIX: &str = "recognizer-";

impl Backend {
    pub fn kubernetes(scaler: KubernetesScaler) -> Self {
        Backend::Kubernetes {
            scaler,
            replicas: Mutex::new(HashMap::new()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::DryRun => "dry-run",
            Backend::Local(_) => "local",
            Backend::Kubernetes { .. } => "kubernetes",
        }
    }

    /// Whether decisions take effect (a dry run only logs them).
    pub fn acts(&self) -> bool {
        !matches!(self, Backend::DryRun)
    }

    pub fn removal_order(&self, model: &str) -> RemovalOrder {
        match self {
            Backend::Kubernetes { scaler, .. }
                if scaler
                    .workload(model)
                    .is_some_and(|w| w.kind == WorkloadKind::StatefulSet) =>
            {
                RemovalOrder::HighestOrdinal
            }
            _ => RemovalOrder::LeastLoaded,
        }
    }

    /// Workers asked for and not registered yet.
    pub async fn starting(&self, model: &str, live: &[WorkerView]) -> Result<u32, BackendError> {
        match self {
            Backend::DryRun => Ok(0),
            Backend::Local(registry) => {
                let wanted = registry.local_workers(model).await?;
                Ok(wanted
                    .iter()
                    .filter(|id| !live.iter().any(|w| &w.id == *id))
                    .count() as u32)
            }
            Backend::Kubernetes { .. } => {
                let replicas = self.replicas(model).await?;
                // Pods of the workload that registered; a Deployment's pods have no
                // ordinal, and every live worker of the model counts.
                let registered = live
                    .iter()
                    .filter(|w| ordinal(&w.id).is_none_or(|o| o < replicas))
                    .count() as u32;
                Ok(replicas.saturating_sub(registered))
            }
        }
    }

    /// Asks for `count` more workers of `model`.
    pub async fn start(
        &self,
        model: &str,
        count: u32,
        live: &[WorkerView],
    ) -> Result<(), BackendError> {
        match self {
            Backend::DryRun => Ok(()),
            Backend::Local(registry) => {
                let wanted = registry.local_workers(model).await?;
                let taken = |n: u32| {
                    let id = format!("{LOCAL_WORKER_PREFIX}{n}");
                    wanted.contains(&id) || live.iter().any(|w| w.id == id)
                };
                let ids: Vec<String> = (1..)
                    .filter(|&n| !taken(n))
                    .take(count as usize)
                    .map(|n| format!("{LOCAL_WORKER_PREFIX}{n}"))
                    .collect();
                registry.change_local_workers(model, &ids, &[]).await?;
                Ok(())
            }
            Backend::Kubernetes { scaler, replicas } => {
                let target = self.replicas(model).await? + count;
                scaler.scale(model, target).await?;
                replicas.lock().await.insert(model.to_string(), target);
                Ok(())
            }
        }
    }

    /// Whether `worker`, drained, can be removed now. A StatefulSet can only lose its
    /// highest ordinal, so a lower one waits for those above it.
    pub fn can_retire(&self, model: &str, worker: &str, live: &[WorkerView]) -> bool {
        match self.removal_order(model) {
            RemovalOrder::LeastLoaded => true,
            RemovalOrder::HighestOrdinal => {
                let mine = ordinal(worker);
                !live.iter().any(|w| w.id != worker && ordinal(&w.id) > mine)
            }
        }
    }

    /// Removes a drained worker from what the backend runs; `false` when it cannot be
    /// removed yet. Called before the worker is told to stop, so that nothing restarts
    /// it. `live` are the model's registered workers.
    pub async fn retire(
        &self,
        model: &str,
        worker: &str,
        live: &[WorkerView],
    ) -> Result<bool, BackendError> {
        match self {
            Backend::DryRun => Ok(false),
            Backend::Local(registry) => {
                registry
                    .change_local_workers(model, &[], &[worker.to_string()])
                    .await?;
                Ok(true)
            }
            Backend::Kubernetes { scaler, replicas } => {
                let current = self.replicas(model).await?;
                match self.removal_order(model) {
                    // Scaling a StatefulSet down removes pod `current - 1`: it must be
                    // this one (a lower pod that died is not the one drained).
                    RemovalOrder::HighestOrdinal => {
                        if ordinal(worker) != current.checked_sub(1) {
                            return Ok(false);
                        }
                    }
                    // A ReplicaSet removes a pod that is not ready before any ready
                    // one, whatever its deletion cost.
                    RemovalOrder::LeastLoaded => {
                        if self.starting(model, live).await? > 0 {
                            return Ok(false);
                        }
                        if !scaler.prefer_removal(worker).await? {
                            warn!(
                                model,
                                worker,
                                "the drained worker is no pod of the Deployment (is its worker id \
                                 the pod name?): Kubernetes picks the pod to remove"
                            );
                        }
                    }
                }
                let target = current.saturating_sub(1);
                scaler.scale(model, target).await?;
                replicas.lock().await.insert(model.to_string(), target);
                Ok(true)
            }
        }
    }

    async fn replicas(&self, model: &str) -> Result<u32, BackendError> {
        let Backend::Kubernetes { scaler, replicas } = self else {
            return Ok(0);
        };
        let mut known = replicas.lock().await;
        if let Some(&n) = known.get(model) {
            return Ok(n);
        }
        let n = scaler.replicas(model).await?;
        known.insert(model.to_string(), n);
        Ok(n)
    }
}
