//! DeepFool (Moosavi-Dezfooli et al. 2016), untargeted: at each step, linearise the boundaries
//! between the original class l and the candidate classes k (the top `candidates` at the start),
//! and step onto the nearest one: `l* = argmin_k need_k/‖w_k‖`, `w_k = ∇(f_k − f_l)`. That costs
//! one backward pass per candidate. With a target it is the LabelFool step (see `labelfool.rs`).
//! Same pipeline as every attack here: original size, [0,1], 8-bit re-checks via the guard.

use tch::Tensor;

use super::guard::{Guard, Next, deepfool_step, mask_saturated};
use super::target::{argmax, softmax};
use super::{AttackError, AttackOutcome, AttackParams, AttackRow, Method, Need, Scored, best_other, scored};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Initial,
    Stepping,
    Checking,
    FinalCheck,
    Done,
}

/// The step DeepFool takes given each candidate's gap `f_k − f_l` (< 0 while not crossed), its
/// linearised distance still to cover (`need_k`) and its masked gradient with ‖w_k‖²: the index
/// of the nearest boundary. Candidates with a zero gradient are never chosen.
pub fn nearest_boundary(needs: &[f64], norms2: &[f64]) -> Option<usize> {
    needs
        .iter()
        .zip(norms2)
        .enumerate()
        .filter(|(_, (_, n2))| n2.is_finite() && **n2 > 0.0)
        .min_by(|a, b| (a.1.0 / a.1.1.sqrt()).total_cmp(&(b.1.0 / b.1.1.sqrt())))
        .map(|(i, _)| i)
}

pub struct DeepFoolRow {
    x: Tensor,
    params: AttackParams,
    phase: Phase,
    label: usize,
    candidates: Vec<usize>,
    original: Option<Scored>,
    guard: Guard,
    /// Per candidate: the linearised gap still to cover, from the last forward.
    needs: Vec<f64>,
    iterations: u32,
    checks: u32,
    last: Option<(Vec<u8>, Vec<f32>)>,
    success: bool,
}

impl DeepFoolRow {
    pub fn new(x0: Tensor, params: AttackParams) -> Self {
        Self {
            x: x0,
            phase: Phase::Initial,
            label: 0,
            candidates: Vec::new(),
            original: None,
            guard: Guard::new(params.margins.clone()),
            needs: Vec::new(),
            iterations: 0,
            checks: 0,
            last: None,
            success: false,
            params,
        }
    }
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

impl AttackRow for DeepFoolRow {
    fn need(&self) -> Need {
        match self.phase {
            Phase::Initial | Phase::Stepping => Need::Forward,
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
        if self.phase == Phase::Initial {
            self.label = argmax(logits);
            self.original = Some(scored(&softmax(logits), self.label));
            self.candidates = top_candidates(logits, self.label, self.params.candidates.saturating_sub(1).max(1));
            self.phase = Phase::Stepping;
        }
        let l = self.label;
        let (_, best) = best_other(logits, l);
        let gap = f64::from(best - logits[l]);
        match self.guard.next(gap, &self.x)? {
            Next::Check => {
                self.phase = Phase::Checking;
                Ok(Vec::new())
            }
            Next::Step { .. } if self.iterations >= self.params.max_iter => {
                self.phase = Phase::FinalCheck;
                Ok(Vec::new())
            }
            Next::Step { need } => {
                // need is for the strongest class; each candidate needs that plus its shortfall.
                self.needs = self.candidates.iter().map(|&k| need + gap - f64::from(logits[k] - logits[l])).collect();
                Ok(candidate_objectives(logits.len(), l, &self.candidates))
            }
        }
    }

    fn on_gradients(&mut self, grads: Vec<Tensor>) -> Result<(), AttackError> {
        let mut masked = Vec::with_capacity(grads.len());
        for g in grads {
            masked.push(mask_saturated(&self.x, &g)?);
        }
        self.iterations += 1;
        let norms: Vec<f64> = masked.iter().map(|m| m.1).collect();
        let Some(i) = nearest_boundary(&self.needs, &norms) else {
            self.phase = Phase::FinalCheck;
            return Ok(());
        };
        let (w, norm2) = masked.swap_remove(i);
        self.x = deepfool_step(&self.x, &w, norm2, self.needs[i], self.params.overshoot)?;
        self.guard.stepped(w);
        Ok(())
    }

    fn on_check(&mut self, logits: &[f32], rgb: Vec<u8>) -> Result<(), AttackError> {
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        self.checks += 1;
        let probs = softmax(logits);
        self.success = argmax(&probs) != self.label;
        let last_chance = self.phase == Phase::FinalCheck || self.iterations >= self.params.max_iter;
        self.phase = if self.success || last_chance {
            Phase::Done
        } else {
            let (_, best) = best_other(logits, self.label);
            self.guard.missed(f64::from(best - logits[self.label]));
            Phase::Stepping
        };
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
            method: Method::Deepfool,
            original,
            target: None,
            decision: None,
            final_: scored(&probs, argmax(&probs)),
            target_probability: None,
            success: self.success,
            iterations: self.iterations,
            checks: self.checks,
            margin,
            epsilon: None,
            rgb,
        })
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
