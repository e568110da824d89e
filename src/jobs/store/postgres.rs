//! The jobs store on PostgreSQL (`jobs.database = "postgres://…"`), for servers on several hosts:
//! the same tables and the same claim protocol as `sqlite` and `work`, in PostgreSQL's SQL —
//! claims with `FOR UPDATE SKIP LOCKED`, a completion fenced by its lease and serialised per
//! job by the job row's lock, the schema migrated once under an advisory lock held on one
//! connection. A lost connection is `StoreError::Unavailable` (503 `database_unavailable`):
//! nothing is half-written, since every change is one transaction.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{NoTls, Row};

use super::work::{Claimed, ItemKey, Kind, LostLease, Me};
use super::{FILES_LOST, LIVE, RawJob, STOPPED, StoreError, StoredResult, now_ms, schema};
use crate::jobs::{JobInfo, JobSpec, JobState};

/// `pg_advisory_lock`'s key for migrations ("labelfoo" in ASCII).
const MIGRATION_LOCK: i64 = 0x6c61_6265_6c66_6f6f;

/// How long a readiness ping's answer stands: a flood of `/ready` costs the pool one
/// connection a second, not one per probe.
const PING_STANDS: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    /// For the start-up lock's connection of its own.
    config: std::sync::Arc<tokio_postgres::Config>,
    last_ping: std::sync::Arc<Recent>,
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // No server error code: the connection itself failed (refused, reset, closed).
        match e.as_db_error() {
            // Connection exceptions (08), too many connections (53), the server shutting down or
            // starting (57), deadlocks and serialization failures (40): transient, retried.
            Some(db) if !e.is_closed() && !["08", "53", "57", "40"].contains(&&db.code().code()[..2]) => {
                Self::Postgres(format!("{}: {}", db.code().code(), db.message()))
            }
            Some(db) => Self::Unavailable(format!("{}: {}", db.code().code(), db.message())),
            None => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

impl Postgres {
    /// Connects (a pool of `size`) and brings the schema up to date. The DSN's password never
    /// reaches an error message: only the driver's own words do.
    pub async fn open(dsn: &str, size: usize) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config =
            dsn.parse().map_err(|e: tokio_postgres::Error| StoreError::Postgres(format!("jobs.database: {e}")))?;
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Verified });
        let timeout = Some(Duration::from_secs(5));
        let pool = Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        let store = Self { pool, config: config.into(), last_ping: Default::default() };
        store.migrate().await?;
        Ok(store)
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// A connection of its own holding the start-up advisory lock (servers start one at a
    /// time); dropping it closes the connection, which unlocks.
    pub async fn startup_lock(&self) -> Result<tokio_postgres::Client, StoreError> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client.execute("SELECT pg_advisory_lock($1)", &[&(MIGRATION_LOCK + 1)]).await?;
        Ok(client)
    }

    /// Whether the database answered a ping within the last second (readiness); callers at
    /// the same moment share one ping.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.last_ping
            .get_or(PING_STANDS, async {
                self.client().await?.simple_query("SELECT 1").await?;
                Ok(())
            })
            .await
    }

    /// Applies the missing schema versions, each in its own transaction with its history row,
    /// while holding the advisory lock on this one connection: servers starting together apply
    /// each version once.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
        let applied = async {
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS labelfool_schema (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
            )
            .await?;
            let current: i64 = c.query_one("SELECT COALESCE(MAX(version), 0) FROM labelfool_schema", &[]).await?.get(0);
            if current as usize > schema::POSTGRES.len() {
                return Err(StoreError::Postgres(format!(
                    "the database's schema is version {current}, newer than this server's {}: upgrade the server",
                    schema::POSTGRES.len()
                )));
            }
            for (i, step) in schema::POSTGRES.iter().enumerate().skip(current as usize) {
                let tx = c.transaction().await?;
                tx.batch_execute(step).await?;
                tx.execute(
                    "INSERT INTO labelfool_schema (version, applied_ms) VALUES ($1, $2)",
                    &[&(i as i64 + 1), &now_ms()],
                )
                .await?;
                tx.commit().await?;
            }
            Ok(())
        }
        .await;
        c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await?;
        applied
    }

    pub async fn insert_job(
        &self,
        id: &str,
        spec: &JobSpec,
        total: usize,
        items: &[ItemKey],
    ) -> Result<(), StoreError> {
        let spec = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(id.into(), e.to_string()))?;
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let created = now_ms();
        tx.execute(
            "INSERT INTO jobs (id, spec, state, total, created_ms) VALUES ($1, $2, 'queued', $3, $4)",
            &[&id, &spec, &(total as i64), &created],
        )
        .await?;
        // One statement for every item: arrays unnested in order (seq = position).
        let (models, methods, files): (Vec<&str>, Vec<&str>, Vec<&str>) = items
            .iter()
            .map(|it| (it.model.as_str(), it.method.as_str(), it.file.as_str()))
            .fold((Vec::new(), Vec::new(), Vec::new()), |(mut a, mut b, mut c), (x, y, z)| {
                a.push(x);
                b.push(y);
                c.push(z);
                (a, b, c)
            });
        tx.execute(
            "INSERT INTO work_items (job_id, kind, model, method, file, seq, job_created_ms, state) \
             SELECT $1, 'attack', m, me, f, n - 1, $2, 'pending' \
             FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS t(m, me, f, n)",
            &[&id, &created, &models, &methods, &files],
        )
        .await?;
        tx.execute(
            "INSERT INTO work_items (job_id, kind, model, method, file, seq, job_created_ms, state) \
             VALUES ($1, 'report', '', '', '', $2, $3, 'blocked')",
            &[&id, &(items.len() as i64), &created],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobInfo>, StoreError> {
        let c = self.client().await?;
        let row = c.query_opt(&format!("{SELECT_JOB} WHERE j.id = $1"), &[&id]).await?;
        row.map(|r| job_info(&r)).transpose()
    }

    pub async fn jobs(&self) -> Result<Vec<JobInfo>, StoreError> {
        let c = self.client().await?;
        let rows = c.query(&format!("{SELECT_JOB} ORDER BY j.created_ms DESC, j.id"), &[]).await?;
        rows.iter().map(job_info).collect()
    }

    pub async fn results(&self, job: &str) -> Result<Vec<StoredResult>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT model, method, file, record, png, success FROM results WHERE job_id = $1 \
                 ORDER BY model, method, file",
                &[&job],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| StoredResult {
                model: r.get(0),
                method: r.get(1),
                file: r.get(2),
                record: r.get(3),
                png: r.get(4),
                success: r.get(5),
            })
            .collect())
    }

    pub async fn end_live(&self, id: &str, state: JobState, error: Option<&str>) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute(
                &format!("UPDATE jobs SET state = $2, finished_ms = $3, error = $4 WHERE id = $1 AND state IN {LIVE}"),
                &[&id, &state.as_str(), &now_ms(), &error],
            )
            .await?;
        Ok(n > 0)
    }

    pub async fn studies_of(&self, job: &str) -> Result<Vec<(String, String)>, StoreError> {
        let c = self.client().await?;
        let rows = c.query("SELECT id, name FROM studies WHERE job_id = $1 ORDER BY created_ms, id", &[&job]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn delete_job(&self, id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let rows = tx
            .query("SELECT id, name FROM studies WHERE job_id = $1 ORDER BY created_ms, id FOR SHARE", &[&id])
            .await?;
        let studies: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if studies.is_empty() {
            tx.execute("DELETE FROM results WHERE job_id = $1", &[&id]).await?;
            tx.execute("DELETE FROM jobs WHERE id = $1", &[&id]).await?;
            tx.commit().await?;
        }
        Ok(studies)
    }

    pub async fn expired(&self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT id FROM jobs j WHERE state IN ('done', 'failed', 'cancelled', 'interrupted') \
                 AND COALESCE(finished_ms, created_ms) < $1 \
                 AND NOT EXISTS (SELECT 1 FROM studies s WHERE s.job_id = j.id) ORDER BY created_ms, id",
                &[&before_ms],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn claim(
        &self,
        owner: &str,
        models: &[String],
        n: usize,
        lease_ms: i64,
    ) -> Result<Vec<Claimed>, StoreError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let rows = tx
            .query(
                &format!(
                    "WITH picked AS (SELECT w.id FROM work_items w JOIN jobs j ON j.id = w.job_id \
                        WHERE w.state = 'pending' AND j.state IN {LIVE} AND (w.kind = 'report' OR w.model = ANY($3)) \
                        ORDER BY w.job_created_ms, w.job_id, w.seq LIMIT $4 FOR UPDATE OF w SKIP LOCKED) \
                     UPDATE work_items w SET state = 'leased', owner = $1, lease_token = w.lease_token + 1, \
                        attempts = w.attempts + 1, lease_until = $2::bigint + $5::bigint \
                     FROM picked WHERE w.id = picked.id \
                     RETURNING w.id, w.job_id, w.kind, w.model, w.method, w.file, w.lease_token, w.attempts, w.seq"
                ),
                &[&owner, &now, &models, &(n as i64), &lease_ms],
            )
            .await?;
        let mut claimed: Vec<(i64, Claimed)> = rows
            .iter()
            .map(|r| {
                let kind: String = r.get(2);
                (
                    r.get(8),
                    Claimed {
                        id: r.get(0),
                        job: r.get(1),
                        kind: Kind::parse(&kind),
                        model: r.get(3),
                        method: r.get(4),
                        file: r.get(5),
                        token: r.get(6),
                        attempts: r.get(7),
                    },
                )
            })
            .collect();
        claimed.sort_by(|a, b| (&a.1.job, a.0).cmp(&(&b.1.job, b.0)));
        let mut jobs: Vec<&str> = claimed.iter().map(|(_, it)| it.job.as_str()).collect();
        jobs.dedup();
        if !jobs.is_empty() {
            tx.execute(
                "UPDATE jobs SET state = 'running', started_ms = COALESCE(started_ms, $2) \
                 WHERE id = ANY($1) AND state = 'queued'",
                &[&jobs, &now],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(claimed.into_iter().map(|(_, it)| it).collect())
    }

    pub async fn renew(&self, me: &Me, held: &[i64], lease_ms: i64) -> Result<Vec<i64>, StoreError> {
        let now = now_ms();
        let owner = me.id.as_str();
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "UPDATE work_items SET lease_until = $2::bigint + $3::bigint \
             WHERE owner = $1 AND state = 'leased' AND id = ANY($4)",
            &[&owner, &now, &lease_ms, &held],
        )
        .await?;
        tx.execute(
            "INSERT INTO instances (id, host, pid, started_ms, heartbeat_ms) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms",
            &[&owner, &me.host, &i64::from(me.pid), &now],
        )
        .await?;
        let rows = tx
            .query(
                &format!(
                    "SELECT w.id FROM work_items w JOIN jobs j ON j.id = w.job_id \
                     WHERE w.owner = $1 AND w.state = 'leased' AND j.state NOT IN {LIVE}"
                ),
                &[&owner],
            )
            .await?;
        tx.commit().await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// As `work::complete`; the job's row is locked first, so completions of one job (and its
    /// cancellation) take turns: the last attack's completion sees every other one, and no
    /// result lands after the job was seen cancelled.
    pub async fn complete(
        &self,
        it: &Claimed,
        owner: &str,
        row: Option<&StoredResult>,
        place: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> Result<Result<(), LostLease>, StoreError> {
        let now = now_ms();
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let live = tx
            .query_opt(&format!("SELECT 1 FROM jobs WHERE id = $1 AND state IN {LIVE} FOR UPDATE"), &[&it.job])
            .await?;
        let fenced = if live.is_some() {
            tx.execute(
                "UPDATE work_items SET state = 'done', owner = NULL, lease_until = NULL, done_by = $2, done_ms = $4 \
                 WHERE id = $1 AND owner = $2 AND lease_token = $3 AND state = 'leased'",
                &[&it.id, &owner, &it.token, &now],
            )
            .await?
        } else {
            0
        };
        if fenced == 0 {
            return Ok(Err(LostLease));
        }
        super::blocking(move || place().map_err(StoreError::Io)).await?;
        if let Some(r) = row {
            tx.execute(
                "INSERT INTO results (job_id, model, method, file, record, png, success, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                &[&it.job, &r.model, &r.method, &r.file, &r.record, &r.png, &r.success, &now],
            )
            .await?;
        }
        match it.kind {
            Kind::Attack => {
                tx.execute(UNBLOCK, &[&it.job]).await?;
            }
            Kind::Report => {
                tx.execute(
                    &format!("UPDATE jobs SET state = 'done', finished_ms = $2, error = NULL WHERE id = $1 AND state IN {LIVE}"),
                    &[&it.job, &now],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(Ok(()))
    }

    pub async fn release(&self, it: &Claimed, owner: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL, attempts = attempts - 1 \
             WHERE id = $1 AND owner = $2 AND lease_token = $3 AND state = 'leased'",
            &[&it.id, &owner, &it.token],
        )
        .await?;
        Ok(())
    }

    pub async fn rescue_expired(&self) -> Result<usize, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL \
                 WHERE state = 'leased' AND lease_until < $1",
                &[&now_ms()],
            )
            .await?;
        Ok(n as usize)
    }

    pub async fn leased(&self, job: &str) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let n: i64 = c
            .query_one("SELECT COUNT(*) FROM work_items WHERE job_id = $1 AND state = 'leased'", &[&job])
            .await?
            .get(0);
        Ok(n as u64)
    }

    pub async fn pending(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let n: i64 = c
            .query_one(
                &format!(
                    "SELECT COUNT(*) FROM work_items w JOIN jobs j ON j.id = w.job_id \
                     WHERE w.state = 'pending' AND j.state IN {LIVE}"
                ),
                &[],
            )
            .await?
            .get(0);
        Ok(n as u64)
    }

    pub async fn register(&self, me: &Me) -> Result<(), StoreError> {
        let c = self.client().await?;
        let now = now_ms();
        c.execute(
            "INSERT INTO instances (id, host, pid, started_ms, heartbeat_ms) VALUES ($1, $2, $3, $4, $4)",
            &[&me.id, &me.host, &i64::from(me.pid), &now],
        )
        .await?;
        Ok(())
    }

    /// Every recorded server with its last heartbeat.
    pub async fn instances(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let c = self.client().await?;
        let rows = c.query("SELECT id, heartbeat_ms FROM instances ORDER BY started_ms, id", &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn reap(&self, dead: &[String], resume: bool) -> Result<Vec<String>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let rows = tx
            .query(
                &format!(
                    "SELECT DISTINCT w.job_id FROM work_items w JOIN jobs j ON j.id = w.job_id \
                     WHERE w.owner = ANY($1) AND w.state = 'leased' AND j.state IN {LIVE} ORDER BY 1"
                ),
                &[&dead],
            )
            .await?;
        let jobs: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        tx.execute(
            "UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL \
             WHERE owner = ANY($1) AND state = 'leased'",
            &[&dead],
        )
        .await?;
        tx.execute("DELETE FROM instances WHERE id = ANY($1)", &[&dead]).await?;
        interrupt_or_resume(&tx, &jobs, resume).await?;
        tx.commit().await?;
        Ok(jobs)
    }

    pub async fn recover_alone(&self, me: &str, resume: bool) -> Result<Vec<String>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("DELETE FROM instances WHERE id != $1", &[&me]).await?;
        tx.execute(
            "UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL WHERE state = 'leased'",
            &[],
        )
        .await?;
        let rows = tx.query("SELECT id FROM jobs WHERE state = 'running' ORDER BY created_ms, id", &[]).await?;
        let running: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        interrupt_or_resume(&tx, &running, resume).await?;
        let rows = tx.query("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_ms, id", &[]).await?;
        tx.commit().await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// What the start-up sweep compares the folder with: every job's id, and every stored PNG
    /// with its result's key.
    pub async fn sweep_view(&self) -> Result<super::SweepView, StoreError> {
        let c = self.client().await?;
        let jobs = c.query("SELECT id FROM jobs", &[]).await?.iter().map(|r| r.get(0)).collect();
        let pngs = c
            .query("SELECT job_id, png, model, method, file FROM results WHERE png IS NOT NULL", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect();
        Ok(super::SweepView { jobs, pngs })
    }

    /// Removes the results whose PNG is gone (their items pending again) and reopens their
    /// `done` jobs; returns those.
    pub async fn drop_missing(&self, missing: &[super::MissingPng], resume: bool) -> Result<Vec<String>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let mut reopen = std::collections::BTreeSet::new();
        for m in missing {
            tx.execute("DELETE FROM results WHERE job_id = $1 AND png = $2", &[&m.job, &m.png]).await?;
            let n = tx
                .execute(
                    "UPDATE work_items SET state = 'pending', owner = NULL, lease_until = NULL, done_by = NULL, \
                     done_ms = NULL WHERE job_id = $1 AND kind = 'attack' AND model = $2 AND method = $3 AND file = $4",
                    &[&m.job, &m.model, &m.method, &m.file],
                )
                .await?;
            if n > 0 {
                tx.execute("UPDATE work_items SET state = 'blocked' WHERE job_id = $1 AND kind = 'report'", &[&m.job])
                    .await?;
            }
            reopen.insert(m.job.clone());
        }
        let mut reopened = Vec::new();
        for job in reopen {
            let changed = if resume {
                tx.execute(
                    "UPDATE jobs SET state = 'queued', resumed = resumed + 1 WHERE id = $1 AND state = 'done'",
                    &[&job],
                )
                .await?
            } else {
                tx.execute(
                    "UPDATE jobs SET state = 'interrupted', finished_ms = $2, error = $3 WHERE id = $1 AND state = 'done'",
                    &[&job, &now_ms(), &FILES_LOST],
                )
                .await?
            };
            if changed > 0 {
                reopened.push(job);
            }
        }
        tx.commit().await?;
        Ok(reopened)
    }
}

const UNBLOCK: &str = "UPDATE work_items SET state = 'pending' WHERE job_id = $1 AND kind = 'report' \
     AND state = 'blocked' AND NOT EXISTS \
     (SELECT 1 FROM work_items w WHERE w.job_id = $1 AND w.kind = 'attack' AND w.state != 'done')";

async fn interrupt_or_resume(
    tx: &deadpool_postgres::Transaction<'_>,
    jobs: &[String],
    resume: bool,
) -> Result<(), StoreError> {
    if resume {
        tx.execute(
            &format!("UPDATE jobs SET state = 'queued', resumed = resumed + 1 WHERE id = ANY($1) AND state IN {LIVE}"),
            &[&jobs],
        )
        .await?;
    } else {
        tx.execute(
            &format!(
                "UPDATE jobs SET state = 'interrupted', finished_ms = $2, error = $3 WHERE id = ANY($1) AND state IN {LIVE}"
            ),
            &[&jobs, &now_ms(), &STOPPED],
        )
        .await?;
    }
    Ok(())
}

const SELECT_JOB: &str = "SELECT j.id, j.spec, j.state, j.total, j.created_ms, j.started_ms, j.finished_ms, j.error, \
     j.resumed, (SELECT COUNT(*) FROM results r WHERE r.job_id = j.id), \
     (SELECT COUNT(*) FROM results r WHERE r.job_id = j.id AND r.success) FROM jobs j";

fn job_info(r: &Row) -> Result<JobInfo, StoreError> {
    RawJob {
        id: r.get(0),
        spec: r.get(1),
        state: r.get(2),
        total: r.get(3),
        created_ms: r.get(4),
        started_ms: r.get(5),
        finished_ms: r.get(6),
        error: r.get(7),
        resumed: r.get(8),
        done: r.get(9),
        successes: r.get(10),
    }
    .into_info()
}

/// The last ping's answer and when it came. The lock is held across the ping, so that callers
/// arriving meanwhile wait for its answer instead of pinging too; a caller that gives up (its
/// timeout) drops the ping and the next one pings afresh.
#[derive(Default)]
struct Recent(tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>);

impl Recent {
    async fn get_or(
        &self,
        stands: Duration,
        ping: impl std::future::Future<Output = Result<(), StoreError>>,
    ) -> Result<(), StoreError> {
        let mut last = self.0.lock().await;
        let answer = match &*last {
            Some((at, answer)) if at.elapsed() < stands => answer.clone(),
            _ => {
                let answer = ping.await.map_err(|e| e.to_string());
                *last = Some((std::time::Instant::now(), answer.clone()));
                answer
            }
        };
        answer.map_err(StoreError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Fifty probes at once cost one ping; a second later the next probe pings again, and a
    /// failed ping's answer stands as long as a good one's.
    #[tokio::test]
    async fn readiness_pings_are_shared_and_stand_for_their_time() {
        let recent = Recent::default();
        let pings = AtomicUsize::new(0);
        let ping = |ok: bool| {
            let pings = &pings;
            async move {
                pings.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                if ok { Ok(()) } else { Err(StoreError::Unavailable("refused".into())) }
            }
        };
        let stands = Duration::from_millis(300);
        let answers = futures::future::join_all((0..50).map(|_| recent.get_or(stands, ping(true)))).await;
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(pings.load(Ordering::SeqCst), 1);
        tokio::time::sleep(stands).await;
        assert!(recent.get_or(stands, ping(false)).await.is_err());
        assert!(recent.get_or(stands, ping(true)).await.is_err(), "the failed answer stands");
        assert_eq!(pings.load(Ordering::SeqCst), 2);
        tokio::time::sleep(stands).await;
        assert!(recent.get_or(stands, ping(true)).await.is_ok());
        assert_eq!(pings.load(Ordering::SeqCst), 3);
    }
}
