//! Typed configuration: `config/default.toml`, then `LABELFOOL_SECTION__KEY` environment variables,
//! then command-line flags. Everything is validated before the server binds, so a bad value stops
//! start-up with one clear message instead of failing later inside a request.

pub mod description;
pub mod remotes;
pub mod studies;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use description::Description;
pub use remotes::{RemoteConfig, RemoteInput, Scores};
pub use studies::StudiesConfig;

/// Where the setup keeps the torch venv and the exported model bundles, unless `LABELFOOL_CACHE` says.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LABELFOOL_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("labelfool")
}

/// The config file used when none is named: `config/default.toml` under the working directory, or
/// beside the executable's repository (`target/release/labelfool` → `../../config/default.toml`).
pub fn default_config_path() -> Option<PathBuf> {
    let local = PathBuf::from("config/default.toml");
    if local.is_file() {
        return Some(local);
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().skip(1).take(4).map(|dir| dir.join("config/default.toml")).find(|p| p.is_file())
}

/// The `device` setting: `auto | cpu | cuda | cuda:N` (resolved to a libtorch device on the
/// worker thread, `model::device`). Read from its string form, so a bad value fails at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("{s:?} is not a device; use auto, cpu, cuda or cuda:N")),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub attack: AttackDefaults,
    pub models: Vec<ModelConfig>,
    /// Triton model repositories whose `pytorch_libtorch` models are served as they are.
    pub repositories: Vec<RepositoryConfig>,
    /// Models behind other servers' Open Inference Protocol endpoints (`remote:<name>`).
    pub remotes: Vec<RemoteConfig>,
    /// Durable jobs (`/jobs`): where they and their results live.
    pub jobs: JobsConfig,
    /// Human studies (`/studies`): how long observer links live.
    pub studies: StudiesConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Durable jobs (`/jobs`) at all; off, their routes answer 503 `jobs_unavailable`.
    pub enabled: bool,
    /// The jobs database: a SQLite file (`${LABELFOOL_CACHE}` is expanded; servers on one host
    /// may share it, and then share its jobs' work) or a PostgreSQL DSN (`postgres://…`: servers
    /// on many hosts, which must share `dir` too).
    pub database: String,
    /// Where delivered PNGs and reports are written, a folder per job.
    pub dir: String,
    /// Folders a job may read images from (a job's folder must lie under one, after resolving
    /// links). Empty: every job is refused (403), so a server never reads folders nobody named.
    pub allowed_dirs: Vec<String>,
    /// Attacks of one job in flight at once (interactive requests share the worker with them).
    pub concurrency: usize,
    /// After a restart, resume the jobs that were running (else mark them `interrupted`).
    pub resume: bool,
    /// Most images one job may hold (images × methods × models).
    pub max_attacks: usize,
    /// Largest zip archive `POST /jobs` takes as an upload (bytes as sent).
    pub max_archive_bytes: u64,
    /// Most files and most bytes an uploaded archive may unpack to (zip bombs stop there).
    pub max_archive_files: usize,
    pub max_unpacked_bytes: u64,
    /// Most bytes the jobs' folder may hold (inputs, PNGs, reports, uploads): a new job or an
    /// upload that would take it past this is refused (507). 0: no quota.
    pub max_total_bytes: u64,
    /// Finished jobs (done, failed, cancelled, interrupted) older than this are deleted with
    /// their files, at start-up and then hourly; a job a study uses is kept. 0: kept forever.
    /// A float, so that a fraction of a day (or a test's second) can be said.
    pub retention_days: f64,
    /// How long a server holds a claimed work item without renewing it (it renews every third
    /// of this): a server that hangs loses its items to the others after this. A server that
    /// dies loses them at once (its lock file is free).
    pub lease_secs: f64,
    /// Claims of one work item that may end without an answer — its server killed, out of
    /// memory or hung mid-item — before it is given up: its image then gets an error record
    /// and the job goes on, so one image that kills its server cannot stop every replica.
    /// Items handed back on a graceful stop do not count.
    pub max_attempts: u32,
    /// How often an idle runner looks for work another server queued, and how often a
    /// progress stream (`/jobs/{id}/events`) reads the job's counts.
    pub poll_ms: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            database: "${LABELFOOL_CACHE}/jobs/jobs.sqlite3".into(),
            dir: "${LABELFOOL_CACHE}/jobs".into(),
            allowed_dirs: Vec::new(),
            concurrency: 2,
            resume: true,
            max_attacks: 100_000,
            max_archive_bytes: 512 << 20,
            max_archive_files: 10_000,
            max_unpacked_bytes: 2 << 30,
            max_total_bytes: 10 << 30,
            retention_days: 30.0,
            lease_secs: 30.0,
            max_attempts: 3,
            poll_ms: 500,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    /// Bearer token required on every route but the probes, the studio's page and assets and the
    /// observers' links (and `/metrics` unless `metrics_require_key`). `LABELFOOL_API_KEY` sets it
    /// too. None: no authentication, which the server accepts only on a loopback address unless
    /// `allow_unauthenticated` says so.
    pub api_key: Option<String>,
    /// Serve without a key on a non-loopback address (logged as a warning at start).
    pub allow_unauthenticated: bool,
    /// A second listener that answers only the probes (`/health`, `/ready`, `/v2/health/*`), so
    /// that they stay answerable whatever holds the main listener's connections. None: off.
    pub probe_bind: Option<SocketAddr>,
    /// Public requests (studio assets, observers' links) handled at once, and their rate; past
    /// either, 503 at once.
    pub max_public_requests: usize,
    pub public_requests_per_second: u32,
    pub metrics_require_key: bool,
    /// Allowed CORS origins; empty = CORS off. `["*"]` allows any origin.
    pub cors_origins: Vec<String>,
    /// Requests handled at once across all routes (tower concurrency limit).
    pub max_concurrent_requests: usize,
    /// On SIGTERM/SIGINT, `/ready` turns 503 at once and the server keeps accepting requests for
    /// this long (so load balancers stop sending new work), then stops accepting.
    pub shutdown_delay_ms: u64,
    /// After that, in-flight work may finish for this long; what is still running then is
    /// answered 503 at once and the process exits 0 within ~2 s more.
    pub shutdown_grace_secs: u64,
    /// Open connections at once; past it the server stops accepting (the kernel queues them).
    pub max_connections: usize,
    /// A client must send a request's whole header within this time, including the wait for the
    /// next request on a kept-alive connection (so it is the idle timeout too); else it is closed.
    pub header_read_timeout_ms: u64,
    /// A request's whole body must arrive within this time after its header; else 408.
    pub body_read_timeout_ms: u64,
    /// Request-body bytes buffered at once across all requests (bytes that have arrived, held
    /// until the request is answered); a chunk that would go past it gets the request 503 at once.
    pub max_buffered_body_bytes: usize,
    /// Longest request target (path and query) accepted; longer gets 414.
    pub max_uri_bytes: usize,
    /// Largest header section (names + values) and most header fields accepted; more gets 431.
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceSpec,
    /// libtorch intra-op threads on the worker; 0 = libtorch's default (one per core).
    pub threads: usize,
    /// Jobs that may wait for the worker; one more is answered 503 with `Retry-After`.
    pub queue_capacity: usize,
    /// Attacks iterating at once on the worker (rows of the continuous batch).
    pub max_inflight_attacks: usize,
    /// Default dynamic-batching limits (a model may override them).
    /// 0 = by device: CPU inference gets *slower* per image past small batches (activations
    /// leave the cache: measured 22 → 15 → 20 → 31 ms/image at batch 1, 2, 4, 16 on 2 cores), GPUs
    /// want large ones. See [`auto_batch`].
    pub max_batch_size: usize,
    pub max_batch_wait_ms: u64,
    /// Largest number of attack rows sent through the model in one forward/backward pass
    /// (0 = by device, as `max_batch_size`).
    pub max_attack_batch: usize,
    /// Images decoded and resized, or a finished attack's PNG encoded and its metrics computed,
    /// at once on the blocking pool (0 = one per CPU core). More would only take CPU time from
    /// the worker.
    pub decode_threads: usize,
    /// Pixels (width × height, summed) of the attacks iterating at once: each holds its image,
    /// gradient and step at full size on the device. An attack that would go past it waits in the
    /// queue (one attack is always admitted, so a single large image still runs).
    pub max_inflight_attack_pixels: u64,
    /// TorchScript's tensor-expression fuser (fused kernels compiled per input shape). Off: on
    /// CUDA each new batch size cost seconds of compilation on the worker; CPU never fuses.
    pub jit_fuser: bool,
    /// TorchScript's graph optimiser on the worker (profiling, specialisation per shape).
    pub jit_optimize: bool,
    /// Batch sizes the models are called with; see [`BatchPadding`].
    pub batch_padding: BatchPadding,
    /// How an attack tick resizes its rows; see [`BatchResize`].
    pub batch_resize: BatchResize,
}

