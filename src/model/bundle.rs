//! A model described, not re-exported: a TorchScript file plus what it expects (input geometry,
//! normalisation the server applies, batch limit) and returns (the class list). On disk as a
//! bundle (`model.json` + `model.pt` + `classes.txt`, from `scripts/export_models.py` or any
//! tool that writes the same metadata), or built from a Triton model directory
//! ([`crate::model::repository`]). Read and checked here without loading any weights.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::classes::ClassList;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct InputSpec {
    /// Side of the square the network sees.
    pub size: i64,
    /// The shorter image side is resized to this (antialiased bilinear) before the centre crop.
    pub resize_short_side: i64,
    #[serde(default = "center")]
    pub crop: String,
    #[serde(default = "bilinear_aa")]
    pub interpolation: String,
    #[serde(default = "rgb")]
    pub channels: String,
    #[serde(default = "unit_range")]
    pub range: [f32; 2],
    /// Per-channel normalisation `(x − mean) / std` the server applies to [0,1] RGB before the
    /// network, inside the differentiable pipeline (attacks see it). None: the module takes [0,1]
    /// (a bundle with its normalisation inside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<[f32; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<[f32; 3]>,
}

fn center() -> String {
    "center".into()
}
fn bilinear_aa() -> String {
    "bilinear-antialias".into()
}
fn rgb() -> String {
    "RGB".into()
}
fn unit_range() -> [f32; 2] {
    [0.0, 1.0]
}
fn model_pt() -> String {
    "model.pt".into()
}

/// `classes_file = "imagenet"`: the 1000 ImageNet classes in the standard order, embedded.
pub use crate::config::description::IMAGENET;

/// The embedded ImageNet class list (`<wnid> <name>, <synonyms>`, line = index).
pub fn imagenet_classes() -> ClassList {
    ClassList::parse(include_str!("../../data/imagenet_classes.txt")).expect("the embedded ImageNet list parses")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierSpec {
    /// Parameter names of the last linear layer inside the TorchScript module.
    pub weight: String,
    pub bias: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format_version: u32,
    pub name: String,
    pub architecture: String,
    pub num_classes: usize,
    pub classes_file: String,
    #[serde(default)]
    pub dataset: Option<String>,
    /// Size of the module's `features` method (pooled penultimate embedding); None: the module
    /// has no such method (a plain traced network) and Hausdorff matrices cannot be built from it.
    #[serde(default)]
    pub feature_dim: Option<usize>,
    pub input: InputSpec,
    /// The last linear layer; None: found at load time (the one 2-D parameter whose first
    /// dimension is the class count).
    #[serde(default)]
    pub classifier: Option<ClassifierSpec>,
    /// The TorchScript file, relative to the bundle directory.
    #[serde(default = "model_pt")]
    pub model_file: String,
    /// Largest batch the module takes in one call (Triton's `max_batch_size`); None: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<usize>,
    #[serde(default)]
    pub source: serde_json::Value,
    #[serde(default)]
    pub model_sha256: Option<String>,
}

pub use crate::config::description::Description;

impl Description {
    /// The input geometry and normalisation it describes, for a network that sees `size`².
    pub fn input_spec(&self, size: i64) -> InputSpec {
        InputSpec {
            size,
            resize_short_side: self.resize_short_side.unwrap_or((size as f64 / 0.875).round() as i64),
            crop: center(),
            interpolation: bilinear_aa(),
            channels: rgb(),
            range: unit_range(),
            mean: self.mean,
            std: self.std,
        }
    }
}

impl ModelMeta {
    /// The metadata of a described model: `model_file` relative to its directory, `classes_file`
    /// as given (`imagenet` or a path relative to the directory).
    #[allow(clippy::too_many_arguments)]
    pub fn described(
        name: &str,
        architecture: String,
        model_file: String,
        size: i64,
        num_classes: usize,
        classes_file: String,
        d: &Description,
        source: serde_json::Value,
    ) -> Self {
        Self {
            format_version: 2,
            name: name.to_string(),
            architecture,
            num_classes,
            dataset: (classes_file == IMAGENET).then(|| IMAGENET.to_string()),
            classes_file,
            feature_dim: None,
            input: d.input_spec(size),
            classifier: d.classifier_weight.clone().map(|weight| ClassifierSpec { weight, bias: None }),
            model_file,
            max_batch_size: d.module_max_batch,
            source,
            model_sha256: None,
        }
    }
}

/// Everything about a bundle that can be known without libtorch.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub meta: ModelMeta,
    pub classes: ClassList,
}

