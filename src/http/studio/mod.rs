//! The studio: a web page served by the binary itself (its HTML, script, style and three sample
//! images are compiled in). It calls only the public JSON API — with the API key the user types
//! in — so everything it shows is what the API returns.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/studio.js");
const STYLE: &str = include_str!("assets/studio.css");
const OBSERVE: &str = include_str!("assets/observe.html");
const OBSERVE_SCRIPT: &str = include_str!("assets/observe.js");

/// The bundled sample images (name, JPEG bytes).
pub const SAMPLES: &[(&str, &[u8])] = &[
    ("zebra", include_bytes!("assets/samples/zebra.jpg")),
    ("tench", include_bytes!("assets/samples/tench.jpg")),
    ("siberian-husky", include_bytes!("assets/samples/siberian-husky.jpg")),
];

fn asset(mime: &'static str, body: &'static [u8]) -> Response {
    let mut res = body.into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    res.headers_mut().insert(header::CONTENT_SECURITY_POLICY, STUDIO_CSP.clone());
    res
}

/// The page talks to this origin only. A job's report opens in a `blob:` tab, which keeps this
/// policy: its one stylesheet is allowed by hash.
static STUDIO_CSP: std::sync::LazyLock<HeaderValue> = std::sync::LazyLock::new(|| {
    let csp = format!(
        "default-src 'self'; img-src 'self' data: blob:; connect-src 'self' blob:; style-src 'self' {}",
        *super::report::STYLE_SOURCE
    );
    HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static("default-src 'self'"))
});

/// The studio: a web page to classify, see LabelFool's decision, run the attacks side by side
/// and follow jobs. Public, like `/health` (it holds no data; the API calls it makes carry the
/// key the user types in).
#[utoipa::path(get, path = "/studio", tag = "studio",
    responses((status = 200, content_type = "text/html", description = "the page")))]
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX.as_bytes())
}

/// The studio's script.
#[utoipa::path(get, path = "/studio/studio.js", tag = "studio",
    responses((status = 200, content_type = "text/javascript", description = "the script")))]
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT.as_bytes())
}

/// The page a study's observer opens from their link (`/observe/{token}`).
pub fn observer_page() -> Response {
    asset("text/html; charset=utf-8", OBSERVE.as_bytes())
}

/// The observer page's script.
#[utoipa::path(get, path = "/studio/observe.js", tag = "studio",
    responses((status = 200, content_type = "text/javascript", description = "the script")))]
pub async fn observer_script() -> Response {
    asset("text/javascript; charset=utf-8", OBSERVE_SCRIPT.as_bytes())
}

/// The studio's style sheet.
#[utoipa::path(get, path = "/studio/studio.css", tag = "studio",
    responses((status = 200, content_type = "text/css", description = "the style sheet")))]
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE.as_bytes())
}

/// A bundled sample image (`zebra.jpg`, `tench.jpg`, `siberian-husky.jpg`).
#[utoipa::path(get, path = "/studio/samples/{name}", tag = "studio", params(("name" = String, Path)),
    responses((status = 200, content_type = "image/jpeg", description = "the image"), (status = 404, description = "no such sample")))]
pub async fn sample(Path(name): Path<String>) -> Response {
    let name = name.trim_end_matches(".jpg");
    match SAMPLES.iter().find(|(n, _)| *n == name) {
        Some((_, bytes)) => asset("image/jpeg", bytes),
        None => (StatusCode::NOT_FOUND, "no such sample").into_response(),
    }
}
