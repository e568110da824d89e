//! The Open Inference Protocol (KServe v2 REST) for classification, so model-serving stacks (and
//! Triton's own clients) can call LabelFool like any other model: health, metadata, inference
//! ([`infer`], with Triton's binary tensor data and classification extensions), and Triton's model
//! configuration and statistics extensions. Errors follow the protocol: `{"error": "<message>"}`.

pub mod infer;

pub use infer::{InferRequest, InferResponse, infer};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::ApiError;

/// Handlers here fail with the server's one error type; [`protocol_errors`] gives every error
/// answered under `/v2` — these handlers', and the limits', auth's and the load shedder's —
/// the protocol's shape.
pub type V2Error = ApiError;

#[derive(Serialize, ToSchema)]
pub struct V2ErrorBody {
    pub error: String,
}

/// Rewrites error answers on `/v2` paths to the Open Inference Protocol's `{"error": "<message>"}`
/// (status and headers kept), so protocol clients can read every error the server gives them.
pub async fn protocol_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let oip = req.uri().path() == "/v2" || req.uri().path().starts_with("/v2/");
    let res = next.run(req).await;
    if !oip {
        return res;
    }
    let Some(super::error::ErrorMessage(message)) = res.extensions().get().cloned() else { return res };
    let (mut parts, _) = res.into_parts();
    let body = serde_json::to_vec(&V2ErrorBody { error: message }).unwrap_or_default();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

fn bad(msg: impl Into<String>) -> V2Error {
    ApiError::bad_request("bad_request", msg)
}

#[derive(Serialize, ToSchema)]
pub struct Live {
    pub live: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
}

/// Server liveness (OIP).
#[utoipa::path(get, path = "/v2/health/live", operation_id = "v2_live", tag = "kserve-v2", responses((status = 200, body = Live)))]
pub async fn live() -> Json<Live> {
    Json(Live { live: true })
}

/// Server readiness (OIP): 200 once models are loaded.
#[utoipa::path(get, path = "/v2/health/ready", operation_id = "v2_ready", tag = "kserve-v2", responses((status = 200, body = Ready), (status = 503, body = Ready)))]
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let ready = state.is_ready_with_store().await;
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(Ready { ready }))
}

#[derive(Serialize, ToSchema)]
pub struct ServerMetadata {
    pub name: String,
    pub version: String,
    pub extensions: Vec<String>,
}

/// Server metadata (OIP).
#[utoipa::path(get, path = "/v2", operation_id = "v2_server_metadata", tag = "kserve-v2", responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "labelfool".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: vec![
            "binary_tensor_data".into(),
            "classification".into(),
            "model_configuration".into(),
            "statistics".into(),
            "model_repository".into(),
        ],
    })
}

#[derive(Serialize, ToSchema)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    /// What this server accepts for the model (empty while its description is unknown).
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
    /// LabelFool's extension: the model's state (`ready`, `loading`, `failed`, …) …
    pub state: crate::model::ModelState,
    /// … and why it is not ready, when it failed or cannot be served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Model metadata (OIP): accepted inputs and the output, and the model's state — for any model the
/// server knows, ready or not.
#[utoipa::path(get, path = "/v2/models/{name}", operation_id = "v2_model_metadata", tag = "kserve-v2", params(("name" = String, Path)),
    responses((status = 200, body = ModelMetadata), (status = 404, body = V2ErrorBody)))]
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, V2Error> {
    let entry = state
        .engine
        .models()
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| ApiError::from(crate::engine::EngineError::UnknownModel(name.clone())))?;
    let (inputs, outputs) = match entry.info.as_deref() {
        Some(m) => {
            let s = m.input().size;
            (
                vec![
                    TensorMetadata { name: "image".into(), datatype: "BYTES".into(), shape: vec![-1] },
                    TensorMetadata { name: "input".into(), datatype: "FP32".into(), shape: vec![-1, 3, s, s] },
                ],
                vec![TensorMetadata {
                    name: "probabilities".into(),
                    datatype: "FP32".into(),
                    shape: vec![-1, m.num_classes() as i64],
                }],
            )
        }
        None => (Vec::new(), Vec::new()),
    };
    Ok(Json(ModelMetadata {
        name: entry.name,
        versions: vec![entry.version.unwrap_or_else(|| "1".into())],
        platform: entry.platform.unwrap_or_default(),
        inputs,
        outputs,
        state: entry.state,
        reason: entry.reason,
    }))
}

/// Model readiness (OIP).
#[utoipa::path(get, path = "/v2/models/{name}/ready", operation_id = "v2_model_ready", tag = "kserve-v2", params(("name" = String, Path)),
    responses((status = 200, body = Ready), (status = 404, body = V2ErrorBody),
        (status = 503, description = "Known but not ready (loading, unloading, unloaded, failed)", body = Ready)))]
