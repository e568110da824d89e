//! The attack tick's preprocessing for all its rows at once, whatever their sizes.
//!
//! Each row under attack keeps its upload's size, and the model's resize (antialiased bilinear
//! to the short side, then the centre crop) runs inside the gradient. Per row that is one
//! `_upsample_bilinear2d_aa` forward and one backward: cheap on a CPU, but on a GPU a tick of 16
//! rows launches 16 small kernels each way, and every new size is first-time work.
//!
//! The resize and the crop are linear and separable: per channel, `Y = Rh · X · Rwᵀ`, where `Rh`
//! (S×H) and `Rw` (S×W) hold the rows of the resize matrices that the crop keeps. The matrices
//! are the resize op itself applied to unit vectors, so they hold its weights exactly; a row's
//! are built once per size and cached. Rows of similar size are zero-padded to a common H×W and
//! go through two batched matrix products, forward and backward (`Matrix`); `PerRow` runs the op
//! row by row. [`RowResizer::inputs`] is the one function the runner calls, and the engine's
//! `batch_resize` setting picks the path per device. `/classify` and the 8-bit checks never come
//! here: they keep [`super::preprocess::prepare_rgb8`].

use std::collections::HashMap;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use super::preprocess::{crop_offset, resize_crop_to, resized_dims};

/// How the runner resizes the rows it steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizePath {
    /// Each row through the resize op (what `/classify` runs).
    PerRow,
    /// Groups of rows through batched matrix products.
    Matrix,
}

/// Sizes whose matrices are kept; a tick of a new size past this clears the cache.
const CACHED_SIZES: usize = 64;
/// Rows with a longer side go through the op: building a matrix starts from an identity of
/// that side, expanded two wide and resized (about 320 MiB at the peak at 4096).
const MATRIX_MAX_SIDE: i64 = 4096;
/// A group of rows is padded to its largest height and width only while the padded pixels stay
/// within this factor of the real ones (a 4000×3000 upload never pads 15 small ones).
const MAX_PADDING: f64 = 1.5;

/// One size's `Rh` (S×H) and `Rw` (S×W).
pub struct CropMatrices {
    rh: Tensor,
    rw: Tensor,
}

impl CropMatrices {
    fn shallow_clone(&self) -> Self {
        Self { rh: self.rh.shallow_clone(), rw: self.rw.shallow_clone() }
    }

    /// The matrices of resizing an `h`×`w` image's short side to `short` and cropping `size`.
    pub fn new(h: i64, w: i64, short: i64, size: i64, device: Device) -> Result<Self, tch::TchError> {
        let (nh, nw) = resized_dims(h, w, short);
        let resizes = (nh, nw) != (h, w);
        // The op resizes both axes whenever either changes, so an axis kept at its length still
        // goes through it (and comes out as the identity it is).
        let rh = axis(h, nh, resizes, true, device)?;
        let rw = axis(w, nw, resizes, false, device)?;
        Ok(Self { rh: rh.f_narrow(0, crop_offset(nh, size), size)?, rw: rw.f_narrow(0, crop_offset(nw, size), size)? })
    }
}

/// The `out`×`n` matrix of one axis: the resize op applied to the `n` unit vectors along it,
/// each as an image two pixels wide (or tall) whose other axis keeps its length. (With one pixel
/// the op gives other weights: libtorch 2.13 on the CPU, off by up to 1.4 on a 375×500 image.)
fn axis(n: i64, out: i64, resizes: bool, height: bool, device: Device) -> Result<Tensor, tch::TchError> {
    let eye = Tensor::f_eye(n, (Kind::Float, device))?;
    if !resizes {
        return Ok(eye);
    }
    let (shape, to) = if height { ([n, 1, n, 2], [out, 2]) } else { ([n, 1, 2, n], [2, out]) };
    let units = if height { eye.f_view([n, 1, n, 1])? } else { eye.f_view([n, 1, 1, n])? };
    let resized =
        units.f_expand(shape, false)?.f_contiguous()?.f_internal_upsample_bilinear2d_aa(to, false, None, None)?;
    // [n, 1, out, 2] or [n, 1, 2, out] → [n, out]: row j is column j of the matrix.
    let columns =
        if height { resized.f_select(3, 0)?.f_select(1, 0)? } else { resized.f_select(2, 0)?.f_select(1, 0)? };
    columns.f_transpose(0, 1)?.f_contiguous()
}

/// The runner's preprocessing for the rows of a tick, on one model.
pub struct RowResizer {
    path: ResizePath,
    matrices: Mutex<HashMap<(i64, i64, i64), CropMatrices>>,
}

impl RowResizer {
    pub fn new(path: ResizePath) -> Self {
        Self { path, matrices: Mutex::default() }
    }

    pub fn path(&self) -> ResizePath {
        self.path
    }

