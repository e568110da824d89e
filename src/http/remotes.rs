//! `GET /remotes`: the configured remote targets and whether each answers now.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::remote::{RemoteInput, Scores};

#[derive(Debug, Serialize, ToSchema)]
pub struct RemoteDescription {
    /// Addressed as `remote:<name>` (`/attack?verify=remote:<name>`).
    pub name: String,
    /// The configured URL without the user name and password it may hold.
    pub url: String,
    pub model: String,
    pub version: Option<String>,
    pub input: RemoteInput,
    pub scores: Scores,
    pub num_classes: usize,
    /// `ready`, or why not (unreachable, not ready, …), from `GET …/v2/models/<model>/ready`.
    #[schema(example = "ready")]
    pub health: String,
}

/// The configured remote targets, each with its health, checked now (in parallel, each within
/// its `timeout_ms`).
#[utoipa::path(get, path = "/remotes", tag = "operations", responses((status = 200, body = Vec<RemoteDescription>)))]
pub async fn list(State(state): State<AppState>) -> Json<Vec<RemoteDescription>> {
    let checks = state.remotes.iter().map(|r| async move {
        let health = match r.health().await {
            Ok(()) => "ready".to_string(),
            Err(e) => e.to_string(),
        };
        RemoteDescription {
            name: r.config.name.clone(),
            url: crate::remote::redact_url(&r.config.url),
            model: r.config.model.clone(),
            version: r.config.version.clone(),
            input: r.config.input,
            scores: r.config.scores,
            num_classes: r.classes.len(),
            health,
        }
    });
    Json(futures::future::join_all(checks).await)
}
