//! Class distances from image features (the paper's perceptual matrix). Image distance is
//! `1 − cos(φa, φb)`; class distance is the Hausdorff distance between the two classes' sets:
//! `H(A,B) = max(max_{a∈A} min_{b∈B} d(a,b), max_{b∈B} min_{a∈A} d(a,b))`.
//!
//! [`hausdorff`] never holds all pairs of images: it walks blocks of classes (I ≤ J), computes the
//! cosine similarities of block I against block J with one matrix product, and reduces them at
//! once into per-(image, class) nearest neighbours in both directions — so each pair of images is
//! multiplied once, and memory stays at one block product. `--linkage mean | centroid` are the
//! cheap alternatives; [`hausdorff_naive`] is the per-pair reference the tests compare with.

use ndarray::{Array2, ArrayView2, Axis};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Linkage {
    /// Hausdorff distance between the classes' feature sets (the paper).
    Hausdorff,
    /// Mean pairwise distance: 1 − μ_A·μ_B (μ the mean of unit features).
    Mean,
    /// Distance between the normalised class centroids.
    Centroid,
}

/// Features of all images, grouped by class: `features` is (Σ n_c) × d, rows of class c
/// contiguous, in class order; `sizes[c] = n_c` (0 for a class without images).
pub struct ClassFeatures<'a> {
    pub features: ArrayView2<'a, f32>,
    pub sizes: &'a [usize],
}

impl ClassFeatures<'_> {
    fn offsets(&self) -> Vec<usize> {
        let mut o = Vec::with_capacity(self.sizes.len() + 1);
        o.push(0);
        for s in self.sizes {
            o.push(o.last().copied().unwrap_or(0) + s);
        }
        o
    }
}

/// Rows scaled to unit length (a zero row stays zero).
pub fn l2_normalise(mut f: Array2<f32>) -> Array2<f32> {
    for mut row in f.axis_iter_mut(Axis(0)) {
        let n = row.dot(&row).sqrt();
        if n > 0.0 {
            row /= n;
        }
    }
    f
}

fn to_tensor(a: ArrayView2<f32>, device: Device) -> Result<Tensor, tch::TchError> {
    let a = a.as_standard_layout();
    let (r, c) = a.dim();
    Tensor::f_from_slice(a.as_slice().unwrap_or(&[]))?.f_view([r as i64, c as i64])?.f_to_device(device)
}

/// Per column segment (class) of `s` (rows × cols): the maximum over the segment, per row.
fn segment_max(s: &Tensor, bounds: &[(usize, usize)]) -> Result<Tensor, tch::TchError> {
    let parts: Vec<Tensor> = bounds
        .iter()
        .map(|&(a, b)| {
            if b > a {
                s.f_narrow(1, a as i64, (b - a) as i64)?.f_amax(&[1i64][..], true)
            } else {
                Tensor::f_full([s.size()[0], 1], f64::NEG_INFINITY, (Kind::Float, s.device()))
            }
        })
        .collect::<Result<_, _>>()?;
    Tensor::f_cat(&parts, 1)
}

/// Per row segment (class) of `m` (rows × k): the maximum over the segment's rows.
fn segment_row_max(m: &Tensor, bounds: &[(usize, usize)]) -> Result<Vec<Vec<f32>>, tch::TchError> {
    bounds
        .iter()
        .map(|&(a, b)| {
            if b > a {
                Vec::<f32>::try_from(
                    &m.f_narrow(0, a as i64, (b - a) as i64)?.f_amax(&[0i64][..], false)?.f_to_device(Device::Cpu)?,
                )
            } else {
                Ok(vec![f32::NEG_INFINITY; m.size()[1] as usize])
            }
        })
        .collect()
}

/// The class distance matrix under `linkage`. Classes without images get NaN rows and columns
/// (the caller fills them). `block` bounds the images per side of one matrix product.
pub fn class_distances(
    cf: &ClassFeatures,
    linkage: Linkage,
    block: usize,
    device: Device,
) -> Result<Array2<f32>, tch::TchError> {
    match linkage {
        Linkage::Hausdorff => hausdorff(cf, block, device),
        Linkage::Mean | Linkage::Centroid => {
            let offsets = cf.offsets();
            let n = cf.sizes.len();
            let d = cf.features.ncols();
            let mut means = Array2::<f32>::zeros((n, d));
            for c in 0..n {
                if cf.sizes[c] > 0 {
                    let m = cf
                        .features
                        .slice(ndarray::s![offsets[c]..offsets[c + 1], ..])
                        .mean_axis(Axis(0))
                        .unwrap_or_default();
                    means.row_mut(c).assign(&m);
                }
            }
            if linkage == Linkage::Centroid {
                means = l2_normalise(means);
            }
            let m = to_tensor(means.view(), device)?;
            let sim = m.f_matmul(&m.f_tr()?)?;
            let v = Vec::<f32>::try_from(&sim.f_view(-1)?.f_to_device(Device::Cpu)?)?;
            let mut out = Array2::from_shape_vec((n, n), v.into_iter().map(|s| (1.0 - s).max(0.0)).collect())
                .unwrap_or_else(|_| Array2::zeros((n, n)));
            for c in 0..n {
                if cf.sizes[c] == 0 {
                    out.row_mut(c).fill(f32::NAN);
                    out.column_mut(c).fill(f32::NAN);
                } else {
                    out[[c, c]] = 0.0;
                }
            }
            Ok(out)
        }
    }
}

