//! Attacks as per-image state machines ("rows") that a shared runner advances one tick at a time.
//!
//! Each tick the runner gives every row the logits at its current image, asks which logit
//! combinations it needs the input gradient of, and answers them with ONE backward pass over all
//! rows together. That is what lets the worker batch many in-flight attacks continuously: a row
//! never runs the model itself. Rows also ask for *checks*: the 8-bit version of their image
//! classified through the very pipeline `/classify` uses, so success is judged on what the user
//! downloads.

pub mod bracket;
pub mod deepfool;
pub mod fgsm;
pub mod guard;
pub mod labelfool;
pub mod params;
pub mod pgd;
pub mod prune;
pub mod record;
pub mod runner;
pub mod sparsefool;
pub mod target;

use std::sync::Arc;

use serde::Serialize;
use tch::Tensor;

use crate::model::ModelInfo;
pub use params::{AttackParams, AttackRequest, Method};
pub use record::Progress;
pub use target::{Branch, TargetDecision, TargetParams};

#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    #[error("target class {index} ({label}) is already the model's prediction for this image")]
    TargetIsPrediction { index: usize, label: String },
    #[error("model {0} has no distance matrix: pass an explicit target")]
    NoMatrix(String),
    #[error("the model returned non-finite logits")]
    NonFinite,
    #[error("the attack ended before it classified its image and checked a result")]
    Unfinished,
    #[error("libtorch: {0}")]
    Torch(String),
}

impl From<tch::TchError> for AttackError {
    fn from(e: tch::TchError) -> Self {
        Self::Torch(e.to_string())
    }
}

/// A class with the model's probability for it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scored {
    pub index: usize,
    pub probability: f64,
}

/// What an attack achieved, measured on the image it delivers.
#[derive(Debug, Clone)]
pub struct AttackOutcome {
    pub method: Method,
    pub original: Scored,
    pub target: Option<usize>,
    pub decision: Option<TargetDecision>,
    /// Classification of the delivered 8-bit image (what `/classify` answers for it).
    pub final_: Scored,
    /// Probability of the target on the delivered image.
    pub target_probability: Option<f64>,
    /// Targeted: the delivered image is classified as the target. Untargeted: as anything else.
    pub success: bool,
    /// Gradient steps taken (one backward pass each).
    pub iterations: u32,
    /// 8-bit re-checks run (forward only).
    pub checks: u32,
    /// 8-bit checks after success that tried to take back rounding the goal did not need.
    pub refinements: u32,
    /// Logit margin demanded when the attack succeeded (the quantisation guard).
    pub margin: Option<f64>,
    /// FGSM: the step size of the delivered image.
    pub epsilon: Option<f64>,
    /// A float reference attack (`AttackParams::float_reference`): the perceptibility of its
    /// float image, √(mean over pixels of ‖ΔRGB‖²) as for delivered images.
    pub float_perceptibility: Option<f64>,
    /// The delivered pixels, `H×W×3`.
    pub rgb: Vec<u8>,
}

/// What a row needs from the next tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Logits (and possibly gradients) at the current float image.
    Forward,
    /// Logits of the 8-bit version of the current image, through the classify pipeline.
    Check,
}

