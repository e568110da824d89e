//! Resource bounds, tried as an attacker would against a real server process: every request is
//! answered within its bounds with a JSON error, memory stays bounded, stalled clients hold no
//! work slot, and the shutdown grace is a hard limit. Memory is read from the kernel's own
//! accounting of the server process (`VmHWM`, its peak resident set).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::Value;

/// The README's bound: at default limits no single request takes more than this above idle.
const PER_REQUEST_BOUND_KB: u64 = 1536 * 1024;

/// `VmHWM` (peak resident set) or `VmRSS` of a process, in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resets the process's peak (`VmHWM`) to its current resident set, so that a peak read later is
/// what happened since, not start-up's.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// A smooth RGB PNG of any size (fast to encode and decode).
fn png(w: u32, h: u32) -> Vec<u8> {
    // Blocks of 16 pixels: rows repeat, so even 36 megapixels encode well under the body limit.
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x / 16 % 251) as u8, (y / 16 % 241) as u8, 128]));
    let mut buf = Vec::new();
    let enc = image::codecs::png::PngEncoder::new_with_quality(
        &mut buf,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Sub,
    );
    img.write_with_encoder(enc).unwrap();
    buf
}

/// Sends `head` (and nothing more) on a fresh connection and reads the answer until the server
/// closes it or `within` passes.
fn raw(addr: std::net::SocketAddr, head: &[u8], within: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(head).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn body_of(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {response}"))
}

#[tokio::test]
async fn extreme_aspect_ratios_are_refused_before_any_tensor_and_memory_stays_bounded() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    reset_peak(s.pid());
    let idle = status_kb(s.pid(), "VmRSS:");
    let post = |path: &str, body: Vec<u8>| c.post(s.url(path)).header("content-type", "image/png").body(body).send();
    // 12000×1 (1.3 KB) used to resize to 256×3,072,000 and take 9.6 GB.
    for (path, img) in
        [("/classify", png(12000, 1)), ("/attack?max_iter=3", png(12000, 3)), ("/target-label", png(1, 12000))]
    {
        let (st, v) = json(post(path, img).await.unwrap()).await;
        assert_eq!((st, v["error"]["code"].as_str()), (422, Some("image_too_elongated")), "{path}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("limits.max_resized_side"), "{v}");
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(png(12000, 1));
    let body = serde_json::json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]});
    let (st, v) = json(c.post(s.url("/v2/models/tiny/infer")).json(&body).send().await.unwrap()).await;
    assert_eq!(st, 422, "{v}");
    assert!(v["error"].is_string(), "OIP shape: {v}");
    // A wide panorama within the bound is served.
    assert_eq!(post("/classify", png(4000, 1000)).await.unwrap().status(), 200);
    assert!(
        status_kb(s.pid(), "VmHWM:") - idle < 300 * 1024,
        "peak {} kB over idle",
        status_kb(s.pid(), "VmHWM:") - idle
    );
    // The largest requests the default limits allow, one at a time: a 36-megapixel classify
    // and attacks at 11.6 megapixels (their gradient lives at that size).
    let (big, attack) = (png(6000, 6000), png(3400, 3400));
    for (path, img) in
        [("/classify", &big), ("/attack?max_iter=2&method=fgsm", &attack), ("/attack?max_iter=2", &attack)]
    {
        reset_peak(s.pid());
        let idle = status_kb(s.pid(), "VmRSS:");
        let (st, v) = json(post(path, img.clone()).await.unwrap()).await;
        assert_eq!(st, 200, "{path}: {v}");
        let peak = status_kb(s.pid(), "VmHWM:");
        eprintln!("{path}: peak {} kB over idle", peak - idle);
        assert!(peak - idle < PER_REQUEST_BOUND_KB, "{path}: peak {peak} kB is {} kB over idle {idle} kB", peak - idle);
    }
}