/// Blockwise, symmetric Hausdorff (see the module doc). Features must be unit rows.
pub fn hausdorff(cf: &ClassFeatures, block: usize, device: Device) -> Result<Array2<f32>, tch::TchError> {
    let n = cf.sizes.len();
    let offsets = cf.offsets();
    // Blocks of whole classes holding at most `block` images (a bigger class is a block alone).
    let mut blocks: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n && offsets[end + 1] - offsets[start] <= block.max(1) {
            end += 1;
        }
        blocks.push((start, end));
        start = end;
    }
    let mut directed = Array2::<f32>::from_elem((n, n), f32::NAN); // h(i → j)
    for (bi, &(i0, i1)) in blocks.iter().enumerate() {
        let fi = to_tensor(cf.features.slice(ndarray::s![offsets[i0]..offsets[i1], ..]), device)?;
        let rows_i: Vec<(usize, usize)> =
            (i0..i1).map(|c| (offsets[c] - offsets[i0], offsets[c + 1] - offsets[i0])).collect();
        for &(j0, j1) in &blocks[bi..] {
            let fj = to_tensor(cf.features.slice(ndarray::s![offsets[j0]..offsets[j1], ..]), device)?;
            let cols_j: Vec<(usize, usize)> =
                (j0..j1).map(|c| (offsets[c] - offsets[j0], offsets[c + 1] - offsets[j0])).collect();
            let s = fi.f_matmul(&fj.f_tr()?)?; // cosine similarities, block I × block J
            // a ∈ I: nearest image of each class j ∈ J; then the farthest such a per class i.
            let near_j = segment_max(&s, &cols_j)?; // |I| × |classes J|
            let h_ij = segment_row_max(&near_j.f_neg()?, &rows_i)?; // −max sim → via max of −sim
            // b ∈ J: nearest image of each class i ∈ I.
            let near_i = segment_max(&s.f_tr()?, &rows_i)?; // |J| × |classes I|
            let h_ji = segment_row_max(&near_i.f_neg()?, &cols_j)?;
            for (a, ci) in (i0..i1).enumerate() {
                for (b, cj) in (j0..j1).enumerate() {
                    // h = max_a (1 − max_b sim) = 1 + max_a(−max_b sim)
                    directed[[ci, cj]] = 1.0 + h_ij[a][b];
                    directed[[cj, ci]] = 1.0 + h_ji[b][a];
                }
            }
        }
    }
    Ok(symmetric(cf.sizes, |i, j| directed[[i, j]]))
}

/// `H(i, j) = max(h(i→j), h(j→i))` from the directed distances; 0 on the diagonal, NaN for
/// classes without images.
fn symmetric(sizes: &[usize], directed: impl Fn(usize, usize) -> f32) -> Array2<f32> {
    let n = sizes.len();
    Array2::from_shape_fn((n, n), |(i, j)| {
        if sizes[i] == 0 || sizes[j] == 0 {
            f32::NAN
        } else if i == j {
            0.0
        } else {
            directed(i, j).max(directed(j, i)).max(0.0)
        }
    })
}

