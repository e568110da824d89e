//! Dynamic batching policy: per model, a queue of waiting single-pass jobs is run when it is full
//! (`max_batch_size`), when its oldest job has waited `max_batch_wait`, or when the worker must not
//! idle (attacks are in flight, or the server drains for shutdown).

use std::collections::VecDeque;
use std::time::Instant;

use crate::model::BatchPolicy;

/// What the batcher needs to know of a job.
pub trait Batchable {
    fn model(&self) -> usize;
    fn enqueued(&self) -> Instant;
}

impl Batchable for super::queue::ClassifyJob {
    fn model(&self) -> usize {
        self.model
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
}

pub struct Batcher<J> {
    pending: Vec<VecDeque<J>>,
    policies: Vec<BatchPolicy>,
}

impl<J: Batchable> Batcher<J> {
    pub fn new(policies: Vec<BatchPolicy>) -> Self {
        Self { pending: policies.iter().map(|_| VecDeque::new()).collect(), policies }
    }

    /// A model added after start-up.
    pub fn add_model(&mut self, policy: BatchPolicy) {
        self.policies.push(policy);
        self.pending.push(VecDeque::new());
    }

    pub fn push(&mut self, job: J) {
        let m = job.model();
        self.pending[m].push_back(job);
    }

    pub fn len(&self) -> usize {
        self.pending.iter().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.iter().all(VecDeque::is_empty)
    }

    /// Every batch that is due at `now` (all waiting jobs when `flush`), at most `max_size` each.
    pub fn take_due(&mut self, now: Instant, flush: bool) -> Vec<(usize, Vec<J>)> {
        let mut out = Vec::new();
        for (m, queue) in self.pending.iter_mut().enumerate() {
            let policy = self.policies[m];
            loop {
                let due = match queue.front() {
                    None => false,
                    Some(oldest) => {
                        flush
                            || queue.len() >= policy.max_size
                            || now.duration_since(oldest.enqueued()) >= policy.max_wait
                    }
                };
                if !due {
                    break;
                }
                let n = queue.len().min(policy.max_size);
                out.push((m, queue.drain(..n).collect()));
            }
        }
        out
    }

    /// When the earliest waiting batch falls due if no more jobs arrive.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.iter().zip(&self.policies).filter_map(|(q, p)| q.front().map(|j| j.enqueued() + p.max_wait)).min()
    }

    /// Drops waiting jobs for which `keep` is false (their clients have gone away).
    pub fn retain(&mut self, mut keep: impl FnMut(&J) -> bool) -> usize {
        let before = self.len();
        for q in &mut self.pending {
            q.retain(&mut keep);
        }
        before - self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct J(usize, Instant);
    impl Batchable for J {
        fn model(&self) -> usize {
            self.0
        }
        fn enqueued(&self) -> Instant {
            self.1
        }
    }

    fn batcher() -> Batcher<J> {
        let p = BatchPolicy { max_size: 3, max_wait: Duration::from_millis(10) };
        Batcher::new(vec![p, p])
    }

    #[test]
    fn full_batches_go_at_once_and_stragglers_wait() {
        let t0 = Instant::now();
        let mut b = batcher();
        for _ in 0..4 {
            b.push(J(0, t0));
        }
        let due = b.take_due(t0, false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1.len(), 3, "a full batch is due immediately");
        assert!(b.take_due(t0 + Duration::from_millis(5), false).is_empty(), "the straggler waits");
        assert_eq!(b.next_deadline(), Some(t0 + Duration::from_millis(10)));
        let late = b.take_due(t0 + Duration::from_millis(10), false);
        assert_eq!(late[0].1.len(), 1, "…until its wait is over");
        assert!(b.is_empty());
    }

    #[test]
    fn flush_and_models_are_separate() {
        let t0 = Instant::now();
        let mut b = batcher();
        b.push(J(0, t0));
        b.push(J(1, t0));
        b.push(J(1, t0));
        let due = b.take_due(t0, true);
        let sizes: Vec<(usize, usize)> = due.iter().map(|(m, v)| (*m, v.len())).collect();
        assert_eq!(sizes, vec![(0, 1), (1, 2)], "never mixes models");
        b.push(J(1, t0));
        b.push(J(1, t0));
        assert_eq!(b.retain(|_| false), 2);
        assert!(b.next_deadline().is_none());
    }
}
