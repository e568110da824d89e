//! `POST /v2/models/{name}/infer`: probabilities for a batch of images (`BYTES`: encoded image
//! files — base64 strings in JSON, raw in binary data) or of preprocessed tensors (`FP32`, NCHW at
//! the model's input size, RGB in [0,1]). Triton's extensions as its clients use them: binary
//! tensor data (`Inference-Header-Content-Length`, inputs and outputs), and classification
//! (`parameters.classification = k` on an output: the top k as `"<probability>:<index>:<label>"`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{V2Error, V2ErrorBody, bad};
use crate::http::AppState;

/// Triton's binary tensor data extension: the JSON header's length, the binary data after it.
const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Deserialize, ToSchema)]
pub struct InferRequest {
    pub id: Option<String>,
    pub inputs: Vec<InferInput>,
    /// Requested outputs; only `probabilities` exists.
    #[serde(default)]
    pub outputs: Vec<RequestedOutput>,
    #[serde(default)]
    pub parameters: RequestParameters,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RequestParameters {
    /// Every output as binary data unless the output says otherwise (Triton's clients set this
    /// when they request no output by name).
    #[serde(default)]
    pub binary_data_output: bool,
}

#[derive(Deserialize, ToSchema)]
pub struct InferInput {
    pub name: String,
    pub shape: Vec<i64>,
    /// `BYTES` (encoded image files: base64 strings in JSON) or `FP32` (NCHW, preprocessed, [0,1]).
    pub datatype: String,
    /// Flat (row-major) or nested array; absent when the tensor travels as binary data.
    #[schema(value_type = Option<Vec<Object>>)]
    #[serde(default)]
    pub data: Option<TensorData>,
    #[serde(default)]
    pub parameters: InputParameters,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct InputParameters {
    /// Bytes of this tensor in the binary data after the JSON header.
    pub binary_data_size: Option<u64>,
}

#[derive(Deserialize, ToSchema)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: OutputParameters,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct OutputParameters {
    /// Return this output as binary data.
    pub binary_data: Option<bool>,
    /// Return the top k classes (`BYTES`, `"<probability>:<index>:<label>"`) instead of all
    /// probabilities.
    pub classification: Option<usize>,
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
    /// `FP32` probabilities, or `BYTES` with `classification`.
    pub datatype: String,
    /// Row-major values; absent when they travel as binary data.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub data: Option<OutputData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<OutputDataSize>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum OutputData {
    Numbers(Vec<f32>),
    Strings(Vec<String>),
}

#[derive(Serialize, ToSchema)]
pub struct OutputDataSize {
    pub binary_data_size: usize,
}

/// One input's elements, wherever they came from.
enum Elements {
    Images(Vec<Bytes>),
    Numbers(Vec<f32>),
}

/// Rows of one inference request waiting for the worker at once (the request stops at the first
/// row that fails, so a batch of bad images costs one failure, not all of them): a request of any size fits the
/// queue (it is not refused as full when nothing else is queued), and still fills batches.
const ROWS_IN_FLIGHT: usize = 16;

/// Inference (OIP): probabilities for a batch of images or preprocessed tensors.
#[utoipa::path(post, path = "/v2/models/{name}/infer", operation_id = "v2_infer", tag = "kserve-v2", params(("name" = String, Path)),
    request_body(content = InferRequest, description = "JSON; or, with an `Inference-Header-Content-Length` header, that many bytes of JSON followed by the inputs' binary data (Triton's binary tensor data extension)"),
    responses(
        (status = 200, description = "JSON; or JSON then binary output data, with `Inference-Header-Content-Length`, when binary outputs were asked for", body = InferResponse),
        (status = 400, description = "Malformed request or undecodable image", body = V2ErrorBody),
        (status = 404, body = V2ErrorBody), (status = 408, body = V2ErrorBody), (status = 413, body = V2ErrorBody),
        (status = 422, description = "An image over limits.max_resized_side", body = V2ErrorBody), (status = 503, body = V2ErrorBody),
    ))]
