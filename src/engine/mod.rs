//! The engine: the async face of the worker. Handlers (and the CLI) call [`Engine`] methods with
//! image bytes and typed parameters; decoding and resizing run on tokio's blocking pool, tensor
//! work on the one worker thread (see [`worker`]), and results come back as plain Rust values.
//! No tch tensor ever crosses into async code.

pub mod batcher;
pub mod queue;
pub mod stats;
pub mod worker;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::attack::metrics::{Perturbation, perturbation};
use crate::attack::target::{self, TargetDecision, TargetParams};
use crate::attack::{AttackError, AttackOutcome, AttackParams, Method};
use crate::config::{AttackDefaults, Config};
use crate::imaging::{self, DecodeLimits, ImageError, Rgb8};
use crate::model::preprocess::{prepare_rgb8, resized_dims};
use crate::model::{Catalog, ModelError, ModelInfo};
use queue::{AttackJob, ClassifyJob, ClassifyReply, JobError, JobTimings, Queues, Refused};
pub use stats::{EngineStats, StatsSnapshot};
pub use worker::WorkerInfo;

/// Everything that can go wrong between a request and its answer. `http::error` maps each variant
/// to one status code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("invalid parameter `{param}`: {message}")]
    InvalidParam { param: String, message: String },
    /// The request would cost more than the configured bounds allow; refused before any work.
    #[error("too costly: `{param}`: {message}")]
    TooCostly { param: String, message: String },
    /// After the model's resize the image would be too long on one side.
    #[error(
        "the image is {width}×{height}: resized for model {model} it would be {resized_width}×{resized_height}; \
         the longest side after resize may be {limit} (limits.max_resized_side), so the aspect ratio may be at most {ratio:.1}:1"
    )]
    TooElongated {
        model: String,
        width: u32,
        height: u32,
        resized_width: i64,
        resized_height: i64,
        limit: u32,
        ratio: f64,
    },
    #[error("the {queue} queue is full; retry later")]
    QueueFull { queue: &'static str },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the request did not finish within its {0:?} deadline")]
    Deadline(Duration),
    #[error("{0}")]
    Job(#[from] JobError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidParam { param: param.into(), message: message.into() }
    }

    /// A refusal for cost, counted in `labelfool_requests_refused_total{reason="cost"}`.
    pub fn too_costly(param: &str, message: impl Into<String>) -> Self {
        metrics::counter!("labelfool_requests_refused_total", "reason" => "cost").increment(1);
        Self::TooCostly { param: param.into(), message: message.into() }
    }
}

/// Engine-wide settings taken from the config.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub decode: DecodeLimits,
    pub max_attack_pixels: u64,
    pub max_iter: u32,
    pub max_top_k: usize,
    pub max_resized_side: u32,
    pub max_candidates: usize,
    pub max_backward_passes: u64,
    pub attack: AttackDefaults,
}

struct Inner {
    catalog: Catalog,
    /// Bounds decoding/resizing on the blocking pool (see `engine.decode_threads`).
    decode_slots: tokio::sync::Semaphore,
    queues: RwLock<Option<Queues>>,
    settings: EngineSettings,
    stats: Arc<EngineStats>,
    worker: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Tells the worker to answer everything it holds `ShuttingDown` and exit.
    abort: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Resolves once the worker has loaded every model (or failed to).
pub struct Startup {
    ready: std::sync::mpsc::Receiver<Result<WorkerInfo, ModelError>>,
}

impl Startup {
    /// Blocks until the worker is ready; call from a blocking context.
    pub fn wait(self) -> Result<WorkerInfo, ModelError> {
        self.ready.recv().unwrap_or_else(|_| {
            Err(ModelError::Bundle {
                model: "(worker)".into(),
                reason: "the worker thread exited during start-up".into(),
            })
        })
    }
}

/// A decoded image's summary, as responses report it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ImageSummary {
    pub width: u32,
    pub height: u32,
    /// Format detected from the bytes (`png`, `jpeg`, …).
    pub format: String,
    pub has_alpha: bool,
}

impl From<&Rgb8> for ImageSummary {
    fn from(i: &Rgb8) -> Self {
        Self { width: i.width, height: i.height, format: i.format.to_string(), has_alpha: i.alpha.is_some() }
    }
}

