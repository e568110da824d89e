//! The route table: every route the server answers, each registered under a [`Class`] that
//! decides who may call it (the API key or not) and what it may send (body size, body read time,
//! which concurrency pool). The router, the OpenAPI document and the hostile-client test are all
//! derived from this one table, so a route added later is bounded and classed by construction:
//! there is no other way to register one (a unit test keeps `.route(` out of the other modules).
//!
//! Each class's bounds are published in the OpenAPI document as `x-labelfool` on every operation,
//! and its `security` is set from the class, not written per handler.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use utoipa::openapi::security::SecurityRequirement;
use utoipa_axum::router::UtoipaMethodRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::{AppState, attack, classify, jobs, limits, ops, remotes, repository, studies, studio, target, v2};
use crate::config::Config;

/// Who may call a route and what it may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Liveness and readiness: no key, a small body, no pool; also served on `server.probe_bind`.
    Probe,
    /// `/metrics`: keyed only with `server.metrics_require_key`.
    Metrics,
    /// The studio's page and assets and observers' links: no key (an observer's token is checked
    /// by the study routes), a small body, and a concurrency pool and rate of their own, so that
    /// public traffic can never hold the work's slots or the probes' connections.
    Public,
    /// Keyed reads and small JSON commands.
    Api,
    /// Keyed model work: an image body up to `limits.max_body_bytes`, counted against the work
    /// pool (`server.max_concurrent_requests`) once it has arrived.
    Work,
    /// Keyed archive uploads: a multipart body streamed to disk up to `jobs.max_archive_bytes`;
    /// any other body is small.
    Upload,
}

/// What a class allows, as the OpenAPI document publishes it (`x-labelfool`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bounds {
    pub class: Class,
    /// Whether the route needs `Authorization: Bearer <server.api_key>` when a key is set.
    pub requires_key: bool,
    /// Largest body accepted; a larger declared or sent body gets 413.
    pub max_body_bytes: u64,
    /// The whole body must arrive within this; else 408.
    pub body_read_timeout_ms: u64,
    /// Requests of this class handled at once; past it 503 at once (none: unpooled).
    pub concurrency: Option<usize>,
}

impl Class {
    pub fn bounds(self, config: &Config) -> Bounds {
        let small = config.limits.max_small_body_bytes as u64;
        let read = config.server.body_read_timeout_ms;
        let (requires_key, max_body_bytes, concurrency) = match self {
            Self::Probe => (false, small, None),
            Self::Metrics => (config.server.metrics_require_key, small, None),
            Self::Public => (false, small, Some(config.server.max_public_requests)),
            Self::Api => (true, small, None),
            Self::Work => (true, config.limits.max_body_bytes as u64, Some(config.server.max_concurrent_requests)),
            Self::Upload => (true, config.jobs.max_archive_bytes.saturating_add(ARCHIVE_FORM_OVERHEAD), None),
        };
        Bounds { class: self, requires_key, max_body_bytes, body_read_timeout_ms: read, concurrency }
    }
}

/// The multipart form's own bytes (boundaries, the `spec` part) beside the archive.
const ARCHIVE_FORM_OVERHEAD: u64 = 1 << 20;

/// Every route, with its class. The one place routes are registered.
fn table() -> Vec<(Class, UtoipaMethodRouter<AppState>)> {
    use Class::*;
    vec![
        (Probe, routes!(ops::health)),
        (Probe, routes!(ops::ready)),
        (Probe, routes!(v2::live)),
        (Probe, routes!(v2::ready)),
        (Metrics, routes!(ops::metrics)),
        (Public, routes!(ops::root)),
        (Public, routes!(studio::page)),
        (Public, routes!(studio::script)),
        (Public, routes!(studio::style)),
        (Public, routes!(studio::observer_script)),
        (Public, routes!(studio::sample)),
        (Api, routes!(ops::openapi)),
        (Public, routes!(studies::observer_page)),
        (Public, routes!(studies::session)),
        (Public, routes!(studies::answer)),
        (Public, routes!(studies::puzzle_image)),
        (Public, routes!(studies::puzzle_reference)),
        (Work, routes!(classify::classify)),
        (Work, routes!(target::preview, target::decide)),
        (Work, routes!(attack::attack)),
        (Work, routes!(v2::infer::infer)),
        (Api, routes!(ops::models)),
        (Api, routes!(ops::classes)),
        (Api, routes!(remotes::list)),
        (Api, routes!(repository::load)),
        (Api, routes!(repository::unload)),
        (Api, routes!(repository::index)),
        (Api, routes!(repository::v2_load)),
        (Api, routes!(repository::v2_unload)),
        (Api, routes!(v2::server_metadata)),
        (Api, routes!(v2::model_metadata)),
        (Api, routes!(v2::model_ready)),
        (Api, routes!(v2::model_config)),
        (Api, routes!(v2::model_stats)),
        (Api, routes!(v2::all_stats)),
        (Upload, routes!(jobs::create_job)),
        (Api, routes!(jobs::list_jobs)),
        (Api, routes!(jobs::get_job, jobs::cancel_job)),
        (Api, routes!(jobs::job_events)),
        (Api, routes!(jobs::job_results)),
        (Api, routes!(jobs::job_file)),
        (Api, routes!(jobs::job_report)),
        (Api, routes!(studies::create_study, studies::list_studies)),
        (Api, routes!(studies::get_study, studies::delete_study)),
        (Api, routes!(studies::study_puzzles)),
        (Api, routes!(studies::add_observer)),
        (Api, routes!(studies::revoke_observer)),
        (Api, routes!(studies::study_results)),
        (Api, routes!(studies::study_csv)),
        (Api, routes!(studies::study_chart)),
    ]
}

