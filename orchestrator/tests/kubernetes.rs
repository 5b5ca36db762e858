//! The Kubernetes scaling backend against a fake API server (`support/`) that answers
//! the `scale` subresource of StatefulSets and Deployments like the real one and
//! records every request, so the tests see exactly what the orchestrator would send a
//! cluster.

#[path = "support/fake_kubernetes.rs"]
mod fake_kubernetes;

use axum::http::Method;
use fake_kubernetes::{FakeApi, NAMESPACE, pod_path, scale_path};
use orchestrator::kubernetes::{
    KubernetesArgs, KubernetesError, KubernetesScaler, POD_DELETION_COST, WorkloadKind,
};
use serde_json::json;

/// A scaler for `workloads` (`MODEL=KIND/NAME`) that talks to the fake server, as the
/// orchestrator builds it.
async fn scaler(api: &FakeApi, workloads: &[&str]) -> KubernetesScaler {
    KubernetesScaler::connect(&args(api, workloads))
        .await
        .unwrap()
}

fn args(api: &FakeApi, workloads: &[&str]) -> KubernetesArgs {
    KubernetesArgs {
        kubernetes_namespace: NAMESPACE.to_owned(),
        kubernetes_workloads: workloads.iter().map(|w| w.parse().unwrap()).collect(),
        kubernetes_api_url: Some(api.url.parse().unwrap()),
    }
}

#[tokio::test]
async fn scaling_a_statefulset_patches_its_scale_subresource_once() {
    let api = FakeApi::start(&[("statefulsets", "recognizer", 1)]).await;
    let scaler = scaler(&api, &["whisper-tiny.en=statefulset/recognizer"]).await;

    scaler.scale("whisper-tiny.en", 3).await.unwrap();

    let requests = api.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let patch = &requests[0];
    assert_eq!(patch.method, Method::PATCH);
    assert_eq!(patch.path, scale_path("statefulsets", "recognizer"));
    // Not a dry run, no forced field manager: a plain merge patch.
    assert_eq!(patch.query.as_deref().unwrap_or(""), "");
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(patch.body, json!({ "spec": { "replicas": 3 } }));

    assert_eq!(scaler.replicas("whisper-tiny.en").await.unwrap(), 3);
    assert_eq!(api.replicas("statefulsets", "recognizer"), 3);
    assert_eq!(api.patched(), [3]);
    let requests = api.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].method, Method::GET);
    assert_eq!(requests[1].path, scale_path("statefulsets", "recognizer"));
}

#[tokio::test]
async fn a_deployment_is_scaled_through_the_deployments_path() {
    let api = FakeApi::start(&[("deployments", "recognizer", 2)]).await;
    let scaler = scaler(&api, &["m=Deployment/recognizer"]).await;
    assert_eq!(
        scaler.workload("m").map(|w| w.kind),
        Some(WorkloadKind::Deployment)
    );

    assert_eq!(scaler.replicas("m").await.unwrap(), 2);
    scaler.scale("m", 0).await.unwrap();
    assert_eq!(scaler.replicas("m").await.unwrap(), 0);

    let requests = api.requests();
    let calls: Vec<_> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    let path = scale_path("deployments", "recognizer");
    assert_eq!(
        calls,
        [("GET", path.as_str()), ("PATCH", &path), ("GET", &path)]
    );
    assert_eq!(requests[1].body, json!({ "spec": { "replicas": 0 } }));
}

#[tokio::test]
async fn two_models_scale_their_own_workloads() {
    let api = FakeApi::start(&[("statefulsets", "tiny", 1), ("deployments", "base", 1)]).await;
    let scaler = scaler(
        &api,
        &[
            "whisper-tiny.en=statefulset/tiny",
            "whisper-base=deployment/base",
        ],
    )
    .await;

    scaler.scale("whisper-tiny.en", 4).await.unwrap();
    scaler.scale("whisper-base", 2).await.unwrap();

    let paths: Vec<_> = api.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            scale_path("statefulsets", "tiny"),
            scale_path("deployments", "base")
        ]
    );
    assert_eq!(scaler.replicas("whisper-tiny.en").await.unwrap(), 4);
    assert_eq!(scaler.replicas("whisper-base").await.unwrap(), 2);
}

