//! The server's durable state, behind one interface over two engines: SQLite (`sqlite`, the
//! default: a file, shared by the servers of one host) or PostgreSQL (`postgres`,
//! `jobs.database = "postgres://…"`: shared by servers on any number of hosts). Both hold the
//! same tables from one schema history (`schema`) and run the same claim protocol (`work`).
//! A result row is written only after its PNG is on disk and synced, in the transaction that
//! completes its work item, so a crash or a power cut at any moment leaves every finished
//! image's result whole and nothing half-written; what a crash leaves besides is swept at
//! start-up (`crate::jobs::sweep`).

use std::path::Path;

use super::{JobInfo, JobSpec, JobState};

pub mod postgres;
pub mod schema;
pub mod sqlite;
pub mod work;

pub use postgres::Postgres;
pub use sqlite::Sqlite;
pub use work::{Claimed, ItemKey, Kind, LostLease, Me};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("jobs database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("jobs database schema: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("jobs database: stored job {0} is unreadable: {1}")]
    Corrupt(String, String),
    #[error("jobs database: {0}")]
    Io(#[from] std::io::Error),
    #[error("jobs database: {0}")]
    Postgres(String),
    /// The database cannot be reached now (503 `database_unavailable`; retried).
    #[error("jobs database unreachable: {0}")]
    Unavailable(String),
}

/// Job states whose items may still be claimed and completed (SQL, both engines).
const LIVE: &str = "('queued', 'running')";

/// A job's `error` when the server running it stopped and `jobs.resume` is off.
const STOPPED: &str = "the server stopped while it ran";

/// A `done` job's `error` when the sweep removed results whose files were gone and
/// `jobs.resume` is off.
const FILES_LOST: &str = "result files were missing at start-up; their results were removed";

/// A lock file beside the database (`jobs.sqlite3` → `jobs.sqlite3.<what>.lock`).
pub fn lock_path(db: &Path, what: &str) -> std::path::PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{what}.lock"));
    db.with_file_name(name)
}

/// One stored per-image result.
#[derive(Debug, Clone)]
pub struct StoredResult {
    pub model: String,
    pub method: String,
    pub file: String,
    /// The record as `results.jsonl` has it.
    pub record: String,
    /// The delivered PNG, relative to the job's folder.
    pub png: Option<String>,
    pub success: Option<bool>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A `jobs` row with its result counts, as either engine reads it.
pub(crate) struct RawJob {
    pub id: String,
    pub spec: String,
    pub state: String,
    pub total: i64,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    pub resumed: i64,
    pub done: i64,
    pub successes: i64,
}

impl RawJob {
    pub fn into_info(self) -> Result<JobInfo, StoreError> {
        let spec: JobSpec =
            serde_json::from_str(&self.spec).map_err(|e| StoreError::Corrupt(self.id.clone(), e.to_string()))?;
        let state = JobState::parse(&self.state)
            .ok_or_else(|| StoreError::Corrupt(self.id.clone(), format!("state {:?}", self.state)))?;
        Ok(JobInfo {
            id: self.id,
            state,
            spec,
            total: self.total as u64,
            done: self.done as u64,
            successes: self.successes as u64,
            created_ms: self.created_ms,
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            error: self.error,
            resumed: self.resumed as u32,
        })
    }
}

/// The jobs database: SQLite or PostgreSQL, by `jobs.database`.
#[derive(Clone)]
pub enum Store {
    Sqlite(Sqlite),
    Postgres(Postgres),
}

/// What the start-up sweep compares the folder with: every job's id, and every stored PNG as
/// (job, png, model, method, file).
pub struct SweepView {
    pub jobs: Vec<String>,
    pub pngs: Vec<(String, String, String, String, String)>,
}

/// A result whose PNG the sweep found gone.
#[derive(Debug, Clone)]
pub struct MissingPng {
    pub job: String,
    pub png: String,
    pub model: String,
    pub method: String,
    pub file: String,
}

/// Runs blocking work (SQLite, the file system) on the blocking pool. A task that panicked comes
/// back as an I/O error of the store, in whichever error type the caller returns.
pub async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e.to_string())).into()))
}

