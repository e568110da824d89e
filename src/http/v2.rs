//! The Open Inference Protocol (KServe v2 REST) for classification, so model-serving stacks can
//! call LabelFool like any other model. Inputs: `BYTES` (encoded images, base64 strings in JSON)
//! or `FP32` (NCHW tensors already preprocessed to the model's input size, RGB in [0,1]). Output:
//! `probabilities`, `FP32 [N, classes]`. Errors follow the protocol: `{"error": "<message>"}`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::ApiError;

/// Handlers here fail with the server's one error type; [`protocol_errors`] gives every error
/// answered under `/v2` — these handlers', and the limits', auth's and the load shedder's —
/// the protocol's shape.
pub type V2Error = ApiError;

#[derive(Serialize, ToSchema)]
pub struct V2ErrorBody {
    pub error: String,
}

/// Rewrites error answers on `/v2` paths to the Open Inference Protocol's `{"error": "<message>"}`
/// (status and headers kept), so protocol clients can read every error the server gives them.
pub async fn protocol_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let oip = req.uri().path() == "/v2" || req.uri().path().starts_with("/v2/");
    let res = next.run(req).await;
    if !oip {
        return res;
    }
    let Some(super::error::ErrorMessage(message)) = res.extensions().get().cloned() else { return res };
    let (mut parts, _) = res.into_parts();
    let body = serde_json::to_vec(&V2ErrorBody { error: message }).unwrap_or_default();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

fn bad(msg: impl Into<String>) -> V2Error {
    ApiError::bad_request("bad_request", msg)
}

#[derive(Serialize, ToSchema)]
pub struct Live {
    pub live: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
}

/// Server liveness (OIP).
#[utoipa::path(get, path = "/v2/health/live", operation_id = "v2_live", tag = "kserve-v2", security(()), responses((status = 200, body = Live)))]
pub async fn live() -> Json<Live> {
    Json(Live { live: true })
}

/// Server readiness (OIP): 200 once models are loaded.
#[utoipa::path(get, path = "/v2/health/ready", operation_id = "v2_ready", tag = "kserve-v2", security(()), responses((status = 200, body = Ready), (status = 503, body = Ready)))]
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let ready = state.is_ready();
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(Ready { ready }))
}

#[derive(Serialize, ToSchema)]
pub struct ServerMetadata {
    pub name: String,
    pub version: String,
    pub extensions: Vec<String>,
}

/// Server metadata (OIP).
#[utoipa::path(get, path = "/v2", operation_id = "v2_server_metadata", tag = "kserve-v2", responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "labelfool".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: vec!["model_repository".into()],
    })
}

#[derive(Serialize, ToSchema)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    /// What this server accepts for the model (empty while its description is unknown).
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
    /// LabelFool's extension: the model's state (`ready`, `loading`, `failed`, …) …
    pub state: crate::model::ModelState,
    /// … and why it is not ready, when it failed or cannot be served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Model metadata (OIP): accepted inputs and the output, and the model's state — for any model the
/// server knows, ready or not.
#[utoipa::path(get, path = "/v2/models/{name}", operation_id = "v2_model_metadata", tag = "kserve-v2", params(("name" = String, Path)),
    responses((status = 200, body = ModelMetadata), (status = 404, body = V2ErrorBody)))]
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, V2Error> {
    let entry = state
        .engine
        .models()
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| ApiError::from(crate::engine::EngineError::UnknownModel(name.clone())))?;
    let (inputs, outputs) = match entry.info.as_deref() {
        Some(m) => {
            let s = m.input().size;
            (
                vec![
                    TensorMetadata { name: "image".into(), datatype: "BYTES".into(), shape: vec![-1] },
                    TensorMetadata { name: "input".into(), datatype: "FP32".into(), shape: vec![-1, 3, s, s] },
                ],
                vec![TensorMetadata {
                    name: "probabilities".into(),
                    datatype: "FP32".into(),
                    shape: vec![-1, m.num_classes() as i64],
                }],
            )
        }
        None => (Vec::new(), Vec::new()),
    };
    Ok(Json(ModelMetadata {
        name: entry.name,
        versions: vec![entry.version.unwrap_or_else(|| "1".into())],
        platform: entry.platform.unwrap_or_default(),
        inputs,
        outputs,
        state: entry.state,
        reason: entry.reason,
    }))
}

