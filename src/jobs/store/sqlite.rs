//! The jobs store on SQLite (the default; `jobs.database` is a path): one connection per
//! server behind a mutex, its calls on the blocking pool. Several servers on one host may share
//! the file: WAL, every write transaction `BEGIN IMMEDIATE`, a wait of up to 30 s for another
//! server's write, and migrations under a lock file. The claim protocol's statements are in
//! `work`, the studies' in `crate::study::store`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::work::{self, ItemKey};
use super::{FILES_LOST, LIVE, RawJob, StoreError, StoredResult, lock_path, now_ms, schema};
use crate::jobs::{JobInfo, JobSpec, JobState};

#[derive(Clone)]
pub struct Sqlite {
    conn: Arc<Mutex<Connection>>,
    path: Arc<Path>,
}

impl Sqlite {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = Connection::open(path)?;
        // Another server's write holds the lock for milliseconds (a claim, a result); a start-up
        // migration may hold it longer.
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // A deferred transaction that reads, then writes, fails at once (SQLITE_BUSY, no wait)
        // when another server wrote in between: every transaction takes the write lock first.
        conn.set_transaction_behavior(TransactionBehavior::Immediate);
        // Set up and migrated by one server at a time: the others wait here, then find it done.
        let lock = std::fs::File::create(lock_path(path, "migrate"))?;
        lock.lock()?;
        // WAL: readers never wait for the writer and the runner's writes are cheap appends (it
        // needs shared memory: one host, local disk); FULL sync: a result the API has shown
        // survives a power cut.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        schema::migrations().to_latest(&mut conn)?;
        drop(lock);
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path: path.into() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every job's id, and every stored PNG with its result's key.
    pub fn sweep_view(c: &mut Connection) -> Result<super::SweepView, StoreError> {
        let mut st = c.prepare("SELECT id FROM jobs")?;
        let jobs = st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
        let mut st = c.prepare("SELECT job_id, png, model, method, file FROM results WHERE png IS NOT NULL")?;
        let pngs = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
            .collect::<Result<_, _>>()?;
        Ok(super::SweepView { jobs, pngs })
    }

    /// Removes the results whose PNG is gone (their items pending again) and reopens their
    /// `done` jobs (queued again, or interrupted with `resume` off); returns those jobs.
    pub fn drop_missing(
        c: &mut Connection,
        missing: &[super::MissingPng],
        resume: bool,
    ) -> Result<Vec<String>, StoreError> {
        let tx = c.transaction()?;
        let mut reopen = std::collections::BTreeSet::new();
        for m in missing {
            tx.execute("DELETE FROM results WHERE job_id = ?1 AND png = ?2", params![m.job, m.png])?;
            work::redo(&tx, &m.job, &m.model, &m.method, &m.file)?;
            reopen.insert(m.job.clone());
        }
        let mut reopened = Vec::new();
        for job in reopen {
            let changed = if resume {
                tx.execute(
                    "UPDATE jobs SET state = 'queued', resumed = resumed + 1 WHERE id = ?1 AND state = 'done'",
                    params![job],
                )?
            } else {
                tx.execute(
                    "UPDATE jobs SET state = 'interrupted', finished_ms = ?2, error = ?3 WHERE id = ?1 AND state = 'done'",
                    params![job, now_ms(), FILES_LOST],
                )?
            };
            if changed > 0 {
                reopened.push(job);
            }
        }
        tx.commit()?;
        Ok(reopened)
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
        super::blocking(move || f(&mut conn.lock().unwrap_or_else(|p| p.into_inner()))).await
    }

    /// The job's row and its work items (`items`, in the order they are to run, then its
    /// report) in one transaction.
    pub fn insert_job(
        c: &mut Connection,
        id: &str,
        spec: &JobSpec,
        total: usize,
        items: &[ItemKey],
    ) -> Result<(), StoreError> {
        let spec = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(id.into(), e.to_string()))?;
        let tx = c.transaction()?;
        let created = now_ms();
        tx.execute(
            "INSERT INTO jobs (id, spec, state, total, created_ms) VALUES (?1, ?2, 'queued', ?3, ?4)",
            params![id, spec, total as i64, created],
        )?;
        work::insert_items(&tx, id, created, items)?;
        tx.commit()?;
        Ok(())
    }

    /// Sets a job's state directly (tests; the runner's states come from claims and completions).
    #[cfg(test)]
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

    /// Ends a queued or running job (cancelled or failed); false if it had ended already.
    pub fn end_live(c: &Connection, id: &str, state: JobState, error: Option<&str>) -> Result<bool, StoreError> {
        let n = c.execute(
            &format!("UPDATE jobs SET state = ?2, finished_ms = ?3, error = ?4 WHERE id = ?1 AND state IN {LIVE}"),
            params![id, state.as_str(), now_ms(), error],
        )?;
        Ok(n > 0)
    }

    /// Stores a result directly (tests; the runner's come from `work::complete`).
    #[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::store::work;

    #[test]
    fn migrations_are_valid() {
        assert!(schema::migrations().validate().is_ok());
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
        let items: Vec<ItemKey> = ["x.jpg", "y.jpg"]
            .map(|f| ItemKey { model: "m".into(), method: "labelfool".into(), file: f.into() })
            .to_vec();
        for (resume, expect) in [(true, JobState::Queued), (false, JobState::Interrupted)] {
            let path = dir.path().join(format!("{resume}.sqlite3"));
            {
                let s = Sqlite::open(&path).unwrap();
                let mut c = s.conn.lock().unwrap();
                Sqlite::insert_job(&mut c, "a", &spec, 2, &items).unwrap();
                let held = work::claim(&mut c, "dead", &["m".into()], 2, 60_000).unwrap();
                assert_eq!(held.len(), 2);
                assert_eq!(Sqlite::job(&c, "a").unwrap().unwrap().state, JobState::Running);
                let r = StoredResult {
                    model: "m".into(),
                    method: "labelfool".into(),
                    file: "x.jpg".into(),
                    record: "{}".into(),
                    png: None,
                    success: Some(true),
                };
                assert_eq!(work::complete(&mut c, &held[0], "dead", Some(&r), || Ok(())).unwrap(), Ok(()));
            }
            // A new process opens the same file, alone.
            let s = Sqlite::open(&path).unwrap();
            let mut c = s.conn.lock().unwrap();
            let queued = work::recover_alone(&mut c, "me", resume).unwrap();
            assert_eq!(queued.len(), usize::from(resume));
            let job = Sqlite::job(&c, "a").unwrap().unwrap();
            assert_eq!((job.state, job.done, job.successes, job.resumed), (expect, 1, 1, u32::from(resume)));
            // The unfinished image is claimable again (when the job was resumed), once.
            let again = work::claim(&mut c, "me", &["m".into()], 5, 60_000).unwrap();
            let files: Vec<&str> = again.iter().map(|i| i.file.as_str()).collect();
            assert_eq!(files, if resume { vec!["y.jpg"] } else { vec![] });
        }
    }
}
