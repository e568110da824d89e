//! Remote targets: models behind an Open Inference Protocol (KServe v2 / Triton) HTTP endpoint —
//! the model production calls. A [`Remote`] classifies images by asking that endpoint (with
//! `reqwest`), as `bytes` (the encoded image as a `BYTES` tensor, for servers that decode
//! themselves; base64 in JSON, or raw in Triton's binary tensor data) or as `fp32` (the tensor
//! preprocessed here as declared). Every way a remote can fail becomes a [`RemoteError`] for that
//! request only.

pub mod attack;
pub mod search;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;

use crate::model::bundle::{Bundle, IMAGENET};
use crate::model::{ClassList, InputSpec};

pub use crate::config::remotes::{RemoteConfig, RemoteInput, Scores};

impl std::fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.redacted();
        f.debug_struct("RemoteConfig")
            .field("name", &r.name)
            .field("url", &r.url)
            .field("model", &r.model)
            .field("version", &r.version)
            .field("input", &r.input)
            .field("input_name", &r.input_name)
            .field("output", &r.output)
            .field("scores", &r.scores)
            .field("binary_data", &r.binary_data)
            .field("description", &r.description)
            .field("classes", &r.classes)
            .field("headers", &r.headers)
            .field("timeout_ms", &r.timeout_ms)
            .field("max_concurrent", &r.max_concurrent)
            .field("queue_timeout_ms", &r.queue_timeout_ms)
            .field("ca_file", &r.ca_file)
            .finish()
    }
}

impl RemoteConfig {
    /// The entry as it may be shown (`labelfool config`, `Debug`): header values replaced by
    /// `<redacted>`, the URL without its credentials.
    pub fn redacted(&self) -> Self {
        let mut r = self.clone();
        r.url = redact_url(&r.url);
        r.headers.values_mut().for_each(|v| *v = "<redacted>".into());
        r
    }
}

/// `url` without the user name and password it may carry (`https://user:pass@host/` →
/// `https://host/`): what `/remotes`, errors and logs show. A URL that does not parse is not
/// shown at all, since where its credentials end cannot be told.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        // Shown as written when there is nothing to hide.
        Ok(u) if u.username().is_empty() && u.password().is_none() => url.to_string(),
        Ok(mut u) => {
            // Only fails for URLs that cannot have credentials (`data:`, …): nothing to remove.
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

/// A `[[remotes]]` entry that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("remotes.{remote}: {message}")]
pub struct RemoteConfigError {
    pub remote: String,
    pub message: String,
}

/// Why a remote could not answer; `http::error` maps these to 502 / 504.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    #[error("unknown remote {0:?}")]
    Unknown(String),
    #[error("remote {remote}: no answer within {timeout_ms} ms")]
    Timeout { remote: String, timeout_ms: u64 },
    #[error("remote {remote}: cannot connect: {message}")]
    Connect { remote: String, message: String },
    #[error("remote {remote} answered {status}: {message}")]
    Status { remote: String, status: u16, message: String },
    #[error("remote {remote} answered something that is not an inference response: {message}")]
    Malformed { remote: String, message: String },
    /// The request failed after connecting (the connection closed without an answer, …).
    #[error("remote {remote}: the request failed: {message}")]
    Transport { remote: String, message: String },
    #[error("remote {remote}: {message}")]
    Input { remote: String, message: String },
    /// A 3xx: not followed, so the configured headers (credentials) never go anywhere but `url`.
    #[error(
        "remote {remote} answered {status}, a redirect to {location}; redirects are not followed (they would carry \
         the remote's headers elsewhere): set its `url` to where it points"
    )]
    Redirect { remote: String, status: u16, location: String },
    /// Every slot of the remote stayed taken for `queue_timeout_ms`.
    #[error("remote {remote} is busy: all {slots} of its request slots stayed taken for {waited_ms} ms")]
    Busy { remote: String, slots: usize, waited_ms: u64 },
}

impl RemoteError {
    fn metric_outcome(&self) -> &'static str {
        match self {
            Self::Unknown(_) => "unknown",
            Self::Timeout { .. } => "timeout",
            Self::Connect { .. } => "connect",
            Self::Status { .. } => "status",
            Self::Malformed { .. } => "malformed",
            Self::Transport { .. } => "transport",
            Self::Input { .. } => "input",
            Self::Redirect { .. } => "redirect",
            Self::Busy { .. } => "busy",
        }
    }
}

/// A remote's answer for one image.
#[derive(Debug, Clone)]
pub struct RemoteScores {
    pub probabilities: Vec<f32>,
    pub elapsed: Duration,
}

