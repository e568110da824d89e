//! This server's place among the servers that share a jobs database: its identity, the lock
//! file that tells the others it is alive, and the tick that renews its leases, stops its items
//! of jobs that ended elsewhere and frees the items of servers that died.
//!
//! Liveness on one host (SQLite) is the kernel's word, not a clock's: each server holds an
//! exclusive `flock` on `<database>.instances/<id>.lock` for as long as it runs, and the lock
//! goes with the process however it ends. A server that finds another's lock free reaps it at
//! once — a restarted server resumes its predecessor's job without waiting for a lease to run
//! out. Across hosts (PostgreSQL) it is the heartbeat, renewed with the leases: a server silent
//! for a lease is dead. The lease is also the fallback for a server that hangs while alive.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::store::{Me, blocking, now_ms};
use super::{Jobs, StoreError};

/// This server, as the others see it.
pub struct Instance {
    pub id: String,
    probe: Probe,
    _lock: Option<File>,
}

/// Tells whether other servers run (cloned into blocking code): by their lock files beside a
/// SQLite database (one host), or by their heartbeats in PostgreSQL (any host: a server whose
/// heartbeat is older than a lease is dead).
#[derive(Clone)]
pub struct Probe {
    dir: Option<PathBuf>,
    me: String,
    lease_ms: i64,
}

impl Instance {
    /// A new identity. Beside a SQLite database (`db`), alive for as long as this process
    /// holds its lock file; on PostgreSQL, for as long as its heartbeat is fresh.
    pub fn new(db: Option<&Path>, lease_ms: i64) -> std::io::Result<Self> {
        let id = super::new_id();
        let Some(db) = db else {
            return Ok(Self { probe: Probe { dir: None, me: id.clone(), lease_ms }, id, _lock: None });
        };
        let mut name = db.file_name().unwrap_or_default().to_os_string();
        name.push(".instances");
        let dir = db.with_file_name(name);
        std::fs::create_dir_all(&dir)?;
        let lock = File::create(dir.join(format!("{id}.lock")))?;
        lock.try_lock().map_err(std::io::Error::from)?;
        Ok(Self { probe: Probe { dir: Some(dir), me: id.clone(), lease_ms }, id, _lock: Some(lock) })
    }

    pub fn probe(&self) -> Probe {
        self.probe.clone()
    }

    /// This server as `instances` records it.
    pub fn record(&self) -> Me {
        Me { id: self.id.clone(), host: host(), pid: std::process::id() }
    }
}

impl Probe {
    /// Whether the server `id` (last heartbeat `heartbeat_ms`) still runs. A lock found free
    /// is removed.
    pub fn is_alive(&self, id: &str, heartbeat_ms: i64) -> bool {
        if id == self.me {
            return true;
        }
        let Some(dir) = &self.dir else { return now_ms() - heartbeat_ms <= self.lease_ms };
        let path = dir.join(format!("{id}.lock"));
        let Ok(file) = File::open(&path) else { return false };
        match file.try_lock() {
            Err(TryLockError::WouldBlock) => true,
            Ok(()) => {
                let _ = std::fs::remove_file(&path);
                false
            }
            Err(TryLockError::Error(_)) => false,
        }
    }

    /// The recorded servers that no longer run.
    pub fn dead(&self, recorded: &[(String, i64)]) -> Vec<String> {
        recorded.iter().filter(|(id, hb)| !self.is_alive(id, *hb)).map(|(id, _)| id.clone()).collect()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(dir) = &self.probe.dir {
            let _ = std::fs::remove_file(dir.join(format!("{}.lock", self.id)));
        }
    }
}

/// The host's name, recorded with each server (for operators reading `instances`).
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// Every third of a lease: renew this server's leases, stop its items of jobs that ended (on
/// whichever server they were cancelled), free expired leases and reap dead servers.
pub fn spawn_tick(jobs: Jobs) {
    let period = Duration::from_millis((jobs.lease_ms() / 3).max(100) as u64);
    let lease = Duration::from_millis(jobs.lease_ms() as u64);
    tokio::spawn(async move {
        let me = jobs.instance().record();
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(period).await;
            // After an outage every server's heartbeat is stale: one whose own renewals failed
            // for a lease reaps nobody until the others have had a round to renew theirs.
            let in_touch = renewed.elapsed() < lease;
            match tick(&jobs, &me, in_touch).await {
                Ok(()) => renewed = tokio::time::Instant::now(),
                Err(e) => tracing::warn!(error = %e, "jobs: lease upkeep failed; trying again"),
            }
        }
    });
}

async fn tick(jobs: &Jobs, me: &Me, reap: bool) -> Result<(), StoreError> {
    let store = jobs.store();
    let ended = store.renew(me, jobs.held_ids(), jobs.lease_ms()).await?;
    jobs.stop_items(&ended);
    let rescued = store.rescue_expired().await?;
    if rescued > 0 {
        tracing::warn!(rescued, "jobs: items whose lease ran out are pending again");
    }
    if !reap {
        return Ok(());
    }
    let recorded = store.instances().await?;
    let probe = jobs.instance().probe();
    let dead = blocking(move || Ok::<_, StoreError>(probe.dead(&recorded))).await?;
    if !dead.is_empty() {
        let hit = store.reap(dead.clone(), jobs.config().resume).await?;
        tracing::info!(servers = ?dead, jobs = ?hit, "jobs: servers that died were reaped; their items are pending again");
        jobs.wake();
    }
    Ok(())
}
