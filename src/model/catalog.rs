//! Every model the server knows, by name, with its state: the `[[models]]` bundles and the models
//! of the `[[repositories]]`. Handlers read it to find a ready model; the engine moves a model
//! to `loading`/`unloading`; the worker, which owns the modules, publishes `ready`, `failed` and
//! `unloaded`. Slots are never removed, so a model's index stays valid for queued jobs.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use super::repository::{self, RepoModel};
use super::{BatchPolicy, ModelError, ModelInfo};
use crate::config::{Config, ModelConfig};

/// Where a model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A `[[models]]` entry: a bundle directory or a described TorchScript file (read again on
    /// every load).
    Configured(Box<ModelConfig>),
    /// A model opened by the caller (tests, tools).
    Opened,
    /// A model directory of a `[[repositories]]` Triton repository.
    Repository { repo: PathBuf, dir: PathBuf },
}

/// A model's state, as `/models` and the repository index report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Unloaded,
    Loading,
    Ready,
    Unloading,
    /// Loading failed; `reason` says why. Another load may be tried.
    Failed,
    /// LabelFool cannot serve it (its platform, its inputs, a broken config); `reason` says why.
    Unsupported,
}

impl std::fmt::Display for ModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unloaded => "unloaded",
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Unloading => "unloading",
            Self::Failed => "failed",
            Self::Unsupported => "unsupported",
        })
    }
}

impl ModelState {
    /// Triton's repository-index state names.
    pub fn triton(self) -> &'static str {
        match self {
            Self::Ready => "READY",
            Self::Loading => "LOADING",
            Self::Unloading => "UNLOADING",
            Self::Unloaded | Self::Failed | Self::Unsupported => "UNAVAILABLE",
        }
    }
}

/// The slot named `name` (the first one, the default model, when None).
fn find<'a>(slots: &'a [Slot], name: Option<&str>) -> Result<(usize, &'a Slot), Unavailable> {
    let found = match name {
        None => slots.first().map(|s| (0, s)),
        Some(n) => slots.iter().enumerate().find(|(_, s)| s.name == n),
    };
    found.ok_or_else(|| Unavailable::Unknown(name.unwrap_or_default().to_string()))
}

fn find_mut<'a>(slots: &'a mut [Slot], name: &str) -> Result<(usize, &'a mut Slot), Unavailable> {
    slots.iter_mut().enumerate().find(|(_, s)| s.name == name).ok_or_else(|| Unavailable::Unknown(name.to_string()))
}

#[derive(Debug, Clone)]
struct Slot {
    name: String,
    source: ModelSource,
    batch: BatchPolicy,
    state: ModelState,
    reason: Option<String>,
    version: Option<String>,
    platform: Option<String>,
    /// What the model is, once its description has been read (ready models always have it).
    info: Option<Arc<ModelInfo>>,
    load_at_startup: bool,
}

impl Slot {
    /// A served TorchScript model, not loaded yet.
    fn served(info: ModelInfo, source: ModelSource, batch: BatchPolicy) -> Self {
        Self {
            name: info.name.clone(),
            source,
            batch,
            state: ModelState::Unloaded,
            reason: None,
            version: None,
            platform: Some("pytorch_libtorch".into()),
            info: Some(Arc::new(info)),
            load_at_startup: true,
        }
    }

    fn unavailable(&self) -> Unavailable {
        Unavailable::NotReady { name: self.name.clone(), state: self.state, reason: self.reason.clone() }
    }
}

/// A snapshot of one model for listings.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub index: usize,
    pub name: String,
    pub state: ModelState,
    pub reason: Option<String>,
    pub version: Option<String>,
    pub platform: Option<String>,
    pub info: Option<Arc<ModelInfo>>,
}

/// Why a model cannot take a request now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error("unknown model {0:?}")]
    Unknown(String),
    #[error("model {name} is {state}{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    NotReady { name: String, state: ModelState, reason: Option<String> },
}

/// What a load request found.
pub enum LoadTicket {
    /// The caller moved the model to `loading` and must hand it to the worker.
    Start {
        index: usize,
        info: Arc<ModelInfo>,
    },
    AlreadyReady,
}

#[derive(Debug)]
pub struct Catalog {
    slots: RwLock<Vec<Slot>>,
    repositories: Vec<PathBuf>,
    default_batch: BatchPolicy,
}

