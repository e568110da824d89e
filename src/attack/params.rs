//! Attack parameters, in one place: the request as a caller gives it, the defaults of every
//! method (DeepFool's candidates, SparseFool's λ and outer cap, FGSM's ε search), validation
//! against the model and the configured limits, and each method's worst-case cost.

use serde::Serialize;

use super::TargetParams;
use crate::config::AttackDefaults;
use crate::model::ModelInfo;

/// DeepFool / SparseFool: classes considered, the original included (DeepFool's top 10).
pub const DEFAULT_CANDIDATES: usize = 10;
/// SparseFool's λ: the authors' value for ImageNet.
pub const DEFAULT_LAMBDA: f64 = 3.0;
/// SparseFool's cap on outer iterations: the authors' ImageNet demo's (their function's default
/// is 20, which left a third of the shared samples unfinished while still progressing).
pub const DEFAULT_MAX_OUTER: u32 = 50;
/// SparseFool's inner DeepFool steps per outer iteration when `max_iter` is not given: it
/// crosses in about three on the shared samples, and 10 keeps the worst case of 50 outer
/// iterations at 50 × (10 × 9 + 1) = 4 550 backward passes, within `limits.max_backward_passes`
/// (the authors' 50 would be 22 550).
pub const SPARSEFOOL_MAX_INNER: u32 = 10;

/// Bounds a request is checked against (`limits.*` of the config).
#[derive(Debug, Clone, Copy)]
pub struct AttackLimits {
    pub max_iter: u32,
    pub max_candidates: usize,
    pub max_backward_passes: u64,
}

impl AttackLimits {
    pub fn from_config(l: &crate::config::Limits) -> Self {
        Self { max_iter: l.max_iter, max_candidates: l.max_candidates, max_backward_passes: l.max_backward_passes }
    }
}

/// Why a request's parameters were refused.
#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    #[error("invalid parameter `{param}`: {message}")]
    Invalid { param: String, message: String },
    /// Over `limits.max_candidates` or `limits.max_backward_passes`: refused before any work.
    #[error("too costly: `{param}`: {message}")]
    TooCostly { param: String, message: String },
}

impl ParamError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::Invalid { param: param.into(), message: message.into() }
    }

    pub fn too_costly(param: &str, message: impl Into<String>) -> Self {
        Self::TooCostly { param: param.into(), message: message.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Targeted DeepFool steps towards the label LabelFool picks (or the caller's `target`).
    Labelfool,
    /// DeepFool: untargeted over the top candidate classes, or targeted with `target`.
    Deepfool,
    /// Fast gradient sign method: one step of size ε (or the smallest of several ε that fools).
    Fgsm,
    /// SparseFool: few pixels changed, via DeepFool's boundary and a linear solver.
    Sparsefool,
    /// PGD with momentum and input diversity: a fixed number of sign steps inside the L∞ ball of
    /// radius ε, made to transfer to other models.
    Pgd,
}

impl Method {
    pub const ALL: &'static [Method] =
        &[Method::Labelfool, Method::Deepfool, Method::Fgsm, Method::Sparsefool, Method::Pgd];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|m| m.name() == s.trim().to_ascii_lowercase())
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Labelfool => "labelfool",
            Method::Deepfool => "deepfool",
            Method::Fgsm => "fgsm",
            Method::Sparsefool => "sparsefool",
            Method::Pgd => "pgd",
        }
    }
}

/// Validated parameters of one attack.
#[derive(Debug, Clone)]
pub struct AttackParams {
    pub method: Method,
    pub max_iter: u32,
    pub overshoot: f64,
    pub target_params: TargetParams,
    /// Logit margins to demand in turn when the 8-bit image misses (LabelFool).
    pub margins: Vec<f64>,
    /// Caller-chosen target class; None lets the method choose (LabelFool: the distance matrix;
    /// the others: untargeted).
    pub target: Option<usize>,
    /// FGSM step sizes (pixel scale [0,1]), ascending: the first that fools is delivered.
    pub epsilons: Vec<f64>,
    /// DeepFool / SparseFool: classes considered (the original and the next best).
    pub candidates: usize,
    /// SparseFool's λ: how far past the boundary the linear solver aims.
    pub lambda: f64,
    /// SparseFool's cap on outer iterations.
    pub max_outer: u32,
    /// PGD's step α (pixel scale); None: 2.5·ε/steps.
    pub step: Option<f64>,
    /// The paper's float attack, as a reference: success is judged on the float image (no 8-bit
    /// rounding, no margin), and the outcome reports that image's perceptibility. What the
    /// 8-bit guarantee costs is delivered ÷ float perceptibility.
    pub float_reference: bool,
    /// 8-bit checks spent after success to take back rounding the goal does not need.
    pub refine_rounds: u32,
    /// 8-bit checks spent after refinement to take back the grey levels the goal needs least.
    pub prune_rounds: u32,
    /// Refinement's and pruning's candidates checked one tick each (see `attack::guard`).
    pub batched_checks: bool,
}

