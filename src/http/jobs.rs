//! `/jobs`: durable background evals — create, list, follow (Server-Sent Events), cancel, and
//! download what they produced (per-image records, delivered PNGs, the report and its charts,
//! the report as one HTML page). Downloads are named for what they are (`job-<id>-…`).

use std::convert::Infallible;
use std::path::{Component, Path};

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use axum::extract::FromRequest;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::input::Params;
use crate::jobs::{JobEvent, JobInfo, JobSpec, Jobs};

fn jobs(state: &AppState) -> Result<&Jobs, ApiError> {
    state
        .jobs
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "jobs_unavailable", "jobs are off"))
}

/// Queues an eval for the chosen methods and models: of a folder the server can read (JSON,
/// under `jobs.allowed_dirs`), or of an uploaded zip of images (multipart: `archive`, and
/// optionally `spec` with methods/models/limit/max_iter as JSON), unpacked into the job's own
/// folder within `jobs.max_archive_bytes`, `max_archive_files` and `max_unpacked_bytes`. Jobs
/// run in the order they were created, on every server sharing the jobs database. Both are refused (507) when the jobs'
/// folder would pass `jobs.max_total_bytes`; a JSON body is at most `limits.max_small_body_bytes`.
#[utoipa::path(post, path = "/jobs", tag = "jobs",
    request_body(content((JobSpec = "application/json"), (ArchiveUpload = "multipart/form-data"))),
    responses((status = 201, body = JobInfo), (status = 403, body = ErrorBody, description = "folder not allowed"),
        (status = 404, body = ErrorBody), (status = 408, body = ErrorBody, description = "the upload was too slow"),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 507, body = ErrorBody, description = "over the jobs' disk quota (`quota_exceeded`)")))]
pub async fn create_job(State(state): State<AppState>, req: axum::extract::Request) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?;
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let multipart = content_type.starts_with("multipart/form-data");
    let job = if multipart {
        // What the request says it brings must fit before a byte is read.
        let declared = super::limits::declared_length(req.headers()).unwrap_or(0);
        let room = jobs.room_for(declared).await?;
        let mp = axum::extract::Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::bad_request("bad_body", e.body_text()))?;
        let timeout = std::time::Duration::from_millis(state.config.server.body_read_timeout_ms);
        let ArchiveUpload { spec, archive } =
            tokio::time::timeout(timeout, receive_archive(mp, jobs, room)).await.map_err(|_| {
                ApiError::timeout(format!(
                    "the archive did not arrive within {} ms (server.body_read_timeout_ms)",
                    timeout.as_millis()
                ))
            })??;
        jobs.create_from_archive(spec.unwrap_or_default(), archive.keep()).await?
    } else {
        let spec = read_spec(req).await?;
        jobs.create(spec).await?
    };
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/jobs/{}", job.id))], Json(job)).into_response())
}

/// The JSON form of `POST /jobs`. Its size is bounded before it gets here: the route gate
/// buffers any body but an archive upload within `limits.max_small_body_bytes`.
async fn read_spec(req: axum::extract::Request) -> Result<JobSpec, ApiError> {
    let Json(spec) = Json::<JobSpec>::from_request(req, &()).await?;
    Ok(spec)
}

/// The multipart form of `POST /jobs` with an archive, as received.
#[derive(ToSchema)]
pub struct ArchiveUpload {
    /// A zip of images (flat `<wnid>_*.JPEG` files or an ImageFolder tree).
    #[schema(format = Binary, value_type = String)]
    archive: PartFile,
    /// `{"methods": […], "models": […], "limit": N, "max_iter": N}` (all optional).
    #[schema(value_type = Option<String>)]
    spec: Option<crate::jobs::ArchiveSpec>,
}

/// An upload being written: removed unless kept.
struct PartFile(Option<std::path::PathBuf>);

