//! Pieces the iterative attacks share: the box-constrained gradient step and the quantisation
//! guard that decides when an 8-bit check is worth a forward pass.
//!
//! Users download 8-bit images, and rounding removes every part of a perturbation smaller than
//! half a grey level — systematically, not as noise — so a float attack's last, tiny step rarely
//! survives. The guard keeps the delivered image adversarial without a fixed margin:
//!
//! * **Predicted rounding loss.** With the last step direction w (the gradient of the goal's
//!   gap), the gap of the rounded image is linearly `gap + w·(q(x) − x)`. A check is spent only
//!   when that prediction reaches the margin κ; otherwise the attack steps on, adding the loss to
//!   what it needs.
//! * **Margins learnt from misses.** κ starts at the first of the configured margins. When a real
//!   8-bit check still misses, the miss measures the prediction's error and κ becomes the smallest
//!   listed margin that covers it with 10% to spare. Responses report the margin that was needed.
//! * **A miss is always followed by a step.** The next forward after a missed check steps by at
//!   least the measured shortfall, even when κ cannot rise any more (the last margin, or a list of
//!   one): re-checking the same image would loop. So every check but the first and the final one
//!   follows a step, and an attack ends within `max_iter` steps and `max_iter + 2` checks whatever
//!   the margins.
//! * **Refinement on the lattice.** The margin and the overshoot that got the 8-bit image across
//!   are more than it may need. Once it succeeds, up to `refine_rounds` further checks bisect the
//!   scale α ∈ [0.8, 1] of the successful float perturbation, x0 + α·(x − x0), rounded; the
//!   delivered image is the smallest scale that succeeded, so the guarantee holds and
//!   perceptibility only falls.
//! * **Pruning on the lattice.** Then up to `prune_rounds` checks take back the grey levels the
//!   last step's gradient says the goal needs least (see [`super::prune`]).
//! * **Batched checks** (`attack.batched_checks`, off by default). The two bisections cost one
//!   tick per check. Batched, each is one tick that checks every candidate its bisection could
//!   reach (with the default rounds 7 scales, then up to 31 distinct fractions): the smallest
//!   passing scale, then the largest passing fraction, is delivered. That is at least as far down
//!   as the bisection would go whenever success is monotone in the scale or fraction, for the
//!   price of up to 38 images in two ticks instead of 8 in eight.

use tch::{Kind, Tensor};

use super::AttackError;
use super::bracket::Bracket;
use crate::model::preprocess::{quantize, rgb8_to_tensor};

/// The smallest scale refinement considers: it shrinks the perturbation by at most a fifth.
const REFINE_FLOOR: f64 = 0.8;
/// The refinement bisection's resolution (0.02) stops it after this many rounds.
const REFINE_MAX_ROUNDS: u32 = 4;

/// `w` with the pixels that cannot move in its direction zeroed (already at 0 with w < 0, or at
/// 1 with w > 0: the step would be clipped away there, so they must not count in ‖w‖), and ‖w‖².
pub fn mask_saturated(x: &Tensor, w: &Tensor) -> Result<(Tensor, f64), AttackError> {
    let stuck = x.f_le(0.0)?.f_logical_and(&w.f_lt(0.0)?)?.f_logical_or(&x.f_ge(1.0)?.f_logical_and(&w.f_gt(0.0)?)?)?;
    let w = w.f_masked_fill(&stuck, 0.0)?;
    let norm2 = w.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
    Ok((w, norm2))
}

/// `clip(x + (1 + overshoot)·(need + 1e-4)/‖w‖² · w, 0, 1)`: the DeepFool step that moves the
/// linearised gap by `need` (plus DeepFool's 1e-4 and the overshoot).
pub fn deepfool_step(x: &Tensor, w: &Tensor, norm2: f64, need: f64, overshoot: f64) -> Result<Tensor, AttackError> {
    let scale = (1.0 + overshoot) * (need + 1e-4) / norm2;
    Ok(x.f_add(&w.f_mul_scalar(scale)?)?.f_clamp(0.0, 1.0)?.f_detach()?)
}

/// What to do after a forward pass at the float image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// The 8-bit image is predicted to keep the margin: check it.
    Check,
    /// Step on: the linearised gap must grow by this much (rounding loss included).
    Step { need: f64 },
}