/// Where a request's time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Timings {
    /// Decoding and resizing on the blocking pool.
    pub decode_ms: f64,
    /// Waiting for the worker.
    pub queue_ms: f64,
    /// Device work (for an attack: all ticks it took part in).
    pub compute_ms: f64,
    /// From the engine call to the answer.
    pub total_ms: f64,
    /// Jobs sharing the (first) batch with this one.
    pub batch_size: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Timings {
    fn new(decode: Duration, job: JobTimings, started: Instant) -> Self {
        Self {
            decode_ms: ms(decode),
            queue_ms: ms(job.queued),
            compute_ms: ms(job.compute),
            total_ms: ms(started.elapsed()),
            batch_size: job.batch_size,
        }
    }
}

pub struct Classification {
    pub model: Arc<ModelInfo>,
    pub image: ImageSummary,
    pub probabilities: Vec<f32>,
    pub timings: Timings,
}

impl Classification {
    /// The `k` most probable classes, most probable first (ties by index).
    pub fn top(&self, k: usize) -> Vec<(usize, f32)> {
        top_k(&self.probabilities, k)
    }
}

pub fn top_k(p: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<(usize, f32)> = p.iter().copied().enumerate().collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx.truncate(k);
    idx
}

pub struct TargetLabel {
    pub classification: Classification,
    pub params: TargetParams,
    pub decision: TargetDecision,
}

/// An attack request as the caller gives it; [`Engine::attack`] validates it against the model
/// and the configured limits.
#[derive(Debug, Clone, Default)]
pub struct AttackRequest {
    pub method: Option<String>,
    /// Class index, WordNet id or name.
    pub target: Option<String>,
    pub max_iter: Option<u32>,
    pub overshoot: Option<f64>,
    pub delta1: Option<f64>,
    pub delta2: Option<f64>,
    /// FGSM step size(s) on the [0,1] pixel scale; several = search for the smallest that fools.
    pub epsilons: Option<Vec<f64>>,
    pub candidates: Option<usize>,
    pub lambda: Option<f64>,
}

/// FGSM's default search: 0.5/255 … 32/255.
pub const DEFAULT_EPSILONS: [f64; 11] = [0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0];

pub struct AttackResult {
    pub model: Arc<ModelInfo>,
    pub image: ImageSummary,
    pub outcome: AttackOutcome,
    pub perturbation: Perturbation,
    pub png: Vec<u8>,
    pub timings: Timings,
}

impl Engine {
    /// Validates the catalog against the config, spawns the worker and returns at once; the
    /// worker loads the models in the background (see [`Startup::wait`]).
    pub fn start(config: &Config, catalog: Catalog) -> Result<(Self, Startup), EngineError> {
        let settings = EngineSettings {
            decode: DecodeLimits::from_config(&config.limits),
            max_attack_pixels: config.limits.max_attack_pixels,
            max_iter: config.limits.max_iter,
            max_top_k: config.limits.max_top_k,
            max_resized_side: config.limits.max_resized_side,
            max_candidates: config.limits.max_candidates,
            max_backward_passes: config.limits.max_backward_passes,
            attack: config.attack.clone(),
        };
        let (queues, inbox) = queue::new(config.engine.queue_capacity);
        let stats = Arc::new(EngineStats::default());
        let ws = worker::WorkerSettings {
            device: config.device(),
            threads: config.engine.threads,
            max_inflight_attacks: config.engine.max_inflight_attacks,
            max_attack_batch: config.engine.max_attack_batch,
            max_inflight_attack_pixels: config.engine.max_inflight_attack_pixels,
        };
        let abort = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (handle, ready) = worker::spawn(catalog.clone(), ws, inbox, stats.clone(), abort.clone())
            .map_err(|e| EngineError::Internal(format!("cannot start the worker thread: {e}")))?;
        let decode_threads = match config.engine.decode_threads {
            0 => std::thread::available_parallelism().map(usize::from).unwrap_or(1),
            n => n,
        };
        let inner = Inner {
            catalog,
            decode_slots: tokio::sync::Semaphore::new(decode_threads),
            queues: RwLock::new(Some(queues)),
            settings,
            stats,
            worker: std::sync::Mutex::new(Some(handle)),
            abort,
        };
        Ok((Self { inner: Arc::new(inner) }, Startup { ready }))
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.inner.settings
    }

    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    /// Jobs waiting for the worker (classify, attack); 0 once shut down.
    pub fn queue_depths(&self) -> (usize, usize) {
        self.inner.queues.read().ok().and_then(|q| q.as_ref().map(Queues::depths)).unwrap_or((0, 0))
    }

