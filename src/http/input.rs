//! Image requests arrive three ways: multipart (field `image`), a raw body (`image/*`,
//! `application/octet-stream`) or JSON (`{"image": "<base64>"}`). Parameters come from the query
//! string, other multipart fields or other JSON keys. [`ImageRequest`] folds all of that into bytes
//! plus a string map, and [`Params`] parses values with errors that name the parameter.

use std::collections::BTreeMap;
use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;
use base64::Engine as _;

use super::error::ApiError;

/// Parameters of one request, whichever part of it they came from.
#[derive(Debug, Default, Clone)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    pub fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| ApiError::bad_request("bad_query", format!("cannot parse the query string: {e}")))?;
        let mut params = Self::default();
        for (k, v) in pairs {
            params.insert(k, v)?;
        }
        Ok(params)
    }

    /// A parameter may be given once, in one place: a second value (repeated in the query, or in
    /// both the query and the body) is an error, never a silent choice.
    fn insert(&mut self, key: String, value: String) -> Result<(), ApiError> {
        if self.0.contains_key(&key) {
            return Err(ApiError::invalid(&key, "given more than once"));
        }
        self.0.insert(key, value);
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str).map(str::trim).filter(|v| !v.is_empty())
    }

    /// `Ok(None)` when absent; 422 naming `key` when present but not a `T`.
    pub fn parse<T: FromStr>(&self, key: &str) -> Result<Option<T>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::invalid(key, format!("{v:?} is not a valid {}", type_name::<T>()))),
        }
    }

    /// A float that must be finite.
    pub fn finite(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.parse::<f64>(key)? {
            Some(v) if !v.is_finite() => Err(ApiError::invalid(key, format!("{v} is not a finite number"))),
            other => Ok(other),
        }
    }

    /// A comma-separated list of finite numbers (one number is a list of one).
    pub fn finite_list(&self, key: &str) -> Result<Option<Vec<f64>>, ApiError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.split(',')
            .map(|x| x.trim().parse::<f64>().ok().filter(|x| x.is_finite()))
            .collect::<Option<Vec<f64>>>()
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(key, format!("{v:?} is not a number or a comma-separated list of numbers"))
            })
    }

    /// Rejects keys a route does not know, so that a typo (`max_iters`) is not silently ignored.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => Err(ApiError::invalid(k, format!("unknown parameter; this route takes {}", allowed.join(", ")))),
        }
    }
}

fn type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    match full {
        "u32" | "u64" | "usize" => "non-negative integer",
        "f64" | "f32" => "number",
        "bool" => "boolean",
        _ => full.rsplit("::").next().unwrap_or(full),
    }
}

/// The image and parameters of a classify / target-label / attack request.
pub struct ImageRequest {
    pub bytes: Bytes,
    pub params: Params,
}

