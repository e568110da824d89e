//! Serving operations against a real server process: metrics, graceful shutdown, fault isolation,
//! cancellation, authentication, CORS, load shedding, JSON logs, and the Open Inference Protocol.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::Value;

fn jpeg(name: &str) -> Vec<u8> {
    read_fixture(&format!("images/{name}.JPEG"))
}

/// An all-white PNG: `tiny-faulty` raises inside its forward pass on exactly this input.
fn white_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
    buf
}

/// The scraped metrics, parsed as Prometheus text exposition.
async fn scrape(s: &Server) -> prometheus_parse::Scrape {
    let text = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .find_map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(*v),
            prometheus_parse::Value::Histogram(h) => h.last().map(|b| b.count),
            _ => None,
        })
}

#[tokio::test]
async fn metrics_are_scraped_and_parsed() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    let post =
        |path: &str, image: &str| c.post(s.url(path)).header("content-type", "image/jpeg").body(jpeg(image)).send();
    for _ in 0..3 {
        assert_eq!(post("/classify", "n02391049_zebra").await.unwrap().status(), 200);
    }
    assert_eq!(post("/classify?top_k=0", "n02391049_zebra").await.unwrap().status(), 422);
    assert_eq!(post("/attack", "n02219486_ant").await.unwrap().status(), 200);
    let m = scrape(&s).await;
    assert_eq!(value(&m, "labelfool_http_requests_total", &[("route", "/classify"), ("status", "200")]), Some(3.0));
    assert_eq!(value(&m, "labelfool_http_requests_total", &[("route", "/classify"), ("status", "422")]), Some(1.0));
    assert_eq!(value(&m, "labelfool_http_requests_total", &[("route", "/attack"), ("status", "200")]), Some(1.0));
    assert!(
        value(&m, "labelfool_http_request_duration_seconds", &[("route", "/classify")]).unwrap() >= 4.0,
        "latency histogram count"
    );
    assert!(value(&m, "labelfool_batch_size", &[("kind", "classify")]).unwrap() >= 1.0);
    assert!(value(&m, "labelfool_batch_size", &[("kind", "attack")]).unwrap() >= 1.0);
    assert_eq!(value(&m, "labelfool_attack_iterations", &[]), Some(1.0), "one attack finished");
    assert!(value(&m, "labelfool_backward_passes_total", &[]).unwrap() >= 1.0);
    assert_eq!(value(&m, "labelfool_queue_depth", &[("queue", "classify")]), Some(0.0));
    assert_eq!(value(&m, "labelfool_inflight_attacks", &[]), Some(0.0));
    assert_eq!(value(&m, "labelfool_job_items_pending", &[]), Some(0.0));
    assert_eq!(value(&m, "labelfool_job_items_held", &[]), Some(0.0));
}

