//! LabelFool against a model known only by its endpoint (`/attack?model=remote:<name>
//! &surrogate=<local model>`): the target comes from the *remote's* probabilities (Eq. 2–4 with
//! the surrogate's distance matrix, the classes being the same), then white-box LabelFool on the
//! surrogate towards that target with a growing logit margin, the remote asked after each
//! candidate, and last PGD with momentum and input diversity at the search's radius, twice
//! (together the transfer prior); then the score-based search from the best of them. Every queried image is a
//! deliverable 8-bit PNG at the upload's size; identical candidates are asked once; the query
//! budget is never exceeded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::Digest;

use super::{Remote, RemoteError, search};
use crate::attack::target::{self, TargetDecision};
use crate::engine::{AttackRequest, Engine, EngineError, Upload, top_k};
use crate::imaging::metrics::Perturbation;

/// The margins (logits) tried in turn on the surrogate: the first is LabelFool's own; each next
/// one pushes the image further past the surrogate's boundary, so it is likelier to transfer.
/// All are tried (at most 8 queries, then PGD's one) before the search: the remote's target
/// probability is not monotone in the margin — academic gown → mortarboard stalls from 0.25 to 4
/// and transfers at 64.
pub const MARGINS: [f64; 8] = [0.25, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// The PGD runs tried in turn after LabelFool's margins, at the search's radius: (steps, step on
/// the pixel scale; None: PGD's default 2.5·ε/steps). The first is PGD's default; the second
/// takes many steps of 2 grey levels, which moves the remote towards the target where the first
/// stalls (Zhao et al., NeurIPS 2021: targeted transfer needs many iterations). One query each.
pub const PGD_RUNS: [(u32, Option<f64>); 2] = [(crate::attack::pgd::DEFAULT_STEPS, None), (100, Some(2.0 / 255.0))];

/// Most queries one request may spend (`budget`), and its default.
pub const MAX_BUDGET: u32 = 1000;
pub const DEFAULT_BUDGET: u32 = 100;

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
    /// `labelfool` (with a margin) or `pgd`.
    pub method: &'static str,
    /// The logit margin demanded of LabelFool on the surrogate.
    pub margin: Option<f64>,
    /// PGD's steps.
    pub steps: Option<u32>,
    /// The surrogate classifies its delivered PNG as the target.
    pub surrogate_success: bool,
    pub remote: RemoteTop,
    pub perceptibility: f64,
}

/// What the score-based search did (absent when the transfer prior reached the target, or no
/// query was left).
#[derive(Debug, Clone, Copy)]
pub struct SearchSummary {
    /// Images it scored (cached answers included).
    pub asked: u32,
    /// Proposals that lowered the loss (the margin of the strongest other class over the target).
    pub accepted: u32,
    /// L∞ radius in grey levels.
    pub epsilon: u8,
    pub success: bool,
    /// The delivered image is the search's (else the prior's best candidate was closer by the
    /// search's loss).
    pub delivered: bool,
}

/// After success: the delivered perturbation scaled down by bisection on the remote (each probe
/// one query, kept only when the remote still says the target), so a candidate made to transfer —
/// which fills its L∞ ball — is not delivered larger than the remote needs.
#[derive(Debug, Clone, Copy)]
pub struct Refinement {
    /// Images probed (cached answers included).
    pub asked: u32,
    /// The delivered perturbation's scale against the first success's (1: none smaller held).
    pub scale: f64,
}

/// The refinement's bisection stops when its bracket is narrower than this: at most 5 probes.
pub const REFINE_RESOLUTION: f64 = 0.05;

/// The image handed back: the first the remote classifies as the target, else the one closest
/// to it.
pub struct Delivered {
    pub png: Vec<u8>,
    /// The PNG's pixels (what it decodes to), kept so nothing decodes it again.
    pub rgb: Vec<u8>,
    pub perturbation: Perturbation,
    /// The remote's top-1 for it.
    pub remote: RemoteTop,
}

pub struct RemoteAttackOutcome {
    pub decision: TargetDecision,
    pub original: RemoteTop,
    pub success: bool,
    /// Queries spent (the upload's included); identical images are asked once.
    pub queries: u32,
    /// Queries spent when the remote first classified an image as the target.
    pub queries_to_success: Option<u32>,
    /// What the refinement after success did (absent without success or queries left).
    pub refinement: Option<Refinement>,
    pub budget: u32,
    pub candidates: Vec<Candidate>,
    pub search: Option<SearchSummary>,
    /// None when the budget allowed no candidate.
    pub delivered: Option<Delivered>,
    pub elapsed: Duration,
}

