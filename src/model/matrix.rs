//! The class distance matrix D (n×n) that LabelFool's target selection reads: stored as `.npy`
//! (f32 or f64) with a JSON sidecar saying which model it belongs to and how it was built. It is
//! part of a loaded model; the offline builders live apart, in `crate::matrix`.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Axis};
use serde::{Deserialize, Serialize};
use sha2::Digest;

#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("cannot read distance matrix {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("distance matrix {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write distance matrix {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// The sidecar `<matrix>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct MatrixMeta {
    /// Model the matrix was built for (its class order).
    pub model: String,
    pub num_classes: usize,
    /// `from-weights`, `hausdorff`, `mean`, `centroid`, `semantic-wup`, `blend`, …
    pub method: String,
    /// Method-specific details (images per class, feature dimension, alpha, …).
    #[serde(default)]
    pub details: serde_json::Value,
    /// SHA-256 of the matrix values (little-endian f32, row-major).
    #[serde(default)]
    pub content_sha256: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DistanceMatrix {
    data: Array2<f32>,
    pub meta: MatrixMeta,
}

pub fn sidecar_path(npy: &Path) -> PathBuf {
    npy.with_extension("json")
}

/// SHA-256 of the values, so two builds can be compared bit for bit.
pub fn content_hash(data: &Array2<f32>) -> String {
    let mut h = sha2::Sha256::new();
    for v in data.iter() {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// The data-free matrix's distance: D[i,j] = 1 − cos(w_i, w_j) over the rows of the classifier's
/// last linear layer. Classes whose weight vectors point the same way are the ones the network
/// confuses cheaply, which is what target selection needs when no image set is at hand.
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

impl DistanceMatrix {
    /// Wraps and validates: square, finite, non-negative.
    pub fn new(data: Array2<f32>, meta: MatrixMeta) -> Result<Self, String> {
        let (r, c) = data.dim();
        if r != c {
            return Err(format!("not square: {r}×{c}"));
        }
        if r != meta.num_classes {
            return Err(format!("{r}×{r} values but the sidecar says num_classes = {}", meta.num_classes));
        }
        if let Some(((i, j), v)) = data.indexed_iter().find(|(_, v)| !v.is_finite() || **v < 0.0) {
            return Err(format!("D[{i},{j}] = {v}: distances must be finite and non-negative"));
        }
        Ok(Self { data, meta })
    }

    pub fn load(path: &Path) -> Result<Self, MatrixError> {
        let read_err = |reason: String| MatrixError::Read { path: path.to_path_buf(), reason };
        let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
        let data: Array2<f32> = match ndarray_npy::ReadNpyExt::read_npy(file) {
            Ok(a) => a,
            Err(_) => {
                let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
                let a: Array2<f64> = ndarray_npy::ReadNpyExt::read_npy(file)
                    .map_err(|e| read_err(format!("not a 2-D f32 or f64 .npy array: {e}")))?;
                a.mapv(|v| v as f32)
            }
        };
        let side = sidecar_path(path);
        let meta: MatrixMeta = match std::fs::read_to_string(&side) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|e| read_err(format!("sidecar {}: {e}", side.display())))?
            }
            Err(e) => {
                return Err(read_err(format!("sidecar {} is missing: {e}", side.display())));
            }
        };
        Self::new(data, meta).map_err(|reason| MatrixError::Invalid { path: path.to_path_buf(), reason })
    }

    /// Writes `path` (.npy, f32) and its sidecar; fills in the content hash.
    pub fn save(&self, path: &Path) -> Result<(), MatrixError> {
        let write_err = |reason: String| MatrixError::Write { path: path.to_path_buf(), reason };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| write_err(e.to_string()))?;
        }
        let file = std::fs::File::create(path).map_err(|e| write_err(e.to_string()))?;
        ndarray_npy::WriteNpyExt::write_npy(&self.data, std::io::BufWriter::new(file))
            .map_err(|e| write_err(e.to_string()))?;
        let mut meta = self.meta.clone();
        meta.content_sha256 = Some(content_hash(&self.data));
        let text = serde_json::to_string_pretty(&meta).map_err(|e| write_err(e.to_string()))?;
        std::fs::write(sidecar_path(path), text + "\n").map_err(|e| write_err(e.to_string()))
    }

    pub fn len(&self) -> usize {
        self.data.nrows()
    }

    pub fn is_empty(&self) -> bool {
        self.data.nrows() == 0
    }

    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.data[[i, j]]
    }

    pub fn data(&self) -> &Array2<f32> {
        &self.data
    }

    /// The `top` classes nearest to `class` under D, nearest first (ties by index); never `class`.
    pub fn nearest(&self, class: usize, top: usize) -> Vec<(usize, f32)> {
        let mut row: Vec<(usize, f32)> =
            (0..self.len()).filter(|&i| i != class).map(|i| (i, self.data[[i, class]])).collect();
        row.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        row.truncate(top);
        row
    }
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

    fn meta(n: usize) -> MatrixMeta {
        MatrixMeta {
            model: "m".into(),
            num_classes: n,
            method: "test".into(),
            details: serde_json::Value::Null,
            content_sha256: None,
        }
    }

    #[test]
    fn validation_names_the_fault() {
        assert!(DistanceMatrix::new(Array2::zeros((2, 3)), meta(2)).unwrap_err().contains("square"));
        assert!(DistanceMatrix::new(Array2::zeros((3, 3)), meta(2)).unwrap_err().contains("num_classes"));
        let neg = array![[0.0, -1.0], [1.0, 0.0]];
        assert!(DistanceMatrix::new(neg, meta(2)).unwrap_err().contains("D[0,1]"));
        let nan = array![[0.0, f32::NAN], [1.0, 0.0]];
        assert!(DistanceMatrix::new(nan, meta(2)).is_err());
    }

    #[test]
    fn nearest_is_sorted_and_excludes_the_class() {
        let d = array![[0.0, 0.5, 0.2, 0.2], [0.5, 0.0, 0.9, 0.1], [0.2, 0.9, 0.0, 0.3], [0.2, 0.1, 0.3, 0.0]];
        let m = DistanceMatrix::new(d, meta(4)).unwrap();
        assert_eq!(m.nearest(0, 5), vec![(2, 0.2), (3, 0.2), (1, 0.5)]);
        assert_eq!(m.nearest(1, 1), vec![(3, 0.1)]);
    }

    #[test]
    fn save_load_round_trip_f32_and_f64() {
        let dir = tempfile::tempdir().unwrap();
        let d = array![[0.0f32, 0.25], [0.25, 0.0]];
        let m = DistanceMatrix::new(d.clone(), meta(2)).unwrap();
        let p = dir.path().join("d.npy");
        m.save(&p).unwrap();
        let back = DistanceMatrix::load(&p).unwrap();
        assert_eq!(back.data(), &d);
        assert_eq!(back.meta.content_sha256, Some(content_hash(&d)));
        // An f64 matrix (as numpy writes by default) loads too.
        let p64 = dir.path().join("d64.npy");
        ndarray_npy::write_npy(&p64, &d.mapv(|v| v as f64)).unwrap();
        std::fs::copy(sidecar_path(&p), sidecar_path(&p64)).unwrap();
        assert_eq!(DistanceMatrix::load(&p64).unwrap().data(), &d);
        // A missing sidecar is an error that says so.
        std::fs::remove_file(sidecar_path(&p64)).unwrap();
        assert!(DistanceMatrix::load(&p64).unwrap_err().to_string().contains("sidecar"));
    }
}
