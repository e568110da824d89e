//! Image requests arrive three ways: multipart (field `image`), a raw body (`image/*`,
//! `application/octet-stream`) or JSON (`{"image": "<base64>"}`). Parameters come from the query
//! string, other multipart fields or other JSON keys. [`ImageRequest`] folds all of that into the
//! image's bytes plus the route's parameter struct; [`Params`] does the same for a query string
//! alone. Each route has one such struct: serde parses it and utoipa documents it (`IntoParams`),
//! so a field removed there is gone from both, and a bad value is a 422 that names the parameter.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Multipart, Request};
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use utoipa::IntoParams;

use super::error::ApiError;

/// A route's parameters: one struct that serde parses and utoipa documents.
pub trait RouteParams: DeserializeOwned + IntoParams {}
impl<T: DeserializeOwned + IntoParams> RouteParams for T {}

/// The parameters of one request as text, whichever part of it they came from.
#[derive(Debug, Default, Clone)]
struct Fields(BTreeMap<String, String>);

impl Fields {
    fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| ApiError::bad_request("bad_query", format!("cannot parse the query string: {e}")))?;
        let mut fields = Self::default();
        for (k, v) in pairs {
            fields.insert(k, v)?;
        }
        Ok(fields)
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

    /// Into the route's struct. A key the struct does not document is refused (a typo such as
    /// `max_iters` is never silently ignored); an empty value counts as absent; a value serde
    /// cannot read is a 422 naming its key.
    fn parse<P: RouteParams>(&self) -> Result<P, ApiError> {
        let documented = P::into_params(|| Some(utoipa::openapi::path::ParameterIn::Query));
        let names: Vec<&str> = documented.iter().map(|p| p.name.as_str()).collect();
        if let Some(k) = self.0.keys().find(|k| !names.contains(&k.as_str())) {
            return Err(ApiError::invalid(k, format!("unknown parameter; this route takes {}", names.join(", "))));
        }
        let present: Vec<(&str, &str)> =
            self.0.iter().map(|(k, v)| (k.as_str(), v.trim())).filter(|(_, v)| !v.is_empty()).collect();
        let required = documented.iter().filter(|p| matches!(p.required, utoipa::openapi::Required::True));
        if let Some(missing) = required.map(|p| p.name.as_str()).find(|n| !present.iter().any(|(k, _)| k == n)) {
            return Err(ApiError::invalid(missing, "required"));
        }
        let encoded = serde_urlencoded::to_string(&present)
            .map_err(|e| ApiError::bad_request("bad_query", format!("cannot encode the parameters: {e}")))?;
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(encoded.as_bytes()));
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            match present.iter().find(|(k, _)| *k == key) {
                Some((_, v)) => ApiError::invalid(&key, format!("{v:?} is not valid here: {}", e.inner())),
                None => ApiError::invalid(&key, e.inner().to_string()),
            }
        })
    }
}

/// A number that must be finite: `nan` and `inf` parse as floats but mean nothing here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finite(pub f64);

impl<'de> Deserialize<'de> for Finite {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if v.is_finite() { Ok(Self(v)) } else { Err(serde::de::Error::custom(format!("{v} is not a finite number"))) }
    }
}

/// A comma-separated list of finite numbers (one number is a list of one).
#[derive(Debug, Clone, PartialEq)]
pub struct FiniteList(pub Vec<f64>);

impl<'de> Deserialize<'de> for FiniteList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.split(',')
            .map(|x| x.trim().parse::<f64>().ok().filter(|x| x.is_finite()))
            .collect::<Option<Vec<f64>>>()
            .map(Self)
            .ok_or_else(|| serde::de::Error::custom("not a number or a comma-separated list of numbers"))
    }
}

/// `Option<Finite>` → `Option<f64>`.
pub fn finite(v: Option<Finite>) -> Option<f64> {
    v.map(|Finite(x)| x)
}

/// A route's parameters from the query string alone (`GET`, `DELETE`).
pub struct Params<P>(pub P);

impl<S: Send + Sync, P: RouteParams> FromRequestParts<S> for Params<P> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Fields::from_query(parts.uri.query())?.parse().map(Self)
    }
}

/// The image and parameters of a classify / target-label / attack request.
pub struct ImageRequest<P> {
    pub bytes: Bytes,
    pub params: P,
}

impl<S: Send + Sync, P: RouteParams> FromRequest<S> for ImageRequest<P> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let mut params = Fields::from_query(req.uri().query())?;
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
        Ok(Self { bytes, params: params.parse()? })
    }
}

/// The body's documentation, made from the route's parameter struct: the image beside the same
/// parameters the query string takes (one schema for the multipart and the JSON form).
impl<P: RouteParams> utoipa::PartialSchema for ImageRequest<P> {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let image = ObjectBuilder::new().schema_type(Type::String).description(Some(
            "The image (PNG, JPEG, WebP, GIF, BMP or TIFF): the file in multipart/form-data, its base64 in JSON \
             (a `data:` URL prefix is accepted)",
        ));
        let mut body = ObjectBuilder::new().property("image", image).required("image");
        for p in P::into_params(|| Some(utoipa::openapi::path::ParameterIn::Query)) {
            let Some(mut schema) = p.schema else { continue };
            if let utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(o)) = &mut schema {
                o.description = o.description.take().or(p.description);
            }
            body = body.property(p.name, schema);
        }
        utoipa::openapi::RefOr::T(body.into())
    }
}

impl<P: RouteParams> utoipa::ToSchema for ImageRequest<P> {
    fn name() -> std::borrow::Cow<'static, str> {
        let full = std::any::type_name::<P>();
        format!("ImageRequest_{}", full.rsplit("::").next().unwrap_or(full)).into()
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

    #[derive(Debug, Deserialize, IntoParams)]
    #[allow(dead_code)] // the test reads some fields only through Debug
    struct Demo {
        top_k: Option<usize>,
        model: Option<String>,
        max_iter: Option<u32>,
        #[param(value_type = Option<f64>)]
        overshoot: Option<Finite>,
        #[param(value_type = Option<String>)]
        epsilon: Option<FiniteList>,
    }

    fn demo(q: &str) -> Result<Demo, ApiError> {
        Fields::from_query(Some(q))?.parse::<Demo>()
    }

    #[test]
    fn params_parse_and_name_the_culprit() {
        let d = demo("top_k=5&model=&epsilon=0.1,%202").unwrap();
        assert_eq!((d.top_k, d.model.as_deref()), (Some(5), None), "empty counts as absent");
        assert_eq!(d.epsilon, Some(FiniteList(vec![0.1, 2.0])));
        for (q, culprit) in [
            ("max_iter=x", "max_iter"),
            ("max_iter=-1", "max_iter"),
            ("overshoot=nan", "overshoot"),
            ("overshoot=inf", "overshoot"),
            ("epsilon=0.1,x", "epsilon"),
            ("top_k=1&max_iters=3", "max_iters"),
        ] {
            let e = demo(q).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (422, Some(culprit)), "{q}: {}", e.message);
        }
        assert!(demo("max_iters=3").unwrap_err().message.contains("max_iter, overshoot"), "the known names are listed");
    }

    #[test]
    fn a_parameter_given_twice_is_refused() {
        let e = Fields::from_query(Some("top_k=3&top_k=5")).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (422, Some("top_k")));
        let mut p = Fields::from_query(Some("top_k=3")).unwrap();
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
