//! The worker: one OS thread that owns the device (its CUDA context) and every loaded model.
//! It dynamically batches single-pass jobs and continuously batches attacks: each loop iteration
//! runs the classify batches that are due, then ONE tick over all in-flight attack rows; rows
//! whose client has gone away are dropped before the tick, finished rows leave after it, and
//! newly arrived attacks join the next one.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Select};
use tch::{Device, Kind, Tensor};

use super::batcher::Batcher;
use super::queue::{AttackJob, ClassifyJob, ClassifyReply, Inbox, JobError, JobTimings};
use super::stats::EngineStats;
use crate::attack::{self, AttackRow, runner};
use crate::model::preprocess::rgb8_to_tensor;
use crate::model::{Catalog, LoadedModel, ModelError, device_name, tensor_rows};

/// Settings the worker needs, resolved from the config.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub device: crate::model::DeviceSpec,
    pub threads: usize,
    pub max_inflight_attacks: usize,
    pub max_attack_batch: usize,
}

/// What the worker reports once its models are loaded.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub device: String,
    pub threads: i32,
    pub cuda_available: bool,
}

/// How long an idle worker sleeps before looking at its queues again (it also wakes on any job).
const IDLE_WAKE: Duration = Duration::from_millis(500);

/// Where the worker reports the outcome of loading its models.
pub type ReadySignal = std::sync::mpsc::Receiver<Result<WorkerInfo, ModelError>>;

pub fn spawn(
    catalog: Catalog,
    settings: WorkerSettings,
    inbox: Inbox,
    stats: Arc<EngineStats>,
) -> std::io::Result<(std::thread::JoinHandle<()>, ReadySignal)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new().name("labelfool-worker".into()).spawn(move || {
        let worker = match Worker::load(catalog, settings, inbox, stats) {
            Ok(w) => w,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(worker.info.clone()));
        worker.run();
    })?;
    Ok((handle, ready_rx))
}

struct RowMeta {
    reply: tokio::sync::oneshot::Sender<Result<(attack::AttackOutcome, JobTimings), JobError>>,
    enqueued: Instant,
    started: Instant,
    compute: Duration,
    first_batch: usize,
}

/// In-flight attacks of one model: rows and their bookkeeping, index for index.
#[derive(Default)]
struct Group {
    rows: Vec<Box<dyn AttackRow>>,
    meta: Vec<RowMeta>,
}

struct Worker {
    models: Vec<LoadedModel>,
    device: Device,
    settings: WorkerSettings,
    inbox: Inbox,
    batcher: Batcher<ClassifyJob>,
    groups: Vec<Group>,
    stats: Arc<EngineStats>,
    info: WorkerInfo,
}

impl Worker {
    fn load(
        catalog: Catalog,
        settings: WorkerSettings,
        inbox: Inbox,
        stats: Arc<EngineStats>,
    ) -> Result<Self, ModelError> {
        if settings.threads > 0 {
            tch::set_num_threads(settings.threads as i32);
        }
        let device =
            settings.device.resolve().map_err(|reason| ModelError::Bundle { model: "(device)".into(), reason })?;
        let mut models = Vec::new();
        for info in catalog.iter() {
            let started = Instant::now();
            let m = LoadedModel::load(info.clone(), device)?;
            tracing::info!(model = %info.name, device = %device_name(device), ms = started.elapsed().as_millis() as u64, "model loaded");
            models.push(m);
        }
        stats.set_passes(models.iter().map(|m| m.passes.clone()).collect());
        // A limit of 0 means "what suits this device".
        let resolve = |n: usize| if n == 0 { crate::config::auto_batch(device) } else { n };
        let batcher = Batcher::new(
            catalog
                .iter()
                .map(|m| crate::model::BatchPolicy { max_size: resolve(m.batch.max_size), ..m.batch })
                .collect(),
        );
        let mut settings = settings;
        settings.max_attack_batch = resolve(settings.max_attack_batch);
        let groups = models.iter().map(|_| Group::default()).collect();
        let info = WorkerInfo {
            device: device_name(device),
            threads: tch::get_num_threads(),
            cuda_available: tch::Cuda::is_available(),
        };
        Ok(Self { models, device, settings, inbox, batcher, groups, stats, info })
    }

    fn inflight(&self) -> usize {
        self.groups.iter().map(|g| g.rows.len()).sum()
    }