impl PartFile {
    fn keep(mut self) -> std::path::PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Streams the `archive` field to a file under the jobs' folder (never more than
/// `jobs.max_archive_bytes`, nor than `room`, what `jobs.max_total_bytes` leaves) and parses the
/// `spec` field.
async fn receive_archive(mut mp: axum::extract::Multipart, jobs: &Jobs, room: u64) -> Result<ArchiveUpload, ApiError> {
    use tokio::io::AsyncWriteExt;
    let max = jobs.config().max_archive_bytes;
    let (mut spec, mut archive) = (None, None);
    let bad = |e: axum::extract::multipart::MultipartError| ApiError::bad_request("bad_body", e.body_text());
    while let Some(mut field) = mp.next_field().await.map_err(bad)? {
        match field.name() {
            Some("spec") => {
                let text = field.text().await.map_err(bad)?;
                spec = Some(
                    serde_json::from_str::<crate::jobs::ArchiveSpec>(&text)
                        .map_err(|e| ApiError::invalid("spec", e.to_string()))?,
                );
            }
            Some("archive") if archive.is_none() => {
                let dir = jobs.uploads_dir();
                tokio::fs::create_dir_all(&dir).await.map_err(|e| ApiError::internal(e.to_string()))?;
                let path = dir.join(format!("{}.zip", crate::jobs::new_id()));
                let part = PartFile(Some(path.clone()));
                let mut file = tokio::fs::File::create(&path).await.map_err(|e| ApiError::internal(e.to_string()))?;
                let mut written = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(bad)? {
                    written += chunk.len() as u64;
                    if written > max {
                        return Err(ApiError::too_large(format!(
                            "the archive is over {max} bytes (jobs.max_archive_bytes)"
                        )));
                    }
                    if written > room {
                        return Err(crate::jobs::JobError::QuotaExceeded(format!(
                            "the archive is over the {room} bytes the jobs' folder has left (jobs.max_total_bytes)"
                        ))
                        .into());
                    }
                    file.write_all(&chunk).await.map_err(|e| ApiError::internal(e.to_string()))?;
                }
                file.flush().await.map_err(|e| ApiError::internal(e.to_string()))?;
                archive = Some(part);
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    "form",
                    format!("unexpected field {other:?}: send `archive` (a zip) and optionally `spec` (JSON)"),
                ));
            }
            None => return Err(ApiError::invalid("form", "a field without a name")),
        }
    }
    let archive = archive.ok_or_else(|| ApiError::invalid("archive", "no `archive` field (a zip of images)"))?;
    Ok(ArchiveUpload { archive, spec })
}

/// Every job, newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs", responses((status = 200, body = Vec<JobInfo>)))]
pub async fn list_jobs(State(state): State<AppState>) -> Result<Json<Vec<JobInfo>>, ApiError> {
    Ok(Json(jobs(&state)?.list().await?))
}

#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = JobInfo), (status = 404, body = ErrorBody)))]
pub async fn get_job(State(state): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Json<JobInfo>, ApiError> {
    Ok(Json(jobs(&state)?.get(&id).await?))
}

/// `DELETE /jobs/{id}`'s query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Also delete the job for good — its row, results and folder (it is cancelled first if it
    /// runs). Refused (409) while a study uses the job.
    #[serde(default)]
    pub purge: bool,
}

/// Cancels a queued or running job: it stops scheduling at once; finished images stay. With
/// `?purge=true` the job (finished or not) is deleted with everything it made: 204.
#[utoipa::path(delete, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path), DeleteQuery),
    responses((status = 200, body = JobInfo, description = "cancelled"),
        (status = 204, description = "purged (`?purge=true`)"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "already finished; or, purging, a study uses the job"),
        (status = 422, body = ErrorBody)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Params(query): Params<DeleteQuery>,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?;
    if query.purge {
        jobs.purge(&id).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(Json(jobs.cancel(&id).await?).into_response())
}

/// Progress as Server-Sent Events (`event: progress`, data: a [`JobEvent`]): the job's state
/// now, then one event per finished image and per change of state; the stream ends after the
/// event of a finished job (done, failed, cancelled, interrupted).
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", body = JobEvent), (status = 404, body = ErrorBody)))]
pub async fn job_events(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let jobs = jobs(&state)?.clone();
    // Subscribe first, then read the state: no event falls between the two.
    let rx = jobs.subscribe(&id);
    let job = jobs.get(&id).await?;
    let first = JobEvent::of(&job, None);
    let finished = job.state.is_terminal();
    let stream = futures::stream::unfold((Some(first), rx, finished), |(first, mut rx, ended)| async move {
        if let Some(ev) = first {
            return Some((sse(&ev), (None, rx, ended)));
        }
        if ended {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let end = ev.state.is_terminal();
                    return Some((sse(&ev), (None, rx, end)));
                }
                // A slow reader missed events: the next one carries the current counts anyway.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn sse(ev: &JobEvent) -> Result<Event, Infallible> {
    Ok(Event::default().event("progress").data(serde_json::to_string(ev).unwrap_or_default()))
}

/// One line of `/jobs/{id}/results`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobResultLine {
    pub model: String,
    pub method: String,
    /// The image's path within the job's folder.
    pub file: String,
    /// The delivered PNG, under `/jobs/{id}/files/…`.
    pub png: Option<String>,
    /// As `labelfool eval` writes it to `results.jsonl`.
    #[schema(value_type = Object)]
    pub record: serde_json::Value,
}

/// Every finished image (JSON lines, one per image and method and model), as stored; a
/// download named `job-<id>-results.jsonl`.
#[utoipa::path(get, path = "/jobs/{id}/results", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, content_type = "application/x-ndjson", body = JobResultLine), (status = 404, body = ErrorBody)))]
pub async fn job_results(State(state): State<AppState>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let rows = jobs(&state)?.results(&id).await?;
    let mut body = String::new();
    for r in rows {
        let line = JobResultLine {
            png: r.png.map(|p| format!("/jobs/{id}/files/{p}")),
            model: r.model,
            method: r.method,
            file: r.file,
            record: serde_json::from_str(&r.record).unwrap_or(serde_json::Value::Null),
        };
        body.push_str(&serde_json::to_string(&line).unwrap_or_default());
        body.push('\n');
    }
    let disposition = format!("attachment; filename=\"job-{}-results.jsonl\"", file_safe(&id));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson".to_string()), (header::CONTENT_DISPOSITION, disposition)], body)
        .into_response())
}

/// A job's report on one of its models as one HTML page: `report.md` rendered, its charts
/// inside it (`data:` URIs), so it opens whole in a browser tab or saved, without another
/// request; named `job-<id>-report-<model>.html`. 404 until the job is done. The Markdown,
/// `summary.json` and the charts themselves are under `/jobs/{id}/files/report/<model>/`.
#[utoipa::path(get, path = "/jobs/{id}/report/{model}", tag = "jobs",
    params(("id" = String, Path), ("model" = String, Path, description = "one of the job's models")),
    responses((status = 200, content_type = "text/html", description = "the report"), (status = 404, body = ErrorBody)))]
