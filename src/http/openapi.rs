//! The OpenAPI document, generated from the handlers' annotations. `openapi/openapi.json` is this
//! document, checked in; a test fails when the two drift.

use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::{attack, classify, dto, error, jobs, ops, remotes, repository, studies, studio, target, v2};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "LabelFool server",
        description = "Image classification and LabelFool adversarial images (wrong labels that are hard for a person to notice), served next to your model-serving stack for red-teaming.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        classify::classify,
        target::preview,
        target::decide,
        attack::attack,
        ops::health,
        ops::ready,
        ops::models,
        ops::classes,
        repository::load,
        repository::unload,
        remotes::list,
        ops::openapi,
        ops::metrics,
        v2::server_metadata,
        v2::live,
        v2::ready,
        v2::model_metadata,
        v2::model_ready,
        v2::infer::infer,
        v2::model_config,
        v2::model_stats,
        v2::all_stats,
        repository::index,
        repository::v2_load,
        repository::v2_unload,
        jobs::create_job,
        jobs::list_jobs,
        jobs::get_job,
        jobs::cancel_job,
        jobs::job_events,
        jobs::job_results,
        jobs::job_file,
        studio::page,
        studies::create_study,
        studies::list_studies,
        studies::get_study,
        studies::delete_study,
        studies::study_puzzles,
        studies::add_observer,
        studies::study_results,
        studies::study_csv,
        studies::study_chart,
        studies::observer_page,
        studies::session,
        studies::answer,
        studies::puzzle_image,
        studies::puzzle_reference,
    ),
    components(schemas(jobs::ArchiveUpload, error::ErrorBody, dto::ClassRef, dto::ClassPrediction, dto::ClassDistance, attack::RemoteAttackResponse)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "classification", description = "Classify images"),
        (name = "labelfool", description = "Target-label selection and adversarial generation"),
        (name = "operations", description = "Health, readiness, models, metrics"),
        (name = "kserve-v2", description = "Open Inference Protocol (KServe v2) for classification"),
        (name = "studio", description = "The web page"),
        (name = "jobs", description = "Durable background evals: create, follow (SSE), cancel, download results"),
        (name = "studies", description = "The paper's human study on a finished job: observers' links, answers, Confusion Rate and Performance Gain"),
        (name = "model-repository", description = "Open Inference Protocol model-repository extension (Triton's): index, load, unload"),
    )
)]
struct ApiDoc;

/// Declares the optional API key; routes marked `security(())` never need it.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Required only when the server is configured with an API key"))
                    .build(),
            ),
        );
    }
}

pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The document as the checked-in file holds it: pretty JSON with a trailing newline.
pub fn document_json() -> String {
    let mut s = serde_json::to_string_pretty(&document()).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}