/// Options of the query-based attack beyond LabelFool's own.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAttackOptions {
    /// Most remote queries, the upload's included.
    pub budget: u32,
    /// Run the score-based search when the transfer prior has not reached the target.
    pub search: bool,
    /// The search's L∞ radius on the [0,1] scale.
    pub epsilon: f64,
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
    /// Past it no query is sent (as if the budget were spent).
    deadline: Instant,
}

impl Asker<'_> {
    /// The remote's probabilities, or None when the budget or the time is spent.
    async fn ask(&mut self, image: Bytes) -> Result<Option<Vec<f32>>, RemoteAttackError> {
        let key: [u8; 32] = sha2::Sha256::digest(&image).into();
        if let Some(p) = self.cache.get(&key) {
            return Ok(Some(p.clone()));
        }
        if self.queries >= self.budget || Instant::now() >= self.deadline {
            return Ok(None);
        }
        self.queries += 1;
        let p = ask(self.engine, self.remote, image).await?.probabilities;
        self.cache.insert(key, p.clone());
        Ok(Some(p))
    }
}

/// The search's view of the remote: pixels at the upload's size, sent as a PNG.
struct PixelAsker<'a, 'b> {
    asker: &'b mut Asker<'a>,
    width: u32,
    height: u32,
    alpha: Option<std::sync::Arc<Vec<u8>>>,
}

impl PixelAsker<'_, '_> {
    async fn png(&self, rgb: &[u8]) -> Result<Vec<u8>, RemoteAttackError> {
        let (w, h, rgb, alpha) = (self.width, self.height, rgb.to_vec(), self.alpha.clone());
        // Encoding a large image takes milliseconds: off the async threads.
        tokio::task::spawn_blocking(move || crate::imaging::encode_png(w, h, &rgb, alpha.as_deref().map(Vec::as_slice)))
            .await
            .map_err(|e| EngineError::Internal(format!("PNG encoder task: {e}")))?
            .map_err(|e| EngineError::from(e).into())
    }
}

impl search::Oracle for PixelAsker<'_, '_> {
    type Error = RemoteAttackError;
    async fn scores(&mut self, rgb: &[u8]) -> Result<Option<Vec<f32>>, RemoteAttackError> {
        let png = self.png(rgb).await?;
        self.asker.ask(Bytes::from(png)).await
    }
}

/// The candidate the search starts from: the closest to the target (lowest loss) among those
/// inside its ball, else the closest of all. A candidate outside (LabelFool at margin 64, say) is
/// projected onto the ball first, which makes another image, one the remote may score far worse
/// (Appenzeller: loss 0.03 before the projection, and the search from it missed; from PGD's 0.23
/// inside the ball it reached the target).
#[derive(Default)]
struct Start {
    /// (loss, inside the ball, the candidate's pixels, probabilities).
    chosen: Option<(f64, bool, Vec<u8>, Vec<f32>)>,
}

impl Start {
    /// A candidate of loss `l`, kept when it is inside the ball and the one so far is not, or
    /// both are on the same side and it is closer.
    fn offer(&mut self, l: f64, inside: bool, rgb: &[u8], probabilities: &[f32]) {
        let better = match &self.chosen {
            None => true,
            Some((best, was_inside, _, _)) => (inside, -l) > (*was_inside, -best),
        };
        if better {
            self.chosen = Some((l, inside, rgb.to_vec(), probabilities.to_vec()));
        }
    }
}

/// The candidate the remote put closest to the target: loss, PNG, pixels, the remote's
/// probabilities and its perturbation.
type Closest = (f64, Vec<u8>, Vec<u8>, Vec<f32>, Perturbation);

