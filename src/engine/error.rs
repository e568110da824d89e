//! The engine's one error type: everything that can go wrong between a request and its answer.
//! `http::error` maps each variant to one status code; nothing of the worker's job types leaks.

use std::time::Duration;

use super::queue::WorkerError;
use crate::attack::AttackError;
use crate::attack::params::ParamError;
use crate::imaging::ImageError;

/// Everything that can go wrong between a request and its answer. `http::error` maps each variant
/// to one status code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    /// The model exists but is not ready (loading, unloading, unloaded, failed, unsupported).
    #[error("{0}")]
    ModelUnavailable(String),
    /// A load that failed (the model's state says `failed` with the same reason).
    #[error("{0}")]
    LoadFailed(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("invalid parameter `{param}`: {message}")]
    InvalidParam { param: String, message: String },
    /// The request would cost more than the configured bounds allow; refused before any work.
    #[error("too costly: `{param}`: {message}")]
    TooCostly { param: String, message: String },
    /// After the model's resize the image would be too long on one side.
    #[error(
        "the image is {width}×{height}: resized for model {model} it would be {resized_width}×{resized_height}; \
         the longest side after resize may be {limit} (limits.max_resized_side), so the aspect ratio may be at most {ratio:.1}:1"
    )]
    TooElongated {
        model: String,
        width: u32,
        height: u32,
        resized_width: i64,
        resized_height: i64,
        limit: u32,
        ratio: f64,
    },
    #[error("the {queue} queue is full; retry later")]
    QueueFull { queue: &'static str },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the request did not finish within its {0:?} deadline")]
    Deadline(Duration),
    /// libtorch failed on this job (the worker goes on).
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    WorkerPanic(String),
    #[error("{0}")]
    AttackFailed(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidParam { param: param.into(), message: message.into() }
    }

    /// A refusal for cost, counted in `labelfool_requests_refused_total{reason="cost"}`.
    pub fn too_costly(param: &str, message: impl Into<String>) -> Self {
        metrics::counter!("labelfool_requests_refused_total", "reason" => "cost").increment(1);
        Self::TooCostly { param: param.into(), message: message.into() }
    }
}

impl EngineError {
    /// A job refused at the queue's door.
    pub(super) fn refused(r: super::queue::Refused, queue: &'static str) -> Self {
        match r {
            super::queue::Refused::Full => Self::QueueFull { queue },
            super::queue::Refused::Closed => Self::ShuttingDown,
        }
    }
}

impl From<WorkerError> for EngineError {
    fn from(e: WorkerError) -> Self {
        let msg = e.to_string();
        match e {
            WorkerError::Torch(_) => Self::Model(msg),
            WorkerError::Panic(_) => Self::WorkerPanic(msg),
            WorkerError::Attack(_) => Self::AttackFailed(msg),
            WorkerError::ShuttingDown => Self::ShuttingDown,
            WorkerError::ModelUnloaded(_) => Self::ModelUnavailable(msg),
        }
    }
}

impl From<crate::model::Unavailable> for EngineError {
    fn from(e: crate::model::Unavailable) -> Self {
        match e {
            crate::model::Unavailable::Unknown(name) => Self::UnknownModel(name),
            other => Self::ModelUnavailable(other.to_string()),
        }
    }
}

impl From<ParamError> for EngineError {
    fn from(e: ParamError) -> Self {
        match e {
            ParamError::Invalid { param, message } => Self::InvalidParam { param, message },
            ParamError::TooCostly { param, message } => Self::too_costly(&param, message),
        }
    }
}

impl From<AttackError> for EngineError {
    fn from(e: AttackError) -> Self {
        WorkerError::Attack(e).into()
    }
}
