//! LabelFool's attack (Algorithm 1): targeted DeepFool steps towards t,
//! `x ← clip(x + (1+overshoot)·(need/‖w‖²)·w)` with `w = ∇(f_t − f_k)`, k the strongest other
//! class and `need = κ − (f_t − f_k)` (+ the predicted rounding loss, see [`super::guard`]): one
//! forward and one backward pass per step. With a caller's target this is targeted DeepFool, and
//! serves `method=deepfool` with `target` too.
//!
//! The first forward pass at the original image doubles as its classification: it runs the same
//! preprocessing ops as `/classify` (bit-identical on the CPU), so no separate pass is spent.

use std::sync::Arc;

use tch::Tensor;

use super::guard::{Judged, Phase, Stepper, mask_saturated};
use super::record::{Extras, Record};
use super::target::{self, argmax, softmax};
use super::{AttackError, AttackOutcome, AttackParams, AttackRow, Method, Need, best_other};
use crate::model::ModelInfo;

pub struct LabelFoolRow {
    info: Arc<ModelInfo>,
    method: Method,
    s: Stepper,
    params: AttackParams,
    target: usize,
    decision: Option<target::TargetDecision>,
    /// What the next step must add to the gap (set by the last forward).
    need: f64,
}

impl LabelFoolRow {
    pub fn new(info: Arc<ModelInfo>, method: Method, x0: Tensor, params: AttackParams) -> Self {
        Self {
            info,
            method,
            s: Stepper::new(x0, &params),
            target: params.target.unwrap_or(0),
            decision: None,
            need: 0.0,
            params,
        }
    }

    fn choose_target(&mut self, probs: &[f32]) -> Result<(), AttackError> {
        let predicted = self.s.record.classified(probs);
        match self.params.target {
            Some(t) if t == predicted => {
                return Err(AttackError::TargetIsPrediction {
                    index: t,
                    label: self.info.classes().label(t).to_string(),
                });
            }
            Some(t) => self.target = t,
            None => {
                let d = self.info.matrix().ok_or_else(|| AttackError::NoMatrix(self.info.name.clone()))?;
                let decision = target::select(probs, d, self.params.target_params, 4);
                self.target = decision.target;
                self.decision = Some(decision);
            }
        }
        Ok(())
    }

    /// A check's probabilities, whether it reached the target, and the target's gap.
    fn judge(&self, logits: &[f32]) -> Judged {
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        let probs = softmax(logits);
        let success = argmax(&probs) == self.target;
        Ok((probs, success, self.gap(logits).0))
    }

    /// `f_t − max_{j≠t} f_j` and the strongest other class.
    fn gap(&self, logits: &[f32]) -> (f64, usize) {
        let (k, fk) = best_other(logits, self.target);
        (f64::from(logits[self.target] - fk), k)
    }
}

impl AttackRow for LabelFoolRow {
    fn need(&self) -> Need {
        self.s.need()
    }

    fn image(&self) -> &Tensor {
        &self.s.x
    }

    fn on_logits(&mut self, logits: &[f32]) -> Result<Vec<Vec<f32>>, AttackError> {
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        if self.s.phase == Phase::Initial {
            self.choose_target(&softmax(logits))?;
        }
        let (gap, k) = self.gap(logits);
        let Some(need) = self.s.after_forward(gap)? else { return Ok(Vec::new()) };
        self.need = need;
        let mut objective = vec![0.0f32; logits.len()];
        objective[self.target] = 1.0;
        objective[k] = -1.0;
        Ok(vec![objective])
    }

    fn on_gradients(&mut self, grads: Vec<Tensor>) -> Result<(), AttackError> {
        let Some(w) = grads.into_iter().next() else { return Ok(()) };
        let (w, norm2) = mask_saturated(&self.s.x, &w)?;
        self.s.step(w, norm2, self.need)
    }

    fn on_check(&mut self, logits: &[f32], rgb: Vec<u8>) -> Result<(), AttackError> {
        let judged = self.judge(logits);
        self.s.checked(rgb, judged)
    }

    fn check_count(&self) -> usize {
        self.s.check_count()
    }

    fn check_image(&self, k: usize) -> Result<Tensor, AttackError> {
        self.s.check_image(k)
    }

    fn is_done(&self) -> bool {
        self.s.phase == Phase::Done
    }

    fn record(&self) -> &Record {
        &self.s.record
    }

    fn record_mut(&mut self) -> &mut Record {
        &mut self.s.record
    }

    fn margin_now(&self) -> Option<f64> {
        (!self.s.is_float()).then(|| self.s.guard.margin())
    }

    fn iterations(&self) -> u32 {
        self.s.record.iterations
    }

    fn checks_float(&self) -> bool {
        self.s.is_float()
    }

    fn outcome(self: Box<Self>) -> Result<AttackOutcome, AttackError> {
        let extras = Extras {
            target: Some(self.target),
            decision: self.decision,
            margin: self.s.margin(),
            epsilon: None,
            float_perceptibility: self.s.float_perceptibility()?,
        };
        self.s.record.outcome(self.method, extras)
    }
}
