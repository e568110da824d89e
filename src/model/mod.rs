//! Models: what handlers may know about them ([`Catalog`], [`ModelInfo`]: names, classes, input
//! geometry, distance matrix) and what only the worker thread holds ([`LoadedModel`]: the
//! TorchScript module on the device).

pub mod bundle;
pub mod classes;
pub mod device;
pub mod matrix;
pub mod preprocess;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

pub use crate::config::DeviceSpec;
pub use bundle::{Bundle, InputSpec, ModelMeta};
pub use classes::{ClassInfo, ClassList};
pub use device::{device_name, single_threaded_torch_here};

use crate::config::Config;
use matrix::DistanceMatrix;

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
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_size: usize,
    pub max_wait: Duration,
}

/// A configured model, as far as it can be known without libtorch. Shared (read-only) by handlers.
#[derive(Debug)]
pub struct ModelInfo {
    pub name: String,
    pub bundle: Bundle,
    pub matrix: Option<DistanceMatrix>,
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

    /// Opens the bundle at `dir` and the matrix (if any), checking that they agree.
    pub fn open(
        name: &str,
        dir: &std::path::Path,
        matrix: Option<&std::path::Path>,
        batch: BatchPolicy,
    ) -> Result<Self, ModelError> {
        let bundle = Bundle::open(dir).map_err(|reason| ModelError::Bundle { model: name.into(), reason })?;
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
        Ok(Self { name: name.into(), bundle, matrix, batch })
    }
}

/// All configured models, in config order; the first is the default.
#[derive(Debug, Clone)]
pub struct Catalog {
    models: Vec<Arc<ModelInfo>>,
}

impl Catalog {
    pub fn from_config(config: &Config) -> Result<Self, ModelError> {
        let mut models = Vec::new();
        for m in &config.models {
            let bundle_err = |reason: String| ModelError::Bundle { model: m.name.clone(), reason };
            let dir = m.dir().map_err(|e| bundle_err(e.to_string()))?;
            let matrix = m.matrix_path().map_err(|e| bundle_err(e.to_string()))?;
            let batch = BatchPolicy { max_size: config.batch_size(m), max_wait: config.batch_wait(m) };
            models.push(Arc::new(ModelInfo::open(&m.name, &dir, matrix.as_deref(), batch)?));
        }
        Ok(Self { models })
    }

    pub fn from_models(models: Vec<ModelInfo>) -> Self {
        Self { models: models.into_iter().map(Arc::new).collect() }
    }

    /// The named model, or the default one when `name` is None.
    pub fn get(&self, name: Option<&str>) -> Option<(usize, &Arc<ModelInfo>)> {
        match name {
            None => self.models.first().map(|m| (0, m)),
            Some(n) => self.models.iter().enumerate().find(|(_, m)| m.name == n),
        }
    }

    pub fn by_index(&self, i: usize) -> &Arc<ModelInfo> {
        &self.models[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelInfo>> {
        self.models.iter()
    }

    pub fn names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
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
    pub passes: Arc<PassCounts>,
}

impl LoadedModel {
    /// Loads the module onto `device` and checks it against its metadata with one forward pass
    /// (class count, feature size) so that a mismatched bundle fails at start-up, not mid-request.
    pub fn load(info: Arc<ModelInfo>, device: Device) -> Result<Self, ModelError> {
        let path = info.bundle.model_path();
        let mut module = tch::CModule::load_on_device(&path, device).map_err(|source| ModelError::Load {
            model: info.name.clone(),
            path: path.clone(),
            source,
        })?;
        module.f_set_eval()?;
        let model = Self { info, module, device, passes: Arc::default() };
        model.check_contract()?;
        Ok(model)
    }

    fn check_contract(&self) -> Result<(), ModelError> {
        let s = self.info.input().size;
        let name = &self.info.name;
        let probe = Tensor::f_full([2, 3, s, s], 0.5, (Kind::Float, self.device))?;
        let (logits, feats) = tch::no_grad(|| -> Result<_, tch::TchError> {
            Ok((self.module.forward_ts(&[&probe])?, self.module.method_ts("features", &[&probe])?))
        })
        .map_err(|e| ModelError::Contract {
            model: name.clone(),
            reason: format!("forward/features failed on a 2×3×{s}×{s} batch: {e}"),
        })?;
        let want_logits = vec![2, self.info.num_classes() as i64];
        if logits.size() != want_logits {
            return Err(ModelError::Contract {
                model: name.clone(),
                reason: format!("forward gives {:?}, metadata promises {:?}", logits.size(), want_logits),
            });
        }
        let want_feats = vec![2, self.info.bundle.meta.feature_dim as i64];
        if feats.size() != want_feats {
            return Err(ModelError::Contract {
                model: name.clone(),
                reason: format!("features gives {:?}, metadata promises {:?}", feats.size(), want_feats),
            });
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Logits for `[B,3,S,S]` inputs in [0,1] (the preprocessed size).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        self.passes.forward.fetch_add(1, Ordering::Relaxed);
        self.module.forward_ts(&[x])
    }

    /// Pooled penultimate embeddings for `[B,3,S,S]` inputs.
    pub fn features(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        self.passes.forward.fetch_add(1, Ordering::Relaxed);
        self.module.method_ts("features", &[x])
    }

    /// ∂loss/∂inputs in one backward pass (torch.autograd.grad).
    pub fn backward(&self, loss: &Tensor, inputs: &[Tensor], keep_graph: bool) -> Result<Vec<Tensor>, tch::TchError> {
        self.passes.backward.fetch_add(1, Ordering::Relaxed);
        Tensor::f_run_backward(&[loss], inputs, keep_graph, false)
    }

    /// The last linear layer's weight (classes × features), on the CPU.
    pub fn classifier_weight(&self) -> Result<Tensor, ModelError> {
        let want = &self.info.bundle.meta.classifier.weight;
        let params = self.module.named_parameters()?;
        let w = params.into_iter().find(|(n, _)| n == want).map(|(_, t)| t).ok_or_else(|| ModelError::Contract {
            model: self.info.name.clone(),
            reason: format!("no parameter named {want:?} (metadata classifier.weight)"),
        })?;
        let n = self.info.num_classes() as i64;
        if w.size().first() != Some(&n) || w.dim() != 2 {
            return Err(ModelError::Contract {
                model: self.info.name.clone(),
                reason: format!("{want} has shape {:?}, expected [{n}, features]", w.size()),
            });
        }
        Ok(w.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_detach()?)
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
