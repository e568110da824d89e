//! HTTP: axum routes over the [`Engine`]. Handlers parse and validate, call the engine, and shape
//! JSON; errors leave through [`error::ApiError`] only.

pub mod attack;
pub mod classify;
pub mod dto;
pub mod error;
pub mod input;
pub mod jobs;
pub mod limits;
pub mod middleware;
pub mod openapi;
pub mod ops;
pub mod remotes;
pub mod report;
pub mod repository;
pub mod routes;
pub mod server;
pub mod studies;
pub mod studio;
pub mod target;
pub mod v2;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
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
    /// Request-body bytes buffered at once (`server.max_buffered_body_bytes`).
    pub body_budget: limits::BodyBudget,
    /// The `[[remotes]]`: models behind other servers' endpoints.
    pub remotes: Arc<crate::remote::Remotes>,
    /// Durable background jobs (None where the server runs without them, e.g. in unit tests).
    pub jobs: Option<crate::jobs::Jobs>,
    /// Human studies made from finished jobs (on the jobs' store; None with jobs off).
    pub studies: Option<crate::study::Studies>,
    /// The served OpenAPI document, made once at start from the configuration's bounds.
    pub openapi: axum::body::Bytes,
    /// The route classes' concurrency pools and the public rate.
    pub pools: routes::Pools,
}

impl AppState {
    /// The attack service every attack route calls, with the attack deadline.
    pub fn attacks(&self) -> crate::service::AttackService {
        crate::service::AttackService::new(self.engine.clone(), self.remotes.clone(), self.deadlines.attack)
    }

    pub fn new(
        engine: Engine,
        config: Arc<Config>,
        metrics: Option<PrometheusHandle>,
        remotes: Arc<crate::remote::Remotes>,
    ) -> Self {
        let deadlines = Deadlines {
            classify: Duration::from_millis(config.limits.classify_deadline_ms),
            attack: Duration::from_millis(config.limits.attack_deadline_ms),
        };
        let body_budget = limits::BodyBudget::new(config.server.max_buffered_body_bytes);
        let pools = routes::Pools::new(&config);
        let openapi = axum::body::Bytes::from(openapi::to_json(&openapi::document_for(&config)));
        Self {
            pools,
            openapi,
            engine,
            config,
            deadlines,
            metrics,
            device: Arc::default(),
            body_budget,
            remotes,
            jobs: None,
            studies: None,
        }
    }

    /// Ready for work: the models are loaded *and* the start-up has recorded the device, so a
    /// probe that says ready is never followed by a `/models` without it.
    pub fn is_ready(&self) -> bool {
        self.device.get().is_some() && self.engine.is_ready()
    }

    /// Ready, and the jobs database answers (within 2 s): a server that cannot reach a shared
    /// database leaves the Service until it can.
    pub async fn is_ready_with_store(&self) -> bool {
        if !self.is_ready() {
            return false;
        }
        match &self.jobs {
            None => true,
            Some(jobs) => {
                matches!(tokio::time::timeout(std::time::Duration::from_secs(2), jobs.store().ping()).await, Ok(Ok(())))
            }
        }
    }
}

/// The server's router: the route table ([`routes`], each route behind its class's gate), the
/// fallbacks, and the cross-cutting layers.
pub fn router(state: AppState) -> Router {
    let (api, _) = routes::routes(&state);
    let api = api
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::check_head));
    middleware::apply(api, &state)
        .layer(axum::middleware::from_fn(v2::protocol_errors))
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .with_state(state)
}

/// The probe listener's router (`server.probe_bind`): liveness and readiness only.
pub fn probe_router(state: AppState) -> Router {
    routes::probe_routes(&state)
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::check_head))
        .with_state(state)
}
