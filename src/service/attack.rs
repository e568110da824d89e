//! An attack as every caller asks for it: the upload decoded once, the model local or
//! `remote:<name>` (the query-based LabelFool), then the transfer checks (`verify`) on the
//! delivered PNG — all within the one deadline the request started with.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::attack::Progress;
use crate::engine::{AttackRequest, AttackResult, Engine, EngineError, TransferVerdict, Upload};
use crate::model::{ClassList, ModelInfo};
use crate::remote::attack::{DEFAULT_BUDGET, MAX_BUDGET, RemoteAttackError, RemoteAttackOptions, RemoteAttackOutcome};
use crate::remote::{Remote, RemoteError, Remotes, remote_name};

/// Most models one request may verify against (each costs two classifications).
pub const MAX_VERIFY: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

impl From<RemoteAttackError> for ServiceError {
    fn from(e: RemoteAttackError) -> Self {
        match e {
            RemoteAttackError::Remote(r) => Self::Remote(r),
            RemoteAttackError::Engine(e) => Self::Engine(e),
        }
    }
}

/// What a caller asks: the attack's parameters, where it runs, and what checks it after.
#[derive(Debug, Clone, Default)]
pub struct AttackOrder {
    /// A model of this server, or `remote:<name>` (default: the default model).
    pub model: Option<String>,
    pub request: AttackRequest,
    /// Models that classify the upload and the delivered PNG: local names or `remote:<name>`.
    pub verify: Vec<String>,
    /// With `model = remote:<name>`: the local model LabelFool runs on.
    pub surrogate: Option<String>,
    /// With `model = remote:<name>`: most queries to the remote, the upload's included.
    pub budget: Option<u32>,
    /// With `model = remote:<name>`: run the score-based search when the prior misses.
    pub search: Option<bool>,
}

/// An order checked: everything that can be refused was refused, nothing was spent yet.
pub struct Checked {
    bytes: Bytes,
    plan: Plan,
    /// The model whose labels the attack's progress names.
    pub model: Arc<ModelInfo>,
}

enum Plan {
    Local { model: Option<String>, request: AttackRequest, locals: Vec<String>, remotes: Vec<Arc<Remote>> },
    Remote { remote: Arc<Remote>, surrogate: String, options: RemoteAttackOptions, request: AttackRequest },
}

/// Another model's verdict on the delivered PNG.
pub struct Transfer {
    /// The model's name (`remote:<name>` for a remote).
    pub model: String,
    pub classes: ClassList,
    pub verdict: TransferVerdict,
}

/// A local attack with its transfer checks, in `verify` order (local models first, then remotes).
pub struct Verified {
    pub result: AttackResult,
    pub transfer: Vec<Transfer>,
}

/// A query-based attack on a remote target.
pub struct RemoteRun {
    pub remote: Arc<Remote>,
    pub surrogate: String,
    pub outcome: RemoteAttackOutcome,
}

pub enum AttackReport {
    Local(Box<Verified>),
    Remote(Box<RemoteRun>),
}

/// The attack service: the engine, the remote targets, and the deadline every attack gets.
#[derive(Clone)]
pub struct AttackService {
    engine: Engine,
    remotes: Arc<Remotes>,
    deadline: Duration,
}

impl AttackService {
    pub fn new(engine: Engine, remotes: Arc<Remotes>, deadline: Duration) -> Self {
        Self { engine, remotes, deadline }
    }

