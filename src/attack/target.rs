//! LabelFool's target-label selection (paper Eq. 2–4), with the official code's conventions:
//! D's diagonal counts as +∞, so the predicted class (MLE branch) and every member of the candidate
//! set S (weighted branch) can never be the target; when even p̂1 ≤ δ2, S = {l̂}.

use serde::Serialize;

use crate::model::matrix::DistanceMatrix;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetParams {
    /// Above this top-1 probability the prediction is trusted: the MLE branch.
    pub delta1: f64,
    /// Classes above this probability form the candidate set S of the weighted branch.
    pub delta2: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Branch {
    /// p̂1 > δ1: t = argmin_{i≠l̂} D[i, l̂].
    Mle,
    /// p̂1 ≤ δ1: t = argmin_{i∉S} Σ_{j∈S} p̂j·D[i, j], S = {j : p̂j > δ2}.
    Weighted,
}

/// The choice and why: enough for a user to check it by hand.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetDecision {
    pub target: usize,
    pub branch: Branch,
    pub predicted: usize,
    pub p1: f64,
    /// S with its probabilities, most probable first (just l̂ in the MLE branch).
    pub candidates: Vec<(usize, f64)>,
    /// Best targets first (the chosen one leads) with their (expected) distance.
    pub ranking: Vec<(usize, f64)>,
}

/// Picks the target for softmax `probs` (length n = D's size). `alternatives` is how many of the
/// runners-up to keep in [`TargetDecision::ranking`] besides the target itself.
pub fn select(probs: &[f32], d: &DistanceMatrix, params: TargetParams, alternatives: usize) -> TargetDecision {
    let n = probs.len();
    assert_eq!(n, d.len(), "probability vector and matrix disagree on the class count");
    assert!(n >= 2, "target selection needs at least two classes");
    let predicted = argmax(probs);
    let p1 = f64::from(probs[predicted]);

    let (branch, candidates, scores): (Branch, Vec<(usize, f64)>, Vec<f64>) = if p1 > params.delta1 {
        let scores = (0..n).map(|i| f64::from(d.get(i, predicted))).collect();
        (Branch::Mle, vec![(predicted, p1)], scores)
    } else {
        let mut set: Vec<(usize, f64)> =
            (0..n).filter(|&j| f64::from(probs[j]) > params.delta2).map(|j| (j, f64::from(probs[j]))).collect();
        if set.is_empty() {
            set.push((predicted, p1));
        }
        set.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let scores = (0..n).map(|i| set.iter().map(|&(j, p)| p * f64::from(d.get(i, j))).sum()).collect();
        (Branch::Weighted, set, scores)
    };

    // Candidates of S (for MLE: l̂) sit on D's +∞ diagonal: never eligible.
    let mut ranking: Vec<(usize, f64)> =
        (0..n).filter(|i| !candidates.iter().any(|&(j, _)| j == *i)).map(|i| (i, scores[i])).collect();
    ranking.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    ranking.truncate(alternatives + 1);
    let target = match ranking.first() {
        Some(&(t, _)) => t,
        // Every class is in S (only possible when δ2 is tiny and n small): fall back to the nearest
        // class to l̂ so that an attack still has somewhere to go.
        None => {
            let (t, dist) = d.nearest(predicted, 1)[0];
            ranking.push((t, f64::from(dist)));
            t
        }
    };
    TargetDecision { target, branch, predicted, p1, candidates, ranking }
}

