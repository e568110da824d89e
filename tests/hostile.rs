//! The hostile client, derived from the route table: for every route and method the served
//! OpenAPI document lists, with the bounds its class publishes there (`x-labelfool`), a stalled
//! body, an oversized body and a slow header, beside 2000 idle connections — each answered or
//! closed within its bound — while `/health` answers within 1 s throughout, on the main listener
//! and on the probe listener. A route registered without a class has no `x-labelfool` and fails
//! here (and cannot be registered: `src/http/routes.rs` is the only place routes are added).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_MS: u64 = 1500;
const BODY_MS: u64 = 2000;
/// Scheduling slack on 2 cores with a few thousand sockets open.
const SLACK: Duration = Duration::from_millis(2500);
const IDLE_CONNECTIONS: usize = 2000;

/// The two attacks open thousands of sockets each and time `/health`: the tests here run one at a
/// time, so that each times its own server and not another starting beside it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The probe listener's address, which the server prints on stderr.
fn probe_addr(s: &Server) -> SocketAddr {
    let started = Instant::now();
    loop {
        if let Some(line) = s.log().lines().find_map(|l| l.strip_prefix("labelfool probes listening on http://")) {
            return line.trim().parse().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no probe listener line: {}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one hostile connection saw: its first line (if any answer came) and when it ended.
struct Seen {
    what: String,
    status: Option<u16>,
    ended_after: Option<Duration>,
}

/// Sends `head` (+ `body`), then reads until the server closes or `limit` passes.
async fn send(addr: SocketAddr, what: String, head: String, body: Vec<u8>, limit: Duration) -> Seen {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(&body).await;
    let mut out = Vec::new();
    let ended = tokio::time::timeout(limit, s.read_to_end(&mut out)).await.is_ok();
    let text = String::from_utf8_lossy(&out);
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|c| c.parse().ok());
    Seen { what, status, ended_after: ended.then(|| started.elapsed()) }
}

/// Sends a request header one byte every 300 ms; returns when the server closes (or `limit`).
async fn slow_header(addr: SocketAddr, what: String, head: String, limit: Duration) -> Seen {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut bytes = head.into_bytes().into_iter().cycle();
    let mut buf = [0u8; 256];
    let ended = tokio::time::timeout(limit, async {
        loop {
            tokio::select! {
                r = s.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    let b = [bytes.next().unwrap_or(b'x')];
                    if s.write_all(&b).await.is_err() { return }
                }
            }
        }
    })
    .await
    .is_ok();
    Seen { what, status: None, ended_after: ended.then(|| started.elapsed()) }
}

/// `GET /health` over a fresh connection: how long the answer took, or `None` when no 200 came
/// within 1 s.
async fn health(addr: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let probe = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        Some(out.starts_with(b"HTTP/1.1 200"))
    };
    match tokio::time::timeout(Duration::from_secs(1), probe).await {
        Ok(Some(true)) => Some(started.elapsed()),
        _ => None,
    }
}

