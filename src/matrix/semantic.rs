//! The paper's "future work": a semantic distance from the WordNet hierarchy,
//! D[i,j] = 1 − WuPalmer(i, j), and a blend α·perceptual + (1−α)·semantic of two matrices, each
//! first rescaled to [0,1] over its off-diagonal entries. Target selection works unchanged with
//! any of them.

use ndarray::Array2;

use crate::model::ModelInfo;
use crate::model::matrix::{DistanceMatrix, MatrixMeta};
use crate::wordnet::WordNet;

pub fn semantic(info: &ModelInfo) -> Result<DistanceMatrix, String> {
    let wn = WordNet::embedded();
    let wnids: Vec<String> = info
        .classes()
        .iter()
        .map(|c| {
            c.wnid
                .clone()
                .filter(|w| wn.contains(w))
                .ok_or_else(|| format!("class {} ({}) has no WordNet 3.0 noun id", c.index, c.label))
        })
        .collect::<Result<_, _>>()?;
    let n = wnids.len();
    let mut d = Array2::<f32>::zeros((n, n));
    for i in 0..n {
        for j in (i + 1)..n {
            let s = wn
                .wup(&wnids[i], &wnids[j])
                .ok_or_else(|| format!("no Wu-Palmer similarity for {} and {}", wnids[i], wnids[j]))?;
            let v = (1.0 - s).max(0.0) as f32;
            d[[i, j]] = v;
            d[[j, i]] = v;
        }
    }
    let meta = MatrixMeta {
        model: info.name.clone(),
        num_classes: n,
        method: "semantic-wup".into(),
        details: serde_json::json!({"distance": "1 - Wu-Palmer similarity (WordNet 3.0 nouns)"}),
        content_sha256: None,
    };
    DistanceMatrix::new(d, meta)
}

/// `m` rescaled so its off-diagonal entries span [0, 1] (diagonal 0).
pub fn unit_range(m: &Array2<f32>) -> Array2<f32> {
    let n = m.nrows();
    let off = m.indexed_iter().filter(|((i, j), _)| i != j).map(|(_, &v)| v);
    let (lo, hi) = off.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut out = m.mapv(|v| ((v - lo) / span).clamp(0.0, 1.0));
    for i in 0..n {
        out[[i, i]] = 0.0;
    }
    out
}

pub fn blend(perceptual: &DistanceMatrix, semantic: &DistanceMatrix, alpha: f64) -> Result<DistanceMatrix, String> {
    if perceptual.len() != semantic.len() {
        return Err(format!("the matrices differ in size: {} and {}", perceptual.len(), semantic.len()));
    }
    if !(0.0..=1.0).contains(&alpha) {
        return Err(format!("alpha {alpha} is not in [0, 1]"));
    }
    let a = alpha as f32;
    let d = unit_range(perceptual.data()) * a + unit_range(semantic.data()) * (1.0 - a);
    let meta = MatrixMeta {
        model: perceptual.meta.model.clone(),
        num_classes: perceptual.len(),
        method: "blend".into(),
        details: serde_json::json!({
            "alpha": alpha,
            "perceptual": {"method": perceptual.meta.method, "sha256": perceptual.meta.content_sha256},
            "semantic": {"method": semantic.meta.method, "sha256": semantic.meta.content_sha256},
            "normalisation": "each rescaled to [0,1] over its off-diagonal entries",
        }),
        content_sha256: None,
    };
    DistanceMatrix::new(d, meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn m(d: Array2<f32>, method: &str) -> DistanceMatrix {
        let n = d.nrows();
        DistanceMatrix::new(
            d,
            MatrixMeta {
                model: "t".into(),
                num_classes: n,
                method: method.into(),
                details: serde_json::Value::Null,
                content_sha256: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn blend_rescales_each_then_mixes() {
        let p = m(array![[0.0, 0.2, 0.6], [0.2, 0.0, 0.4], [0.6, 0.4, 0.0]], "p");
        let s = m(array![[0.0, 1.0, 3.0], [1.0, 0.0, 5.0], [3.0, 5.0, 0.0]], "s");
        // p → (0, 0.5, 1), s → (0, 0.5, 1) on (0,1), (0,2), (1,2) … p: 0.2→0, 0.6→1, 0.4→0.5; s: 1→0, 3→0.5, 5→1.
        let b = blend(&p, &s, 0.25).unwrap();
        assert!((b.get(0, 1) - 0.0).abs() < 1e-6);
        assert!((b.get(0, 2) - (0.25 * 1.0 + 0.75 * 0.5)).abs() < 1e-6);
        assert!((b.get(1, 2) - (0.25 * 0.5 + 0.75 * 1.0)).abs() < 1e-6);
        assert_eq!(b.get(2, 2), 0.0);
        assert!(blend(&p, &s, 1.5).is_err());
    }
}