#[tokio::test]
async fn oversized_and_refused_bodies_are_never_read_whole() {
    let s = Server::start(&tiny_config(""));
    reset_peak(s.pid());
    let idle = status_kb(s.pid(), "VmRSS:");
    // Declared 1 GiB: refused from the header, before a byte of the body is read.
    for ct in ["content-type: text/plain\r\n", "", "content-type: image/png\r\n"] {
        let head = format!("POST /classify HTTP/1.1\r\nhost: x\r\n{ct}content-length: 1073741824\r\n\r\n");
        let res = raw(s.addr, head.as_bytes(), Duration::from_secs(10));
        assert!(res.starts_with("HTTP/1.1 413"), "{ct:?}: {res}");
        assert_eq!(body_of(&res)["error"]["code"], "payload_too_large");
    }
    // 64 MiB sent chunked (no length to refuse by): reading stops at the limit.
    let addr = s.addr;
    let sender = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(
            b"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .unwrap();
        let chunk = vec![b'a'; 1 << 20];
        let framed = [format!("{:x}\r\n", chunk.len()).into_bytes(), chunk, b"\r\n".to_vec()].concat();
        let mut sent = 0;
        for _ in 0..64 {
            if c.write_all(&framed).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let sent = sender.join().unwrap();
    assert!(sent < 64, "the server kept reading past the limit ({sent} MiB)");
    let peak = status_kb(s.pid(), "VmHWM:");
    assert!(peak - idle < 200 * 1024, "peak {} kB over idle", peak - idle);
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 200);
}

/// Opens `n` connections that send a header and 10 bytes of a 100 kB body, then stall.
fn stalled_uploads(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: 100000\r\n\r\n0123456789")
                .unwrap();
            c
        })
        .collect()
}

/// How many of `conns` the server process holds with everything they sent read: from the
/// kernel's own tables, each connection's server-side socket (local port `server`'s, remote port
/// the client's) is open in the process (accepted: its inode among `/proc/<pid>/fd`) and has an
/// empty receive queue (the header and the body's first bytes are in the server's hands).
fn uploads_taken_in(pid: u32, server: std::net::SocketAddr, conns: &[TcpStream]) -> usize {
    let ours: std::collections::HashSet<u16> = conns.iter().map(|c| c.local_addr().unwrap().port()).collect();
    let held: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().unwrap(), 16).unwrap();
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            // sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode …
            let f: Vec<&str> = l.split_whitespace().collect();
            let rx_queue = f[4].split(':').nth(1).unwrap();
            port(f[1]) == server.port()
                && ours.contains(&port(f[2]))
                && f[3] == "01"
                && u64::from_str_radix(rx_queue, 16).unwrap() == 0
                && held.contains(f[9])
        })
        .count()
}

#[tokio::test]
async fn stalled_uploads_hold_no_work_slot() {
    // Default timeouts; 4 work slots and 24 stalled uploads, as 520 held 512 slots before.
    let s = Server::start(&tiny_config("[server]\nmax_concurrent_requests = 4\n"));
    let stalled = stalled_uploads(s.addr, 24);
    // Not vacuous: the server has accepted all 24 and read what they sent before the test goes on.
    wait_until("the server accepted and read all 24 stalled uploads", Duration::from_secs(10), || {
        let n = uploads_taken_in(s.pid(), s.addr, &stalled);
        async move { n == 24 }
    })
    .await;
    let c = client();
    for _ in 0..3 {
        let r = c
            .post(s.url("/classify"))
            .header("content-type", "image/jpeg")
            .body(read_fixture("images/n02391049_zebra.JPEG"));
        let (st, v) = json(r.send().await.unwrap()).await;
        assert_eq!(st, 200, "{v}");
    }
}

