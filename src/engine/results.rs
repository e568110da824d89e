//! What the engine answers: plain Rust values (no tensor ever leaves the worker).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::JobTimings;
use crate::attack::{AttackOutcome, TargetDecision, TargetParams};
use crate::imaging::Rgb8;
use crate::imaging::metrics::Perturbation;
use crate::model::ModelInfo;

/// A decoded image's summary, as responses report it.
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
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
    pub(super) fn new(decode: Duration, job: JobTimings, started: Instant) -> Self {
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

pub struct AttackResult {
    pub model: Arc<ModelInfo>,
    pub image: ImageSummary,
    pub outcome: AttackOutcome,
    pub perturbation: Perturbation,
    pub png: Vec<u8>,
    /// The paper's float attack on the same image and target, when asked for.
    pub float_reference: Option<FloatReference>,
    pub timings: Timings,
}

/// The float attack (no 8-bit rounding, no margin) beside a delivered one.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct FloatReference {
    /// The float image reaches the goal (the target, or any other class when untargeted).
    pub success: bool,
    /// Its perceptibility, √(mean over pixels of ‖ΔRGB‖²), on the float image.
    pub perceptibility: Option<f64>,
}

/// What another model says of an attack: its top-1 before and after, and whether the attack
/// transferred to it. Shared by models of this server and remote targets.
#[derive(Debug, Clone, Copy)]
pub struct TransferVerdict {
    /// The other model's top-1 for the upload and for the delivered PNG (index, probability).
    pub original: (usize, f32),
    pub adversarial: (usize, f32),
    /// The attack's target in the other model's class list (targeted attacks).
    pub target: Option<usize>,
    /// Targeted: the other model's top-1 is the target. Untargeted: its label changed. None: the
    /// target has no counterpart in the other model's classes.
    pub transferred: Option<bool>,
}

impl TransferVerdict {
    /// `before` and `after`: the other model's probabilities for the upload and the delivered PNG;
    /// `classes`: its class list.
    pub fn new(result: &AttackResult, classes: &crate::model::ClassList, before: &[f32], after: &[f32]) -> Self {
        let top1 = |p: &[f32]| top_k(p, 1).first().copied().unwrap_or((0, 0.0));
        let (original, adversarial) = (top1(before), top1(after));
        let target = result.outcome.target.and_then(|t| result.model.classes().same_class_in(t, classes));
        let transferred = match result.outcome.target {
            Some(_) => target.map(|t| adversarial.0 == t),
            None => Some(adversarial.0 != original.0),
        };
        Self { original, adversarial, target, transferred }
    }
}

/// An attack's delivered image classified by another model of this server.
#[derive(Debug, Clone)]
pub struct TransferCheck {
    pub model: Arc<ModelInfo>,
    pub verdict: TransferVerdict,
}

impl TransferCheck {
    pub fn new(result: &AttackResult, before: &Classification, after: &Classification) -> Self {
        let verdict = TransferVerdict::new(result, after.model.classes(), &before.probabilities, &after.probabilities);
        Self { model: after.model.clone(), verdict }
    }
}
