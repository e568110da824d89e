//! Models: what handlers may know about them ([`Catalog`], [`ModelInfo`]: names, classes, input
//! geometry, distance matrix) and what only the worker thread holds ([`LoadedModel`]: the
//! TorchScript module on the device).

pub mod bundle;
pub mod catalog;
pub mod classes;
pub mod device;
pub mod matrix;
pub mod preprocess;
pub mod repository;
pub mod resize;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

pub use crate::config::DeviceSpec;
pub use bundle::{Bundle, InputSpec, ModelMeta};
pub use catalog::{Catalog, LoadTicket, ModelEntry, ModelState, Unavailable};
pub use classes::{ClassInfo, ClassList};
pub use device::{configure_jit, device_name, single_threaded_torch_here};

use matrix::{DistanceMatrix, MatrixMeta};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {model}: {reason}")]
    Bundle { model: String, reason: String },
    #[error("model {model}: {source}")]
    Matrix { model: String, source: matrix::MatrixError },
    #[error("model {model}: cannot load {path}: {source}")]
    Load { model: String, path: PathBuf, source: tch::TchError },
    #[error("model {model} does not behave as its metadata says: {reason}")]
    Contract { model: String, reason: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// How a model's classify jobs are batched.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchPolicy {
    pub max_size: usize,
    pub max_wait: Duration,
}

/// A configured model, as far as it can be known without libtorch. Shared (read-only) by handlers.
#[derive(Debug)]
pub struct ModelInfo {
    pub name: String,
    pub bundle: Bundle,
    /// The matrix read from disk, if one was configured or lies beside the bundle.
    stored_matrix: Option<DistanceMatrix>,
    /// Otherwise the data-free one, computed from the classifier weight when the model loads.
    data_free: OnceLock<DistanceMatrix>,
    pub batch: BatchPolicy,
}

impl ModelInfo {
    pub fn classes(&self) -> &ClassList {
        &self.bundle.classes
    }

    pub fn input(&self) -> &InputSpec {
        &self.bundle.meta.input
    }

    pub fn num_classes(&self) -> usize {
        self.bundle.meta.num_classes
    }

    /// The distance matrix target selection reads: the stored one, else the data-free one (once
    /// the model has loaded).
    pub fn matrix(&self) -> Option<&DistanceMatrix> {
        self.stored_matrix.as_ref().or_else(|| self.data_free.get())
    }

    /// Opens the bundle at `dir` and the matrix (if any), checking that they agree.
    pub fn open(
        name: &str,
        dir: &std::path::Path,
        matrix: Option<&std::path::Path>,
        batch: BatchPolicy,
    ) -> Result<Self, ModelError> {
        let bundle = Bundle::open(dir).map_err(|e| ModelError::Bundle { model: name.into(), reason: e.to_string() })?;
        Self::from_bundle(name, bundle, matrix, batch)
    }

    /// A described model and the matrix (if any), checked against each other.
    pub fn from_bundle(
        name: &str,
        bundle: Bundle,
        matrix: Option<&std::path::Path>,
        batch: BatchPolicy,
    ) -> Result<Self, ModelError> {
        let matrix = match matrix {
            Some(path) => {
                let m =
                    DistanceMatrix::load(path).map_err(|source| ModelError::Matrix { model: name.into(), source })?;
                if m.len() != bundle.meta.num_classes {
                    return Err(ModelError::Bundle {
                        model: name.into(),
                        reason: format!(
                            "distance matrix {} is {}×{} but the model has {} classes",
                            path.display(),
                            m.len(),
                            m.len(),
                            bundle.meta.num_classes
                        ),
                    });
                }
                Some(m)
            }
            None => None,
        };
        Ok(Self { name: name.into(), bundle, stored_matrix: matrix, data_free: OnceLock::new(), batch })
    }
}