/// One image under attack. Implementations keep their tensors on the model's device.
pub trait AttackRow: Send {
    fn need(&self) -> Need;
    /// The current image, `[1,3,H,W]` in [0,1], on the model's device.
    fn image(&self) -> &Tensor;
    /// Logits at [`Self::image`]. Returns the logit combinations (one coefficient per class) whose
    /// input gradient the row wants this tick; empty = no gradient needed.
    fn on_logits(&mut self, logits: &[f32]) -> Result<Vec<Vec<f32>>, AttackError>;
    /// The gradients asked for by the last `on_logits`, in order, each shaped like the image.
    fn on_gradients(&mut self, grads: Vec<Tensor>) -> Result<(), AttackError>;
    /// Logits of the 8-bit image `rgb`: the quantised [`Self::check_image`], each in turn.
    fn on_check(&mut self, logits: &[f32], rgb: Vec<u8>) -> Result<(), AttackError>;
    /// How many images this tick checks: [`Self::image`], or several candidates at once
    /// (batched checks after success, see [`guard`]).
    fn check_count(&self) -> usize {
        1
    }
    /// Check image `k` of [`Self::check_count`], built when the runner asks for it.
    fn check_image(&self, _k: usize) -> Result<Tensor, AttackError> {
        Ok(self.image().shallow_clone())
    }
    /// True for a float reference attack: its checks classify the float image itself.
    fn checks_float(&self) -> bool {
        false
    }
    fn is_done(&self) -> bool;
    fn iterations(&self) -> u32;
    /// The shared bookkeeping (original class, latest logits, last check, counts).
    fn record(&self) -> &record::Record;
    fn record_mut(&mut self) -> &mut record::Record;
    /// The logit margin κ the row demands now (the methods with the 8-bit guard).
    fn margin_now(&self) -> Option<f64> {
        None
    }
    /// The short side the model's resize takes for this row's next forward pass with gradients;
    /// None: the model's own (every method but PGD's input diversity).
    fn step_resize(&mut self) -> Option<i64> {
        None
    }
    /// Where the attack stands, for live progress.
    fn progress(&self) -> Progress {
        self.record().progress(self.margin_now())
    }
    fn outcome(self: Box<Self>) -> Result<AttackOutcome, AttackError>;
}

/// Builds the row for `params.method` on the image `x0` (`[1,3,H,W]`, on the model's device).
pub fn new_row(info: Arc<ModelInfo>, x0: Tensor, params: AttackParams) -> Result<Box<dyn AttackRow>, AttackError> {
    match (params.method, params.target) {
        (Method::Labelfool, None) if info.matrix().is_none() => Err(AttackError::NoMatrix(info.name.clone())),
        (Method::Labelfool, _) => Ok(Box::new(labelfool::LabelFoolRow::new(info, Method::Labelfool, x0, params))),
        // Targeted DeepFool is the LabelFool step towards the caller's class.
        (Method::Deepfool, Some(_)) => Ok(Box::new(labelfool::LabelFoolRow::new(info, Method::Deepfool, x0, params))),
        (Method::Deepfool, None) => Ok(Box::new(deepfool::DeepFoolRow::new(x0, params))),
        (Method::Fgsm, _) => Ok(Box::new(fgsm::FgsmRow::new(x0, params))),
        (Method::Sparsefool, _) => Ok(Box::new(sparsefool::SparseFoolRow::new(x0, params))),
        (Method::Pgd, _) => {
            let spec = info.input();
            Ok(Box::new(pgd::PgdRow::new(x0, params, spec.size, spec.resize_short_side)))
        }
    }
}

/// The paper's perceptibility of a float image `x` against `x0` (both `[1,3,H,W]`):
/// √(mean over pixels of ‖ΔRGB‖²).
pub(crate) fn float_perceptibility(x: &Tensor, x0: &Tensor) -> Result<f64, AttackError> {
    let d = x.f_sub(x0)?.f_square()?.f_sum_dim_intlist(1, false, tch::Kind::Double)?;
    Ok(d.f_mean(tch::Kind::Double)?.f_double_value(&[])?.sqrt())
}

pub(crate) fn scored(probs: &[f32], index: usize) -> Scored {
    Scored { index, probability: f64::from(probs[index]) }
}

/// `max_{j≠t} v_j` and its index.
pub(crate) fn best_other(v: &[f32], t: usize) -> (usize, f32) {
    v.iter()
        .enumerate()
        .filter(|(j, _)| *j != t)
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(j, &x)| (j, x))
        .unwrap_or((t, f32::NEG_INFINITY))
}
