//! The one place where failures become HTTP: every error leaves as
//! `{"error": {"code", "message"}}` with the status its cause deserves.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::EngineError;
use crate::imaging::ImageError;

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_parameter`, `queue_full`.
    #[schema(example = "invalid_parameter")]
    pub code: String,
    #[schema(example = "invalid parameter `top_k`: 0 is not in 1..=1000")]
    pub message: String,
    /// The offending parameter, for `invalid_parameter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

/// Marks a response as an error answer, with its message (see `v2::protocol_errors`).
#[derive(Debug, Clone)]
pub struct ErrorMessage(pub String);

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), param: None, retry_after: None }
    }

    pub fn invalid(param: &str, message: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_parameter",
            message: format!("invalid parameter `{param}`: {message}"),
            param: Some(param.to_string()),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message) }
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid `Authorization: Bearer <key>` header is required")
    }
}

/// A JSON body that could not be read (wrong content type, not JSON, wrong fields): axum's
/// own answer is plain text, so it is re-worded here in the documented shape.
impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        let code = if e.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE { "unsupported_media_type" } else { "bad_body" };
        ApiError::new(e.status(), code, e.body_text())
    }
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::TooManyBytes { .. } | ImageError::TooManyPixels { .. } => Self::too_large(e.to_string()),
            ImageError::Encode(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "encode_failed", e.to_string()),
            ImageError::Empty | ImageError::UnknownFormat | ImageError::Undecodable { .. } => {
                Self::bad_request("undecodable_image", e.to_string())
            }
        }
    }
}

impl From<crate::remote::RemoteError> for ApiError {
    fn from(e: crate::remote::RemoteError) -> Self {
        use crate::remote::RemoteError as R;
        let msg = e.to_string();
        match e {
            R::Unknown(_) => Self::new(StatusCode::NOT_FOUND, "unknown_remote", msg),
            R::Timeout { .. } => Self::new(StatusCode::GATEWAY_TIMEOUT, "remote_timeout", msg),
            R::Connect { .. } | R::Status { .. } | R::Malformed { .. } | R::Transport { .. } | R::Redirect { .. } => {
                Self::new(StatusCode::BAD_GATEWAY, "remote_error", msg)
            }
            R::Busy { .. } => {
                Self { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "remote_busy", msg) }
            }
            R::Input { .. } => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "remote_input", msg),
        }
    }
}

impl From<crate::jobs::JobError> for ApiError {
    fn from(e: crate::jobs::JobError) -> Self {
        use crate::jobs::JobError as J;
        let msg = e.to_string();
        match e {
            J::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "unknown_job", msg),
            J::Invalid { param, message } => Self::invalid(param, message),
            J::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, "forbidden", msg),
            J::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", msg),
            J::QuotaExceeded(_) => Self::new(StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded", msg),
            J::Store(e) => e.into(),
            J::Engine(e) => e.into(),
        }
    }
}

impl From<crate::jobs::StoreError> for ApiError {
    fn from(e: crate::jobs::StoreError) -> Self {
        use crate::jobs::StoreError as S;
        let msg = e.to_string();
        match e {
            S::Unavailable(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", msg),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "jobs_store", msg),
        }
    }
}

impl From<crate::study::StudyError> for ApiError {
    fn from(e: crate::study::StudyError) -> Self {
        use crate::study::StudyError as S;
        let msg = e.to_string();
        match e {
            S::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "unknown_study", msg),
            S::UnknownObserver => Self::new(StatusCode::NOT_FOUND, "unknown_observer", msg),
            S::Expired => Self::new(StatusCode::GONE, "observer_link_expired", msg),
            S::Invalid { param, message } => Self::invalid(param, message),
            S::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", msg),
            S::Job(e) => e.into(),
            S::Store(e) => e.into(),
            S::Engine(e) => e.into(),
        }
    }
}

impl From<crate::service::ServiceError> for ApiError {
    fn from(e: crate::service::ServiceError) -> Self {
        match e {
            crate::service::ServiceError::Remote(r) => r.into(),
            crate::service::ServiceError::Engine(e) => e.into(),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::UnknownModel(_) => Self::new(StatusCode::NOT_FOUND, "unknown_model", msg),
            EngineError::ModelUnavailable(_) => {
                Self { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "model_unavailable", msg) }
            }
            EngineError::LoadFailed(_) => Self::new(StatusCode::BAD_REQUEST, "load_failed", msg),
            EngineError::Image(img) => img.into(),
            EngineError::InvalidParam { param, message } => Self::invalid(&param, message),
            EngineError::TooCostly { param, .. } => {
                Self { param: Some(param), ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "too_costly", msg) }
            }
            EngineError::TooElongated { .. } => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "image_too_elongated", msg),
            EngineError::QueueFull { .. } => {
                Self { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "queue_full", msg) }
            }
            EngineError::ShuttingDown => {
                Self { retry_after: Some(5), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", msg) }
            }
            EngineError::Deadline(_) => Self::new(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded", msg),
            EngineError::Model(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "model_error", msg),
            EngineError::WorkerPanic(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "worker_panic", msg),
            EngineError::AttackFailed(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "attack_failed", msg),
            EngineError::Internal(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }
}

impl ApiError {
    /// Logged once where it leaves: server faults as errors, refusals at debug.
    fn log(&self) {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), code = self.code, message = %self.message, "request rejected");
        }
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                param: self.param.clone(),
            },
        }
    }

    /// The same error as a stream's `error` event: its body with the status it would have had.
    pub fn event(self) -> ErrorEvent {
        self.log();
        ErrorEvent { status: self.status.as_u16(), body: self.body() }
    }
}

/// A streamed answer's `error` event (`data:`): the status beside the usual error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEvent {
    #[schema(example = 422)]
    pub status: u16,
    #[serde(flatten)]
    pub body: ErrorBody,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let marker = ErrorMessage(self.message.clone());
        let mut res = (self.status, Json(self.body())).into_response();
        res.extensions_mut().insert(marker);
        if let Some(secs) = self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// For routes that fall through: unknown path, in the same JSON shape.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see /openapi.json")
}

/// A known path with a method it does not take (axum's own 405 has an empty body).
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}; see /openapi.json", uri.path()),
    )
}
