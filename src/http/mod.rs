//! HTTP: axum routes over the [`Engine`]. Handlers parse and validate, call the engine, and shape
//! JSON; errors leave through [`error::ApiError`] only.

pub mod attack;
pub mod classify;
pub mod dto;
pub mod error;
pub mod input;
pub mod middleware;
pub mod openapi;
pub mod ops;
pub mod target;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;
use crate::engine::Engine;

/// Per-route deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub classify: Duration,
    pub attack: Duration,
}

#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub config: Arc<Config>,
    pub deadlines: Deadlines,
    pub metrics: Option<PrometheusHandle>,
    /// Set once the worker reports its device.
    pub device: Arc<OnceLock<String>>,
}

impl AppState {
    pub fn new(engine: Engine, config: Arc<Config>, metrics: Option<PrometheusHandle>) -> Self {
        let deadlines = Deadlines {
            classify: Duration::from_millis(config.limits.classify_deadline_ms),
            attack: Duration::from_millis(config.limits.attack_deadline_ms),
        };
        Self { engine, config, deadlines, metrics, device: Arc::default() }
    }
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.limits.max_body_bytes;
    let api = Router::new()
        .route("/classify", post(classify::classify))
        .route("/target-label", get(target::preview).post(target::decide))
        .route("/attack", post(attack::attack))
        .route("/models", get(ops::models))
        .route("/models/{name}/classes", get(ops::classes))
        .route("/openapi.json", get(ops::openapi))
        .route("/metrics", get(ops::metrics))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .fallback(error::not_found);
    middleware::apply(api, &state).layer(DefaultBodyLimit::max(body_limit)).with_state(state)
}
