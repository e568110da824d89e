//! `POST /attack`: an adversarial PNG at the upload's size, with what happened.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::dto::{ClassDistance, ClassPrediction, ClassRef};
use super::error::{ApiError, ErrorBody};
use super::input::{Finite, FiniteList, ImageRequest, finite};
use crate::attack::Branch;
use crate::engine::{AttackRequest, AttackResult, ImageSummary, Timings, TransferVerdict};
use crate::imaging::metrics::Perturbation;
use crate::service::{AttackOrder, AttackReport};

/// Parameters (query string, multipart fields or JSON keys).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AttackParams {
    /// Model name (default: the first configured model).
    pub model: Option<String>,
    /// Attack method: `labelfool` (default), `deepfool`, `fgsm`, `sparsefool`, or `pgd` (PGD with
    /// momentum and input diversity inside the L∞ ball `epsilon`, made to transfer to other models).
    #[param(example = "labelfool")]
    pub method: Option<String>,
    /// Target class (index, WordNet id or name) instead of LabelFool's choice.
    #[param(example = "n02389026")]
    pub target: Option<String>,
    /// Iteration budget, 8-bit re-check steps included (default 50; SparseFool: steps of each inner
    /// DeepFool, default 10; PGD: its steps, default 20; at most limits.max_iter).
    #[param(minimum = 1, example = 50)]
    pub max_iter: Option<u32>,
    /// DeepFool overshoot (default 0.02).
    #[param(value_type = Option<f64>, minimum = 0.0, example = 0.02)]
    pub overshoot: Option<Finite>,
    /// LabelFool δ1 (default 0.8).
    #[param(value_type = Option<f64>)]
    pub delta1: Option<Finite>,
    /// LabelFool δ2 (default 0.01).
    #[param(value_type = Option<f64>)]
    pub delta2: Option<Finite>,
    /// FGSM step size on the [0,1] pixel scale, or a comma-separated list: the smallest that
    /// fools is delivered (default 0.5/255 … 32/255). PGD: its one L∞ radius (default 13/255).
    #[param(value_type = Option<String>, example = "0.0078,0.0157,0.0314")]
    pub epsilon: Option<FiniteList>,
    /// DeepFool / SparseFool: classes considered, the original included (default 10).
    pub candidates: Option<usize>,
    /// SparseFool's λ (default 3, the authors' value for ImageNet).
    #[param(value_type = Option<f64>)]
    pub lambda: Option<Finite>,
    /// SparseFool's cap on outer iterations (default 50, the authors' ImageNet demo; 1..=100).
    pub max_outer: Option<u32>,
    /// PGD's step size on the [0,1] pixel scale (default 2.5·epsilon/max_iter).
    #[param(value_type = Option<f64>, example = 0.0078)]
    pub step: Option<Finite>,
    /// Also run the paper's float attack (no 8-bit rounding) on the same image and target and
    /// report its perceptibility (`float_reference` in the answer; the attack costs twice).
    pub float_reference: Option<bool>,
    /// Other models (comma-separated, at most 8) that classify the delivered PNG and the upload:
    /// models of this server, or remote targets as `remote:<name>`. The answer's `transfer` says,
    /// per model, its top-1 and whether the attack transferred (LabelFool and other targeted
    /// attacks: the target; untargeted: a changed label).
    #[param(example = "efficientnet-lite2")]
    pub verify: Option<String>,
    /// The logit margin the 8-bit image must keep (LabelFool, DeepFool), instead of the
    /// configured list; no refinement then.
    #[param(value_type = Option<f64>)]
    pub margin: Option<Finite>,
    /// With `model=remote:<name>`: the local model LabelFool runs on (default: the default model);
    /// it must have the remote's classes. The answer is a [`RemoteAttackResponse`].
    pub surrogate: Option<String>,
    /// With `model=remote:<name>`: most queries to the remote, the upload's included (default 100,
    /// at most 1000).
    pub budget: Option<u32>,
    /// With `model=remote:<name>`: run the score-based search (Square Attack on the remote's
    /// scores) when the transfer prior has not reached the target (default true). The search's
    /// L∞ radius is `epsilon` (one value on the [0,1] scale, default 0.05).
    pub search: Option<bool>,
}

