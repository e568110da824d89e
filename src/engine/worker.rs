//! The worker: one OS thread that owns the device (its CUDA context) and every loaded model.
//! It dynamically batches single-pass jobs and continuously batches attacks: each loop iteration
//! runs the classify batches that are due, then ONE tick over all in-flight attack rows; rows
//! whose client has gone away are dropped before the tick, finished rows leave after it, and
//! newly arrived attacks join the next one.
//!
//! Fairness: classify work waits for at most one pass, not one tick. Between an attack tick's
//! passes (the checks, the forward, each backward, each chunk) the runner hands control back and
//! the worker runs whatever classify batches have arrived. Bounds: attacks are admitted while
//! rows are free *and* their pixels fit `engine.max_inflight_attack_pixels`; on abort (the
//! shutdown grace is over) every job still held is answered `ShuttingDown` and the thread exits.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Select};
use tch::{Device, Kind, Tensor};

use super::batcher::Batcher;
use super::queue::{AttackJob, ClassifyJob, ClassifyReply, Control, Inbox, JobTimings, WorkerError};
use super::stats::EngineStats;
use crate::attack::{self, AttackRow, runner};
use crate::model::preprocess::rgb8_to_tensor;
use crate::model::{Catalog, LoadedModel, ModelError, device_name, read_module, tensor_rows};

/// Loaded models by catalog index; None: not loaded (yet, or any more).
type Models = [Option<LoadedModel>];