#[tokio::test]
async fn a_model_without_a_workload_is_an_error_and_sends_nothing() {
    let api = FakeApi::start(&[("statefulsets", "recognizer", 1)]).await;
    let scaler = scaler(&api, &["m=statefulset/recognizer"]).await;

    assert!(scaler.workload("other").is_none());
    let error = scaler.scale("other", 2).await.unwrap_err();
    assert!(
        matches!(&error, KubernetesError::UnknownModel(model) if model == "other"),
        "{error}"
    );
    assert!(matches!(
        scaler.replicas("other").await,
        Err(KubernetesError::UnknownModel(_))
    ));
    assert!(api.requests().is_empty());
}

#[tokio::test]
async fn a_missing_workload_is_the_api_servers_not_found() {
    let api = FakeApi::start(&[]).await;
    let scaler = scaler(&api, &["m=statefulset/missing"]).await;

    let error = scaler.scale("m", 2).await.unwrap_err();
    let KubernetesError::Api {
        object,
        code,
        reason,
        message,
    } = &error
    else {
        panic!("not an API error: {error:?}");
    };
    assert_eq!(object, "statefulset/missing");
    assert_eq!((*code, reason.as_str()), (404, "NotFound"));
    assert_eq!(message, "statefulsets.apps \"missing\" not found");
    assert!(
        error
            .to_string()
            .contains("statefulsets.apps \"missing\" not found"),
        "{error}"
    );
    assert_eq!(api.requests().len(), 1);
}

#[tokio::test]
async fn a_model_configured_twice_is_refused() {
    let api = FakeApi::start(&[]).await;
    let args = args(&api, &["m=statefulset/a", "m=deployment/b"]);
    let error = KubernetesScaler::connect(&args).await.err().unwrap();
    assert!(
        matches!(&error, KubernetesError::DuplicateModel(model) if model == "m"),
        "{error}"
    );
}

#[tokio::test]
async fn preferring_a_pod_for_removal_gives_it_the_lowest_deletion_cost() {
    let api = FakeApi::start(&[("deployments", "recognizer", 2)]).await;
    api.add_pods(&["recognizer-7f9c4-x2k8q", "recognizer-7f9c4-p5m2z"]);
    let scaler = scaler(&api, &["m=deployment/recognizer"]).await;

    assert!(
        scaler
            .prefer_removal("recognizer-7f9c4-x2k8q")
            .await
            .unwrap()
    );

    let requests = api.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let patch = &requests[0];
    assert_eq!(patch.method, Method::PATCH);
    assert_eq!(patch.path, pod_path("recognizer-7f9c4-x2k8q"));
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let cheapest = json!({ POD_DELETION_COST: i32::MIN.to_string() });
    assert_eq!(
        patch.body,
        json!({ "metadata": { "annotations": cheapest } })
    );
    assert_eq!(api.pod_annotations("recognizer-7f9c4-x2k8q"), cheapest);
    assert_eq!(api.pod_annotations("recognizer-7f9c4-p5m2z"), json!({}));
    // The scale is left alone: lowering it is the caller's next step.
    assert_eq!(api.replicas("deployments", "recognizer"), 2);
}

#[tokio::test]
async fn a_worker_id_that_is_no_pod_is_not_preferred_and_not_an_error() {
    let api = FakeApi::start(&[("deployments", "recognizer", 2)]).await;
    let scaler = scaler(&api, &["m=deployment/recognizer"]).await;

    assert!(!scaler.prefer_removal("recognizer-1").await.unwrap());
    assert_eq!(api.requests().len(), 1);
}