/// The concurrency pools and the public rate, shared by every request of their class.
#[derive(Clone)]
pub struct Pools {
    work: Arc<Semaphore>,
    public: Arc<Semaphore>,
    public_rate: Arc<governor::DefaultDirectRateLimiter>,
}

impl Pools {
    pub fn new(config: &Config) -> Self {
        let per_second =
            std::num::NonZeroU32::new(config.server.public_requests_per_second).unwrap_or(std::num::NonZeroU32::MIN);
        // Bursts of two seconds' worth: a page load fetches several assets at once.
        let burst = per_second.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
        let quota = governor::Quota::per_second(per_second).allow_burst(burst);
        Self {
            work: Arc::new(Semaphore::new(config.server.max_concurrent_requests)),
            public: Arc::new(Semaphore::new(config.server.max_public_requests)),
            public_rate: Arc::new(governor::RateLimiter::direct(quota)),
        }
    }
}

/// Paths whose last parameter takes the rest of the path (`{*name}` to axum; OpenAPI has no
/// such template, so the document keeps `{name}`).
const REST_OF_PATH: &[&str] = &["/jobs/{id}/files/{path}"];

fn axum_path(path: &str) -> String {
    match (REST_OF_PATH.contains(&path), path.rfind('{')) {
        (true, Some(i)) => format!("{}{{*{}", &path[..i], &path[i + 1..]),
        _ => path.to_string(),
    }
}

/// The table as a router and its document: each class's routes with `layer` applied to them,
/// and each operation marked with its class's bounds and security.
fn build(
    config: &Config,
    mut layer: impl FnMut(Class, Router<AppState>) -> Router<AppState>,
) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    // The paths and their schemas only; `openapi` puts them under the document's title and tags.
    let mut doc = utoipa::openapi::OpenApiBuilder::new().build();
    let mut router = Router::new();
    for (class, (schemas, paths, method_router)) in table() {
        let mut part = Router::new();
        for path in paths.paths.keys() {
            part = part.route(&axum_path(path), method_router.clone());
        }
        router = router.merge(layer(class, part));
        let mut part_doc = utoipa::openapi::OpenApiBuilder::new()
            .paths(paths)
            .components(Some(utoipa::openapi::ComponentsBuilder::new().schemas_from_iter(schemas).build()))
            .build();
        mark(&mut part_doc, class.bounds(config));
        doc.merge(part_doc);
    }
    (router, doc)
}

fn mark(doc: &mut utoipa::openapi::OpenApi, bounds: Bounds) {
    let value = serde_json::to_value(bounds).unwrap_or_default();
    for item in doc.paths.paths.values_mut() {
        for op in
            [&mut item.get, &mut item.post, &mut item.delete, &mut item.put, &mut item.patch].into_iter().flatten()
        {
            op.extensions.get_or_insert_with(Default::default).insert("x-labelfool".into(), value.clone());
            // Public classes say so; keyed ones inherit the document's bearer requirement.
            op.security = (!bounds.requires_key).then(|| vec![SecurityRequirement::default()]);
        }
    }
}

/// The routes' part of the OpenAPI document (paths, their schemas, bounds and security) as
/// `config` bounds them.
pub fn document(config: &Config) -> utoipa::openapi::OpenApi {
    build(config, |_, part| part).1
}

/// The routes with their classes' gates; the caller adds the cross-cutting layers.
pub fn routes(state: &AppState) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let config = state.config.clone();
    build(&config, |class, part| {
        let bounds = class.bounds(&config);
        let part = part.route_layer(from_fn_with_state(Gate { state: state.clone(), bounds }, gate));
        match class {
            Class::Upload => {
                part.route_layer(DefaultBodyLimit::max(usize::try_from(bounds.max_body_bytes).unwrap_or(usize::MAX)))
            }
            _ => part,
        }
    })
}