    pub fn is_ready(&self) -> bool {
        self.inner.stats.is_ready() && self.inner.queues.read().map(|q| q.is_some()).unwrap_or(false)
    }

    /// Stops taking jobs; the worker finishes what it holds and exits. Returns once it has.
    pub fn shutdown(&self) {
        self.close_queues();
        let handle = self.inner.worker.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Like [`Self::shutdown`], but returns after `limit` at the latest: false when the worker
    /// was still busy then (its thread ends with the process).
    pub fn shutdown_within(&self, limit: Duration) -> bool {
        self.close_queues();
        let handle = self.inner.worker.lock().ok().and_then(|mut h| h.take());
        let Some(h) = handle else { return true };
        let started = Instant::now();
        while !h.is_finished() {
            if started.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = h.join();
        true
    }

    /// The shutdown grace is over: the worker answers every job it holds or that waits for it
    /// with `ShuttingDown` (HTTP 503) at its next pass boundary and exits; new jobs are refused.
    pub fn abort(&self) {
        self.inner.abort.store(true, std::sync::atomic::Ordering::SeqCst);
        self.close_queues();
    }

    fn close_queues(&self) {
        self.inner.stats.set_not_ready();
        if let Ok(mut q) = self.inner.queues.write() {
            q.take();
        }
    }

    /// Marks the engine not ready (for `/ready`) while it keeps serving what is in flight.
    pub fn begin_drain(&self) {
        self.inner.stats.set_not_ready();
    }

    pub fn model(&self, name: Option<&str>) -> Result<(usize, Arc<ModelInfo>), EngineError> {
        self.inner
            .catalog
            .get(name)
            .map(|(i, m)| (i, m.clone()))
            .ok_or_else(|| EngineError::UnknownModel(name.unwrap_or_default().to_string()))
    }

    /// Refuses an image whose resize for `info` would make a side longer than
    /// `limits.max_resized_side` (checked right after the header is read, before any tensor).
    fn check_resize(&self, info: &ModelInfo, width: u32, height: u32) -> Result<(), EngineError> {
        let limit = self.inner.settings.max_resized_side;
        let (rh, rw) = resized_dims(i64::from(height), i64::from(width), info.input().resize_short_side);
        if rh.max(rw) > i64::from(limit) {
            return Err(EngineError::TooElongated {
                model: info.name.clone(),
                width,
                height,
                resized_width: rw,
                resized_height: rh,
                limit,
                ratio: f64::from(limit) / info.input().resize_short_side as f64,
            });
        }
        Ok(())
    }

    fn queues(&self) -> Result<Queues, EngineError> {
        self.inner.queues.read().ok().and_then(|q| q.clone()).ok_or(EngineError::ShuttingDown)
    }

    async fn decode(&self, bytes: Bytes, info: &ModelInfo) -> Result<(Rgb8, Duration), EngineError> {
        let limits = self.inner.settings.decode;
        let started = Instant::now();
        let (width, height) = imaging::dimensions(&bytes, &limits)?;
        self.check_resize(info, width, height)?;
        let _slot = self.inner.decode_slots.acquire().await.map_err(|_| EngineError::ShuttingDown)?;
        let img = tokio::task::spawn_blocking(move || imaging::decode(&bytes, &limits))
            .await
            .map_err(|e| EngineError::Internal(format!("decode task failed: {e}")))??;
        Ok((img, started.elapsed()))
    }

    async fn await_reply<T>(
        rx: oneshot::Receiver<Result<T, JobError>>,
        deadline: Duration,
        started: Instant,
    ) -> Result<T, EngineError> {
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, rx).await {
            Err(_) => Err(EngineError::Deadline(deadline)),
            Ok(Err(_)) => Err(EngineError::ShuttingDown),
            Ok(Ok(r)) => r.map_err(EngineError::from),
        }
    }

    /// Probabilities for one image. Decoding and resizing run on the blocking pool; the forward
    /// pass is batched with whatever else waits for the same model.
    pub async fn classify(
        &self,
        model: Option<&str>,
        bytes: Bytes,
        deadline: Duration,
    ) -> Result<Classification, EngineError> {
        let started = Instant::now();
        let (idx, info) = self.model(model)?;
        let limits = self.inner.settings.decode;
        let spec = info.input().clone();
        let (width, height) = imaging::dimensions(&bytes, &limits)?;
        self.check_resize(&info, width, height)?;
        let slot = self.inner.decode_slots.acquire().await.map_err(|_| EngineError::ShuttingDown)?;
        let (img, input) = tokio::task::spawn_blocking(move || -> Result<_, EngineError> {
            crate::model::single_threaded_torch_here();
            let img = imaging::decode(&bytes, &limits)?;
            let x = prepare_rgb8(&img.rgb, img.width, img.height, &spec).map_err(|e| EngineError::Job(e.into()))?;
            let n = x.numel();
            let mut v = vec![0f32; n];
            x.f_copy_data(&mut v, n).map_err(|e| EngineError::Job(e.into()))?;
            Ok((img, v))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("decode task failed: {e}")))??;
        drop(slot);
        let decode = started.elapsed();
        let reply = self.submit_classify(idx, input, false, deadline, started).await?;
        Ok(Classification {
            image: ImageSummary::from(&img),
            model: info,
            probabilities: reply.probabilities,
            timings: Timings::new(decode, reply.timings, started),
        })
    }

    /// Probabilities for an input already preprocessed to the model's size (`3×S×S`, RGB in
    /// [0,1], CHW) — the Open Inference Protocol's FP32 input. Batched like [`Self::classify`].
    pub async fn classify_tensor(
        &self,
        model: Option<&str>,
        input: Vec<f32>,
        deadline: Duration,
    ) -> Result<Vec<f32>, EngineError> {
        let started = Instant::now();
        let (idx, info) = self.model(model)?;
        let s = info.input().size as usize;
        if input.len() != 3 * s * s {
            return Err(EngineError::invalid("input", format!("{} values; the model takes 3×{s}×{s}", input.len())));
        }
        if input.iter().any(|v| !v.is_finite()) {
            return Err(EngineError::invalid("input", "values must be finite"));
        }
        Ok(self.submit_classify(idx, input, false, deadline, started).await?.probabilities)
    }

    async fn submit_classify(
        &self,
        model: usize,
        input: Vec<f32>,
        want_features: bool,
        deadline: Duration,
        started: Instant,
    ) -> Result<ClassifyReply, EngineError> {
        let (tx, rx) = oneshot::channel();
        let rows = input.len() / (3 * self.inner.catalog.by_index(model).input().size.pow(2) as usize).max(1);
        let job = ClassifyJob { model, input, rows, want_features, reply: tx, enqueued: Instant::now(), permit: None };
        self.queues()?.push_classify(job).map_err(|r| match r {
            Refused::Full => EngineError::QueueFull { queue: "classify" },
            Refused::Closed => EngineError::ShuttingDown,
        })?;
        Self::await_reply(rx, deadline, started).await
    }

    /// Pooled features (the model's `features` method) for a fixed batch of images, in one pass
    /// that no other job joins, so the numbers do not depend on what else the server is doing.
    /// One result per image: images that cannot be decoded come back as errors.
    pub async fn features(
        &self,
        model: Option<&str>,
        images: Vec<Bytes>,
        deadline: Duration,
    ) -> Result<Vec<Result<Vec<f32>, ImageError>>, EngineError> {
        let started = Instant::now();
        let (idx, info) = self.model(model)?;
        let limits = self.inner.settings.decode;
        let spec = info.input().clone();
        let max_resized = self.inner.settings.max_resized_side;
        let slot = self.inner.decode_slots.acquire().await.map_err(|_| EngineError::ShuttingDown)?;
        let prepared = tokio::task::spawn_blocking(move || {
            crate::model::single_threaded_torch_here();
            images
                .iter()
                .map(|bytes| {
                    let (w, h) = imaging::dimensions(bytes, &limits)?;
                    let (rh, rw) = resized_dims(i64::from(h), i64::from(w), spec.resize_short_side);
                    if rh.max(rw) > i64::from(max_resized) {
                        return Err(ImageError::Undecodable {
                            format: "image",
                            reason: format!(
                                "{w}×{h} resizes to {rw}×{rh}, over limits.max_resized_side = {max_resized}"
                            ),
                        });
                    }
                    let img = imaging::decode(bytes, &limits)?;
                    let x = prepare_rgb8(&img.rgb, img.width, img.height, &spec)
                        .map_err(|e| ImageError::Undecodable { format: img.format, reason: e.to_string() })?;
                    let n = x.numel();
                    let mut v = vec![0f32; n];
                    x.f_copy_data(&mut v, n)
                        .map_err(|e| ImageError::Undecodable { format: img.format, reason: e.to_string() })?;
                    Ok(v)
                })
                .collect::<Vec<Result<Vec<f32>, ImageError>>>()
        })
        .await
        .map_err(|e| EngineError::Internal(format!("decode task failed: {e}")))?;
        drop(slot);
        let input: Vec<f32> = prepared.iter().filter_map(|r| r.as_ref().ok()).flatten().copied().collect();
        let mut features = if input.is_empty() {
            Vec::new()
        } else {
            self.submit_classify(idx, input, true, deadline, started).await?.features
        }
        .into_iter();
        Ok(prepared.into_iter().map(|r| r.map(|_| features.next().unwrap_or_default())).collect())
    }

    /// LabelFool's target decision for an image (paper Eq. 2–4).
    pub async fn target_label(
        &self,
        model: Option<&str>,
        bytes: Bytes,
        delta1: Option<f64>,
        delta2: Option<f64>,
        alternatives: usize,
        deadline: Duration,
    ) -> Result<TargetLabel, EngineError> {
        let (_, info) = self.model(model)?;
        let params = self.target_params(delta1, delta2)?;
        if info.matrix.is_none() {
            return Err(EngineError::invalid("model", format!("model {} has no distance matrix", info.name)));
        }
        let classification = self.classify(Some(&info.name), bytes, deadline).await?;
        let matrix = info.matrix.as_ref().ok_or_else(|| EngineError::Internal("matrix vanished".into()))?;
        let decision = target::select(&classification.probabilities, matrix, params, alternatives);
        Ok(TargetLabel { classification, params, decision })
    }

    pub fn target_params(&self, delta1: Option<f64>, delta2: Option<f64>) -> Result<TargetParams, EngineError> {
        let d = &self.inner.settings.attack;
        let delta1 = delta1.unwrap_or(d.delta1);
        let delta2 = delta2.unwrap_or(d.delta2);
        if !(delta1.is_finite() && delta1 > 0.0 && delta1 <= 1.0) {
            return Err(EngineError::invalid("delta1", format!("{delta1} is not in (0, 1]")));
        }
        if !(delta2.is_finite() && (0.0..1.0).contains(&delta2)) {
            return Err(EngineError::invalid("delta2", format!("{delta2} is not in [0, 1)")));
        }
        Ok(TargetParams { delta1, delta2 })
    }

    /// Checks an attack request against the model and the limits.
    pub fn attack_params(&self, info: &ModelInfo, req: &AttackRequest) -> Result<AttackParams, EngineError> {
        let s = &self.inner.settings;
        let method = match req.method.as_deref() {
            None => Method::Labelfool,
            Some(m) => Method::parse(m).ok_or_else(|| {
                let known: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
                EngineError::invalid("method", format!("{m:?} is not one of {}", known.join(", ")))
            })?,
        };
        let max_iter = req.max_iter.unwrap_or(s.attack.max_iter);
        if max_iter == 0 || max_iter > s.max_iter {
            return Err(EngineError::invalid("max_iter", format!("{max_iter} is not in 1..={}", s.max_iter)));
        }
        let overshoot = req.overshoot.unwrap_or(s.attack.overshoot);
        if !(overshoot.is_finite() && (0.0..=10.0).contains(&overshoot)) {
            return Err(EngineError::invalid("overshoot", format!("{overshoot} is not a number in [0, 10]")));
        }
        let target = match req.target.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(info.classes().resolve(t).ok_or_else(|| {
                EngineError::invalid(
                    "target",
                    format!("{t:?} is not a class of model {} (give an index, WordNet id or name)", info.name),
                )
            })?),
        };
        if req.target.is_some() && method == Method::Sparsefool {
            return Err(EngineError::invalid("target", "sparsefool is untargeted"));
        }
        let epsilons = match &req.epsilons {
            None => DEFAULT_EPSILONS.iter().map(|e| e / 255.0).collect(),
            Some(list) => {
                let mut list = list.clone();
                if list.is_empty() || list.len() > 64 || list.iter().any(|e| !(e.is_finite() && *e > 0.0 && *e <= 1.0))
                {
                    return Err(EngineError::invalid("epsilon", "1 to 64 values in (0, 1] (pixel scale)"));
                }
                list.sort_by(f64::total_cmp);
                list.dedup();
                list
            }
        };
        let candidates = req.candidates.unwrap_or(10);
        if candidates < 2 || candidates > info.num_classes() {
            return Err(EngineError::invalid(
                "candidates",
                format!("{candidates} is not in 2..={}", info.num_classes()),
            ));
        }
        if candidates > s.max_candidates {
            return Err(EngineError::too_costly(
                "candidates",
                format!(
                    "{candidates} candidates cost {} backward passes per step; at most {} are allowed (limits.max_candidates)",
                    candidates - 1,
                    s.max_candidates
                ),
            ));
        }
        let lambda = req.lambda.unwrap_or(3.0);
        if !(lambda.is_finite() && lambda > 0.0 && lambda <= 100.0) {
            return Err(EngineError::invalid("lambda", format!("{lambda} is not in (0, 100]")));
        }
        let params = AttackParams {
            method,
            max_iter,
            overshoot,
            epsilons,
            candidates,
            lambda,
            target_params: self.target_params(req.delta1, req.delta2)?,
            margins: s.attack.margins.clone(),
            target,
        };
        let cost = params.max_backward_passes();
        if cost > s.max_backward_passes {
            return Err(EngineError::too_costly(
                "max_iter",
                format!(
                    "{} with max_iter={max_iter} and candidates={candidates} may take {cost} backward passes; \
                     at most {} are allowed (limits.max_backward_passes)",
                    method.name(),
                    s.max_backward_passes
                ),
            ));
        }
        Ok(params)
    }