pub struct Guard {
    /// A float reference attack: no rounding, so no rounding loss to predict.
    float: bool,
    margins: Vec<f64>,
    idx: usize,
    w: Option<Tensor>,
    predicted_gap: f64,
    /// Set by a missed check: the 8-bit image's shortfall below κ, to be stepped off next.
    shortfall: Option<f64>,
}

impl Guard {
    pub fn new(margins: Vec<f64>) -> Self {
        let margins = if margins.is_empty() { vec![0.0] } else { margins };
        Self { float: false, margins, idx: 0, w: None, predicted_gap: 0.0, shortfall: None }
    }

    /// The guard of a float reference attack: margin 0, no rounding loss.
    pub fn float() -> Self {
        Self { float: true, ..Self::new(vec![0.0]) }
    }

    /// Whether this guards a float reference attack.
    pub fn is_float(&self) -> bool {
        self.float
    }

    /// κ: the logit margin the 8-bit image must be predicted to have before it is checked.
    pub fn margin(&self) -> f64 {
        self.margins[self.idx.min(self.margins.len() - 1)]
    }

    /// `gap` is the goal's logit gap at the float image `x` (> 0: goal reached in float).
    pub fn next(&mut self, gap: f64, x: &Tensor) -> Result<Next, AttackError> {
        let loss = match &self.w {
            None => 0.0,
            Some(_) if self.float => 0.0,
            Some(w) => {
                let delta = quantize(x)?.f_sub(x)?;
                (-w.f_mul(&delta)?.f_sum(Kind::Double)?.f_double_value(&[])?).max(0.0)
            }
        };
        let kappa = self.margin();
        if let Some(shortfall) = self.shortfall.take() {
            // Predicted need when there is one (κ has risen to cover the error); else the miss's
            // own shortfall, so the step is real.
            let predicted = kappa + loss - gap;
            return Ok(Next::Step { need: if predicted > 0.0 { predicted } else { shortfall } });
        }
        if gap > 0.0 && gap - loss >= kappa {
            self.predicted_gap = gap - loss;
            Ok(Next::Check)
        } else {
            Ok(Next::Step { need: kappa + loss - gap })
        }
    }

    /// The direction of the last step: the gradient of the goal's gap.
    pub fn direction(&self) -> Option<&Tensor> {
        self.w.as_ref()
    }

    /// The direction of the step just taken (predicts the next rounding loss).
    pub fn stepped(&mut self, w: Tensor) {
        self.w = Some(w);
    }

    /// A check missed with `actual_gap` on the 8-bit image: raise κ to cover the prediction's error.
    pub fn missed(&mut self, actual_gap: f64) {
        let error = self.predicted_gap - actual_gap;
        let current = self.margin();

        let last = self.margins.len() - 1;
        self.idx = self
            .margins
            .iter()
            .position(|&k| k > current && k >= 1.1 * error)
            .unwrap_or(last)
            .max(self.idx + 1)
            .min(last);
        self.shortfall = Some((self.margin() - actual_gap).max(0.0));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The first forward pass: classify the original image (and choose the goal).
    Initial,
    Stepping,
    /// The 8-bit image is predicted to reach the goal: check it.
    Checking,
    /// Out of iterations (or stuck): classify what will be delivered, then stop.
    FinalCheck,
    /// Succeeded: check an image with some rounding taken back.
    Refining,
    /// Check an image with the least useful grey levels taken back.
    Pruning,
    Done,
}

/// The state every guarded DeepFool-style attack shares — image, budget, guard, bookkeeping — so
/// that a row only says what its goal is (the gap to grow and which gradients to follow).
pub struct Stepper {
    pub x: Tensor,
    /// The original image (the float reference measures its perceptibility against it).
    pub x0: Tensor,
    pub phase: Phase,
    pub guard: Guard,
    pub max_iter: u32,
    pub overshoot: f64,
    /// Original class, last check, counts, success.
    pub record: super::record::Record,
    refine_left: u32,
    prune_left: u32,
    prune: Option<super::prune::Prune>,
    /// The float image whose rounding first succeeded, and the bisection of its scale.
    x_float: Tensor,
    scale: Bracket,
    /// Refinement and pruning check all their candidates in one tick each.
    batched: bool,
    /// This tick's candidates, in order of preference (batched checks only).
    candidates: Candidates,
    /// Their checks so far.
    candidate_checks: Vec<CandidateCheck>,
}

/// A candidate's check: its pixels, probabilities and success (None: not finite, a failure).
type CandidateCheck = Option<(Vec<u8>, Vec<f32>, bool)>;

/// A check as a row judged it: its probabilities, whether it reached the goal, and the goal's
/// gap on it; or why it could not be judged.
pub type Judged = Result<(Vec<f32>, bool, f64), AttackError>;

/// A batched tick's candidates, as the parameters they are built from when the runner asks for
/// them (one at a time: 31 full-size float images never live on the device together).
#[derive(Debug, Default)]
enum Candidates {
    #[default]
    None,
    /// Scales of the successful float perturbation, smallest first.
    Scales(Vec<f64>),
    /// Pruning fractions, the most reverted first.
    Fractions(Vec<f64>),
}

impl Candidates {
    fn len(&self) -> usize {
        match self {
            Self::None => 0,
            Self::Scales(v) | Self::Fractions(v) => v.len(),
        }
    }
}

impl Stepper {
    pub fn new(x0: Tensor, params: &super::AttackParams) -> Self {
        Self {
            x: x0.shallow_clone(),
            x0,
            phase: Phase::Initial,
            guard: if params.float_reference { Guard::float() } else { Guard::new(params.margins.clone()) },
            max_iter: params.max_iter,
            overshoot: params.overshoot,
            record: Default::default(),
            refine_left: if params.float_reference { 0 } else { params.refine_rounds },
            prune_left: if params.float_reference { 0 } else { params.prune_rounds },
            prune: None,
            x_float: Tensor::new(),
            scale: Bracket::new(1.0, REFINE_FLOOR, 0.02),
            batched: params.batched_checks,
            candidates: Candidates::None,
            candidate_checks: Vec::new(),
        }
    }

