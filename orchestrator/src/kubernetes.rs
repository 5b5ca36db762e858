//! The Kubernetes scaling backend: each model's recognizers run as one StatefulSet or
//! Deployment, and the autoscaler changes how many by setting that workload's replicas.
//!
//! Replicas are set through the workload's `scale` subresource rather than by patching
//! the StatefulSet or Deployment itself: the subresource holds only the replica count,
//! so nothing else of the workload (its pod template, labels, a concurrent rollout) can
//! be touched by mistake; the orchestrator's service account needs only `get` and
//! `patch` on `statefulsets/scale` and `deployments/scale`, not on the workloads; and it
//! is what the HorizontalPodAutoscaler and `kubectl scale` use, so the three agree.
//!
//! A StatefulSet scaled down removes its highest-numbered pods first ([`crate::scaling::fleet::ordinal`]): the
//! orchestrator drains those workers before it lowers the replicas. A Deployment removes
//! the pods its ReplicaSet ranks first: not ready before ready, then the lowest
//! `controller.kubernetes.io/pod-deletion-cost`; so the orchestrator gives the drained
//! pod the lowest cost there is ([`KubernetesScaler::prefer_removal`]), and lowers the
//! replicas only while no pod of the workload is still starting.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Config};
use serde::de::DeserializeOwned;
use serde_json::json;

/// How long one call to the API server may take: a hung call must not stall the
/// scaling loop (kube sets no read timeout by default).
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The pod annotation a ReplicaSet reads when it chooses which of its ready pods a
/// scale-down removes: the lowest cost first (Kubernetes >= 1.22).
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Where the recognizer workloads are and how to reach the API server.
#[derive(Args, Clone, Debug)]
pub struct KubernetesArgs {
    /// The namespace of the recognizer workloads.
    #[arg(long, env = "ASR_KUBERNETES_NAMESPACE", default_value = "default")]
    pub kubernetes_namespace: String,
    /// The workload that runs a model's recognizers, as MODEL=KIND/NAME with KIND
    /// `statefulset` or `deployment` (e.g. `whisper-tiny.en=statefulset/recognizer`);
    /// once per model, or comma-separated in the environment variable.
    #[arg(
        long = "kubernetes-workload",
        env = "ASR_KUBERNETES_WORKLOADS",
        value_name = "MODEL=KIND/NAME",
        value_delimiter = ','
    )]
    pub kubernetes_workloads: Vec<ModelWorkload>,
    /// The API server's URL, reached without authentication (`kubectl proxy`, tests).
    /// Without it, the in-cluster service account or the kubeconfig is used.
    #[arg(long, env = "ASR_KUBERNETES_API_URL")]
    pub kubernetes_api_url: Option<http::Uri>,
}

/// The kinds of workload whose replicas the orchestrator sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Stable pod names (`recognizer-0`, `recognizer-1`, …): scaling down removes the
    /// highest ordinals, so the orchestrator knows which workers to drain.
    StatefulSet,
    /// Interchangeable pods: scaling down removes pods of Kubernetes' choosing.
    Deployment,
}

/// One StatefulSet or Deployment in the configured namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: String,
}

/// One `--kubernetes-workload MODEL=KIND/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelWorkload {
    pub model: String,
    pub workload: Workload,
}

/// A `--kubernetes-workload` value that is not MODEL=KIND/NAME.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseWorkloadError {
    #[error("`{0}` is not MODEL=KIND/NAME (e.g. whisper-tiny.en=statefulset/recognizer)")]
    Format(String),
    #[error("`{0}` is not a workload kind: expected statefulset or deployment")]
    Kind(String),
}

