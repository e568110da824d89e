//! The score-based half of query-based LabelFool: a targeted Square Attack (Andriushchenko et
//! al., ECCV 2020, L∞ version) on the remote's probabilities, run on the 8-bit lattice at the
//! upload's size, so every image it asks about is a deliverable PNG. Three departures from the
//! paper, all from the surrogate: it starts from the transfer prior's best candidate (projected
//! onto the ε-ball) instead of vertical stripes; half of its squares take the sign of the
//! surrogate's perturbation over the square instead of a random one; and the squares lie inside
//! the box the surrogate's perturbation spans — the part of the upload its preprocessing keeps
//! (the centre crop), which a remote's similar crop keeps too: a square on the cropped-away
//! border would be a query wasted. And it minimises the margin of the strongest other class over
//! the target (log-probabilities) where the paper's targeted attack minimises the target's
//! cross-entropy: the margin is what success means, and the cross-entropy also accepts squares
//! that lift a competitor along with the target.
//!
//! Pure pixel search: no model, no tensor. The remote is behind [`Oracle`], so the search is
//! tested on a synthetic classifier and run on a real endpoint alike.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The remote, seen by the search: probabilities for an image, or None when the query budget is
/// spent (then the search stops). Only used with concrete types in this crate, whose futures the
/// compiler sees to be `Send`.
#[allow(async_fn_in_trait)]
pub trait Oracle {
    type Error;
    async fn scores(&mut self, rgb: &[u8]) -> Result<Option<Vec<f32>>, Self::Error>;
}

#[derive(Debug, Clone, Copy)]
pub struct SearchParams {
    /// L∞ radius in grey levels (1..=255).
    pub epsilon: u8,
    /// Fraction of the image a square covers at first (the paper's p_init).
    pub p_init: f64,
    /// The search's own query budget, which scales the paper's square-size schedule.
    pub budget: u32,
    pub seed: u64,
}

/// The paper's default ε on ImageNet (0.05 of the [0,1] range, 12.75 grey levels, rounded up).
pub const DEFAULT_EPSILON: f64 = 0.05;
/// The paper's p_init for targeted L∞ attacks on ImageNet.
pub const P_INIT: f64 = 0.05;

/// Where the search ended.
#[derive(Debug, Clone)]
pub struct SearchOutcome {
    /// The best image found (interleaved RGB at the upload's size).
    pub rgb: Vec<u8>,
    /// The remote's probabilities for it.
    pub probabilities: Vec<f32>,
    pub success: bool,
    /// Queries the search asked (answers from a cache included, proposals refused by the budget not).
    pub asked: u32,
    /// Proposals that lowered the loss.
    pub accepted: u32,
}

/// The targeted loss: the log-probability margin of the strongest other class over the target
/// (the logit margin, read from probabilities); below zero once the target is the top class.
pub fn loss(p: &[f32], target: usize) -> f64 {
    let log = |v: f32| f64::from(v).max(1e-30).ln();
    let other =
        p.iter().enumerate().filter(|&(j, _)| j != target).map(|(_, &v)| log(v)).fold(f64::NEG_INFINITY, f64::max);
    other - log(p.get(target).copied().unwrap_or(0.0))
}

fn reached(p: &[f32], target: usize) -> bool {
    crate::engine::top_k(p, 1).first().is_some_and(|&(i, _)| i == target)
}

/// The paper's schedule: p halves at fixed fractions of the run (given for 10 000 iterations).
fn p_at(p_init: f64, i: u32, n: u32) -> f64 {
    let it = (f64::from(i) / f64::from(n.max(1)) * 10_000.0) as u32;
    let halvings = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000].iter().filter(|&&s| it > s).count();
    p_init / f64::from(1u32 << halvings)
}

