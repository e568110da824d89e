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
pub mod repository;
pub mod server;
pub mod studies;
pub mod studio;
pub mod target;
pub mod v2;

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
    /// Request-body bytes buffered at once (`server.max_buffered_body_bytes`).
    pub body_budget: limits::BodyBudget,
    /// The `[[remotes]]`: models behind other servers' endpoints.
    pub remotes: Arc<crate::remote::Remotes>,
    /// Durable background jobs (None where the server runs without them, e.g. in unit tests).
    pub jobs: Option<crate::jobs::Jobs>,
    /// Human studies made from finished jobs (on the jobs' store; None with jobs off).
    pub studies: Option<crate::study::Studies>,
}

impl AppState {
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
        Self {
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
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.limits.max_body_bytes;
    // Routes that do model work share ONE concurrency limit; past it, requests are shed with 503
    // at once rather than queued without bound. A request counts against it only once its body
    // has arrived (`limits::buffer_body` runs outside it), so stalled uploads hold no work slot.
    // Probes and metrics stay outside both.
    let work = Router::new()
        .route("/classify", post(classify::classify))
        .route("/target-label", get(target::preview).post(target::decide))
        .route("/attack", post(attack::attack))
        .route("/v2/models/{name}/infer", post(v2::infer))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(middleware::overloaded))
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(state.config.server.max_concurrent_requests)),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), limits::buffer_body));
    let api = Router::new()
        .merge(work)
        .route("/models", get(ops::models))
        .route("/models/{name}/classes", get(ops::classes))
        .route("/remotes", get(remotes::list))
        .route("/models/{name}/load", post(repository::load))
        .route("/models/{name}/unload", post(repository::unload))
        .route("/v2/repository/index", post(repository::index))
        .route("/v2/repository/models/{name}/load", post(repository::v2_load))
        .route("/v2/repository/models/{name}/unload", post(repository::v2_unload))
        .route(
            "/jobs",
            // An archive upload streams to disk within `jobs.max_archive_bytes` (plus the form's
            // own bytes), not the buffered-body limit.
            get(jobs::list_jobs).post(jobs::create_job).layer(DefaultBodyLimit::max(
                usize::try_from(state.config.jobs.max_archive_bytes.saturating_add(1 << 20)).unwrap_or(usize::MAX),
            )),
        )
        .route("/jobs/{id}", get(jobs::get_job).delete(jobs::cancel_job))
        .route("/jobs/{id}/events", get(jobs::job_events))
        .route("/jobs/{id}/results", get(jobs::job_results))
        .route("/jobs/{id}/files/{*path}", get(jobs::job_file))
        .route("/studies", get(studies::list_studies).post(studies::create_study))
        .route("/studies/{id}", get(studies::get_study).delete(studies::delete_study))
        .route("/studies/{id}/puzzles", get(studies::study_puzzles))
        .route("/studies/{id}/observers", post(studies::add_observer))
        .route("/studies/{id}/results", get(studies::study_results))
        .route("/studies/{id}/answers.csv", get(studies::study_csv))
        .route("/studies/{id}/chart.png", get(studies::study_chart))
        .route("/observe/{token}", get(studies::observer_page))
        .route("/observe/{token}/session", get(studies::session))
        .route("/observe/{token}/answers", post(studies::answer))
        .route("/observe/{token}/puzzles/{puzzle}/image", get(studies::puzzle_image))
        .route("/observe/{token}/puzzles/{puzzle}/references/{n}", get(studies::puzzle_reference))
        .route("/", get(|| async { axum::response::Redirect::temporary("/studio") }))
        .route("/studio", get(studio::page))
        .route("/studio/studio.js", get(studio::script))
        .route("/studio/studio.css", get(studio::style))
        .route("/studio/observe.js", get(studio::observer_script))
        .route("/studio/samples/{name}", get(studio::sample))
        .route("/openapi.json", get(ops::openapi))
        .route("/metrics", get(ops::metrics))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/v2/models/{name}", get(v2::model_metadata))
        .route("/v2/models/{name}/ready", get(v2::model_ready))
        .route("/v2/models/{name}/config", get(v2::model_config))
        .route("/v2/models/{name}/stats", get(v2::model_stats))
        .route("/v2/models/stats", get(v2::all_stats))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::check_head));
    middleware::apply(api, &state)
        .layer(axum::middleware::from_fn(v2::protocol_errors))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}