    fn run(mut self) {
        let (mut classify_open, mut attack_open) = (true, true);
        loop {
            if self.inflight() == 0 {
                let wait = self
                    .batcher
                    .next_deadline()
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or(IDLE_WAKE);
                self.wait_for_work(wait, &mut classify_open, &mut attack_open);
            }
            self.drain(&mut classify_open, &mut attack_open);
            let closing = !classify_open && !attack_open;
            let cancelled = self.batcher.retain(|j| !j.reply.is_closed());
            self.stats.cancelled(cancelled);
            let flush = self.inflight() > 0 || closing;
            for (m, jobs) in self.batcher.take_due(Instant::now(), flush) {
                self.run_classify(m, jobs);
            }
            if self.inflight() > 0 {
                self.attack_tick();
            }
            self.stats.set_inflight(self.inflight());
            if closing && self.batcher.is_empty() && self.inflight() == 0 {
                tracing::info!("worker: queues closed and drained; exiting");
                return;
            }
        }
    }

    /// Blocks until a job arrives on either queue or `wait` passes.
    fn wait_for_work(&mut self, wait: Duration, classify_open: &mut bool, attack_open: &mut bool) {
        if !*classify_open && !*attack_open {
            return;
        }
        let mut sel = Select::new();
        let ci = classify_open.then(|| sel.recv(&self.inbox.classify));
        let ai = attack_open.then(|| sel.recv(&self.inbox.attack));
        let Ok(op) = sel.select_timeout(wait) else {
            return;
        };
        let i = op.index();
        if Some(i) == ci {
            match op.recv(&self.inbox.classify) {
                Ok(job) => self.batcher.push(job),
                Err(_) => *classify_open = false,
            }
        } else if Some(i) == ai {
            match op.recv(&self.inbox.attack) {
                Ok(job) => self.admit(job),
                Err(_) => *attack_open = false,
            }
        }
    }

    /// Takes every waiting classify job, and attacks while rows are free.
    fn drain(&mut self, classify_open: &mut bool, attack_open: &mut bool) {
        loop {
            match self.inbox.classify.try_recv() {
                Ok(job) => self.batcher.push(job),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    *classify_open = false;
                    break;
                }
            }
        }
        while self.inflight() < self.settings.max_inflight_attacks {
            match self.inbox.attack.recv_timeout(Duration::ZERO) {
                Ok(job) => self.admit(job),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    *attack_open = false;
                    break;
                }
            }
        }
    }

    fn admit(&mut self, mut job: AttackJob) {
        drop(job.permit.take());
        if job.reply.is_closed() {
            self.stats.cancelled(1);
            return;
        }
        let info = self.models[job.model].info.clone();
        let img = &job.image;
        let row = rgb8_to_tensor(&img.rgb, img.width, img.height)
            .and_then(|x| x.f_to_device(self.device))
            .map_err(JobError::from)
            .and_then(|x0| attack::new_row(info, x0, job.params).map_err(JobError::from));
        match row {
            Ok(row) => {
                let g = &mut self.groups[job.model];
                g.rows.push(row);
                g.meta.push(RowMeta {
                    reply: job.reply,
                    enqueued: job.enqueued,
                    started: Instant::now(),
                    compute: Duration::ZERO,
                    first_batch: 0,
                });
                self.stats.attack_admitted();
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }

    fn run_classify(&mut self, m: usize, mut jobs: Vec<ClassifyJob>) {
        for j in &mut jobs {
            drop(j.permit.take());
        }
        let (features, logits): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| j.want_features);
        // A features job is a fixed batch and runs alone; classify jobs share one pass.
        let batches = std::iter::once(logits).chain(features.into_iter().map(|j| vec![j]));
        for jobs in batches {
            if jobs.is_empty() {
                continue;
            }
            let started = Instant::now();
            let model = &self.models[m];
            let want_features = jobs[0].want_features;
            let outcome = guarded(|| classify_batch(model, &jobs, want_features));
            let compute = started.elapsed();
            self.stats.classify_batch(jobs.len(), compute);
            match outcome {
                Ok(outputs) => {
                    let n = jobs.len();
                    for (job, (probabilities, features)) in jobs.into_iter().zip(outputs) {
                        let timings =
                            JobTimings { queued: started.duration_since(job.enqueued), compute, batch_size: n };
                        let _ = job.reply.send(Ok(ClassifyReply { probabilities, features, timings }));
                    }
                }
                // One bad input must not fail its batch-mates: run each alone to find it.
                Err(_) if jobs.len() > 1 => {
                    for job in jobs {
                        self.run_classify(m, vec![job]);
                    }
                }
                Err(e) => {
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone_error()));
                    }
                }
            }
        }
    }

    fn attack_tick(&mut self) {
        for m in 0..self.groups.len() {
            let group = &mut self.groups[m];
            // Cancelled: the client disconnected or its deadline passed. Free the row now.
            for i in (0..group.rows.len()).rev() {
                if group.meta[i].reply.is_closed() {
                    group.rows.swap_remove(i);
                    group.meta.swap_remove(i);
                    self.stats.cancelled(1);
                    self.stats.attack_finished();
                }
            }
            let n = group.rows.len();
            let chunk = self.settings.max_attack_batch;
            let model = &self.models[m];
            let mut failed: Vec<(usize, JobError)> = Vec::new();
            for start in (0..n).step_by(chunk) {
                let end = (start + chunk).min(n);
                let started = Instant::now();
                let rows = &mut group.rows[start..end];
                let result = guarded(|| Ok(runner::tick(model, rows)));
                let elapsed = started.elapsed();
                match result {
                    Ok((errors, tick)) => {
                        self.stats.attack_tick(end - start, tick.backward_passes, elapsed);
                        for (k, e) in errors.into_iter().enumerate() {
                            if let Some(e) = e {
                                failed.push((start + k, JobError::Attack(e)));
                            }
                        }
                    }
                    Err(e) => failed.extend((start..end).map(|i| (i, e.clone_error()))),
                }
                for meta in &mut group.meta[start..end] {
                    meta.compute += elapsed;
                    if meta.first_batch == 0 {
                        meta.first_batch = end - start;
                    }
                }
            }
            failed.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
            for (i, e) in failed {
                group.rows.swap_remove(i);
                let meta = group.meta.swap_remove(i);
                let _ = meta.reply.send(Err(e));
                self.stats.attack_finished();
            }
            for i in (0..group.rows.len()).rev() {
                if !group.rows[i].is_done() {
                    continue;
                }
                let row = group.rows.swap_remove(i);
                let meta = group.meta.swap_remove(i);
                let iterations = row.iterations();
                let result = row.outcome().map_err(JobError::from).map(|o| {
                    let timings = JobTimings {
                        queued: meta.started.duration_since(meta.enqueued),
                        compute: meta.compute,
                        batch_size: meta.first_batch,
                    };
                    (o, timings)
                });
                self.stats.attack_done(iterations);
                let _ = meta.reply.send(result);
            }
        }
    }
}