/// The probe routes alone, for the probe listener (`server.probe_bind`).
pub fn probe_routes(state: &AppState) -> Router<AppState> {
    let config = state.config.clone();
    let mut router = Router::new();
    for (class, (_, paths, method_router)) in table() {
        if class == Class::Probe {
            for path in paths.paths.keys() {
                router = router.route(path, method_router.clone());
            }
        }
    }
    router.route_layer(from_fn_with_state(Gate { state: state.clone(), bounds: Class::Probe.bounds(&config) }, gate))
}

#[derive(Clone)]
struct Gate {
    state: AppState,
    bounds: Bounds,
}

/// The one gate every route passes: the key, the class's pool and rate, then the body within
/// its size and read time (a work request takes its work slot only once its body has arrived,
/// so a stalled upload holds no work slot).
async fn gate(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let Gate { state, bounds } = gate;
    if bounds.requires_key
        && req.method() != Method::OPTIONS
        && let Some(refused) = super::middleware::check_key(&state, req.headers())
    {
        return super::middleware::refuse(refused, req.into_body()).await;
    }
    let mut _public: Option<OwnedSemaphorePermit> = None;
    if bounds.class == Class::Public {
        if state.pools.public_rate.check().is_err() {
            return limits::closing(busy("public requests are over server.public_requests_per_second").into_response());
        }
        match state.pools.public.clone().try_acquire_owned() {
            Ok(p) => _public = Some(p),
            Err(_) => {
                return limits::closing(
                    busy("public requests in flight are over server.max_public_requests").into_response(),
                );
            }
        }
    }
    let within = Duration::from_millis(bounds.body_read_timeout_ms);
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if bounds.class == Class::Upload && multipart {
        // Streamed to disk by the handler: bounded here in size (DefaultBodyLimit, and the
        // declared length at once) and in time.
        if let Some(refused) = limits::declared_over(req.headers(), bounds.max_body_bytes) {
            return refused;
        }
        let (parts, body) = req.into_parts();
        return next.run(Request::from_parts(parts, limits::with_deadline(body, within))).await;
    }
    let limit = if bounds.class == Class::Upload {
        state.config.limits.max_small_body_bytes as u64
    } else {
        bounds.max_body_bytes
    };
    let (req, permit) = match limits::buffer(&state, req, limit, within).await {
        Ok(read) => read,
        Err(res) => return res,
    };
    let _work = if bounds.class == Class::Work {
        match state.pools.work.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => return busy("work requests in flight are over server.max_concurrent_requests").into_response(),
        }
    } else {
        None
    };
    let res = next.run(req).await;
    drop(permit);
    res
}

/// 503 with `Retry-After: 1`, naming the pool that is full.
fn busy(why: &str) -> ApiError {
    ApiError::overloaded(format!("{why}; retry later"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_registered_here_only() {
        // Routes are registered only from `table()`: no other module of `src/http` may call
        // `.route(` or build a `Router::new()` of its own.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http");
        let mut offenders = Vec::new();
        let mut stack = vec![std::path::PathBuf::from(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("routes.rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    if text.contains(".route(") || text.contains("Router::new()") {
                        offenders.push(p.display().to_string());
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "routes registered outside src/http/routes.rs: {offenders:?}");
    }

    #[test]
    fn a_rest_of_path_parameter_is_a_wildcard_to_axum_only() {
        assert_eq!(axum_path("/jobs/{id}/files/{path}"), "/jobs/{id}/files/{*path}");
        assert_eq!(axum_path("/jobs/{id}"), "/jobs/{id}");
        for p in REST_OF_PATH {
            let mut config = Config::default();
            config.models.push(crate::config::ModelConfig::bundle("m", "/x"));
            assert!(document(&config).paths.paths.contains_key(*p), "{p} is not a route");
        }
    }

    #[test]
    fn every_operation_carries_its_class_and_security() {
        let mut config = Config::default();
        config.models.push(crate::config::ModelConfig::bundle("m", "/x"));
        let doc = serde_json::to_value(document(&config)).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 45, "{} paths", paths.len());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let x = &op["x-labelfool"];
                assert!(x["class"].is_string() && x["max_body_bytes"].as_u64().is_some(), "{method} {path}: {op}");
                let public = !x["requires_key"].as_bool().unwrap();
                assert_eq!(op["security"] == serde_json::json!([{}]), public, "{method} {path}");
            }
        }
        let observe = &doc["paths"]["/observe/{token}/answers"]["post"]["x-labelfool"];
        assert_eq!(observe["class"], "public");
        assert_eq!(observe["max_body_bytes"], 64 * 1024);
    }
}
