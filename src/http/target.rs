//! `GET /target-label` (preview from the matrix alone) and `POST /target-label` (the full
//! decision for an image).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::dto::{ClassDistance, ClassPrediction, ClassRef};
use super::error::{ApiError, ErrorBody};
use super::input::{Finite, ImageRequest, Params, finite};
use crate::attack::Branch;
use crate::engine::{ImageSummary, Timings};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PreviewQuery {
    /// Model name (default: the first configured model).
    pub model: Option<String>,
    /// The true class: index, WordNet id or name.
    #[param(example = "zebra")]
    pub class: String,
    /// How many neighbours to list (default 5).
    #[param(minimum = 1, example = 5)]
    pub top: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TargetPreview {
    pub model: String,
    pub class: ClassRef,
    /// The classes LabelFool would move `class` to (MLE branch), nearest first.
    pub neighbours: Vec<ClassDistance>,
    /// How the matrix was built.
    #[schema(example = "from-weights")]
    pub matrix_method: String,
}

/// Preview: where LabelFool would move a class.
///
/// The nearest classes to `class` under the model's distance matrix, nearest first. This is the
/// MLE branch's choice for a confidently classified image of that class; the class itself is
/// never listed.
#[utoipa::path(get, path = "/target-label", tag = "labelfool", params(PreviewQuery), responses(
    (status = 200, body = TargetPreview),
    (status = 400, description = "Malformed query string", body = ErrorBody),
    (status = 404, description = "Unknown model", body = ErrorBody),
    (status = 422, description = "Unknown class, bad `top`, or no matrix", body = ErrorBody),
))]
pub async fn preview(
    State(state): State<AppState>,
    Params(q): Params<PreviewQuery>,
) -> Result<Json<TargetPreview>, ApiError> {
    let (_, info) = state.engine.model(q.model.as_deref())?;
    let matrix = info
        .matrix()
        .ok_or_else(|| ApiError::invalid("model", format!("model {} has no distance matrix", info.name)))?;
    let class = info
        .classes()
        .resolve(&q.class)
        .ok_or_else(|| ApiError::invalid("class", format!("{:?} is not a class of model {}", q.class, info.name)))?;
    let top = q.top.unwrap_or(5);
    if top == 0 || top >= info.num_classes() {
        return Err(ApiError::invalid("top", format!("{top} is not in 1..{}", info.num_classes())));
    }
    let neighbours = matrix
        .nearest(class, top)
        .into_iter()
        .map(|(i, d)| ClassDistance { class: ClassRef::new(&info, i), distance: f64::from(d) })
        .collect();
    Ok(Json(TargetPreview {
        model: info.name.clone(),
        class: ClassRef::new(&info, class),
        neighbours,
        matrix_method: matrix.meta.method.clone(),
    }))
}

/// Parameters of `POST /target-label` (query string, multipart fields or JSON keys).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DecisionParams {
    /// Model name (default: the first configured model).
    pub model: Option<String>,
    /// δ1: above this top-1 probability the MLE branch decides (default 0.8).
    #[param(value_type = Option<f64>, example = 0.8)]
    pub delta1: Option<Finite>,
    /// δ2: classes above this probability form the candidate set S (default 0.01).
    #[param(value_type = Option<f64>, example = 0.01)]
    pub delta2: Option<Finite>,
    /// Runner-up targets to list besides the chosen one (default 4, at most 100).
    #[param(maximum = 100)]
    pub alternatives: Option<usize>,
}

/// The request body, documented from [`DecisionParams`].
pub type DecisionBody = ImageRequest<DecisionParams>;

#[derive(Debug, Serialize, ToSchema)]
pub struct TargetDecisionResponse {
    pub model: String,
    pub image: ImageSummary,
    /// The model's top-5 for the image.
    pub prediction: Vec<ClassPrediction>,
    pub decision: DecisionDetail,
    pub timings: Timings,
}

/// LabelFool's choice and its reasons.
#[derive(Debug, Serialize, ToSchema)]
pub struct DecisionDetail {
    pub target: ClassRef,
    pub branch: Branch,
    /// p̂1, the top-1 probability.
    pub p1: f64,
    pub delta1: f64,
    pub delta2: f64,
    /// The candidate set S (just the prediction in the MLE branch), most probable first.
    pub candidates: Vec<ClassPrediction>,
    /// Best targets first — the chosen one leads — with their (expected) distance.
    pub ranking: Vec<ClassDistance>,
}

/// LabelFool's target decision for an image.
///
/// Classifies the image, then applies the paper's rule: if p̂1 > δ1 the nearest class to the
/// prediction under D (MLE branch), otherwise the class minimising Σ_{j∈S} p̂j·D[i,j] over the
/// candidate set S = {j : p̂j > δ2} (members of S excluded).
#[utoipa::path(post, path = "/target-label", tag = "labelfool", params(DecisionParams),
    request_body(description = "The image, in any of the forms `/classify` takes", content(
        (DecisionBody = "multipart/form-data"),
        (DecisionBody = "application/json"),
        (super::dto::ImageBytes = "image/png"),
        (super::dto::ImageBytes = "image/jpeg"),
    )),
    responses(
        (status = 200, body = TargetDecisionResponse),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 408, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody),
        (status = 504, body = ErrorBody),
    ))]
pub async fn decide(
    State(state): State<AppState>,
    req: DecisionBody,
) -> Result<Json<TargetDecisionResponse>, ApiError> {
    let p = &req.params;
    let alternatives = p.alternatives.unwrap_or(4);
    if alternatives > 100 {
        return Err(ApiError::invalid("alternatives", format!("{alternatives} is over 100")));
    }
    let t = state
        .engine
        .target_label(
            p.model.as_deref(),
            req.bytes.clone(),
            finite(p.delta1),
            finite(p.delta2),
            alternatives,
            state.deadlines.classify,
        )
        .await?;
    let info = &t.classification.model;
    let d = &t.decision;
    let decision = DecisionDetail {
        target: ClassRef::new(info, d.target),
        branch: d.branch,
        p1: d.p1,
        delta1: t.params.delta1,
        delta2: t.params.delta2,
        candidates: d.candidates.iter().map(|&(i, p)| ClassPrediction::new(info, i, p)).collect(),
        ranking: d.ranking.iter().map(|&(i, s)| ClassDistance { class: ClassRef::new(info, i), distance: s }).collect(),
    };
    let prediction =
        t.classification.top(5).into_iter().map(|(i, p)| ClassPrediction::new(info, i, f64::from(p))).collect();
    Ok(Json(TargetDecisionResponse {
        model: info.name.clone(),
        image: t.classification.image.clone(),
        prediction,
        decision,
        timings: t.classification.timings,
    }))
}