pub async fn job_report(
    State(state): State<AppState>,
    UrlPath((id, model)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?;
    jobs.get(&id).await?;
    let not_found =
        || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("job {id} has no report on {model:?}"));
    if !plain(Path::new(&model)) || model.contains('/') {
        return Err(not_found());
    }
    let dir = jobs.job_dir(&id).join("report").join(&model);
    let md = tokio::fs::read_to_string(dir.join("report.md")).await.map_err(|_| not_found())?;
    let title = format!("LabelFool job {id}: report on {model}");
    let page = tokio::task::spawn_blocking(move || {
        super::report::html(&title, &md, |rel| {
            let rel = Path::new(rel);
            let png = rel.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
            (png && plain(rel)).then(|| std::fs::read(dir.join(rel)).ok()).flatten()
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let disposition = format!("inline; filename=\"job-{}-report-{}.html\"", file_safe(&id), file_safe(&model));
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (header::CONTENT_SECURITY_POLICY, super::report::content_security_policy()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        page,
    )
        .into_response())
}

/// A relative path of plain names only: no `..`, no root, not empty.
fn plain(rel: &Path) -> bool {
    !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)))
}

/// `name` as it may stand in a download's file name: letters, digits, `.`, `-` and `_`.
fn file_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' }).collect()
}

/// A file the job produced: `images/<model>/<method>/<file>.png`, `report/<model>/report.md`,
/// `report/<model>/summary.json` and the report's charts, or an unpacked upload under `input/`.
/// Served with `nosniff`; only PNG, JSON, Markdown and CSV get their types — anything else (an
/// uploaded SVG or HTML) is a download, so no file a client uploaded runs in a browser.
#[utoipa::path(get, path = "/jobs/{id}/files/{path}", tag = "jobs",
    params(("id" = String, Path), ("path" = String, Path, description = "path within the job's folder")),
    responses((status = 200, description = "the file"), (status = 404, body = ErrorBody)))]
pub async fn job_file(
    State(state): State<AppState>,
    UrlPath((id, path)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?;
    jobs.get(&id).await?;
    let rel = Path::new(&path);
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("job {id} has no file {path:?}"));
    // Plain names only: no `..`, no absolute path, no way out of the job's folder.
    if !plain(rel) {
        return Err(not_found());
    }
    let full = jobs.job_dir(&id).join(rel);
    let bytes = tokio::fs::read(&full).await.map_err(|_| not_found())?;
    let (mime, download) = served_as(&full);
    let mut res = ([(header::CONTENT_TYPE, mime), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], bytes).into_response();
    if download {
        res.headers_mut().insert(header::CONTENT_DISPOSITION, header::HeaderValue::from_static("attachment"));
    }
    Ok(res)
}

/// The type a job's file is served with, and whether it is a download: only the passive types
/// the job writes itself are named; anything else could be active content a client uploaded.
fn served_as(path: &Path) -> (&'static str, bool) {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => ("image/png", false),
        Some("json") => ("application/json", false),
        Some("md") => ("text/markdown; charset=utf-8", false),
        Some("csv") => ("text/csv; charset=utf-8", false),
        _ => ("application/octet-stream", true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_passive_types_are_named_and_the_rest_is_a_download() {
        assert_eq!(served_as(Path::new("images/m/fgsm/a.PNG")), ("image/png", false));
        assert_eq!(served_as(Path::new("report/m/summary.json")).0, "application/json");
        for active in ["input/evil.svg", "input/page.html", "input/x.htm", "input/a.js", "input/noext", "input/x.xml"] {
            assert_eq!(served_as(Path::new(active)), ("application/octet-stream", true), "{active}");
        }
    }
}
