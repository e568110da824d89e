//! The engine: the async face of the worker. Handlers (and the CLI) call [`Engine`] methods with
//! image bytes and typed parameters; decoding and resizing run on tokio's blocking pool, tensor
//! work on the one worker thread (see [`worker`]), and results come back as plain Rust values.
//! No tch tensor ever crosses into async code.

pub mod batcher;
pub mod error;
pub mod queue;
pub mod results;
pub mod stats;
pub mod worker;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

pub use crate::attack::AttackRequest;
use crate::attack::params::{self, AttackLimits};
use crate::attack::target::{self, TargetParams};
use crate::attack::{AttackError, AttackOutcome, AttackParams};
use crate::config::{AttackDefaults, Config};
use crate::imaging::metrics::perturbation;
use crate::imaging::{self, DecodeLimits, ImageError, Rgb8};
use crate::model::preprocess::{model_input, resize_within};
use crate::model::{Catalog, LoadTicket, ModelEntry, ModelError, ModelInfo};
pub use error::EngineError;
use queue::{AttackJob, ClassifyJob, ClassifyReply, Control, Queues, WorkerError};
pub use results::{
    AttackResult, Classification, FloatReference, ImageSummary, TargetLabel, Timings, TransferCheck, TransferVerdict,
    top_k,
};
pub use stats::{EngineStats, StatsSnapshot};
pub use worker::WorkerInfo;

/// How long a load or unload request waits for the worker (a load that takes longer still
/// finishes; its state says so).
const MODEL_LOAD_DEADLINE: Duration = Duration::from_secs(600);

/// Deadline of offline work (CLI, eval, matrix builds): effectively none.
pub const OFFLINE_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// Engine-wide settings taken from the config.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub decode: DecodeLimits,
    pub max_attack_pixels: u64,
    pub max_top_k: usize,
    pub max_resized_side: u32,
    pub attack_limits: AttackLimits,
    pub attack: AttackDefaults,
}