/// `POST /attack?model=remote:<name>`: LabelFool against a model known only by its endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct RemoteAttackResponse {
    /// `remote:<name>`.
    pub model: String,
    pub surrogate: String,
    /// `labelfool-transfer`: white-box LabelFool on the surrogate with a growing margin, the remote
    /// asked after each candidate; `labelfool-transfer+square` when the score-based search ran.
    pub method: String,
    /// The remote classifies the delivered PNG as the target.
    pub success: bool,
    /// Queries spent (the upload's included; identical images are asked once) and the budget.
    pub queries: u32,
    pub budget: u32,
    /// Queries spent when the remote first classified an image as the target (the rest went to
    /// the refinement).
    pub queries_to_success: Option<u32>,
    /// The remote's top-1 for the upload.
    pub original: ClassPrediction,
    /// Chosen from the remote's probabilities with the surrogate's distance matrix.
    pub target: TargetInfo,
    /// The remote's top-1 for the delivered PNG (absent when no candidate was asked).
    #[serde(rename = "final")]
    pub final_: Option<ClassPrediction>,
    /// Every candidate of the transfer prior asked about, in order.
    pub candidates: Vec<CandidateInfo>,
    /// The score-based search, when it ran.
    pub search: Option<SearchInfo>,
    /// After success, the delivered perturbation scaled down by bisection on the remote.
    pub refinement: Option<RefinementInfo>,
    /// The delivered PNG (the first image the remote classified as the target, else the one it
    /// gave the target's highest probability), base64.
    #[schema(format = Byte)]
    pub png_base64: Option<String>,
    pub perturbation: Option<Perturbation>,
    /// The remote's original and final classes compared in WordNet.
    pub label_space: Option<LabelSpace>,
    pub elapsed_ms: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CandidateInfo {
    /// `labelfool` (white-box LabelFool with `margin`) or `pgd` (PGD with momentum and input
    /// diversity at the search's radius, with `steps`: the last candidates).
    pub method: String,
    /// Logit margin demanded of LabelFool on the surrogate.
    pub margin: Option<f64>,
    /// PGD's steps.
    pub steps: Option<u32>,
    pub surrogate_success: bool,
    /// The remote's top-1 and its probability of the target.
    pub remote: ClassPrediction,
    pub remote_target_probability: Option<f64>,
    pub perceptibility: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchInfo {
    /// Square Attack (L∞) on the remote's probabilities, started from the prior's best candidate.
    pub method: String,
    /// Images scored (answers from the cache included).
    pub asked: u32,
    /// Proposals that lowered the search's loss (the margin of the strongest other class over the
    /// target, in log-probabilities).
    pub accepted: u32,
    /// L∞ radius on the [0,1] scale (a whole number of grey levels).
    pub epsilon: f64,
    pub success: bool,
    /// The delivered PNG is the search's (false: the prior's best candidate stayed closer by the
    /// search's loss).
    pub delivered: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RefinementInfo {
    /// Scaled-down images probed (at most 5; answers from the cache included).
    pub asked: u32,
    /// The delivered perturbation's scale against the first success's (1: no smaller one held).
    pub scale: f64,
}

/// The request body, documented from [`AttackParams`].
pub type AttackBody = ImageRequest<AttackParams>;

impl AttackParams {
    /// The attack service's order for these parameters.
    fn order(&self) -> AttackOrder {
        let verify = self.verify.as_deref().unwrap_or_default().split(',').map(str::to_string).collect();
        AttackOrder {
            model: self.model.clone(),
            request: self.engine_request(),
            verify,
            surrogate: self.surrogate.clone(),
            budget: self.budget,
            search: self.search,
        }
    }

    fn engine_request(&self) -> AttackRequest {
        AttackRequest {
            method: self.method.clone(),
            target: self.target.clone(),
            max_iter: self.max_iter,
            overshoot: finite(self.overshoot),
            delta1: finite(self.delta1),
            delta2: finite(self.delta2),
            epsilons: self.epsilon.clone().map(|FiniteList(v)| v),
            candidates: self.candidates,
            lambda: finite(self.lambda),
            max_outer: self.max_outer,
            step: finite(self.step),
            float_reference: self.float_reference.unwrap_or(false),
            margin: finite(self.margin),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttackResponse {
    pub model: String,
    #[schema(example = "labelfool")]
    pub method: String,
    /// The delivered 8-bit PNG is classified as the target (untargeted methods: as anything but
    /// the original class).
    pub success: bool,
    /// Size and format of the upload; the PNG has the same width and height (and alpha).
    pub image: ImageSummary,
    /// The adversarial image, PNG, base64.
    #[schema(format = Byte)]
    pub png_base64: String,
    /// The model's answer for the upload.
    pub original: ClassPrediction,
    pub target: Option<TargetInfo>,
    /// The model's answer for the delivered PNG (what `/classify` says for it).
    #[serde(rename = "final")]
    pub final_: ClassPrediction,
    /// Gradient steps: one forward pass and one backward pass per objective (LabelFool: 1;
    /// untargeted DeepFool: one per candidate class).
    pub iterations: u32,
    /// 8-bit re-checks: forward passes on the image as it would be delivered.
    pub checks: u32,
    /// 8-bit checks after success that took back rounding the goal did not need.
    pub refinements: u32,
    /// Logit margin the 8-bit guard demanded when the attack succeeded (DeepFool-style methods).
    pub margin: Option<f64>,
    /// FGSM: the step size of the delivered image.
    pub epsilon: Option<f64>,
    pub perturbation: Perturbation,
    /// How far the delivered label is from the original in WordNet (ImageNet-style classes).
    pub label_space: LabelSpace,
    /// With `float_reference=true`: the paper's float attack on the same image and target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub float_reference: Option<FloatComparison>,
    /// With `verify=…`: the delivered PNG classified by those models.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transfer: Vec<TransferResult>,
    pub timings: Timings,
}

/// The original and the delivered class compared in WordNet (null when a class has no WordNet id).
#[derive(Debug, Serialize, ToSchema)]
pub struct LabelSpace {
    /// Wu-Palmer similarity (1 = the same class; as NLTK computes it).
    pub wup: Option<f64>,
    /// Mistake severity: the height of their lowest common ancestor (0 = the same class; lower
    /// = a milder mistake; Bertinetto et al., CVPR 2020).
    pub mistake_severity: Option<u32>,
}

fn label_space(classes: &crate::model::ClassList, original: usize, fin: usize) -> LabelSpace {
    let wnid = |i: usize| classes.get(i).and_then(|c| c.wnid.clone());
    let wn = crate::wordnet::WordNet::embedded();
    match (wnid(original), wnid(fin)) {
        (Some(a), Some(b)) => LabelSpace { wup: wn.wup(&a, &b), mistake_severity: wn.mistake_severity(&a, &b) },
        _ => LabelSpace { wup: None, mistake_severity: None },
    }
}

/// Whether an attack transfers to another model.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransferResult {
    pub model: String,
    /// Its top-1 for the upload.
    pub original: ClassPrediction,
    /// Its top-1 for the delivered PNG.
    pub adversarial: ClassPrediction,
    /// The attack's target in its class list (targeted attacks).
    pub target: Option<ClassRef>,
    /// Targeted: its top-1 is the target. Untargeted: its label changed. Null: the target has no
    /// counterpart in its classes.
    pub transferred: Option<bool>,
}

/// What the 8-bit guarantee cost this image.
#[derive(Debug, Serialize, ToSchema)]
pub struct FloatComparison {
    /// The float attack reached the goal.
    pub success: bool,
    /// The float image's perceptibility.
    pub perceptibility: Option<f64>,
    /// Delivered ÷ float perceptibility, when both succeeded.
    pub delivered_over_float: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TargetInfo {
    #[serde(flatten)]
    pub class: ClassRef,
    /// `labelfool` (chosen from the distance matrix) or `caller`.
    #[schema(example = "labelfool")]
    pub chosen_by: String,
    pub branch: Option<Branch>,
    pub p1: Option<f64>,
    /// The target's probability on the delivered image.
    pub probability: Option<f64>,
    /// LabelFool's ranking of targets, best first.
    pub ranking: Vec<ClassDistance>,
}

/// Generate an adversarial image.
///
/// The attack works on the image at its original size through the model's own preprocessing, so
/// the PNG it returns (same width and height; alpha kept) is adversarial as delivered: it is
/// quantised to 8 bits and re-checked, and `success` describes that PNG. Send
/// `Accept: image/png` to receive the PNG itself, with the metadata in `x-labelfool-*` headers,
/// or `Accept: text/event-stream` to follow it live: Server-Sent Events `progress` (iterations,
/// checks, the current label and the guard's margin, after every step that changed them), then
/// one `result` (this JSON answer) or `error` (the error body with its `status`).
#[utoipa::path(post, path = "/attack", tag = "labelfool", params(AttackParams),
    request_body(description = "The image, in any of the forms `/classify` takes", content(
        (AttackBody = "multipart/form-data"),
        (AttackBody = "application/json"),
        (super::dto::ImageBytes = "image/png"),
        (super::dto::ImageBytes = "image/jpeg"),
    )),
    responses(
        (status = 200, description = "JSON result (or the PNG itself with `Accept: image/png`, or progress events then the result with `Accept: text/event-stream`)", content(
            (AttackResponse = "application/json"),
            (super::dto::ImageBytes = "image/png"),
            (AttackProgressEvent = "text/event-stream"),
        )),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 408, description = "The body did not arrive within server.body_read_timeout_ms", body = ErrorBody),
        (status = 422, description = "Invalid parameter (unknown target, target = prediction, bad max_iter, …), `too_costly` (over limits.max_candidates or limits.max_backward_passes) or `image_too_elongated` (limits.max_resized_side)", body = ErrorBody),
        (status = 500, description = "Model error in this job (other requests are unaffected)", body = ErrorBody),
        (status = 503, description = "Queue full (see Retry-After), the model (or a `verify` model) not ready, or shutting down; an attack in flight when its model is unloaded ends with 503 too", body = ErrorBody), (status = 504, body = ErrorBody),
    ))]
pub async fn attack(State(state): State<AppState>, headers: HeaderMap, req: AttackBody) -> Result<Response, ApiError> {
    let service = state.attacks();
    let checked = service.check(req.params.order(), req.bytes)?;
    if wants_events(&headers) {
        // Everything that can be refused is refused with its status before the stream starts.
        let info = checked.model.clone();
        let labels: std::sync::Arc<[ClassRef]> =
            (0..info.classes().len()).map(|i| ClassRef::from_list(info.classes(), i)).collect();
        let (tx, rx) = tokio::sync::watch::channel(crate::attack::Progress::default());
        let run = async move { Ok(answer(service.run(checked, Some(tx)).await?).0) };
        return Ok(events(run, Some(rx), labels).into_response());
    }
    let wants_png = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').any(|m| m.trim().starts_with("image/png")));
    match answer(service.run(checked, None).await?) {
        (Answer::Local(body), Some(png)) if wants_png => {
            let mut res = (([(header::CONTENT_TYPE, "image/png")]), super::dto::ImageBytes(png)).into_response();
            metadata_headers(res.headers_mut(), &body);
            if !body.transfer.is_empty() {
                // `model=true|false|null`, comma-separated, in `verify` order.
                let v: Vec<String> = body
                    .transfer
                    .iter()
                    .map(|t| format!("{}={}", t.model, t.transferred.map_or("null".into(), |b| b.to_string())))
                    .collect();
                if let Ok(v) = HeaderValue::from_str(&v.join(",")) {
                    res.headers_mut().insert("x-labelfool-transferred", v);
                }
            }
            Ok(res)
        }
        (body, _) => Ok(Json(body).into_response()),
    }
}

/// The JSON answer of a local or a remote attack.
#[derive(Serialize)]
#[serde(untagged)]
enum Answer {
    Local(Box<AttackResponse>),
    Remote(Box<RemoteAttackResponse>),
}

/// The service's report as the route answers it, with the delivered PNG of a local attack.
fn answer(report: AttackReport) -> (Answer, Option<Vec<u8>>) {
    match report {
        AttackReport::Remote(r) => {
            (Answer::Remote(Box::new(remote_summary(&r.remote, &r.surrogate, &r.outcome))), None)
        }
        AttackReport::Local(v) => {
            let mut body = summary(&v.result);
            body.transfer =
                v.transfer.iter().map(|t| transfer_result(t.model.clone(), &t.classes, &t.verdict)).collect();
            (Answer::Local(Box::new(body)), Some(v.result.png))
        }
    }
}

/// `Accept: text/event-stream`: the attack's progress streamed, then its result.
fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').any(|m| m.trim().starts_with("text/event-stream")))
}

/// One `event: progress` of a streamed attack.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttackProgressEvent {
    /// Gradient steps so far.
    pub iterations: u32,
    /// 8-bit checks so far.
    pub checks: u32,
    /// The class of the latest logits the attack saw (its float image or an 8-bit check).
    pub label: Option<ClassRef>,
    pub probability: Option<f64>,
    /// The logit margin κ the 8-bit guard demands now.
    pub margin: Option<f64>,
}