#[tokio::test]
async fn stalled_and_idle_connections_are_closed_by_their_timeouts() {
    let s = Server::start(&tiny_config("[server]\nheader_read_timeout_ms = 1500\nbody_read_timeout_ms = 2000\n"));
    let uploads = stalled_uploads(s.addr, 24);
    // Slowloris: half a header. Idle: nothing at all.
    let partial: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = TcpStream::connect(s.addr).unwrap();
            c.write_all(b"POST /classify HTTP/1.1\r\nhost: x\r\nx-slow: ").unwrap();
            c
        })
        .collect();
    let idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(s.addr).unwrap()).collect();
    // Each stalled upload is answered 408 once its body deadline passes, and closed.
    let started = Instant::now();
    for mut u in uploads {
        u.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut out = Vec::new();
        let _ = u.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert_eq!(body_of(&text)["error"]["code"], "request_timeout");
    }
    // Half headers and idle connections are closed by the header timeout.
    for mut p in partial.into_iter().chain(idle) {
        p.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut out = Vec::new();
        if let Err(e) = p.read_to_end(&mut out) {
            let timed_out = matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
            assert!(!timed_out, "a stalled connection was still open after 15 s");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(15), "stalled connections outlived their timeouts");
    // A kept-alive connection that goes idle after a request is closed too.
    let mut kept = TcpStream::connect(s.addr).unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut out = Vec::new();
    let res = kept.read_to_end(&mut out);
    assert!(res.is_ok(), "the idle kept-alive connection was not closed: {res:?}");
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn every_error_has_the_json_shape_and_duplicates_are_refused() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    let zebra = || read_fixture("images/n02391049_zebra.JPEG");
    let (st, v) = json(c.get(s.url("/classify")).send().await.unwrap()).await;
    assert_eq!((st, v["error"]["code"].as_str()), (405, Some("method_not_allowed")));
    let (st, v) = json(c.get(s.url("/target-label?class=1&top=-1")).send().await.unwrap()).await;
    assert_eq!((st, v["error"]["param"].as_str()), (422, Some("top")), "{v}");
    let (st, v) = json(c.get(s.url("/target-label?top=2")).send().await.unwrap()).await;
    assert_eq!((st, v["error"]["param"].as_str()), (422, Some("class")), "a required parameter: {v}");
    let long = format!("/classify?model={}", "a".repeat(10_000));
    let (st, v) =
        json(c.post(s.url(&long)).header("content-type", "image/jpeg").body(zebra()).send().await.unwrap()).await;
    assert_eq!((st, v["error"]["code"].as_str()), (414, Some("uri_too_long")));
    let mut many = c.get(s.url("/models"));
    for i in 0..150 {
        many = many.header(format!("x-h{i}"), "v");
    }
    let (st, v) = json(many.send().await.unwrap()).await;
    assert_eq!((st, v["error"]["code"].as_str()), (431, Some("headers_too_large")));
    let (st, v) = json(c.get(s.url("/models")).header("x-big", "b".repeat(70_000)).send().await.unwrap()).await;
    assert_eq!((st, v["error"]["code"].as_str()), (431, Some("headers_too_large")));
    // Two images, or one parameter twice (in one place or in two): 422, never a silent choice.
    let two = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(zebra()).file_name("a.jpg"))
        .part("image", reqwest::multipart::Part::bytes(zebra()).file_name("b.jpg"));
    let (st, v) = json(c.post(s.url("/classify")).multipart(two).send().await.unwrap()).await;
    assert_eq!((st, v["error"]["param"].as_str()), (422, Some("image")), "{v}");
    let (st, v) = json(
        c.post(s.url("/classify?top_k=1&top_k=3"))
            .header("content-type", "image/jpeg")
            .body(zebra())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((st, v["error"]["param"].as_str()), (422, Some("top_k")), "{v}");
    let form = multipart_image(zebra(), "z.jpg").text("top_k", "2");
    let (st, v) = json(c.post(s.url("/classify?top_k=3")).multipart(form).send().await.unwrap()).await;
    assert_eq!((st, v["error"]["param"].as_str()), (422, Some("top_k")), "{v}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(zebra());
    let dup = format!("{{\"image\": \"{b64}\", \"top_k\": 1, \"top_k\": 2}}");
    let (st, v) =
        json(c.post(s.url("/classify")).header("content-type", "application/json").body(dup).send().await.unwrap())
            .await;
    assert_eq!((st, v["error"]["param"].as_str()), (422, Some("top_k")), "{v}");
    // Under /v2 every error has the protocol's shape, whoever answers it.
    let (st, v) = json(c.get(s.url("/v2/models/tiny/infer")).send().await.unwrap()).await;
    assert_eq!(st, 405);
    assert!(v["error"].is_string(), "{v}");
    let (st, v) = json(c.get(s.url(&format!("/v2/models/{}", "a".repeat(10_000)))).send().await.unwrap()).await;
    assert_eq!(st, 414);
    assert!(v["error"].is_string(), "{v}");
    // An element count that overflows must not match empty data.
    let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1u64 << 54, 3, 32, 32], "datatype": "FP32", "data": []}]});
    let (st, v) = json(c.post(s.url("/v2/models/tiny/infer")).json(&body).send().await.unwrap()).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].is_string());
}

#[tokio::test]
async fn the_api_key_scheme_is_case_insensitive_and_the_key_exact() {
    let s = Server::start_with_env(&tiny_config(""), &[("LABELFOOL_API_KEY", "s3cret")]);
    let c = client();
    for (header, status) in [
        ("bearer s3cret", 200),
        ("BEARER s3cret", 200),
        ("Bearer  s3cret", 401),
        ("Bearer s3cre", 401),
        ("Bearer s3cretX", 401),
    ] {
        let r = c.get(s.url("/models")).header("authorization", header).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{header:?}");
    }
}