/// A configured remote target.
#[derive(Debug)]
pub struct Remote {
    pub config: RemoteConfig,
    pub classes: ClassList,
    /// For `fp32`: the preprocessing the tensor gets here.
    pub spec: Option<InputSpec>,
    http: reqwest::Client,
    slots: tokio::sync::Semaphore,
}

/// Every configured remote, by name.
#[derive(Debug, Default)]
pub struct Remotes {
    remotes: Vec<Arc<Remote>>,
}

/// Where `remote:<name>` is written, the name.
pub fn remote_name(s: &str) -> Option<&str> {
    s.strip_prefix("remote:")
}

impl Remotes {
    /// No remote targets.
    pub fn none() -> Self {
        Self { remotes: Vec::new() }
    }

    pub fn from_configs(configs: &[RemoteConfig]) -> Result<Self, RemoteConfigError> {
        let mut remotes = Vec::new();
        for c in configs {
            if remotes.iter().any(|r: &Arc<Remote>| r.config.name == c.name) {
                return Err(RemoteConfigError { remote: c.name.clone(), message: "configured twice".into() });
            }
            remotes.push(Arc::new(Remote::new(c.clone())?));
        }
        Ok(Self { remotes })
    }

    pub fn get(&self, name: &str) -> Result<Arc<Remote>, RemoteError> {
        self.remotes.iter().find(|r| r.config.name == name).cloned().ok_or_else(|| RemoteError::Unknown(name.into()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Remote>> {
        self.remotes.iter()
    }
}

/// An error with its causes: reqwest's own message names only the URL (or "builder error"); the
/// causes say what happened (a refused connection, an unknown certificate issuer, …).
fn causes(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}

impl Remote {
    pub fn new(config: RemoteConfig) -> Result<Self, RemoteConfigError> {
        let bad = |message: String| RemoteConfigError { remote: config.name.clone(), message };
        // The URL may hold credentials: an error shows it redacted, or not at all when it does
        // not parse.
        let url = reqwest::Url::parse(&config.url).map_err(|e| bad(format!("url: {e}")))?;
        let shown = redact_url(&config.url);
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!("url {shown:?}: the scheme must be http or https")));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(format!("url {shown:?}: no query or fragment (the protocol's paths are appended to it)")));
        }
        if config.max_concurrent == 0 || config.timeout_ms == 0 {
            return Err(bad("max_concurrent and timeout_ms must be ≥ 1".into()));
        }
        let classes = if config.classes == IMAGENET {
            crate::model::bundle::imagenet_classes()
        } else {
            let path = crate::config::expand_path(&config.classes).map_err(|e| bad(e.to_string()))?;
            Bundle::read_classes(std::path::Path::new("."), &path.to_string_lossy()).map_err(|e| bad(e.to_string()))?
        };
        let spec = match (config.input, &config.description) {
            (RemoteInput::Fp32, Some(d)) => {
                let size = d.size.ok_or_else(|| bad("fp32 input needs description.size".into()))?;
                Some(d.input_spec(size))
            }
            (RemoteInput::Fp32, None) => return Err(bad("fp32 input needs description = { size = … }".into())),
            (RemoteInput::Bytes, _) => None,
        };
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &config.headers {
            let name =
                reqwest::header::HeaderName::try_from(k.as_str()).map_err(|e| bad(format!("header {k:?}: {e}")))?;
            let mut value =
                reqwest::header::HeaderValue::try_from(v.as_str()).map_err(|e| bad(format!("header {k:?}: {e}")))?;
            // Credentials: kept out of `Debug` (and so out of any log of the client).
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let mut builder = reqwest::Client::builder();
        if url.scheme() == "http" {
            if config.ca_file.is_some() {
                return Err(bad("ca_file is for an https url".into()));
            }
            // No TLS: no need for the system's CA certificates (a host may have none).
            builder = builder.tls_certs_only([]);
        }
        if let Some(file) = &config.ca_file {
            let path = crate::config::expand_path(file).map_err(|e| bad(e.to_string()))?;
            let pem = std::fs::read(&path).map_err(|e| bad(format!("ca_file {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(format!("ca_file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(bad(format!("ca_file {}: no PEM certificate in it", path.display())));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            // A redirect would carry the configured headers to wherever it points (reqwest drops
            // only `Authorization` and cookies on another host); a 3xx is an error instead.
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers)
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| bad(causes(&e)))?;
        let slots = tokio::sync::Semaphore::new(config.max_concurrent);
        Ok(Self { config, classes, spec, http, slots })
    }

    fn model_path(&self) -> String {
        let base = self.config.url.trim_end_matches('/');
        match &self.config.version {
            Some(v) => format!("{base}/v2/models/{}/versions/{v}", self.config.model),
            None => format!("{base}/v2/models/{}", self.config.model),
        }
    }

    fn error(&self, e: reqwest::Error) -> RemoteError {
        let remote = self.config.name.clone();
        let (timeout, connect) = (e.is_timeout(), e.is_connect());
        // reqwest names the URL it asked; shown here without credentials.
        let url = e.url().map(|u| redact_url(u.as_str()));
        let message = match url {
            Some(url) => format!("{} (url {url})", causes(&e.without_url())),
            None => causes(&e),
        };
        if timeout {
            RemoteError::Timeout { remote, timeout_ms: self.config.timeout_ms }
        } else if connect {
            RemoteError::Connect { remote, message }
        } else {
            RemoteError::Transport { remote, message }
        }
    }

    /// A 3xx answer as the error it is (redirects are not followed).
    fn redirect(&self, res: &reqwest::Response) -> Option<RemoteError> {
        if !res.status().is_redirection() {
            return None;
        }
        let location = match res.headers().get(reqwest::header::LOCATION).map(|l| l.to_str()) {
            None => "(no Location)".to_string(),
            Some(Ok(l)) => {
                res.url().join(l).map_or_else(|_| "(an unreadable Location)".into(), |u| redact_url(u.as_str()))
            }
            Some(Err(_)) => "(an unreadable Location)".to_string(),
        };
        Some(RemoteError::Redirect { remote: self.config.name.clone(), status: res.status().as_u16(), location })
    }

    /// The largest answer read from the remote: its scores as JSON text (a few dozen bytes a
    /// class) with room to spare; a larger answer is refused, not buffered.
    fn response_limit(&self) -> usize {
        (64 * self.classes.len()).max(1 << 20)
    }

    /// The answer's body, read up to [`Self::response_limit`].
    async fn read_body(&self, mut res: reqwest::Response) -> Result<Vec<u8>, RemoteError> {
        let limit = self.response_limit();
        let too_large = || RemoteError::Malformed {
            remote: self.config.name.clone(),
            message: format!("the answer is larger than {limit} bytes"),
        };
        if res.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| self.error(e))? {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Whether the remote says the model is ready (`GET …/ready`).
    pub async fn health(&self) -> Result<(), RemoteError> {
        let res = self.http.get(format!("{}/ready", self.model_path())).send().await.map_err(|e| self.error(e))?;
        if let Some(e) = self.redirect(&res) {
            return Err(e);
        }
        match res.status().as_u16() {
            200 => Ok(()),
            status => Err(RemoteError::Status {
                remote: self.config.name.clone(),
                status,
                message: self.read_body(res).await.map(|b| protocol_message(&b)).unwrap_or_else(|e| e.to_string()),
            }),
        }
    }

    /// The remote's class probabilities for an encoded image (`bytes`) or its preprocessed
    /// tensor (`fp32`, `3×S×S` in [0,1] before the declared normalisation).
    pub async fn classify(&self, image: Bytes, tensor: Option<Vec<f32>>) -> Result<RemoteScores, RemoteError> {
        let started = Instant::now();
        let result = self.infer(image, tensor).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.metric_outcome(),
        };
        metrics::counter!("labelfool_remote_requests_total", "remote" => self.config.name.clone(), "outcome" => outcome)
            .increment(1);
        result.map(|probabilities| RemoteScores { probabilities, elapsed: started.elapsed() })
    }

    /// One of the remote's `max_concurrent` slots, waited for at most `queue_timeout_ms`.
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, RemoteError> {
        let wait = Duration::from_millis(self.config.queue_timeout_ms);
        match tokio::time::timeout(wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(RemoteError::Input {
                remote: self.config.name.clone(),
                message: "the server is shutting down".into(),
            }),
            Err(_) => Err(RemoteError::Busy {
                remote: self.config.name.clone(),
                slots: self.config.max_concurrent,
                waited_ms: self.config.queue_timeout_ms,
            }),
        }
    }

    async fn infer(&self, image: Bytes, tensor: Option<Vec<f32>>) -> Result<Vec<f32>, RemoteError> {
        let _slot = self.slot().await?;
        let url = format!("{}/infer", self.model_path());
        let outputs =
            self.config.output.as_ref().map(|o| serde_json::json!([{"name": o, "parameters": {"binary_data": false}}]));
        let mut req = self.http.post(&url);
        req = match (self.config.input, tensor) {
            (RemoteInput::Bytes, _) if self.config.binary_data => {
                let name = self.config.input_name.as_deref().unwrap_or("image");
                let mut header = serde_json::json!({"inputs": [{"name": name, "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": image.len() + 4}}]});
                if let Some(o) = &outputs {
                    header["outputs"] = o.clone();
                }
                let mut body = serde_json::to_vec(&header).unwrap_or_default();
                let json_len = body.len();
                body.extend_from_slice(&(image.len() as u32).to_le_bytes());
                body.extend_from_slice(&image);
                req.header("Inference-Header-Content-Length", json_len)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body)
            }
            (RemoteInput::Bytes, _) => {
                let name = self.config.input_name.as_deref().unwrap_or("image");
                let mut body = serde_json::json!({"inputs": [{"name": name, "shape": [1], "datatype": "BYTES",
                    "data": [base64::engine::general_purpose::STANDARD.encode(&image)]}]});
                if let Some(o) = &outputs {
                    body["outputs"] = o.clone();
                }
                req.json(&body)
            }
            (RemoteInput::Fp32, Some(t)) => {
                let s = self.spec.as_ref().map_or(0, |s| s.size);
                let name = self.config.input_name.as_deref().unwrap_or("input");
                let t = normalise(t, self.spec.as_ref());
                let mut body = serde_json::json!({"inputs": [{"name": name, "shape": [1, 3, s, s], "datatype": "FP32", "data": t}]});
                if let Some(o) = &outputs {
                    body["outputs"] = o.clone();
                }
                req.json(&body)
            }
            (RemoteInput::Fp32, None) => {
                return Err(RemoteError::Input {
                    remote: self.config.name.clone(),
                    message: "fp32 input needs the preprocessed tensor".into(),
                });
            }
        };
        let res = req.send().await.map_err(|e| self.error(e))?;
        if let Some(e) = self.redirect(&res) {
            return Err(e);
        }
        let status = res.status().as_u16();
        let body = self.read_body(res).await?;
        if status != 200 {
            return Err(RemoteError::Status {
                remote: self.config.name.clone(),
                status,
                message: protocol_message(&body),
            });
        }
        self.scores(&body)
    }

