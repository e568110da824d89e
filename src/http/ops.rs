//! Operations routes: liveness, readiness, model listing, the OpenAPI document, metrics.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::dto::ClassRef;
use crate::model::{InputSpec, ModelState};

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: 200 once every model is loaded on its device; 503 before that and while draining.
#[utoipa::path(get, path = "/ready", tag = "operations", responses(
    (status = 200, body = Health),
    (status = 503, body = Health, description = "Loading the start-up models, shutting down, or the jobs database is unreachable"),
))]
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.is_ready_with_store().await {
        (StatusCode::OK, Json(Health { status: "ready" }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "not_ready" }))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelsResponse {
    /// Device the worker runs on (`cpu`, `cuda:0`); `null` until the models are loaded.
    pub device: Option<String>,
    pub models: Vec<ModelDescription>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelDescription {
    #[schema(example = "efficientnet-lite0")]
    pub name: String,
    /// `ready` models take requests; the others answer 503 (or say why they cannot be served).
    pub state: ModelState,
    /// Why a model failed to load or cannot be served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `pytorch_libtorch` (every model served is TorchScript on libtorch), or the Triton platform
    /// of a repository model LabelFool cannot serve.
    pub platform: Option<String>,
    /// The Triton version directory served (repository models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[schema(example = "EfficientNet-Lite0")]
    pub architecture: Option<String>,
    pub default: bool,
    pub num_classes: Option<usize>,
    /// Size of the `features` method's embedding; null for a plain network without one.
    pub feature_dim: Option<usize>,
    pub input: Option<InputSpec>,
    /// The distance matrix target selection uses, if any.
    pub matrix: Option<MatrixDescription>,
    /// First classes, for orientation (the full list: `GET /models/{name}/classes`).
    pub classes_preview: Vec<ClassRef>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MatrixDescription {
    #[schema(example = "from-weights")]
    pub method: String,
    pub num_classes: usize,
    pub content_sha256: Option<String>,
}

/// Every model the server knows — configured bundles and repository models — with its state,
/// classes, input geometry (and the normalisation the server applies) and distance matrix.
#[utoipa::path(get, path = "/models", tag = "operations", responses((status = 200, body = ModelsResponse)))]
pub async fn models(State(state): State<AppState>) -> Json<ModelsResponse> {
    let models = state
        .engine
        .models()
        .into_iter()
        .map(|e| {
            let m = e.info.as_deref();
            ModelDescription {
                name: e.name,
                state: e.state,
                reason: e.reason,
                platform: e.platform,
                version: e.version,
                architecture: m.map(|m| m.bundle.meta.architecture.clone()),
                default: e.index == 0,
                num_classes: m.map(|m| m.num_classes()),
                feature_dim: m.and_then(|m| m.bundle.meta.feature_dim),
                input: m.map(|m| m.input().clone()),
                matrix: m.and_then(|m| m.matrix()).map(|d| MatrixDescription {
                    method: d.meta.method.clone(),
                    num_classes: d.meta.num_classes,
                    content_sha256: d.meta.content_sha256.clone(),
                }),
                classes_preview: m
                    .map(|m| (0..m.num_classes().min(5)).map(|c| ClassRef::new(m, c)).collect())
                    .unwrap_or_default(),
            }
        })
        .collect();
    Json(ModelsResponse { device: state.device.get().cloned(), models })
}

/// The full class list of a model, index order.
#[utoipa::path(get, path = "/models/{name}/classes", tag = "operations",
    params(("name" = String, Path, description = "Model name")),
    responses((status = 200, body = Vec<ClassRef>), (status = 404, body = super::error::ErrorBody)))]
pub async fn classes(
    State(state): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<Vec<ClassRef>>, super::error::ApiError> {
    let (_, m) = state.engine.model(Some(&name))?;
    Ok(Json((0..m.num_classes()).map(|c| ClassRef::new(&m, c)).collect()))
}

/// This API's OpenAPI 3.1 document, with each operation's bounds (`x-labelfool`) as this
/// server is configured.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI document", content_type = "application/json")))]
pub async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], state.openapi.clone())
}

/// The studio.
#[utoipa::path(get, path = "/", tag = "studio", responses((status = 307, description = "to `/studio`")))]
pub async fn root() -> axum::response::Redirect {
    axum::response::Redirect::temporary("/studio")
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let (classify, attack) = state.engine.queue_depths();
    metrics::gauge!("labelfool_queue_depth", "queue" => "classify").set(classify as f64);
    metrics::gauge!("labelfool_queue_depth", "queue" => "attack").set(attack as f64);
    if let Some(jobs) = &state.jobs {
        // Every server sharing the database reports the same count: an autoscaler takes the max.
        match jobs.pending_items().await {
            Ok(n) => metrics::gauge!("labelfool_job_items_pending").set(n as f64),
            Err(e) => tracing::warn!(error = %e, "metrics: cannot count pending work items"),
        }
        metrics::gauge!("labelfool_job_items_held").set(jobs.held_items() as f64);
    }
    let cuda = state.device.get().and_then(|d| d.strip_prefix("cuda:")).and_then(|n| n.parse::<u32>().ok());
    if let Some((used, total)) = cuda.and_then(crate::telemetry::cuda_memory) {
        let device = format!("cuda:{}", cuda.unwrap_or_default());
        metrics::gauge!("labelfool_device_memory_used_bytes", "device" => device.clone()).set(used as f64);
        metrics::gauge!("labelfool_device_memory_total_bytes", "device" => device).set(total as f64);
    }
    match &state.metrics {
        Some(handle) => {
            (StatusCode::OK, [("content-type", "text/plain; version=0.0.4")], handle.render()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "metrics are disabled").into_response(),
    }
}
