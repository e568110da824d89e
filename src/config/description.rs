//! A model's description: what it expects and returns, wherever a model is configured.

use serde::{Deserialize, Serialize};

/// The `classes` value naming the embedded ImageNet list (with WordNet ids).
pub const IMAGENET: &str = "imagenet";

/// What a described model expects and returns, as a `[[models]]` entry's `description`, a Triton
/// model's `labelfool.toml` and `labelfool model add` give it. Everything but `size` has a
/// default (a Triton model's size comes from its `config.pbtxt`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Description {
    /// Side of the square the network sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// Shorter side after resizing, before the centre crop; default `size / 0.875`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize_short_side: Option<i64>,
    /// Normalisation the server applies to [0,1] RGB; default none (the network takes [0,1]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<[f32; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<[f32; 3]>,
    /// `imagenet` (embedded, with WordNet ids) or a class-list file (one class per line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<String>,
    /// The classifier's last linear layer, when it cannot be found by its shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_weight: Option<String>,
    /// Largest batch the module takes in one call; default any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_max_batch: Option<usize>,
    /// A distance matrix (`.npy` + sidecar) relative to the model's directory; default: the
    /// data-free one, computed when the model loads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix: Option<String>,
}