    pub fn need(&self) -> super::Need {
        match self.phase {
            Phase::Initial | Phase::Stepping => super::Need::Forward,
            Phase::Checking | Phase::FinalCheck | Phase::Refining | Phase::Pruning | Phase::Done => super::Need::Check,
        }
    }

    /// After a forward pass with the goal's float `gap`: `Some(need)` to step, None to check.
    pub fn after_forward(&mut self, gap: f64) -> Result<Option<f64>, AttackError> {
        self.phase = Phase::Stepping;
        match self.guard.next(gap, &self.x)? {
            Next::Check => {
                self.phase = Phase::Checking;
                Ok(None)
            }
            Next::Step { .. } if self.record.iterations >= self.max_iter => {
                self.phase = Phase::FinalCheck;
                Ok(None)
            }
            Next::Step { need } => Ok(Some(need)),
        }
    }

    /// Takes the step along the masked gradient `w` (‖w‖² = `norm2`) that grows the gap by `need`.
    pub fn step(&mut self, w: Tensor, norm2: f64, need: f64) -> Result<(), AttackError> {
        self.record.iterations += 1;
        if !(norm2.is_finite() && norm2 > 0.0) {
            // A zero gradient cannot be followed: deliver what we have.
            self.phase = Phase::FinalCheck;
            return Ok(());
        }
        self.x = deepfool_step(&self.x, &w, norm2, need, self.overshoot)?;
        self.guard.stepped(w);
        Ok(())
    }

    fn next_prune(&mut self) -> Result<(), AttackError> {
        self.phase = Phase::Done;
        if self.prune_left == 0 {
            return Ok(());
        }
        if self.batched {
            let rounds = std::mem::take(&mut self.prune_left);
            let fractions = self.prune.as_ref().map(|p| p.fractions(rounds)).unwrap_or_default();
            if !fractions.is_empty() {
                self.candidates = Candidates::Fractions(fractions);
                self.phase = Phase::Pruning;
            }
            return Ok(());
        }
        if let Some(x) = self.prune.as_ref().map(|p| p.next()).transpose()?.flatten() {
            self.prune_left -= 1;
            self.x = x;
            self.phase = Phase::Pruning;
        }
        Ok(())
    }