impl AttackParams {
    /// The float reference of these parameters, towards `target` (the delivered attack's, so both
    /// attacks aim at the same class).
    pub fn float_reference(&self, target: Option<usize>) -> Self {
        Self {
            float_reference: true,
            margins: vec![0.0],
            refine_rounds: 0,
            prune_rounds: 0,
            target: target.or(self.target),
            ..self.clone()
        }
    }

    /// The most backward passes this attack can take, from its method's own loop bounds: every
    /// row ends within this many whatever the image or the margins (tests count them).
    pub fn max_backward_passes(&self) -> u64 {
        let steps = u64::from(self.max_iter);
        let per_step = (self.candidates.saturating_sub(1).max(1)) as u64;
        match (self.method, self.target) {
            (Method::Labelfool, _) | (Method::Deepfool, Some(_)) => steps,
            (Method::Deepfool, None) => steps * per_step,
            (Method::Fgsm, _) => 1,
            (Method::Pgd, _) => steps,
            // Each outer iteration: an inner DeepFool of at most `max_iter` steps, then the normal.
            (Method::Sparsefool, _) => u64::from(self.max_outer) * (steps * per_step + 1),
        }
    }
}

/// An attack request as the caller gives it; [`AttackRequest::validate`] checks it against the
/// model and the configured limits.
#[derive(Debug, Clone, Default)]
pub struct AttackRequest {
    pub method: Option<String>,
    /// Class index, WordNet id or name.
    pub target: Option<String>,
    pub max_iter: Option<u32>,
    pub overshoot: Option<f64>,
    pub delta1: Option<f64>,
    pub delta2: Option<f64>,
    /// FGSM step size(s) on the [0,1] pixel scale; several = search for the smallest that fools.
    pub epsilons: Option<Vec<f64>>,
    pub candidates: Option<usize>,
    pub lambda: Option<f64>,
    /// SparseFool's cap on outer iterations.
    pub max_outer: Option<u32>,
    /// PGD's step size on the [0,1] pixel scale.
    pub step: Option<f64>,
    /// Also run the paper's float attack (no 8-bit rounding) on the same image and target, and
    /// report its perceptibility: what the 8-bit guarantee costs.
    pub float_reference: bool,
    /// The logit margin the 8-bit image must keep, instead of the configured list (a query-based
    /// attack asks for more and more margin so the image transfers); no refinement then.
    pub margin: Option<f64>,
}

/// FGSM's default search: 0.5/255 … 32/255.
pub const DEFAULT_EPSILONS: [f64; 11] = [0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0];

/// LabelFool's δ1, δ2: the request's or the defaults, checked.
pub fn target_params(delta1: Option<f64>, delta2: Option<f64>, d: &AttackDefaults) -> Result<TargetParams, ParamError> {
    let delta1 = delta1.unwrap_or(d.delta1);
    let delta2 = delta2.unwrap_or(d.delta2);
    if !(delta1.is_finite() && delta1 > 0.0 && delta1 <= 1.0) {
        return Err(ParamError::invalid("delta1", format!("{delta1} is not in (0, 1]")));
    }
    if !(delta2.is_finite() && (0.0..1.0).contains(&delta2)) {
        return Err(ParamError::invalid("delta2", format!("{delta2} is not in [0, 1)")));
    }
    Ok(TargetParams { delta1, delta2 })
}

