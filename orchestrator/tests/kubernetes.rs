//! The Kubernetes scaling backend against a fake API server that answers the `scale`
//! subresource of StatefulSets and Deployments like the real one and records every
//! request, so the tests see exactly what the orchestrator would send a cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use orchestrator::kubernetes::{KubernetesArgs, KubernetesError, KubernetesScaler, WorkloadKind};
use serde_json::{Value, json};

const NAMESPACE: &str = "asr";

/// One request as the fake API server received it.
#[derive(Clone, Debug)]
struct Recorded {
    method: Method,
    path: String,
    query: Option<String>,
    content_type: Option<String>,
    body: Value,
}

#[derive(Default)]
struct FakeState {
    requests: Vec<Recorded>,
    /// `spec.replicas` by (resource, namespace, name): the workloads that exist.
    replicas: HashMap<(String, String, String), u32>,
}

/// A fake API server on 127.0.0.1 holding the given workloads (`("statefulsets",
/// "recognizer", 1)`) in namespace [`NAMESPACE`].
struct FakeApi {
    url: String,
    state: Arc<Mutex<FakeState>>,
}

impl FakeApi {
    async fn start(workloads: &[(&str, &str, u32)]) -> Self {
        let mut state = FakeState::default();
        for &(resource, name, replicas) in workloads {
            let key = (resource.to_owned(), NAMESPACE.to_owned(), name.to_owned());
            state.replicas.insert(key, replicas);
        }
        let state = Arc::new(Mutex::new(state));
        let app = Router::new().fallback(answer).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, state }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// A scaler for `workloads` (`MODEL=KIND/NAME`) that talks to this server.
    async fn scaler(&self, workloads: &[&str]) -> KubernetesScaler {
        KubernetesScaler::connect(&self.args(workloads))
            .await
            .unwrap()
    }

    fn args(&self, workloads: &[&str]) -> KubernetesArgs {
        KubernetesArgs {
            kubernetes_namespace: NAMESPACE.to_owned(),
            kubernetes_workloads: workloads.iter().map(|w| w.parse().unwrap()).collect(),
            kubernetes_api_url: Some(self.url.parse().unwrap()),
        }
    }
}

fn scale_path(resource: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NAMESPACE}/{resource}/{name}/scale")
}

/// Records the request, then answers `GET` and `PATCH` on
/// `/apis/apps/v1/namespaces/{ns}/{statefulsets|deployments}/{name}/scale` with the
/// `autoscaling/v1` `Scale`, and anything else with a `NotFound` `Status`.
async fn answer(
    State(state): State<Arc<Mutex<FakeState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut state = state.lock().unwrap();
    state.requests.push(Recorded {
        method: method.clone(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        content_type: headers
            .get(header::CONTENT_TYPE)
            .map(|value| value.to_str().unwrap().to_owned()),
        body: body.clone(),
    });
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let [
        "apis",
        "apps",
        "v1",
        "namespaces",
        namespace,
        resource,
        name,
        "scale",
    ] = segments[..]
    else {
        return not_found(&format!(
            "the server could not find the requested resource ({uri})"
        ));
    };
    let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
    let Some(replicas) = state.replicas.get_mut(&key) else {
        return not_found(&format!("{resource}.apps \"{name}\" not found"));
    };
    if method == Method::PATCH {
        match body["spec"]["replicas"].as_u64() {
            Some(wanted) => *replicas = wanted as u32,
            None => return (StatusCode::BAD_REQUEST, "no spec.replicas").into_response(),
        }
    } else if method != Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, "").into_response();
    }
    axum::Json(json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "replicas": *replicas },
        "status": { "replicas": *replicas },
    }))
    .into_response()
}

fn not_found(message: &str) -> Response {
    let status = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "NotFound",
        "code": 404,
    });
    (StatusCode::NOT_FOUND, axum::Json(status)).into_response()
}

#[tokio::test]
async fn scaling_a_statefulset_patches_its_scale_subresource_once() {
    let api = FakeApi::start(&[("statefulsets", "recognizer", 1)]).await;
    let scaler = api
        .scaler(&["whisper-tiny.en=statefulset/recognizer"])
        .await;

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
    let requests = api.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].method, Method::GET);
    assert_eq!(requests[1].path, scale_path("statefulsets", "recognizer"));
}

#[tokio::test]
async fn a_deployment_is_scaled_through_the_deployments_path() {
    let api = FakeApi::start(&[("deployments", "recognizer", 2)]).await;
    let scaler = api.scaler(&["m=Deployment/recognizer"]).await;
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
    let scaler = api
        .scaler(&[
            "whisper-tiny.en=statefulset/tiny",
            "whisper-base=deployment/base",
        ])
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
    let scaler = api.scaler(&["m=statefulset/recognizer"]).await;

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
    let scaler = api.scaler(&["m=statefulset/missing"]).await;

    let error = scaler.scale("m", 2).await.unwrap_err();
    let KubernetesError::Api {
        workload,
        code,
        reason,
        message,
    } = &error
    else {
        panic!("not an API error: {error:?}");
    };
    assert_eq!(workload.to_string(), "statefulset/missing");
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
    let args = api.args(&["m=statefulset/a", "m=deployment/b"]);
    let error = KubernetesScaler::connect(&args).await.err().unwrap();
    assert!(
        matches!(&error, KubernetesError::DuplicateModel(model) if model == "m"),
        "{error}"
    );
}
