//! The OpenAPI document: this module's title, tags and security scheme, with the paths of the
//! route table ([`super::routes`]) and their handlers' annotations. `openapi/openapi.json` is the
//! document at the default configuration, checked in; a test fails when the two drift.

use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::{attack, dto, error, jobs};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "LabelFool server",
        description = "Image classification and LabelFool adversarial images (wrong labels that are hard for a person to notice), served next to your model-serving stack for red-teaming.",
        license(name = "MIT OR Apache-2.0"),
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

/// The document as `config` bounds the routes: this module's title, tags and security scheme,
/// with the route table's paths.
pub fn document_for(config: &crate::config::Config) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.merge(super::routes::document(config));
    doc
}

/// The document at the default configuration (what `openapi/openapi.json` holds).
pub fn document() -> utoipa::openapi::OpenApi {
    document_for(&crate::config::Config::default())
}

/// A document as the checked-in file holds it: pretty JSON with a trailing newline.
pub fn to_json(doc: &utoipa::openapi::OpenApi) -> String {
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

pub fn document_json() -> String {
    to_json(&document())
}