    /// Records an 8-bit check of [`Self::check_image`] as the row judged it. A batch's candidate
    /// that could not be judged (non-finite logits) counts as a failed check, not as the attack's
    /// failure; the batch is decided once all its checks are in.
    pub fn checked(&mut self, rgb: Vec<u8>, judged: Judged) -> Result<(), AttackError> {
        if self.candidates.len() > 0 {
            self.candidate_checks.push(judged.ok().map(|(probs, success, _)| (rgb, probs, success)));
            if self.candidate_checks.len() == self.candidates.len() {
                return self.batch_checked();
            }
            return Ok(());
        }
        let (probs, success, gap) = judged?;
        if let phase @ (Phase::Refining | Phase::Pruning) = self.phase {
            // The best image stays the delivered one unless this one succeeds too.
            self.record.refinements += 1;
            if success {
                self.record.last = Some((rgb, probs));
            }
            if phase == Phase::Pruning {
                if let Some(p) = self.prune.as_mut() {
                    p.checked(success);
                }
                return self.next_prune();
            }
            self.scale.checked(success);
            return self.refine();
        }
        self.record.checked(rgb, probs, success);
        let last_chance = self.phase == Phase::FinalCheck || self.record.iterations >= self.max_iter;
        if success {
            self.x_float = self.x.shallow_clone();
            return self.refine();
        } else if last_chance {
            self.phase = Phase::Done;
        } else {
            self.guard.missed(gap);
            self.phase = Phase::Stepping;
        }
        Ok(())
    }

    /// How many images this tick checks: the current one, or a batch of candidates.
    pub fn check_count(&self) -> usize {
        self.candidates.len().max(1)
    }

    /// Check image `k` of [`Self::check_count`].
    pub fn check_image(&self, k: usize) -> Result<Tensor, AttackError> {
        let candidate = match &self.candidates {
            Candidates::None => return Ok(self.x.shallow_clone()),
            Candidates::Scales(a) => a.get(k).map(|&alpha| self.scaled(alpha)).transpose()?,
            Candidates::Fractions(f) => match (f.get(k), &self.prune) {
                (Some(&fraction), Some(p)) => p.at(fraction)?,
                _ => None,
            },
        };
        candidate.ok_or_else(|| AttackError::Torch(format!("no check candidate {k}")))
    }

    /// A batch's checks are all in: candidates come in order of preference, the first that
    /// succeeds is delivered, and when none does the delivered image stays the last success.
    fn batch_checked(&mut self) -> Result<(), AttackError> {
        self.candidates = Candidates::None;
        let checks = std::mem::take(&mut self.candidate_checks);
        self.record.refinements += checks.len() as u32;
        if let Some((rgb, probs, _)) = checks.into_iter().flatten().find(|c| c.2) {
            self.record.current = Some(super::scored(&probs, super::target::argmax(&probs)));
            self.record.last = Some((rgb, probs));
        }
        match self.phase {
            Phase::Refining => self.start_pruning(),
            _ => {
                self.phase = Phase::Done;
                Ok(())
            }
        }
    }

    /// The next refinement to check; when there is none, the first pruning (or done).
    fn refine(&mut self) -> Result<(), AttackError> {
        self.phase = Phase::Done;
        if self.refine_left > 0 && self.batched {
            // Every scale the bisection could reach, smallest first.
            let steps = 1u32 << std::mem::take(&mut self.refine_left).min(REFINE_MAX_ROUNDS);
            let scales: Vec<f64> =
                (1..steps).map(|k| REFINE_FLOOR + (1.0 - REFINE_FLOOR) * f64::from(k) / f64::from(steps)).collect();
            if self.x_float.defined() && !scales.is_empty() {
                self.candidates = Candidates::Scales(scales);
                self.phase = Phase::Refining;
                return Ok(());
            }
        }
        if self.refine_left > 0 {
            self.refine_left -= 1;
            // A failed refinement only ends refining: the delivered image is already a success.
            if let Some(x) = self.refinement()? {
                self.x = x;
                self.phase = Phase::Refining;
                return Ok(());
            }
        }
        self.start_pruning()
    }

    /// Pruning starts from the delivered pixels: the last successful check's.
    fn start_pruning(&mut self) -> Result<(), AttackError> {
        self.phase = Phase::Done;
        if self.prune_left > 0
            && let Some(w) = self.guard.direction()
            && let Some((rgb, _)) = &self.record.last
        {
            let (h, width) = (self.x0.size()[2] as u32, self.x0.size()[3] as u32);
            let delivered = rgb8_to_tensor(rgb, width, h)?.f_to_device(self.x0.device())?;
            self.prune = super::prune::Prune::new(&self.x0, &delivered, w)?;
            return self.next_prune();
        }
        Ok(())
    }

