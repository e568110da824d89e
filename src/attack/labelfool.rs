//! LabelFool's attack (Algorithm 1): targeted DeepFool steps towards t,
//! `x ← clip(x + (1+overshoot)·(need/‖w‖²)·w)` with `w = ∇(f_t − f_k)`, k the strongest other
//! class and `need = κ − (f_t − f_k)`, one forward and one backward pass per step.
//!
//! κ is the quantisation guard; with κ = 0 and no rounding this is the paper's step (`need = |g|`
//! when k is the current argmax). Users download 8-bit images, and rounding removes every part of
//! the perturbation smaller than half a grey level — systematically, not as noise — so the float
//! attack's last, tiny step rarely survives. Two things keep the delivered image adversarial
//! without paying a fixed margin on easy images:
//!
//! * **Predicted rounding loss.** With the last gradient w, the gap of the rounded image is
//!   linearly `gap + w·(q(x) − x)`. The row checks an 8-bit image only when that prediction reaches
//!   κ, and otherwise steps on with the loss added to what it needs: no pass is spent on checks
//!   that the linear model already knows will fail.
//! * **Margins learnt from misses.** κ starts at the first of `params.margins` (0: just cross the
//!   boundary, as predicted after rounding). When a real 8-bit check still misses, the miss measures
//!   the prediction's error, and κ becomes the smallest listed margin that covers it with 10% to
//!   spare. Responses report the margin that was needed.
//!
//! The first forward pass at the original image doubles as its classification: it runs the same
//! preprocessing ops as `/classify` (bit-identical on the CPU), so no separate pass is spent.

use std::sync::Arc;

use tch::{Kind, Tensor};

use super::target::{self, argmax, softmax};
use super::{AttackError, AttackOutcome, AttackParams, AttackRow, Method, Need, Scored, best_other, scored};
use crate::model::ModelInfo;
use crate::model::preprocess::quantize;

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
    x: Tensor,
    params: AttackParams,
    phase: Phase,
    target: usize,
    decision: Option<target::TargetDecision>,
    original: Option<Scored>,
    margin_idx: usize,
    /// The last (masked) gradient of f_t − f_k, for predicting the rounding loss.
    w: Option<Tensor>,
    /// `κ − (predicted 8-bit gap)` at the last forward, for the step that follows.
    need: f64,
    /// Predicted 8-bit gap of the image sent to the check.
    predicted_gap: f64,
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
            w: None,
            need: 0.0,
            predicted_gap: 0.0,
            iterations: 0,
            checks: 0,
            last: None,
            success: false,
            params,
        }
    }

    /// κ: the logit margin the 8-bit image must be predicted to have before it is checked.
    fn margin(&self) -> f64 {
        let m = &self.params.margins;
        m[self.margin_idx.min(m.len().saturating_sub(1))]
    }

    /// After a miss that the prediction got wrong by `error` logits: the smallest listed margin
    /// above the current one that covers the error with 10% to spare (the largest listed if none).
    fn raise_margin(&mut self, error: f64) {
        let m = &self.params.margins;
        let current = self.margin();
        self.margin_idx = m
            .iter()
            .position(|&k| k > current && k >= 1.1 * error)
            .unwrap_or(m.len().saturating_sub(1))
            .max(self.margin_idx + 1)
            .min(m.len().saturating_sub(1));
    }

    /// What rounding `x` to 8 bits is predicted to cost the gap (≥ 0), from the last gradient.
    fn predicted_rounding_loss(&self) -> Result<f64, AttackError> {
        let Some(w) = &self.w else { return Ok(0.0) };
        let delta = quantize(&self.x)?.f_sub(&self.x)?;
        let change = w.f_mul(&delta)?.f_sum(Kind::Double)?.f_double_value(&[])?;
        Ok((-change).max(0.0))
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
        let gap = f64::from(logits[t] - fk);
        let loss = self.predicted_rounding_loss()?;
        let kappa = self.margin();
        if gap > 0.0 && gap - loss >= kappa {
            self.predicted_gap = gap - loss;
            self.phase = Phase::Checking;
            return Ok(Vec::new());
        }
        if self.iterations >= self.params.max_iter {
            self.phase = Phase::FinalCheck;
            return Ok(Vec::new());
        }
        self.need = kappa + loss - gap;
        let mut objective = vec![0.0f32; logits.len()];
        objective[t] = 1.0;
        objective[k] = -1.0;
        Ok(vec![objective])
    }

    fn on_gradients(&mut self, grads: Vec<Tensor>) -> Result<(), AttackError> {
        let Some(w) = grads.into_iter().next() else { return Ok(()) };
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
        self.w = Some(w);
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
                let error = self.predicted_gap - f64::from(logits[self.target] - best);
                self.raise_margin(error);
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
        let margin = self.success.then(|| self.margin());
        let original = self.original.ok_or(AttackError::NonFinite)?;
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
