//! A fake Kubernetes API server that answers the `scale` subresource of StatefulSets
//! and Deployments and merge patches of pods like the real one, and records every
//! request, so tests see exactly what the orchestrator would send a cluster. Shared by `tests/kubernetes.rs` (the
//! backend alone) and `tests/worker_manager.rs` (the autoscaler acting through it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const NAMESPACE: &str = "asr";

/// One request as the fake API server received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct FakeState {
    requests: Vec<Recorded>,
    /// `spec.replicas` by (resource, namespace, name): the workloads that exist.
    replicas: HashMap<(String, String, String), u32>,
    /// `metadata.annotations` by (namespace, name): the pods that exist.
    pods: HashMap<(String, String), Value>,
}

/// A fake API server on 127.0.0.1 holding the given workloads (`("statefulsets",
/// "recognizer", 1)`) in namespace [`NAMESPACE`].
pub struct FakeApi {
    pub url: String,
    state: Arc<Mutex<FakeState>>,
}

impl FakeApi {
    pub async fn start(workloads: &[(&str, &str, u32)]) -> Self {
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

    /// Pods `names` in namespace [`NAMESPACE`], without annotations.
    pub fn add_pods(&self, names: &[&str]) {
        let mut state = self.state.lock().unwrap();
        for name in names {
            let key = (NAMESPACE.to_owned(), (*name).to_owned());
            state.pods.insert(key, json!({}));
        }
    }

    /// The annotations of pod `name` now.
    pub fn pod_annotations(&self, name: &str) -> Value {
        let key = (NAMESPACE.to_owned(), name.to_owned());
        self.state.lock().unwrap().pods[&key].clone()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The `spec.replicas` of `resource`/`name` (`"statefulsets"`, `"recognizer"`) now.
    pub fn replicas(&self, resource: &str, name: &str) -> u32 {
        let key = (resource.to_owned(), NAMESPACE.to_owned(), name.to_owned());
        self.state.lock().unwrap().replicas[&key]
    }

    /// The replicas set by each PATCH of a scale subresource so far, in order.
    pub fn patched(&self) -> Vec<u64> {
        self.requests()
            .iter()
            .filter(|r| r.method == Method::PATCH)
            .filter_map(|r| r.body["spec"]["replicas"].as_u64())
            .collect()
    }
}

pub fn scale_path(resource: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NAMESPACE}/{resource}/{name}/scale")
}

pub fn pod_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/pods/{name}")
}

/// Records the request, then answers `GET` and `PATCH` on
/// `/apis/apps/v1/namespaces/{ns}/{statefulsets|deployments}/{name}/scale` with the
/// `autoscaling/v1` `Scale`, a merge `PATCH` of `/api/v1/namespaces/{ns}/pods/{name}`'s
/// annotations with the `Pod`, and anything else with a `NotFound` `Status`.
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
    if let ["api", "v1", "namespaces", namespace, "pods", name] = segments[..] {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(annotations) = state.pods.get_mut(&key) else {
            return not_found(&format!("pods \"{name}\" not found"));
        };
        if method != Method::PATCH {
            return (StatusCode::METHOD_NOT_ALLOWED, "").into_response();
        }
        let Some(patch) = body["metadata"]["annotations"].as_object() else {
            return (StatusCode::BAD_REQUEST, "no metadata.annotations").into_response();
        };
        for (annotation, value) in patch {
            annotations[annotation] = value.clone();
        }
        return axum::Json(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": namespace, "annotations": annotations },
        }))
        .into_response();
    }
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
