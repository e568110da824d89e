//! LabelFool's attack (Algorithm 1): targeted DeepFool steps towards t,
//! `x ← clip(x + (1+overshoot)·(need/‖w‖²)·w)` with `w = ∇(f_t − f_k)`, k the strongest other
//! class and `need = κ − (f_t − f_k)`, one forward and one backward pass per step.
//!
//! κ is the quantisation guard. With κ = 0 this is the paper's step (`need = |g|` when k is the
//! current argmax). Rounding the float result to 8 bits can undo the last, tiny step; stepping on
//! from the rounded image often stalls. So when the 8-bit re-check misses, the row demands the
//! next margin from `params.margins` (in logits) and steps on from the float image: easy images
//! keep the paper's minimal perturbation, hard ones pay only the margin they need.

use std::sync::Arc;

use tch::{Kind, Tensor};

use super::target::{self, argmax, softmax};
use super::{AttackError, AttackOutcome, AttackParams, AttackRow, Method, Need, Scored, best_other, scored};
use crate::model::ModelInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Classify the original image (through the classify pipeline) and choose the target.
    Initial,
    Stepping,
    /// The float image has the margin: is its 8-bit version the target?
    Checking,
    /// Out of iterations (or stuck): classify what will be delivered, then stop.
    FinalCheck,
    Done,
}

pub struct LabelFoolRow {
    info: Arc<ModelInfo>,
    x: Tensor,
    params: AttackParams,
    phase: Phase,
    target: usize,
    decision: Option<target::TargetDecision>,
    original: Option<Scored>,
    margin_idx: usize,
    /// `κ − (f_t − f_k)` at the last forward, for the step that follows.
    need: f64,
    iterations: u32,
    checks: u32,
    last: Option<(Vec<u8>, Vec<f32>)>,
    success: bool,
}

impl LabelFoolRow {
    pub fn new(info: Arc<ModelInfo>, x0: Tensor, params: AttackParams) -> Self {
        Self {
            info,
            x: x0,
            phase: Phase::Initial,
            target: params.target.unwrap_or(0),
            decision: None,
            original: None,
            margin_idx: 0,
            need: 0.0,
            iterations: 0,
            checks: 0,
            last: None,
            success: false,
            params,
        }
    }

    fn margin(&self) -> f64 {
        let m = &self.params.margins;
        m[self.margin_idx.min(m.len().saturating_sub(1))]
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
            Phase::Stepping => Need::Forward,
            _ => Need::Check,
        }
    }

    fn image(&self) -> &Tensor {
        &self.x
    }

    fn on_logits(&mut self, logits: &[f32]) -> Result<Vec<Vec<f32>>, AttackError> {
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        let t = self.target;
        let (k, fk) = best_other(logits, t);
        let gap = f64::from(logits[t] - fk);
        let kappa = self.margin();
        if gap > 0.0 && gap >= kappa {
            self.phase = Phase::Checking;
            return Ok(Vec::new());
        }
        if self.iterations >= self.params.max_iter {
            self.phase = Phase::FinalCheck;
            return Ok(Vec::new());
        }
        self.need = kappa - gap;
        let mut objective = vec![0.0f32; logits.len()];
        objective[t] = 1.0;
        objective[k] = -1.0;
        Ok(vec![objective])
    }

    fn on_gradients(&mut self, grads: Vec<Tensor>) -> Result<(), AttackError> {
        let Some(w) = grads.into_iter().next() else {
            return Ok(());
        };
        // Pixels already at 0 (1) cannot go lower (higher): their part of the step would be
        // clipped away, so it must not count in ‖w‖ either.
        let stuck = self
            .x
            .f_le(0.0)?
            .f_logical_and(&w.f_lt(0.0)?)?
            .f_logical_or(&self.x.f_ge(1.0)?.f_logical_and(&w.f_gt(0.0)?)?)?;
        let w = w.f_masked_fill(&stuck, 0.0)?;
        let norm2 = w.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        self.iterations += 1;
        if !(norm2.is_finite() && norm2 > 0.0) {
            // A zero gradient cannot be followed: deliver what we have.
            self.phase = Phase::FinalCheck;
            return Ok(());
        }
        let scale = (1.0 + self.params.overshoot) * (self.need + 1e-4) / norm2;
        self.x = self.x.f_add(&w.f_mul_scalar(scale)?)?.f_clamp(0.0, 1.0)?.f_detach()?;
        Ok(())
    }

    fn on_check(&mut self, logits: &[f32], rgb: Vec<u8>) -> Result<(), AttackError> {
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        self.checks += 1;
        let probs = softmax(logits);
        match self.phase {
            Phase::Initial => {
                self.choose_target(&probs)?;
                self.phase = Phase::Stepping;
            }
            Phase::Checking | Phase::FinalCheck => {
                self.success = argmax(&probs) == self.target;
                let last_chance = self.phase == Phase::FinalCheck || self.iterations >= self.params.max_iter;
                self.phase = if self.success || last_chance {
                    Phase::Done
                } else {
                    self.margin_idx += 1;
                    Phase::Stepping
                };
            }
            Phase::Stepping | Phase::Done => {}
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
        let original = self.original.ok_or(AttackError::NonFinite)?;
        let margin = self.success.then(|| self.margin());
        let (rgb, probs) = self.last.ok_or(AttackError::NonFinite)?;
        Ok(AttackOutcome {
            method: Method::Labelfool,
            original,
            target: Some(self.target),
            decision: self.decision,
            final_: scored(&probs, argmax(&probs)),
            target_probability: Some(f64::from(probs[self.target])),
            success: self.success,
            iterations: self.iterations,
            checks: self.checks,
            margin,
            rgb,
        })
    }
}