/// Forward and backward passes run through a model, for the metrics and for the tests that hold
/// the attack to one backward pass per iteration.
#[derive(Debug, Default)]
pub struct PassCounts {
    pub forward: AtomicU64,
    pub backward: AtomicU64,
}

/// A TorchScript module on its device. Lives on the worker thread only.
pub struct LoadedModel {
    pub info: Arc<ModelInfo>,
    module: tch::CModule,
    device: Device,
    /// `(mean, std)` as `[1,3,1,1]` on the device, when the server normalises for the module.
    normalise: Option<(Tensor, Tensor)>,
    /// Rows per module call (the model's `max_batch_size`); larger batches are split.
    max_batch: Option<i64>,
    /// Module calls padded with zero rows to a power of two (see `config::BatchPadding`).
    pad_batches: bool,
    /// The attack tick's preprocessing (see [`resize`]).
    resizer: resize::RowResizer,
    pub passes: Arc<PassCounts>,
}

/// The batch size a call of `rows` rows is padded to: the next power of two, at most `max`.
fn padded_rows(rows: i64, max: Option<i64>) -> i64 {
    let p = (rows.max(1) as u64).next_power_of_two() as i64;
    max.map_or(p, |m| p.min(m.max(rows)))
}

/// Reads a TorchScript file onto the CPU: the slow part of a load (file I/O and unpickling),
/// which may run on any thread; [`LoadedModel::from_module`] finishes on the worker.
pub fn read_module(info: &ModelInfo) -> Result<tch::CModule, ModelError> {
    let path = info.bundle.model_path();
    tch::CModule::load_on_device(&path, Device::Cpu).map_err(|source| ModelError::Load {
        model: info.name.clone(),
        path: path.clone(),
        source,
    })
}

impl LoadedModel {
    /// Loads the module onto `device` and checks it against its description (see [`Self::from_module`]).
    pub fn load(info: Arc<ModelInfo>, device: Device) -> Result<Self, ModelError> {
        let module = read_module(&info)?;
        Self::from_module(info, module, device)
    }

    /// Moves a module read by [`read_module`] to `device` and checks it with one forward pass
    /// (class count, feature size, a gradient that reaches the input), so that a mismatched model
    /// fails when it loads, not mid-request. Without a stored matrix, computes the data-free one.
    pub fn from_module(info: Arc<ModelInfo>, mut module: tch::CModule, device: Device) -> Result<Self, ModelError> {
        if device != Device::Cpu {
            module.to(device, Kind::Float, false);
        }
        module.f_set_eval()?;
        let input = info.input();
        let normalise = match (input.mean, input.std) {
            (Some(mean), Some(std)) => Some((
                Tensor::f_from_slice(&mean)?.f_view([1, 3, 1, 1])?.f_to_device(device)?,
                Tensor::f_from_slice(&std)?.f_view([1, 3, 1, 1])?.f_to_device(device)?,
            )),
            _ => None,
        };
        let max_batch = info.bundle.meta.max_batch_size.map(|n| n as i64);
        let model = Self {
            info,
            module,
            device,
            normalise,
            max_batch,
            pad_batches: false,
            resizer: resize::RowResizer::new(resize::ResizePath::PerRow),
            passes: Arc::default(),
        };
        model.check_contract()?;
        if model.info.matrix().is_none() {
            let m = model.data_free_matrix()?;
            let _ = model.info.data_free.set(m);
        }
        Ok(model)
    }

    fn contract(&self, reason: String) -> ModelError {
        ModelError::Contract { model: self.info.name.clone(), reason }
    }