/// Rows `r0..r1` and columns `c0..c1` where the squares go: the bounding box of the guide's
/// non-zero pixels, or the whole image without a guide, with an empty one, or when the box is
/// under a quarter of the image (a sparse guide says where the surrogate changed pixels, not
/// what its crop keeps; a centre crop keeps half the image or more).
fn region(guide: Option<&[i16]>, w: usize, h: usize) -> (usize, usize, usize, usize) {
    let mut b: Option<(usize, usize, usize, usize)> = None;
    for (i, px) in guide.unwrap_or(&[]).chunks_exact(3).enumerate() {
        if px.iter().any(|&d| d != 0) {
            let (r, c) = (i / w, i % w);
            b = Some(match b {
                None => (r, r + 1, c, c + 1),
                Some((r0, r1, c0, c1)) => (r0.min(r), r1.max(r + 1), c0.min(c), c1.max(c + 1)),
            });
        }
    }
    b.filter(|&(r0, r1, c0, c1)| 4 * (r1 - r0) * (c1 - c0) >= w * h).unwrap_or((0, h, 0, w))
}

/// Runs the search from `start` (scored `start_scores`) around `original` (`width × height`
/// interleaved RGB). `guide` is the surrogate's perturbation (same layout), if any.
#[allow(clippy::too_many_arguments)]
pub async fn square<O: Oracle>(
    oracle: &mut O,
    width: u32,
    height: u32,
    original: &[u8],
    start: &[u8],
    start_scores: Vec<f32>,
    guide: Option<&[i16]>,
    target: usize,
    params: SearchParams,
) -> Result<SearchOutcome, O::Error> {
    let (w, h) = (width as usize, height as usize);
    let eps = i16::from(params.epsilon.max(1));
    let mut rng = StdRng::seed_from_u64(params.seed);
    // The start, projected onto the ε-ball around the original.
    let mut delta: Vec<i16> =
        start.iter().zip(original).map(|(&s, &o)| (i16::from(s) - i16::from(o)).clamp(-eps, eps)).collect();
    let pixel = |k: usize, d: i16| (i16::from(original[k]) + d).clamp(0, 255) as u8;
    // The best image so far: the original plus `delta`, on the lattice.
    let mut best: Vec<u8> = (0..original.len()).map(|k| pixel(k, delta[k])).collect();
    let mut asked = 0;
    let mut best_scores = if best.as_slice() == start {
        start_scores
    } else {
        asked += 1;
        match oracle.scores(&best).await? {
            Some(p) => p,
            // No query left to score the projection: the start is the answer.
            None => {
                return Ok(SearchOutcome {
                    success: reached(&start_scores, target),
                    rgb: start.to_vec(),
                    probabilities: start_scores,
                    asked: 0,
                    accepted: 0,
                });
            }
        }
    };
    let mut best_loss = loss(&best_scores, target);
    let mut accepted = 0;
    let (top, bottom, left, right) = region(guide, w, h);
    let (rh, rw) = (bottom - top, right - left);
    let mut i = 0;
    while !reached(&best_scores, target) && i < params.budget {
        i += 1;
        let p = p_at(params.p_init, i, params.budget);
        let side = ((p * (rw * rh) as f64).sqrt().round() as usize).clamp(1, rw.min(rh));
        // A square whose pixels all stay as they are is no proposal: draw again (bounded).
        let mut window = None;
        for _ in 0..10 {
            let (r0, c0) = (rng.random_range(top..=bottom - side), rng.random_range(left..=right - side));
            let guided = guide.is_some() && rng.random_bool(0.5);
            let mut signs = [0i16; 3];
            for (ch, s) in signs.iter_mut().enumerate() {
                let mut sum = 0i64;
                if let (true, Some(g)) = (guided, guide) {
                    for r in r0..r0 + side {
                        for c in c0..c0 + side {
                            sum += i64::from(g[(r * w + c) * 3 + ch]);
                        }
                    }
                }
                *s = match sum.signum() {
                    0 => {
                        if rng.random_bool(0.5) {
                            eps
                        } else {
                            -eps
                        }
                    }
                    s => s as i16 * eps,
                };
            }
            let changed = (r0..r0 + side).any(|r| {
                (c0..c0 + side).any(|c| {
                    (0..3).any(|ch| {
                        pixel((r * w + c) * 3 + ch, delta[(r * w + c) * 3 + ch])
                            != pixel((r * w + c) * 3 + ch, signs[ch])
                    })
                })
            });
            if changed {
                window = Some((r0, c0, signs));
                break;
            }
        }
        // The proposal, applied in place (no copy of the image per query); what it replaced is
        // kept to undo it when it is rejected.
        let mut replaced = Vec::new();
        if let Some((r0, c0, signs)) = window {
            replaced.reserve(side * side * 3);
            for r in r0..r0 + side {
                for c in c0..c0 + side {
                    for (ch, &s) in signs.iter().enumerate() {
                        let k = (r * w + c) * 3 + ch;
                        replaced.push((k, delta[k]));
                        delta[k] = s;
                        best[k] = pixel(k, s);
                    }
                }
            }
        }
        let undo = |delta: &mut [i16], best: &mut [u8]| {
            for &(k, d) in &replaced {
                delta[k] = d;
                best[k] = pixel(k, d);
            }
        };
        asked += 1;
        let Some(scores) = oracle.scores(&best).await? else {
            asked -= 1;
            undo(&mut delta, &mut best);
            break;
        };
        let l = loss(&scores, target);
        if l < best_loss {
            (best_scores, best_loss) = (scores, l);
            accepted += 1;
        } else {
            undo(&mut delta, &mut best);
        }
    }
    Ok(SearchOutcome { success: reached(&best_scores, target), rgb: best, probabilities: best_scores, asked, accepted })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linear classifier over pixels (two classes): class 1's logit rises with the red
    /// channel of the image's left half. The search sees its probabilities only.
    struct Linear {
        width: usize,
        queries: u32,
        budget: u32,
    }

    impl Oracle for Linear {
        type Error = std::convert::Infallible;
        async fn scores(&mut self, rgb: &[u8]) -> Result<Option<Vec<f32>>, Self::Error> {
            if self.queries >= self.budget {
                return Ok(None);
            }
            self.queries += 1;
            let mut z = 0.0f64;
            let mut n = 0.0;
            for (i, px) in rgb.chunks_exact(3).enumerate() {
                if i % self.width < self.width / 2 {
                    z += f64::from(px[0]) - 128.0;
                    n += 1.0;
                }
            }
            // Logit of class 1 minus class 0: positive once the left half's red is 2 levels up.
            let margin = z / n - 2.0;
            let p1 = 1.0 / (1.0 + (-margin).exp());
            Ok(Some(vec![(1.0 - p1) as f32, p1 as f32]))
        }
    }

    fn grey(w: usize, h: usize) -> Vec<u8> {
        vec![128; w * h * 3]
    }

    #[tokio::test]
    async fn reaches_a_target_the_start_misses_within_its_budget_on_the_lattice() {
        let (w, h) = (32usize, 24usize);
        let x0 = grey(w, h);
        let mut oracle = Linear { width: w, queries: 0, budget: 300 };
        let start_scores = oracle.scores(&x0).await.unwrap().unwrap();
        assert!(start_scores[1] < 0.5);
        let params = SearchParams { epsilon: 8, p_init: 0.1, budget: 299, seed: 7 };
        let out = square(&mut oracle, w as u32, h as u32, &x0, &x0, start_scores, None, 1, params).await.unwrap();
        assert!(out.success, "{} queries, p = {:?}", out.asked, out.probabilities);
        assert!(out.probabilities[1] > 0.5);
        assert!(oracle.queries <= 300 && out.asked < 299, "{}", out.asked);
        // Every pixel stays within ε of the original.
        assert!(out.rgb.iter().zip(&x0).all(|(&a, &o)| (i16::from(a) - i16::from(o)).abs() <= 8));
    }

    #[tokio::test]
    async fn a_guide_that_points_the_right_way_needs_fewer_queries() {
        let (w, h) = (32usize, 24usize);
        let x0 = grey(w, h);
        // The surrogate's perturbation: red up on the left half.
        let guide: Vec<i16> = (0..w * h * 3).map(|k| if k % 3 == 0 && (k / 3) % w < w / 2 { 3 } else { 0 }).collect();
        let mut spent = [0u32; 2];
        for (j, g) in [None, Some(guide.as_slice())].into_iter().enumerate() {
            for seed in 0..8 {
                let mut oracle = Linear { width: w, queries: 0, budget: 1000 };
                let s = oracle.scores(&x0).await.unwrap().unwrap();
                let params = SearchParams { epsilon: 8, p_init: 0.1, budget: 999, seed };
                let out = square(&mut oracle, w as u32, h as u32, &x0, &x0, s, g, 1, params).await.unwrap();
                assert!(out.success);
                spent[j] += out.asked;
            }
        }
        assert!(spent[1] < spent[0], "guided {} vs random {} queries", spent[1], spent[0]);
    }

    #[tokio::test]
    async fn squares_stay_inside_the_box_the_guide_spans() {
        let (w, h) = (32usize, 24usize);
        let x0 = grey(w, h);
        // The surrogate changed rows 6..18, columns 8..24 (its centre crop), red up.
        let inside = |k: usize| (6..18).contains(&(k / 3 / w)) && (8..24).contains(&(k / 3 % w));
        let guide: Vec<i16> = (0..w * h * 3).map(|k| if k % 3 == 0 && inside(k) { 2 } else { 0 }).collect();
        assert_eq!(region(Some(&guide), w, h), (6, 18, 8, 24));
        assert_eq!(region(None, w, h), (0, h, 0, w));
        assert_eq!(region(Some(&vec![0; w * h * 3]), w, h), (0, h, 0, w));
        // One changed pixel is no crop.
        let mut speck = vec![0i16; w * h * 3];
        speck[(5 * w + 5) * 3] = 1;
        assert_eq!(region(Some(&speck), w, h), (0, h, 0, w));
        let mut oracle = Linear { width: w, queries: 0, budget: 400 };
        let s = oracle.scores(&x0).await.unwrap().unwrap();
        let params = SearchParams { epsilon: 8, p_init: 0.1, budget: 399, seed: 3 };
        let out = square(&mut oracle, w as u32, h as u32, &x0, &x0, s, Some(&guide), 1, params).await.unwrap();
        assert!(out.accepted > 0);
        let changed: Vec<usize> = (0..x0.len()).filter(|&k| out.rgb[k] != x0[k]).collect();
        assert!(!changed.is_empty());
        assert!(changed.iter().all(|&k| inside(k)), "a square left the guide's box");
    }

    #[tokio::test]
    async fn stops_when_the_budget_is_spent() {
        let (w, h) = (16usize, 16usize);
        let x0 = grey(w, h);
        // Out of reach: ε of 1 grey level cannot move the left half's red by 2.
        let mut oracle = Linear { width: w, queries: 0, budget: 20 };
        let s = oracle.scores(&x0).await.unwrap().unwrap();
        let params = SearchParams { epsilon: 1, p_init: 0.1, budget: 1000, seed: 1 };
        let out = square(&mut oracle, w as u32, h as u32, &x0, &x0, s, None, 1, params).await.unwrap();
        assert!(!out.success);
        assert_eq!(oracle.queries, 20);
        assert_eq!(out.asked, 19);
    }

    #[test]
    fn the_square_shrinks_on_the_papers_schedule() {
        assert_eq!(p_at(0.05, 0, 10_000), 0.05);
        assert_eq!(p_at(0.05, 11, 10_000), 0.025);
        assert_eq!(p_at(0.05, 501, 10_000), 0.05 / 16.0);
        // A budget of 1000 runs the whole schedule in 1000 queries.
        assert_eq!(p_at(0.05, 801, 1000), 0.05 / 512.0);
    }
}