    /// The output's scores as probabilities, checked against the class list.
    fn scores(&self, body: &[u8]) -> Result<Vec<f32>, RemoteError> {
        let malformed = |message: String| RemoteError::Malformed { remote: self.config.name.clone(), message };
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| malformed(format!("not JSON ({e}): {}", snippet(body))))?;
        let outputs = v["outputs"].as_array().ok_or_else(|| malformed(format!("no `outputs`: {}", snippet(body))))?;
        let output = match &self.config.output {
            Some(name) => outputs.iter().find(|o| o["name"] == name.as_str()),
            None => outputs.first(),
        }
        .ok_or_else(|| malformed(format!("no output {:?}", self.config.output.as_deref().unwrap_or("(any)"))))?;
        let mut values = Vec::new();
        flatten_numbers(&output["data"], &mut values, 0).map_err(malformed)?;
        let n = self.classes.len();
        if values.len() != n {
            return Err(malformed(format!(
                "output {} has {} values (shape {}); the class list has {n}",
                output["name"],
                values.len(),
                output["shape"]
            )));
        }
        if values.iter().any(|x| !x.is_finite()) {
            return Err(malformed("the scores are not all finite".into()));
        }
        Ok(match self.config.scores {
            Scores::Probabilities => values,
            Scores::Logits => softmax(&values),
        })
    }
}

