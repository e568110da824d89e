//! Deleting jobs for good: `DELETE /jobs/{id}?purge=true` and `jobs.retention_days`. The rows
//! go first (one transaction, refused while a study uses the job), then the folder: a crash
//! between the two leaves a folder with no row, which the start-up sweep removes. A running job
//! is cancelled first, and its folder removed only once no server holds an item of it.

use std::time::Duration;

use super::store::blocking;
use super::{JobError, Jobs, StoreError};

/// How long a purge waits for a cancelled job's runner to stop (an attack in flight finishes
/// its current step first).
const STOP_WAIT: Duration = Duration::from_secs(60);

/// The longest wait between two retention passes.
const RETENTION_PERIOD: Duration = Duration::from_secs(3600);

impl Jobs {
    /// Cancels the job if it is queued or running, then deletes its rows, results and folder.
    /// Refused (409, naming them) while a study uses it.
    pub async fn purge(&self, id: &str) -> Result<(), JobError> {
        let job = self.get(id).await?;
        let studies = self.store().studies_of(id).await?;
        if !studies.is_empty() {
            return Err(in_use(id, &studies));
        }
        // Even an ended job may still have items on servers that have not heard yet (they
        // stop at their next renewal): its folder goes only once none is held.
        self.stop(id, !job.state.is_terminal()).await?;
        let studies = self.store().delete_job(id).await?;
        if !studies.is_empty() {
            return Err(in_use(id, &studies));
        }
        self.events().remove(id);
        let dir = self.job_dir(id);
        blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io(e)),
            _ => Ok(()),
        })
        .await?;
        tracing::info!(job = %id, "job purged");
        Ok(())
    }

    /// Cancels the job if it is `live`, and waits until no server holds an item of it (within
    /// [`STOP_WAIT`]): a server that died holds its items until it is reaped or its lease runs
    /// out.
    async fn stop(&self, id: &str, live: bool) -> Result<(), JobError> {
        if live {
            match self.cancel(id).await {
                Ok(_) | Err(JobError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let started = tokio::time::Instant::now();
        loop {
            if self.store().leased(id).await? == 0 {
                return Ok(());
            }
            if started.elapsed() > STOP_WAIT {
                return Err(JobError::Conflict(format!("job {id} is still stopping; try again")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Purges the finished jobs older than `jobs.retention_days` that no study uses; returns
    /// how many went.
    pub async fn purge_expired(&self) -> usize {
        let days = self.inner.config.retention_days;
        if days <= 0.0 {
            return 0;
        }
        let before = super::store::now_ms() - (days * 86_400_000.0) as i64;
        let ids = match self.store().expired(before).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %e, "cannot list expired jobs");
                return 0;
            }
        };
        let mut purged = 0;
        for id in ids {
            match self.purge(&id).await {
                Ok(()) => purged += 1,
                Err(e) => tracing::warn!(job = %id, error = %e, "cannot purge an expired job"),
            }
        }
        if purged > 0 {
            tracing::info!(purged, retention_days = days, "finished jobs past their retention purged");
        }
        purged
    }
}

/// Purges expired jobs every hour (after the pass at start-up) — or every `retention_days` if
/// that is shorter (at most once a second), so no job outlives its retention by more than that.
pub fn spawn_retention(jobs: Jobs) {
    let days = jobs.inner.config.retention_days;
    if days <= 0.0 {
        return;
    }
    let period = Duration::from_secs_f64((days * 86_400.0).max(1.0)).min(RETENTION_PERIOD);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            jobs.purge_expired().await;
        }
    });
}

fn in_use(id: &str, studies: &[(String, String)]) -> JobError {
    let names: Vec<String> = studies.iter().map(|(s, name)| format!("{s} ({name:?})")).collect();
    JobError::Conflict(format!(
        "job {id} is used by {}: {}; delete the study first",
        if names.len() == 1 { "a study" } else { "studies" },
        names.join(", ")
    ))
}