    fn check_contract(&self) -> Result<(), ModelError> {
        let s = self.info.input().size;
        let probe = Tensor::f_full([2, 3, s, s], 0.5, (Kind::Float, self.device))?.f_set_requires_grad(true)?;
        let logits = self
            .forward(&probe)
            .map_err(|e| self.contract(format!("forward failed on a 2×3×{s}×{s} batch in [0,1]: {e}")))?;
        let want_logits = vec![2, self.info.num_classes() as i64];
        if let [2, width] = logits.size()[..]
            && width != want_logits[1]
        {
            return Err(self.contract(format!(
                "the model outputs {width} classes per image but the class list has {}",
                self.info.num_classes()
            )));
        }
        if logits.size() != want_logits {
            return Err(self.contract(format!(
                "forward gives {:?}, its description promises {:?} (input {s}×{s}, {} classes)",
                logits.size(),
                want_logits,
                self.info.num_classes()
            )));
        }
        let grad = Tensor::f_run_backward(&[logits.f_sum(Kind::Float)?], &[&probe], false, false)
            .ok()
            .and_then(|g| g.into_iter().next())
            .filter(|g| {
                g.f_abs().and_then(|a| a.f_sum(Kind::Float)).map(|t| t.double_value(&[]) > 0.0).unwrap_or(false)
            });
        if grad.is_none() {
            return Err(self.contract(
                "no gradient reaches the input (a module that detaches its input cannot be attacked)".into(),
            ));
        }
        if let Some(dim) = self.info.bundle.meta.feature_dim {
            let feats = tch::no_grad(|| self.features(&probe))
                .map_err(|e| self.contract(format!("features failed on a 2×3×{s}×{s} batch: {e}")))?;
            if feats.size() != vec![2, dim as i64] {
                return Err(
                    self.contract(format!("features gives {:?}, its description promises [2, {dim}]", feats.size()))
                );
            }
        }
        self.passes.forward.store(0, Ordering::Relaxed);
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs `f` on the normalised input, in chunks of at most `max_batch` rows.
    fn call(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor, tch::TchError>) -> Result<Tensor, tch::TchError> {
        let x = match &self.normalise {
            Some((mean, std)) => x.f_sub(mean)?.f_div(std)?,
            None => x.shallow_clone(),
        };
        let rows = x.size().first().copied().unwrap_or(0);
        // Padded rows are zeros, and every row is independent of the others in eval mode, so
        // the real rows' outputs (and their gradients) are what an unpadded call gives.
        let run = |x: &Tensor| -> Result<Tensor, tch::TchError> {
            let n = x.size().first().copied().unwrap_or(0);
            let to = if self.pad_batches && n > 0 { padded_rows(n, self.max_batch) } else { n };
            if to == n {
                return f(x);
            }
            let mut shape = x.size();
            shape[0] = to - n;
            let zeros = Tensor::f_zeros(&shape, (x.kind(), x.device()))?;
            f(&Tensor::f_cat(&[x, &zeros], 0)?)?.f_narrow(0, 0, n)
        };
        match self.max_batch {
            Some(max) if rows > max => {
                let parts = x.f_split(max, 0)?.iter().map(run).collect::<Result<Vec<_>, _>>()?;
                Tensor::f_cat(&parts, 0)
            }
            _ => run(&x),
        }
    }

    /// Pads every module call's batch to a power of two (see `config::BatchPadding`).
    pub fn set_batch_padding(&mut self, on: bool) {
        self.pad_batches = on;
    }

    /// How the attack tick resizes its rows (see [`resize`]).
    pub fn set_batch_resize(&mut self, path: resize::ResizePath) {
        self.resizer = resize::RowResizer::new(path);
    }

    pub fn batch_resize(&self) -> resize::ResizePath {
        self.resizer.path()
    }

    /// Sets the attack resize path `setting` asks for on this model's device. `auto` on CUDA
    /// times both paths ([`Self::choose_batch_resize`]) and returns their timings; when that
    /// probe fails the op stays and the error is returned, for the caller to report.
    pub fn apply_batch_resize(
        &mut self,
        setting: crate::config::BatchResize,
    ) -> Result<Option<(f64, f64)>, tch::TchError> {
        use crate::config::BatchResize;
        use resize::ResizePath::{Matrix, PerRow};
        match setting {
            BatchResize::Auto if self.device.is_cuda() => {
                return self.choose_batch_resize().map(Some).inspect_err(|_| self.set_batch_resize(PerRow));
            }
            BatchResize::Auto | BatchResize::PerRow => self.set_batch_resize(PerRow),
            BatchResize::Matrix => self.set_batch_resize(Matrix),
        }
        Ok(None)
    }

    /// Times one attack tick's passes (forward and backward) for 8 rows of 8 sizes on each
    /// resize path, after one untimed tick each, and keeps the faster: what `batch_resize =
    /// "auto"` does on CUDA, where which one wins depends on the card. Returns the median
    /// seconds of three ticks, per row by row then matrix.
    pub fn choose_batch_resize(&mut self) -> Result<(f64, f64), tch::TchError> {
        use resize::ResizePath::{Matrix, PerRow};
        let spec = self.info.input().clone();
        let xs: Vec<Tensor> = (0..8)
            .map(|i| {
                let (h, w) = (spec.resize_short_side + 20 * i, spec.resize_short_side * 4 / 3 + 12 * i);
                Tensor::f_full([1, 3, h, w], 0.5, (Kind::Float, self.device))
            })
            .collect::<Result<_, _>>()?;
        let sides = vec![spec.resize_short_side; xs.len()];
        let mut median = [0.0; 2];
        for (k, path) in [PerRow, Matrix].into_iter().enumerate() {
            self.set_batch_resize(path);
            let mut secs = Vec::new();
            for _ in 0..4 {
                let started = std::time::Instant::now();
                let leaves: Vec<Tensor> = xs.iter().map(|x| x.copy().set_requires_grad(true)).collect();
                let loss = self.forward(&self.attack_inputs(&leaves, &sides)?)?.f_sum(Kind::Float)?;
                let grads = self.backward(&loss, &leaves, false)?;
                // Reading a value waits for the device.
                grads.iter().map(|g| g.f_sum(Kind::Float)?.f_double_value(&[])).collect::<Result<Vec<_>, _>>()?;
                secs.push(started.elapsed().as_secs_f64());
            }
            secs.remove(0);
            secs.sort_by(f64::total_cmp);
            median[k] = secs[1];
        }
        self.set_batch_resize(if median[1] < median[0] { Matrix } else { PerRow });
        self.passes.forward.store(0, Ordering::Relaxed);
        self.passes.backward.store(0, Ordering::Relaxed);
        Ok((median[0], median[1]))
    }

    /// The model inputs `[B,3,S,S]` of the rows `xs` (each `[1,3,H,W]`, any sizes), row `i`'s
    /// short side resized to `sides[i]`: the attack tick's preprocessing, differentiable.
    pub fn attack_inputs(&self, xs: &[Tensor], sides: &[i64]) -> Result<Tensor, tch::TchError> {
        let spec = self.info.input();
        self.resizer.inputs(xs, sides, spec.resize_short_side, spec.size)
    }

    /// Runs each batch size that calls of up to `max_rows` rows are padded to once, no-grad
    /// forward and forward + backward, so that the first requests do not pay for their kernels'
    /// set-up. Returns the sizes run.
    pub fn warm_up(&self, max_rows: usize) -> Result<Vec<i64>, tch::TchError> {
        let s = self.info.input().size;
        let mut sizes: Vec<i64> = (1..=max_rows.max(1) as i64).map(|b| padded_rows(b, self.max_batch)).collect();
        sizes.dedup();
        for &b in &sizes {
            let x = Tensor::f_full([b, 3, s, s], 0.5, (Kind::Float, self.device))?;
            let _ = tch::no_grad(|| self.forward(&x))?;
            let x = x.f_set_requires_grad(true)?;
            let loss = self.forward(&x)?.f_sum(Kind::Float)?;
            self.backward(&loss, &[x], false)?;
        }
        Ok(sizes)
    }

    /// Logits for `[B,3,S,S]` inputs in [0,1] (the preprocessed size).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        self.passes.forward.fetch_add(1, Ordering::Relaxed);
        self.call(x, |x| self.module.forward_ts(&[x]))
    }

