//! `POST /classify`.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::dto::ClassPrediction;
use super::error::{ApiError, ErrorBody};
use super::input::ImageRequest;
use crate::engine::{ImageSummary, Timings};

/// Parameters (query string, multipart fields or JSON keys).
#[derive(Debug, serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClassifyParams {
    /// Model name (default: the first configured model).
    pub model: Option<String>,
    /// How many classes to return, most probable first (1..=limits.max_top_k; default 5).
    #[param(minimum = 1, example = 5)]
    pub top_k: Option<usize>,
}

/// The request body, documented from [`ClassifyParams`].
pub type ClassifyBody = ImageRequest<ClassifyParams>;

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyResponse {
    #[schema(example = "efficientnet-lite0")]
    pub model: String,
    pub image: ImageSummary,
    /// Most probable first.
    pub top: Vec<ClassPrediction>,
    pub timings: Timings,
}

/// Classify an image.
///
/// The image goes through the model's preprocessing (resize short side, centre crop) and one
/// forward pass, batched with other requests for the same model.
#[utoipa::path(
    post,
    path = "/classify",
    tag = "classification",
    params(ClassifyParams),
    request_body(description = "The image: multipart field `image`, a raw image body, or JSON with base64", content(
        (ClassifyBody = "multipart/form-data"),
        (ClassifyBody = "application/json"),
        (super::dto::ImageBytes = "image/png"),
        (super::dto::ImageBytes = "image/jpeg"),
        (super::dto::ImageBytes = "image/webp"),
        (super::dto::ImageBytes = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "Top-k classes", body = ClassifyResponse),
        (status = 400, description = "Undecodable image or malformed body", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body or image over the configured limits", body = ErrorBody),
        (status = 415, description = "Unsupported Content-Type", body = ErrorBody),
        (status = 408, description = "The body did not arrive within server.body_read_timeout_ms", body = ErrorBody),
        (status = 422, description = "Invalid parameter, or `image_too_elongated` (limits.max_resized_side)", body = ErrorBody),
        (status = 503, description = "Queue full (see Retry-After), the model not ready (`model_unavailable`: loading, unloading, unloaded) or shutting down", body = ErrorBody),
        (status = 504, description = "Deadline exceeded", body = ErrorBody),
    )
)]
pub async fn classify(State(state): State<AppState>, req: ClassifyBody) -> Result<Json<ClassifyResponse>, ApiError> {
    let max_k = state.engine.settings().max_top_k;
    let top_k = req.params.top_k.unwrap_or(5);
    if top_k == 0 || top_k > max_k {
        return Err(ApiError::invalid("top_k", format!("{top_k} is not in 1..={max_k}")));
    }
    let c = state.engine.classify(req.params.model.as_deref(), req.bytes, state.deadlines.classify).await?;
    let top = c.top(top_k).into_iter().map(|(i, p)| ClassPrediction::new(&c.model, i, f64::from(p))).collect();
    Ok(Json(ClassifyResponse { model: c.model.name.clone(), image: c.image, top, timings: c.timings }))
}