/// Runs query-based LabelFool: the transfer prior, then (unless it reached the target or
/// `options.search` is off) the score-based search from its best candidate. `options.budget`
/// counts every remote query, the upload's included.
pub async fn run(
    engine: &Engine,
    remote: &Remote,
    surrogate: &str,
    upload: &Upload,
    options: RemoteAttackOptions,
    request: AttackRequest,
    deadline: Duration,
) -> Result<RemoteAttackOutcome, RemoteAttackError> {
    let started = Instant::now();
    let budget = options.budget;
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
    let mut asker = Asker { engine, remote, budget, queries: 0, cache: HashMap::new(), deadline: started + deadline };
    let before = asker.ask(upload.bytes.clone()).await?.ok_or_else(|| {
        EngineError::invalid("budget", "a budget of 0 queries cannot even classify the upload on the remote")
    })?;
    let target_params = crate::attack::params::target_params(request.delta1, request.delta2, &engine.settings().attack)
        .map_err(EngineError::from)?;
    let decision = target::select(&before, matrix, target_params, 4);
    let t = decision.target;
    let original = top(&before, Some(t));
    let mut candidates = Vec::new();
    // The candidate the remote found closest to the target: (loss, PNG, pixels, probabilities).
    let mut best: Option<Closest> = None;
    // Where the search starts (see [`Start`]).
    let mut start = Start::default();
    let mut success = false;
    // LabelFool with each margin, then the attack made to transfer: PGD with momentum and input
    // diversity on the surrogate, at the search's radius. Where LabelFool's least perturbations
    // do not reach the remote, it is usually the search's best start (benches/results.md, issue 13).
    let epsilon = (options.epsilon * 255.0).round().clamp(1.0, 255.0) as u8;
    let labelfool = MARGINS.into_iter().map(|margin| {
        let req = AttackRequest {
            method: Some("labelfool".into()),
            target: Some(t.to_string()),
            margin: Some(margin),
            step: None,
            ..request.clone()
        };
        ("labelfool", Some(margin), None, req)
    });
    let pgd = PGD_RUNS.into_iter().map(|(steps, step)| {
        let req = AttackRequest {
            method: Some("pgd".into()),
            target: Some(t.to_string()),
            epsilons: Some(vec![f64::from(epsilon) / 255.0]),
            max_iter: Some(steps),
            step,
            margin: None,
            ..request.clone()
        };
        ("pgd", None, Some(steps), req)
    });
    for (method, margin, steps, req) in labelfool.chain(pgd) {
        if asker.queries >= budget {
            break;
        }
        let left = deadline.saturating_sub(started.elapsed());
        let result = engine.attack_upload(Some(surrogate), upload, req, left, None).await?;
        let Some(after) = asker.ask(Bytes::from(result.png.clone())).await? else { break };
        let remote_top = top(&after, Some(t));
        let hit = remote_top.index == t;
        candidates.push(Candidate {
            method,
            margin,
            steps,
            surrogate_success: result.outcome.success,
            remote: remote_top,
            perceptibility: result.perturbation.perceptibility,
        });
        let l = search::loss(&after, t);
        let inside = (result.perturbation.linf * 255.0).round() <= f64::from(epsilon);
        start.offer(l, inside, &result.outcome.rgb, &after);
        if hit || best.as_ref().is_none_or(|b| l < b.0) {
            best = Some((l, result.png, result.outcome.rgb, after, result.perturbation));
        }
        if hit {
            success = true;
            break;
        }
    }
    // The start's probabilities start the search (no second look-up). Without success, the
    // search's image replaces the prior's best only if it is closer by the loss the search and the
    // prior both rank by.
    let start = start.chosen;
    let (mut delivered, prior_loss) = match best {
        Some((l, png, rgb, p, perturbation)) => {
            (Some(Delivered { png, rgb, perturbation, remote: top(&p, Some(t)) }), Some(l))
        }
        None => (None, None),
    };
    let mut summary = None;
    if !success && options.search && asker.queries < budget && Instant::now() < asker.deadline {
        let x0 = upload.image.as_ref();
        let (start, start_scores, guide) = match start {
            Some((_, _, rgb, scores)) => {
                let guide: Vec<i16> = rgb.iter().zip(&x0.rgb).map(|(&a, &o)| i16::from(a) - i16::from(o)).collect();
                (rgb, scores, Some(guide))
            }
            None => (x0.rgb.clone(), before.clone(), None),
        };
        let params = search::SearchParams {
            epsilon,
            p_init: search::P_INIT,
            budget: budget - asker.queries,
            // The same upload gets the same search.
            seed: u64::from_le_bytes(sha2::Sha256::digest(&upload.bytes)[..8].try_into().unwrap_or_default()),
        };
        let mut pixels = PixelAsker {
            asker: &mut asker,
            width: x0.width,
            height: x0.height,
            alpha: x0.alpha.clone().map(Into::into),
        };
        let found = search::square(
            &mut pixels,
            x0.width,
            x0.height,
            &x0.rgb,
            &start,
            start_scores,
            guide.as_deref(),
            t,
            params,
        )
        .await?;
        let closer = search::loss(&found.probabilities, t) < prior_loss.unwrap_or(f64::INFINITY);
        let from_search = found.success || delivered.is_none() || closer;
        summary = Some(SearchSummary {
            asked: found.asked,
            accepted: found.accepted,
            epsilon,
            success: found.success,
            delivered: from_search,
        });
        if from_search {
            let png = pixels.png(&found.rgb).await?;
            let perturbation = crate::imaging::metrics::perturbation(x0.width, x0.height, &x0.rgb, &found.rgb);
            delivered =
                Some(Delivered { png, rgb: found.rgb, perturbation, remote: top(&found.probabilities, Some(t)) });
        }
        success = found.success;
    }
    let queries_to_success = success.then_some(asker.queries);
    let mut refinement = None;
    if let Some(d) = delivered.as_mut().filter(|_| success && asker.queries < budget && Instant::now() < asker.deadline)
    {
        refinement = Some(refine(&mut asker, &upload.image, d, t).await?);
    }
    Ok(RemoteAttackOutcome {
        decision,
        original,
        success,
        queries: asker.queries,
        queries_to_success,
        refinement,
        budget,
        candidates,
        search: summary,
        delivered,
        elapsed: started.elapsed(),
    })
}