#[tokio::test]
async fn sigterm_turns_ready_off_drains_in_flight_attacks_and_exits_zero() {
    let s = Server::start(&default_model_config("[server]\nshutdown_delay_ms = 1500\nshutdown_grace_secs = 60\n"));
    let c = client();
    let images: Vec<Vec<u8>> = sample_images().iter().take(6).map(|p| std::fs::read(p).unwrap()).collect();
    let attacks: Vec<_> = images
        .into_iter()
        .map(|b| {
            let req = c.post(s.url("/attack")).header("content-type", "image/jpeg").body(b);
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    // Let them reach the worker, then SIGTERM.
    let started = Instant::now();
    while scrape(&s).await.samples.iter().all(|x| {
        x.metric != "labelfool_inflight_attacks" || matches!(x.value, prometheus_parse::Value::Gauge(v) if v == 0.0)
    }) {
        assert!(started.elapsed() < Duration::from_secs(30), "the attacks never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = s.pid();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    // Polled, well inside the 1.5 s shutdown delay during which the listener still answers.
    wait_until("/ready must turn 503 as soon as shutdown starts", Duration::from_millis(1000), || async {
        c.get(s.url("/ready")).send().await.unwrap().status() == 503
    })
    .await;
    for a in attacks {
        assert_eq!(a.await.unwrap().unwrap(), 200, "in-flight attacks finish during the drain");
    }
    let status = s.terminate(Duration::from_secs(60));
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_failing_job_gets_500_and_its_batch_mates_are_served() {
    let s = Server::start(&tiny_config("[engine]\ndevice = \"cpu\"\nmax_batch_size = 16\nmax_batch_wait_ms = 200\n"));
    let c = client();
    // The classify batches' sizes so far: the sum and count of `labelfool_batch_size`.
    let batches = || async {
        let text = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
        let read = |name: &str| -> f64 {
            let prefix = format!("{name}{{kind=\"classify\"}} ");
            text.lines().find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse().ok()).unwrap_or(0.0)
        };
        (read("labelfool_batch_size_sum"), read("labelfool_batch_size_count"))
    };
    let (sum_before, count_before) = batches().await;
    // Seven good images and one poisoned one, sent together: they share a batch.
    let mut reqs = Vec::new();
    for i in 0..8 {
        let body = if i == 3 { white_png(64, 48) } else { jpeg("n02391049_zebra") };
        reqs.push(c.post(s.url("/classify?model=tiny-faulty")).header("content-type", "image/png").body(body).send());
    }
    let res = futures::future::join_all(reqs).await;
    for (i, r) in res.into_iter().enumerate() {
        let (st, v) = json(r.unwrap()).await;
        if i == 3 {
            assert_eq!((st, v["error"]["code"].as_str()), (500, Some("model_error")), "{v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("injected failure"), "{v}");
        } else {
            assert_eq!(st, 200, "request {i}: {v}");
        }
    }
    // They did share a batch: the worker records each batch's size, and re-runs each member of a
    // failed batch of k > 1 alone (k batches of one more), so the sizes recorded beyond the eight
    // requests are the poisoned request's batch-mates and itself. All eight in one batch: 8.
    let (sum, count) = batches().await;
    let shared = (sum - sum_before) - 8.0;
    assert!(
        shared >= 2.0,
        "the poisoned request was not batched with good ones: batch sizes summed {} over {} batches",
        sum - sum_before,
        count - count_before
    );
    // Attacks too: the poisoned one fails, the one beside it succeeds, the worker carries on.
    let bad =
        c.post(s.url("/attack?model=tiny-faulty")).header("content-type", "image/png").body(white_png(40, 40)).send();
    let good = c
        .post(s.url("/attack?model=tiny-faulty"))
        .header("content-type", "image/jpeg")
        .body(jpeg("n02219486_ant"))
        .send();
    let (bad, good) = tokio::join!(bad, good);
    let (st, v) = json(bad.unwrap()).await;
    assert_eq!(st, 500, "{v}");
    assert!(v["error"]["code"].as_str().is_some());
    assert_eq!(good.unwrap().status(), 200);
    assert_eq!(
        c.post(s.url("/classify"))
            .header("content-type", "image/jpeg")
            .body(jpeg("n02219486_ant"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_row_within_one_iteration() {
    let s = Server::start(&default_model_config(""));
    // A 3000×2250 image makes each iteration slow enough to disconnect in the middle of an attack.
    let big = {
        let img = image::open(fixture("images/n02391049_zebra.JPEG")).unwrap().resize_exact(
            3000,
            2250,
            image::imageops::FilterType::Triangle,
        );
        let mut buf = Vec::new();
        img.to_rgb8().write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
        buf
    };
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(1500)).build().unwrap();
    let res = impatient
        .post(s.url("/attack?target=n01440764&max_iter=500"))
        .header("content-type", "image/png")
        .body(big)
        .send()
        .await;
    assert!(res.is_err(), "the attack should still be running when the client gives up");
    let at_disconnect = scrape(&s).await;
    let passes_then = value(&at_disconnect, "labelfool_backward_passes_total", &[]).unwrap_or(0.0);
    let started = Instant::now();
    loop {
        let m = scrape(&s).await;
        if value(&m, "labelfool_cancelled_jobs_total", &[]) == Some(1.0)
            && value(&m, "labelfool_inflight_attacks", &[]) == Some(0.0)
        {
            let passes = value(&m, "labelfool_backward_passes_total", &[]).unwrap_or(0.0);
            assert!(
                passes - passes_then <= 1.0,
                "the row ran {} more iterations after the disconnect",
                passes - passes_then
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the row was not freed: {}", s.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn api_key_guards_everything_but_probes() {
    let s = Server::start_with_env(&tiny_config(""), &[("LABELFOOL_API_KEY", "s3cret")]);
    let c = client();
    let classify = || c.post(s.url("/classify")).header("content-type", "image/jpeg").body(jpeg("n02391049_zebra"));
    let (st, v) = json(classify().send().await.unwrap()).await;
    assert_eq!((st, v["error"]["code"].as_str()), (401, Some("unauthorized")));
    assert_eq!(classify().bearer_auth("wrong").send().await.unwrap().status(), 401);
    assert_eq!(classify().bearer_auth("s3cret").send().await.unwrap().status(), 200);
    assert_eq!(c.get(s.url("/models")).send().await.unwrap().status(), 401);
    for open in ["/health", "/ready", "/metrics", "/v2/health/ready"] {
        assert_eq!(c.get(s.url(open)).send().await.unwrap().status(), 200, "{open} must not need the key");
    }
}

#[tokio::test]
async fn cors_is_off_by_default_and_configurable() {
    let off = Server::start(&tiny_config(""));
    let c = client();
    let preflight = |s: &Server| {
        c.request(reqwest::Method::OPTIONS, s.url("/classify"))
            .header("origin", "https://dash.example")
            .header("access-control-request-method", "POST")
    };
    let r = preflight(&off).send().await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let on = Server::start(&tiny_config("[server]\ncors_origins = [\"https://dash.example\"]\n"));
    let r = preflight(&on).send().await.unwrap();
    assert_eq!(
        r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap()),
        Some("https://dash.example")
    );
    // A dashboard on another origin cancels jobs and removes studies: DELETE passes its preflight.
    let r = c
        .request(reqwest::Method::OPTIONS, on.url("/jobs/0123"))
        .header("origin", "https://dash.example")
        .header("access-control-request-method", "DELETE")
        .send()
        .await
        .unwrap();
    let methods = r.headers().get("access-control-allow-methods").map(|v| v.to_str().unwrap().to_string());
    assert!(methods.as_deref().is_some_and(|m| m.split(',').any(|m| m.trim() == "DELETE")), "{methods:?}");
}

#[tokio::test]
async fn requests_past_the_concurrency_limit_are_shed_with_503() {
    // Two requests may be in flight; each waits 3 s in the batcher, so the rest are shed.
    let s = Server::start(&tiny_config(
        "[server]\nmax_concurrent_requests = 2\n[engine]\ndevice = \"cpu\"\nmax_batch_size = 64\nmax_batch_wait_ms = 3000\n",
    ));
    let c = client();
    let res =
        futures::future::join_all((0..5).map(|_| {
            c.post(s.url("/classify")).header("content-type", "image/jpeg").body(jpeg("n02391049_zebra")).send()
        }))
        .await;
    let mut codes = Vec::new();
    for r in res {
        let r = r.unwrap();
        let status = r.status().as_u16();
        if status == 503 {
            assert!(r.headers().contains_key("retry-after"));
            let (_, v) = json(r).await;
            assert_eq!(v["error"]["code"], "overloaded");
        }
        codes.push(status);
    }
    codes.sort();
    assert_eq!(codes, vec![200, 200, 503, 503, 503]);
    // Probes are outside the limit.
    assert_eq!(c.get(s.url("/health")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn json_logs_carry_the_request_id() {
    let s = Server::start_with_env(&tiny_config(""), &[("LABELFOOL_LOG_FORMAT", "json")]);
    let r = client().get(s.url("/models")).header("x-request-id", "trace-me-42").send().await.unwrap();
    assert_eq!(r.status(), 200);
    wait_until("the request's log line was written", Duration::from_secs(5), || {
        let log = s.log();
        async move { log.lines().any(|l| l.contains("trace-me-42") && l.contains("finished processing request")) }
    })
    .await;
    let log = s.log();
    let lines: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!lines.is_empty() && lines.len() == log.lines().count(), "every log line is JSON:\n{log}");
    assert!(
        lines.iter().any(|l| l.to_string().contains("trace-me-42") && l.to_string().contains("/models")),
        "no log line names the request id:\n{log}"
    );
}

/// An observer's link is its credential: the logs name the route's template, never the token.
#[tokio::test]
async fn observer_tokens_are_not_logged() {
    let s = Server::start_with_env(&tiny_config(""), &[("LABELFOOL_LOG_FORMAT", "json")]);
    let token = "tok3n-that-must-not-be-logged";
    for path in [format!("/observe/{token}"), format!("/observe/{token}/session")] {
        let r = client().get(s.url(&path)).header("x-request-id", "observer-42").send().await.unwrap();
        assert!(r.status().as_u16() < 500, "{path}");
    }
    wait_until("both observer requests were logged", Duration::from_secs(5), || {
        let log = s.log();
        let done =
            log.lines().filter(|l| l.contains("observer-42") && l.contains("finished processing request")).count();
        async move { done >= 2 }
    })
    .await;
    let log = s.log();
    assert!(log.contains("observer-42") && log.contains("/observe/{token}"), "the requests were logged:\n{log}");
    assert!(!log.contains(token), "a token reached the logs:\n{log}");
}

#[tokio::test]
async fn open_inference_protocol_shapes_and_errors() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    let (st, v) = json(c.get(s.url("/v2/health/ready")).send().await.unwrap()).await;
    assert_eq!((st, v["ready"].as_bool()), (200, Some(true)));
    let (st, v) = json(c.get(s.url("/v2/models/tiny")).send().await.unwrap()).await;
    assert_eq!(st, 200);
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([-1, 10]));
    assert_eq!(v["inputs"][1]["shape"], serde_json::json!([-1, 3, 32, 32]));
    // Two encoded images in one BYTES input.
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
    let body = serde_json::json!({"id": "r1", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
        "data": [b64(jpeg("n02391049_zebra")), b64(jpeg("n02219486_ant"))]}]});
    let (st, v) = json(c.post(s.url("/v2/models/tiny/infer")).json(&body).send().await.unwrap()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id"], "r1");
    assert_eq!(v["model_name"], "tiny");
    let out = &v["outputs"][0];
    assert_eq!((out["name"].as_str(), out["datatype"].as_str()), (Some("probabilities"), Some("FP32")));
    assert_eq!(out["shape"], serde_json::json!([2, 10]));
    let data: Vec<f64> = out["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(data.len(), 20);
    for row in data.chunks(10) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-4);
    }
    // The same answer as /classify for the same bytes.
    let (_, cls) = json(
        c.post(s.url("/classify?top_k=1"))
            .header("content-type", "image/jpeg")
            .body(jpeg("n02391049_zebra"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let best = data[..10].iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(best as u64, cls["top"][0]["index"].as_u64().unwrap());
    // FP32 NCHW input, nested arrays.
    let plane = vec![vec![0.5f32; 32]; 32];
    let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [[plane.clone(), plane.clone(), plane]]}]});
    let (st, v) = json(c.post(s.url("/v2/models/tiny/infer")).json(&body).send().await.unwrap()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 10]));
    // Errors in the protocol's shape.
    for (body, status) in [
        (
            serde_json::json!({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0]}]}),
            400,
        ),
        (serde_json::json!({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}]}), 400),
        (
            serde_json::json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}),
            400,
        ),
        (
            serde_json::json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"text".to_vec())]}]}),
            400,
        ),
    ] {
        let (st, v) = json(c.post(s.url("/v2/models/tiny/infer")).json(&body).send().await.unwrap()).await;
        assert_eq!(st, status, "{v}");
        assert!(v["error"].is_string(), "OIP errors are {{\"error\": \"…\"}}: {v}");
    }
    let (st, v) =
        json(c.post(s.url("/v2/models/nope/infer")).json(&serde_json::json!({"inputs": []})).send().await.unwrap())
            .await;
    assert_eq!((st, v["error"].is_string()), (404, true));
}

