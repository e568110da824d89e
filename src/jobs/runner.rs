//! Runs queued jobs one at a time. Each finished attack is stored before the next is reported —
//! its PNG synced to disk before its row commits (`disk::write_durably`), the report synced
//! before the job is marked done; an attack the engine could not take because it is shutting
//! down leaves the job `running` in the store, so the next process resumes it exactly where it
//! stopped. Before each pass the job's files are checked again against `jobs.allowed_dirs`: a
//! link leading out that appeared since the job was created fails it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{FinishedAttack, JobError, JobState, Jobs, Store, StoredResult};
use crate::attack::Method;
use crate::engine::AttackRequest;
use crate::eval::{self, EvalOutput, MethodRun, Record};

pub async fn run(jobs: Jobs, mut queue: mpsc::UnboundedReceiver<String>) {
    // Jobs resumed at start-up wait for the models; a start-up that fails ends the process.
    while !jobs.inner.engine.is_ready() {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    while let Some(id) = queue.recv().await {
        let span = tracing::info_span!("job", id = %id);
        match run_job(&jobs, &id).instrument(span).await {
            Ok(()) => {}
            // Purged before its turn came.
            Err(JobError::NotFound(_)) => tracing::debug!(job = %id, "job deleted before it ran"),
            Err(e) => {
                tracing::error!(job = %id, error = %e, "job failed");
                let (i, msg) = (id.clone(), e.to_string());
                let _ = jobs.store().with(move |c| Store::set_state(c, &i, JobState::Failed, Some(&msg))).await;
                if let Ok(job) = jobs.get(&id).await {
                    jobs.publish(&job, None);
                }
            }
        }
        jobs.inner.cancel.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
}

/// How a job's loop ended.
enum Ending {
    Finished,
    Cancelled,
    /// The engine is shutting down: the job stays `running` for the next process.
    Stopping,
}

async fn run_job(jobs: &Jobs, id: &str) -> Result<(), JobError> {
    let job = jobs.get(id).await?;
    if job.state != JobState::Queued {
        return Ok(());
    }
    let token = CancellationToken::new();
    jobs.inner.cancel.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), token.clone());
    let i = id.to_string();
    jobs.store().with(move |c| Store::set_state(c, &i, JobState::Running, None)).await?;
    // Progress is counted here from now on: one look-up per finished image would re-count
    // every stored result each time.
    let mut progress = jobs.get(id).await?;
    jobs.publish(&progress, None);
    tracing::info!(images = %job.spec.images, methods = ?job.spec.methods, models = ?job.spec.models, "job started");
    let i = id.to_string();
    let done: HashSet<(String, String, String)> =
        jobs.store().with(move |c| Store::result_keys(c, &i)).await?.into_iter().collect();
    let folder = PathBuf::from(&job.spec.images);
    let engine = &jobs.inner.engine;
    // Jobs verify against no other model: the service needs no remote targets.
    let service = crate::service::AttackService::new(
        engine.clone(),
        std::sync::Arc::new(crate::remote::Remotes::none()),
        crate::engine::OFFLINE_DEADLINE,
    );
    let mut ending = Ending::Finished;
    'models: for model in &job.spec.models {
        let (_, info) = engine.model(Some(model))?;
        let mut samples = crate::dataset::discover(&folder, info.classes())
            .map_err(|e| JobError::invalid("images", e.to_string()))?;
        if let Some(n) = job.spec.limit {
            samples.truncate(n);
        }
        jobs.check_samples(id, &samples)?;
        for name in &job.spec.methods {
            let method = Method::parse(name).ok_or_else(|| JobError::invalid("methods", name.clone()))?;
            let req =
                AttackRequest { method: Some(method.name().into()), max_iter: job.spec.max_iter, ..Default::default() };
            let todo: Vec<_> = samples
                .iter()
                .filter(|s| !done.contains(&(model.clone(), method.name().to_string(), key(&folder, &s.path))))
                .cloned()
                .collect();
            let info = info.clone();
            let attacks = futures::stream::iter(todo).map(|sample| {
                let (info, req, service) = (info.clone(), req.clone(), &service);
                async move {
                    let a = eval::attack_one(service, &info, Some(model), &sample, req, method, false, &[]).await;
                    (sample, a)
                }
            });
            let mut stream = std::pin::pin!(
                attacks.buffer_unordered(jobs.inner.config.concurrency.max(1)).take_until(token.cancelled())
            );
            while let Some((sample, attacked)) = stream.next().await {
                if attacked.transient {
                    ending = Ending::Stopping;
                    break 'models;
                }
                let file = key(&folder, &sample.path);
                let last = store_one(jobs, id, model, method.name(), &file, attacked).await?;
                progress.done += 1;
                progress.successes += u64::from(last.success == Some(true));
                jobs.publish(&progress, Some(last));
            }
            if token.is_cancelled() {
                ending = Ending::Cancelled;
                break 'models;
            }
        }
    }
    let i = id.to_string();
    match ending {
        Ending::Stopping => {
            tracing::info!("the server is stopping: the job is left running, to be resumed");
            return Ok(());
        }
        Ending::Cancelled => {
            jobs.store().with(move |c| Store::set_state(c, &i, JobState::Cancelled, None)).await?;
        }
        Ending::Finished => {
            write_reports(jobs, id).await?;
            jobs.store().with(move |c| Store::set_state(c, &i, JobState::Done, None)).await?;
        }
    }
    let job = jobs.get(id).await?;
    tracing::info!(state = job.state.as_str(), done = job.done, "job ended");
    jobs.publish(&job, None);
    Ok(())
}

