//! Work claimed, not owned: a job's work items (image × method × model, then its report) and
//! the servers (`instances`) that claim them with a lease. A claim, a renewal and a completion
//! are each one `BEGIN IMMEDIATE` transaction, so servers sharing the database never take one
//! item twice; a completion is fenced by the lease it was claimed with (a server whose lease
//! ran out and was claimed again by another writes nothing), and the result row, the item's
//! `done` and — after the last attack — the report's release commit together.

use rusqlite::{Connection, Transaction, params};

use super::{LIVE, STOPPED, StoreError, StoredResult, now_ms};

/// What an item does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One image attacked by one method on one model.
    Attack,
    /// The job's report, from every stored result: pending once every attack is done.
    Report,
}

impl Kind {
    /// As stored in `work_items.kind` (anything but `report` is an attack).
    pub(super) fn parse(s: &str) -> Self {
        if s == "report" { Self::Report } else { Self::Attack }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Attack => "attack",
            Self::Report => "report",
        }
    }
}

/// An attack item to insert, in the order it is to run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItemKey {
    pub model: String,
    pub method: String,
    /// The image's path within the job's folder.
    pub file: String,
}

/// An item this server holds, with the lease it was claimed under.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub job: String,
    pub kind: Kind,
    pub model: String,
    pub method: String,
    pub file: String,
    /// Raised by every claim of the item: a completion names the one it holds.
    pub token: i64,
    pub attempts: i64,
}

/// The item's lease was lost (it ran out and another server claimed the item, or its job
/// ended): nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LostLease;

/// Inserts a job's attack items (pending, in order) and its report item (blocked).
pub fn insert_items(tx: &Transaction<'_>, job: &str, created_ms: i64, items: &[ItemKey]) -> Result<(), StoreError> {
    let mut st = tx.prepare(
        "INSERT INTO work_items (job_id, kind, model, method, file, seq, job_created_ms, state) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
    )?;
    for (seq, it) in items.iter().enumerate() {
        st.execute(params![
            job,
            Kind::Attack.as_str(),
            it.model,
            it.method,
            it.file,
            seq as i64,
            created_ms,
            "pending"
        ])?;
    }
    st.execute(params![job, Kind::Report.as_str(), "", "", "", items.len() as i64, created_ms, "blocked"])?;
    Ok(())
}

/// Gives a job made before work items (schema v6) its items: those with a stored result are
/// done already, and the report is pending if every attack is.
pub fn add_legacy_items(c: &mut Connection, job: &str, items: &[ItemKey]) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    let created: i64 = tx.query_row("SELECT created_ms FROM jobs WHERE id = ?1", [job], |r| r.get(0))?;
    insert_items(&tx, job, created, items)?;
    tx.execute(
        "UPDATE work_items SET state = 'done' WHERE job_id = ?1 AND kind = 'attack' AND EXISTS \
         (SELECT 1 FROM results r WHERE r.job_id = ?1 AND r.model = work_items.model \
          AND r.method = work_items.method AND r.file = work_items.file)",
        [job],
    )?;
    unblock_report(&tx, job)?;
    tx.commit()?;
    Ok(())
}

