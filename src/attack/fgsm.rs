//! FGSM (Goodfellow et al. 2015): one gradient of the cross-entropy, then
//! `x = clip(x0 + ε·sign(∇))` (untargeted: ascend the loss of the original class; targeted:
//! descend the target's). The gradient of CE w.r.t. the input is `Jᵀ(p − y)`, i.e. the gradient of
//! the logit combination `(p − y)·f` with p held fixed — so FGSM is one objective of the shared
//! tick. With several ε (the search mode) the row tries them in ascending order, one 8-bit check
//! each, and stops at the first that fools the model: the smallest ε that works.

use tch::Tensor;

use super::record::{Extras, Record};
use super::target::{argmax, softmax};
use super::{AttackError, AttackOutcome, AttackParams, AttackRow, Method, Need};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Initial,
    Checking,
    Done,
}

pub struct FgsmRow {
    x0: Tensor,
    x: Tensor,
    params: AttackParams,
    phase: Phase,
    label: usize,
    sign: Option<Tensor>,
    /// Index into `params.epsilons` of the image under check.
    eps_idx: usize,
    record: Record,
}

impl FgsmRow {
    pub fn new(x0: Tensor, params: AttackParams) -> Self {
        Self {
            x: x0.shallow_clone(),
            x0,
            phase: Phase::Initial,
            label: 0,
            sign: None,
            eps_idx: 0,
            record: Record::default(),
            params,
        }
    }

    fn perturb(&mut self) -> Result<(), AttackError> {
        let eps = self.params.epsilons[self.eps_idx];
        let sign = self.sign.as_ref().ok_or(AttackError::NonFinite)?;
        self.x = self.x0.f_add(&sign.f_mul_scalar(eps)?)?.f_clamp(0.0, 1.0)?;
        Ok(())
    }
}

impl AttackRow for FgsmRow {
    fn need(&self) -> Need {
        match self.phase {
            Phase::Initial => Need::Forward,
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
        let p = softmax(logits);
        self.label = self.record.classified(&p);
        let objective: Vec<f32> = match self.params.target {
            Some(t) if t == self.label => {
                return Err(AttackError::TargetIsPrediction { index: t, label: String::new() });
            }
            // Descend CE(t): the gradient of (y_t − p)·f.
            Some(t) => p.iter().enumerate().map(|(j, &pj)| f32::from(j == t) - pj).collect(),
            // Ascend CE(label): the gradient of (p − y_label)·f.
            None => p.iter().enumerate().map(|(j, &pj)| pj - f32::from(j == self.label)).collect(),
        };
        Ok(vec![objective])
    }

    fn on_gradients(&mut self, grads: Vec<Tensor>) -> Result<(), AttackError> {
        let g = grads.into_iter().next().ok_or(AttackError::NonFinite)?;
        self.sign = Some(g.f_sign()?);
        self.record.iterations = 1;
        self.eps_idx = 0;
        self.perturb()?;
        self.phase = Phase::Checking;
        Ok(())
    }

    fn on_check(&mut self, logits: &[f32], rgb: Vec<u8>) -> Result<(), AttackError> {
        let probs = softmax(logits);
        let pred = argmax(&probs);
        let success = match self.params.target {
            Some(t) => pred == t,
            None => pred != self.label,
        };
        self.record.checked(rgb, probs, success);
        if success || self.eps_idx + 1 >= self.params.epsilons.len() {
            self.phase = Phase::Done;
        } else {
            self.eps_idx += 1;
            self.perturb()?;
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn record(&self) -> &Record {
        &self.record
    }

    fn record_mut(&mut self) -> &mut Record {
        &mut self.record
    }

    fn iterations(&self) -> u32 {
        self.record.iterations
    }

    fn checks_float(&self) -> bool {
        self.params.float_reference
    }

    fn outcome(self: Box<Self>) -> Result<AttackOutcome, AttackError> {
        let float =
            if self.params.float_reference { Some(super::float_perceptibility(&self.x, &self.x0)?) } else { None };
        let extras = Extras {
            target: self.params.target,
            epsilon: self.params.epsilons.get(self.eps_idx).copied(),
            float_perceptibility: float,
            ..Extras::default()
        };
        self.record.outcome(Method::Fgsm, extras)
    }
}
