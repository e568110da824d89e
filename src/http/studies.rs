//! `/studies` (the human study's admin, behind the API key) and `/observe/{token}` (an
//! observer's page and its calls: the token in the link is the only credential, so observers
//! need no account and never see the API key). A link expires (410 Gone after it, so the
//! observer learns to ask for a new one rather than suspect a typo) and can be revoked one by
//! one (404 after it, like a link that never existed).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::study::{AnswerIn, NewObserver, ObserverInfo, Puzzle, Session, Studies, StudyInfo, StudyResults, StudySpec};

/// The service with this server's `[studies]` settings.
fn studies(state: &AppState) -> Result<Studies, ApiError> {
    state
        .studies
        .clone()
        .map(|s| s.with_config(state.config.studies.clone()))
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "jobs_unavailable", "jobs and studies are off"))
}

/// Makes a human study of a finished job: puzzles (each source image clean with its true label,
/// each method's adversarial image with its new label), split into groups that never hold two
/// puzzles of the same source; optionally creates observers at once.
#[utoipa::path(post, path = "/studies", tag = "studies", request_body = StudySpec,
    responses((status = 201, body = StudyInfo), (status = 404, body = ErrorBody, description = "no such job"),
        (status = 409, body = ErrorBody, description = "the job is not done"), (status = 422, body = ErrorBody)))]
pub async fn create_study(
    State(state): State<AppState>,
    body: Result<Json<StudySpec>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(spec) = body?;
    let study = studies(&state)?.create(spec).await?;
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/studies/{}", study.id))], Json(study)).into_response())
}

/// Every study, newest first.
#[utoipa::path(get, path = "/studies", tag = "studies", responses((status = 200, body = Vec<StudyInfo>)))]
pub async fn list_studies(State(state): State<AppState>) -> Result<Json<Vec<StudyInfo>>, ApiError> {
    Ok(Json(studies(&state)?.list().await?))
}

/// A study with its observers' links and progress.
#[utoipa::path(get, path = "/studies/{id}", tag = "studies", params(("id" = String, Path)),
    responses((status = 200, body = StudyInfo), (status = 404, body = ErrorBody)))]
pub async fn get_study(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<StudyInfo>, ApiError> {
    Ok(Json(studies(&state)?.get(&id).await?))
}

/// Deletes a study: its puzzles, references, observers and their answers, and its folder of
/// images; the observers' links stop working. The job it was made from stays.
#[utoipa::path(delete, path = "/studies/{id}", tag = "studies", params(("id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody)))]
pub async fn delete_study(State(state): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<StatusCode, ApiError> {
    studies(&state)?.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every puzzle with its category, group and whether its label is true (for the admin only).
#[utoipa::path(get, path = "/studies/{id}/puzzles", tag = "studies", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Puzzle>), (status = 404, body = ErrorBody)))]
pub async fn study_puzzles(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Vec<Puzzle>>, ApiError> {
    Ok(Json(studies(&state)?.puzzles(&id).await?))
}

/// Adds an observer (to the group with the fewest); the answer holds their link and when it
/// expires.
#[utoipa::path(post, path = "/studies/{id}/observers", tag = "studies", params(("id" = String, Path)),
    request_body = NewObserver,
    responses((status = 201, body = ObserverInfo), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "name taken"),
        (status = 422, body = ErrorBody, description = "a name or `expires_in_hours` out of bounds")))]
pub async fn add_observer(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<NewObserver>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body?;
    let o = studies(&state)?.add_observer(&id, new).await?;
    Ok((StatusCode::CREATED, Json(o)).into_response())
}

/// Revokes one observer's link, by the observer's name: it then answers 404 like one that never
/// existed. The observer stays listed (with `revoked_ms`) and their answers still count; the
/// name stays taken. Revoking a revoked link is no error.
#[utoipa::path(delete, path = "/studies/{id}/observers/{observer}", tag = "studies",
    params(("id" = String, Path), ("observer" = String, Path, description = "the observer's name")),
    responses((status = 204, description = "revoked"),
        (status = 404, body = ErrorBody, description = "no such study or observer")))]
pub async fn revoke_observer(
    State(state): State<AppState>,
    UrlPath((id, observer)): UrlPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    studies(&state)?.revoke_observer(&id, &observer).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Confusion Rate and Performance Gain per observer and method, their mean and spread over
/// observers, pooled, and the same for the animal subset.
#[utoipa::path(get, path = "/studies/{id}/results", tag = "studies", params(("id" = String, Path)),
    responses((status = 200, body = StudyResults), (status = 404, body = ErrorBody)))]