/// Queued or running jobs that have no work items (made before schema v6).
pub fn jobs_without_items(c: &Connection) -> Result<Vec<String>, StoreError> {
    let mut st = c.prepare(&format!(
        "SELECT id FROM jobs j WHERE state IN {LIVE} \
         AND NOT EXISTS (SELECT 1 FROM work_items w WHERE w.job_id = j.id) ORDER BY created_ms, id"
    ))?;
    let ids = st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

/// Claims up to `n` pending items of live jobs, oldest job first and in each job's order, for
/// `owner` until `lease_ms` from now. Only items of `models` (the ones this server has ready)
/// are taken; a report needs none. Their jobs are marked running.
pub fn claim(
    c: &mut Connection,
    owner: &str,
    models: &[String],
    n: usize,
    lease_ms: i64,
) -> Result<Vec<Claimed>, StoreError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let models = serde_json::to_string(models).unwrap_or_else(|_| "[]".into());
    let now = now_ms();
    let tx = c.transaction()?;
    let mut claimed = {
        let mut st = tx.prepare(&format!(
            "UPDATE work_items SET state = 'leased', owner = ?1, lease_token = lease_token + 1, \
             attempts = attempts + 1, lease_until = ?2 + ?3 \
             WHERE id IN (SELECT w.id FROM work_items w JOIN jobs j ON j.id = w.job_id \
                WHERE w.state = 'pending' AND j.state IN {LIVE} \
                AND (w.kind = 'report' OR w.model IN (SELECT value FROM json_each(?4))) \
                ORDER BY w.job_created_ms, w.job_id, w.seq LIMIT ?5) \
             RETURNING id, job_id, kind, model, method, file, lease_token, attempts, seq"
        ))?;
        let rows = st.query_map(params![owner, now, lease_ms, models, n as i64], |r| {
            let kind: String = r.get(2)?;
            Ok((
                r.get::<_, i64>(8)?,
                Claimed {
                    id: r.get(0)?,
                    job: r.get(1)?,
                    kind: Kind::parse(&kind),
                    model: r.get(3)?,
                    method: r.get(4)?,
                    file: r.get(5)?,
                    token: r.get(6)?,
                    attempts: r.get(7)?,
                },
            ))
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    claimed.sort_by(|a, b| (&a.1.job, a.0).cmp(&(&b.1.job, b.0)));
    let mut started = std::collections::HashSet::new();
    for (_, it) in &claimed {
        if started.insert(it.job.clone()) {
            tx.execute(
                "UPDATE jobs SET state = 'running', started_ms = COALESCE(started_ms, ?2) \
                 WHERE id = ?1 AND state = 'queued'",
                params![it.job, now],
            )?;
        }
    }
    tx.commit()?;
    Ok(claimed.into_iter().map(|(_, it)| it).collect())
}

/// Extends the leases of the items `owner` works on now (`held`: an item whose work ended
/// without a completion, the database being unreachable, is left to run out) to `lease_ms` from
/// now and records its heartbeat (its row made again if another server took it for dead).
/// Returns the held items whose job has ended (cancelled, failed on another server): the owner
/// stops them.
pub fn renew(c: &mut Connection, me: &Me, held: &[i64], lease_ms: i64) -> Result<Vec<i64>, StoreError> {
    let now = now_ms();
    let held = serde_json::to_string(held).unwrap_or_else(|_| "[]".into());
    let owner = me.id.as_str();
    let tx = c.transaction()?;
    tx.execute(
        "UPDATE work_items SET lease_until = ?2 + ?3 WHERE owner = ?1 AND state = 'leased' \
         AND id IN (SELECT value FROM json_each(?4))",
        params![owner, now, lease_ms, held],
    )?;
    tx.execute(
        "INSERT INTO instances (id, host, pid, started_ms, heartbeat_ms) VALUES (?1, ?2, ?3, ?4, ?4) \
         ON CONFLICT (id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms",
        params![owner, me.host, me.pid, now],
    )?;
    let ended = {
        let mut st = tx.prepare(&format!(
            "SELECT w.id FROM work_items w JOIN jobs j ON j.id = w.job_id \
             WHERE w.owner = ?1 AND w.state = 'leased' AND j.state NOT IN {LIVE}"
        ))?;
        st.query_map([owner], |r| r.get::<_, i64>(0))?.collect::<Result<Vec<_>, _>>()?
    };
    tx.commit()?;
    Ok(ended)
}

/// Completes an item under its lease, in one transaction: the fence first (nothing is written
/// if the lease is lost), then `place` (a PNG renamed into place while the write lock keeps
/// every other writer out, so a stale server can never overwrite a newer result's file), then
/// the result row (once per key), the item done, and the report released after the last
/// attack. A report item marks its job done instead.
pub fn complete(
    c: &mut Connection,
    it: &Claimed,
    owner: &str,
    row: Option<&StoredResult>,
    place: impl FnOnce() -> std::io::Result<()>,
) -> Result<Result<(), LostLease>, StoreError> {
    let now = now_ms();
    let tx = c.transaction()?;
    let fenced = tx.execute(
        &format!(
            "UPDATE work_items SET state = 'done', owner = NULL, lease_until = NULL, done_by = ?2, done_ms = ?4 \
             WHERE id = ?1 AND owner = ?2 AND lease_token = ?3 AND state = 'leased' \
             AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = work_items.job_id AND j.state IN {LIVE})"
        ),
        params![it.id, owner, it.token, now],
    )?;
    if fenced == 0 {
        return Ok(Err(LostLease));
    }
    place()?;
    if let Some(r) = row {
        tx.execute(
            "INSERT INTO results (job_id, model, method, file, record, png, success, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
            params![it.job, r.model, r.method, r.file, r.record, r.png, r.success, now],
        )?;
    }
    match it.kind {
        Kind::Attack => unblock_report(&tx, &it.job)?,
        Kind::Report => {
            tx.execute(
                &format!(
                    "UPDATE jobs SET state = 'done', finished_ms = ?2, error = NULL WHERE id = ?1 AND state IN {LIVE}"
                ),
                params![it.job, now],
            )?;
        }
    }
    tx.commit()?;
    Ok(Ok(()))
}

/// The report item becomes pending once every attack of its job is done.
fn unblock_report(tx: &Transaction<'_>, job: &str) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE work_items SET state = 'pending' WHERE job_id = ?1 AND kind = 'report' AND state = 'blocked' \
         AND NOT EXISTS (SELECT 1 FROM work_items w WHERE w.job_id = ?1 AND w.kind = 'attack' AND w.state != 'done')",
        [job],
    )?;
    Ok(())
}

/// Gives an item back unfinished (the server is stopping, or its job ended): pending again, for
/// whichever server claims it next, and the claim not counted among its attempts — those count
/// only the claims that ended without an answer. Only the lease holder can.
pub fn release(c: &Connection, it: &Claimed, owner: &str) -> Result<(), StoreError> {
    c.execute(
        "UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL, attempts = attempts - 1 \
         WHERE id = ?1 AND owner = ?2 AND lease_token = ?3 AND state = 'leased'",
        params![it.id, owner, it.token],
    )?;
    Ok(())
}

/// Items whose lease ran out (their server hung or died without its lock being seen) are
/// pending again. Returns how many.
pub fn rescue_expired(c: &Connection) -> Result<usize, StoreError> {
    Ok(c.execute(
        "UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL \
         WHERE state = 'leased' AND lease_until < ?1",
        [now_ms()],
    )?)
}

/// Items of a job some server holds now.
pub fn leased(c: &Connection, job: &str) -> Result<u64, StoreError> {
    let n: i64 =
        c.query_row("SELECT COUNT(*) FROM work_items WHERE job_id = ?1 AND state = 'leased'", [job], |r| r.get(0))?;
    Ok(n as u64)
}

/// Items of live jobs waiting for a server (`labelfool_job_items_pending`).
pub fn pending(c: &Connection) -> Result<u64, StoreError> {
    let n: i64 = c.query_row(
        &format!(
            "SELECT COUNT(*) FROM work_items w JOIN jobs j ON j.id = w.job_id \
             WHERE w.state = 'pending' AND j.state IN {LIVE}"
        ),
        [],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

/// A server as `instances` records it.
#[derive(Debug, Clone)]
pub struct Me {
    pub id: String,
    pub host: String,
    pub pid: u32,
}

/// Records a server that works on this database.
pub fn register(c: &Connection, me: &Me) -> Result<(), StoreError> {
    let now = now_ms();
    c.execute(
        "INSERT INTO instances (id, host, pid, started_ms, heartbeat_ms) VALUES (?1, ?2, ?3, ?4, ?4)",
        params![me.id, me.host, me.pid, now],
    )?;
    Ok(())
}

pub fn unregister(c: &Connection, id: &str) -> Result<(), StoreError> {
    c.execute("DELETE FROM instances WHERE id = ?1", [id])?;
    Ok(())
}

/// Every server recorded, this one included, with its last heartbeat.
pub fn instances(c: &Connection) -> Result<Vec<(String, i64)>, StoreError> {
    let mut st = c.prepare("SELECT id, heartbeat_ms FROM instances ORDER BY started_ms, id")?;
    let ids = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

/// Servers that died (`dead`): their rows go and their items are pending again at once (no
/// wait for the lease); each job they held an item of is counted as resumed — or, with
/// `resume` off, marked interrupted. Returns those jobs.
pub fn reap(c: &mut Connection, dead: &[String], resume: bool) -> Result<Vec<String>, StoreError> {
    let tx = c.transaction()?;
    let mut jobs = std::collections::BTreeSet::new();
    for id in dead {
        {
            let mut st = tx.prepare(&format!(
                "SELECT DISTINCT w.job_id FROM work_items w JOIN jobs j ON j.id = w.job_id \
                 WHERE w.owner = ?1 AND w.state = 'leased' AND j.state IN {LIVE}"
            ))?;
            for job in st.query_map([id], |r| r.get::<_, String>(0))? {
                jobs.insert(job?);
            }
        }
        tx.execute(
            "UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL \
             WHERE owner = ?1 AND state = 'leased'",
            [id],
        )?;
        tx.execute("DELETE FROM instances WHERE id = ?1", [id])?;
    }
    for job in &jobs {
        interrupt_or_resume(&tx, job, resume)?;
    }
    tx.commit()?;
    Ok(jobs.into_iter().collect())
}

/// A server that starts alone on its database (every other recorded server is dead): every
/// running job was its predecessors', so each is queued again and counted as resumed (or,
/// with `resume` off, marked interrupted), and every lease is let go. Returns the jobs
/// queued, oldest first.
pub fn recover_alone(c: &mut Connection, me: &str, resume: bool) -> Result<Vec<String>, StoreError> {
    let tx = c.transaction()?;
    tx.execute("DELETE FROM instances WHERE id != ?1", [me])?;
    tx.execute("UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL WHERE state = 'leased'", [])?;
    let running: Vec<String> = {
        let mut st = tx.prepare("SELECT id FROM jobs WHERE state = 'running' ORDER BY created_ms, id")?;
        st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?
    };
    for job in &running {
        interrupt_or_resume(&tx, job, resume)?;
    }
    let mut st = tx.prepare("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_ms, id")?;
    let queued = st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    drop(st);
    tx.commit()?;
    Ok(queued)
}

fn interrupt_or_resume(tx: &Transaction<'_>, job: &str, resume: bool) -> Result<(), StoreError> {
    if resume {
        tx.execute(
            &format!("UPDATE jobs SET state = 'queued', resumed = resumed + 1 WHERE id = ?1 AND state IN {LIVE}"),
            [job],
        )?;
    } else {
        tx.execute(
            &format!(
                "UPDATE jobs SET state = 'interrupted', finished_ms = ?2, error = ?3 WHERE id = ?1 AND state IN {LIVE}"
            ),
            params![job, now_ms(), STOPPED],
        )?;
    }
    Ok(())
}

/// After the sweep removed a result whose PNG was lost: its item is to be done again (afresh:
/// none of its attempts failed), and the job's report waits for it.
pub fn redo(tx: &Transaction<'_>, job: &str, model: &str, method: &str, file: &str) -> Result<(), StoreError> {
    let n = tx.execute(
        "UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL, done_by = NULL, done_ms = NULL, \
         attempts = 0 \
         WHERE job_id = ?1 AND kind = 'attack' AND model = ?2 AND method = ?3 AND file = ?4",
        params![job, model, method, file],
    )?;
    if n > 0 {
        tx.execute("UPDATE work_items SET state = 'blocked' WHERE job_id = ?1 AND kind = 'report'", [job])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::store::Sqlite as Store;
    use crate::jobs::{JobSpec, JobState};

    fn spec() -> JobSpec {
        JobSpec {
            images: "/x".into(),
            methods: vec!["fgsm".into()],
            models: vec!["m".into()],
            limit: None,
            max_iter: None,
        }
    }

    fn items(n: usize) -> Vec<ItemKey> {
        (0..n).map(|i| ItemKey { model: "m".into(), method: "fgsm".into(), file: format!("{i:04}.jpg") }).collect()
    }

    fn row(it: &Claimed) -> StoredResult {
        StoredResult {
            model: it.model.clone(),
            method: it.method.clone(),
            file: it.file.clone(),
            record: "{}".into(),
            png: None,
            success: Some(true),
        }
    }

    fn count(c: &Connection, sql: &str) -> i64 {
        c.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// Three handles on one file (as three servers would have), six claimers: every item is
    /// claimed and stored exactly once, and the report comes after the last attack.
    #[test]
    fn servers_sharing_a_database_take_each_item_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite3");
        let stores: Vec<Store> = (0..3).map(|_| Store::open(&path).unwrap()).collect();
        Store::insert_job(&mut stores[0].lock(), "job", &spec(), 300, &items(300)).unwrap();
        std::thread::scope(|s| {
            for w in 0..6 {
                let store = stores[w % 3].clone();
                s.spawn(move || {
                    let owner = format!("server{w}");
                    loop {
                        let got = claim(&mut store.lock(), &owner, &["m".into()], 2, 60_000).unwrap();
                        if got.is_empty() {
                            return;
                        }
                        for it in got {
                            if it.kind == Kind::Attack {
                                let done =
                                    complete(&mut store.lock(), &it, &owner, Some(&row(&it)), || Ok(())).unwrap();
                                assert_eq!(done, Ok(()));
                            } else {
                                let c = store.lock();
                                assert_eq!(count(&c, "SELECT COUNT(*) FROM results"), 300, "the report came early");
                                drop(c);
                                complete(&mut store.lock(), &it, &owner, None, || Ok(())).unwrap().unwrap();
                            }
                        }
                    }
                });
            }
        });
        let c = stores[1].lock();
        assert_eq!(count(&c, "SELECT COUNT(*) FROM results"), 300);
        assert_eq!(count(&c, "SELECT COUNT(*) FROM work_items WHERE state = 'done' AND attempts = 1"), 301);
        assert!(count(&c, "SELECT COUNT(DISTINCT done_by) FROM work_items") > 1, "one claimer did everything");
        assert_eq!(Store::job(&c, "job").unwrap().unwrap().state, JobState::Done);
    }

    /// A claim handed back (a graceful stop) is not an attempt; one whose lease ran out is.
    #[test]
    fn only_claims_that_ended_without_an_answer_count_as_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.sqlite3")).unwrap();
        let mut c = store.lock();
        Store::insert_job(&mut c, "job", &spec(), 1, &items(1)).unwrap();
        let first = claim(&mut c, "a", &["m".into()], 1, 60_000).unwrap().remove(0);
        assert_eq!(first.attempts, 1);
        release(&c, &first, "a").unwrap();
        let again = claim(&mut c, "b", &["m".into()], 1, 1).unwrap().remove(0);
        assert_eq!((again.id, again.attempts), (first.id, 1), "handed back: not an attempt");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(rescue_expired(&c).unwrap(), 1);
        let third = claim(&mut c, "a", &["m".into()], 1, 60_000).unwrap().remove(0);
        assert_eq!((third.id, third.attempts), (first.id, 2), "ran out: an attempt");
    }

    /// A lease that runs out is claimed again; the first holder's completion then writes
    /// nothing, and cancelling a job stops its items' renewal and completion.
    #[test]
    fn a_lost_lease_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.sqlite3")).unwrap();
        let mut c = store.lock();
        Store::insert_job(&mut c, "job", &spec(), 2, &items(2)).unwrap();
        let stale = claim(&mut c, "staller", &["m".into()], 1, 1).unwrap().remove(0);
        assert!(claim(&mut c, "other", &["n".into()], 5, 60_000).unwrap().is_empty(), "a model it lacks");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(rescue_expired(&c).unwrap(), 1);
        let fresh = claim(&mut c, "other", &["m".into()], 1, 60_000).unwrap().remove(0);
        assert_eq!((fresh.id, fresh.attempts, fresh.token), (stale.id, 2, stale.token + 1));
        let mut placed = false;
        assert_eq!(
            complete(&mut c, &stale, "staller", Some(&row(&stale)), || {
                placed = true;
                Ok(())
            })
            .unwrap(),
            Err(LostLease)
        );
        assert!(!placed, "a stale server's file was put in place");
        assert_eq!(count(&c, "SELECT COUNT(*) FROM results"), 0);
        complete(&mut c, &fresh, "other", Some(&row(&fresh)), || Ok(())).unwrap().unwrap();
        assert_eq!(count(&c, "SELECT COUNT(*) FROM results"), 1);
        // Cancelled: the held item is named to its owner at renewal and cannot complete.
        let last = claim(&mut c, "other", &["m".into()], 1, 60_000).unwrap().remove(0);
        assert!(Store::end_live(&c, "job", JobState::Cancelled, None).unwrap());
        let other = Me { id: "other".into(), host: "h".into(), pid: 1 };
        assert_eq!(renew(&mut c, &other, &[last.id], 60_000).unwrap(), vec![last.id]);
        assert_eq!(complete(&mut c, &last, "other", Some(&row(&last)), || Ok(())).unwrap(), Err(LostLease));
        assert_eq!(count(&c, "SELECT COUNT(*) FROM results"), 1);
    }

    /// A dead server's items are pending again at once and its job counted as resumed.
    #[test]
    fn a_dead_server_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.sqlite3")).unwrap();
        let mut c = store.lock();
        register(&c, &Me { id: "dead".into(), host: "h".into(), pid: 1 }).unwrap();
        register(&c, &Me { id: "live".into(), host: "h".into(), pid: 2 }).unwrap();
        Store::insert_job(&mut c, "job", &spec(), 3, &items(3)).unwrap();
        claim(&mut c, "dead", &["m".into()], 2, 60_000).unwrap();
        claim(&mut c, "live", &["m".into()], 1, 60_000).unwrap();
        assert_eq!(reap(&mut c, &["dead".into()], true).unwrap(), vec!["job".to_string()]);
        assert_eq!(instances(&c).unwrap().into_iter().map(|(id, _)| id).collect::<Vec<_>>(), vec!["live".to_string()]);
        assert_eq!(count(&c, "SELECT COUNT(*) FROM work_items WHERE state = 'pending'"), 2);
        assert_eq!(count(&c, "SELECT COUNT(*) FROM work_items WHERE state = 'leased' AND owner = 'live'"), 1);
        let job = Store::job(&c, "job").unwrap().unwrap();
        assert_eq!((job.state, job.resumed), (JobState::Queued, 1));
        assert_eq!(leased(&c, "job").unwrap(), 1);
        assert_eq!(pending(&c).unwrap(), 2);
    }
}
