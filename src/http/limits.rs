//! Request-level bounds: the request target and header section (414 / 431), and the body —
//! refused by its declared length before a byte is read (413), read whole within
//! `server.body_read_timeout_ms` (else 408) and within a shared byte budget. Which limit a route
//! gets is its class's ([`super::routes`]); handlers then see a body that has fully arrived.
//!
//! The budget never makes a reader wait while it holds part of it (readers that wait for each
//! other's bytes would stall together): each chunk takes its share at once or the request is
//! answered 503 at once, and what a request holds is what it has actually sent.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::AppState;
use super::error::ApiError;

/// Budget accounting unit: permits are KiB, so the budget fits a semaphore's permit count.
const UNIT: usize = 1024;

/// Bytes of request bodies buffered at once, shared by every request.
#[derive(Clone)]
pub struct BodyBudget(Arc<Semaphore>);

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS))))
    }
}

/// 414 past `server.max_uri_bytes`, 431 past `max_header_bytes` or `max_headers`.
pub async fn check_head(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let server = &state.config.server;
    let target = req.uri().path_and_query().map(|pq| pq.as_str().len()).unwrap_or(0);
    if target > server.max_uri_bytes {
        let e = ApiError::new(
            axum::http::StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the request target is {target} bytes; the limit is {} (server.max_uri_bytes)",
                server.max_uri_bytes
            ),
        );
        return closing(e.into_response());
    }
    let headers = req.headers();
    let bytes: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if headers.len() > server.max_headers || bytes > server.max_header_bytes {
        let e = ApiError::new(
            axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "{} header fields, {bytes} bytes; the limits are {} fields and {} bytes (server.max_headers, max_header_bytes)",
                headers.len(),
                server.max_headers,
                server.max_header_bytes
            ),
        );
        return closing(e.into_response());
    }
    next.run(req).await
}

/// Refuses at once a body whose declared length is over `limit` (413, the connection closes).
pub fn declared_over(headers: &axum::http::HeaderMap, limit: u64) -> Option<Response> {
    let declared = declared_length(headers)?;
    (declared > limit).then(|| closing(too_large(limit).into_response()))
}

/// The body's declared length (`Content-Length`), when it parses.
pub fn declared_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok())
}

/// Reads the whole body (at most `limit` bytes, within `within`, inside the shared byte budget)
/// and hands back the request with the body in memory, and the budget it holds until answered.
pub async fn buffer(
    state: &AppState,
    req: Request,
    limit: u64,
    within: Duration,
) -> Result<(Request, Option<tokio::sync::OwnedSemaphorePermit>), Response> {
    if let Some(refused) = declared_over(req.headers(), limit) {
        return Err(refused);
    }
    let declared = declared_length(req.headers()).and_then(|d| usize::try_from(d).ok());
    let (parts, body) = req.into_parts();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match read_bounded(body, limit, declared, within, &state.body_budget).await {
        Ok((bytes, permit)) => Ok((Request::from_parts(parts, Body::from(bytes)), permit)),
        Err(e) => Err(closing(e.into_response())),
    }
}

/// A streamed body that fails with a 408's error once `within` has passed (an upload streamed to
/// disk cannot be buffered first, but is bounded in time all the same).
pub fn with_deadline(body: Body, within: Duration) -> Body {
    let deadline = Instant::now() + within;
    let stream = body.into_data_stream();
    let timed = futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut stream)).await {
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => Some((
                Err(axum::Error::new(format!(
                    "the request body did not arrive within {} ms (server.body_read_timeout_ms)",
                    within.as_millis()
                ))),
                None,
            )),
        }
    });
    Body::from_stream(timed)
}

fn too_large(limit: u64) -> ApiError {
    ApiError::too_large(format!("the request body is over this route's size limit of {limit} bytes"))
}