impl AttackRequest {
    /// Checks the request against the model and the limits: every value in range, the target a
    /// class of the model, and the worst-case cost within bounds.
    pub fn validate(&self, info: &ModelInfo, d: &AttackDefaults, s: &AttackLimits) -> Result<AttackParams, ParamError> {
        let req = self;
        let method = match req.method.as_deref() {
            None => Method::Labelfool,
            Some(m) => Method::parse(m).ok_or_else(|| {
                let known: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
                ParamError::invalid("method", format!("{m:?} is not one of {}", known.join(", ")))
            })?,
        };
        let max_iter = match (req.max_iter, method) {
            (Some(m), _) => m,
            (None, Method::Sparsefool) => SPARSEFOOL_MAX_INNER.min(d.max_iter),
            (None, Method::Pgd) => super::pgd::DEFAULT_STEPS.min(d.max_iter),
            (None, _) => d.max_iter,
        };
        if max_iter == 0 || max_iter > s.max_iter {
            return Err(ParamError::invalid("max_iter", format!("{max_iter} is not in 1..={}", s.max_iter)));
        }
        let overshoot = req.overshoot.unwrap_or(d.overshoot);
        if !(overshoot.is_finite() && (0.0..=10.0).contains(&overshoot)) {
            return Err(ParamError::invalid("overshoot", format!("{overshoot} is not a number in [0, 10]")));
        }
        let target = match req.target.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(info.classes().resolve(t).ok_or_else(|| {
                ParamError::invalid(
                    "target",
                    format!("{t:?} is not a class of model {} (give an index, WordNet id or name)", info.name),
                )
            })?),
        };
        if req.target.is_some() && method == Method::Sparsefool {
            return Err(ParamError::invalid("target", "sparsefool is untargeted"));
        }
        let epsilons = match (&req.epsilons, method) {
            (None, Method::Pgd) => vec![super::pgd::DEFAULT_EPSILON],
            (Some(list), Method::Pgd) if list.len() != 1 => {
                return Err(ParamError::invalid("epsilon", "pgd takes one radius (pixel scale)"));
            }
            (None, _) => DEFAULT_EPSILONS.iter().map(|e| e / 255.0).collect(),
            (Some(list), _) => {
                let mut list = list.clone();
                if list.is_empty() || list.len() > 64 || list.iter().any(|e| !(e.is_finite() && *e > 0.0 && *e <= 1.0))
                {
                    return Err(ParamError::invalid("epsilon", "1 to 64 values in (0, 1] (pixel scale)"));
                }
                list.sort_by(f64::total_cmp);
                list.dedup();
                list
            }
        };
        let candidates = req.candidates.unwrap_or(DEFAULT_CANDIDATES);
        if candidates < 2 || candidates > info.num_classes() {
            return Err(ParamError::invalid(
                "candidates",
                format!("{candidates} is not in 2..={}", info.num_classes()),
            ));
        }
        if candidates > s.max_candidates {
            return Err(ParamError::too_costly(
                "candidates",
                format!(
                    "{candidates} candidates cost {} backward passes per step; at most {} are allowed (limits.max_candidates)",
                    candidates - 1,
                    s.max_candidates
                ),
            ));
        }
        let max_outer = req.max_outer.unwrap_or(DEFAULT_MAX_OUTER);
        if !(1..=100).contains(&max_outer) {
            return Err(ParamError::invalid("max_outer", format!("{max_outer} is not in 1..=100")));
        }
        let lambda = req.lambda.unwrap_or(DEFAULT_LAMBDA);
        if !(lambda.is_finite() && lambda > 0.0 && lambda <= 100.0) {
            return Err(ParamError::invalid("lambda", format!("{lambda} is not in (0, 100]")));
        }
        let step = match (req.step, method) {
            (None, _) => None,
            (Some(s), Method::Pgd) if s.is_finite() && s > 0.0 && s <= 1.0 => Some(s),
            (Some(s), Method::Pgd) => return Err(ParamError::invalid("step", format!("{s} is not in (0, 1]"))),
            (Some(_), m) => return Err(ParamError::invalid("step", format!("{} takes no step size", m.name()))),
        };
        let params = AttackParams {
            method,
            max_iter,
            overshoot,
            epsilons,
            candidates,
            lambda,
            max_outer,
            step,
            float_reference: false,
            refine_rounds: if req.margin.is_some() { 0 } else { d.refine_rounds },
            prune_rounds: if req.margin.is_some() { 0 } else { d.prune_rounds },
            batched_checks: d.batched_checks,
            target_params: target_params(req.delta1, req.delta2, d)?,
            margins: match req.margin {
                Some(m) if m.is_finite() && (0.0..=1000.0).contains(&m) => vec![m],
                Some(m) => return Err(ParamError::invalid("margin", format!("{m} is not in [0, 1000]"))),
                None => d.margins.clone(),
            },
            target,
        };
        let cost = params.max_backward_passes();
        if cost > s.max_backward_passes {
            return Err(ParamError::too_costly(
                "max_iter",
                format!(
                    "{} with max_iter={max_iter} and candidates={candidates} may take {cost} backward passes; \
                     at most {} are allowed (limits.max_backward_passes)",
                    method.name(),
                    s.max_backward_passes
                ),
            ));
        }
        Ok(params)
    }
}
