//! Engine counters: kept as atomics (for `labelfool doctor`, tests and benchmarks in-process) and
//! mirrored to the `metrics` facade (for Prometheus `/metrics`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::model::PassCounts;

#[derive(Debug, Default)]
pub struct EngineStats {
    /// Pass counters of every model loaded so far (unloaded ones keep counting in the totals).
    passes: std::sync::Mutex<Vec<Arc<PassCounts>>>,
    inflight_attacks: AtomicUsize,
    cancelled: AtomicU64,
    classify_batches: AtomicU64,
    attack_ticks: AtomicU64,
    ready: AtomicBool,
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StatsSnapshot {
    pub forward_passes: u64,
    pub backward_passes: u64,
    pub inflight_attacks: usize,
    pub cancelled_jobs: u64,
    pub classify_batches: u64,
    pub attack_ticks: u64,
}

impl EngineStats {
    pub(crate) fn add_passes(&self, passes: Arc<PassCounts>) {
        self.passes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(passes);
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub(crate) fn set_not_ready(&self) {
        self.ready.store(false, Ordering::SeqCst);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let (mut forward, mut backward) = (0, 0);
        for p in self.passes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            forward += p.forward.load(Ordering::Relaxed);
            backward += p.backward.load(Ordering::Relaxed);
        }
        StatsSnapshot {
            forward_passes: forward,
            backward_passes: backward,
            inflight_attacks: self.inflight_attacks.load(Ordering::Relaxed),
            cancelled_jobs: self.cancelled.load(Ordering::Relaxed),
            classify_batches: self.classify_batches.load(Ordering::Relaxed),
            attack_ticks: self.attack_ticks.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn classify_batch(&self, size: usize, compute: Duration) {
        self.classify_batches.fetch_add(1, Ordering::Relaxed);
        histogram!("labelfool_batch_size", "kind" => "classify").record(size as f64);
        histogram!("labelfool_batch_seconds", "kind" => "classify").record(compute.as_secs_f64());
    }

    pub(crate) fn attack_tick(&self, rows: usize, backward: usize, elapsed: Duration) {
        self.attack_ticks.fetch_add(1, Ordering::Relaxed);
        histogram!("labelfool_batch_size", "kind" => "attack").record(rows as f64);
        histogram!("labelfool_batch_seconds", "kind" => "attack").record(elapsed.as_secs_f64());
        counter!("labelfool_backward_passes_total").increment(backward as u64);
    }

    pub(crate) fn attack_admitted(&self) {
        let n = self.inflight_attacks.fetch_add(1, Ordering::Relaxed) + 1;
        gauge!("labelfool_inflight_attacks").set(n as f64);
    }

    pub(crate) fn attack_finished(&self) {
        let n = self.inflight_attacks.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        gauge!("labelfool_inflight_attacks").set(n as f64);
    }

    pub(crate) fn attack_done(&self, iterations: u32) {
        histogram!("labelfool_attack_iterations").record(f64::from(iterations));
        self.attack_finished();
    }

    pub(crate) fn cancelled(&self, n: usize) {
        if n > 0 {
            self.cancelled.fetch_add(n as u64, Ordering::Relaxed);
            counter!("labelfool_cancelled_jobs_total").increment(n as u64);
        }
    }

    pub(crate) fn set_inflight(&self, inflight: usize) {
        gauge!("labelfool_inflight_attacks").set(inflight as f64);
    }
}
