//! `[[remotes]]`: models behind other servers' Open Inference Protocol endpoints, as configured.
//! What a remote does with it (and how its `Debug` hides secrets) lives in `crate::remote`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::description::{Description, IMAGENET};

/// How the image travels to the remote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RemoteInput {
    /// The encoded image file as a `BYTES` tensor of shape `[1]`.
    #[default]
    Bytes,
    /// The preprocessed `FP32` tensor `[1, 3, S, S]` (preprocessing from `description`).
    Fp32,
}

/// What the output tensor holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Scores {
    #[default]
    Probabilities,
    /// Softmax is applied here.
    Logits,
}

/// A `[[remotes]]` entry. Its `Debug` hides the header values and the URL's credentials.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Addressed as `remote:<name>`.
    pub name: String,
    /// Base URL of the server, e.g. `http://triton:8000` (no query or fragment: paths are
    /// appended to it). Credentials in it (`https://user:pass@host`) are sent as basic
    /// authentication and never shown ([`redact_url`]).
    pub url: String,
    pub model: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub input: RemoteInput,
    /// The input tensor's name (default `image` for bytes, `input` for fp32).
    #[serde(default)]
    pub input_name: Option<String>,
    /// The output tensor to read (default: the response's first).
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub scores: Scores,
    /// Send bytes inputs with Triton's binary tensor data extension instead of base64 JSON.
    #[serde(default)]
    pub binary_data: bool,
    /// For `fp32`: the preprocessing (`size` required), as for local models.
    #[serde(default)]
    pub description: Option<Description>,
    /// `imagenet` or a class-list file: what the output's indices mean.
    #[serde(default = "imagenet")]
    pub classes: String,
    /// Extra request headers (authentication): sent to `url` only (redirects are not followed),
    /// marked sensitive so they never appear in logs.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Requests in flight to this remote at once.
    #[serde(default = "default_concurrency")]
    pub max_concurrent: usize,
    /// How long a request waits for one of those `max_concurrent` slots before it is answered
    /// 503 `remote_busy` (0: refused at once when all are taken). Without it, a stuck remote
    /// would hold every request queued behind it for as long as clients keep their connections.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout_ms: u64,
    /// For an `https` url: a PEM file of CA certificates to trust besides the system's (a
    /// cluster's own CA).
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn imagenet() -> String {
    IMAGENET.into()
}
fn default_timeout() -> u64 {
    10_000
}
fn default_concurrency() -> usize {
    8
}
fn default_queue_timeout() -> u64 {
    30_000
}