/// Model readiness (OIP).
#[utoipa::path(get, path = "/v2/models/{name}/ready", operation_id = "v2_model_ready", tag = "kserve-v2", params(("name" = String, Path)),
    responses((status = 200, body = Ready), (status = 404, body = V2ErrorBody),
        (status = 503, description = "Known but not ready (loading, unloading, unloaded, failed)", body = Ready)))]
pub async fn model_ready(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response, V2Error> {
    let ready = match state.engine.model(Some(&name)) {
        Ok(_) => state.is_ready(),
        Err(crate::engine::EngineError::ModelUnavailable(_)) => false,
        Err(e) => return Err(e.into()),
    };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, Json(Ready { ready })).into_response())
}

#[derive(Deserialize, ToSchema)]
pub struct InferRequest {
    pub id: Option<String>,
    pub inputs: Vec<InferInput>,
    /// Requested outputs; only `probabilities` exists.
    #[serde(default)]
    pub outputs: Vec<RequestedOutput>,
}

#[derive(Deserialize, ToSchema)]
pub struct InferInput {
    pub name: String,
    pub shape: Vec<i64>,
    /// `BYTES` (base64-encoded image files) or `FP32` (NCHW, preprocessed, [0,1]).
    pub datatype: String,
    /// Flat (row-major) or nested array.
    #[schema(value_type = Vec<Object>)]
    pub data: TensorData,
}

/// An input's `data`, flattened while it is parsed: no intermediate JSON values, so a 20 MB body
/// of numbers costs about its `f32`s, not 30× that.
#[derive(Debug, Default)]
pub struct TensorData {
    numbers: Vec<f32>,
    strings: Vec<String>,
    /// Elements that were neither (booleans, objects, null).
    other: usize,
}

impl TensorData {
    fn len(&self) -> usize {
        self.numbers.len() + self.strings.len() + self.other
    }
}

impl<'de> Deserialize<'de> for TensorData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut data = TensorData::default();
        serde::de::DeserializeSeed::deserialize(Flatten(&mut data, 0), d)?;
        Ok(data)
    }
}

/// Appends one JSON value (an element, or a nested array of them) to the data.
struct Flatten<'a>(&'a mut TensorData, usize);

/// Nesting deeper than any tensor's rank is malformed, and would recurse without bound.
const MAX_DEPTH: usize = 16;

impl<'de> serde::de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of numbers or strings")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.1 >= MAX_DEPTH {
            return Err(serde::de::Error::custom(format!("`data` is nested deeper than {MAX_DEPTH}")));
        }
        while seq.next_element_seed(Flatten(self.0, self.1 + 1))?.is_some() {}
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.numbers.push(v as f32);
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.numbers.push(v as f32);
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.numbers.push(v as f32);
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.0.strings.push(v.to_string());
        Ok(())
    }
    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.0.strings.push(v);
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        self.0.other += 1;
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.other += 1;
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        self.0.other += 1;
        Ok(())
    }
}

#[derive(Deserialize, ToSchema)]
pub struct RequestedOutput {
    pub name: String,
}

#[derive(Serialize, ToSchema)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<InferOutput>,
}

#[derive(Serialize, ToSchema)]
pub struct InferOutput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    /// Row-major probabilities.
    pub data: Vec<f32>,
}

/// Rows of one inference request waiting for the worker at once: a request of any size fits the
/// queue (it is not refused as full when nothing else is queued), and still fills batches.
const ROWS_IN_FLIGHT: usize = 16;

