//! DeepFool (Moosavi-Dezfooli et al. 2016), untargeted: at each step, linearise the boundaries
//! between the original class l and the candidate classes k (the top `candidates` at the start),
//! and step onto the nearest one: `l* = argmin_k need_k/‖w_k‖`, `w_k = ∇(f_k − f_l)`. That costs
//! one backward pass per candidate. With a target it is the LabelFool step (see `labelfool.rs`).
//! Same pipeline as every attack here: original size, [0,1], 8-bit re-checks via the guard.

use tch::Tensor;

use super::guard::{Judged, Phase, Stepper, mask_saturated};
use super::record::{Extras, Record};
use super::target::{argmax, softmax};
use super::{AttackError, AttackOutcome, AttackParams, AttackRow, Method, Need, best_other};

/// The nearest linearised boundary given, per candidate, the gap still to cover (`need_k`) and
/// ‖w_k‖²: `argmin_k need_k/‖w_k‖`. Candidates with a zero gradient are never chosen.
pub fn nearest_boundary(needs: &[f64], norms2: &[f64]) -> Option<usize> {
    needs
        .iter()
        .zip(norms2)
        .enumerate()
        .filter(|(_, (_, n2))| n2.is_finite() && **n2 > 0.0)
        .min_by(|a, b| (a.1.0 / a.1.1.sqrt()).total_cmp(&(b.1.0 / b.1.1.sqrt())))
        .map(|(i, _)| i)
}

/// The `n` classes with the highest logits other than `label`, best first.
pub(crate) fn top_candidates(logits: &[f32], label: usize, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).filter(|&i| i != label).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx
}

/// One objective `e_k − e_label` per candidate.
pub(crate) fn candidate_objectives(classes: usize, label: usize, candidates: &[usize]) -> Vec<Vec<f32>> {
    candidates
        .iter()
        .map(|&k| {
            let mut o = vec![0.0f32; classes];
            o[k] = 1.0;
            o[label] = -1.0;
            o
        })
        .collect()
}

pub struct DeepFoolRow {
    s: Stepper,
    candidate_count: usize,
    label: usize,
    candidates: Vec<usize>,
    /// Per candidate: the linearised gap still to cover, from the last forward.
    needs: Vec<f64>,
}

impl DeepFoolRow {
    pub fn new(x0: Tensor, params: AttackParams) -> Self {
        Self {
            s: Stepper::new(x0, &params),
            candidate_count: params.candidates.saturating_sub(1).max(1),
            label: 0,
            candidates: Vec::new(),
            needs: Vec::new(),
        }
    }

    /// `max_{k≠l} f_k − f_l`: positive once the label has changed.
    fn gap(&self, logits: &[f32]) -> f64 {
        let (_, best) = best_other(logits, self.label);
        f64::from(best - logits[self.label])
    }

    /// A check's probabilities, whether the label changed, and the gap.
    fn judge(&self, logits: &[f32]) -> Judged {
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        let probs = softmax(logits);
        let success = argmax(&probs) != self.label;
        Ok((probs, success, self.gap(logits)))
    }
}

impl AttackRow for DeepFoolRow {
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
            self.label = self.s.record.classified(&softmax(logits));
            self.candidates = top_candidates(logits, self.label, self.candidate_count);
        }
        let (l, gap) = (self.label, self.gap(logits));
        let Some(need) = self.s.after_forward(gap)? else { return Ok(Vec::new()) };
        // `need` is for the strongest class; each candidate needs that plus its shortfall.
        self.needs = self.candidates.iter().map(|&k| need + gap - f64::from(logits[k] - logits[l])).collect();
        Ok(candidate_objectives(logits.len(), l, &self.candidates))
    }

    fn on_gradients(&mut self, grads: Vec<Tensor>) -> Result<(), AttackError> {
        let mut masked = Vec::with_capacity(grads.len());
        for g in grads {
            masked.push(mask_saturated(&self.s.x, &g)?);
        }
        let norms: Vec<f64> = masked.iter().map(|m| m.1).collect();
        match nearest_boundary(&self.needs, &norms) {
            Some(i) => {
                let (w, norm2) = masked.swap_remove(i);
                self.s.step(w, norm2, self.needs[i])
            }
            None => self.s.step(Tensor::new(), 0.0, 0.0),
        }
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
            margin: self.s.margin(),
            float_perceptibility: self.s.float_perceptibility()?,
            ..Extras::default()
        };
        self.s.record.outcome(Method::Deepfool, extras)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_linearised_boundary_wins() {
        // Distances need/‖w‖: 2/1 = 2, 3/2 = 1.5, 1/0.25 = 4 → candidate 1.
        assert_eq!(nearest_boundary(&[2.0, 3.0, 1.0], &[1.0, 4.0, 0.0625]), Some(1));
        // A zero gradient can never be followed.
        assert_eq!(nearest_boundary(&[0.1, 3.0], &[0.0, 4.0]), Some(1));
        assert_eq!(nearest_boundary(&[0.1], &[0.0]), None);
        assert_eq!(top_candidates(&[0.1, 3.0, 2.0, 5.0], 3, 2), vec![1, 2]);
    }
}