pub fn argmax(v: &[f32]) -> usize {
    // total_cmp puts NaN above everything; a NaN logit is reported upstream, not chosen here.
    v.iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::matrix::MatrixMeta;
    use ndarray::array;

    /// Five classes; distances chosen so that each branch has one right answer worked out below.
    fn matrix() -> DistanceMatrix {
        let d = array![
            [0.0, 0.3, 0.9, 0.5, 0.8],
            [0.3, 0.0, 0.4, 0.6, 0.7],
            [0.9, 0.4, 0.0, 0.2, 0.6],
            [0.5, 0.6, 0.2, 0.0, 0.1],
            [0.8, 0.7, 0.6, 0.1, 0.0],
        ];
        let meta = MatrixMeta {
            model: "t".into(),
            num_classes: 5,
            method: "hand".into(),
            details: serde_json::Value::Null,
            content_sha256: None,
        };
        DistanceMatrix::new(d, meta).unwrap()
    }

    const P: TargetParams = TargetParams { delta1: 0.8, delta2: 0.01 };

    #[test]
    fn mle_branch_takes_the_nearest_other_class() {
        // p̂1 = 0.9 > δ1 for class 2. Column 2 of D: [0.9, 0.4, –, 0.2, 0.6] → class 3 (0.2).
        let dec = select(&[0.02, 0.03, 0.9, 0.03, 0.02], &matrix(), P, 2);
        assert_eq!(dec.branch, Branch::Mle);
        assert_eq!(dec.predicted, 2);
        assert_eq!(dec.target, 3);
        assert_eq!(dec.candidates, vec![(2, 0.9f32 as f64)]);
        let ids: Vec<usize> = dec.ranking.iter().map(|r| r.0).collect();
        assert_eq!(ids, vec![3, 1, 4], "then 1 (0.4) and 4 (0.6)");
    }

    #[test]
    fn weighted_branch_minimises_expected_distance_outside_s() {
        // p = [0.5, 0.4, 0.005, 0.09, 0.005], p̂1 = 0.5 ≤ δ1; S = {0, 1, 3} (p > 0.01).
        // Candidates 2 and 4 only (S is excluded):
        //   class 2: 0.5·0.9 + 0.4·0.4 + 0.09·0.2 = 0.45 + 0.16 + 0.018 = 0.628
        //   class 4: 0.5·0.8 + 0.4·0.7 + 0.09·0.1 = 0.40 + 0.28 + 0.009 = 0.689
        // → target 2. (Class 3 would score 0.25+0.24+0 = 0.49, but it is in S.)
        let probs = [0.5, 0.4, 0.005, 0.09, 0.005];
        let dec = select(&probs, &matrix(), P, 4);
        assert_eq!(dec.branch, Branch::Weighted);
        assert_eq!(dec.target, 2);
        let s: Vec<usize> = dec.candidates.iter().map(|c| c.0).collect();
        assert_eq!(s, vec![0, 1, 3], "S sorted by probability");
        assert_eq!(dec.ranking.len(), 2, "only two classes lie outside S");
        assert!((dec.ranking[0].1 - 0.628).abs() < 1e-6, "{:?}", dec.ranking);
        assert!((dec.ranking[1].1 - 0.689).abs() < 1e-6, "{:?}", dec.ranking);
    }

    #[test]
    fn flat_prediction_falls_back_to_s_equal_to_the_prediction() {
        // Every p̂j ≤ δ2 = 0.3 → S = {l̂} = {4} (p 0.28); weighted score = 0.28·D[i,4]:
        // column 4 = [0.8, 0.7, 0.6, 0.1, –] → class 3.
        let params = TargetParams { delta1: 0.8, delta2: 0.3 };
        let dec = select(&[0.18, 0.18, 0.18, 0.18, 0.28], &matrix(), params, 1);
        assert_eq!(dec.branch, Branch::Weighted);
        assert_eq!(dec.candidates.len(), 1);
        assert_eq!(dec.candidates[0].0, 4);
        assert_eq!(dec.target, 3);
        assert!((dec.ranking[0].1 - 0.28f32 as f64 * 0.1f32 as f64).abs() < 1e-7);
    }

    #[test]
    fn the_threshold_is_strict() {
        // p̂1 = δ1 exactly is not "> δ1": the weighted branch decides.
        let params = TargetParams { delta1: 0.5, delta2: 0.01 };
        assert_eq!(select(&[0.5, 0.5, 0.0, 0.0, 0.0], &matrix(), params, 0).branch, Branch::Weighted);
    }

    #[test]
    fn softmax_and_argmax() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[2] - 0.665_240_9).abs() < 1e-6);
        assert_eq!(argmax(&[0.1, 0.7, 0.7]), 1, "ties go to the lower index");
        assert_eq!(argmax(&[f32::NAN, 0.2]), 1);
    }
}