    /// Runs an attack on the image at its original size and returns the 8-bit PNG it delivers,
    /// with what happened.
    pub async fn attack(
        &self,
        model: Option<&str>,
        bytes: Bytes,
        req: AttackRequest,
        deadline: Duration,
    ) -> Result<AttackResult, EngineError> {
        let started = Instant::now();
        let (idx, info) = self.model(model)?;
        let params = self.attack_params(&info, &req)?;
        // The attack's tensors live at the upload's size: refuse from the header, before decoding.
        let (width, height) = imaging::dimensions(&bytes, &self.inner.settings.decode)?;
        if u64::from(width) * u64::from(height) > self.inner.settings.max_attack_pixels {
            return Err(ImageError::TooManyPixels {
                width,
                height,
                limit: self.inner.settings.max_attack_pixels,
                side: self.inner.settings.decode.max_side,
            }
            .into());
        }
        let (img, decode) = self.decode(bytes, &info).await?;
        let img = Arc::new(img);
        let (tx, rx) = oneshot::channel();
        let job =
            AttackJob { model: idx, image: img.clone(), params, reply: tx, enqueued: Instant::now(), permit: None };
        self.queues()?.push_attack(job).map_err(|r| match r {
            Refused::Full => EngineError::QueueFull { queue: "attack" },
            Refused::Closed => EngineError::ShuttingDown,
        })?;
        let (outcome, job_timings) = Self::await_reply(rx, deadline, started).await.map_err(|e| match e {
            EngineError::Job(JobError::Attack(AttackError::TargetIsPrediction { index, .. })) => EngineError::invalid(
                "target",
                format!(
                    "class {index} ({}) is already the prediction; choose another target",
                    info.classes().label(index)
                ),
            ),
            EngineError::Job(JobError::Attack(AttackError::NoMatrix(m))) => {
                EngineError::invalid("target", format!("model {m} has no distance matrix: pass an explicit target"))
            }
            other => other,
        })?;
        let (png, perturbation) = tokio::task::spawn_blocking({
            let img = img.clone();
            let rgb = outcome.rgb.clone();
            move || -> Result<_, ImageError> {
                let png = imaging::encode_png(img.width, img.height, &rgb, img.alpha.as_deref())?;
                Ok((png, perturbation(img.width, img.height, &img.rgb, &rgb)))
            }
        })
        .await
        .map_err(|e| EngineError::Internal(format!("encode task failed: {e}")))??;
        Ok(AttackResult {
            model: info,
            image: ImageSummary::from(img.as_ref()),
            outcome,
            perturbation,
            png,
            timings: Timings::new(decode, job_timings, started),
        })
    }
}