impl Catalog {
    /// Reads every `[[models]]` bundle (errors are fatal: the operator named them) and scans
    /// every repository (a model there that cannot be read is listed with its reason).
    pub fn from_config(config: &Config) -> Result<Self, ModelError> {
        let mut slots = Vec::new();
        for m in &config.models {
            let batch = BatchPolicy { max_size: config.batch_size(m), max_wait: config.batch_wait(m) };
            let info = open_configured(m, batch)?;
            slots.push(Slot::served(info, ModelSource::Configured(Box::new(m.clone())), batch));
        }
        let default_batch = BatchPolicy {
            max_size: config.engine.max_batch_size,
            max_wait: std::time::Duration::from_millis(config.engine.max_batch_wait_ms),
        };
        let mut repositories = Vec::new();
        for r in &config.repositories {
            let path = r.path().map_err(|e| ModelError::Bundle { model: r.path.clone(), reason: e.to_string() })?;
            let found =
                repository::scan(&path).map_err(|reason| ModelError::Bundle { model: r.path.clone(), reason })?;
            for model in found {
                if slots.iter().any(|s: &Slot| s.name == model.name) {
                    return Err(ModelError::Bundle {
                        model: model.name,
                        reason: format!("the name is taken twice (repository {})", path.display()),
                    });
                }
                slots.push(repo_slot(&path, model, default_batch, r.load_at_startup));
            }
            repositories.push(path);
        }
        Ok(Self { slots: RwLock::new(slots), repositories, default_batch })
    }