/// Batch sizes a model is called with. Continuous batching changes the batch size from tick to
/// tick, and on CUDA every size met for the first time pays for its kernels' set-up (cuDNN plans,
/// TorchScript specialisations): on an H200, /attack at 8 concurrent clients ran at 1.18/s
/// against 8.15 alone while they were new (benches/results.md). Padding to a few sizes, warmed
/// up when the model loads, pays that once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchPadding {
    /// `pow2` on CUDA, `off` on the CPU (where padded rows cost their full compute).
    #[default]
    Auto,
    /// As they come.
    Off,
    /// Zero rows up to the next power of two (at most the batch limit); those sizes are run
    /// once, forward and backward, when the model loads.
    Pow2,
}

impl BatchPadding {
    /// Whether batches are padded on a CUDA (`cuda`) or CPU device.
    pub fn pads_on(self, cuda: bool) -> bool {
        match self {
            Self::Auto => cuda,
            Self::Off => false,
            Self::Pow2 => true,
        }
    }
}

/// How an attack tick runs the model's resize for its rows, whose uploads keep their own sizes
/// (see `model::resize`): on a GPU the op row by row is launch-bound, and batched matrix
/// products do every row in two. `/classify` and the 8-bit checks always use the op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchResize {
    /// On CUDA, whichever of the two is faster on the card, timed when the model loads; on the
    /// CPU `per_row` (the faster there: benches/results.md).
    #[default]
    Auto,
    /// The resize op, row by row.
    PerRow,
    /// `Rh · X · Rwᵀ` for groups of rows at once, forward and backward.
    Matrix,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body of a route that takes an image (bytes); larger gets 413.
    pub max_body_bytes: usize,
    /// Largest body of every other route: JSON commands, observers' answers, probes.
    pub max_small_body_bytes: usize,
    /// Largest decoded image (width × height) accepted; larger gets 413 before any pixel is decoded.
    pub max_image_pixels: u64,
    /// Largest width or height accepted.
    pub max_image_side: u32,
    /// Largest image an attack works on at original size (its gradient lives at that size).
    pub max_attack_pixels: u64,
    /// Upper bound on a request's `max_iter`.
    pub max_iter: u32,
    pub max_top_k: usize,
    /// Deadlines per route; past them the request is answered 504 and its work is dropped.
    pub classify_deadline_ms: u64,
    pub attack_deadline_ms: u64,
    /// Longest side an image may have after the model's resize (short side → `resize`): a
    /// 12000×1 image would resize to 256×3,072,000. Bounds the preprocessing tensors; past it 422.
    pub max_resized_side: u32,
    /// Upper bound on DeepFool's / SparseFool's `candidates` (one backward pass each per step).
    pub max_candidates: usize,
    /// Upper bound on the backward passes one attack request may cost (its worst case, from its
    /// method, `max_iter` and `candidates`); a request over it is refused with 422 before any work
    /// and counted in `labelfool_requests_refused_total{reason="cost"}`.
    pub max_backward_passes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttackDefaults {
    pub max_iter: u32,
    pub overshoot: f64,
    /// LabelFool's δ1: above this top-1 probability the MLE branch picks the target.
    pub delta1: f64,
    /// LabelFool's δ2: classes above this probability form the candidate set S.
    pub delta2: f64,
    /// Logit margins tried in turn when the 8-bit image misses the target (see `attack::labelfool`).
    pub margins: Vec<f64>,
    /// 8-bit checks spent after success to take back rounding the goal does not need (see
    /// `attack::guard`); 0 delivers the first image that succeeds.
    pub refine_rounds: u32,
    /// 8-bit checks spent after refinement to take back the grey levels the goal needs least
    /// (see `attack::prune`); 0 turns pruning off, and its bisection never uses more than 5.
    pub prune_rounds: u32,
    /// Refinement's and pruning's checks as one tick each instead of a bisection (one check per
    /// tick): every candidate the bisection could reach is checked at once (with the default
    /// rounds 7 scales, then up to 31 fractions), and the smallest passing scale, then the
    /// largest passing fraction, is delivered. The same quality in two ticks instead of eight,
    /// for up to 38 images instead of 8: it can only pay where a batch costs about what one
    /// image does (a GPU with room in its ticks), and no GPU has measured it yet.
    pub batched_checks: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    /// Directory of a bundle (`model.pt`, `model.json`, `classes.txt`); `~` and `${VAR}` expand.
    /// Or, instead, `torchscript` and the description below.
    #[serde(default)]
    pub dir: Option<String>,
    /// A TorchScript file (`forward(x) -> logits`), described here rather than by a `model.json`.
    #[serde(default)]
    pub torchscript: Option<String>,
    /// With `torchscript`: what the network expects and returns, e.g.
    /// `{ size = 224, mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225], classes = "imagenet" }`.
    #[serde(default)]
    pub description: Option<Description>,
    /// Distance matrix (`.npy` with a `.json` sidecar); default `<dir>/distance.npy` when present.
    #[serde(default)]
    pub matrix: Option<String>,
    #[serde(default)]
    pub max_batch_size: Option<usize>,
    #[serde(default)]
    pub max_batch_wait_ms: Option<u64>,
}