impl<S: Send + Sync> FromRequest<S> for ImageRequest {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let mut params = Params::from_query(req.uri().query())?;
        let content_type =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let mime: Option<mime::Mime> = content_type.parse().ok();
        let essence = mime.as_ref().map(|m| m.essence_str().to_string()).unwrap_or_default();
        let bytes = match essence.as_str() {
            "multipart/form-data" => {
                let mut mp =
                    Multipart::from_request(req, state).await.map_err(|e| body_error(e.status(), e.body_text()))?;
                let mut image = None;
                while let Some(field) = mp.next_field().await.map_err(|e| body_error(e.status(), e.body_text()))? {
                    let name = field.name().unwrap_or("").to_string();
                    let data = field.bytes().await.map_err(|e| body_error(e.status(), e.body_text()))?;
                    if name == "image" {
                        if image.replace(data).is_some() {
                            return Err(ApiError::invalid("image", "given more than once; send one image"));
                        }
                    } else {
                        let text = String::from_utf8(data.to_vec())
                            .map_err(|_| ApiError::invalid(&name, "form field is not UTF-8 text"))?;
                        params.insert(name, text)?;
                    }
                }
                image
                    .ok_or_else(|| ApiError::bad_request("missing_image", "the multipart body has no `image` field"))?
            }
            "application/json" => {
                let body = Bytes::from_request(req, state).await.map_err(|e| body_error(e.status(), e.body_text()))?;
                let Entries(map) = serde_json::from_slice(&body)
                    .map_err(|e| ApiError::bad_request("bad_json", format!("the JSON body cannot be parsed: {e}")))?;
                let mut image = None;
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("image", serde_json::Value::String(b64)) => {
                            if image.replace(decode_base64(&b64)?).is_some() {
                                return Err(ApiError::invalid("image", "given more than once; send one image"));
                            }
                        }
                        ("image", _) => {
                            return Err(ApiError::bad_request("bad_json", "`image` must be a base64 string"));
                        }
                        (_, serde_json::Value::Null) => {}
                        (_, serde_json::Value::String(s)) => params.insert(k, s)?,
                        (_, v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                            params.insert(k, v.to_string())?
                        }
                        (_, _) => {
                            return Err(ApiError::invalid(&k, "must be a string, number or boolean"));
                        }
                    }
                }
                image.ok_or_else(|| ApiError::bad_request("missing_image", "the JSON body has no `image` field"))?
            }
            e if e.starts_with("image/") || e == "application/octet-stream" => {
                Bytes::from_request(req, state).await.map_err(|e| body_error(e.status(), e.body_text()))?
            }
            // The body was read (bounded) by `limits::buffer_body` before this: nothing to drain.
            "" if content_type.is_empty() => {
                return Err(ApiError::unsupported_media(
                    "no Content-Type: send multipart/form-data (field `image`), image/*, or application/json",
                ));
            }
            _ => {
                return Err(ApiError::unsupported_media(format!(
                    "Content-Type {content_type:?} is not accepted: send multipart/form-data (field `image`), image/*, or application/json"
                )));
            }
        };
        Ok(Self { bytes, params })
    }
}

/// A JSON object's entries in order, duplicates kept (serde_json's map keeps the last silently).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

fn decode_base64(s: &str) -> Result<Bytes, ApiError> {
    // Tolerate a data URL prefix (`data:image/png;base64,`), whitespace and missing padding.
    let payload = s.split_once("base64,").map(|(_, p)| p).unwrap_or(s);
    let clean: String = payload.chars().filter(|c| !c.is_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(clean.as_bytes())
        .map(Bytes::from)
        .map_err(|e| ApiError::bad_request("bad_base64", format!("`image` is not valid base64: {e}")))
}

/// Body-reading failures from axum: over the size limit → 413, anything else → 400.
fn body_error(status: axum::http::StatusCode, text: String) -> ApiError {
    if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(format!("the request body is over the size limit: {text}"))
    } else {
        ApiError::bad_request("bad_body", text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse_and_name_the_culprit() {
        let p = Params::from_query(Some("top_k=5&overshoot=nan&max_iter=x&model=")).unwrap();
        assert_eq!(p.parse::<usize>("top_k").unwrap(), Some(5));
        assert_eq!(p.get("model"), None, "empty counts as absent");
        let e = p.parse::<u32>("max_iter").unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (422, Some("max_iter")));
        assert_eq!(p.finite("overshoot").unwrap_err().param.as_deref(), Some("overshoot"));
        assert_eq!(p.only(&["top_k", "model"]).unwrap_err().param.as_deref(), Some("max_iter"));
    }

    #[test]
    fn a_parameter_given_twice_is_refused() {
        let e = Params::from_query(Some("top_k=3&top_k=5")).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (422, Some("top_k")));
        let mut p = Params::from_query(Some("top_k=3")).unwrap();
        assert!(p.insert("top_k".into(), "4".into()).is_err(), "query and body both");
        let Entries(e) = serde_json::from_str(r#"{"a": 1, "a": 2}"#).unwrap();
        assert_eq!(e.len(), 2, "duplicate JSON keys are seen");
    }

    #[test]
    fn base64_variants() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(decode_base64("data:image/png;base64,aGVs\nbG8").unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(decode_base64("!!!").unwrap_err().code, "bad_base64");
    }
}