/// Whether `jobs.database` names a PostgreSQL server rather than a SQLite file.
pub fn is_postgres(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

/// A PostgreSQL DSN with its password replaced (`postgres://user:<redacted>@host/db`), for
/// `labelfool config`; anything else unchanged.
pub fn redact_dsn(database: &str) -> String {
    if !is_postgres(database) {
        return database.to_string();
    }
    let Some((scheme, rest)) = database.split_once("://") else { return database.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let hidden = if userinfo.contains(':') { ":<redacted>" } else { "" };
            format!("{scheme}://{user}{hidden}{}", &rest[at..])
        }
        None => database.to_string(),
    }
}

/// Runs the SQLite arm on the blocking pool, or the PostgreSQL arm's async call.
macro_rules! dispatch {
    ($self:ident, |$c:ident| $sqlite:expr, |$p:ident| $pg:expr) => {
        match $self {
            Store::Sqlite(s) => s.with(move |$c| $sqlite).await,
            Store::Postgres($p) => $pg.await,
        }
    };
}

impl Store {
    /// Opens `jobs.database`: a PostgreSQL DSN (a pool of `pool` connections) or a SQLite
    /// file (`sqlite:` prefix optional; `${…}` expanded).
    pub async fn open(database: &str, pool: usize) -> Result<Self, StoreError> {
        if is_postgres(database) {
            return Ok(Self::Postgres(Postgres::open(database, pool).await?));
        }
        let path = crate::config::expand_path(database.strip_prefix("sqlite:").unwrap_or(database))
            .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
        Ok(Self::Sqlite(blocking(move || Sqlite::open(&path)).await?))
    }