impl JobError {
    fn clone_error(&self) -> JobError {
        match self {
            JobError::Torch(s) => JobError::Torch(s.clone()),
            JobError::Panic(s) => JobError::Panic(s.clone()),
            JobError::Attack(e) => JobError::Torch(e.to_string()),
            JobError::ShuttingDown => JobError::ShuttingDown,
        }
    }
}

/// Runs device work so that neither a libtorch error nor a panic escapes into the worker loop.
fn guarded<T>(f: impl FnOnce() -> Result<T, tch::TchError>) -> Result<T, JobError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(JobError::from(e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(error = %msg, "worker caught a panic; the job fails, the worker goes on");
            Err(JobError::Panic(msg))
        }
    }
}

/// Per job: its probabilities (classify) or its rows' features.
type Output = (Vec<f32>, Vec<Vec<f32>>);

/// One forward pass over the stacked inputs of `jobs`.
fn classify_batch(model: &LoadedModel, jobs: &[ClassifyJob], features: bool) -> Result<Vec<Output>, tch::TchError> {
    let s = model.info.input().size;
    let rows: usize = jobs.iter().map(|j| j.rows).sum();
    let mut flat = Vec::with_capacity(rows * (3 * s * s) as usize);
    for j in jobs {
        flat.extend_from_slice(&j.input);
    }
    let x = Tensor::f_from_slice(&flat)?.f_view([rows as i64, 3, s, s])?.f_to_device(model.device())?;
    tch::no_grad(|| {
        let mut out = if features {
            tensor_rows(&model.features(&x)?)?
        } else {
            tensor_rows(&model.forward(&x)?.f_softmax(-1, Kind::Float)?)?
        }
        .into_iter();
        Ok(jobs
            .iter()
            .map(|j| {
                let mine: Vec<Vec<f32>> = out.by_ref().take(j.rows).collect();
                if features { (Vec::new(), mine) } else { (mine.into_iter().next().unwrap_or_default(), Vec::new()) }
            })
            .collect())
    })
}
