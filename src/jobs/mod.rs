//! Jobs: work longer than a request — an `eval` of a folder for chosen methods and models — run
//! in the background as work items (one per image × method × model, then the report) that
//! every server sharing the database claims with a lease (`store::work`, `lease`, `runner`),
//! every finished image stored at once in SQLite (and its PNG in the job's folder), progress
//! streamed to subscribers (`/jobs/{id}/events`, `progress`). A restart resumes the jobs that
//! were running (or marks them `interrupted`, `jobs.resume = false`); no finished image is lost
//! or done twice. The jobs' folder is bounded (`jobs.max_total_bytes`),
//! swept of what a killed process left at start-up (`sweep`), and finished jobs are deleted
//! on request or after `jobs.retention_days` (`purge`).

pub mod access;
pub mod archive;
pub mod disk;
pub mod lease;
mod progress;
pub mod purge;
pub mod runner;
pub mod store;
pub mod sweep;
mod upload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::attack::Method;
use crate::config::JobsConfig;
use crate::engine::{Engine, EngineError};
pub use store::{ItemKey, Store, StoreError, StoredResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    /// The server stopped while it ran and `jobs.resume` is off.
    Interrupted,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Interrupted => "interrupted",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Queued, Self::Running, Self::Done, Self::Interrupted, Self::Failed, Self::Cancelled]
            .into_iter()
            .find(|x| x.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

/// `POST /jobs`: what to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A folder the server can read, under one of `jobs.allowed_dirs`: flat `<wnid>_*.JPEG`
    /// files or an ImageFolder tree, as for `labelfool eval`.
    #[cfg_attr(feature = "http", schema(example = "/data/red-team/batch-1"))]
    pub images: String,
    /// Attack methods (default: labelfool, deepfool, fgsm, sparsefool).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Models of this server (default: the default model).
    #[serde(default)]
    pub models: Vec<String>,
    /// Only the first N images (sorted by path).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Iteration budget of every attack (default: the server's).
    #[serde(default)]
    pub max_iter: Option<u32>,
}

/// `POST /jobs` with a zip archive (multipart field `archive`): what to run on its images
/// (multipart field `spec`, JSON; optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ArchiveSpec {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub max_iter: Option<u32>,
}

/// A job as `/jobs` shows it.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct JobInfo {
    pub id: String,
    pub state: JobState,
    pub spec: JobSpec,
    /// Attacks in the job (images × methods × models) and those finished (stored).
    pub total: u64,
    pub done: u64,
    /// Finished attacks that reached their goal.
    pub successes: u64,
    /// Unix milliseconds.
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    /// Times the job was resumed after a restart.
    pub resumed: u32,
}

/// One progress message (`/jobs/{id}/events`).
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct JobEvent {
    pub id: String,
    pub state: JobState,
    pub done: u64,
    pub total: u64,
    pub successes: u64,
    /// The attack that just finished, if this event is for one.
    pub last: Option<FinishedAttack>,
    pub error: Option<String>,
}