    /// The next scale to try: the successful float perturbation shrunk by α, bisected between
    /// the last failing and the last succeeding scale (None when they are close enough).
    fn refinement(&self) -> Result<Option<Tensor>, AttackError> {
        let Some(alpha) = self.scale.next().filter(|_| self.x_float.defined()) else {
            return Ok(None);
        };
        self.scaled(alpha).map(Some)
    }

    /// The successful float perturbation scaled by `alpha`.
    fn scaled(&self, alpha: f64) -> Result<Tensor, AttackError> {
        let x = self.x0.f_add(&self.x_float.f_sub(&self.x0)?.f_mul_scalar(alpha)?)?;
        Ok(x.f_clamp(0.0, 1.0)?)
    }

    /// The margin that was needed, when the attack succeeded.
    pub fn margin(&self) -> Option<f64> {
        self.record.success.then(|| self.guard.margin())
    }

    /// A float reference attack: its checks classify the float image itself.
    pub fn is_float(&self) -> bool {
        self.guard.is_float()
    }

    /// A float reference attack's perceptibility (None for delivered attacks).
    pub fn float_perceptibility(&self) -> Result<Option<f64>, super::AttackError> {
        if !self.is_float() {
            return Ok(None);
        }
        super::float_perceptibility(&self.x, &self.x0).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn saturated_pixels_are_masked_only_in_the_blocked_direction() {
        let x = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 1.0, 0.5]);
        let w = Tensor::from_slice(&[-1.0f32, 1.0, 1.0, -1.0, 2.0]);
        let (m, n2) = mask_saturated(&x, &w).unwrap();
        assert_eq!(Vec::<f32>::try_from(&m).unwrap(), vec![0.0, 1.0, 0.0, -1.0, 2.0]);
        assert_eq!(n2, 6.0);
    }

    #[test]
    fn the_step_reaches_the_linearised_target() {
        // Linear gap g(x) = w·x: a step for need = 0.01 (no overshoot, nothing clipped) raises it
        // by 0.01 + 1e-4.
        let x = Tensor::full([4], 0.5, (Kind::Float, Device::Cpu));
        let w = Tensor::from_slice(&[0.1f32, -0.2, 0.05, 0.0]);
        let n2 = w.square().sum(Kind::Double).double_value(&[]);
        let y = deepfool_step(&x, &w, n2, 0.01, 0.0).unwrap();
        let gain = (&y - &x).dot(&w).double_value(&[]);
        assert!((gain - 0.0101).abs() < 1e-6, "{gain}");
        // With overshoot 0.02 the step is 2% longer.
        let y = deepfool_step(&x, &w, n2, 0.01, 0.02).unwrap();
        assert!(((&y - &x).dot(&w).double_value(&[]) - 0.0101 * 1.02).abs() < 1e-6);
    }

    #[test]
    fn margins_rise_past_the_measured_error() {
        let mut g = Guard::new(vec![0.25, 0.5, 1.0, 2.0]);
        let x = Tensor::full([3], 0.5, (Kind::Float, Device::Cpu));
        assert_eq!(g.next(-1.0, &x).unwrap(), Next::Step { need: 1.25 });
        assert_eq!(g.next(0.3, &x).unwrap(), Next::Check);
        // The 8-bit gap came out at −0.5: the prediction (0.3) was 0.8 off → smallest κ ≥ 0.88 is 1.
        g.missed(-0.5);
        assert_eq!(g.margin(), 1.0);
        assert_eq!(g.next(0.3, &x).unwrap(), Next::Step { need: 0.7 });
        g.next(-1.0, &x).unwrap();
        g.missed(10.0);
        assert_eq!(g.margin(), 2.0, "the largest margin caps it");
    }

    #[test]
    fn a_miss_at_the_last_margin_steps_instead_of_checking_again() {
        // One margin: κ cannot rise, and the float gap still predicts success. Before, the guard
        // answered Check again for the same image, forever.
        let mut g = Guard::new(vec![0.0]);
        let x = Tensor::full([3], 0.5, (Kind::Float, Device::Cpu));
        assert_eq!(g.next(0.3, &x).unwrap(), Next::Check);
        g.missed(-0.2);
        assert_eq!(g.next(0.3, &x).unwrap(), Next::Step { need: 0.2 });
        assert_eq!(g.next(0.3, &x).unwrap(), Next::Check, "after the step, checks resume");
    }
}