pub async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, V2Error> {
    let (_, m) = state.engine.model(Some(&name))?;
    let (json, binary) = split_body(&headers, body)?;
    let req: InferRequest =
        serde_json::from_slice(&json).map_err(|e| bad(format!("invalid inference request: {e}")))?;
    let mut outputs = req.outputs;
    if let Some(o) = outputs.iter().find(|o| o.name != "probabilities") {
        return Err(bad(format!("unknown output {:?}; this model has `probabilities`", o.name)));
    }
    let [input] = req.inputs.as_slice() else {
        return Err(bad("exactly one input is expected (`image` BYTES or `input` FP32)"));
    };
    let elements = elements(input, binary)?;
    let deadline = state.deadlines.classify;
    let rows: Vec<Vec<f32>> = match elements {
        Elements::Images(images) => {
            if input.shape.len() != 1 || input.shape[0] != images.len() as i64 {
                return Err(bad(format!(
                    "BYTES input shape {:?} does not match its {} elements",
                    input.shape,
                    images.len()
                )));
            }
            let jobs = images.into_iter().map(|b| state.engine.classify(Some(&m.name), b, deadline));
            futures::stream::iter(jobs).buffered(ROWS_IN_FLIGHT).map_ok(|c| c.probabilities).try_collect().await?
        }
        Elements::Numbers(numbers) => {
            let s = m.input().size;
            if input.shape.len() != 4 || input.shape[1..] != [3, s, s] || input.shape[0] < 1 {
                return Err(bad(format!("FP32 input must have shape [N, 3, {s}, {s}], got {:?}", input.shape)));
            }
            let per = (3 * s * s) as usize;
            // Checked: a shape like [2^54, 3, 224, 224] must not wrap around to match empty data.
            let needed = usize::try_from(input.shape[0]).ok().and_then(|n| n.checked_mul(per));
            if needed != Some(numbers.len()) {
                return Err(bad(format!(
                    "FP32 input has {} values; shape {:?} needs {}",
                    numbers.len(),
                    input.shape,
                    needed.map(|n| n.to_string()).unwrap_or_else(|| "more than can be addressed".into())
                )));
            }
            let rows: Vec<Vec<f32>> = numbers.chunks(per).map(<[f32]>::to_vec).collect();
            let jobs = rows.into_iter().map(|c| state.engine.classify_tensor(Some(&m.name), c, deadline));
            futures::stream::iter(jobs).buffered(ROWS_IN_FLIGHT).try_collect().await?
        }
    };
    if outputs.is_empty() {
        outputs.push(RequestedOutput { name: "probabilities".into(), parameters: OutputParameters::default() });
    }
    let n = rows.len() as i64;
    let mut binary_out: Vec<u8> = Vec::new();
    let mut response_outputs = Vec::new();
    for o in &outputs {
        let as_binary = o.parameters.binary_data.unwrap_or(req.parameters.binary_data_output);
        let (datatype, shape, data) = match o.parameters.classification {
            Some(k) => {
                let k = k.clamp(1, m.num_classes());
                let strings: Vec<String> = rows
                    .iter()
                    .flat_map(|p| crate::engine::top_k(p, k))
                    .map(|(i, p)| format!("{p}:{i}:{}", m.classes().label(i)))
                    .collect();
                ("BYTES", vec![n, k as i64], OutputData::Strings(strings))
            }
            None => {
                ("FP32", vec![n, m.num_classes() as i64], OutputData::Numbers(rows.iter().flatten().copied().collect()))
            }
        };
        let (data, parameters) = if as_binary {
            let before = binary_out.len();
            match data {
                OutputData::Numbers(v) => v.iter().for_each(|x| binary_out.extend_from_slice(&x.to_le_bytes())),
                OutputData::Strings(v) => v.iter().for_each(|x| {
                    binary_out.extend_from_slice(&(x.len() as u32).to_le_bytes());
                    binary_out.extend_from_slice(x.as_bytes());
                }),
            }
            (None, Some(OutputDataSize { binary_data_size: binary_out.len() - before }))
        } else {
            (Some(data), None)
        };
        response_outputs.push(InferOutput { name: o.name.clone(), shape, datatype: datatype.into(), data, parameters });
    }
    let response =
        InferResponse { model_name: m.name.clone(), model_version: "1".into(), id: req.id, outputs: response_outputs };
    if binary_out.is_empty() {
        return Ok(Json(response).into_response());
    }
    let mut body = serde_json::to_vec(&response).map_err(|e| bad(e.to_string()))?;
    let header_len = body.len();
    body.extend_from_slice(&binary_out);
    let mut res = ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
    res.headers_mut().insert(HEADER_LENGTH, HeaderValue::from(header_len));
    Ok(res)
}