pub async fn model_ready(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response, V2Error> {
    let ready = match state.engine.model(Some(&name)) {
        Ok(_) => state.is_ready(),
        Err(crate::engine::EngineError::ModelUnavailable(_)) => false,
        Err(e) => return Err(e.into()),
    };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, Json(Ready { ready })).into_response())
}

/// A model's configuration in Triton's JSON form (`get_model_config` in Triton's clients): the
/// tensors this server accepts for it, and the preprocessing it applies.
#[utoipa::path(get, path = "/v2/models/{name}/config", operation_id = "v2_model_config", tag = "kserve-v2", params(("name" = String, Path)),
    responses((status = 200, description = "Triton's model configuration, as JSON", body = Object), (status = 404, body = V2ErrorBody),
        (status = 503, description = "Known but not ready", body = V2ErrorBody)))]
pub async fn model_config(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, V2Error> {
    let (_, m) = state.engine.model(Some(&name))?;
    let input = m.input();
    let s = input.size;
    Ok(Json(serde_json::json!({
        "name": m.name,
        "platform": "pytorch_libtorch",
        "backend": "pytorch",
        "max_batch_size": 0,
        "input": [
            {"name": "image", "data_type": "TYPE_STRING", "dims": [-1]},
            {"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [-1, 3, s, s]},
        ],
        "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [-1, m.num_classes()]}],
        "parameters": {
            "labelfool.resize_short_side": {"string_value": input.resize_short_side.to_string()},
            "labelfool.mean": {"string_value": input.mean.map(|v| format!("{v:?}")).unwrap_or_default()},
            "labelfool.std": {"string_value": input.std.map(|v| format!("{v:?}")).unwrap_or_default()},
        },
    })))
}

#[derive(Serialize, ToSchema)]
pub struct ModelStatistics {
    pub model_stats: Vec<ModelStat>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelStat {
    pub name: String,
    pub version: String,
    /// Milliseconds since the epoch of the last classification (0: none yet).
    pub last_inference: u64,
    /// Images classified, and the forward passes (batches) that did it.
    pub inference_count: u64,
    pub execution_count: u64,
    pub inference_stats: InferenceStats,
    pub batch_stats: Vec<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct InferenceStats {
    pub success: crate::engine::stats::Duration64,
    pub fail: crate::engine::stats::Duration64,
    pub queue: crate::engine::stats::Duration64,
    pub compute_input: crate::engine::stats::Duration64,
    pub compute_infer: crate::engine::stats::Duration64,
    pub compute_output: crate::engine::stats::Duration64,
}

fn statistics(state: &AppState, only: Option<&str>) -> ModelStatistics {
    let counters = state.engine.stats().per_model();
    let model_stats = state
        .engine
        .models()
        .into_iter()
        .filter(|e| only.is_none_or(|n| n == e.name))
        .map(|e| {
            let c = counters.iter().find(|(n, _)| *n == e.name).map(|(_, c)| c.clone()).unwrap_or_default();
            ModelStat {
                name: e.name,
                version: e.version.unwrap_or_else(|| "1".into()),
                last_inference: c.last_inference_ms,
                inference_count: c.inference_count,
                execution_count: c.execution_count,
                inference_stats: InferenceStats {
                    success: c.success,
                    fail: c.fail,
                    queue: c.queue,
                    compute_input: Default::default(),
                    compute_infer: c.compute,
                    compute_output: Default::default(),
                },
                batch_stats: Vec::new(),
            }
        })
        .collect();
    ModelStatistics { model_stats }
}

/// Inference statistics of one model (Triton's statistics extension): classifications answered
/// and failed, time waiting for the worker and on the device.
#[utoipa::path(get, path = "/v2/models/{name}/stats", operation_id = "v2_model_stats", tag = "kserve-v2", params(("name" = String, Path)),
    responses((status = 200, body = ModelStatistics), (status = 404, body = V2ErrorBody)))]
pub async fn model_stats(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelStatistics>, V2Error> {
    if !state.engine.models().iter().any(|e| e.name == name) {
        return Err(crate::engine::EngineError::UnknownModel(name).into());
    }
    Ok(Json(statistics(&state, Some(&name))))
}

/// Inference statistics of every model (Triton's statistics extension).
#[utoipa::path(get, path = "/v2/models/stats", operation_id = "v2_all_stats", tag = "kserve-v2",
    responses((status = 200, body = ModelStatistics)))]
pub async fn all_stats(State(state): State<AppState>) -> Json<ModelStatistics> {
    Json(statistics(&state, None))
}
