//! This server's share of the jobs: it claims pending work items (`store::work`) as it has room
//! for them (`jobs.concurrency` in flight), from whichever job is oldest, alongside any other
//! server that shares the database. Each finished attack is stored before it is reported — its
//! PNG synced to a temporary, renamed into place while the completing transaction holds the
//! write lock, then its row commits; the report is written and synced before its item marks the
//! job done. An item the engine could not take because it is stopping is given back, for the
//! next server (or the next process) to claim. Before a server starts on a job, the job's files
//! are checked again against `jobs.allowed_dirs`: a link leading out that appeared since the job
//! was created fails it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::store::{Claimed, Kind, blocking};
use super::{FinishedAttack, JobError, JobSpec, Jobs, StoreError, StoredResult};
use crate::attack::Method;
use crate::dataset::Sample;
use crate::engine::AttackRequest;
use crate::eval::{self, EvalOutput, MethodRun, Record};
use crate::model::{ModelInfo, ModelState};
use crate::service::AttackService;

pub async fn run(jobs: Jobs) {
    // Jobs resumed at start-up wait for the models; a start-up that fails ends the process.
    while !jobs.inner.engine.is_ready() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    give_legacy_items(&jobs).await;
    // Jobs verify against no other model: the service needs no remote targets.
    let service = AttackService::new(
        jobs.inner.engine.clone(),
        Arc::new(crate::remote::Remotes::none()),
        crate::engine::OFFLINE_DEADLINE,
    );
    let poll = jobs.poll_period();
    let mut tasks = JoinSet::new();
    let mut contexts: HashMap<String, Arc<JobContext>> = HashMap::new();
    loop {
        let free = jobs.config().concurrency.max(1).saturating_sub(tasks.len());
        // A server that is stopping takes no more work.
        if free > 0 && jobs.inner.engine.is_ready() {
            match claim(&jobs, free).await {
                Ok(items) => {
                    for it in items {
                        let ctx = match context(&jobs, &mut contexts, &it).await {
                            Ok(ctx) => ctx,
                            Err(e) => {
                                end_with(&jobs, &it.job, e).await;
                                continue;
                            }
                        };
                        let token = CancellationToken::new();
                        let held = super::Held { job: it.job.clone(), lease: it.token, stop: token.clone() };
                        jobs.held().insert(it.id, held);
                        let span = tracing::info_span!("job", id = %it.job, item = it.id, attempt = it.attempts);
                        tasks.spawn(work(jobs.clone(), ctx, service.clone(), it, token).instrument(span));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "jobs: cannot claim work; trying again"),
            }
        }
        if tasks.is_empty() || contexts.len() > 16 {
            // Nothing in flight (or many jobs seen): contexts are rebuilt when next needed.
            contexts.retain(|_, ctx| Arc::strong_count(ctx) > 1);
        }
        tokio::select! {
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = jobs.inner.wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Claims up to `n` items for this server, of the models it has ready.
async fn claim(jobs: &Jobs, n: usize) -> Result<Vec<Claimed>, StoreError> {
    let models: Vec<String> = jobs
        .inner
        .engine
        .models()
        .into_iter()
        // What `Engine::model` would serve: ready, with its description.
        .filter(|m| matches!(m.state, ModelState::Ready) && m.info.is_some())
        .map(|m| m.name)
        .collect();
    jobs.store().claim(&jobs.instance().id, models, n, jobs.lease_ms()).await
}

/// What a server needs to work on a job's items: its spec, and per model the model and the
/// job's images (listed and checked once per job and server).
struct JobContext {
    spec: JobSpec,
    folder: PathBuf,
    models: std::sync::Mutex<HashMap<String, Arc<ModelImages>>>,
}

/// A model and a job's images keyed by their path within the job's folder.
type ModelImages = (Arc<ModelInfo>, HashMap<String, Sample>);

async fn context(
    jobs: &Jobs,
    contexts: &mut HashMap<String, Arc<JobContext>>,
    it: &Claimed,
) -> Result<Arc<JobContext>, JobError> {
    if let Some(ctx) = contexts.get(&it.job) {
        return Ok(ctx.clone());
    }
    let job = jobs.get(&it.job).await?;
    tracing::info!(job = %it.job, images = %job.spec.images, methods = ?job.spec.methods, models = ?job.spec.models, "working on a job");
    let ctx = Arc::new(JobContext {
        folder: PathBuf::from(&job.spec.images),
        spec: job.spec,
        models: std::sync::Mutex::default(),
    });
    contexts.insert(it.job.clone(), ctx.clone());
    Ok(ctx)
}

impl JobContext {
    /// An attack item's method, model and image.
    fn item(&self, jobs: &Jobs, it: &Claimed) -> Result<(Method, Arc<ModelInfo>, Sample), JobError> {
        let method = Method::parse(&it.method).ok_or_else(|| JobError::invalid("methods", it.method.clone()))?;
        let (info, sample) = self.sample(jobs, &it.job, &it.model, &it.file)?;
        Ok((method, info, sample))
    }

    /// The model and the image an attack item names (an image gone since the job was made is
    /// attacked all the same: its record says it cannot be read).
    fn sample(&self, jobs: &Jobs, job: &str, model: &str, file: &str) -> Result<(Arc<ModelInfo>, Sample), JobError> {
        let known = {
            let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
            match models.get(model) {
                Some(m) => m.clone(),
                None => {
                    let (info, samples) = jobs.samples(job, &self.spec, model)?;
                    let by_key = samples.into_iter().map(|s| (key(&self.folder, &s.path), s)).collect();
                    let m = Arc::new((info, by_key));
                    models.insert(model.to_string(), m.clone());
                    m
                }
            }
        };
        let sample = known.1.get(file).cloned().unwrap_or_else(|| Sample {
            path: self.folder.join(file),
            label: None,
            class_key: None,
        });
        Ok((known.0.clone(), sample))
    }
}

/// One claimed item, to its end: done and stored, given back, or its job failed.
async fn work(jobs: Jobs, ctx: Arc<JobContext>, service: AttackService, it: Claimed, token: CancellationToken) {
    // Off the held list however the task ends (a panic too), unless a later claim replaced it.
    let held = Unhold { jobs: jobs.clone(), id: it.id, lease: it.token };
    let outcome = if it.attempts > i64::from(jobs.config().max_attempts) {
        give_up(&jobs, &ctx, &it).await
    } else {
        match it.kind {
            Kind::Attack => attack(&jobs, &ctx, &service, &it, &token).await,
            Kind::Report => report(&jobs, &it).await,
        }
    };
    drop(held);
    match outcome {
        Ok(Some(last)) if jobs.followed(&it.job) => {
            if let Ok(job) = jobs.get(&it.job).await {
                jobs.publish(&job, Some(last));
            }
        }
        Ok(_) => {}
        Err(e) => end_with(&jobs, &it.job, e).await,
    }
}

/// Takes an item off this server's held list when its task ends.
struct Unhold {
    jobs: Jobs,
    id: i64,
    lease: i64,
}

impl Drop for Unhold {
    fn drop(&mut self) {
        let mut held = self.jobs.held();
        if held.get(&self.id).is_some_and(|h| h.lease == self.lease) {
            held.remove(&self.id);
        }
    }
}

/// A job that cannot go on fails (on every server); one purged meanwhile is let go, and an
/// item whose result could not be stored for want of the database is left to its lease (it
/// runs out, and a server claims the item again).
async fn end_with(jobs: &Jobs, job: &str, e: JobError) {
    match e {
        JobError::NotFound(_) => tracing::debug!(job, "job deleted while it ran"),
        JobError::Store(StoreError::Unavailable(e)) => {
            tracing::warn!(job, error = %e, "the database is unreachable: the item is left to its lease")
        }
        e => jobs.fail(job, &e.to_string()).await,
    }
}

/// Attacks the item's image and stores the result; `Ok(None)`: given back or lost, nothing
/// stored by this server.
async fn attack(
    jobs: &Jobs,
    ctx: &JobContext,
    service: &AttackService,
    it: &Claimed,
    token: &CancellationToken,
) -> Result<Option<FinishedAttack>, JobError> {
    let (method, info, sample) = ctx.item(jobs, it)?;
    let req = AttackRequest { method: Some(method.name().into()), max_iter: ctx.spec.max_iter, ..Default::default() };
    let attacked = tokio::select! {
        a = eval::attack_one(service, &info, Some(&it.model), &sample, req, method, false, &[]) => a,
        () = token.cancelled() => {
            give_back(jobs, it).await;
            return Ok(None);
        }
    };
    if attacked.transient {
        tracing::info!("the server is stopping: the item is given back, to be resumed");
        give_back(jobs, it).await;
        return Ok(None);
    }
    store_one(jobs, it, method.name(), attacked).await
}

/// An item claimed past `jobs.max_attempts`, each earlier claim having ended without an answer
/// (its server died, ran out of memory or hung on it), is not tried again: an attack stores an
/// error record in its image's place and the job goes on; a report fails its job.
async fn give_up(jobs: &Jobs, ctx: &JobContext, it: &Claimed) -> Result<Option<FinishedAttack>, JobError> {
    let why = format!(
        "not tried again: its {} earlier attempts ended without an answer (the server died, ran out of \
         memory or hung on it; jobs.max_attempts = {})",
        it.attempts - 1,
        jobs.config().max_attempts
    );
    tracing::warn!(kind = ?it.kind, file = %it.file, method = %it.method, "{why}");
    match it.kind {
        Kind::Attack => {
            let (method, info, sample) = ctx.item(jobs, it)?;
            let record = Record::of(&info, &sample, method, Some(why), None);
            store_one(jobs, it, method.name(), eval::Attacked { record, png: None, transient: false }).await
        }
        Kind::Report => {
            jobs.fail(&it.job, &format!("the report was {why}")).await;
            Ok(None)
        }
    }
}

/// The item goes back to pending (only while this server still holds it).
async fn give_back(jobs: &Jobs, it: &Claimed) {
    if let Err(e) = jobs.store().release(it, &jobs.instance().id).await {
        tracing::warn!(error = %e, "cannot give an item back; its lease will run out");
    }
}

/// The image's key within its job: its path relative to the job's folder.
pub(super) fn key(folder: &Path, path: &Path) -> String {
    path.strip_prefix(folder).unwrap_or(path).to_string_lossy().into_owned()
}

/// The PNG to a synced temporary first; then, in the completing transaction, renamed into place
/// (its folder synced) and the result row written. A lost lease writes nothing and removes the
/// temporary (`Ok(None)`).
async fn store_one(
    jobs: &Jobs,
    it: &Claimed,
    method: &str,
    attacked: eval::Attacked,
) -> Result<Option<FinishedAttack>, JobError> {
    let record = &attacked.record;
    let success = record.result.as_ref().map(|r| r.success);
    let (part, png) = match attacked.png {
        Some(bytes) => {
            let rel = Path::new("images").join(&it.model).join(method).join(Path::new(&it.file).with_extension("png"));
            let path = jobs.job_dir(&it.job).join(&rel);
            let part = blocking(move || super::disk::Part::write(&path, &bytes).map_err(StoreError::Io)).await?;
            (Some(part), Some(rel.to_string_lossy().into_owned()))
        }
        None => (None, None),
    };
    let row = StoredResult {
        model: it.model.clone(),
        method: method.into(),
        file: it.file.clone(),
        record: serde_json::to_string(record).unwrap_or_default(),
        png,
        success,
    };
    let stored =
        jobs.store().complete(it, &jobs.instance().id, Some(row), move || part.map_or(Ok(()), |p| p.place())).await?;
    if stored.is_err() {
        tracing::debug!("the item's lease was lost: another server does it, or its job ended");
        // Still ours when its job ended: let it go now rather than when the lease runs out.
        give_back(jobs, it).await;
        return Ok(None);
    }
    Ok(Some(FinishedAttack {
        model: it.model.clone(),
        method: method.into(),
        file: it.file.clone(),
        success,
        error: record.error.clone(),
    }))
}

/// The job's report, then the job marked done (under the report item's lease).
async fn report(jobs: &Jobs, it: &Claimed) -> Result<Option<FinishedAttack>, JobError> {
    write_reports(jobs, &it.job).await?;
    let done = jobs.store().complete(it, &jobs.instance().id, None, || Ok(())).await?;
    if done.is_err() {
        give_back(jobs, it).await;
    } else {
        let job = jobs.get(&it.job).await?;
        tracing::info!(job = %it.job, state = job.state.as_str(), done = job.done, "job ended");
        jobs.publish(&job, None);
    }
    Ok(None)
}

/// Jobs made before work items get theirs (their stored results count as done).
async fn give_legacy_items(jobs: &Jobs) {
    let ids = match jobs.store().jobs_without_items().await {
        Ok(ids) => ids,
        Err(e) => return tracing::error!(error = %e, "cannot list jobs made before work items"),
    };
    for id in ids {
        let planned = async {
            let job = jobs.get(&id).await?;
            let items = jobs.plan(&id, &job.spec)?;
            jobs.store().add_legacy_items(&id, items).await?;
            Ok::<_, JobError>(())
        };
        if let Err(e) = planned.await {
            end_with(jobs, &id, e).await;
        }
    }
}

/// One report per model under `report/<model>/`, from the stored records (so a resumed job's
/// report covers every image, whichever process attacked it).
async fn write_reports(jobs: &Jobs, id: &str) -> Result<(), JobError> {
    let job = jobs.get(id).await?;
    let results = jobs.results(id).await?;
    let dir = jobs.job_dir(id).join("report");
    let root = jobs.root_dir().to_path_buf();
    let command = format!("POST /jobs {}", serde_json::to_string(&job.spec).unwrap_or_default());
    blocking(move || -> Result<(), JobError> {
        for model in &job.spec.models {
            let mut records = Vec::new();
            let mut runs: Vec<MethodRun> = Vec::new();
            for r in results.iter().filter(|r| &r.model == model) {
                let record: Record = serde_json::from_str(&r.record)
                    .map_err(|e| StoreError::Corrupt(job.id.clone(), format!("result {}: {e}", r.file)))?;
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
            std::fs::create_dir_all(&d).map_err(StoreError::Io)?;
            let summary = eval::report::summarise(model, Path::new(&job.spec.images), &out);
            let md = eval::report::markdown(&d, &summary, &out, &command);
            eval::report::write(&d, &summary, &md).map_err(StoreError::Io)?;
        }
        // On disk before the job is marked done (a torn report is rewritten on resume).
        if dir.is_dir() {
            super::disk::sync_tree(&dir).map_err(StoreError::Io)?;
            super::disk::sync_up(dir.parent().unwrap_or(&dir), &root).map_err(StoreError::Io)?;
        }
        Ok(())
    })
    .await
}
