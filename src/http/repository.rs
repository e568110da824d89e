//! Loading and unloading models at run time: the Open Inference Protocol's model-repository
//! extension (Triton's `POST /v2/repository/index`, `…/models/{name}/load`, `…/unload`) and the
//! same on `/models/{name}/load|unload`. The work happens on the worker; these only ask and wait.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::v2::V2ErrorBody;
use crate::model::ModelState;

/// `POST /v2/repository/index` body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IndexRequest {
    /// Only models that are ready (true) or all of them (false, the default).
    #[serde(default)]
    pub ready: bool,
}

/// One model of the repository index, as Triton reports it.
#[derive(Debug, Serialize, ToSchema)]
pub struct IndexEntry {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `READY`, `LOADING`, `UNLOADING` or `UNAVAILABLE`.
    #[schema(example = "READY")]
    pub state: String,
    /// Why a model is unavailable (failed load, unsupported platform); empty otherwise.
    pub reason: String,
}

/// The models this server knows (configured bundles and repository models, the repositories read
/// again first) with their states.
#[utoipa::path(post, path = "/v2/repository/index", operation_id = "v2_repository_index", tag = "model-repository",
    request_body(content = Option<IndexRequest>, content_type = "application/json"),
    responses((status = 200, body = Vec<IndexEntry>), (status = 400, body = V2ErrorBody)))]
pub async fn index(State(state): State<AppState>, body: axum::body::Bytes) -> Result<Json<Vec<IndexEntry>>, ApiError> {
    let req: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("bad_json", e.to_string()))?
    };
    let entries = state
        .engine
        .repository_index()
        .into_iter()
        .filter(|e| !req.ready || e.state == ModelState::Ready)
        .map(|e| IndexEntry {
            name: e.name,
            version: e.version,
            state: e.state.triton().to_string(),
            reason: e.reason.unwrap_or_default(),
        })
        .collect();
    Ok(Json(entries))
}

/// An empty JSON object: Triton's answer to a successful load or unload.
#[derive(Debug, Serialize, ToSchema)]
pub struct Empty {}

/// Loads a model and answers once it is ready (or has failed, with the reason). Requests for
/// other models are served meanwhile.
#[utoipa::path(post, path = "/v2/repository/models/{name}/load", operation_id = "v2_repository_load", tag = "model-repository",
    params(("name" = String, Path)),
    responses((status = 200, body = Empty), (status = 400, description = "The load failed", body = V2ErrorBody),
        (status = 404, body = V2ErrorBody), (status = 503, description = "The model is unloading", body = V2ErrorBody)))]
pub async fn v2_load(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Empty>, ApiError> {
    state.engine.load_model(&name).await?;
    Ok(Json(Empty {}))
}

/// Unloads a model: requests for it get 503 from now on; its attacks in flight end with 503.
#[utoipa::path(post, path = "/v2/repository/models/{name}/unload", operation_id = "v2_repository_unload", tag = "model-repository",
    params(("name" = String, Path)),
    responses((status = 200, body = Empty), (status = 404, body = V2ErrorBody), (status = 503, description = "The model is loading", body = V2ErrorBody)))]
pub async fn v2_unload(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Empty>, ApiError> {
    state.engine.unload_model(&name).await?;
    Ok(Json(Empty {}))
}

/// A model's state after a load or unload.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelStateResponse {
    pub name: String,
    pub state: ModelState,
}

/// Loads a model (as `POST /v2/repository/models/{name}/load`).
#[utoipa::path(post, path = "/models/{name}/load", tag = "operations", params(("name" = String, Path)),
    responses((status = 200, body = ModelStateResponse), (status = 400, description = "The load failed", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn load(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelStateResponse>, ApiError> {
    state.engine.load_model(&name).await?;
    Ok(Json(ModelStateResponse { name, state: ModelState::Ready }))
}

/// Unloads a model (as `POST /v2/repository/models/{name}/unload`).
#[utoipa::path(post, path = "/models/{name}/unload", tag = "operations", params(("name" = String, Path)),
    responses((status = 200, body = ModelStateResponse), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn unload(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelStateResponse>, ApiError> {
    state.engine.unload_model(&name).await?;
    Ok(Json(ModelStateResponse { name, state: ModelState::Unloaded }))
}