    /// `[B,3,size,size]` model inputs for `xs` (each `[1,3,H,W]`, sizes may differ), row `i`
    /// resized to the short side `sides[i]`, in row order and differentiable w.r.t. every `x`.
    /// Rows resized to another side than the model's `short` (PGD's random resizes) always go
    /// through the op: their matrices would be built for one step.
    pub fn inputs(&self, xs: &[Tensor], sides: &[i64], short: i64, size: i64) -> Result<Tensor, tch::TchError> {
        if self.path == ResizePath::PerRow {
            return per_row(xs, sides, size);
        }
        let dims: Vec<(i64, i64)> = xs.iter().map(|x| (x.size()[2], x.size()[3])).collect();
        let mut out: Vec<Option<Tensor>> = (0..xs.len()).map(|_| None).collect();
        let (small, large): (Vec<usize>, Vec<usize>) =
            (0..xs.len()).partition(|&i| sides[i] == short && dims[i].0.max(dims[i].1) <= MATRIX_MAX_SIDE);
        for i in large {
            out[i] = Some(resize_crop_to(&xs[i], sides[i], size)?);
        }
        let small_dims: Vec<(i64, i64)> = small.iter().map(|&i| dims[i]).collect();
        for group in groups(&small_dims) {
            let group: Vec<usize> = group.into_iter().map(|k| small[k]).collect();
            let mats = group
                .iter()
                .map(|&i| self.matrices_for(dims[i].0, dims[i].1, sides[i], size, xs[i].device()))
                .collect::<Result<Vec<_>, _>>()?;
            let ys = matrix_group(&group.iter().map(|&i| &xs[i]).collect::<Vec<_>>(), &mats)?;
            for (k, &i) in group.iter().enumerate() {
                out[i] = Some(ys.f_narrow(0, k as i64, 1)?);
            }
        }
        Tensor::f_cat(&out.into_iter().flatten().collect::<Vec<_>>(), 0)
    }

    fn matrices_for(
        &self,
        h: i64,
        w: i64,
        short: i64,
        size: i64,
        device: Device,
    ) -> Result<CropMatrices, tch::TchError> {
        let mut cache = self.matrices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = cache.get(&(h, w, short)) {
            return Ok(m.shallow_clone());
        }
        if cache.len() >= CACHED_SIZES {
            cache.clear();
        }
        let m = CropMatrices::new(h, w, short, size, device)?;
        cache.insert((h, w, short), m.shallow_clone());
        Ok(m)
    }
}

/// The resize op row by row.
pub fn per_row(xs: &[Tensor], sides: &[i64], size: i64) -> Result<Tensor, tch::TchError> {
    let inputs = xs.iter().zip(sides).map(|(x, &side)| resize_crop_to(x, side, size)).collect::<Result<Vec<_>, _>>()?;
    Tensor::f_cat(&inputs, 0)
}

/// Rows grouped so that padding each group to its largest height and width stays within
/// [`MAX_PADDING`] of its real pixels: largest first, each row joining the first group it fits.
fn groups(dims: &[(i64, i64)]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..dims.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(dims[i].0 * dims[i].1));
    // (members, max h, max w, real pixels)
    let mut groups: Vec<(Vec<usize>, i64, i64, i64)> = Vec::new();
    for i in order {
        let (h, w) = dims[i];
        let fits = groups.iter_mut().find(|(m, gh, gw, real)| {
            let padded = (m.len() as i64 + 1) * (*gh).max(h) * (*gw).max(w);
            padded as f64 <= MAX_PADDING * (real + h * w) as f64
        });
        match fits {
            Some((m, gh, gw, real)) => {
                m.push(i);
                *gh = (*gh).max(h);
                *gw = (*gw).max(w);
                *real += h * w;
            }
            None => groups.push((vec![i], h, w, h * w)),
        }
    }
    groups.into_iter().map(|g| g.0).collect()
}

/// One group's inputs: `Rh · X · Rwᵀ` as two batched products over zero-padded rows.
fn matrix_group(xs: &[&Tensor], mats: &[CropMatrices]) -> Result<Tensor, tch::TchError> {
    let hmax = xs.iter().map(|x| x.size()[2]).max().unwrap_or(0);
    let wmax = xs.iter().map(|x| x.size()[3]).max().unwrap_or(0);
    let mut x_pad = Vec::with_capacity(xs.len());
    let mut rh = Vec::with_capacity(xs.len());
    let mut rw = Vec::with_capacity(xs.len());
    for (x, m) in xs.iter().zip(mats) {
        let (h, w) = (x.size()[2], x.size()[3]);
        x_pad.push(x.f_constant_pad_nd([0, wmax - w, 0, hmax - h])?);
        rh.push(m.rh.f_constant_pad_nd([0, hmax - h])?.f_unsqueeze(0)?);
        rw.push(m.rw.f_constant_pad_nd([0, wmax - w])?.f_unsqueeze(0)?);
    }
    let x = Tensor::f_cat(&x_pad, 0)?; // [G,3,H,W]
    let rh = Tensor::f_stack(&rh, 0)?; // [G,1,S,H]
    let rw = Tensor::f_stack(&rw, 0)?; // [G,1,S,W]
    rh.f_matmul(&x)?.f_matmul(&rw.f_transpose(-1, -2)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_padding_bounded() {
        // Four similar uploads share one group; a far larger one stays alone.
        let dims = [(375, 500), (380, 480), (4000, 3000), (360, 500), (370, 490)];
        let g = groups(&dims);
        assert_eq!(g.len(), 2, "{g:?}");
        assert_eq!(g[0], vec![2]);
        let mut rest = g[1].clone();
        rest.sort();
        assert_eq!(rest, vec![0, 1, 3, 4]);
    }
}