#[tokio::test]
async fn a_large_fp32_inference_body_is_parsed_without_copies() {
    // More rows (540) than the queue holds (64): a request's rows wait for the worker 16 at a time.
    let s = Server::start(&tiny_config("[engine]\ndevice = \"cpu\"\nqueue_capacity = 64\n"));
    // About 19.9 MB of JSON: 540 rows of 3×32×32 numbers written with 12 characters each.
    let rows = 540;
    let mut body = String::from(r#"{"inputs": [{"name": "input", "datatype": "FP32", "shape": ["#);
    body.push_str(&format!("{rows}, 3, 32, 32], \"data\": ["));
    for i in 0..rows * 3 * 32 * 32 {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!("{:.9}", (i % 1000) as f64 / 1000.0));
    }
    body.push_str("]}]}");
    assert!(body.len() > 19_000_000 && body.len() < 20 * 1024 * 1024, "{}", body.len());
    reset_peak(s.pid());
    let idle = status_kb(s.pid(), "VmRSS:");
    let r = client()
        .post(s.url("/v2/models/tiny/infer"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let (st, v) = json(r).await;
    assert_eq!(st, 200, "{}", &v.to_string()[..200.min(v.to_string().len())]);
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([rows, 10]));
    let peak = status_kb(s.pid(), "VmHWM:");
    eprintln!("FP32 body: peak {} kB over idle", peak - idle);
    // The body itself is 20 MB, its values 6.6 MB as f32; building JSON values first cost ~5× more.
    assert!(peak - idle < 80 * 1024, "peak {} kB over idle", peak - idle);
}

#[tokio::test]
async fn costly_attacks_are_refused_up_front_and_counted() {
    let s = Server::start(&default_model_config(""));
    let c = client();
    let attack = |query: &str, img: Vec<u8>| {
        c.post(s.url(&format!("/attack?{query}"))).header("content-type", "image/png").body(img).send()
    };
    // The reproduction: 1000 candidates on a 1×1 image held the worker for 292 s.
    let (st, v) = json(attack("method=deepfool&candidates=1000&max_iter=5", png(1, 1)).await.unwrap()).await;
    assert_eq!(
        (st, v["error"]["code"].as_str(), v["error"]["param"].as_str()),
        (422, Some("too_costly"), Some("candidates"))
    );
    let (st, v) = json(attack("method=sparsefool&candidates=20&max_iter=50", png(64, 64)).await.unwrap()).await;
    assert_eq!((st, v["error"]["code"].as_str()), (422, Some("too_costly")), "{v}");
    let metrics = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("labelfool_requests_refused_total{reason=\"cost\"} 2")), "{metrics}");
    // Within the bounds, the same kind of attack runs.
    let (st, v) = json(attack("method=deepfool&candidates=10&max_iter=5", png(64, 64)).await.unwrap()).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn the_shutdown_grace_is_a_hard_bound_answered_with_503_and_exit_zero() {
    let s = Server::start(&default_model_config("[server]\nshutdown_grace_secs = 1\n"));
    let addr = s.url("/attack?target=n01440764&max_iter=500");
    let big = std::fs::read(fixture("images/n02391049_zebra.JPEG")).unwrap();
    let big = {
        let img =
            image::load_from_memory(&big).unwrap().resize_exact(1600, 1200, image::imageops::FilterType::Triangle);
        let mut buf = Vec::new();
        img.to_rgb8().write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
        buf
    };
    let c = client();
    let attacks: Vec<_> = (0..12)
        .map(|_| tokio::spawn(c.post(&addr).header("content-type", "image/png").body(big.clone()).send()))
        .collect();
    // Wait until the worker is busy with them, then ask the server to stop.
    let started = Instant::now();
    loop {
        let m = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
        if m.lines().any(|l| l.starts_with("labelfool_inflight_attacks ") && !l.ends_with(" 0")) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "attacks never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopping = Instant::now();
    let status = s.terminate(Duration::from_secs(8));
    assert!(status.success(), "exit status {status:?}");
    assert!(stopping.elapsed() < Duration::from_secs(6), "took {:?} for a 1 s grace", stopping.elapsed());
    let mut unavailable = 0;
    for a in attacks {
        let r = a.await.unwrap().expect("every request gets an answer");
        let (st, v) = json(r).await;
        assert!(st == 200 || st == 503, "{st}: {v}");
        if st == 503 {
            assert_eq!(v["error"]["code"], "shutting_down");
            unavailable += 1;
        }
    }
    assert!(unavailable > 0, "the grace was shorter than the work: some attacks must have been cut");
}
