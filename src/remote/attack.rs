//! LabelFool against a model known only by its endpoint (`/attack?model=remote:<name>
//! &surrogate=<local model>`): the target comes from the *remote's* probabilities (Eq. 2–4 with
//! the surrogate's distance matrix, the classes being the same), then white-box LabelFool on the
//! surrogate towards that target with a growing logit margin, the remote asked after each
//! candidate (the transfer prior). Every queried image is a deliverable 8-bit PNG at the upload's
//! size; identical candidates are asked once; the query budget is never exceeded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::Digest;

use super::{Remote, RemoteError};
use crate::attack::target::{self, TargetDecision};
use crate::engine::{AttackRequest, AttackResult, Engine, EngineError, top_k};

/// The margins (logits) tried in turn on the surrogate: the first is LabelFool's own; each next
/// one pushes the image further past the surrogate's boundary, so it is likelier to transfer.
pub const MARGINS: [f64; 8] = [0.25, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Most queries one request may spend (`budget`), and its default.
pub const MAX_BUDGET: u32 = 1000;
pub const DEFAULT_BUDGET: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum RemoteAttackError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What the remote said for one image.
#[derive(Debug, Clone)]
pub struct RemoteTop {
    pub index: usize,
    pub probability: f32,
    pub target_probability: Option<f32>,
}

/// One candidate the remote was asked about.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub margin: f64,
    /// The surrogate classifies its delivered PNG as the target.
    pub surrogate_success: bool,
    pub remote: RemoteTop,
    pub perceptibility: f64,
}

pub struct RemoteAttackOutcome {
    pub decision: TargetDecision,
    pub original: RemoteTop,
    pub success: bool,
    /// Queries spent (the upload's included); identical images are asked once.
    pub queries: u32,
    pub budget: u32,
    pub candidates: Vec<Candidate>,
    /// The delivered image: the first candidate the remote classifies as the target, else the
    /// last one asked (None when the budget allowed no candidate).
    pub delivered: Option<AttackResult>,
    pub elapsed: Duration,
}

fn top(probs: &[f32], target: Option<usize>) -> RemoteTop {
    let (index, probability) = top_k(probs, 1).first().copied().unwrap_or((0, 0.0));
    RemoteTop { index, probability, target_probability: target.and_then(|t| probs.get(t).copied()) }
}

/// The remote's probabilities for an encoded image, preprocessed here first when the remote takes
/// tensors (`fp32`).
pub async fn ask(engine: &Engine, remote: &Remote, image: Bytes) -> Result<super::RemoteScores, RemoteAttackError> {
    let tensor = match &remote.spec {
        Some(spec) => Some(engine.preprocess(image.clone(), spec).await?),
        None => None,
    };
    Ok(remote.classify(image, tensor).await?)
}

/// The remote, asked within the budget; an image already asked about is answered from the cache.
struct Asker<'a> {
    engine: &'a Engine,
    remote: &'a Remote,
    budget: u32,
    queries: u32,
    cache: HashMap<[u8; 32], Vec<f32>>,
}

impl Asker<'_> {
    /// The remote's probabilities, or None when the budget is spent.
    async fn ask(&mut self, image: Bytes) -> Result<Option<Vec<f32>>, RemoteAttackError> {
        let key: [u8; 32] = sha2::Sha256::digest(&image).into();
        if let Some(p) = self.cache.get(&key) {
            return Ok(Some(p.clone()));
        }
        if self.queries >= self.budget {
            return Ok(None);
        }
        self.queries += 1;
        let p = ask(self.engine, self.remote, image).await?.probabilities;
        self.cache.insert(key, p.clone());
        Ok(Some(p))
    }
}

/// Runs the transfer-prior attack. `budget` counts every remote query, the upload's included.
pub async fn run(
    engine: &Engine,
    remote: &Remote,
    surrogate: &str,
    upload: Bytes,
    budget: u32,
    request: AttackRequest,
    deadline: Duration,
) -> Result<RemoteAttackOutcome, RemoteAttackError> {
    let started = Instant::now();
    let (_, info) = engine.model(Some(surrogate))?;
    let same_classes = info.num_classes() == remote.classes.len()
        && (0..info.num_classes()).all(|i| info.classes().same_class_in(i, &remote.classes) == Some(i));
    if !same_classes {
        return Err(EngineError::invalid(
            "surrogate",
            format!(
                "surrogate {} and remote {} do not have the same classes in the same order",
                info.name, remote.config.name
            ),
        )
        .into());
    }
    let matrix = info
        .matrix()
        .ok_or_else(|| EngineError::invalid("surrogate", format!("surrogate {} has no distance matrix", info.name)))?;
    let mut asker = Asker { engine, remote, budget, queries: 0, cache: HashMap::new() };
    let before = asker.ask(upload.clone()).await?.ok_or_else(|| {
        EngineError::invalid("budget", "a budget of 0 queries cannot even classify the upload on the remote")
    })?;
    let target_params = crate::attack::params::target_params(request.delta1, request.delta2, &engine.settings().attack)
        .map_err(EngineError::from)?;
    let decision = target::select(&before, matrix, target_params, 4);
    let t = decision.target;
    let original = top(&before, Some(t));
    let mut candidates = Vec::new();
    let mut delivered = None;
    let mut success = false;
    for margin in MARGINS {
        if asker.queries >= budget {
            break;
        }
        let req = AttackRequest {
            method: Some("labelfool".into()),
            target: Some(t.to_string()),
            margin: Some(margin),
            ..request.clone()
        };
        let left = deadline.saturating_sub(started.elapsed());
        let result = engine.attack(Some(surrogate), upload.clone(), req, left).await?;
        let Some(after) = asker.ask(Bytes::from(result.png.clone())).await? else { break };
        let remote_top = top(&after, Some(t));
        let hit = remote_top.index == t;
        candidates.push(Candidate {
            margin,
            surrogate_success: result.outcome.success,
            remote: remote_top,
            perceptibility: result.perturbation.perceptibility,
        });
        delivered = Some(result);
        if hit {
            success = true;
            break;
        }
    }
    Ok(RemoteAttackOutcome {
        decision,
        original,
        success,
        queries: asker.queries,
        budget,
        candidates,
        delivered,
        elapsed: started.elapsed(),
    })
}