    /// Refuses, before anything is spent, what can be refused: unknown or unready models,
    /// parameters out of range, the image's header.
    pub fn check(&self, order: AttackOrder, bytes: Bytes) -> Result<Checked, ServiceError> {
        if let Some(name) = order.model.as_deref().and_then(remote_name) {
            let remote = self.remotes.get(name)?;
            let budget = order.budget.unwrap_or(DEFAULT_BUDGET);
            if budget > MAX_BUDGET {
                return Err(EngineError::invalid("budget", format!("{budget} queries; at most {MAX_BUDGET}")).into());
            }
            let epsilon = match order.request.epsilons.as_deref() {
                None => crate::remote::search::DEFAULT_EPSILON,
                Some(&[e]) if e > 0.0 && e <= 1.0 => e,
                Some(_) => {
                    return Err(EngineError::invalid(
                        "epsilon",
                        "with model=remote:<name>, one L∞ radius in (0, 1] for the search",
                    )
                    .into());
                }
            };
            let options = RemoteAttackOptions { budget, search: order.search.unwrap_or(true), epsilon };
            let (_, surrogate) = self.engine.model(order.surrogate.as_deref())?;
            let request = AttackRequest { epsilons: None, ..order.request };
            return Ok(Checked {
                bytes,
                model: surrogate.clone(),
                plan: Plan::Remote { remote, surrogate: surrogate.name.clone(), options, request },
            });
        }
        let remote_only = [
            ("surrogate", order.surrogate.is_some()),
            ("budget", order.budget.is_some()),
            ("search", order.search.is_some()),
        ];
        if let Some((param, _)) = remote_only.into_iter().find(|(_, given)| *given) {
            return Err(
                EngineError::invalid(param, "`surrogate`, `budget` and `search` go with model=remote:<name>").into()
            );
        }
        let verify = distinct(order.verify);
        if verify.len() > MAX_VERIFY {
            return Err(EngineError::invalid("verify", format!("{} models; at most {MAX_VERIFY}", verify.len())).into());
        }
        let (remotes, locals): (Vec<String>, Vec<String>) = verify.into_iter().partition(|v| remote_name(v).is_some());
        let remotes = remotes
            .iter()
            .filter_map(|v| remote_name(v))
            .map(|name| self.remotes.get(name))
            .collect::<Result<Vec<_>, _>>()?;
        for name in &locals {
            self.engine.model(Some(name))?;
        }
        let (_, info, _) = self.engine.precheck_attack(order.model.as_deref(), &bytes, &order.request)?;
        Ok(Checked {
            bytes,
            model: info,
            plan: Plan::Local { model: order.model, request: order.request, locals, remotes },
        })
    }

    /// Runs a checked order: the upload decoded once, the attack, then its transfer checks with
    /// whatever is left of the deadline. Progress goes to `progress` after every tick (local
    /// attacks; the query-based attack reports none).
    pub async fn run(
        &self,
        checked: Checked,
        progress: Option<tokio::sync::watch::Sender<Progress>>,
    ) -> Result<AttackReport, ServiceError> {
        let started = Instant::now();
        let upload = self.engine.decode_upload(checked.bytes).await?;
        match checked.plan {
            Plan::Remote { remote, surrogate, options, request } => {
                let left = self.deadline.saturating_sub(started.elapsed());
                let outcome =
                    crate::remote::attack::run(&self.engine, &remote, &surrogate, &upload, options, request, left)
                        .await?;
                Ok(AttackReport::Remote(Box::new(RemoteRun { remote, surrogate, outcome })))
            }
            Plan::Local { model, request, locals, remotes } => {
                let left = self.deadline.saturating_sub(started.elapsed());
                let result = self.engine.attack_upload(model.as_deref(), &upload, request, left, progress).await?;
                let transfer = self.transfer(&upload, &result, &locals, &remotes, started).await?;
                Ok(AttackReport::Local(Box::new(Verified { result, transfer })))
            }
        }
    }

    /// [`Self::check`] then [`Self::run`].
    pub async fn attack(&self, order: AttackOrder, bytes: Bytes) -> Result<AttackReport, ServiceError> {
        let checked = self.check(order, bytes)?;
        self.run(checked, None).await
    }

    /// The upload and the delivered PNG classified by each verify model, within what is left of
    /// the deadline that `started` began.
    async fn transfer(
        &self,
        upload: &Upload,
        result: &AttackResult,
        locals: &[String],
        remotes: &[Arc<Remote>],
        started: Instant,
    ) -> Result<Vec<Transfer>, ServiceError> {
        let left = self.deadline.saturating_sub(started.elapsed());
        if left.is_zero() && !(locals.is_empty() && remotes.is_empty()) {
            return Err(EngineError::Deadline(self.deadline).into());
        }
        let mut out: Vec<Transfer> = self
            .engine
            .transfer(upload, result, locals, left)
            .await?
            .into_iter()
            .map(|t| Transfer { model: t.model.name.clone(), classes: t.model.classes().clone(), verdict: t.verdict })
            .collect();
        for remote in remotes {
            let left = self.deadline.saturating_sub(started.elapsed());
            let ask = |image: Bytes| crate::remote::attack::ask(&self.engine, remote, image);
            let both = futures::future::try_join(ask(upload.bytes.clone()), ask(Bytes::from(result.png.clone())));
            let (before, after) =
                tokio::time::timeout(left, both).await.map_err(|_| EngineError::Deadline(self.deadline))??;
            let verdict = TransferVerdict::new(result, &remote.classes, &before.probabilities, &after.probabilities);
            out.push(Transfer {
                model: format!("remote:{}", remote.config.name),
                classes: remote.classes.clone(),
                verdict,
            });
        }
        Ok(out)
    }
}

/// Names in order, each once.
fn distinct(names: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        let n = n.trim().to_string();
        if !n.is_empty() && !out.contains(&n) {
            out.push(n);
        }
    }
    out
}
