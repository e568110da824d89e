//! PGD (Madry et al. 2018) on the logit margin inside an L∞ ball of radius ε, with momentum
//! (Dong et al., CVPR 2018) and input diversity (Xie et al., CVPR 2019) — MI-DI-FGSM: `max_iter`
//! steps `g ← μ·g + ∇m/mean|∇m|`, `x ← Π_ε(x + α·sign(g))`, where m is `f_t − max_{j≠t} f_j`
//! towards a target (else `max_{j≠l} f_j − f_l` away from the original class l), μ = 1 and
//! α = 2.5·ε/steps unless the caller gives `step` (many small-enough steps transfer better to
//! another model's target: Zhao et al., NeurIPS 2021); at every step but the first the image is
//! resized to a random short side before the model's centre crop. The steps never stop early and
//! a target the model already predicts is pushed further: this is the attack made to transfer to
//! *another* model (the query-based attack's start on a remote), not to fool this one by as little
//! as possible.
//! One 8-bit check at the end.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::Tensor;

use super::record::{Extras, Record};
use super::target::{argmax, softmax};
use super::{AttackError, AttackOutcome, AttackParams, AttackRow, Method, Need, best_other};

/// Input diversity: the short side of each step's resize is drawn from
/// `[model size, DIVERSITY × model resize]` (224..=300 for a 256 → 224 model; the paper resizes a
/// 299 input to 299..330 and pads). The resized image is at most this factor larger than the model's own, which
/// `limits.max_resized_side` bounds.
pub const DIVERSITY: f64 = 1.17;
/// The default radius: the query-based search's (13/255, the Square Attack paper's 0.05).
pub const DEFAULT_EPSILON: f64 = 13.0 / 255.0;
/// Default steps.
pub const DEFAULT_STEPS: u32 = 20;
/// Momentum's decay (the MI-FGSM paper's).
pub const MOMENTUM: f64 = 1.0;

pub struct PgdRow {
    x0: Tensor,
    x: Tensor,
    /// The accumulated, L1-normalised gradient.
    momentum: Option<Tensor>,
    params: AttackParams,
    label: Option<usize>,
    /// Short sides of the model's resize: the lowest and highest a step may draw.
    sides: (i64, i64),
    rng: StdRng,
    done: bool,
    record: Record,
}

impl PgdRow {
    /// `size`, `resize`: the model's crop size and resize short side.
    pub fn new(x0: Tensor, params: AttackParams, size: i64, resize: i64) -> Self {
        let high = ((resize as f64) * DIVERSITY).round() as i64;
        Self {
            x: x0.shallow_clone(),
            x0,
            momentum: None,
            params,
            label: None,
            sides: (size, high.max(size)),
            // The same image gets the same attack.
            rng: StdRng::seed_from_u64(0),
            done: false,
            record: Record::default(),
        }
    }

    fn epsilon(&self) -> f64 {
        self.params.epsilons.last().copied().unwrap_or(DEFAULT_EPSILON)
    }
}

impl AttackRow for PgdRow {
    fn need(&self) -> Need {
        if self.record.iterations < self.params.max_iter { Need::Forward } else { Need::Check }
    }

    fn image(&self) -> &Tensor {
        &self.x
    }

    /// The first step sees the original through the model's own pipeline (its logits are the
    /// original's classification, as `/classify` gives it); every later one a random resize.
    fn step_resize(&mut self) -> Option<i64> {
        (self.record.iterations > 0).then(|| self.rng.random_range(self.sides.0..=self.sides.1))
    }

    fn on_logits(&mut self, logits: &[f32]) -> Result<Vec<Vec<f32>>, AttackError> {
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        let label = match self.label {
            Some(l) => l,
            None => {
                let l = self.record.classified(&softmax(logits));
                self.label = Some(l);
                l
            }
        };
        let (up, down) = match self.params.target {
            Some(t) => (t, best_other(logits, t).0),
            None => (best_other(logits, label).0, label),
        };
        let mut c = vec![0f32; logits.len()];
        c[up] += 1.0;
        c[down] -= 1.0;
        Ok(vec![c])
    }

    fn on_gradients(&mut self, grads: Vec<Tensor>) -> Result<(), AttackError> {
        let g = grads.into_iter().next().ok_or(AttackError::NonFinite)?;
        let eps = self.epsilon();
        let alpha = self.params.step.unwrap_or(2.5 * eps / f64::from(self.params.max_iter.max(1)));
        // Each step's gradient enters with unit mean magnitude, so an early large one does not
        // fix the direction for good.
        let scale = g.f_abs()?.f_mean(tch::Kind::Double)?.f_double_value(&[])?.max(1e-12);
        let g = g.f_div_scalar(scale)?;
        let g = match self.momentum.take() {
            Some(m) => m.f_mul_scalar(MOMENTUM)?.f_add(&g)?,
            None => g,
        };
        let stepped = self.x.f_add(&g.f_sign()?.f_mul_scalar(alpha)?)?;
        self.momentum = Some(g);
        let delta = stepped.f_sub(&self.x0)?.f_clamp(-eps, eps)?;
        self.x = self.x0.f_add(&delta)?.f_clamp(0.0, 1.0)?;
        self.record.iterations += 1;
        Ok(())
    }

    fn on_check(&mut self, logits: &[f32], rgb: Vec<u8>) -> Result<(), AttackError> {
        let probs = softmax(logits);
        let pred = argmax(&probs);
        let success = match (self.params.target, self.label) {
            (Some(t), _) => pred == t,
            (None, Some(l)) => pred != l,
            (None, None) => false,
        };
        self.record.checked(rgb, probs, success);
        self.done = true;
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn iterations(&self) -> u32 {
        self.record.iterations
    }

    fn record(&self) -> &Record {
        &self.record
    }

    fn record_mut(&mut self) -> &mut Record {
        &mut self.record
    }

    fn outcome(self: Box<Self>) -> Result<AttackOutcome, AttackError> {
        let extras = Extras { target: self.params.target, epsilon: Some(self.epsilon()), ..Extras::default() };
        self.record.outcome(Method::Pgd, extras)
    }
}