/// The JSON header and the binary data after it (none without the extension's header).
fn split_body(headers: &HeaderMap, body: Bytes) -> Result<(Bytes, Bytes), V2Error> {
    let Some(value) = headers.get(HEADER_LENGTH) else { return Ok((body, Bytes::new())) };
    let n: usize = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| bad("Inference-Header-Content-Length is not a number"))?;
    if n > body.len() {
        return Err(bad(format!("Inference-Header-Content-Length is {n} but the body has {} bytes", body.len())));
    }
    let json = body.slice(..n);
    Ok((json, body.slice(n..)))
}

/// The input's elements: its JSON `data`, or its share of the binary data.
fn elements(input: &InferInput, binary: Bytes) -> Result<Elements, V2Error> {
    match (&input.data, input.parameters.binary_data_size, input.datatype.as_str()) {
        (Some(_), Some(_), _) => Err(bad(format!("input {} has both `data` and binary_data_size", input.name))),
        (None, None, _) => Err(bad(format!("input {} has neither `data` nor binary data", input.name))),
        (None, Some(size), dt) => {
            if size != binary.len() as u64 {
                return Err(bad(format!(
                    "input {} declares {size} bytes of binary data; the body has {}",
                    input.name,
                    binary.len()
                )));
            }
            match dt {
                "FP32" => {
                    if !binary.len().is_multiple_of(4) {
                        return Err(bad("FP32 binary data is not a whole number of 4-byte floats"));
                    }
                    let v: Vec<f32> =
                        binary.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(bad("FP32 values must be finite"));
                    }
                    Ok(Elements::Numbers(v))
                }
                "BYTES" => {
                    let mut images = Vec::new();
                    let mut at = 0usize;
                    while at < binary.len() {
                        let len = binary
                            .get(at..at + 4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
                            .ok_or_else(|| bad("BYTES binary data ends inside an element's length"))?;
                        let end = at + 4 + len;
                        if end > binary.len() {
                            return Err(bad("a BYTES element runs past the binary data"));
                        }
                        images.push(binary.slice(at + 4..end));
                        at = end;
                    }
                    Ok(Elements::Images(images))
                }
                other => Err(bad(format!("datatype {other:?} is not supported: use BYTES or FP32"))),
            }
        }
        (Some(data), None, dt) => {
            if !binary.is_empty() {
                return Err(bad("binary data after the JSON header belongs to no input"));
            }
            match dt {
                "BYTES" => {
                    if data.strings.len() != data.len() {
                        return Err(bad("BYTES elements must be base64 strings"));
                    }
                    let images = data
                        .strings
                        .iter()
                        .map(|s| {
                            base64::engine::general_purpose::STANDARD
                                .decode(s)
                                .map(Bytes::from)
                                .map_err(|e| bad(format!("BYTES element is not base64: {e}")))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Elements::Images(images))
                }
                "FP32" => {
                    if data.numbers.len() != data.len() {
                        return Err(bad("FP32 data must be numbers"));
                    }
                    Ok(Elements::Numbers(data.numbers.clone()))
                }
                other => Err(bad(format!("datatype {other:?} is not supported: use BYTES or FP32"))),
            }
        }
    }
}
