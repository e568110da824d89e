//! The data-free matrix: D[i,j] = 1 − cos(w_i, w_j) over the rows of the classifier's last linear
//! layer. Classes whose weight vectors point the same way are the ones the network confuses
//! cheaply, which is what target selection needs when no image set is at hand.

use ndarray::{Array2, Axis};

/// Pairwise cosine distance between the rows of `w` (n×d); the diagonal is exactly 0.
pub fn cosine_distances(w: &Array2<f32>) -> Array2<f32> {
    let mut unit = w.mapv(f64::from);
    for mut row in unit.axis_iter_mut(Axis(0)) {
        let norm = row.dot(&row).sqrt();
        if norm > 0.0 {
            row /= norm;
        }
    }
    let cos = unit.dot(&unit.t());
    let mut d = cos.mapv(|c| (1.0 - c).max(0.0) as f32);
    d.diag_mut().fill(0.0);
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn hand_computed_distances() {
        // (1,0), (0,2), (1,1): cos = 0 between the first two, 1/√2 between (1,0) and (1,1).
        let w = array![[1.0f32, 0.0], [0.0, 2.0], [1.0, 1.0]];
        let d = cosine_distances(&w);
        let s = 1.0 - std::f32::consts::FRAC_1_SQRT_2;
        let expect = array![[0.0, 1.0, s], [1.0, 0.0, s], [s, s, 0.0]];
        for (a, b) in d.iter().zip(expect.iter()) {
            assert!((a - b).abs() < 1e-6, "{d:?}");
        }
        // Opposite vectors are at distance 2.
        let d = cosine_distances(&array![[1.0f32, 0.0], [-3.0, 0.0]]);
        assert!((d[[0, 1]] - 2.0).abs() < 1e-6);
    }
}