    /// Pooled penultimate embeddings for `[B,3,S,S]` inputs (the module's `features` method).
    pub fn features(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        if self.info.bundle.meta.feature_dim.is_none() {
            return Err(tch::TchError::Torch(format!(
                "model {} has no `features` method (a plain traced network); Hausdorff matrices need one — \
                 export the pooled penultimate layer as `features`, or use the data-free matrix",
                self.info.name
            )));
        }
        self.passes.forward.fetch_add(1, Ordering::Relaxed);
        self.call(x, |x| self.module.method_ts("features", &[x]))
    }

    /// ∂loss/∂inputs in one backward pass (torch.autograd.grad).
    pub fn backward(&self, loss: &Tensor, inputs: &[Tensor], keep_graph: bool) -> Result<Vec<Tensor>, tch::TchError> {
        self.passes.backward.fetch_add(1, Ordering::Relaxed);
        Tensor::f_run_backward(&[loss], inputs, keep_graph, false)
    }

    /// The last linear layer: its parameter name and weight (classes × features), on the CPU.
    /// Named in the description, or else the one 2-D parameter whose first dimension is the
    /// class count.
    pub fn classifier_weight(&self) -> Result<(String, Tensor), ModelError> {
        let n = self.info.num_classes() as i64;
        let params = self.module.named_parameters()?;
        let (name, w) = match &self.info.bundle.meta.classifier {
            Some(spec) => params.into_iter().find(|(p, _)| *p == spec.weight).ok_or_else(|| {
                self.contract(format!("no parameter named {:?} (its classifier weight)", spec.weight))
            })?,
            None => {
                let mut found: Vec<_> =
                    params.into_iter().filter(|(_, t)| t.dim() == 2 && t.size().first() == Some(&n)).collect();
                match found.len() {
                    1 => found.remove(0),
                    k => {
                        let names: Vec<_> = found.iter().map(|(p, _)| p.as_str()).collect();
                        return Err(self.contract(format!(
                            "{k} two-dimensional parameters have {n} rows ({names:?}); name the classifier \
                             weight (labelfool.toml `classifier_weight`, model.json `classifier.weight`)"
                        )));
                    }
                }
            }
        };
        if w.size().first() != Some(&n) || w.dim() != 2 {
            return Err(self.contract(format!("{name} has shape {:?}, expected [{n}, features]", w.size())));
        }
        Ok((name, w.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_detach()?))
    }