/// A Triton model repository (`<path>/<model>/config.pbtxt`, `<path>/<model>/<version>/model.pt`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// `~` and `${VAR}` expand.
    pub path: String,
    /// Load every servable model at start-up (Triton's default model control); false: only on
    /// `POST /v2/repository/models/{name}/load` (Triton's `explicit` mode).
    #[serde(default = "yes")]
    pub load_at_startup: bool,
}

fn yes() -> bool {
    true
}

impl RepositoryConfig {
    pub fn path(&self) -> Result<PathBuf, ConfigError> {
        expand_path(&self.path)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            allow_unauthenticated: false,
            probe_bind: None,
            max_public_requests: 64,
            public_requests_per_second: 200,
            metrics_require_key: false,
            cors_origins: Vec::new(),
            max_concurrent_requests: 512,
            shutdown_delay_ms: 0,
            shutdown_grace_secs: 30,
            max_connections: 4096,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            max_buffered_body_bytes: 512 * 1024 * 1024,
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Auto,
            threads: 0,
            queue_capacity: 256,
            max_inflight_attacks: 16,
            max_batch_size: 0,
            max_batch_wait_ms: 2,
            max_attack_batch: 0,
            decode_threads: 0,
            max_inflight_attack_pixels: 24_000_000,
            jit_fuser: false,
            jit_optimize: true,
            batch_padding: BatchPadding::Auto,
            batch_resize: BatchResize::Auto,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 20 * 1024 * 1024,
            max_small_body_bytes: 64 * 1024,
            max_image_pixels: 40_000_000,
            max_image_side: 12_000,
            max_attack_pixels: 12_000_000,
            max_iter: 500,
            max_top_k: 1000,
            classify_deadline_ms: 30_000,
            attack_deadline_ms: 300_000,
            max_resized_side: 4096,
            max_candidates: 20,
            max_backward_passes: 10_000,
        }
    }
}

