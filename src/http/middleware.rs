//! Cross-cutting layers: request ids (accepted or generated, echoed, in every log line), tracing,
//! per-route Prometheus metrics, CORS and panic containment; and the API key check that the route
//! gate ([`super::routes`]) applies to the classes that need it.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tower_http::LatencyUnit;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use super::AppState;
use super::error::ApiError;

pub const REQUEST_ID: &str = "x-request-id";

/// What an unauthenticated request's body may make the server read (and drop) before the 401.
const REFUSED_BODY_DRAIN: usize = 64 * 1024;

pub fn apply(router: Router<AppState>, state: &AppState) -> Router<AppState> {
    let id = HeaderName::from_static(REQUEST_ID);
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &Request| {
            let request_id =
                req.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("-");
            // The route's template, never the path itself: observers' links carry their token in it.
            let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str()).unwrap_or("unmatched");
            tracing::info_span!("request", method = %req.method(), route = %route, request_id = %request_id)
        })
        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO).latency_unit(LatencyUnit::Millis));
    let router = router
        .layer(from_fn(record_metrics))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(trace)
        .layer(PropagateRequestIdLayer::new(id.clone()))
        .layer(SetRequestIdLayer::new(id, MakeRequestUuid));
    match cors(&state.config.server.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            // Every method a route answers: DELETE cancels jobs and removes studies.
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::ACCEPT,
                HeaderName::from_static(REQUEST_ID),
            ])
            .expose_headers([HeaderName::from_static(REQUEST_ID)]),
    )
}

/// Whether `headers` carry the configured key; `Some(401)` when a key is set and they do not.
pub fn check_key(state: &AppState, headers: &axum::http::HeaderMap) -> Option<ApiError> {
    let key = state.config.server.api_key.as_deref()?;
    let presented = headers.get(header::AUTHORIZATION).and_then(|v| bearer_token(v.as_bytes()));
    if presented.is_some_and(|p| key_matches(p, key.as_bytes())) { None } else { Some(ApiError::unauthorized()) }
}

/// Answers a refused request, reading a little of its body first (so the client sees the answer,
/// not a reset), never more.
pub async fn refuse(e: ApiError, body: axum::body::Body) -> Response {
    let whole = super::limits::discard_body(body, REFUSED_BODY_DRAIN, std::time::Duration::from_secs(1)).await;
    let res = e.into_response();
    // Unread bytes stay on the connection: say it closes, or a client that reuses it for its
    // next request gets that request cut off.
    if whole { res } else { super::limits::closing(res) }
}

/// The credentials of `Authorization: Bearer <token>`: the scheme is case-insensitive (RFC 9110
/// §11.1), exactly one space follows it, and the token is taken as sent — not trimmed.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = (value.get(..7)?, value.get(7..)?);
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
}

/// Compares digests, so the time taken says nothing about the key — not even its length.
fn key_matches(presented: &[u8], key: &[u8]) -> bool {
    use sha2::Digest;
    sha2::Sha256::digest(presented).ct_eq(&sha2::Sha256::digest(key)).into()
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!("labelfool_http_requests_total", "route" => route.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!("labelfool_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    res
}

fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!(panic = %detail, "handler panicked");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request handler failed; the server goes on")
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_the_token_exact() {
        assert_eq!(bearer_token(b"Bearer k3y"), Some(&b"k3y"[..]));
        assert_eq!(bearer_token(b"bearer k3y"), Some(&b"k3y"[..]));
        assert_eq!(bearer_token(b"BEARER k3y"), Some(&b"k3y"[..]));
        assert_eq!(bearer_token(b"Basic k3y"), None);
        assert_eq!(bearer_token(b"Bearer"), None);
        assert!(key_matches(b"k3y", b"k3y"));
        assert!(!key_matches(b" k3y ", b"k3y"), "no trimming");
        assert!(!key_matches(b"k3", b"k3y"));
    }
}
