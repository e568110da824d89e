//! Live progress (`/jobs/{id}/events`), whichever server does the work. A server publishes
//! each item it finishes at once (with the attack that finished); a job somebody follows is
//! also re-read every `jobs.poll_ms`, so the items other servers sharing the database finish,
//! and its end wherever it comes, reach the stream too. Polling, not a notification channel:
//! SQLite has none, and a re-read after any gap is needed anyway.

use std::collections::HashMap;

use tokio::sync::broadcast;

use super::{FinishedAttack, JobEvent, JobInfo, JobState, Jobs};

/// One followed job's stream and what it last carried.
pub struct Channel {
    tx: broadcast::Sender<JobEvent>,
    last: (JobState, u64),
}

impl Jobs {
    /// The followed jobs' channels (the lock survives a panic elsewhere: the map stays whole).
    pub(super) fn events(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.inner.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Progress of a job from now on (None once it is finished and nobody publishes).
    pub fn subscribe(&self, id: &str) -> broadcast::Receiver<JobEvent> {
        let mut events = self.events();
        // A channel nobody listens to carries nothing: a request for a missing or finished job
        // leaves one behind, and without this every such request would keep one for good.
        events.retain(|_, ch| ch.tx.receiver_count() > 0);
        if let Some(ch) = events.get(id) {
            return ch.tx.subscribe();
        }
        let (tx, rx) = broadcast::channel(256);
        events.insert(id.to_string(), Channel { tx, last: (JobState::Queued, u64::MAX) });
        tokio::spawn(poll(self.clone(), id.to_string()));
        rx
    }

    /// Channels held for progress subscribers (one per job somebody follows).
    pub fn event_channels(&self) -> usize {
        self.events().len()
    }

    /// Sends the job as it stands to its followers, if any; after its last event (or once
    /// nobody follows) its channel closes: subscribers still read what it holds.
    pub(super) fn publish(&self, job: &JobInfo, last: Option<FinishedAttack>) {
        let mut events = self.events();
        if let Some(ch) = events.get_mut(&job.id) {
            ch.last = (job.state, job.done);
            let _ = ch.tx.send(JobEvent::of(job, last));
            if job.state.is_terminal() || ch.tx.receiver_count() == 0 {
                events.remove(&job.id);
            }
        }
    }

    /// Whether somebody follows the job (a finished item is read back only then).
    pub(super) fn followed(&self, id: &str) -> bool {
        self.events().contains_key(id)
    }

    /// The last (state, done) the job's channel carried; None once it is closed.
    fn last_sent(&self, id: &str) -> Option<(JobState, u64)> {
        let events = self.events();
        events.get(id).filter(|ch| ch.tx.receiver_count() > 0).map(|ch| ch.last)
    }
}

/// Re-reads a followed job every `jobs.poll_ms` and publishes what changed, until its channel
/// closes (the job ended, or nobody follows it).
async fn poll(jobs: Jobs, id: String) {
    let period = jobs.poll_period();
    loop {
        tokio::time::sleep(period).await;
        let Some(last) = jobs.last_sent(&id) else {
            jobs.events().retain(|_, ch| ch.tx.receiver_count() > 0);
            return;
        };
        match jobs.get(&id).await {
            Ok(job) if (job.state, job.done) != last => jobs.publish(&job, None),
            Ok(_) => {}
            // Purged, or the store is unreachable for now: the stream ends with its last word.
            Err(super::JobError::NotFound(_)) => {
                jobs.events().remove(&id);
                return;
            }
            Err(e) => tracing::debug!(job = %id, error = %e, "progress: cannot read the job"),
        }
    }
}
