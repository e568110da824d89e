//! A model bundle on disk: `model.pt` (TorchScript), `model.json` (this metadata), `classes.txt`.
//! Written by `scripts/export_models.py`; read and checked here without loading any weights.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::classes::ClassList;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
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
    pub feature_dim: usize,
    pub input: InputSpec,
    pub classifier: ClassifierSpec,
    #[serde(default)]
    pub source: serde_json::Value,
    #[serde(default)]
    pub model_sha256: Option<String>,
}

/// Everything about a bundle that can be known without libtorch.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub meta: ModelMeta,
    pub classes: ClassList,
}

impl Bundle {
    pub fn model_path(&self) -> PathBuf {
        self.dir.join("model.pt")
    }

    pub fn open(dir: &Path) -> Result<Self, String> {
        let meta_path = dir.join("model.json");
        let text = std::fs::read_to_string(&meta_path)
            .map_err(|e| format!("cannot read {}: {e} (has the setup run? `make setup`)", meta_path.display()))?;
        let meta: ModelMeta = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not valid model metadata: {e}", meta_path.display()))?;
        if meta.format_version != 1 {
            return Err(format!("{}: unsupported format_version {}", meta_path.display(), meta.format_version));
        }
        let model = dir.join("model.pt");
        if !model.is_file() {
            return Err(format!("model file {} is missing", model.display()));
        }
        let classes_path = dir.join(&meta.classes_file);
        let classes_text = std::fs::read_to_string(&classes_path)
            .map_err(|e| format!("cannot read class list {}: {e}", classes_path.display()))?;
        let classes = ClassList::parse(&classes_text).map_err(|e| format!("{}: {e}", classes_path.display()))?;
        if classes.len() != meta.num_classes {
            return Err(format!(
                "{} lists {} classes but {} says num_classes = {}",
                classes_path.display(),
                classes.len(),
                meta_path.display(),
                meta.num_classes
            ));
        }
        let input = &meta.input;
        if input.size < 8 || input.resize_short_side < input.size {
            return Err(format!("{}: input.size must be ≥ 8 and ≤ resize_short_side", meta_path.display()));
        }
        if input.crop != "center"
            || input.interpolation != "bilinear-antialias"
            || input.channels != "RGB"
            || input.range != [0.0, 1.0]
        {
            return Err(format!(
                "{}: only centre crop, bilinear-antialias resize and RGB in [0,1] are supported",
                meta_path.display()
            ));
        }
        Ok(Self { dir: dir.to_path_buf(), meta, classes })
    }
}