    /// A catalog of ready-to-load models (tests and tools that open bundles themselves).
    pub fn from_models(models: Vec<ModelInfo>) -> Self {
        let slots = models
            .into_iter()
            .map(|info| {
                let batch = info.batch;
                Slot::served(info, ModelSource::Opened, batch)
            })
            .collect();
        Self { slots: RwLock::new(slots), repositories: Vec::new(), default_batch: BatchPolicy::default() }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Slot>> {
        self.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Slot>> {
        self.slots.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The named model (the first configured one when `name` is None), if it is ready.
    pub fn ready(&self, name: Option<&str>) -> Result<(usize, Arc<ModelInfo>), Unavailable> {
        let slots = self.read();
        let (i, s) = find(&slots, name)?;
        match (&s.state, &s.info) {
            (ModelState::Ready, Some(info)) => Ok((i, info.clone())),
            _ => Err(s.unavailable()),
        }
    }

    /// The model's description whatever its state (offline tools load it themselves).
    pub fn get(&self, name: Option<&str>) -> Option<(usize, Arc<ModelInfo>)> {
        let slots = self.read();
        let (i, s) = find(&slots, name).ok()?;
        s.info.clone().map(|info| (i, info))
    }

    pub fn entries(&self) -> Vec<ModelEntry> {
        self.read()
            .iter()
            .enumerate()
            .map(|(index, s)| ModelEntry {
                index,
                name: s.name.clone(),
                state: s.state,
                reason: s.reason.clone(),
                version: s.version.clone(),
                platform: s.platform.clone(),
                info: s.info.clone(),
            })
            .collect()
    }

    /// Ready models, in catalog order.
    pub fn iter_ready(&self) -> Vec<Arc<ModelInfo>> {
        self.read().iter().filter(|s| s.state == ModelState::Ready).filter_map(|s| s.info.clone()).collect()
    }

    /// Every model with a readable description, whatever its state.
    pub fn iter(&self) -> Vec<Arc<ModelInfo>> {
        self.read().iter().filter_map(|s| s.info.clone()).collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.read().iter().map(|s| s.name.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub fn batch_policy(&self, index: usize) -> BatchPolicy {
        self.read().get(index).map_or(self.default_batch, |s| s.batch)
    }

    pub fn name_of(&self, index: usize) -> String {
        self.read().get(index).map(|s| s.name.clone()).unwrap_or_default()
    }

    /// Models to load at start-up: (index, description, whether a failure is fatal).
    pub fn startup_loads(&self) -> Vec<(usize, Arc<ModelInfo>, bool)> {
        let mut slots = self.write();
        let mut out = Vec::new();
        for (i, s) in slots.iter_mut().enumerate() {
            if let (true, Some(info)) = (s.load_at_startup, &s.info) {
                out.push((i, info.clone(), !matches!(s.source, ModelSource::Repository { .. })));
                s.state = ModelState::Loading;
            }
        }
        out
    }

    /// Re-reads the repositories: new model directories are added (unloaded); models that are not
    /// loaded are read again, so a fixed config or a new version is picked up, as Triton does.
    pub fn rescan(&self) {
        for repo in &self.repositories {
            let Ok(found) = repository::scan(repo) else { continue };
            let mut slots = self.write();
            for model in found {
                let fresh = repo_slot(repo, model, self.default_batch, false);
                match slots.iter_mut().find(|s| s.name == fresh.name) {
                    Some(s)
                        if matches!(s.source, ModelSource::Repository { .. })
                            && matches!(
                                s.state,
                                ModelState::Unloaded | ModelState::Failed | ModelState::Unsupported
                            ) =>
                    {
                        let keep_failure = s.state == ModelState::Failed && fresh.state != ModelState::Unsupported;
                        let reason = s.reason.clone();
                        *s = Slot { load_at_startup: s.load_at_startup, ..fresh };
                        if keep_failure {
                            s.state = ModelState::Failed;
                            s.reason = reason;
                        }
                    }
                    Some(_) => {}
                    None => slots.push(fresh),
                }
            }
        }
    }

    /// Moves a model to `loading` (from unloaded or failed), re-reading a repository model's
    /// description first.
    pub fn begin_load(&self, name: &str) -> Result<LoadTicket, Unavailable> {
        let mut slots = self.write();
        let (index, s) = find_mut(&mut slots, name)?;
        match s.state {
            ModelState::Ready => return Ok(LoadTicket::AlreadyReady),
            ModelState::Unloaded | ModelState::Failed => {}
            _ => return Err(s.unavailable()),
        }
        if let ModelSource::Configured(m) = &s.source {
            match open_configured(m, s.batch) {
                Ok(info) => s.info = Some(Arc::new(info)),
                Err(e) => {
                    s.state = ModelState::Failed;
                    s.reason = Some(e.to_string());
                    return Err(s.unavailable());
                }
            }
        }
        let Some(info) = s.info.clone() else { return Err(s.unavailable()) };
        s.state = ModelState::Loading;
        s.reason = None;
        Ok(LoadTicket::Start { index, info })
    }

    /// Moves a ready model to `unloading`: new requests for it get 503 from now on.
    pub fn begin_unload(&self, name: &str) -> Result<Option<usize>, Unavailable> {
        let mut slots = self.write();
        let (index, s) = find_mut(&mut slots, name)?;
        match s.state {
            ModelState::Ready => {
                s.state = ModelState::Unloading;
                Ok(Some(index))
            }
            ModelState::Unloaded | ModelState::Failed | ModelState::Unsupported => Ok(None),
            _ => Err(s.unavailable()),
        }
    }

    /// The worker's word on a model: loaded (with its final description), failed, or unloaded.
    pub fn publish(&self, index: usize, outcome: Result<Option<Arc<ModelInfo>>, String>) {
        let mut slots = self.write();
        let Some(s) = slots.get_mut(index) else { return };
        match outcome {
            Ok(Some(info)) => {
                s.info = Some(info);
                s.state = ModelState::Ready;
                s.reason = None;
            }
            Ok(None) => {
                s.state = ModelState::Unloaded;
                s.reason = None;
            }
            Err(reason) => {
                s.state = ModelState::Failed;
                s.reason = Some(reason);
            }
        }
    }
}

/// A `[[models]]` entry's model: a bundle directory, or a TorchScript file and its description.
fn open_configured(m: &ModelConfig, batch: BatchPolicy) -> Result<ModelInfo, ModelError> {
    let err = |reason: String| ModelError::Bundle { model: m.name.clone(), reason };
    let matrix = m.matrix_path().map_err(|e| err(e.to_string()))?;
    match m.torchscript_path().map_err(|e| err(e.to_string()))? {
        Some(ts) => {
            let d = m.description.clone().unwrap_or_default();
            let bundle = super::Bundle::from_description(&m.name, &ts, &d).map_err(|e| err(e.to_string()))?;
            ModelInfo::from_bundle(&m.name, bundle, matrix.as_deref(), batch)
        }
        None => ModelInfo::open(&m.name, &m.dir().map_err(|e| err(e.to_string()))?, matrix.as_deref(), batch),
    }
}

fn repo_slot(repo: &std::path::Path, model: RepoModel, batch: BatchPolicy, load_at_startup: bool) -> Slot {
    let source = ModelSource::Repository { repo: repo.to_path_buf(), dir: model.dir.clone() };
    let (state, reason, info) = match model.bundle {
        Ok(bundle) => match ModelInfo::from_bundle(&model.name, bundle, model.matrix.as_deref(), batch) {
            Ok(info) => (ModelState::Unloaded, None, Some(Arc::new(info))),
            Err(e) => (ModelState::Unsupported, Some(e.to_string()), None),
        },
        Err(reason) => (ModelState::Unsupported, Some(reason), None),
    };
    Slot {
        name: model.name,
        source,
        batch,
        state,
        reason,
        version: model.version,
        platform: (!model.platform.is_empty()).then_some(model.platform),
        info,
        load_at_startup,
    }
}