    /// The data-free matrix: D[i,j] = 1 − cos(w_i, w_j) over the classifier weight's rows.
    pub fn data_free_matrix(&self) -> Result<DistanceMatrix, ModelError> {
        let (layer, w) = self.classifier_weight()?;
        let (n, d) = (w.size()[0] as usize, w.size()[1] as usize);
        let mut flat = vec![0f32; n * d];
        w.f_copy_data(&mut flat, n * d)?;
        let w = ndarray::Array2::from_shape_vec((n, d), flat).map_err(|e| self.contract(e.to_string()))?;
        let meta = MatrixMeta {
            model: self.info.name.clone(),
            num_classes: n,
            method: "from-weights".into(),
            details: serde_json::json!({"layer": layer, "distance": "1 - cos(w_i, w_j)"}),
            content_sha256: None,
        };
        DistanceMatrix::new(matrix::cosine_distances(&w), meta).map_err(|e| self.contract(e))
    }
}

/// A `[B, C]` tensor as B rows of f32 on the CPU.
pub fn tensor_rows(t: &Tensor) -> Result<Vec<Vec<f32>>, tch::TchError> {
    let t = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
    let (b, c) = (t.size()[0] as usize, t.size()[1] as usize);
    let mut flat = vec![0f32; b * c];
    t.f_copy_data(&mut flat, b * c)?;
    Ok(flat.chunks(c.max(1)).map(<[f32]>::to_vec).collect())
}