impl JobEvent {
    /// The job as it stands, and the attack that just finished if any.
    pub fn of(job: &JobInfo, last: Option<FinishedAttack>) -> Self {
        Self {
            id: job.id.clone(),
            state: job.state,
            done: job.done,
            total: job.total,
            successes: job.successes,
            last,
            error: job.error.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct FinishedAttack {
    pub model: String,
    pub method: String,
    pub file: String,
    pub success: Option<bool>,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no job {0:?}")]
    NotFound(String),
    #[error("invalid parameter `{param}`: {message}")]
    Invalid { param: &'static str, message: String },
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    /// The jobs' folder would hold more than `jobs.max_total_bytes`.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl JobError {
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { param, message: message.into() }
    }
}

/// The jobs service: the store, this server's part in the shared work and the jobs' live
/// progress.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    dir: PathBuf,
    config: JobsConfig,
    /// `allowed_dirs`, as written and resolved.
    roots: access::Roots,
    engine: Engine,
    /// This server among those sharing the database.
    me: lease::Instance,
    /// The items this server works on now, by item id: their job, the lease token they were
    /// claimed with and what stops them.
    held: Mutex<HashMap<i64, Held>>,
    /// Wakes the runner before its next poll (a job queued or an item freed here).
    wake: Notify,
    events: Mutex<HashMap<String, progress::Channel>>,
}

impl Jobs {
    /// Opens the store, takes this server's place among those sharing it and starts the
    /// runner. A server that starts alone (every other recorded server is dead) sweeps the
    /// folder and resumes what its predecessors left running; one that starts beside live
    /// servers frees only the dead ones' items. Finished jobs past `jobs.retention_days` are
    /// purged before it returns.
    pub async fn start(engine: Engine, config: &JobsConfig) -> anyhow::Result<Self> {
        if !(config.retention_days.is_finite() && config.retention_days >= 0.0) {
            anyhow::bail!("jobs.retention_days must be a number of days ≥ 0 (0: keep forever)");
        }
        if !(config.lease_secs.is_finite() && config.lease_secs >= 0.3) {
            anyhow::bail!("jobs.lease_secs must be a number of seconds ≥ 0.3");
        }
        if config.max_attempts == 0 {
            anyhow::bail!("jobs.max_attempts must be ≥ 1");
        }
        let dir = crate::config::expand_path(&config.dir)?;
        std::fs::create_dir_all(&dir)?;
        // Claims, completions, renewals and reads in flight at once, and one to spare.
        let store = Store::open(&config.database, config.concurrency.max(1) * 2 + 4).await?;
        let me = lease::Instance::new(store.sqlite_path(), lease_ms(config))?;
        // One server starts at a time: a sweep never meets another server's first upload.
        let gate = startup_gate(&store).await?;
        store.register(&me.record()).await?;
        let recorded = store.instances().await?;
        let others = recorded.len() - 1;
        if matches!(store, Store::Postgres(_)) {
            // A heartbeat is no proof of death at start-up: after an outage every server's is
            // stale while it still works. So a PostgreSQL server never sweeps the shared folder,
            // and leaves reaping to the lease upkeep, which waits until the others could renew.
            tracing::info!(others, "sharing the jobs database (PostgreSQL)");
            drop(gate);
            return Ok(Self::assemble(store, dir, config, engine, me).await);
        }
        let probe = me.probe();
        let dead = store::blocking(move || Ok::<_, StoreError>(probe.dead(&recorded))).await?;
        if others == dead.len() {
            let swept = sweep::sweep(&store, &dir, &dir.join(UPLOADS), config.resume).await?;
            if swept != sweep::Swept::default() {
                tracing::info!(?swept, "swept what the previous process left unfinished");
            }
            let recovered = store.recover_alone(&me.id, config.resume).await?;
            if !recovered.is_empty() {
                tracing::info!(jobs = ?recovered, "resuming jobs left queued or running by the previous process");
            }
        } else {
            let reaped = store.reap(dead, config.resume).await?;
            tracing::info!(others = others, reaped = ?reaped, "sharing the jobs database with other servers");
        }
        drop(gate);
        Ok(Self::assemble(store, dir, config, engine, me).await)
    }

    /// The service on its opened store, with its retention pass done and its runner and lease
    /// upkeep started.
    async fn assemble(store: Store, dir: PathBuf, config: &JobsConfig, engine: Engine, me: lease::Instance) -> Self {
        let jobs = Self {
            inner: Arc::new(Inner {
                store,
                dir,
                config: config.clone(),
                roots: access::Roots::new(&config.allowed_dirs),
                engine,
                me,
                held: Mutex::default(),
                wake: Notify::new(),
                events: Mutex::default(),
            }),
        };
        jobs.purge_expired().await;
        purge::spawn_retention(jobs.clone());
        lease::spawn_tick(jobs.clone());
        tokio::spawn(runner::run(jobs.clone()));
        jobs
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// This server's identity among those sharing the database.
    pub fn instance(&self) -> &lease::Instance {
        &self.inner.me
    }

    pub fn lease_ms(&self) -> i64 {
        lease_ms(&self.inner.config)
    }

    /// How often an idle runner and a progress stream look again (`jobs.poll_ms`).
    fn poll_period(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.inner.config.poll_ms.max(10))
    }

    /// The items this server works on (the lock survives a panic elsewhere: the map stays whole).
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Held>> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Work items of live jobs waiting for any server.
    pub async fn pending_items(&self) -> Result<u64, JobError> {
        Ok(self.inner.store.pending().await?)
    }

    /// Work items this server is working on now.
    pub fn held_items(&self) -> usize {
        self.held().len()
    }

    /// Wakes the runner (work was queued or freed).
    fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// The items this server works on now.
    fn held_ids(&self) -> Vec<i64> {
        self.held().keys().copied().collect()
    }

    /// Stops this server's work on the given items (their job ended).
    fn stop_items(&self, items: &[i64]) {
        let held = self.held();
        for id in items {
            if let Some(h) = held.get(id) {
                h.stop.cancel();
            }
        }
    }

    /// Stops this server's work on every item of `job`.
    fn stop_job(&self, job: &str) {
        let held = self.held();
        for h in held.values() {
            if h.job == job {
                h.stop.cancel();
            }
        }
    }

    /// The folder of every job's files (and of the studies', under `studies/`).
    pub fn root_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Where uploaded archives are streamed before they are unpacked (each removed once used).
    pub fn uploads_dir(&self) -> PathBuf {
        self.inner.dir.join(UPLOADS)
    }

    /// The job's folder (PNGs under `images/`, the report under `report/`).
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.inner.dir.join(id)
    }

    pub fn config(&self) -> &JobsConfig {
        &self.inner.config
    }

    /// A folder a client named for `param` (a study's reference set), resolved, when it lies
    /// under `jobs.allowed_dirs` as a job's folder must (403 otherwise, nothing looked at).
    pub fn readable_folder(&self, param: &'static str, raw: &str) -> Result<PathBuf, JobError> {
        self.inner.roots.folder_for(param, raw)
    }

    /// Validates the spec (its folder checked as `access` says, nothing looked at outside the
    /// allowed folders), counts its attacks and queues it; refused while the jobs' folder is
    /// over its quota.
    pub async fn create(&self, mut spec: JobSpec) -> Result<JobInfo, JobError> {
        let folder = self.inner.roots.folder(&spec.images)?;
        self.room_for(0).await?;
        spec.images = folder.to_string_lossy().into_owned();
        self.queue_new(new_id(), spec).await
    }

    /// Fills the spec's defaults, lists its attacks (refusing too many, or any file that
    /// leads outside the folders a job may read) and queues it as `id`, with one work item
    /// per attack.
    async fn queue_new(&self, id: String, mut spec: JobSpec) -> Result<JobInfo, JobError> {
        if spec.methods.is_empty() {
            spec.methods = ["labelfool", "deepfool", "fgsm", "sparsefool"].map(String::from).to_vec();
        }
        for m in &spec.methods {
            Method::parse(m).ok_or_else(|| JobError::invalid("methods", format!("unknown method {m:?}")))?;
        }
        // A method or model named twice runs once (a second pass would store its images again).
        let once = |v: &mut Vec<String>| {
            let mut seen = std::collections::HashSet::new();
            v.retain(|x| seen.insert(x.clone()));
        };
        once(&mut spec.methods);
        if spec.models.is_empty() {
            spec.models = vec![self.inner.engine.model(None)?.1.name.clone()];
        }
        once(&mut spec.models);
        let items = self.plan(&id, &spec)?;
        let total = items.len();
        if total == 0 {
            return Err(JobError::invalid("images", format!("no files in {}", spec.images)));
        }
        if total > self.inner.config.max_attacks {
            return Err(JobError::invalid(
                "images",
                format!("{total} attacks; at most {} per job (jobs.max_attacks)", self.inner.config.max_attacks),
            ));
        }
        self.inner.store.insert_job(&id, &spec, total, items).await?;
        let info = self.get(&id).await?;
        self.wake();
        Ok(info)
    }

    /// The job's attacks in the order they run: each model, each method, each image (sorted
    /// by path); every file checked as `check_samples` says.
    fn plan(&self, id: &str, spec: &JobSpec) -> Result<Vec<ItemKey>, JobError> {
        let folder = PathBuf::from(&spec.images);
        let mut items = Vec::new();
        for model in &spec.models {
            let (_, samples) = self.samples(id, spec, model)?;
            for method in &spec.methods {
                items.extend(samples.iter().map(|s| ItemKey {
                    model: model.clone(),
                    method: method.clone(),
                    file: runner::key(&folder, &s.path),
                }));
            }
        }
        Ok(items)
    }

    /// The images a job attacks with `model` (its classes name their labels), checked.
    fn samples(
        &self,
        id: &str,
        spec: &JobSpec,
        model: &str,
    ) -> Result<(Arc<crate::model::ModelInfo>, Vec<crate::dataset::Sample>), JobError> {
        let (_, info) = self.inner.engine.model(Some(model))?;
        let mut samples = crate::dataset::discover(Path::new(&spec.images), info.classes())
            .map_err(|e| JobError::invalid("images", e.to_string()))?;
        if let Some(n) = spec.limit {
            samples.truncate(n);
        }
        self.check_samples(id, &samples)?;
        Ok((info, samples))
    }

    /// Every file a job reads lies (links followed) under `jobs.allowed_dirs` or its own folder.
    fn check_samples(&self, id: &str, samples: &[crate::dataset::Sample]) -> Result<(), JobError> {
        let own = self.job_dir(id).canonicalize().ok();
        self.inner.roots.check_samples(samples, own.as_deref())
    }

    pub async fn get(&self, id: &str) -> Result<JobInfo, JobError> {
        self.inner.store.job(id).await?.ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    pub async fn list(&self) -> Result<Vec<JobInfo>, JobError> {
        Ok(self.inner.store.jobs().await?)
    }

    pub async fn results(&self, id: &str) -> Result<Vec<StoredResult>, JobError> {
        self.get(id).await?;
        Ok(self.inner.store.results(id).await?)
    }

    /// Cancels a queued or running job: no item of it is claimed or completed from now on,
    /// on any server; this server's stop at once, the others' at their next renewal (a third
    /// of `jobs.lease_secs`). Its finished images stay.
    pub async fn cancel(&self, id: &str) -> Result<JobInfo, JobError> {
        self.get(id).await?;
        let cancelled = self.inner.store.end_live(id, JobState::Cancelled, None).await?;
        let job = self.get(id).await?;
        if !cancelled {
            return Err(JobError::Conflict(format!("job {id} is already {}", job.state.as_str())));
        }
        self.stop_job(id);
        self.publish(&job, None);
        Ok(job)
    }

    /// Fails a queued or running job with `error` (on every server, as `cancel` does).
    async fn fail(&self, id: &str, error: &str) {
        tracing::error!(job = %id, error, "job failed");
        let _ = self.inner.store.end_live(id, JobState::Failed, Some(error)).await;
        self.stop_job(id);
        if let Ok(job) = self.get(id).await {
            self.publish(&job, None);
        }
    }
}

/// `jobs.lease_secs` in milliseconds.
fn lease_ms(config: &JobsConfig) -> i64 {
    (config.lease_secs * 1e3) as i64
}

/// An item this server works on.
struct Held {
    job: String,
    /// The lease token of the claim: a later claim of the same item (after its lease ran out)
    /// replaces the entry, and only its own task removes it.
    lease: i64,
    stop: CancellationToken,
}

/// Held while a server starts: a lock file beside a SQLite database, or a PostgreSQL advisory
/// lock on a connection of its own, which closes (and so unlocks) when this is dropped.
enum StartupGate {
    File(#[allow(dead_code)] std::fs::File),
    Postgres(#[allow(dead_code)] tokio_postgres::Client),
}

async fn startup_gate(store: &Store) -> anyhow::Result<StartupGate> {
    match store {
        Store::Sqlite(s) => {
            let path = store::lock_path(s.path(), "start");
            let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                let f = std::fs::File::create(path)?;
                f.lock()?;
                Ok(f)
            })
            .await??;
            Ok(StartupGate::File(file))
        }
        Store::Postgres(p) => Ok(StartupGate::Postgres(p.startup_lock().await?)),
    }
}

/// The uploads' folder under the jobs' folder.
const UPLOADS: &str = ".uploads";

/// 16 hex digits from the OS's randomness.
pub fn new_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}