/// The image's key within its job: its path relative to the job's folder.
fn key(folder: &Path, path: &Path) -> String {
    path.strip_prefix(folder).unwrap_or(path).to_string_lossy().into_owned()
}

/// The PNG first (durably: a synced temporary renamed into place, its folder synced), then
/// the result row.
async fn store_one(
    jobs: &Jobs,
    id: &str,
    model: &str,
    method: &str,
    file: &str,
    attacked: eval::Attacked,
) -> Result<FinishedAttack, JobError> {
    let record = &attacked.record;
    let success = record.result.as_ref().map(|r| r.success);
    let png = match &attacked.png {
        Some(bytes) => {
            let rel = Path::new("images").join(model).join(method).join(Path::new(file).with_extension("png"));
            let path = jobs.job_dir(id).join(&rel);
            let bytes = bytes.clone();
            tokio::task::spawn_blocking(move || super::disk::write_durably(&path, &bytes))
                .await
                .map_err(|e| super::StoreError::Io(std::io::Error::other(e.to_string())))?
                .map_err(super::StoreError::Io)?;
            Some(rel.to_string_lossy().into_owned())
        }
        None => None,
    };
    let row = StoredResult {
        model: model.into(),
        method: method.into(),
        file: file.into(),
        record: serde_json::to_string(record).unwrap_or_default(),
        png,
        success,
    };
    let job = id.to_string();
    jobs.store().with(move |c| Store::insert_result(c, &job, &row)).await?;
    Ok(FinishedAttack {
        model: model.into(),
        method: method.into(),
        file: file.into(),
        success,
        error: record.error.clone(),
    })
}

/// One report per model under `report/<model>/`, from the stored records (so a resumed job's
/// report covers every image, whichever process attacked it).
async fn write_reports(jobs: &Jobs, id: &str) -> Result<(), JobError> {
    let job = jobs.get(id).await?;
    let results = jobs.results(id).await?;
    let dir = jobs.job_dir(id).join("report");
    let root = jobs.root_dir().to_path_buf();
    let command = format!("POST /jobs {}", serde_json::to_string(&job.spec).unwrap_or_default());
    tokio::task::spawn_blocking(move || -> Result<(), JobError> {
        for model in &job.spec.models {
            let mut records = Vec::new();
            let mut runs: Vec<MethodRun> = Vec::new();
            for r in results.iter().filter(|r| &r.model == model) {
                let record: Record = serde_json::from_str(&r.record)
                    .map_err(|e| super::StoreError::Corrupt(job.id.clone(), format!("result {}: {e}", r.file)))?;
                // Seconds per image: the mean of the images' own wall times.
                let wall = record.result.as_ref().map_or(0.0, |f| f.wall_ms / 1e3);
                match runs.iter_mut().find(|m| m.method == r.method) {
                    Some(m) => {
                        m.wall_seconds += wall;
                        m.completed += 1;
                    }
                    None => runs.push(MethodRun {
                        method: r.method.clone(),
                        wall_seconds: wall,
                        completed: 1,
                        interrupted: false,
                    }),
                }
                records.push(record);
            }
            let out = EvalOutput { records, runs, interrupted: false };
            let d = dir.join(model);
            std::fs::create_dir_all(&d).map_err(super::StoreError::Io)?;
            let summary = eval::report::summarise(model, Path::new(&job.spec.images), &out);
            let md = eval::report::markdown(&d, &summary, &out, &command);
            eval::report::write(&d, &summary, &md).map_err(super::StoreError::Io)?;
        }
        // On disk before the job is marked done (a torn report is rewritten on resume).
        if dir.is_dir() {
            super::disk::sync_tree(&dir).map_err(super::StoreError::Io)?;
            super::disk::sync_up(dir.parent().unwrap_or(&dir), &root).map_err(super::StoreError::Io)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| super::StoreError::Io(std::io::Error::other(e.to_string())))?
}
