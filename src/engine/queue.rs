//! The jobs handlers hand to the worker, and the two bounded queues they travel in: one for
//! single-pass work (classify, features), one for attacks, so a burst of attacks never delays a
//! classification and the worker can take attacks only as fast as it has rows free for them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::attack::{AttackError, AttackOutcome, AttackParams};
use crate::imaging::Rgb8;

/// Why the worker could not do a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("libtorch error: {0}")]
    Torch(String),
    #[error("the worker panicked on this job: {0}")]
    Panic(String),
    #[error(transparent)]
    Attack(#[from] AttackError),
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl From<tch::TchError> for JobError {
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

/// One preprocessed image → its probabilities.
pub struct ClassifyJob {
    pub model: usize,
    /// `3×S×S` model input in [0,1] (CHW), made by the blocking pool.
    pub input: Vec<f32>,
    pub want_features: bool,
    pub reply: oneshot::Sender<Result<ClassifyReply, JobError>>,
    pub enqueued: Instant,
}

pub struct ClassifyReply {
    pub probabilities: Vec<f32>,
    pub logits: Vec<f32>,
    pub features: Option<Vec<f32>>,
    pub timings: JobTimings,
}

pub struct AttackJob {
    pub model: usize,
    pub image: Arc<Rgb8>,
    pub params: AttackParams,
    pub reply: oneshot::Sender<Result<(AttackOutcome, JobTimings), JobError>>,
    pub enqueued: Instant,
}

/// The sending half, held by the [`crate::engine::Engine`].
#[derive(Clone)]
pub struct Queues {
    pub classify: Sender<ClassifyJob>,
    pub attack: Sender<AttackJob>,
}

/// The receiving half, owned by the worker.
pub struct Inbox {
    pub classify: Receiver<ClassifyJob>,
    pub attack: Receiver<AttackJob>,
}

pub fn bounded(capacity: usize) -> (Queues, Inbox) {
    let (ctx, crx) = crossbeam_channel::bounded(capacity);
    let (atx, arx) = crossbeam_channel::bounded(capacity);
    (
        Queues {
            classify: ctx,
            attack: atx,
        },
        Inbox {
            classify: crx,
            attack: arx,
        },
    )
}

/// A job refused at the door.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Full,
    Closed,
}

pub fn try_push<T>(tx: &Sender<T>, job: T) -> Result<(), Refused> {
    match tx.try_send(job) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => Err(Refused::Full),
        Err(TrySendError::Disconnected(_)) => Err(Refused::Closed),
    }
}