/// Reads `body` frame by frame: at most `limit` bytes, all before `deadline`, each chunk taking
/// its share of the budget as it arrives (a stalled upload holds only what it has sent). With a
/// declared length the buffer is allocated once; else the chunks are joined once at the end, so
/// what is buffered is what the budget counts.
async fn read_bounded(
    body: Body,
    limit: usize,
    declared: Option<usize>,
    within: Duration,
    budget: &BodyBudget,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), ApiError> {
    let deadline = Instant::now() + within;
    let mut body = body.into_data_stream();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let mut permit: Option<tokio::sync::OwnedSemaphorePermit> = None;
    loop {
        let next = tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut body)).await;
        let chunk = match next {
            Err(_) => {
                return Err(ApiError::timeout(format!(
                    "the request body did not arrive within {} ms (server.body_read_timeout_ms)",
                    within.as_millis()
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ApiError::bad_request("bad_body", format!("cannot read the body: {e}"))),
            Ok(Some(Ok(chunk))) => chunk,
        };
        if len + chunk.len() > limit {
            return Err(too_large(limit as u64));
        }
        len += chunk.len();
        let want = len.div_ceil(UNIT) as u32;
        let held = permit.as_ref().map(|p| p.num_permits() as u32).unwrap_or(0);
        if want > held {
            let more = budget.0.clone().try_acquire_many_owned(want - held).map_err(|_| {
                ApiError::overloaded("request bodies in flight are over server.max_buffered_body_bytes; retry later")
            })?;
            match permit.as_mut() {
                Some(p) => p.merge(more),
                None => permit = Some(more),
            }
        }
        chunks.push(chunk);
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(len).max(len));
            chunks.iter().for_each(|c| buf.extend_from_slice(c));
            buf.freeze()
        }
    };
    Ok((bytes, permit))
}

/// Reads and drops a refused request's body, streaming (nothing is kept), stopping after `limit`
/// bytes or `within`, so the client can read the answer instead of a reset connection.
/// Returns true when the body was read to its end (the connection can serve another request).
pub async fn discard_body(body: Body, limit: usize, within: Duration) -> bool {
    let mut body = body.into_data_stream();
    let mut seen = 0usize;
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut body)).await {
            Ok(None) => return true,
            Ok(Some(Ok(chunk))) => {
                seen += chunk.len();
                if seen > limit {
                    return false;
                }
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

/// Marks a response that is sent before the request was read whole: the connection closes after it.
pub fn closing(mut res: Response) -> Response {
    res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(chunks: Vec<&'static [u8]>) -> Body {
        let s = futures::stream::iter(chunks.into_iter().map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))));
        Body::from_stream(s)
    }

    #[tokio::test]
    async fn a_refused_body_says_whether_it_was_read_whole() {
        let short = stream(vec![b"abc", b"def"]);
        assert!(discard_body(short, 10, Duration::from_secs(1)).await);
        let long = stream(vec![b"abcdef", b"ghijkl", b"mnopqr"]);
        assert!(!discard_body(long, 10, Duration::from_secs(1)).await, "over the limit: left unread");
    }

    #[tokio::test]
    async fn reads_within_the_limit_and_holds_budget_for_what_arrived() {
        let budget = BodyBudget::new(64 * 1024);
        let within = Duration::from_secs(5);
        let (bytes, permit) =
            read_bounded(stream(vec![&[1u8; 1500], &[2u8; 700]]), 4096, None, within, &budget).await.unwrap();
        assert_eq!(bytes.len(), 2200);
        assert_eq!(&bytes[1499..1501], &[1, 2]);
        assert_eq!(permit.unwrap().num_permits(), 3, "2200 bytes = 3 KiB units");
        let e = read_bounded(stream(vec![&[0u8; 3000], &[0u8; 3000]]), 4096, None, within, &budget).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
    }

    #[tokio::test]
    async fn a_stalled_body_times_out_and_an_exhausted_budget_refuses_at_once() {
        let budget = BodyBudget::new(64 * 1024);
        let pending = Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let e = read_bounded(pending, 4096, None, Duration::from_millis(100), &budget).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 408);
        let small = BodyBudget::new(2 * 1024);
        let (_, held) =
            read_bounded(stream(vec![&[0u8; 2048]]), 4096, None, Duration::from_secs(1), &small).await.unwrap();
        let e = read_bounded(stream(vec![&[0u8; 10]]), 4096, None, Duration::from_secs(10), &small).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 503, "refused at once, not after the 10 s deadline");
        drop(held);
        read_bounded(stream(vec![&[0u8; 10]]), 4096, None, Duration::from_millis(100), &small).await.unwrap();
        // A budget that is not a whole number of KiB still fits a body of its own size.
        let odd = BodyBudget::new(1500);
        read_bounded(stream(vec![&[0u8; 1500]]), 1500, Some(1500), Duration::from_secs(1), &odd).await.unwrap();
    }
}