    /// The SQLite file's path (None on PostgreSQL).
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(s) => Some(s.path()),
            Self::Postgres(_) => None,
        }
    }

    /// Whether the database answers now (readiness). A SQLite file always does.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(_) => Ok(()),
            Self::Postgres(p) => p.ping().await,
        }
    }

    pub async fn insert_job(
        &self,
        id: &str,
        spec: &JobSpec,
        total: usize,
        items: Vec<ItemKey>,
    ) -> Result<(), StoreError> {
        let (i, s) = (id.to_string(), spec.clone());
        dispatch!(self, |c| Sqlite::insert_job(c, &i, &s, total, &items), |p| p.insert_job(id, spec, total, &items))
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobInfo>, StoreError> {
        let i = id.to_string();
        dispatch!(self, |c| Sqlite::job(c, &i), |p| p.job(id))
    }

    pub async fn jobs(&self) -> Result<Vec<JobInfo>, StoreError> {
        dispatch!(self, |c| Sqlite::jobs(c), |p| p.jobs())
    }

    pub async fn results(&self, job: &str) -> Result<Vec<StoredResult>, StoreError> {
        let j = job.to_string();
        dispatch!(self, |c| Sqlite::results(c, &j), |p| p.results(job))
    }

    /// Ends a queued or running job (cancelled or failed); false if it had ended already.
    pub async fn end_live(&self, id: &str, state: JobState, error: Option<&str>) -> Result<bool, StoreError> {
        let (i, e) = (id.to_string(), error.map(str::to_string));
        dispatch!(self, |c| Sqlite::end_live(c, &i, state, e.as_deref()), |p| p.end_live(id, state, error))
    }

    pub async fn studies_of(&self, job: &str) -> Result<Vec<(String, String)>, StoreError> {
        let j = job.to_string();
        dispatch!(self, |c| Sqlite::studies_of(c, &j), |p| p.studies_of(job))
    }

    /// Deletes a job and its results in one transaction, unless a study uses it: then nothing
    /// is deleted and those studies are returned.
    pub async fn delete_job(&self, id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let i = id.to_string();
        dispatch!(self, |c| Sqlite::delete_job(c, &i), |p| p.delete_job(id))
    }

    /// Finished jobs that ended before `before_ms` and no study uses: what retention removes.
    pub async fn expired(&self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        dispatch!(self, |c| Sqlite::expired(c, before_ms), |p| p.expired(before_ms))
    }

    /// See `work::claim`.
    pub async fn claim(
        &self,
        owner: &str,
        models: Vec<String>,
        n: usize,
        lease_ms: i64,
    ) -> Result<Vec<Claimed>, StoreError> {
        let o = owner.to_string();
        dispatch!(self, |c| work::claim(c, &o, &models, n, lease_ms), |p| p.claim(owner, &models, n, lease_ms))
    }

    /// See `work::renew`.
    pub async fn renew(&self, me: &Me, held: Vec<i64>, lease_ms: i64) -> Result<Vec<i64>, StoreError> {
        let m = me.clone();
        dispatch!(self, |c| work::renew(c, &m, &held, lease_ms), |p| p.renew(me, &held, lease_ms))
    }

    /// See `work::complete`.
    pub async fn complete(
        &self,
        it: &Claimed,
        owner: &str,
        row: Option<StoredResult>,
        place: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> Result<Result<(), LostLease>, StoreError> {
        let (i, o) = (it.clone(), owner.to_string());
        match self {
            Self::Sqlite(s) => s.with(move |c| work::complete(c, &i, &o, row.as_ref(), place)).await,
            Self::Postgres(p) => p.complete(it, owner, row.as_ref(), place).await,
        }
    }

    /// See `work::release`.
    pub async fn release(&self, it: &Claimed, owner: &str) -> Result<(), StoreError> {
        let (i, o) = (it.clone(), owner.to_string());
        dispatch!(self, |c| work::release(c, &i, &o), |p| p.release(it, owner))
    }

    /// See `work::rescue_expired`.
    pub async fn rescue_expired(&self) -> Result<usize, StoreError> {
        dispatch!(self, |c| work::rescue_expired(c), |p| p.rescue_expired())
    }

    /// Items of a job some server holds now.
    pub async fn leased(&self, job: &str) -> Result<u64, StoreError> {
        let j = job.to_string();
        dispatch!(self, |c| work::leased(c, &j), |p| p.leased(job))
    }

    /// Items of live jobs waiting for a server.
    pub async fn pending(&self) -> Result<u64, StoreError> {
        dispatch!(self, |c| work::pending(c), |p| p.pending())
    }

    pub async fn register(&self, me: &Me) -> Result<(), StoreError> {
        let m = me.clone();
        dispatch!(self, |c| work::register(c, &m), |p| p.register(me))
    }

    /// Every recorded server, with its last heartbeat.
    pub async fn instances(&self) -> Result<Vec<(String, i64)>, StoreError> {
        dispatch!(self, |c| work::instances(c), |p| p.instances())
    }

    /// See `work::reap`.
    pub async fn reap(&self, dead: Vec<String>, resume: bool) -> Result<Vec<String>, StoreError> {
        dispatch!(self, |c| work::reap(c, &dead, resume), |p| p.reap(&dead, resume))
    }

    /// See `work::recover_alone`.
    pub async fn recover_alone(&self, me: &str, resume: bool) -> Result<Vec<String>, StoreError> {
        let m = me.to_string();
        dispatch!(self, |c| work::recover_alone(c, &m, resume), |p| p.recover_alone(me, resume))
    }

    /// Queued or running jobs made before work items (only SQLite files can hold them).
    pub async fn jobs_without_items(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Self::Sqlite(s) => s.with(|c| work::jobs_without_items(c)).await,
            Self::Postgres(_) => Ok(Vec::new()),
        }
    }

    /// See `work::add_legacy_items`.
    pub async fn add_legacy_items(&self, job: &str, items: Vec<ItemKey>) -> Result<(), StoreError> {
        let j = job.to_string();
        match self {
            Self::Sqlite(s) => s.with(move |c| work::add_legacy_items(c, &j, &items)).await,
            Self::Postgres(_) => Ok(()),
        }
    }

    /// What the start-up sweep compares the folder with.
    pub async fn sweep_view(&self) -> Result<SweepView, StoreError> {
        dispatch!(self, |c| Sqlite::sweep_view(c), |p| p.sweep_view())
    }

    /// Removes the results whose PNG is gone (their items pending again) and reopens their
    /// `done` jobs (queued again, or interrupted with `resume` off); returns those jobs.
    pub async fn drop_missing(&self, missing: Vec<MissingPng>, resume: bool) -> Result<Vec<String>, StoreError> {
        dispatch!(self, |c| Sqlite::drop_missing(c, &missing, resume), |p| p.drop_missing(&missing, resume))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dsn_is_shown_without_its_password() {
        assert_eq!(redact_dsn("postgres://lf:s3cr@t@db:5432/jobs"), "postgres://lf:<redacted>@db:5432/jobs");
        assert_eq!(redact_dsn("postgresql://lf@db/jobs"), "postgresql://lf@db/jobs");
        assert_eq!(redact_dsn("/var/lib/labelfool/jobs.sqlite3"), "/var/lib/labelfool/jobs.sqlite3");
    }
}
