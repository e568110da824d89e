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

use super::guard::{Guard, Next, deepfool_step, mask_saturated};
use super::target::{self, argmax, softmax};
use super::{AttackError, AttackOutcome, AttackParams, AttackRow, Method, Need, Scored, best_other, scored};
use crate::model::ModelInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first forward pass: classify the original image and choose the target.
    Initial,
    Stepping,
    /// The 8-bit image is predicted to have the margin: is it the target?
    Checking,
    /// Out of iterations (or stuck): classify what will be delivered, then stop.
    FinalCheck,
    Done,
}

pub struct LabelFoolRow {
    info: Arc<ModelInfo>,
    method: Method,
    x: Tensor,
    params: AttackParams,
    phase: Phase,
    target: usize,
    decision: Option<target::TargetDecision>,
    original: Option<Scored>,
    guard: Guard,
    /// What the next step must add to the gap (set by the last forward).
    need: f64,
    iterations: u32,
    checks: u32,
    last: Option<(Vec<u8>, Vec<f32>)>,
    success: bool,
}

impl LabelFoolRow {
    pub fn new(info: Arc<ModelInfo>, method: Method, x0: Tensor, params: AttackParams) -> Self {
        Self {
            info,
            method,
            x: x0,
            phase: Phase::Initial,
            target: params.target.unwrap_or(0),
            decision: None,
            original: None,
            guard: Guard::new(params.margins.clone()),
            need: 0.0,
            iterations: 0,
            checks: 0,
            last: None,
            success: false,
            params,
        }
    }

    fn choose_target(&mut self, probs: &[f32]) -> Result<(), AttackError> {
        let predicted = argmax(probs);
        self.original = Some(scored(probs, predicted));
        match self.params.target {
            Some(t) if t == predicted => {
                return Err(AttackError::TargetIsPrediction {
                    index: t,
                    label: self.info.classes().label(t).to_string(),
                });
            }
            Some(t) => self.target = t,
            None => {
                let d = self.info.matrix.as_ref().ok_or_else(|| AttackError::NoMatrix(self.info.name.clone()))?;
                let decision = target::select(probs, d, self.params.target_params, 4);
                self.target = decision.target;
                self.decision = Some(decision);
            }
        }
        Ok(())
    }
}

impl AttackRow for LabelFoolRow {
    fn need(&self) -> Need {
        match self.phase {
            Phase::Initial | Phase::Stepping => Need::Forward,
            Phase::Checking | Phase::FinalCheck | Phase::Done => Need::Check,
        }
    }

    fn image(&self) -> &Tensor {
        &self.x
    }

    fn on_logits(&mut self, logits: &[f32]) -> Result<Vec<Vec<f32>>, AttackError> {
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        if self.phase == Phase::Initial {
            self.choose_target(&softmax(logits))?;
            self.phase = Phase::Stepping;
        }
        let t = self.target;
        let (k, fk) = best_other(logits, t);
        match self.guard.next(f64::from(logits[t] - fk), &self.x)? {
            Next::Check => {
                self.phase = Phase::Checking;
                Ok(Vec::new())
            }
            Next::Step { .. } if self.iterations >= self.params.max_iter => {
                self.phase = Phase::FinalCheck;
                Ok(Vec::new())
            }
            Next::Step { need } => {
                self.need = need;
                let mut objective = vec![0.0f32; logits.len()];
                objective[t] = 1.0;
                objective[k] = -1.0;
                Ok(vec![objective])
            }
        }
    }

    fn on_gradients(&mut self, grads: Vec<Tensor>) -> Result<(), AttackError> {
        let Some(w) = grads.into_iter().next() else { return Ok(()) };
        let (w, norm2) = mask_saturated(&self.x, &w)?;
        self.iterations += 1;
        if !(norm2.is_finite() && norm2 > 0.0) {
            // A zero gradient cannot be followed: deliver what we have.
            self.phase = Phase::FinalCheck;
            return Ok(());
        }
        self.x = deepfool_step(&self.x, &w, norm2, self.need, self.params.overshoot)?;
        self.guard.stepped(w);
        Ok(())
    }

    fn on_check(&mut self, logits: &[f32], rgb: Vec<u8>) -> Result<(), AttackError> {
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        self.checks += 1;
        let probs = softmax(logits);
        if matches!(self.phase, Phase::Checking | Phase::FinalCheck) {
            self.success = argmax(&probs) == self.target;
            let last_chance = self.phase == Phase::FinalCheck || self.iterations >= self.params.max_iter;
            self.phase = if self.success || last_chance {
                Phase::Done
            } else {
                let (_, best) = best_other(logits, self.target);
                self.guard.missed(f64::from(logits[self.target] - best));
                Phase::Stepping
            };
        }
        self.last = Some((rgb, probs));
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn iterations(&self) -> u32 {
        self.iterations
    }

    fn outcome(self: Box<Self>) -> Result<AttackOutcome, AttackError> {
        let margin = self.success.then(|| self.guard.margin());
        let original = self.original.ok_or(AttackError::NonFinite)?;
        let (rgb, probs) = self.last.ok_or(AttackError::NonFinite)?;
        Ok(AttackOutcome {
            method: self.method,
            original,
            target: Some(self.target),
            decision: self.decision,
            final_: scored(&probs, argmax(&probs)),
            target_probability: Some(f64::from(probs[self.target])),
            success: self.success,
            iterations: self.iterations,
            checks: self.checks,
            margin,
            epsilon: None,
            rgb,
        })
    }
}