/// Why a bundle (a model's folder, or a described TorchScript file) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {what} {path}: {source}{hint}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error, hint: &'static str },
    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },
    /// Its parts disagree (class count, geometry, preprocessing), or a description lacks a part.
    #[error("{0}")]
    Inconsistent(String),
}

impl Bundle {
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.meta.model_file)
    }

    /// The class list a bundle names: `imagenet` (embedded) or a file relative to `dir`.
    pub fn read_classes(dir: &Path, file: &str) -> Result<ClassList, BundleError> {
        if file == IMAGENET {
            return Ok(imagenet_classes());
        }
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).map_err(|source| BundleError::Read {
            what: "class list",
            path: path.clone(),
            source,
            hint: "",
        })?;
        ClassList::parse(&text).map_err(|message| BundleError::Malformed { path, message })
    }

    /// Checks that the parts agree (class count, geometry, supported preprocessing).
    pub fn new(dir: &Path, meta: ModelMeta, classes: ClassList) -> Result<Self, BundleError> {
        Self::check(dir, &meta, &classes).map_err(BundleError::Inconsistent)?;
        Ok(Self { dir: dir.to_path_buf(), meta, classes })
    }

    fn check(dir: &Path, meta: &ModelMeta, classes: &ClassList) -> Result<(), String> {
        if classes.len() != meta.num_classes {
            return Err(format!(
                "the class list {} lists {} classes but the model has {} (num_classes)",
                meta.classes_file,
                classes.len(),
                meta.num_classes
            ));
        }
        let input = &meta.input;
        if input.size < 8 || input.resize_short_side < input.size {
            return Err(format!(
                "input size {} must be ≥ 8 and ≤ resize_short_side {}",
                input.size, input.resize_short_side
            ));
        }
        if input.crop != "center"
            || input.interpolation != "bilinear-antialias"
            || input.channels != "RGB"
            || input.range != [0.0, 1.0]
        {
            return Err("only centre crop, bilinear-antialias resize and RGB in [0,1] are supported".into());
        }
        if input.mean.is_some() != input.std.is_some() {
            return Err("give both mean and std, or neither".into());
        }
        if let Some(std) = input.std
            && std.iter().any(|s| !s.is_finite() || *s <= 0.0)
        {
            return Err(format!("std {std:?} must be positive"));
        }
        if input.mean.is_some_and(|m| m.iter().any(|v| !v.is_finite())) {
            return Err("mean must be finite".into());
        }
        if meta.max_batch_size == Some(0) {
            return Err("max_batch_size must be ≥ 1 when given".into());
        }
        let model = dir.join(&meta.model_file);
        if !model.is_file() {
            return Err(format!("model file {} is missing", model.display()));
        }
        Ok(())
    }

    /// A TorchScript file described in the configuration (no `model.json`).
    pub fn from_description(name: &str, torchscript: &Path, d: &Description) -> Result<Self, BundleError> {
        let dir = torchscript.parent().unwrap_or(Path::new("."));
        let file = torchscript
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .ok_or_else(|| BundleError::Inconsistent(format!("{} is not a file path", torchscript.display())))?;
        let size = d.size.ok_or_else(|| BundleError::Inconsistent("a described model needs `size`".into()))?;
        let classes_file = d.classes.clone().unwrap_or_else(|| IMAGENET.to_string());
        let classes = Self::read_classes(dir, &classes_file)?;
        let meta = ModelMeta::described(
            name,
            "TorchScript (described in the configuration)".into(),
            file,
            size,
            classes.len(),
            classes_file,
            d,
            serde_json::json!({"torchscript": torchscript}),
        );
        Self::new(dir, meta, classes)
    }

    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        let path = dir.join("model.json");
        let text = std::fs::read_to_string(&path).map_err(|source| BundleError::Read {
            what: "model metadata",
            path: path.clone(),
            source,
            hint: " (has the setup run? `scripts/setup`)",
        })?;
        let meta: ModelMeta = serde_json::from_str(&text).map_err(|e| BundleError::Malformed {
            path: path.clone(),
            message: format!("not valid model metadata: {e}"),
        })?;
        if !(1..=2).contains(&meta.format_version) {
            let message = format!("unsupported format_version {}", meta.format_version);
            return Err(BundleError::Malformed { path, message });
        }
        let classes = Self::read_classes(dir, &meta.classes_file)?;
        Self::check(dir, &meta, &classes).map_err(|message| BundleError::Malformed { path, message })?;
        Ok(Self { dir: dir.to_path_buf(), meta, classes })
    }
}