pub async fn study_results(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<StudyResults>, ApiError> {
    Ok(Json(studies(&state)?.results(&id).await?))
}

/// Every answer as CSV, one row per answer, named `study-<id>-answers.csv`.
#[utoipa::path(get, path = "/studies/{id}/answers.csv", tag = "studies", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/csv", body = String), (status = 404, body = ErrorBody)))]
pub async fn study_csv(State(state): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let csv = studies(&state)?.csv(&id).await?;
    let disposition = format!("attachment; filename=\"study-{id}-answers.csv\"");
    Ok((
        [(header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()), (header::CONTENT_DISPOSITION, disposition)],
        csv,
    )
        .into_response())
}

/// The Performance Gain per method (mean over observers ± one standard deviation), all images
/// and animals, as a PNG chart (the paper's Figure 3).
#[utoipa::path(get, path = "/studies/{id}/chart.png", tag = "studies", params(("id" = String, Path)),
    responses((status = 200, content_type = "image/png", description = "the chart"), (status = 404, body = ErrorBody)))]
pub async fn study_chart(State(state): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let png = studies(&state)?.chart(&id).await?;
    let disposition = format!("inline; filename=\"study-{id}-chart.png\"");
    Ok(([(header::CONTENT_TYPE, "image/png".to_string()), (header::CONTENT_DISPOSITION, disposition)], png)
        .into_response())
}

/// The observer's page.
#[utoipa::path(get, path = "/observe/{token}", tag = "studies", security(()), params(("token" = String, Path)),
    responses((status = 200, content_type = "text/html", description = "the page")))]
pub async fn observer_page(UrlPath(_token): UrlPath<String>) -> Response {
    super::studio::observer_page()
}

/// The observer's progress and next puzzle.
#[utoipa::path(get, path = "/observe/{token}/session", tag = "studies", security(()), params(("token" = String, Path)),
    responses((status = 200, body = Session), (status = 404, body = ErrorBody),
        (status = 410, body = ErrorBody, description = "the link expired")))]
pub async fn session(
    State(state): State<AppState>,
    UrlPath(token): UrlPath<String>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(studies(&state)?.session(&token).await?))
}

/// Answers a puzzle ("correct" or "incorrect"); the answer is stored at once and the first one
/// stands. Returns the session with the next puzzle.
#[utoipa::path(post, path = "/observe/{token}/answers", tag = "studies", security(()), params(("token" = String, Path)),
    request_body = AnswerIn,
    responses((status = 200, body = Session), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "already answered"),
        (status = 410, body = ErrorBody, description = "the link expired"), (status = 422, body = ErrorBody)))]
pub async fn answer(
    State(state): State<AppState>,
    UrlPath(token): UrlPath<String>,
    body: Result<Json<AnswerIn>, JsonRejection>,
) -> Result<Json<Session>, ApiError> {
    let Json(a) = body?;
    Ok(Json(studies(&state)?.answer(&token, a).await?))
}

/// A puzzle's image (PNG).
#[utoipa::path(get, path = "/observe/{token}/puzzles/{puzzle}/image", tag = "studies", security(()),
    params(("token" = String, Path), ("puzzle" = i64, Path)),
    responses((status = 200, content_type = "image/png", description = "the image"), (status = 404, body = ErrorBody),
        (status = 410, body = ErrorBody, description = "the link expired")))]
pub async fn puzzle_image(
    State(state): State<AppState>,
    UrlPath((token, puzzle)): UrlPath<(String, i64)>,
) -> Result<Response, ApiError> {
    let (bytes, mime) = studies(&state)?.observer_file(&token, puzzle, None).await?;
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}

/// A reference picture of the puzzle's label's class.
#[utoipa::path(get, path = "/observe/{token}/puzzles/{puzzle}/references/{n}", tag = "studies", security(()),
    params(("token" = String, Path), ("puzzle" = i64, Path), ("n" = usize, Path)),
    responses((status = 200, description = "the picture"), (status = 404, body = ErrorBody),
        (status = 410, body = ErrorBody, description = "the link expired")))]
pub async fn puzzle_reference(
    State(state): State<AppState>,
    UrlPath((token, puzzle, n)): UrlPath<(String, i64, usize)>,
) -> Result<Response, ApiError> {
    let (bytes, mime) = studies(&state)?.observer_file(&token, puzzle, Some(n)).await?;
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}
