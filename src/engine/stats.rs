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
    /// Per model, for the Open Inference Protocol's statistics extension.
    per_model: std::sync::Mutex<std::collections::BTreeMap<String, ModelCounters>>,
}

/// A count and the nanoseconds it took, as Triton's statistics report them.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Duration64 {
    pub count: u64,
    pub ns: u64,
}

impl Duration64 {
    fn add(&mut self, n: u64, d: Duration) {
        self.count += n;
        self.ns += u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    }
}

/// One model's inference counters (classifications; attacks are not inferences here).
#[derive(Debug, Clone, Default)]
pub struct ModelCounters {
    /// Images classified, and forward passes that did it (batches).
    pub inference_count: u64,
    pub execution_count: u64,
    /// Milliseconds since the epoch of the last classification.
    pub last_inference_ms: u64,
    pub success: Duration64,
    pub fail: Duration64,
    pub queue: Duration64,
    pub compute: Duration64,
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
    }

    /// Start-up has loaded its models (a model loaded later does not touch readiness, so a
    /// draining server stays not ready).
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    fn model<R>(&self, name: &str, f: impl FnOnce(&mut ModelCounters) -> R) -> R {
        let mut map = self.per_model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(map.entry(name.to_string()).or_default())
    }

    /// A classification answered: its whole time, its wait for the worker and its device time.
    pub(crate) fn model_success(&self, name: &str, total: Duration, queued: Duration, compute: Duration) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.model(name, |c| {
            c.inference_count += 1;
            c.last_inference_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
            c.success.add(1, total);
            c.queue.add(1, queued);
            c.compute.add(1, compute);
        });
    }

    pub(crate) fn model_failure(&self, name: &str, total: Duration) {
        self.model(name, |c| c.fail.add(1, total));
    }

    /// One forward pass of classifications for `name`.
    pub(crate) fn model_execution(&self, name: &str) {
        self.model(name, |c| c.execution_count += 1);
    }

    /// Counters of every model that has classified something.
    pub fn per_model(&self) -> Vec<(String, ModelCounters)> {
        let map = self.per_model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
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
