//! The server's durable state: one SQLite database (jobs and their results here; the human
//! studies' rows in `crate::study::store`) (schema versioned with `rusqlite_migration`).
//! A result row is written only after its PNG is on disk and synced (`disk::write_durably`), in
//! one statement, so a crash or a power cut at any moment leaves every finished image's result
//! whole and nothing half-written; what a crash leaves besides is swept at start-up (`sweep`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

use super::{JobInfo, JobSpec, JobState};

/// Schema versions, oldest first; a new version is a new entry, never an edit.
fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            total INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            started_ms INTEGER,
            finished_ms INTEGER,
            error TEXT,
            resumed INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE results (
            job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            model TEXT NOT NULL,
            method TEXT NOT NULL,
            file TEXT NOT NULL,
            record TEXT NOT NULL,
            png TEXT,
            success INTEGER,
            created_ms INTEGER NOT NULL,
            PRIMARY KEY (job_id, model, method, file)
        );",
        ),
        // v2: human studies (`crate::study`) made from finished jobs.
        M::up(
            "CREATE TABLE studies (
            id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs(id),
            name TEXT NOT NULL,
            model TEXT NOT NULL,
            categories TEXT NOT NULL,
            groups INTEGER NOT NULL,
            refs INTEGER NOT NULL,
            created_ms INTEGER NOT NULL
        );
        CREATE TABLE puzzles (
            study_id TEXT NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
            id INTEGER NOT NULL,
            source TEXT NOT NULL,
            category TEXT NOT NULL,
            image TEXT NOT NULL,
            label TEXT NOT NULL,
            label_wnid TEXT,
            truth INTEGER NOT NULL,
            animal INTEGER NOT NULL,
            grp INTEGER NOT NULL,
            PRIMARY KEY (study_id, id)
        );
        CREATE TABLE study_references (
            study_id TEXT NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
            label_wnid TEXT NOT NULL,
            image TEXT NOT NULL,
            source TEXT NOT NULL,
            PRIMARY KEY (study_id, label_wnid, image)
        );
        CREATE TABLE observers (
            token TEXT PRIMARY KEY,
            study_id TEXT NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            grp INTEGER NOT NULL,
            seed INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            UNIQUE (study_id, name)
        );
        CREATE TABLE answers (
            token TEXT NOT NULL REFERENCES observers(token) ON DELETE CASCADE,
            puzzle INTEGER NOT NULL,
            correct INTEGER NOT NULL,
            answered_ms INTEGER NOT NULL,
            PRIMARY KEY (token, puzzle)
        );",
        ),
        // v3: observer links expire and are revoked one by one (`crate::study`); links made
        // before expire a week (the default TTL) after they were made.
        M::up(
            "ALTER TABLE observers ADD COLUMN expires_ms INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE observers ADD COLUMN revoked_ms INTEGER;
        UPDATE observers SET expires_ms = created_ms + 604800000;",
        ),
        // v4: each answer's time from its picture's display to the answer (None before), the
        // seed the study's sources were shuffled with (None before: alphabetical), and the
        // puzzles indexed by group, so an observer's group is counted without a scan.
        M::up(
            "ALTER TABLE answers ADD COLUMN elapsed_ms INTEGER;
        ALTER TABLE studies ADD COLUMN seed INTEGER;
        CREATE INDEX puzzles_by_group ON puzzles (study_id, grp);",
        ),
        // v5: a study's design (one group per observer, or every group in sequence), the
        // reference set it was made with (NULL: none; for a study made before v5, its references
        // came from the job's folder and keep doing so), and whether each answer's observer
        // opened the reference pictures (NULL: not said, or answered before v5).
        M::up(
            "ALTER TABLE studies ADD COLUMN design TEXT NOT NULL DEFAULT 'one_group';
        ALTER TABLE studies ADD COLUMN reference_images TEXT;
        ALTER TABLE answers ADD COLUMN references_opened INTEGER;",
        ),
    ])
}

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

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = Connection::open(path)?;
        // One server per database: a second process sharing it would resume the first one's
        // running jobs as its own. The lock goes with the process, even when it is killed.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        // WAL: the runner's writes are cheap appends; FULL sync: a result the API has shown
        // survives a power cut.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations().to_latest(&mut conn)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// The connection, for tests that call the statements directly.
    #[cfg(test)]
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the connection on a blocking thread (SQLite calls block).
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
    }

    pub fn insert_job(c: &Connection, id: &str, spec: &JobSpec, total: usize) -> Result<(), StoreError> {
        let spec = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(id.into(), e.to_string()))?;
        c.execute(
            "INSERT INTO jobs (id, spec, state, total, created_ms) VALUES (?1, ?2, 'queued', ?3, ?4)",
            params![id, spec, total as i64, now_ms()],
        )?;
        Ok(())
    }

    pub fn set_state(c: &Connection, id: &str, state: JobState, error: Option<&str>) -> Result<(), StoreError> {
        let now = now_ms();
        match state {
            JobState::Running => c.execute(
                "UPDATE jobs SET state = ?2, started_ms = COALESCE(started_ms, ?3) WHERE id = ?1",
                params![id, state.as_str(), now],
            )?,
            s if s.is_terminal() => c.execute(
                "UPDATE jobs SET state = ?2, finished_ms = ?3, error = ?4 WHERE id = ?1",
                params![id, s.as_str(), now, error],
            )?,
            s => c.execute("UPDATE jobs SET state = ?2 WHERE id = ?1", params![id, s.as_str()])?,
        };
        Ok(())
    }

    /// After a restart: jobs that were running are queued again (`resume`) or `interrupted`.
    /// Returns the ids queued again, oldest first.
    pub fn recover(c: &Connection, resume: bool) -> Result<Vec<String>, StoreError> {
        if resume {
            c.execute("UPDATE jobs SET state = 'queued', resumed = resumed + 1 WHERE state = 'running'", [])?;
        } else {
            c.execute(
                "UPDATE jobs SET state = 'interrupted', finished_ms = ?1, error = 'the server stopped while it ran' \
                 WHERE state = 'running'",
                params![now_ms()],
            )?;
        }
        let mut st = c.prepare("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_ms, id")?;
        let ids = st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    pub fn insert_result(c: &Connection, job: &str, r: &StoredResult) -> Result<(), StoreError> {
        c.execute(
            "INSERT OR REPLACE INTO results (job_id, model, method, file, record, png, success, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![job, r.model, r.method, r.file, r.record, r.png, r.success, now_ms()],
        )?;
        Ok(())
    }

    pub fn results(c: &Connection, job: &str) -> Result<Vec<StoredResult>, StoreError> {
        let mut st = c.prepare(
            "SELECT model, method, file, record, png, success FROM results WHERE job_id = ?1 \
             ORDER BY model, method, file",
        )?;
        let rows = st
            .query_map([job], |r| {
                Ok(StoredResult {
                    model: r.get(0)?,
                    method: r.get(1)?,
                    file: r.get(2)?,
                    record: r.get(3)?,
                    png: r.get(4)?,
                    success: r.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The (model, method, file) of every stored result: what a resumed job skips.
    pub fn result_keys(c: &Connection, job: &str) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut st = c.prepare("SELECT model, method, file FROM results WHERE job_id = ?1")?;
        let rows = st.query_map([job], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The studies (id, name) made from a job: while there is one, the job cannot be purged.
    pub fn studies_of(c: &Connection, job: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut st = c.prepare("SELECT id, name FROM studies WHERE job_id = ?1 ORDER BY created_ms, id")?;
        let rows = st.query_map([job], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Deletes a job and its results in one transaction, unless a study uses it: then nothing
    /// is deleted and those studies are returned.
    pub fn delete_job(c: &mut Connection, id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let tx = c.transaction()?;
        let studies = Self::studies_of(&tx, id)?;
        if studies.is_empty() {
            tx.execute("DELETE FROM results WHERE job_id = ?1", [id])?;
            tx.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
            tx.commit()?;
        }
        Ok(studies)
    }

    /// Finished jobs that ended before `before_ms` and no study uses: what retention removes.
    pub fn expired(c: &Connection, before_ms: i64) -> Result<Vec<String>, StoreError> {
        let mut st = c.prepare(
            "SELECT id FROM jobs j WHERE state IN ('done', 'failed', 'cancelled', 'interrupted') \
             AND COALESCE(finished_ms, created_ms) < ?1 \
             AND NOT EXISTS (SELECT 1 FROM studies s WHERE s.job_id = j.id) ORDER BY created_ms, id",
        )?;
        let ids = st.query_map([before_ms], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    pub fn job(c: &Connection, id: &str) -> Result<Option<JobInfo>, StoreError> {
        let mut st = c.prepare(&format!("{SELECT_JOB} WHERE j.id = ?1"))?;
        let row = st.query_row([id], raw_job).optional()?;
        row.map(|r| r.into_info()).transpose()
    }

    pub fn jobs(c: &Connection) -> Result<Vec<JobInfo>, StoreError> {
        let mut st = c.prepare(&format!("{SELECT_JOB} ORDER BY j.created_ms DESC, j.id"))?;
        let rows = st.query_map([], raw_job)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawJob::into_info).collect()
    }
}

const SELECT_JOB: &str = "SELECT j.id, j.spec, j.state, j.total, j.created_ms, j.started_ms, j.finished_ms, j.error, \
     j.resumed, (SELECT COUNT(*) FROM results r WHERE r.job_id = j.id), \
     (SELECT COUNT(*) FROM results r WHERE r.job_id = j.id AND r.success = 1) FROM jobs j";

struct RawJob {
    id: String,
    spec: String,
    state: String,
    total: i64,
    created_ms: i64,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    error: Option<String>,
    resumed: i64,
    done: i64,
    successes: i64,
}

fn raw_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawJob> {
    Ok(RawJob {
        id: r.get(0)?,
        spec: r.get(1)?,
        state: r.get(2)?,
        total: r.get(3)?,
        created_ms: r.get(4)?,
        started_ms: r.get(5)?,
        finished_ms: r.get(6)?,
        error: r.get(7)?,
        resumed: r.get(8)?,
        done: r.get(9)?,
        successes: r.get(10)?,
    })
}

impl RawJob {
    fn into_info(self) -> Result<JobInfo, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        assert!(migrations().validate().is_ok());
    }

    #[test]
    fn a_running_job_is_queued_again_or_marked_interrupted_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let spec = JobSpec {
            images: "/x".into(),
            methods: vec!["labelfool".into()],
            models: vec!["m".into()],
            limit: None,
            max_iter: None,
        };
        for (resume, expect) in [(true, JobState::Queued), (false, JobState::Interrupted)] {
            let path = dir.path().join(format!("{resume}.sqlite3"));
            {
                let s = Store::open(&path).unwrap();
                let c = s.conn.lock().unwrap();
                Store::insert_job(&c, "a", &spec, 2).unwrap();
                Store::set_state(&c, "a", JobState::Running, None).unwrap();
                let r = StoredResult {
                    model: "m".into(),
                    method: "labelfool".into(),
                    file: "x.jpg".into(),
                    record: "{}".into(),
                    png: None,
                    success: Some(true),
                };
                Store::insert_result(&c, "a", &r).unwrap();
            }
            // A new process opens the same file.
            let s = Store::open(&path).unwrap();
            let c = s.conn.lock().unwrap();
            let queued = Store::recover(&c, resume).unwrap();
            assert_eq!(queued.len(), usize::from(resume));
            let job = Store::job(&c, "a").unwrap().unwrap();
            assert_eq!((job.state, job.done, job.successes, job.resumed), (expect, 1, 1, u32::from(resume)));
        }
    }
}
