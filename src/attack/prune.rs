//! Pruning on the lattice: after the scale refinement, take back the grey levels the goal needs
//! least, judged by the gradient of the attack's last step.
//!
//! The delivered perturbation is a sum of steps along gradients taken at other points, then
//! rounded; some of its grey levels add little to the goal at the image where it ends. Reverting
//! one level of a changed value saves `2|δ|−1` squared levels and loses, to first order, the
//! gradient times that level. Ranking the changed values by that ratio (lost gain per level²
//! saved, harmful changes first) gives a one-parameter family — revert the lowest fraction ρ —
//! whose ρ is bisected by 8-bit checks, because the first-order loss alone is not reliable enough
//! to trust without one (an earlier version that reverted by prediction failed its checks). A
//! check that fails only ends the bisection: the delivered image stays the last success.

use tch::{Kind, Tensor};

use super::AttackError;
use super::bracket::Bracket;

/// The largest fraction of the changed values pruning may revert.
const MAX_FRACTION: f64 = 0.5;
/// Bisection stops when the known-good and known-bad fractions are this close.
const RESOLUTION: f64 = 0.02;
/// The bisection never runs more rounds than this (0.5 / 2⁵ < [`RESOLUTION`]).
const MAX_BATCHED_ROUNDS: u32 = 5;

pub struct Prune {
    x0: Tensor,
    /// Delivered − original, in grey levels (integers).
    levels: Tensor,
    /// Per value: gain lost per squared level saved by reverting one level; +∞ where unchanged.
    score: Tensor,
    /// The finite scores, ascending.
    sorted: Vec<f32>,
    /// The fraction reverted: 0 is the delivered image (a success), MAX_FRACTION assumed to fail.
    fraction: Bracket,
}

impl Prune {
    /// From the original image, the delivered (8-bit) image and the goal gap's gradient near it
    /// (the last step's). None when nothing was changed.
    pub fn new(x0: &Tensor, delivered: &Tensor, grad: &Tensor) -> Result<Option<Self>, AttackError> {
        let levels = delivered.f_sub(x0)?.f_mul_scalar(255.0)?.f_round()?;
        let changed = levels.f_ne(0.0)?;
        let cost = levels.f_abs()?.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?.f_clamp_min(1.0)?;
        let score = grad.f_mul(&levels.f_sign()?)?.f_div(&cost)?;
        let finite = score.f_masked_select(&changed)?.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?;
        let n = finite.numel();
        if n == 0 {
            return Ok(None);
        }
        let mut sorted = vec![0f32; n];
        finite.f_copy_data(&mut sorted, n)?;
        if sorted.iter().any(|v| !v.is_finite()) {
            return Err(AttackError::NonFinite);
        }
        sorted.sort_by(f32::total_cmp);
        let score = score.f_masked_fill(&changed.f_logical_not()?, f64::INFINITY)?;
        Ok(Some(Self {
            x0: x0.shallow_clone(),
            levels,
            score,
            sorted,
            fraction: Bracket::new(0.0, MAX_FRACTION, RESOLUTION),
        }))
    }

    /// The next image to check (the original plus the pruned levels), or None when the
    /// bisection has converged.
    pub fn next(&self) -> Result<Option<Tensor>, AttackError> {
        match self.fraction.next() {
            Some(fraction) => self.at(fraction),
            None => Ok(None),
        }
    }

    /// Every fraction the bisection of `rounds` checks could reach that reverts something new,
    /// the most reverted first (the batched checks try them at once; see `guard`).
    pub fn fractions(&self, rounds: u32) -> Vec<f64> {
        let steps = 1u32 << rounds.min(MAX_BATCHED_ROUNDS);
        let mut out: Vec<f64> = Vec::new();
        let mut last = usize::MAX;
        for j in (1..steps).rev() {
            let fraction = MAX_FRACTION * f64::from(j) / f64::from(steps);
            let k = self.reverted(fraction);
            if k > 0 && k != last {
                out.push(fraction);
                last = k;
            }
        }
        out
    }

    /// How many changed values `fraction` reverts.
    fn reverted(&self, fraction: f64) -> usize {
        (fraction * self.sorted.len() as f64).floor() as usize
    }

    /// The original plus the delivered levels, the lowest `fraction` of them reverted (None when
    /// that reverts nothing).
    pub fn at(&self, fraction: f64) -> Result<Option<Tensor>, AttackError> {
        let k = self.reverted(fraction);
        if k == 0 {
            return Ok(None);
        }
        let threshold = f64::from(self.sorted[k - 1]);
        let revert = self.score.f_le(threshold)?.f_to_kind(Kind::Float)?;
        let levels = self.levels.f_sub(&self.levels.f_sign()?.f_mul(&revert)?)?;
        Ok(Some(self.x0.f_add(&levels.f_div_scalar(255.0)?)?.f_clamp(0.0, 1.0)?))
    }

