//! The jobs handlers hand to the worker, and the two queues they travel in: one for single-pass
//! work (classify, features), one for attacks, so a burst of attacks never delays a
//! classification and the worker can take attacks only as fast as it has rows free for them.
//!
//! A queue's bound is a semaphore, not the channel: a job holds a permit from submission until
//! the worker *starts* it, so jobs the batcher holds back for `max_batch_wait` still count as
//! waiting, and "queue full" means exactly `queue_capacity` jobs are waiting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::attack::{AttackError, AttackOutcome, AttackParams};
use crate::imaging::Rgb8;

/// Why the worker could not do a job.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("libtorch error: {0}")]
    Torch(String),
    #[error("the worker panicked on this job: {0}")]
    Panic(String),
    #[error(transparent)]
    Attack(#[from] AttackError),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("model {0} was unloaded before this request finished")]
    ModelUnloaded(String),
}

impl From<tch::TchError> for WorkerError {
    fn from(e: tch::TchError) -> Self {
        Self::Torch(e.to_string())
    }
}

/// Worker-side timings of a job.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobTimings {
    /// From enqueue until the worker started the job's batch.
    pub queued: Duration,
    /// Device time of the batch (or of all ticks, for an attack).
    pub compute: Duration,
    /// How many jobs shared the (first) batch.
    pub batch_size: usize,
}

/// Preprocessed image(s) → probabilities (one image, batched dynamically with others) or
/// features (a fixed batch that runs alone, so its numbers do not depend on what else is queued).
pub struct ClassifyJob {
    pub model: usize,
    /// `rows × 3×S×S` model input in [0,1] (CHW), made by the blocking pool.
    pub input: Vec<f32>,
    pub rows: usize,
    pub want_features: bool,
    pub reply: oneshot::Sender<Result<ClassifyReply, WorkerError>>,
    pub enqueued: Instant,
    /// Released when the worker starts the job.
    pub permit: Option<OwnedSemaphorePermit>,
    /// The submitting request's span (its `request_id`): the worker logs the job inside it.
    pub span: tracing::Span,
}

pub struct ClassifyReply {
    /// Classify jobs: the image's probabilities.
    pub probabilities: Vec<f32>,
    /// Features jobs: one pooled embedding per row.
    pub features: Vec<Vec<f32>>,
    pub timings: JobTimings,
}

pub struct AttackJob {
    pub model: usize,
    pub image: Arc<Rgb8>,
    pub params: AttackParams,
    pub reply: oneshot::Sender<Result<(AttackOutcome, JobTimings), WorkerError>>,
    pub enqueued: Instant,
    /// Released when the worker admits the attack as a row.
    pub permit: Option<OwnedSemaphorePermit>,
    /// The submitting request's span (its `request_id`): the worker logs the attack inside it.
    pub span: tracing::Span,
    /// Where the worker publishes the attack's progress after each tick (latest value only, so
    /// a slow reader never holds the worker back).
    pub progress: Option<tokio::sync::watch::Sender<crate::attack::Progress>>,
}

/// Model lifecycle requests to the worker, which owns the modules.
pub enum Control {
    /// Load a model: the worker has the file read on a thread of its own, then finishes the
    /// load (device, checks, data-free matrix) between passes.
    Load { model: usize, info: Arc<crate::model::ModelInfo>, reply: oneshot::Sender<Result<(), String>> },
    /// A file read finished (sent by the reading thread).
    Read {
        model: usize,
        info: Arc<crate::model::ModelInfo>,
        module: Result<tch::CModule, String>,
        started: Instant,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Unload a model: its waiting classifications run first, its attacks in flight are
    /// answered 503, then the module is dropped.
    Unload { model: usize, reply: oneshot::Sender<()> },
}

/// The sending half, held by the [`crate::engine::Engine`].
#[derive(Clone)]
pub struct Queues {
    classify: Sender<ClassifyJob>,
    attack: Sender<AttackJob>,
    control: Sender<Control>,
    classify_slots: Arc<Semaphore>,
    attack_slots: Arc<Semaphore>,
    capacity: usize,
}

/// The receiving half, owned by the worker.
pub struct Inbox {
    pub classify: Receiver<ClassifyJob>,
    pub attack: Receiver<AttackJob>,
    pub control: Receiver<Control>,
    /// For the worker's file-reading threads to report back.
    pub control_tx: Sender<Control>,
}

pub fn new(capacity: usize) -> (Queues, Inbox) {
    let (ctx, crx) = crossbeam_channel::unbounded();
    let (atx, arx) = crossbeam_channel::unbounded();
    let (ktx, krx) = crossbeam_channel::unbounded();
    let queues = Queues {
        classify: ctx,
        attack: atx,
        control: ktx.clone(),
        classify_slots: Arc::new(Semaphore::new(capacity)),
        attack_slots: Arc::new(Semaphore::new(capacity)),
        capacity,
    };
    (queues, Inbox { classify: crx, attack: arx, control: krx, control_tx: ktx })
}

/// A job refused at the door.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Full,
    Closed,
}

impl Queues {
    pub fn push_classify(&self, mut job: ClassifyJob) -> Result<(), Refused> {
        job.permit = Some(self.classify_slots.clone().try_acquire_owned().map_err(|_| Refused::Full)?);
        self.classify.send(job).map_err(|_| Refused::Closed)
    }

    pub fn push_attack(&self, mut job: AttackJob) -> Result<(), Refused> {
        job.permit = Some(self.attack_slots.clone().try_acquire_owned().map_err(|_| Refused::Full)?);
        self.attack.send(job).map_err(|_| Refused::Closed)
    }

    pub fn push_control(&self, c: Control) -> Result<(), Refused> {
        self.control.send(c).map_err(|_| Refused::Closed)
    }

    /// Jobs waiting (submitted, not yet started): classify, attack.
    pub fn depths(&self) -> (usize, usize) {
        (self.capacity - self.classify_slots.available_permits(), self.capacity - self.attack_slots.available_permits())
    }
}
