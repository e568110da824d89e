//! The bookkeeping every attack row shares, whatever its method: the original classification, the
//! last 8-bit check (pixels and probabilities), the counts, whether it succeeded — and the one way
//! that becomes an [`AttackOutcome`].

use serde::Serialize;

use super::target::argmax;
use super::{AttackError, AttackOutcome, Method, Scored, TargetDecision, scored};

#[derive(Debug, Default)]
pub struct Record {
    pub original: Option<Scored>,
    /// The last checked 8-bit image and its probabilities.
    pub last: Option<(Vec<u8>, Vec<f32>)>,
    /// Gradient steps (one backward pass each, or one per candidate for DeepFool).
    pub iterations: u32,
    /// 8-bit re-checks.
    pub checks: u32,
    /// 8-bit checks after success that tried to take back rounding (see `guard`).
    pub refinements: u32,
    pub success: bool,
    /// The class and its probability at the latest logits (float image or 8-bit check).
    pub current: Option<Scored>,
}

/// Where an attack stands: what `/attack` streams as it runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Progress {
    pub iterations: u32,
    pub checks: u32,
    /// The class of the latest logits the attack saw, and its probability.
    pub label: Option<usize>,
    pub probability: Option<f64>,
    /// The logit margin κ demanded now (methods with the 8-bit guard).
    pub margin: Option<f64>,
}

/// What a method adds to the shared record in its outcome.
#[derive(Debug, Default)]
pub struct Extras {
    pub target: Option<usize>,
    pub decision: Option<TargetDecision>,
    pub margin: Option<f64>,
    pub epsilon: Option<f64>,
    pub float_perceptibility: Option<f64>,
}

impl Record {
    /// Notes the latest logits' class (for progress only; the outcome uses the checks).
    pub fn saw(&mut self, logits: &[f32]) {
        if logits.iter().all(|v| v.is_finite()) && !logits.is_empty() {
            let probs = super::target::softmax(logits);
            let label = argmax(&probs);
            self.current = Some(scored(&probs, label));
        }
    }

    pub fn progress(&self, margin: Option<f64>) -> Progress {
        Progress {
            iterations: self.iterations,
            checks: self.checks,
            label: self.current.map(|c| c.index),
            probability: self.current.map(|c| c.probability),
            margin,
        }
    }

    /// Records the original image's probabilities; returns its class.
    pub fn classified(&mut self, probs: &[f32]) -> usize {
        let label = argmax(probs);
        self.original = Some(scored(probs, label));
        label
    }

    /// Records an 8-bit check of the image that would be delivered.
    pub fn checked(&mut self, rgb: Vec<u8>, probs: Vec<f32>, success: bool) {
        self.checks += 1;
        self.success = success;
        self.last = Some((rgb, probs));
    }

    /// The outcome, measured on the last checked image; [`AttackError::Unfinished`] when the row
    /// never classified its image or never checked one.
    pub fn outcome(self, method: Method, extras: Extras) -> Result<AttackOutcome, AttackError> {
        let original = self.original.ok_or(AttackError::Unfinished)?;
        let (rgb, probs) = self.last.ok_or(AttackError::Unfinished)?;
        Ok(AttackOutcome {
            method,
            original,
            target: extras.target,
            decision: extras.decision,
            final_: scored(&probs, argmax(&probs)),
            target_probability: extras.target.and_then(|t| probs.get(t)).map(|&p| f64::from(p)),
            success: self.success,
            iterations: self.iterations,
            checks: self.checks,
            refinements: self.refinements,
            margin: extras.margin,
            epsilon: extras.epsilon,
            float_perceptibility: extras.float_perceptibility,
            rgb,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_row_says_so_and_a_finished_one_reports_its_last_check() {
        let r = Record::default();
        assert!(matches!(r.outcome(Method::Fgsm, Extras::default()), Err(AttackError::Unfinished)));
        let mut r = Record::default();
        assert_eq!(r.classified(&[0.1, 0.7, 0.2]), 1);
        r.iterations = 3;
        r.checked(vec![1, 2, 3], vec![0.2, 0.1, 0.7], true);
        let o = r.outcome(Method::Labelfool, Extras { target: Some(2), ..Extras::default() }).unwrap();
        assert_eq!((o.original.index, o.final_.index, o.checks, o.iterations, o.success), (1, 2, 1, 3, true));
        assert!((o.target_probability.unwrap() - 0.7).abs() < 1e-6);
        assert_eq!(o.rgb, vec![1, 2, 3]);
    }
}
