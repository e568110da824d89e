//! Jobs: work longer than a request — an `eval` of a folder for chosen methods and models — run
//! in the background one at a time, every finished image stored at once in SQLite (and its PNG
//! in the job's folder), progress published to subscribers (`/jobs/{id}/events`). A restart
//! resumes the jobs that were running (or marks them `interrupted`, `jobs.resume = false`); no
//! finished image is lost or done twice. The jobs' folder is bounded (`jobs.max_total_bytes`),
//! swept of what a killed process left at start-up (`sweep`), and finished jobs are deleted
//! on request or after `jobs.retention_days` (`purge`).

pub mod access;
pub mod archive;
pub mod disk;
pub mod purge;
pub mod runner;
pub mod store;
pub mod sweep;
mod upload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::attack::Method;
use crate::config::JobsConfig;
use crate::engine::{Engine, EngineError};
pub use store::{Store, StoreError, StoredResult};

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

/// The jobs service: the store, the queue of jobs to run and their live progress.
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
    queue: mpsc::UnboundedSender<String>,
    events: Mutex<HashMap<String, broadcast::Sender<JobEvent>>>,
    cancel: Mutex<HashMap<String, CancellationToken>>,
}

impl Jobs {
    /// Opens the store, recovers what a previous process left running and starts the runner.
    /// Finished jobs past `jobs.retention_days` are purged before it returns.
    pub async fn start(engine: Engine, config: &JobsConfig) -> anyhow::Result<Self> {
        if !(config.retention_days.is_finite() && config.retention_days >= 0.0) {
            anyhow::bail!("jobs.retention_days must be a number of days ≥ 0 (0: keep forever)");
        }
        let db = crate::config::expand_path(&config.database)?;
        let dir = crate::config::expand_path(&config.dir)?;
        std::fs::create_dir_all(&dir)?;
        let store = Store::open(&db)?;
        let roots = access::Roots::new(&config.allowed_dirs);
        let resume = config.resume;
        let (d, uploads) = (dir.clone(), dir.join(UPLOADS));
        let swept = store.with(move |c| sweep::sweep(c, &d, &uploads, resume)).await?;
        if swept != sweep::Swept::default() {
            tracing::info!(?swept, "swept what the previous process left unfinished");
        }
        let recovered = store.with(move |c| Store::recover(c, resume)).await?;
        if !recovered.is_empty() {
            tracing::info!(jobs = ?recovered, "resuming jobs left queued or running by the previous process");
        }
        let (queue, rx) = mpsc::unbounded_channel();
        let jobs = Self {
            inner: Arc::new(Inner {
                store,
                dir,
                config: config.clone(),
                roots,
                engine,
                queue,
                events: Mutex::default(),
                cancel: Mutex::default(),
            }),
        };
        for id in recovered {
            let _ = jobs.inner.queue.send(id);
        }
        jobs.purge_expired().await;
        purge::spawn_retention(jobs.clone());
        tokio::spawn(runner::run(jobs.clone(), rx));
        Ok(jobs)
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
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

    /// Fills the spec's defaults, counts its attacks (refusing too many, or any file that
    /// leads outside the folders a job may read) and queues it as `id`.
    async fn queue_new(&self, id: String, mut spec: JobSpec) -> Result<JobInfo, JobError> {
        let folder = PathBuf::from(&spec.images);
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
        let mut total = 0;
        for m in &spec.models {
            let (_, info) = self.inner.engine.model(Some(m))?;
            let mut samples = crate::dataset::discover(&folder, info.classes())
                .map_err(|e| JobError::invalid("images", e.to_string()))?;
            if let Some(n) = spec.limit {
                samples.truncate(n);
            }
            self.check_samples(&id, &samples)?;
            total += samples.len() * spec.methods.len();
        }
        if total == 0 {
            return Err(JobError::invalid("images", format!("no files in {}", spec.images)));
        }
        if total > self.inner.config.max_attacks {
            return Err(JobError::invalid(
                "images",
                format!("{total} attacks; at most {} per job (jobs.max_attacks)", self.inner.config.max_attacks),
            ));
        }
        let (s, i) = (spec.clone(), id.clone());
        self.inner.store.with(move |c| Store::insert_job(c, &i, &s, total)).await?;
        let info = self.get(&id).await?;
        let _ = self.inner.queue.send(id);
        Ok(info)
    }

    /// Every file a job reads lies (links followed) under `jobs.allowed_dirs` or its own folder.
    fn check_samples(&self, id: &str, samples: &[crate::dataset::Sample]) -> Result<(), JobError> {
        let own = self.job_dir(id).canonicalize().ok();
        self.inner.roots.check_samples(samples, own.as_deref())
    }

    pub async fn get(&self, id: &str) -> Result<JobInfo, JobError> {
        let i = id.to_string();
        self.inner.store.with(move |c| Store::job(c, &i)).await?.ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    pub async fn list(&self) -> Result<Vec<JobInfo>, JobError> {
        Ok(self.inner.store.with(|c| Store::jobs(c)).await?)
    }

    pub async fn results(&self, id: &str) -> Result<Vec<StoredResult>, JobError> {
        self.get(id).await?;
        let i = id.to_string();
        Ok(self.inner.store.with(move |c| Store::results(c, &i)).await?)
    }

    /// Cancels a queued or running job (a running one stops scheduling at once; its finished
    /// images stay).
    pub async fn cancel(&self, id: &str) -> Result<JobInfo, JobError> {
        let job = self.get(id).await?;
        if job.state.is_terminal() {
            return Err(JobError::Conflict(format!("job {id} is already {}", job.state.as_str())));
        }
        let token = self.inner.cancel.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
        match token {
            Some(t) => t.cancel(),
            None => {
                let i = id.to_string();
                self.inner.store.with(move |c| Store::set_state(c, &i, JobState::Cancelled, None)).await?;
            }
        }
        let job = self.get(id).await?;
        self.publish(&job, None);
        Ok(job)
    }

    /// Progress of a job from now on (None once it is finished and nobody publishes).
    pub fn subscribe(&self, id: &str) -> broadcast::Receiver<JobEvent> {
        let mut events = self.inner.events.lock().unwrap_or_else(|p| p.into_inner());
        // A channel nobody listens to carries nothing: a request for a missing or finished job
        // leaves one behind, and without this every such request would keep one for good.
        events.retain(|_, tx| tx.receiver_count() > 0);
        events.entry(id.to_string()).or_insert_with(|| broadcast::channel(256).0).subscribe()
    }

    /// Channels held for progress subscribers (one per job somebody follows).
    pub fn event_channels(&self) -> usize {
        self.inner.events.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn publish(&self, job: &JobInfo, last: Option<FinishedAttack>) {
        let event = JobEvent::of(job, last);
        let mut events = self.inner.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = events.get(&job.id) {
            let _ = tx.send(event);
            // After a job's last event its channel closes: subscribers still read what it holds.
            if job.state.is_terminal() || tx.receiver_count() == 0 {
                events.remove(&job.id);
            }
        }
    }
}

/// The uploads' folder under the jobs' folder.
const UPLOADS: &str = ".uploads";

/// 16 hex digits from the OS's randomness.
pub fn new_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}