/// What the Kubernetes backend can fail at.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("no Kubernetes workload is configured for model {0} (--kubernetes-workload)")]
    UnknownModel(String),
    #[error("model {0} has more than one --kubernetes-workload")]
    DuplicateModel(String),
    #[error("no Kubernetes configuration (in-cluster or kubeconfig): {0}")]
    Config(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The API server answered with an error about `object` (`statefulset/NAME`,
    /// `pod/NAME`): `code` is its HTTP status (404 for one that does not exist, 403
    /// for missing RBAC).
    #[error("Kubernetes API on {object}: {code} {reason}: {message}")]
    Api {
        object: String,
        code: u16,
        reason: String,
        message: String,
    },
    /// The API server could not be reached or its answer not read.
    #[error("Kubernetes API on {object}: {source}")]
    Request {
        object: String,
        #[source]
        source: kube::Error,
    },
}

/// Sets the replicas of each model's recognizer workload.
#[derive(Clone)]
pub struct KubernetesScaler {
    client: Client,
    namespace: String,
    workloads: HashMap<String, Workload>,
}

impl KubernetesScaler {
    /// A client for the API server the flags name, or else the one the in-cluster
    /// service account or the kubeconfig names. Nothing is sent yet.
    pub async fn connect(args: &KubernetesArgs) -> Result<Self, KubernetesError> {
        let mut workloads = HashMap::new();
        for entry in &args.kubernetes_workloads {
            if workloads
                .insert(entry.model.clone(), entry.workload.clone())
                .is_some()
            {
                return Err(KubernetesError::DuplicateModel(entry.model.clone()));
            }
        }
        let mut config = match &args.kubernetes_api_url {
            Some(url) => Config::new(url.clone()),
            None => Config::infer().await.map_err(KubernetesError::Config)?,
        };
        config.read_timeout = Some(API_TIMEOUT);
        // rustls is built with both ring and aws-lc-rs here (the RabbitMQ client wants
        // the latter), so it picks no provider by itself and kube would panic. Another
        // provider already installed is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(config).map_err(KubernetesError::Client)?;
        Ok(Self {
            client,
            namespace: args.kubernetes_namespace.clone(),
            workloads,
        })
    }

    /// The workload that runs `model`'s recognizers, if one is configured: its kind
    /// tells the orchestrator whether to drain the highest ordinals first.
    pub fn workload(&self, model: &str) -> Option<&Workload> {
        self.workloads.get(model)
    }

    /// The replicas `model`'s workload is asked to run (its `spec.replicas`, not the
    /// pods running now).
    pub async fn replicas(&self, model: &str) -> Result<u32, KubernetesError> {
        let scale = self.scale_subresource(model, None).await?;
        // The API leaves out a zero.
        let replicas = scale.spec.and_then(|spec| spec.replicas).unwrap_or(0);
        Ok(u32::try_from(replicas).unwrap_or(0))
    }

    /// Asks `model`'s workload for `replicas` pods. Scaling down removes pods at once,
    /// so drain the workers first.
    pub async fn scale(&self, model: &str, replicas: u32) -> Result<(), KubernetesError> {
        self.scale_subresource(model, Some(replicas)).await?;
        Ok(())
    }

    /// Reads `model`'s scale subresource, after setting its replicas if `set` is given.
    async fn scale_subresource(
        &self,
        model: &str,
        set: Option<u32>,
    ) -> Result<Scale, KubernetesError> {
        let workload = self
            .workload(model)
            .ok_or_else(|| KubernetesError::UnknownModel(model.to_owned()))?;
        let (client, namespace) = (self.client.clone(), &self.namespace);
        let result = match workload.kind {
            WorkloadKind::StatefulSet => {
                get_or_patch(
                    Api::<StatefulSet>::namespaced(client, namespace),
                    &workload.name,
                    set,
                )
                .await
            }
            WorkloadKind::Deployment => {
                get_or_patch(
                    Api::<Deployment>::namespaced(client, namespace),
                    &workload.name,
                    set,
                )
                .await
            }
        };
        result.map_err(|error| api_error(workload.to_string(), error))
    }

    /// Makes `pod` the first pod its Deployment's next scale-down removes (among ready
    /// pods) by setting its [`POD_DELETION_COST`] to the lowest value there is.
    /// Returns `false` when there is no such pod: the worker id is not a pod name.
    pub async fn prefer_removal(&self, pod: &str) -> Result<bool, KubernetesError> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.namespace);
        let patch = Patch::Merge(json!({
            "metadata": { "annotations": { POD_DELETION_COST: i32::MIN.to_string() } }
        }));
        match pods.patch(pod, &PatchParams::default(), &patch).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(error) => Err(api_error(format!("pod/{pod}"), error)),
        }
    }
}

fn api_error(object: String, error: kube::Error) -> KubernetesError {
    match error {
        kube::Error::Api(status) => KubernetesError::Api {
            object,
            code: status.code,
            reason: status.reason,
            message: status.message,
        },
        source => KubernetesError::Request { object, source },
    }
}