struct Inner {
    catalog: Arc<Catalog>,
    /// Bounds decoding, resizing, and a finished attack's PNG and metrics on the blocking pool
    /// (see `engine.decode_threads`).
    decode_slots: tokio::sync::Semaphore,
    /// The slots a finished attack's PNG and metrics hold while they run side by side (2, or 1
    /// when there is one).
    post_slots: u32,
    queues: RwLock<Option<Queues>>,
    settings: EngineSettings,
    stats: Arc<EngineStats>,
    worker: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set once the shutdown grace is over: the worker answers everything it holds
    /// `ShuttingDown` and exits, and callers waiting on a reply answer at once, whatever pass the
    /// worker is inside.
    aborted: tokio::sync::watch::Sender<bool>,
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

/// The model's input for a decoded image (resize, centre crop, `3×S×S` in [0,1]).
fn input_of(img: &Rgb8, spec: &crate::model::InputSpec) -> Result<Vec<f32>, EngineError> {
    model_input(&img.rgb, img.width, img.height, spec)
        .map_err(|e| EngineError::Model(format!("preprocessing failed: {e}")))
}

/// An upload decoded once: every attack, check and remote query a request makes reads these
/// pixels; the bytes stay for what needs the file itself (a remote that takes the encoded image).
#[derive(Clone)]
pub struct Upload {
    pub bytes: Bytes,
    pub image: Arc<Rgb8>,
    /// What decoding took; each attack's timings report it.
    pub decode: Duration,
}

impl Engine {
    /// Validates the catalog against the config, spawns the worker and returns at once; the
    /// worker loads the models in the background (see [`Startup::wait`]).
    pub fn start(config: &Config, catalog: Catalog) -> Result<(Self, Startup), EngineError> {
        let catalog = Arc::new(catalog);
        let settings = EngineSettings {
            decode: DecodeLimits::from_config(&config.limits),
            max_attack_pixels: config.limits.max_attack_pixels,
            max_top_k: config.limits.max_top_k,
            max_resized_side: config.limits.max_resized_side,
            attack_limits: AttackLimits::from_config(&config.limits),
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
            jit_fuser: config.engine.jit_fuser,
            jit_optimize: config.engine.jit_optimize,
            batch_padding: config.engine.batch_padding,
            batch_resize: config.engine.batch_resize,
        };
        let aborted = tokio::sync::watch::Sender::new(false);
        let (handle, ready) = worker::spawn(catalog.clone(), ws, inbox, stats.clone(), aborted.subscribe())
            .map_err(|e| EngineError::Internal(format!("cannot start the worker thread: {e}")))?;
        let decode_threads = match config.engine.decode_threads {
            0 => std::thread::available_parallelism().map(usize::from).unwrap_or(1),
            n => n,
        };
        let inner = Inner {
            catalog,
            decode_slots: tokio::sync::Semaphore::new(decode_threads),
            post_slots: decode_threads.clamp(1, 2) as u32,
            queues: RwLock::new(Some(queues)),
            settings,
            stats,
            worker: std::sync::Mutex::new(Some(handle)),
            aborted,
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
        self.shutdown_within(Duration::MAX);
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
        self.inner.aborted.send_replace(true);
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

    /// The named (or default) model, if it is ready; 404 unknown, 503 not ready.
    pub fn model(&self, name: Option<&str>) -> Result<(usize, Arc<ModelInfo>), EngineError> {
        Ok(self.inner.catalog.ready(name)?)
    }

    /// Every model the server knows, with its state.
    pub fn models(&self) -> Vec<ModelEntry> {
        self.inner.catalog.entries()
    }

    /// The repository index (Triton's semantics): the repositories are read again first, so a
    /// model directory added or fixed on disk shows up.
    pub fn repository_index(&self) -> Vec<ModelEntry> {
        self.inner.catalog.rescan();
        self.inner.catalog.entries()
    }

    /// Loads a model (re-reading its repository first) and returns once it is ready or has
    /// failed. Other models keep being served meanwhile: the file is read off the worker
    /// thread, which only finishes the load between passes.
    pub async fn load_model(&self, name: &str) -> Result<(), EngineError> {
        self.inner.catalog.rescan();
        let ticket = self.inner.catalog.begin_load(name).map_err(|e| match e {
            // A model that can never load is the request's problem, not a passing state.
            crate::model::Unavailable::NotReady {
                state: crate::model::ModelState::Unsupported | crate::model::ModelState::Failed,
                ..
            } => EngineError::LoadFailed(e.to_string()),
            other => other.into(),
        })?;
        let (index, info) = match ticket {
            LoadTicket::AlreadyReady => return Ok(()),
            LoadTicket::Start { index, info } => (index, info),
        };
        let (tx, rx) = oneshot::channel();
        let sent = self.queues().and_then(|q| {
            q.push_control(Control::Load { model: index, info, reply: tx })
                .map_err(|r| EngineError::refused(r, "control"))
        });
        if let Err(e) = sent {
            self.inner.catalog.publish(index, Err(e.to_string()));
            return Err(e);
        }
        match self.await_value(rx, MODEL_LOAD_DEADLINE, Instant::now()).await? {
            Ok(()) => Ok(()),
            Err(reason) => Err(EngineError::LoadFailed(reason)),
        }
    }

    /// Unloads a model: new requests for it get 503 at once; its waiting classifications still
    /// run, its attacks in flight are answered 503. Returns once the module is gone.
    pub async fn unload_model(&self, name: &str) -> Result<(), EngineError> {
        let Some(index) = self.inner.catalog.begin_unload(name)? else { return Ok(()) };
        let (tx, rx) = oneshot::channel();
        let sent = self.queues().and_then(|q| {
            q.push_control(Control::Unload { model: index, reply: tx }).map_err(|r| EngineError::refused(r, "control"))
        });
        if let Err(e) = sent {
            self.inner.catalog.publish(index, Ok(None));
            return Err(e);
        }
        self.await_value(rx, MODEL_LOAD_DEADLINE, Instant::now()).await
    }

    /// The image's size from its header, checked against the decode limits and against
    /// `limits.max_resized_side` for `info`'s resize — before any pixel or tensor exists.
    fn check_header(&self, bytes: &[u8], info: &ModelInfo) -> Result<(u32, u32), EngineError> {
        let (width, height) = imaging::dimensions(bytes, &self.inner.settings.decode)?;
        self.check_size(width, height, info)
    }

    /// `limits.max_resized_side` for `info`'s resize of a `width`×`height` image.
    fn check_size(&self, width: u32, height: u32, info: &ModelInfo) -> Result<(u32, u32), EngineError> {
        let limit = self.inner.settings.max_resized_side;
        resize_within(width, height, info.input(), limit).map(|_| (width, height)).map_err(|(rh, rw)| {
            EngineError::TooElongated {
                model: info.name.clone(),
                width,
                height,
                resized_width: rw,
                resized_height: rh,
                limit,
                ratio: f64::from(limit) / info.input().resize_short_side as f64,
            }
        })
    }

    /// Header checks (size, resize bound), then decoding and the model's preprocessing on the
    /// blocking pool, at most `engine.decode_threads` images at once.
    async fn prepare_all(
        &self,
        info: &ModelInfo,
        images: Vec<Bytes>,
    ) -> Result<Vec<Result<(Rgb8, Vec<f32>), EngineError>>, EngineError> {
        let limits = self.inner.settings.decode;
        let checked: Vec<Result<Bytes, EngineError>> = images
            .into_iter()
            .map(|bytes| {
                self.check_header(&bytes, info)?;
                Ok(bytes)
            })
            .collect();
        let spec = info.input().clone();
        let _slot = self.inner.decode_slots.acquire().await.map_err(|_| EngineError::ShuttingDown)?;
        tokio::task::spawn_blocking(move || {
            crate::model::single_threaded_torch_here();
            checked
                .into_iter()
                .map(|bytes| {
                    let img = imaging::decode(&bytes?, &limits)?;
                    let input = input_of(&img, &spec)?;
                    Ok((img, input))
                })
                .collect()
        })
        .await
        .map_err(|e| EngineError::Internal(format!("decode task failed: {e}")))
    }

    /// An image preprocessed as `spec` declares (decode, resize, centre crop; `3×S×S` in [0,1])
    /// on the blocking pool — for a remote target that takes the tensor.
    pub async fn preprocess(&self, bytes: Bytes, spec: &crate::model::InputSpec) -> Result<Vec<f32>, EngineError> {
        let limits = self.inner.settings.decode;
        let (width, height) = imaging::dimensions(&bytes, &limits)?;
        let limit = self.inner.settings.max_resized_side;
        if resize_within(width, height, spec, limit).is_err() {
            return Err(EngineError::invalid(
                "image",
                format!("{width}×{height} is too elongated for a {}-pixel resize", spec.resize_short_side),
            ));
        }
        let spec = spec.clone();
        let _slot = self.inner.decode_slots.acquire().await.map_err(|_| EngineError::ShuttingDown)?;
        tokio::task::spawn_blocking(move || {
            crate::model::single_threaded_torch_here();
            input_of(&imaging::decode(&bytes, &limits)?, &spec)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("decode task failed: {e}")))?
    }

    fn queues(&self) -> Result<Queues, EngineError> {
        self.inner.queues.read().ok().and_then(|q| q.clone()).ok_or(EngineError::ShuttingDown)
    }

    /// Decodes an image whose header [`Self::check_header`] has passed.
    async fn decode(&self, bytes: Bytes) -> Result<(Rgb8, Duration), EngineError> {
        let limits = self.inner.settings.decode;
        let started = Instant::now();
        let _slot = self.inner.decode_slots.acquire().await.map_err(|_| EngineError::ShuttingDown)?;
        let img = tokio::task::spawn_blocking(move || imaging::decode(&bytes, &limits))
            .await
            .map_err(|e| EngineError::Internal(format!("decode task failed: {e}")))??;
        Ok((img, started.elapsed()))
    }

    /// The worker's answer (outer error: the deadline passed or the server is stopping; inner:
    /// the job's own failure).
    async fn await_reply<T>(
        &self,
        rx: oneshot::Receiver<Result<T, WorkerError>>,
        deadline: Duration,
        started: Instant,
    ) -> Result<Result<T, WorkerError>, EngineError> {
        self.await_value(rx, deadline, started).await
    }

    /// Waits for the worker's answer until the deadline, or until the shutdown grace is over.
    async fn await_value<T>(
        &self,
        rx: oneshot::Receiver<T>,
        deadline: Duration,
        started: Instant,
    ) -> Result<T, EngineError> {
        let left = deadline.saturating_sub(started.elapsed());
        let mut aborted = self.inner.aborted.subscribe();
        tokio::select! {
            reply = tokio::time::timeout(left, rx) => match reply {
                Err(_) => Err(EngineError::Deadline(deadline)),
                Ok(Err(_)) => Err(EngineError::ShuttingDown),
                Ok(Ok(r)) => Ok(r),
            },
            _ = aborted.wait_for(|a| *a) => Err(EngineError::ShuttingDown),
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
        let prepared = self.prepare_all(&info, vec![bytes]).await?.pop();
        let (img, input) = prepared.ok_or_else(|| EngineError::Internal("no image prepared".into()))??;
        let decode = started.elapsed();
        let reply = self.submit_classify(idx, &info, input, false, deadline, started).await?;
        Ok(Classification {
            image: ImageSummary::from(&img),
            model: info,
            probabilities: reply.probabilities,
            timings: Timings::new(decode, reply.timings, started),
        })
    }

    /// Probabilities for an image decoded already (an [`Upload`]'s): only the model's
    /// preprocessing runs, on the blocking pool, as [`Self::classify`] would after decoding.
    pub async fn classify_image(
        &self,
        model: Option<&str>,
        image: Arc<Rgb8>,
        deadline: Duration,
    ) -> Result<Classification, EngineError> {
        let started = Instant::now();
        let (idx, info) = self.model(model)?;
        self.check_size(image.width, image.height, &info)?;
        let spec = info.input().clone();
        let input = {
            let _slot = self.inner.decode_slots.acquire().await.map_err(|_| EngineError::ShuttingDown)?;
            let img = image.clone();
            tokio::task::spawn_blocking(move || {
                crate::model::single_threaded_torch_here();
                input_of(&img, &spec)
            })
            .await
            .map_err(|e| EngineError::Internal(format!("preprocessing task failed: {e}")))??
        };
        let decode = started.elapsed();
        let reply = self.submit_classify(idx, &info, input, false, deadline, started).await?;
        Ok(Classification {
            image: ImageSummary::from(image.as_ref()),
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
        Ok(self.submit_classify(idx, &info, input, false, deadline, started).await?.probabilities)
    }

    async fn submit_classify(
        &self,
        model: usize,
        info: &ModelInfo,
        input: Vec<f32>,
        want_features: bool,
        deadline: Duration,
        started: Instant,
    ) -> Result<ClassifyReply, EngineError> {
        let (tx, rx) = oneshot::channel();
        let rows = input.len() / (3 * info.input().size.pow(2) as usize).max(1);
        let job = ClassifyJob {
            model,
            input,
            rows,
            want_features,
            reply: tx,
            enqueued: Instant::now(),
            permit: None,
            span: tracing::Span::current(),
        };
        self.queues()?.push_classify(job).map_err(|r| EngineError::refused(r, "classify"))?;
        let reply = self.await_reply(rx, deadline, started).await.and_then(|r| r.map_err(EngineError::from));
        match &reply {
            Ok(r) => self.inner.stats.model_success(&info.name, started.elapsed(), r.timings.queued, r.timings.compute),
            Err(_) => self.inner.stats.model_failure(&info.name, started.elapsed()),
        }
        reply
    }

    /// Pooled features (the model's `features` method) for a fixed batch of images, in one pass
    /// that no other job joins, so the numbers do not depend on what else the server is doing.
    /// One result per image: images that cannot be decoded come back as errors.
    pub async fn features(
        &self,
        model: Option<&str>,
        images: Vec<Bytes>,
        deadline: Duration,
    ) -> Result<Vec<Result<Vec<f32>, EngineError>>, EngineError> {
        let started = Instant::now();
        let (idx, info) = self.model(model)?;
        let prepared: Vec<Result<Vec<f32>, EngineError>> =
            self.prepare_all(&info, images).await?.into_iter().map(|r| r.map(|(_, input)| input)).collect();
        let input: Vec<f32> = prepared.iter().filter_map(|r| r.as_ref().ok()).flatten().copied().collect();
        let mut features = if input.is_empty() {
            Vec::new()
        } else {
            self.submit_classify(idx, &info, input, true, deadline, started).await?.features
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
        if info.matrix().is_none() {
            return Err(EngineError::invalid("model", format!("model {} has no distance matrix", info.name)));
        }
        let classification = self.classify(Some(&info.name), bytes, deadline).await?;
        let matrix = info.matrix().ok_or_else(|| EngineError::Internal("matrix vanished".into()))?;
        let decision = target::select(&classification.probabilities, matrix, params, alternatives);
        Ok(TargetLabel { classification, params, decision })
    }

    pub fn target_params(&self, delta1: Option<f64>, delta2: Option<f64>) -> Result<TargetParams, EngineError> {
        Ok(params::target_params(delta1, delta2, &self.inner.settings.attack)?)
    }

    /// Checks an attack request against the model and the limits.
    pub fn attack_params(&self, info: &ModelInfo, req: &AttackRequest) -> Result<AttackParams, EngineError> {
        Ok(req.validate(info, &self.inner.settings.attack, &self.inner.settings.attack_limits)?)
    }

    /// What can be refused before an attack starts, cheaply: the model, the parameters, and the
    /// image's header (format, size against `max_attack_pixels`). Returns the model and the
    /// validated parameters.
    pub fn precheck_attack(
        &self,
        model: Option<&str>,
        bytes: &Bytes,
        req: &AttackRequest,
    ) -> Result<(usize, Arc<ModelInfo>, AttackParams), EngineError> {
        // The attack's tensors live at the upload's size: refuse from the header, before decoding.
        let (width, height) = imaging::dimensions(bytes, &self.inner.settings.decode)?;
        self.attack_plan(model, width, height, req)
    }

    /// The model, the validated parameters, and the image's size checked against the model's
    /// resize bound and `max_attack_pixels`: what an attack on a `width`×`height` image needs.
    fn attack_plan(
        &self,
        model: Option<&str>,
        width: u32,
        height: u32,
        req: &AttackRequest,
    ) -> Result<(usize, Arc<ModelInfo>, AttackParams), EngineError> {
        let (idx, info) = self.model(model)?;
        let params = self.attack_params(&info, req)?;
        self.check_size(width, height, &info)?;
        if u64::from(width) * u64::from(height) > self.inner.settings.max_attack_pixels {
            return Err(ImageError::TooManyPixels {
                width,
                height,
                limit: self.inner.settings.max_attack_pixels,
                side: self.inner.settings.decode.max_side,
            }
            .into());
        }
        Ok((idx, info, params))
    }

    /// Decodes an upload once (its header checked against the decode limits first), for every
    /// attack, check and query that a request makes of it.
    pub async fn decode_upload(&self, bytes: Bytes) -> Result<Upload, EngineError> {
        imaging::dimensions(&bytes, &self.inner.settings.decode)?;
        let (image, decode) = self.decode(bytes.clone()).await?;
        Ok(Upload { bytes, image: Arc::new(image), decode })
    }

    /// Runs an attack on the image at its original size and returns the 8-bit PNG it delivers,
    /// with what happened: the header checked, the image decoded, then [`Self::attack_upload`].
    pub async fn attack(
        &self,
        model: Option<&str>,
        bytes: Bytes,
        req: AttackRequest,
        deadline: Duration,
    ) -> Result<AttackResult, EngineError> {
        self.precheck_attack(model, &bytes, &req)?;
        let upload = self.decode_upload(bytes).await?;
        self.attack_upload(model, &upload, req, deadline, None).await
    }

    /// An attack on a decoded upload, publishing its progress to `progress` after every tick.
    pub async fn attack_upload(
        &self,
        model: Option<&str>,
        upload: &Upload,
        req: AttackRequest,
        deadline: Duration,
        progress: Option<tokio::sync::watch::Sender<crate::attack::Progress>>,
    ) -> Result<AttackResult, EngineError> {
        let started = Instant::now();
        let img = upload.image.clone();
        let (idx, info, params) = self.attack_plan(model, img.width, img.height, &req)?;
        let reference = req.float_reference.then(|| params.clone());
        let (outcome, job_timings) =
            self.run_attack(idx, &info, img.clone(), params, deadline, started, progress).await?;
        // The paper's float attack on the same image and towards the same target, for the price
        // of the 8-bit guarantee (delivered ÷ float perceptibility).
        let float_reference = match reference {
            None => None,
            Some(p) => {
                let p = p.float_reference(outcome.target);
                let (o, _) = self.run_attack(idx, &info, img.clone(), p, deadline, started, None).await?;
                Some(FloatReference { success: o.success, perceptibility: o.float_perceptibility })
            }
        };
        // The PNG and the metrics side by side on the blocking pool, each in one of the image
        // slots decoding uses, so that finished attacks never take more cores than there are
        // from the worker's next tick.
        let rgb = Arc::new(outcome.rgb.clone());
        let _slots =
            self.inner.decode_slots.acquire_many(self.inner.post_slots).await.map_err(|_| EngineError::ShuttingDown)?;
        let encode = tokio::task::spawn_blocking({
            let (img, rgb) = (img.clone(), rgb.clone());
            move || imaging::encode_png(img.width, img.height, &rgb, img.alpha.as_deref())
        });
        let metrics = tokio::task::spawn_blocking({
            let img = img.clone();
            move || perturbation(img.width, img.height, &img.rgb, &rgb)
        });
        let (png, perturbation) =
            tokio::try_join!(encode, metrics).map_err(|e| EngineError::Internal(format!("encode task failed: {e}")))?;
        let png = png?;
        Ok(AttackResult {
            model: info,
            image: ImageSummary::from(img.as_ref()),
            outcome,
            perturbation,
            png,
            float_reference,
            timings: Timings::new(upload.decode, job_timings, started),
        })
    }

    /// The upload and the delivered PNG classified by each of `models` (other models in this
    /// server): whether the attack transfers to them.
    pub async fn transfer(
        &self,
        upload: &Upload,
        result: &AttackResult,
        models: &[String],
        deadline: Duration,
    ) -> Result<Vec<TransferCheck>, EngineError> {
        // The delivered file itself is decoded and classified: that is what the check is for.
        let png = Bytes::from(result.png.clone());
        let checks = models.iter().map(|name| {
            let (image, png) = (upload.image.clone(), png.clone());
            async move {
                let (before, after) = futures::try_join!(
                    self.classify_image(Some(name), image, deadline),
                    self.classify(Some(name), png, deadline)
                )?;
                Ok::<_, EngineError>(TransferCheck::new(result, &before, &after))
            }
        });
        futures::future::try_join_all(checks).await
    }

    /// One attack job on the worker, start to outcome.
    #[expect(clippy::too_many_arguments, reason = "the job's fields, passed once from attack_upload's two calls")]
    async fn run_attack(
        &self,
        idx: usize,
        info: &ModelInfo,
        img: Arc<Rgb8>,
        params: AttackParams,
        deadline: Duration,
        started: Instant,
        progress: Option<tokio::sync::watch::Sender<crate::attack::Progress>>,
    ) -> Result<(AttackOutcome, queue::JobTimings), EngineError> {
        let (tx, rx) = oneshot::channel();
        let job = AttackJob {
            model: idx,
            image: img,
            params,
            reply: tx,
            enqueued: Instant::now(),
            permit: None,
            span: tracing::Span::current(),
            progress,
        };
        self.queues()?.push_attack(job).map_err(|r| EngineError::refused(r, "attack"))?;
        self.await_reply(rx, deadline, started).await?.map_err(|e| match e {
            WorkerError::Attack(AttackError::TargetIsPrediction { index, .. }) => EngineError::invalid(
                "target",
                format!(
                    "class {index} ({}) is already the prediction; choose another target",
                    info.classes().label(index)
                ),
            ),
            WorkerError::Attack(AttackError::NoMatrix(m)) => {
                EngineError::invalid("target", format!("model {m} has no distance matrix: pass an explicit target"))
            }
            other => other.into(),
        })
    }
}