/// Inference (OIP): probabilities for a batch of images or preprocessed tensors.
#[utoipa::path(post, path = "/v2/models/{name}/infer", operation_id = "v2_infer", tag = "kserve-v2", params(("name" = String, Path)),
    request_body = InferRequest,
    responses(
        (status = 200, body = InferResponse),
        (status = 400, description = "Malformed request or undecodable image", body = V2ErrorBody),
        (status = 404, body = V2ErrorBody), (status = 408, body = V2ErrorBody), (status = 413, body = V2ErrorBody),
        (status = 422, description = "An image over limits.max_resized_side", body = V2ErrorBody), (status = 503, body = V2ErrorBody),
    ))]
pub async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<InferResponse>, V2Error> {
    let (_, m) = state.engine.model(Some(&name))?;
    let req: InferRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("invalid inference request: {e}")))?;
    if let Some(o) = req.outputs.iter().find(|o| o.name != "probabilities") {
        return Err(bad(format!("unknown output {:?}; this model has `probabilities`", o.name)));
    }
    let [input] = req.inputs.as_slice() else {
        return Err(bad("exactly one input is expected (`image` BYTES or `input` FP32)"));
    };
    let data = &input.data;
    let deadline = state.deadlines.classify;
    let rows: Vec<Vec<f32>> = match input.datatype.as_str() {
        "BYTES" => {
            if input.shape.len() != 1 || input.shape[0] != data.len() as i64 {
                return Err(bad(format!(
                    "BYTES input shape {:?} does not match its {} elements",
                    input.shape,
                    data.len()
                )));
            }
            if data.strings.len() != data.len() {
                return Err(bad("BYTES elements must be base64 strings"));
            }
            let images = data
                .strings
                .iter()
                .map(|s| {
                    base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map_err(|e| bad(format!("BYTES element is not base64: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let jobs = images.into_iter().map(|b| state.engine.classify(Some(&m.name), b.into(), deadline));
            futures::stream::iter(jobs)
                .buffered(ROWS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .map(|r| r.map(|c| c.probabilities))
                .collect::<Result<_, _>>()?
        }
        "FP32" => {
            let s = m.input().size;
            if input.shape.len() != 4 || input.shape[1..] != [3, s, s] || input.shape[0] < 1 {
                return Err(bad(format!("FP32 input must have shape [N, 3, {s}, {s}], got {:?}", input.shape)));
            }
            let per = (3 * s * s) as usize;
            // Checked: a shape like [2^54, 3, 224, 224] must not wrap around to match empty data.
            let needed = usize::try_from(input.shape[0]).ok().and_then(|n| n.checked_mul(per));
            if needed != Some(data.len()) {
                return Err(bad(format!(
                    "FP32 input has {} values; shape {:?} needs {}",
                    data.len(),
                    input.shape,
                    needed.map(|n| n.to_string()).unwrap_or_else(|| "more than can be addressed".into())
                )));
            }
            if data.numbers.len() != data.len() {
                return Err(bad("FP32 data must be numbers"));
            }
            let rows: Vec<Vec<f32>> = data.numbers.chunks(per).map(<[f32]>::to_vec).collect();
            let jobs = rows.into_iter().map(|c| state.engine.classify_tensor(Some(&m.name), c, deadline));
            futures::stream::iter(jobs)
                .buffered(ROWS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?
        }
        other => return Err(bad(format!("datatype {other:?} is not supported: use BYTES or FP32"))),
    };
    let classes = m.num_classes() as i64;
    Ok(Json(InferResponse {
        model_name: m.name.clone(),
        model_version: "1".into(),
        id: req.id,
        outputs: vec![InferOutput {
            name: "probabilities".into(),
            shape: vec![rows.len() as i64, classes],
            datatype: "FP32".into(),
            data: rows.into_iter().flatten().collect(),
        }],
    }))
}