/// `(x − mean) / std` per channel of a CHW tensor, when declared.
fn normalise(mut t: Vec<f32>, spec: Option<&InputSpec>) -> Vec<f32> {
    if let Some((mean, std)) = spec.and_then(|s| s.mean.zip(s.std)) {
        let plane = t.len() / 3;
        for (c, chunk) in t.chunks_mut(plane.max(1)).enumerate().take(3) {
            chunk.iter_mut().for_each(|x| *x = (*x - mean[c]) / std[c]);
        }
    }
    t
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = v.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

fn flatten_numbers(v: &serde_json::Value, out: &mut Vec<f32>, depth: usize) -> Result<(), String> {
    match v {
        serde_json::Value::Array(items) if depth < 8 => {
            items.iter().try_for_each(|i| flatten_numbers(i, out, depth + 1))
        }
        serde_json::Value::Number(n) => {
            out.push(n.as_f64().unwrap_or(f64::NAN) as f32);
            Ok(())
        }
        other => Err(format!("output data holds {} where numbers belong", snippet(other.to_string().as_bytes()))),
    }
}

/// The message of an error body: the protocol's `{"error": "…"}`, else the text.
fn protocol_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| match &v["error"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("message").and_then(|m| m.as_str()).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| snippet(body))
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    if body.len() > 200 { format!("{s}…") } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_scores() {
        assert_eq!(protocol_message(br#"{"error": "no such model"}"#), "no such model");
        assert_eq!(protocol_message(br#"{"error": {"message": "m"}}"#), "m");
        assert_eq!(protocol_message(b"<html>bad gateway</html>"), "<html>bad gateway</html>");
        let p = softmax(&[1.0, 1.0, 1.0 + 2f32.ln()]);
        assert!((p[2] - 0.5).abs() < 1e-6 && (p[0] - 0.25).abs() < 1e-6);
        let mut out = Vec::new();
        flatten_numbers(&serde_json::json!([[0.1, 0.2], [0.7]]), &mut out, 0).unwrap();
        assert_eq!(out, vec![0.1, 0.2, 0.7]);
        assert!(flatten_numbers(&serde_json::json!(["a"]), &mut Vec::new(), 0).is_err());
        let t = normalise(
            vec![1.0, 0.5, 0.0],
            Some(&InputSpec {
                size: 1,
                resize_short_side: 1,
                crop: "center".into(),
                interpolation: "bilinear-antialias".into(),
                channels: "RGB".into(),
                range: [0.0, 1.0],
                mean: Some([0.5; 3]),
                std: Some([0.5; 3]),
            }),
        );
        assert_eq!(t, vec![1.0, 0.0, -1.0]);
    }

    fn remote(entry: &str) -> Result<Remote, RemoteConfigError> {
        Remote::new(toml::from_str(&format!("name = \"r\"\nmodel = \"m\"\n{entry}")).unwrap())
    }

    #[test]
    fn http_and_https_urls_and_ca_files() {
        assert!(remote("url = \"http://triton:8000\"").is_ok());
        assert!(remote("url = \"https://triton:8443\"").is_ok());
        let refused = |entry: &str, says: &str| {
            let e = remote(entry).err().unwrap_or_else(|| panic!("{entry} accepted"));
            assert!(e.to_string().contains(says), "{entry}: {e}");
        };
        refused("url = \"ftp://triton\"", "http or https");
        refused("url = \"http://triton\"\nca_file = \"/etc/ca.pem\"", "ca_file is for an https url");
        refused("url = \"https://triton\"\nca_file = \"/nonexistent/ca.pem\"", "ca_file /nonexistent/ca.pem");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        refused(&format!("url = \"https://triton\"\nca_file = \"{}\"", junk.display()), "ca_file");
        refused("url = \"http://triton:8000/?key=k\"", "no query or fragment");
    }

    #[test]
    fn credentials_are_never_shown() {
        assert_eq!(redact_url("https://alice:s3cret@triton:8443/base"), "https://triton:8443/base");
        assert_eq!(redact_url("http://alice@triton"), "http://triton/");
        assert_eq!(redact_url("http://triton:8000"), "http://triton:8000");
        assert_eq!(redact_url("not a url s3cret"), "<unparseable url>");
        let r = remote(
            "url = \"http://alice:pw-s3cret@triton:8000\"\n[headers]\nAuthorization = \"Bearer tok-s3cret\"\nX-Api-Key = \"key-s3cret\"",
        )
        .unwrap();
        // The remote (its config and its HTTP client's default headers) in a log line.
        let shown = format!("{r:?} {:?} {:?}", r.config, r.config.redacted());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("Authorization") && shown.contains("triton:8000"), "{shown}");
        // A URL that does not parse is not echoed in the error either.
        let e = remote("url = \"http://alice:pw-s3cret@triton:notaport\"").err().unwrap();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[tokio::test]
    async fn waiting_for_a_slot_is_bounded() {
        let r = remote("url = \"http://triton:8000\"\nmax_concurrent = 1\nqueue_timeout_ms = 50").unwrap();
        let held = r.slot().await.unwrap();
        let started = Instant::now();
        let e = r.slot().await.err().unwrap();
        assert!(matches!(e, RemoteError::Busy { slots: 1, waited_ms: 50, .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(held);
        assert!(r.slot().await.is_ok());
        assert_eq!(remote("url = \"http://triton:8000\"").unwrap().config.queue_timeout_ms, 30_000);
    }
}