/// Scales the delivered perturbation down by bisection on the remote, within the budget (see
/// [`Refinement`]); `delivered` becomes the smallest probe the remote still classified as `target`.
async fn refine(
    asker: &mut Asker<'_>,
    x0: &crate::imaging::Rgb8,
    delivered: &mut Delivered,
    target: usize,
) -> Result<Refinement, RemoteAttackError> {
    let delta: Vec<f64> = delivered.rgb.iter().zip(&x0.rgb).map(|(&a, &o)| f64::from(a) - f64::from(o)).collect();
    let mut pixels = PixelAsker { asker, width: x0.width, height: x0.height, alpha: x0.alpha.clone().map(Into::into) };
    let mut bracket = crate::attack::bracket::Bracket::new(1.0, 0.0, REFINE_RESOLUTION);
    let (mut asked, mut smallest) = (0, None);
    while let Some(scale) = bracket.next() {
        let rgb: Vec<u8> = x0
            .rgb
            .iter()
            .zip(&delta)
            .map(|(&o, &d)| (f64::from(o) + (d * scale).round()).clamp(0.0, 255.0) as u8)
            .collect();
        let Some(p) = search::Oracle::scores(&mut pixels, &rgb).await? else { break };
        asked += 1;
        let held = top(&p, Some(target)).index == target;
        bracket.checked(held);
        if held {
            smallest = Some((rgb, p));
        }
    }
    let scale = if smallest.is_some() { bracket.good() } else { 1.0 };
    if let Some((rgb, p)) = smallest {
        let png = pixels.png(&rgb).await?;
        let perturbation = crate::imaging::metrics::perturbation(x0.width, x0.height, &x0.rgb, &rgb);
        *delivered = Delivered { png, rgb, perturbation, remote: top(&p, Some(target)) };
    }
    Ok(Refinement { asked, scale })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_of(offers: &[(f64, bool)]) -> Option<u8> {
        let mut s = Start::default();
        for (tag, &(l, inside)) in offers.iter().enumerate() {
            s.offer(l, inside, &[tag as u8], &[]);
        }
        s.chosen.map(|c| c.2[0])
    }

    #[test]
    fn the_search_starts_from_the_closest_candidate_inside_its_ball() {
        // Appenzeller's: LabelFool's margins outside the ball from 64 on, PGD's runs inside.
        assert_eq!(start_of(&[(4.42, true), (0.03, false), (0.23, true), (1.26, true)]), Some(2));
        // None inside: the closest of all; one inside, however far, wins over those outside.
        assert_eq!(start_of(&[(4.0, false), (1.0, false), (2.0, false)]), Some(1));
        assert_eq!(start_of(&[(0.5, false), (6.0, true), (0.1, false)]), Some(1));
        // Ties keep the first.
        assert_eq!(start_of(&[(1.0, true), (1.0, true)]), Some(0));
        assert_eq!(start_of(&[]), None);
    }
}