impl Default for AttackDefaults {
    fn default() -> Self {
        Self {
            max_iter: 50,
            overshoot: 0.02,
            delta1: 0.8,
            delta2: 0.01,
            margins: vec![0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
            refine_rounds: 3,
            prune_rounds: 5,
            batched_checks: false,
        }
    }
}

impl Config {
    /// Defaults ← file ← `LABELFOOL_SECTION__KEY` env ← the short aliases (`LABELFOOL_BIND`,
    /// `LABELFOOL_DEVICE`, `LABELFOOL_API_KEY`). Flags are applied by the caller afterwards.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) if !path.is_file() => return Err(ConfigError::Missing(path.to_path_buf())),
            Some(path) => fig = fig.merge(Toml::file(path)),
            None => {}
        }
        fig = fig.merge(Env::prefixed("LABELFOOL_").filter(|k| k.as_str().contains("__")).split("__"));
        let mut config: Config = fig.extract().map_err(Box::new)?;
        if let Some(bind) = env_nonempty("LABELFOOL_BIND") {
            config.server.bind = bind.parse().map_err(|_| {
                ConfigError::Invalid(format!("LABELFOOL_BIND={bind:?} is not an address like 127.0.0.1:8080"))
            })?;
        }
        if let Some(device) = env_nonempty("LABELFOOL_DEVICE") {
            config.engine.device =
                DeviceSpec::parse(&device).map_err(|e| ConfigError::Invalid(format!("LABELFOOL_DEVICE: {e}")))?;
        }
        if let Some(key) = env_nonempty("LABELFOOL_API_KEY") {
            config.server.api_key = Some(key);
        }
        Ok(config)
    }

    /// Checks that need no model file: ranges, names, the device string.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.models.is_empty() {
            return bad("no [[models]] configured (the first is the default model)".into());
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            if m.name.is_empty() || !m.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return bad(format!(
                    "model name {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'",
                    m.name
                ));
            }
            if !names.insert(&m.name) {
                return bad(format!("model name {:?} is configured twice", m.name));
            }
            m.dir()?;
            if m.torchscript.is_some() && m.description.as_ref().and_then(|d| d.size).is_none() {
                return bad(format!(
                    "models.{}: a described model needs `description = {{ size = … }}` (the square side the network sees)",
                    m.name
                ));
            }
            if m.max_batch_size == Some(0) {
                return bad(format!("models.{}.max_batch_size must be at least 1", m.name));
            }
        }
        let e = &self.engine;
        if e.queue_capacity == 0 || e.max_inflight_attacks == 0 {
            return bad("engine.queue_capacity and max_inflight_attacks must be ≥ 1".into());
        }
        let l = &self.limits;
        if l.max_body_bytes < 1024 || l.max_image_pixels == 0 || l.max_image_side == 0 || l.max_iter == 0 {
            return bad("limits must be positive (max_body_bytes ≥ 1024)".into());
        }
        let a = &self.attack;
        if a.max_iter == 0 || a.max_iter > l.max_iter {
            return bad(format!("attack.max_iter must be in 1..={}", l.max_iter));
        }
        if !(a.overshoot.is_finite() && a.overshoot >= 0.0) {
            return bad("attack.overshoot must be a finite number ≥ 0".into());
        }
        if !(a.delta1 > 0.0 && a.delta1 <= 1.0 && a.delta2 >= 0.0 && a.delta2 < 1.0) {
            return bad("attack.delta1 must be in (0, 1] and attack.delta2 in [0, 1)".into());
        }
        if a.margins.is_empty()
            || a.margins.iter().any(|m| !m.is_finite() || *m < 0.0)
            || a.margins.windows(2).any(|w| w[0] >= w[1])
        {
            return bad("attack.margins must be a non-empty, strictly increasing list of finite numbers ≥ 0".into());
        }
        if a.refine_rounds > 10 || a.prune_rounds > 10 {
            return bad("attack.refine_rounds and attack.prune_rounds must be in 0..=10".into());
        }
        let sv = &self.server;
        if sv.shutdown_grace_secs == 0 || sv.max_concurrent_requests == 0 || sv.max_connections == 0 {
            return bad("server.shutdown_grace_secs, max_concurrent_requests and max_connections must be ≥ 1".into());
        }
        if sv.max_public_requests == 0 || sv.public_requests_per_second == 0 {
            return bad("server.max_public_requests and public_requests_per_second must be ≥ 1".into());
        }
        if l.max_small_body_bytes < 1024 || l.max_small_body_bytes > l.max_body_bytes {
            return bad("limits.max_small_body_bytes must be in 1024..=limits.max_body_bytes".into());
        }
        if sv.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return bad("server.api_key must not be empty (leave it unset for no key)".into());
        }
        if sv.header_read_timeout_ms == 0 || sv.body_read_timeout_ms == 0 {
            return bad("server.header_read_timeout_ms and body_read_timeout_ms must be ≥ 1".into());
        }
        if sv.max_buffered_body_bytes < l.max_body_bytes {
            return bad("server.max_buffered_body_bytes must be at least limits.max_body_bytes".into());
        }
        if sv.max_uri_bytes < 256 || sv.max_header_bytes < 1024 || sv.max_headers < 8 || sv.max_headers > 1000 {
            return bad("server.max_uri_bytes ≥ 256, max_header_bytes ≥ 1024, max_headers in 8..=1000".into());
        }
        if l.max_resized_side == 0 || l.max_candidates < 2 || l.max_backward_passes == 0 {
            return bad("limits.max_resized_side ≥ 1, max_candidates ≥ 2, max_backward_passes ≥ 1".into());
        }
        if e.max_inflight_attack_pixels == 0 {
            return bad("engine.max_inflight_attack_pixels must be ≥ 1".into());
        }
        self.studies.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// The secure default: no key is accepted only on a loopback address, or where
    /// `server.allow_unauthenticated` says so. Checked once the bind address is final.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        let sv = &self.server;
        if sv.api_key.is_some() || sv.bind.ip().is_loopback() || sv.allow_unauthenticated {
            return Ok(());
        }
        Err(ConfigError::Invalid(format!(
            "refusing to serve on {} without an API key: anyone who can reach it could run work, \
             upload archives and unload models. Set server.api_key (or LABELFOOL_API_KEY), bind a \
             loopback address, or set server.allow_unauthenticated = true \
             (LABELFOOL_SERVER__ALLOW_UNAUTHENTICATED=true) to serve openly on purpose",
            sv.bind
        )))
    }

    pub fn device(&self) -> DeviceSpec {
        self.engine.device
    }

    pub fn batch_wait(&self, model: &ModelConfig) -> Duration {
        Duration::from_millis(model.max_batch_wait_ms.unwrap_or(self.engine.max_batch_wait_ms))
    }

    /// The configured classify batch limit (0 = by device, resolved by the worker).
    pub fn batch_size(&self, model: &ModelConfig) -> usize {
        model.max_batch_size.unwrap_or(self.engine.max_batch_size)
    }
}