/// `event:`/`data:` pairs of a Server-Sent Events body.
fn sse_pairs(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let event = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((event.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

#[tokio::test]
async fn an_attack_streams_its_progress_then_its_result() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    let attack = |path: &str, accept: &str, body: Vec<u8>| {
        c.post(s.url(path)).header("content-type", "image/jpeg").header("accept", accept).body(body).send()
    };
    let res = attack("/attack?method=deepfool", "text/event-stream", jpeg("n02219486_ant")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let events = sse_pairs(&res.text().await.unwrap());
    let (last, result) = events.last().unwrap();
    assert_eq!(last, "result", "{events:?}");
    let progress: Vec<&Value> = events.iter().filter(|(e, _)| e == "progress").map(|(_, v)| v).collect();
    assert!(!progress.is_empty(), "{events:?}");
    assert_eq!(progress.len() + 1, events.len(), "only progress before the result: {events:?}");
    let its: Vec<u64> = progress.iter().map(|p| p["iterations"].as_u64().unwrap()).collect();
    assert!(its.windows(2).all(|w| w[0] <= w[1]), "{its:?}");
    assert!(progress.iter().all(|p| p["label"]["label"].is_string()), "{progress:?}");
    assert!(*its.last().unwrap() <= result["iterations"].as_u64().unwrap());
    // The result is the JSON answer, the same as without streaming.
    let png = base64::engine::general_purpose::STANDARD.decode(result["png_base64"].as_str().unwrap()).unwrap();
    let (w, h, _) = decode_dims(&png);
    let upload = image::load_from_memory(&jpeg("n02219486_ant")).unwrap();
    assert_eq!((w, h), (upload.width(), upload.height()));
    let (st, plain) =
        json(attack("/attack?method=deepfool", "application/json", jpeg("n02219486_ant")).await.unwrap()).await;
    assert_eq!(st, 200);
    for k in ["success", "iterations", "checks"] {
        assert_eq!(result[k], plain[k], "{k}");
    }
    assert_eq!(result["final"]["index"], plain["final"]["index"]);

    // A bad parameter is refused before any stream starts; a failure inside the attack ends the
    // stream with an `error` event carrying its status.
    let res = attack("/attack?max_iter=0", "text/event-stream", jpeg("n02219486_ant")).await.unwrap();
    assert_eq!(res.status(), 422);
    assert_eq!(json(res).await.1["error"]["param"], "max_iter");
    let res = c
        .post(s.url("/attack?model=tiny-faulty"))
        .header("content-type", "image/png")
        .header("accept", "text/event-stream")
        .body(white_png(40, 40))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = sse_pairs(&res.text().await.unwrap());
    let (last, err) = events.last().unwrap();
    assert_eq!(last, "error", "{events:?}");
    assert_eq!(err["status"], 500, "{err}");
    assert!(err["error"]["code"].is_string(), "{err}");
}