async fn get_or_patch<K: Clone + DeserializeOwned>(
    api: Api<K>,
    name: &str,
    set: Option<u32>,
) -> kube::Result<Scale> {
    match set {
        None => api.get_scale(name).await,
        Some(replicas) => {
            let patch = Patch::Merge(json!({ "spec": { "replicas": replicas } }));
            api.patch_scale(name, &PatchParams::default(), &patch).await
        }
    }
}

impl FromStr for WorkloadKind {
    type Err = ParseWorkloadError;

    fn from_str(kind: &str) -> Result<Self, Self::Err> {
        match kind.to_ascii_lowercase().as_str() {
            "statefulset" => Ok(Self::StatefulSet),
            "deployment" => Ok(Self::Deployment),
            _ => Err(ParseWorkloadError::Kind(kind.to_owned())),
        }
    }
}

impl FromStr for ModelWorkload {
    type Err = ParseWorkloadError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let format = || ParseWorkloadError::Format(value.to_owned());
        let (model, workload) = value.split_once('=').ok_or_else(format)?;
        let (kind, name) = workload.split_once('/').ok_or_else(format)?;
        let (model, name) = (model.trim(), name.trim());
        if model.is_empty() || name.is_empty() {
            return Err(format());
        }
        Ok(Self {
            model: model.to_owned(),
            workload: Workload {
                kind: kind.trim().parse()?,
                name: name.to_owned(),
            },
        })
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::StatefulSet => "statefulset",
            Self::Deployment => "deployment",
        })
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kubernetes: KubernetesArgs,
    }

    fn parse(args: &[&str]) -> Result<KubernetesArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("asr").chain(args.iter().copied()))
            .map(|cli| cli.kubernetes)
    }

    fn statefulset(name: &str) -> Workload {
        Workload {
            kind: WorkloadKind::StatefulSet,
            name: name.to_owned(),
        }
    }

    #[test]
    fn a_workload_flag_names_model_kind_and_name() {
        let args = parse(&[
            "--kubernetes-workload",
            "whisper-tiny.en=statefulset/recognizer",
        ])
        .unwrap();
        assert_eq!(args.kubernetes_namespace, "default");
        assert_eq!(args.kubernetes_api_url, None);
        assert_eq!(
            args.kubernetes_workloads,
            [ModelWorkload {
                model: "whisper-tiny.en".into(),
                workload: statefulset("recognizer"),
            }]
        );
    }

    #[test]
    fn workloads_repeat_and_kinds_ignore_case() {
        let args = parse(&[
            "--kubernetes-namespace",
            "asr",
            "--kubernetes-workload",
            "a=StatefulSet/rec-a,b=DEPLOYMENT/rec-b",
            "--kubernetes-workload",
            "c=deployment/rec-c",
            "--kubernetes-api-url",
            "http://127.0.0.1:8001",
        ])
        .unwrap();
        assert_eq!(args.kubernetes_namespace, "asr");
        assert_eq!(
            args.kubernetes_api_url.unwrap().to_string(),
            "http://127.0.0.1:8001/"
        );
        let kinds: Vec<_> = args
            .kubernetes_workloads
            .iter()
            .map(|w| (w.model.as_str(), w.workload.to_string()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("a", "statefulset/rec-a".to_owned()),
                ("b", "deployment/rec-b".to_owned()),
                ("c", "deployment/rec-c".to_owned()),
            ]
        );
    }

    #[test]
    fn a_bad_kind_is_refused_with_the_kinds_there_are() {
        assert_eq!(
            "m=daemonset/rec".parse::<ModelWorkload>(),
            Err(ParseWorkloadError::Kind("daemonset".into()))
        );
        let error = parse(&["--kubernetes-workload", "m=daemonset/rec"])
            .unwrap_err()
            .to_string();
        assert!(
            error
                .contains("`daemonset` is not a workload kind: expected statefulset or deployment"),
            "{error}"
        );
    }

    #[test]
    fn a_workload_without_its_parts_is_refused_with_the_format() {
        for bad in [
            "statefulset/recognizer",
            "m=recognizer",
            "=statefulset/r",
            "m=statefulset/",
        ] {
            assert_eq!(
                bad.parse::<ModelWorkload>(),
                Err(ParseWorkloadError::Format(bad.into())),
                "{bad}"
            );
        }
        let error = parse(&["--kubernetes-workload", "statefulset/recognizer"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("is not MODEL=KIND/NAME"), "{error}");
    }
}