/// Every `(method, concrete path, bounds)` of the served document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let bounds = op.get("x-labelfool").cloned().unwrap_or(Value::Null);
            assert!(bounds["class"].is_string(), "{method} {path} has no class (x-labelfool): {op}");
            let concrete: String =
                path.split('/').map(|seg| if seg.starts_with('{') { "1" } else { seg }).collect::<Vec<_>>().join("/");
            ops.push((method.to_uppercase(), concrete, bounds));
        }
    }
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_holds_its_bounds_and_health_answers_throughout() {
    let _one = ONE_AT_A_TIME.lock().await;
    let config = tiny_config(&format!(
        "[server]\napi_key = \"k\"\nprobe_bind = \"127.0.0.1:0\"\nheader_read_timeout_ms = {HEADER_MS}\n\
         body_read_timeout_ms = {BODY_MS}\n"
    ));
    let s = Server::start(&config);
    let (main, probes) = (s.addr, probe_addr(&s));
    let doc: Value = client().get(s.url("/openapi.json")).bearer_auth("k").send().await.unwrap().json().await.unwrap();
    let ops = operations(&doc);
    assert!(ops.len() >= 50, "only {} operations in the served document", ops.len());

    // /health on both listeners, every 100 ms, for as long as the attack lasts — from a thread of
    // its own, so that what it times is the server and not this runtime's queue of attack tasks.
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for (name, addr) in [("main", main), ("probes", probes)] {
                        let at = began.elapsed();
                        seen.push((name, at, health(addr).await));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                seen
            })
        })
    };

    // 2000 idle connections first, so that every other attack runs while they are held.
    let mut idle = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(TcpStream::connect(main).await.unwrap());
    }
    let idle_since = Instant::now();
    let idle_task = tokio::spawn(async move {
        let mut ended = Vec::new();
        for mut c in idle {
            let mut buf = [0u8; 64];
            let r = tokio::time::timeout(
                Duration::from_millis(HEADER_MS) + SLACK * 2
                    - idle_since.elapsed().min(Duration::from_millis(HEADER_MS)),
                c.read(&mut buf),
            )
            .await;
            ended.push(matches!(r, Ok(Ok(0)) | Ok(Err(_))));
        }
        (ended.iter().filter(|e| **e).count(), idle_since.elapsed())
    });

    let mut attacks = Vec::new();
    for (method, path, bounds) in &ops {
        let limit = bounds["max_body_bytes"].as_u64().unwrap();
        let read_ms = bounds["body_read_timeout_ms"].as_u64().unwrap();
        let upload = bounds["class"] == "upload";
        let head = |len: u64, ctype: &str| {
            format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\n\r\n"
            )
        };
        // A stalled body: a few of the declared bytes, then nothing (an upload also as multipart).
        let mut stalled = vec![("stalled body", 1000, "application/json", b"{\"a\": 1, ".to_vec())];
        if upload {
            let part = b"--XyZ\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.zip\"\r\n\r\nPK";
            stalled.push(("stalled multipart", 100_000, "multipart/form-data; boundary=XyZ", part.to_vec()));
        }
        for (what, len, ctype, sent) in stalled {
            attacks.push(tokio::spawn(send(
                main,
                format!("{what} {method} {path}"),
                head(len, ctype),
                sent,
                Duration::from_millis(read_ms) + SLACK,
            )));
        }
        // An oversized body: refused by its declared length before it is sent.
        attacks.push(tokio::spawn(send(
            main,
            format!("oversized body {method} {path}"),
            head(limit + 1, if upload { "multipart/form-data; boundary=XyZ" } else { "application/json" }),
            Vec::new(),
            SLACK,
        )));
        // A header sent one byte at a time.
        attacks.push(tokio::spawn(slow_header(
            main,
            format!("slow header {method} {path}"),
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nX-Slow: "),
            Duration::from_millis(HEADER_MS) + SLACK,
        )));
    }
    let mut problems = Vec::new();
    for a in attacks {
        let seen = a.await.unwrap();
        let Some(after) = seen.ended_after else {
            problems.push(format!("{}: still open past its bound", seen.what));
            continue;
        };
        let ok = if seen.what.starts_with("stalled multipart") {
            matches!(seen.status, Some(400 | 408))
        } else if seen.what.starts_with("stalled") {
            seen.status == Some(408)
        } else if seen.what.starts_with("oversized") {
            seen.status == Some(413)
        } else {
            true // a slow header is closed; hyper sends no answer
        };
        if !ok {
            problems.push(format!("{}: status {:?} after {after:?}", seen.what, seen.status));
        }
    }
    let (closed, idle_took) = idle_task.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert!(problems.is_empty(), "{} of the attacks broke their bounds:\n{}", problems.len(), problems.join("\n"));
    assert_eq!(closed, IDLE_CONNECTIONS, "idle connections still open after {idle_took:?}");
    assert!(seen.len() >= 20, "the health watcher barely ran");
    let missed: Vec<String> =
        seen.iter().filter(|(_, _, took)| took.is_none()).map(|(name, at, _)| format!("{name} at {at:?}")).collect();
    let slowest = seen.iter().filter_map(|(_, _, took)| *took).max().unwrap_or_default();
    assert!(missed.is_empty(), "/health missed its 1 s bound {} of {} times: {missed:?}", missed.len(), seen.len());
    eprintln!("/health: {} probes, slowest {slowest:?}", seen.len());
    // And the server still works.
    let (st, _) = json(
        client()
            .post(s.url("/classify"))
            .bearer_auth("k")
            .header("content-type", "image/jpeg")
            .body(read_fixture("images/n02391049_zebra.JPEG"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200);
}

/// The reproduction of issue 29: 1100 stalled uploads to an observer link (a made-up token) used
/// to hold every connection slot, and `/health` and `/classify` timed out while they were held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_observer_uploads_leave_health_and_classify_answering() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Server::start(&tiny_config(""));
    let mut held = Vec::new();
    for _ in 0..1100 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(
            b"POST /observe/x/answers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"a\"",
        )
        .await
        .unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 0..3 {
        assert!(health(s.addr).await.is_some(), "round {round}: /health did not answer within 1 s");
        let started = Instant::now();
        let res = client()
            .post(s.url("/classify"))
            .header("content-type", "image/jpeg")
            .body(read_fixture("images/n02391049_zebra.JPEG"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: /classify failed: {e}"));
        assert_eq!(res.status(), 200, "round {round}");
        assert!(started.elapsed() < Duration::from_secs(5), "round {round}: /classify took {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Past the public pool the uploads were refused at once, not held.
    let mut refused = 0;
    for c in held.iter_mut() {
        let mut buf = [0u8; 16];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(5), c.read(&mut buf)).await
            && buf[..n].starts_with(b"HTTP/1.1 503")
        {
            refused += 1;
        }
    }
    assert!(refused >= 1000, "only {refused} of 1100 stalled public uploads were refused at once");
}

/// Jobs and studies can be switched off: their routes then answer 503 and touch no store.
#[tokio::test]
async fn jobs_and_studies_can_be_switched_off() {
    let _one = ONE_AT_A_TIME.lock().await;
    let s = Server::start(&tiny_config("[jobs]\nenabled = false\n"));
    let c = client();
    for path in ["/jobs", "/studies"] {
        let (st, v) = json(c.get(s.url(path)).send().await.unwrap()).await;
        assert_eq!((st, v["error"]["code"].as_str()), (503, Some("jobs_unavailable")), "{path}: {v}");
    }
    let (st, _) = json(c.get(s.url("/observe/x/session")).send().await.unwrap()).await;
    assert_eq!(st, 503);
    let s = Server::start(&tiny_config("[studies]\nenabled = false\n"));
    assert_eq!(c.get(s.url("/jobs")).send().await.unwrap().status(), 200);
    let (st, _) = json(c.get(s.url("/studies")).send().await.unwrap()).await;
    assert_eq!(st, 503, "studies off, jobs on");
}