/// Server-Sent Events for one attack: `progress` after each tick that changed something, then
/// one `result` (the JSON answer) or `error` (the error body, with its `status`). The attack runs
/// inside the stream: a client that goes away drops it, and the worker frees its row.
fn events<T: Serialize + Send + 'static>(
    run: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
    progress: Option<tokio::sync::watch::Receiver<crate::attack::Progress>>,
    labels: std::sync::Arc<[ClassRef]>,
) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    type Run<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, ApiError>> + Send>>;
    let final_event = |r: Result<T, ApiError>| match r {
        Ok(body) => Event::default().event("result").data(serde_json::to_string(&body).unwrap_or_default()),
        Err(e) => Event::default().event("error").data(serde_json::to_string(&e.event()).unwrap_or_default()),
    };
    let run: Run<T> = Box::pin(run);
    let stream = futures::stream::unfold(Some((run, progress)), move |st| {
        let labels = labels.clone();
        async move {
            let (mut run, mut progress) = st?;
            loop {
                let Some(rx) = progress.as_mut() else {
                    return Some((Ok(final_event(run.await)), None));
                };
                tokio::select! {
                    biased;
                    r = &mut run => return Some((Ok(final_event(r)), None)),
                    changed = rx.changed() => {
                        if changed.is_err() {
                            progress = None;
                            continue;
                        }
                        let p = rx.borrow_and_update().clone();
                        let ev = AttackProgressEvent {
                            iterations: p.iterations,
                            checks: p.checks,
                            label: p.label.and_then(|i| labels.get(i).cloned()),
                            probability: p.probability,
                            margin: p.margin,
                        };
                        let ev = Event::default().event("progress").data(serde_json::to_string(&ev).unwrap_or_default());
                        return Some((Ok(ev), Some((run, progress))));
                    }
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn remote_summary(
    remote: &crate::remote::Remote,
    surrogate: &str,
    o: &crate::remote::attack::RemoteAttackOutcome,
) -> RemoteAttackResponse {
    let classes = &remote.classes;
    let pred =
        |t: &crate::remote::attack::RemoteTop| ClassPrediction::from_list(classes, t.index, f64::from(t.probability));
    let d = &o.decision;
    let last = o.delivered.as_ref().map(|d| &d.remote);
    RemoteAttackResponse {
        model: format!("remote:{}", remote.config.name),
        surrogate: surrogate.to_string(),
        method: if o.search.is_some() { "labelfool-transfer+square" } else { "labelfool-transfer" }.into(),
        success: o.success,
        queries: o.queries,
        budget: o.budget,
        queries_to_success: o.queries_to_success,
        original: pred(&o.original),
        target: TargetInfo {
            class: ClassRef::from_list(classes, d.target),
            chosen_by: "labelfool".into(),
            branch: Some(d.branch),
            p1: Some(d.p1),
            probability: last.and_then(|r| r.target_probability).map(f64::from),
            ranking: d
                .ranking
                .iter()
                .map(|&(i, s)| ClassDistance { class: ClassRef::from_list(classes, i), distance: s })
                .collect(),
        },
        final_: last.map(pred),
        candidates: o
            .candidates
            .iter()
            .map(|c| CandidateInfo {
                method: c.method.into(),
                margin: c.margin,
                steps: c.steps,
                surrogate_success: c.surrogate_success,
                remote: pred(&c.remote),
                remote_target_probability: c.remote.target_probability.map(f64::from),
                perceptibility: c.perceptibility,
            })
            .collect(),
        search: o.search.map(|s| SearchInfo {
            method: "square-linf".into(),
            asked: s.asked,
            accepted: s.accepted,
            epsilon: f64::from(s.epsilon) / 255.0,
            success: s.success,
            delivered: s.delivered,
        }),
        refinement: o.refinement.map(|r| RefinementInfo { asked: r.asked, scale: r.scale }),
        png_base64: o.delivered.as_ref().map(|r| base64::engine::general_purpose::STANDARD.encode(&r.png)),
        perturbation: o.delivered.as_ref().map(|r| r.perturbation),
        label_space: last.map(|f| label_space(classes, o.original.index, f.index)),
        elapsed_ms: o.elapsed.as_secs_f64() * 1e3,
    }
}

fn transfer_result(model: String, classes: &crate::model::ClassList, v: &TransferVerdict) -> TransferResult {
    let class = |(i, p): (usize, f32)| ClassPrediction::from_list(classes, i, f64::from(p));
    TransferResult {
        model,
        original: class(v.original),
        adversarial: class(v.adversarial),
        target: v.target.map(|i| ClassRef::from_list(classes, i)),
        transferred: v.transferred,
    }
}

/// The JSON body of a `POST /attack` answer (also printed by `labelfool attack --json`).
pub fn summary(r: &AttackResult) -> AttackResponse {
    let info = &r.model;
    let o = &r.outcome;
    let target = o.target.map(|t| TargetInfo {
        class: ClassRef::new(info, t),
        chosen_by: if o.decision.is_some() { "labelfool".into() } else { "caller".into() },
        branch: o.decision.as_ref().map(|d| d.branch),
        p1: o.decision.as_ref().map(|d| d.p1),
        probability: o.target_probability,
        ranking: o
            .decision
            .iter()
            .flat_map(|d| &d.ranking)
            .map(|&(i, s)| ClassDistance { class: ClassRef::new(info, i), distance: s })
            .collect(),
    });
    AttackResponse {
        model: info.name.clone(),
        method: o.method.name().into(),
        success: o.success,
        image: r.image.clone(),
        png_base64: base64::engine::general_purpose::STANDARD.encode(&r.png),
        original: ClassPrediction::new(info, o.original.index, o.original.probability),
        target,
        final_: ClassPrediction::new(info, o.final_.index, o.final_.probability),
        iterations: o.iterations,
        checks: o.checks,
        refinements: o.refinements,
        margin: o.margin,
        epsilon: o.epsilon,
        perturbation: r.perturbation,
        label_space: label_space(info.classes(), o.original.index, o.final_.index),
        transfer: Vec::new(),
        float_reference: r.float_reference.map(|f| FloatComparison {
            success: f.success,
            perceptibility: f.perceptibility,
            delivered_over_float: f
                .perceptibility
                .filter(|p| *p > 0.0 && f.success && o.success)
                .map(|p| r.perturbation.perceptibility / p),
        }),
        timings: r.timings,
    }
}

/// The JSON response's scalar fields as `x-labelfool-*` headers (labels percent-encoded).
fn metadata_headers(h: &mut HeaderMap, b: &AttackResponse) {
    let mut put = |name: &str, value: String| {
        let encoded: String = value
            .bytes()
            .map(|c| if c.is_ascii_graphic() || c == b' ' { (c as char).to_string() } else { format!("%{c:02X}") })
            .collect();
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(format!("x-labelfool-{name}")), HeaderValue::from_str(&encoded)) {
            h.insert(n, v);
        }
    };
    put("model", b.model.clone());
    put("method", b.method.clone());
    put("success", b.success.to_string());
    put("original-index", b.original.class.index.to_string());
    put("original-label", b.original.class.label.clone());
    put("original-probability", b.original.probability.to_string());
    if let Some(t) = &b.target {
        put("target-index", t.class.index.to_string());
        put("target-label", t.class.label.clone());
        put("target-chosen-by", t.chosen_by.clone());
        if let Some(branch) = t.branch {
            put("target-branch", format!("{branch:?}").to_lowercase());
        }
    }
    put("final-index", b.final_.class.index.to_string());
    put("final-label", b.final_.class.label.clone());
    put("final-probability", b.final_.probability.to_string());
    put("iterations", b.iterations.to_string());
    put("checks", b.checks.to_string());
    if let Some(m) = b.margin {
        put("margin", m.to_string());
    }
    if let Some(e) = b.epsilon {
        put("epsilon", e.to_string());
    }
    put("perceptibility", b.perturbation.perceptibility.to_string());
    put("l2", b.perturbation.l2.to_string());
    put("linf", b.perturbation.linf.to_string());
    put("elapsed-ms", format!("{:.1}", b.timings.total_ms));
}