/// Settings the worker needs, resolved from the config.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub device: crate::model::DeviceSpec,
    pub threads: usize,
    pub max_inflight_attacks: usize,
    pub max_attack_batch: usize,
    pub max_inflight_attack_pixels: u64,
    pub jit_fuser: bool,
    pub jit_optimize: bool,
    pub batch_padding: crate::config::BatchPadding,
    pub batch_resize: crate::config::BatchResize,
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
    catalog: Arc<Catalog>,
    settings: WorkerSettings,
    inbox: Inbox,
    stats: Arc<EngineStats>,
    abort: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<(std::thread::JoinHandle<()>, ReadySignal)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new().name("labelfool-worker".into()).spawn(move || {
        let worker = match Worker::load(catalog, settings, inbox, stats, abort) {
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
    reply: tokio::sync::oneshot::Sender<Result<(attack::AttackOutcome, JobTimings), WorkerError>>,
    enqueued: Instant,
    started: Instant,
    compute: Duration,
    first_batch: usize,
    /// The image's width × height, counted against `max_inflight_attack_pixels`.
    pixels: u64,
    /// The request's span: the row's log lines carry its `request_id`.
    span: tracing::Span,
    progress: Option<tokio::sync::watch::Sender<attack::Progress>>,
}

/// In-flight attacks of one model: rows and their bookkeeping, index for index.
#[derive(Default)]
struct Group {
    rows: Vec<Box<dyn AttackRow>>,
    meta: Vec<RowMeta>,
}

/// Single-pass work: the inbox it arrives on and the batcher that holds it until it is due.
struct ClassifyLane {
    inbox: crossbeam_channel::Receiver<ClassifyJob>,
    batcher: Batcher<ClassifyJob>,
    open: bool,
}

impl ClassifyLane {
    /// Takes every waiting job into the batcher; drops the ones whose client has gone.
    fn pull(&mut self, stats: &EngineStats) {
        loop {
            match self.inbox.try_recv() {
                Ok(job) => self.batcher.push(job),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.open = false;
                    break;
                }
            }
        }
        stats.cancelled(self.batcher.retain(|j| !j.reply.is_closed()));
    }

    /// Runs the batches due now (every waiting job when `flush`).
    fn run_due(&mut self, models: &Models, stats: &EngineStats, flush: bool) {
        for (m, jobs) in self.batcher.take_due(Instant::now(), flush) {
            run_classify(models, stats, m, jobs);
        }
    }
}

struct Worker {
    catalog: Arc<Catalog>,
    models: Vec<Option<LoadedModel>>,
    control: crossbeam_channel::Receiver<Control>,
    control_tx: crossbeam_channel::Sender<Control>,
    device: Device,
    settings: WorkerSettings,
    attack_inbox: crossbeam_channel::Receiver<AttackJob>,
    attack_open: bool,
    /// An attack taken from the queue that did not fit the pixel budget yet.
    waiting: Option<AttackJob>,
    classify: ClassifyLane,
    groups: Vec<Group>,
    stats: Arc<EngineStats>,
    abort: tokio::sync::watch::Receiver<bool>,
    info: WorkerInfo,
}

impl Worker {
    fn load(
        catalog: Arc<Catalog>,
        settings: WorkerSettings,
        inbox: Inbox,
        stats: Arc<EngineStats>,
        abort: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self, ModelError> {
        if settings.threads > 0 {
            tch::set_num_threads(settings.threads as i32);
        }
        crate::model::configure_jit(settings.jit_fuser, settings.jit_optimize)
            .map_err(|e| ModelError::Bundle { model: "(jit)".into(), reason: e.to_string() })?;
        let device =
            settings.device.resolve().map_err(|reason| ModelError::Bundle { model: "(device)".into(), reason })?;
        let mut settings = settings;
        settings.max_attack_batch = by_device(settings.max_attack_batch, device);
        let mut models: Vec<Option<LoadedModel>> = (0..catalog.len()).map(|_| None).collect();
        for (i, info, fatal) in catalog.startup_loads() {
            let started = Instant::now();
            match LoadedModel::load(info.clone(), device).and_then(|m| prepare(m, &settings, &catalog, i, device)) {
                Ok(m) => {
                    tracing::info!(model = %info.name, device = %device_name(device), ms = started.elapsed().as_millis() as u64, "model loaded");
                    stats.add_passes(m.passes.clone());
                    catalog.publish(i, Ok(Some(m.info.clone())));
                    models[i] = Some(m);
                }
                Err(e) if fatal => return Err(e),
                Err(e) => {
                    tracing::warn!(model = %info.name, error = %e, "repository model failed to load");
                    catalog.publish(i, Err(e.to_string()));
                }
            }
        }
        stats.set_ready();
        let batcher = Batcher::new((0..catalog.len()).map(|i| batch_policy(&catalog, i, device)).collect());
        let groups = models.iter().map(|_| Group::default()).collect();
        let info = WorkerInfo {
            device: device_name(device),
            threads: tch::get_num_threads(),
            cuda_available: tch::Cuda::is_available(),
        };
        let classify = ClassifyLane { inbox: inbox.classify, batcher, open: true };
        Ok(Self {
            catalog,
            models,
            control: inbox.control,
            control_tx: inbox.control_tx,
            device,
            settings,
            attack_inbox: inbox.attack,
            attack_open: true,
            waiting: None,
            classify,
            groups,
            stats,
            abort,
            info,
        })
    }

    fn inflight(&self) -> usize {
        self.groups.iter().map(|g| g.rows.len()).sum()
    }

    fn inflight_pixels(&self) -> u64 {
        self.groups.iter().flat_map(|g| &g.meta).map(|m| m.pixels).sum()
    }

    fn run(mut self) {
        loop {
            if *self.abort.borrow() {
                self.abort_all();
                return;
            }
            if self.inflight() == 0 && self.waiting.is_none() {
                let wait = self
                    .classify
                    .batcher
                    .next_deadline()
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or(IDLE_WAKE);
                self.wait_for_work(wait);
            }
            self.pull_control();
            self.classify.pull(&self.stats);
            self.admit_attacks();
            let closing = !self.classify.open && !self.attack_open;
            let flush = self.inflight() > 0 || closing;
            self.classify.run_due(&self.models, &self.stats, flush);
            if self.inflight() > 0 {
                self.attack_tick();
            }
            self.stats.set_inflight(self.inflight());
            if closing && self.classify.batcher.is_empty() && self.inflight() == 0 && self.waiting.is_none() {
                tracing::info!("worker: queues closed and drained; exiting");
                return;
            }
        }
    }

    /// The shutdown grace is over: answer every job still held or queued, and stop.
    fn abort_all(&mut self) {
        let mut answered = 0usize;
        for g in &mut self.groups {
            for meta in g.meta.drain(..) {
                let _ = meta.reply.send(Err(WorkerError::ShuttingDown));
                answered += 1;
            }
            g.rows.clear();
        }
        for job in self.waiting.take().into_iter().chain(self.attack_inbox.try_iter()) {
            let _ = job.reply.send(Err(WorkerError::ShuttingDown));
            answered += 1;
        }
        self.classify.pull(&self.stats);
        for (_, jobs) in self.classify.batcher.take_due(Instant::now(), true) {
            for job in jobs {
                let _ = job.reply.send(Err(WorkerError::ShuttingDown));
                answered += 1;
            }
        }
        self.stats.set_inflight(0);
        tracing::warn!(answered, "worker: shutdown grace over; unfinished jobs answered 503");
    }

    /// Blocks until a job arrives on either queue or `wait` passes.
    fn wait_for_work(&mut self, wait: Duration) {
        if !self.classify.open && !self.attack_open {
            return;
        }
        let mut sel = Select::new();
        let ci = self.classify.open.then(|| sel.recv(&self.classify.inbox));
        let ai = self.attack_open.then(|| sel.recv(&self.attack_inbox));
        let ki = sel.recv(&self.control);
        let Ok(op) = sel.select_timeout(wait) else {
            return;
        };
        let i = op.index();
        if Some(i) == ci {
            match op.recv(&self.classify.inbox) {
                Ok(job) => self.classify.batcher.push(job),
                Err(_) => self.classify.open = false,
            }
        } else if Some(i) == ai {
            match op.recv(&self.attack_inbox) {
                Ok(job) => self.waiting = Some(job),
                Err(_) => self.attack_open = false,
            }
        } else if i == ki
            && let Ok(c) = op.recv(&self.control)
        {
            self.handle_control(c);
        }
    }

    fn pull_control(&mut self) {
        while let Ok(c) = self.control.try_recv() {
            self.handle_control(c);
        }
    }

    /// Makes room for catalog slots added since start-up (a repository model found later).
    fn grow_to(&mut self, n: usize) {
        while self.models.len() < n {
            let i = self.models.len();
            self.classify.batcher.add_model(batch_policy(&self.catalog, i, self.device));
            self.models.push(None);
            self.groups.push(Group::default());
        }
    }

    fn handle_control(&mut self, c: Control) {
        match c {
            Control::Load { model, info, reply } => {
                self.grow_to(model + 1);
                let back = self.control_tx.clone();
                let started = Instant::now();
                // The slow part (reading and unpickling the file) runs off this thread.
                let spawned = std::thread::Builder::new().name("labelfool-model-read".into()).spawn({
                    let info = info.clone();
                    move || {
                        let module = read_module(&info).map_err(|e| e.to_string());
                        let _ = back.send(Control::Read { model, info, module, started, reply });
                    }
                });
                if let Err(e) = spawned {
                    self.catalog.publish(model, Err(format!("cannot start a thread to read the model: {e}")));
                }
            }
            Control::Read { model, info, module, started, reply } => {
                let name = info.name.clone();
                let loaded = module.and_then(|module| {
                    guarded(|| {
                        Ok(LoadedModel::from_module(info, module, self.device)
                            .and_then(|m| prepare(m, &self.settings, &self.catalog, model, self.device)))
                    })
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                });
                match loaded {
                    Ok(m) => {
                        tracing::info!(model = %name, ms = started.elapsed().as_millis() as u64, "model loaded");
                        self.stats.add_passes(m.passes.clone());
                        self.catalog.publish(model, Ok(Some(m.info.clone())));
                        self.models[model] = Some(m);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        tracing::warn!(model = %name, error = %e, "model failed to load");
                        self.catalog.publish(model, Err(e.clone()));
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Control::Unload { model, reply } => {
                // Classifications admitted while it was ready still run; attacks on it end now.
                self.classify.pull(&self.stats);
                self.classify.run_due(&self.models, &self.stats, true);
                let name = self.catalog.name_of(model);
                if let Some(g) = self.groups.get_mut(model) {
                    for meta in g.meta.drain(..) {
                        let _ = meta.reply.send(Err(WorkerError::ModelUnloaded(name.clone())));
                        self.stats.attack_finished();
                    }
                    g.rows.clear();
                }
                if let Some(slot) = self.models.get_mut(model) {
                    *slot = None;
                }
                tracing::info!(model = %name, "model unloaded");
                self.catalog.publish(model, Ok(None));
                let _ = reply.send(());
            }
        }
    }

    /// Admits attacks while rows are free and their pixels fit the budget (one always fits when
    /// nothing is in flight, so a single large image is never starved).
    fn admit_attacks(&mut self) {
        let budget = self.settings.max_inflight_attack_pixels;
        while self.inflight() < self.settings.max_inflight_attacks {
            let job = match self.waiting.take() {
                Some(job) => job,
                None => match self.attack_inbox.recv_timeout(Duration::ZERO) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.attack_open = false;
                        break;
                    }
                },
            };
            let pixels = u64::from(job.image.width) * u64::from(job.image.height);
            if self.inflight() > 0 && !job.reply.is_closed() && self.inflight_pixels() + pixels > budget {
                self.waiting = Some(job);
                break;
            }
            self.admit(job);
        }
    }

    fn admit(&mut self, mut job: AttackJob) {
        drop(job.permit.take());
        if job.reply.is_closed() {
            job.span.in_scope(|| tracing::info!("attack cancelled before it started: the client has gone"));
            self.stats.cancelled(1);
            return;
        }
        let Some(info) = self.models.get(job.model).and_then(Option::as_ref).map(|m| m.info.clone()) else {
            let _ = job.reply.send(Err(WorkerError::ModelUnloaded(self.catalog.name_of(job.model))));
            return;
        };
        let (model_name, method) = (info.name.clone(), job.params.method.name());
        let img = &job.image;
        let row = rgb8_to_tensor(&img.rgb, img.width, img.height)
            .and_then(|x| x.f_to_device(self.device))
            .map_err(WorkerError::from)
            .and_then(|x0| attack::new_row(info, x0, job.params).map_err(WorkerError::from));
        match row {
            Ok(row) => {
                job.span.in_scope(|| {
                    tracing::debug!(model = %model_name, method, width = img.width, height = img.height, "attack admitted")
                });
                let g = &mut self.groups[job.model];
                g.rows.push(row);
                g.meta.push(RowMeta {
                    reply: job.reply,
                    enqueued: job.enqueued,
                    started: Instant::now(),
                    compute: Duration::ZERO,
                    first_batch: 0,
                    pixels: u64::from(img.width) * u64::from(img.height),
                    span: job.span,
                    progress: job.progress,
                });
                self.stats.attack_admitted();
            }
            Err(e) => {
                job.span.in_scope(|| tracing::warn!(error = %e, "attack could not start"));
                let _ = job.reply.send(Err(e));
            }
        }
    }

    fn attack_tick(&mut self) {
        let Worker { models, groups, classify, stats, settings, abort, .. } = self;
        let models: &Models = models;
        let stats: &EngineStats = stats;
        for (m, group) in groups.iter_mut().enumerate() {
            // Cancelled: the client disconnected or its deadline passed. Free the row now.
            for i in (0..group.rows.len()).rev() {
                if group.meta[i].reply.is_closed() {
                    group.rows.swap_remove(i);
                    let meta = group.meta.swap_remove(i);
                    meta.span
                        .in_scope(|| tracing::info!("attack row freed: the client has gone or its deadline passed"));
                    stats.cancelled(1);
                    stats.attack_finished();
                }
            }
            let n = group.rows.len();
            let chunk = settings.max_attack_batch;
            let Some(model) = models.get(m).and_then(Option::as_ref) else { continue };
            let mut failed: Vec<(usize, WorkerError)> = Vec::new();
            // Between passes: serve the classify work that has arrived meanwhile.
            let mut between = || {
                if *abort.borrow() {
                    return false;
                }
                classify.pull(stats);
                classify.run_due(models, stats, true);
                true
            };
            for start in (0..n).step_by(chunk) {
                if *abort.borrow() {
                    break;
                }
                let end = (start + chunk).min(n);
                let started = Instant::now();
                let rows = &mut group.rows[start..end];
                let result = guarded(|| Ok(runner::tick_with(model, rows, &mut between)));
                let elapsed = started.elapsed();
                match result {
                    Ok((errors, tick)) => {
                        stats.attack_tick(end - start, tick.backward_passes, elapsed);
                        for (k, e) in errors.into_iter().enumerate() {
                            if let Some(e) = e {
                                failed.push((start + k, WorkerError::Attack(e)));
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
            for (row, meta) in group.rows.iter().zip(&group.meta) {
                if let Some(tx) = &meta.progress {
                    let p = row.progress();
                    tx.send_if_modified(|v| {
                        let changed = *v != p;
                        *v = p;
                        changed
                    });
                }
            }
            failed.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
            for (i, e) in failed {
                group.rows.swap_remove(i);
                let meta = group.meta.swap_remove(i);
                meta.span.in_scope(|| tracing::warn!(error = %e, "attack failed"));
                let _ = meta.reply.send(Err(e));
                stats.attack_finished();
            }
            for i in (0..group.rows.len()).rev() {
                if !group.rows[i].is_done() {
                    continue;
                }
                let row = group.rows.swap_remove(i);
                let meta = group.meta.swap_remove(i);
                let iterations = row.iterations();
                let result = row.outcome().map_err(WorkerError::from).map(|o| {
                    let timings = JobTimings {
                        queued: meta.started.duration_since(meta.enqueued),
                        compute: meta.compute,
                        batch_size: meta.first_batch,
                    };
                    (o, timings)
                });
                stats.attack_done(iterations);
                meta.span.in_scope(|| match &result {
                    Ok((o, t)) => tracing::info!(
                        iterations,
                        checks = o.checks,
                        success = o.success,
                        compute_ms = t.compute.as_secs_f64() * 1e3,
                        "attack finished"
                    ),
                    Err(e) => tracing::warn!(error = %e, "attack ended without a result"),
                });
                let _ = meta.reply.send(result);
            }
        }
    }
}

/// Sets model `i`'s attack resize path and batch padding and, when it pads, runs its padded
/// batch sizes once (up to the larger of its classify batch and the attack batch).
fn prepare(
    mut m: LoadedModel,
    settings: &WorkerSettings,
    catalog: &Catalog,
    i: usize,
    device: Device,
) -> Result<LoadedModel, ModelError> {
    // An optimisation: a probe that fails leaves the op, and the model loads.
    match m.apply_batch_resize(settings.batch_resize) {
        Ok(Some((per_row, matrix))) => {
            tracing::info!(model = %m.info.name, per_row_s = per_row, matrix_s = matrix, chose = ?m.batch_resize(), "attack resize path timed")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(model = %m.info.name, error = %e, "attack resize probe failed; resizing row by row"),
    }
    if !settings.batch_padding.pads_on(device.is_cuda()) {
        return Ok(m);
    }
    m.set_batch_padding(true);
    let started = Instant::now();
    let rows = batch_policy(catalog, i, device).max_size.max(settings.max_attack_batch);
    let sizes = m.warm_up(rows)?;
    tracing::info!(model = %m.info.name, ?sizes, ms = started.elapsed().as_millis() as u64, "padded batch sizes warmed up");
    Ok(m)
}

/// A limit of 0 means "what suits this device".
fn by_device(n: usize, device: Device) -> usize {
    if n == 0 { crate::config::auto_batch(device.is_cuda()) } else { n }
}

/// Model `i`'s batching policy, its size limit resolved for `device`.
fn batch_policy(catalog: &Catalog, i: usize, device: Device) -> crate::model::BatchPolicy {
    let p = catalog.batch_policy(i);
    crate::model::BatchPolicy { max_size: by_device(p.max_size, device), ..p }
}

/// Runs one model's classify jobs (one pass; a failing batch is retried job by job).
fn run_classify(models: &Models, stats: &EngineStats, m: usize, mut jobs: Vec<ClassifyJob>) {
    for j in &mut jobs {
        drop(j.permit.take());
    }
    let Some(model) = models.get(m).and_then(Option::as_ref) else {
        for job in jobs {
            let _ = job.reply.send(Err(WorkerError::ModelUnloaded(format!("#{m}"))));
        }
        return;
    };
    let (features, logits): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| j.want_features);
    // A features job is a fixed batch and runs alone; classify jobs share one pass.
    let batches = std::iter::once(logits).chain(features.into_iter().map(|j| vec![j]));
    for jobs in batches {
        if jobs.is_empty() {
            continue;
        }
        let started = Instant::now();
        let want_features = jobs[0].want_features;
        let outcome = guarded(|| classify_batch(model, &jobs, want_features));
        stats.model_execution(&model.info.name);
        let compute = started.elapsed();
        stats.classify_batch(jobs.len(), compute);
        match outcome {
            Ok(outputs) => {
                let n = jobs.len();
                for (job, (probabilities, features)) in jobs.into_iter().zip(outputs) {
                    let timings = JobTimings { queued: started.duration_since(job.enqueued), compute, batch_size: n };
                    job.span.in_scope(|| {
                        tracing::debug!(batch = n, compute_ms = compute.as_secs_f64() * 1e3, "classified on the worker")
                    });
                    let _ = job.reply.send(Ok(ClassifyReply { probabilities, features, timings }));
                }
            }
            // One bad input must not fail its batch-mates: run each alone to find it.
            Err(_) if jobs.len() > 1 => {
                for job in jobs {
                    run_classify(models, stats, m, vec![job]);
                }
            }
            Err(e) => {
                for job in jobs {
                    job.span.in_scope(|| tracing::warn!(error = %e, "classify failed on the worker"));
                    let _ = job.reply.send(Err(e.clone_error()));
                }
            }
        }
    }
}

impl WorkerError {
    fn clone_error(&self) -> WorkerError {
        match self {
            WorkerError::Torch(s) => WorkerError::Torch(s.clone()),
            WorkerError::Panic(s) => WorkerError::Panic(s.clone()),
            WorkerError::Attack(e) => WorkerError::Torch(e.to_string()),
            WorkerError::ShuttingDown => WorkerError::ShuttingDown,
            WorkerError::ModelUnloaded(s) => WorkerError::ModelUnloaded(s.clone()),
        }
    }
}

/// Runs device work so that neither a libtorch error nor a panic escapes into the worker loop.
fn guarded<T>(f: impl FnOnce() -> Result<T, tch::TchError>) -> Result<T, WorkerError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(WorkerError::from(e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(error = %msg, "worker caught a panic; the job fails, the worker goes on");
            Err(WorkerError::Panic(msg))
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