    /// The 8-bit check of the last [`Prune::next`] image.
    pub fn checked(&mut self, success: bool) {
        self.fraction.checked(success);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverts_the_levels_that_buy_least_first() {
        // Four changed values (+1, +1, −2, +1 levels) and one unchanged; the gradient says the
        // second +1 works against the goal and the first buys little.
        let x0 = Tensor::from_slice(&[0.5f32, 0.5, 0.5, 0.5, 0.5]);
        let d = Tensor::from_slice(&[1.0f32, 1.0, -2.0, 1.0, 0.0]).f_div_scalar(255.0).unwrap();
        let delivered = x0.f_add(&d).unwrap();
        let grad = Tensor::from_slice(&[0.1f32, -0.3, -0.9, 2.0, 5.0]);
        let mut p = Prune::new(&x0, &delivered, &grad).unwrap().unwrap();
        // Scores: 0.1, −0.3, 0.3 (0.9 / 3), 2.0. Fraction 0.25 → one value: the harmful one.
        let levels = |x: Tensor| -> Vec<f32> {
            Vec::<f32>::try_from(&x.f_sub(&x0).unwrap().f_mul_scalar(255.0).unwrap().f_round().unwrap()).unwrap()
        };
        assert_eq!(levels(p.next().unwrap().unwrap()), vec![1.0, 0.0, -2.0, 1.0, 0.0]);
        p.checked(false);
        // Fraction 0.125 → no value: converged on nothing to revert.
        assert!(p.next().unwrap().is_none());
    }

    #[test]
    fn bisects_the_fraction_reverted() {
        // 100 values changed by +1 level, gradient i: fraction 0.25 reverts the 25 lowest; after
        // a success, 0.375 reverts 37; after a failure there, 0.3125 reverts 31.
        let x0 = Tensor::full([100], 0.5, (Kind::Float, tch::Device::Cpu));
        let delivered = x0.f_add_scalar(1.0 / 255.0).unwrap();
        let grad = Tensor::arange(100, (Kind::Float, tch::Device::Cpu));
        let mut p = Prune::new(&x0, &delivered, &grad).unwrap().unwrap();
        let reverted = |p: &Prune| -> Vec<i64> {
            let x = p.next().unwrap().unwrap();
            let same = x.f_sub(&x0).unwrap().f_abs().unwrap().f_lt(1e-6).unwrap();
            Vec::<i64>::try_from(&same.f_nonzero().unwrap().f_flatten(0, -1).unwrap()).unwrap()
        };
        assert_eq!(reverted(&p), (0..25).collect::<Vec<_>>());
        p.checked(true);
        assert_eq!(reverted(&p), (0..37).collect::<Vec<_>>());
        p.checked(false);
        assert_eq!(reverted(&p), (0..31).collect::<Vec<_>>());
    }

    #[test]
    fn the_bisection_spends_at_most_five_checks() {
        // The configuration documents that `prune_rounds` past 5 are never used.
        let x0 = Tensor::full([1000], 0.5, (Kind::Float, tch::Device::Cpu));
        let delivered = x0.f_add_scalar(1.0 / 255.0).unwrap();
        let grad = Tensor::arange(1000, (Kind::Float, tch::Device::Cpu));
        for outcome in [true, false] {
            let mut p = Prune::new(&x0, &delivered, &grad).unwrap().unwrap();
            let mut checks = 0;
            while p.next().unwrap().is_some() {
                p.checked(outcome);
                checks += 1;
                assert!(checks <= 5, "more than five checks (all {outcome})");
            }
            assert_eq!(checks, 5, "all {outcome}");
        }
    }

    #[test]
    fn batched_candidates_are_the_bisections_points_most_reverted_first() {
        // 100 values changed by +1 level: 2 rounds reach the fractions 0.375, 0.25 and 0.125.
        let x0 = Tensor::full([100], 0.5, (Kind::Float, tch::Device::Cpu));
        let delivered = x0.f_add_scalar(1.0 / 255.0).unwrap();
        let grad = Tensor::arange(100, (Kind::Float, tch::Device::Cpu));
        let p = Prune::new(&x0, &delivered, &grad).unwrap().unwrap();
        let reverted: Vec<i64> = p
            .fractions(2)
            .into_iter()
            .map(|f| {
                let x = p.at(f).unwrap().unwrap();
                x.f_sub(&x0).unwrap().f_abs().unwrap().f_lt(1e-6).unwrap().f_sum(Kind::Int64).unwrap().int64_value(&[])
            })
            .collect();
        assert_eq!(reverted, vec![37, 25, 12]);
        // Past five rounds the bisection would stop: 31 candidates at most.
        assert_eq!(p.fractions(9).len(), 31);
        // Ten changed values: of the 31 fractions (all under 0.5) only those reverting 4, 3, 2 and 1
        // differ.
        let x0 = Tensor::full([10], 0.5, (Kind::Float, tch::Device::Cpu));
        let delivered = x0.f_add_scalar(1.0 / 255.0).unwrap();
        let p = Prune::new(&x0, &delivered, &Tensor::arange(10, (Kind::Float, tch::Device::Cpu))).unwrap().unwrap();
        let ks: Vec<usize> = p.fractions(5).into_iter().map(|f| p.reverted(f)).collect();
        assert_eq!(ks, vec![4, 3, 2, 1]);
    }

    #[test]
    fn nothing_changed_means_nothing_to_prune() {
        let x0 = Tensor::from_slice(&[0.5f32, 0.25]);
        assert!(Prune::new(&x0, &x0, &Tensor::from_slice(&[1.0f32, 1.0])).unwrap().is_none());
    }
}