/// The batch limit a `0` ("by device") setting stands for.
pub fn auto_batch(cuda: bool) -> usize {
    if cuda { 64 } else { 4 }
}

impl ModelConfig {
    /// A `[[models]]` entry for the bundle in `dir`.
    pub fn bundle(name: &str, dir: &str) -> Self {
        Self { name: name.into(), dir: Some(dir.into()), ..Default::default() }
    }

    /// The bundle directory (for `torchscript`: the file's directory) with `~`, `${VAR}` and
    /// `${LABELFOOL_CACHE}` (defaulted) expanded.
    pub fn dir(&self) -> Result<PathBuf, ConfigError> {
        match (&self.dir, &self.torchscript) {
            (Some(d), None) => expand_path(d),
            (None, Some(ts)) => Ok(expand_path(ts)?.parent().map(Path::to_path_buf).unwrap_or_default()),
            _ => Err(ConfigError::Invalid(format!(
                "models.{}: give `dir` (a bundle) or `torchscript`, not both",
                self.name
            ))),
        }
    }

    /// The TorchScript file of a described model.
    pub fn torchscript_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        self.torchscript.as_deref().map(expand_path).transpose()
    }

    pub fn matrix_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        match &self.matrix {
            Some(m) => expand_path(m).map(Some),
            None if self.torchscript.is_some() => {
                let dir = self.dir()?;
                Ok(self.description.as_ref().and_then(|d| d.matrix.as_ref()).map(|m| dir.join(m)))
            }
            None => {
                let default = self.dir()?.join("distance.npy");
                Ok(default.is_file().then_some(default))
            }
        }
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Expands `~` and `${VAR}`; `LABELFOOL_CACHE` defaults to [`cache_dir`] so configs can name it.
pub fn expand_path(raw: &str) -> Result<PathBuf, ConfigError> {
    let expanded = shellexpand::full_with_context(
        raw,
        || std::env::var("HOME").ok(),
        |var| -> Result<Option<String>, std::env::VarError> {
            match (var, std::env::var(var)) {
                (_, Ok(v)) if !v.is_empty() => Ok(Some(v)),
                ("LABELFOOL_CACHE", _) => Ok(Some(cache_dir().to_string_lossy().into_owned())),
                (_, _) => Err(std::env::VarError::NotPresent),
            }
        },
    )
    .map_err(|e| ConfigError::Invalid(format!("path {raw:?}: {e}")))?;
    Ok(PathBuf::from(expanded.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelConfig {
        ModelConfig { name: name.into(), dir: Some("/x".into()), ..Default::default() }
    }

    #[test]
    fn defaults_validate_once_a_model_is_named() {
        let mut c = Config::default();
        assert!(c.validate().is_err(), "no models must be rejected");
        c.models.push(model("m"));
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_are_rejected_with_the_key_named() {
        let mut c = Config::default();
        c.models.push(model("m"));
        c.attack.margins = vec![1.0, 0.5];
        assert!(c.validate().unwrap_err().to_string().contains("margins"));
    }

    #[test]
    fn no_key_is_refused_off_loopback_unless_allowed() {
        let mut c = Config::default();
        c.check_exposure().unwrap();
        c.server.bind = "0.0.0.0:8080".parse().unwrap();
        let msg = c.check_exposure().unwrap_err().to_string();
        assert!(msg.contains("server.api_key") && msg.contains("allow_unauthenticated"), "{msg}");
        c.server.bind = "[::]:8080".parse().unwrap();
        assert!(c.check_exposure().is_err());
        c.server.allow_unauthenticated = true;
        c.check_exposure().unwrap();
        c.server.allow_unauthenticated = false;
        c.server.api_key = Some("k".into());
        c.check_exposure().unwrap();
        c.server.bind = "[::1]:8080".parse().unwrap();
        c.server.api_key = None;
        c.check_exposure().unwrap();
    }

    #[test]
    fn cache_variable_defaults_inside_paths() {
        let p = expand_path("${LABELFOOL_CACHE}/models/x").unwrap();
        assert!(p.ends_with("models/x"));
        assert!(p.starts_with(cache_dir()));
        assert!(expand_path("${LABELFOOL_SURELY_UNSET_VARIABLE}/x").is_err());
    }

    #[test]
    fn toml_file_is_read_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "[engine]\ndevice = \"cpu\"\n[[models]]\nname = \"a\"\ndir = \"/m\"\n").unwrap();
        let c = Config::load(Some(&good)).unwrap();
        assert_eq!(c.models[0].name, "a");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[engine]\ndevcie = \"cpu\"\n").unwrap();
        assert!(Config::load(Some(&bad)).is_err());
        // The device is read into its type at load, so a bad one is refused there, key named.
        let gpu7 = dir.path().join("gpu7.toml");
        std::fs::write(&gpu7, "[engine]\ndevice = \"gpu7\"\n").unwrap();
        let msg = Config::load(Some(&gpu7)).unwrap_err().to_string();
        assert!(msg.contains("engine.device") && msg.contains("not a device"), "{msg}");
        assert!(matches!(Config::load(Some(&dir.path().join("none.toml"))), Err(ConfigError::Missing(_))));
    }
}