/// The definition, pair by pair and image by image: the reference for tests and benchmarks.
pub fn hausdorff_naive(cf: &ClassFeatures) -> Array2<f32> {
    let offsets = cf.offsets();
    let d = |a: usize, b: usize| 1.0 - cf.features.row(a).dot(&cf.features.row(b));
    let directed = |i: usize, j: usize| -> f32 {
        (offsets[i]..offsets[i + 1])
            .map(|a| (offsets[j]..offsets[j + 1]).map(|b| d(a, b)).fold(f32::INFINITY, f32::min))
            .fold(f32::NEG_INFINITY, f32::max)
    };
    symmetric(cf.sizes, directed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn features(sizes: &[usize], dim: usize, seed: u64) -> Array2<f32> {
        // A small deterministic generator: tests must not depend on a global RNG.
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let total: usize = sizes.iter().sum();
        let v: Vec<f32> = (0..total * dim)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        l2_normalise(Array2::from_shape_vec((total, dim), v).unwrap())
    }

    fn assert_close(a: &Array2<f32>, b: &Array2<f32>, tol: f32) {
        for ((idx, x), y) in a.indexed_iter().zip(b.iter()) {
            assert!((x.is_nan() && y.is_nan()) || (x - y).abs() <= tol, "{idx:?}: {x} vs {y}");
        }
    }

    /// The definition written out on its own, sharing nothing with the code under test (not
    /// `symmetric()`, not the offsets): each class's rows sliced off `f` in turn, image distance
    /// `1 − a·b` summed in f64, `H(A,B) = max(sup_a inf_b d, sup_b inf_a d)`, 0 on the diagonal
    /// and NaN where a class has no images.
    fn reference(f: &Array2<f32>, sizes: &[usize]) -> Array2<f32> {
        let mut classes: Vec<Vec<Vec<f64>>> = Vec::new();
        let mut rows = f.rows().into_iter();
        for &n in sizes {
            classes.push((0..n).map(|_| rows.next().unwrap().iter().map(|&v| f64::from(v)).collect()).collect());
        }
        assert!(rows.next().is_none(), "sizes must cover every row");
        let d = |a: &[f64], b: &[f64]| 1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        // sup over A of the distance to the nearest image of B.
        let directed = |a: &[Vec<f64>], b: &[Vec<f64>]| {
            let mut worst = f64::NEG_INFINITY;
            for x in a {
                let mut nearest = f64::INFINITY;
                for y in b {
                    nearest = nearest.min(d(x, y));
                }
                worst = worst.max(nearest);
            }
            worst
        };
        let n = sizes.len();
        let mut out = Array2::<f32>::zeros((n, n));
        for i in 0..n {
            for j in 0..n {
                let (a, b) = (&classes[i], &classes[j]);
                out[[i, j]] = if a.is_empty() || b.is_empty() {
                    f32::NAN
                } else if i == j {
                    0.0
                } else {
                    directed(a, b).max(directed(b, a)) as f32
                };
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn blockwise_equals_the_naive_definition(
            sizes in proptest::collection::vec(0usize..7, 1..12),
            dim in 1usize..24,
            block in 1usize..20,
            seed in any::<u64>(),
        ) {
            let f = features(&sizes, dim, seed);
            let cf = ClassFeatures { features: f.view(), sizes: &sizes };
            let fast = hausdorff(&cf, block, Device::Cpu).unwrap();
            let independent = reference(&f, &sizes);
            assert_close(&fast, &independent, 1e-5);
            // The per-pair reference the benchmarks compare with is right too.
            assert_close(&hausdorff_naive(&cf), &independent, 1e-5);
        }
    }

    #[test]
    fn single_image_classes_and_a_hand_computed_case() {
        // Class 0: e1, e2; class 1: e1 alone (one image). d(e1,e1) = 0, d(e2,e1) = 1.
        // h(0→1) = max(0, 1) = 1; h(1→0) = min(0, 1) = 0 → H = 1.
        let f = Array2::from_shape_vec((3, 2), vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0]).unwrap();
        let sizes = [2usize, 1];
        let cf = ClassFeatures { features: f.view(), sizes: &sizes };
        let h = hausdorff(&cf, 1, Device::Cpu).unwrap();
        assert_eq!(h[[0, 1]], 1.0);
        assert_eq!(h[[1, 0]], 1.0);
        assert_eq!(h[[0, 0]], 0.0);
        // Mean linkage: μ0 = (0.5, 0.5), μ1 = (1, 0) → 1 − 0.5 = 0.5; centroid: 1 − cos 45° ≈ 0.2929.
        let m = class_distances(&cf, Linkage::Mean, 8, Device::Cpu).unwrap();
        assert!((m[[0, 1]] - 0.5).abs() < 1e-6);
        let c = class_distances(&cf, Linkage::Centroid, 8, Device::Cpu).unwrap();
        assert!((c[[0, 1]] - (1.0 - std::f32::consts::FRAC_1_SQRT_2)).abs() < 1e-6);
        // A class without images has NaN distances, for the caller to fill.
        let sizes = [2usize, 0, 1];
        let cf = ClassFeatures { features: f.view(), sizes: &sizes };
        let h = hausdorff(&cf, 2, Device::Cpu).unwrap();
        assert!(h[[1, 0]].is_nan() && h[[0, 1]].is_nan());
        assert_eq!(h[[0, 2]], 1.0);
    }
}
