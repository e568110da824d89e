//! The HTTP API against a real server process on the tiny test models: every input form, every
//! error status, concurrency, and the OpenAPI document.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::Value;

fn zebra() -> Vec<u8> {
    read_fixture("images/n02391049_zebra.JPEG")
}

fn top_indices(v: &Value) -> Vec<u64> {
    v["top"].as_array().unwrap().iter().map(|p| p["index"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn classify_accepts_every_input_form_with_the_same_answer() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    let jpeg = zebra();
    let png = png_from(&fixture("images/n02391049_zebra.JPEG"));
    let b64 = base64::engine::general_purpose::STANDARD.encode(&jpeg);

    let multipart = c
        .post(s.url("/classify"))
        .multipart(multipart_image(jpeg.clone(), "z.jpg").text("model", "tiny").text("top_k", "3"))
        .send()
        .await
        .unwrap();
    let (st, a) = json(multipart).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["model"], "tiny");
    assert_eq!(a["top"].as_array().unwrap().len(), 3);
    assert_eq!((a["image"]["width"].as_u64(), a["image"]["height"].as_u64()), (Some(500), Some(375)));

    let raw = c.post(s.url("/classify?model=tiny&top_k=3")).header("content-type", "image/jpeg").body(jpeg.clone());
    let (st, b) = json(raw.send().await.unwrap()).await;
    assert_eq!(st, 200, "{b}");
    let octet =
        c.post(s.url("/classify?top_k=3")).header("content-type", "application/octet-stream").body(jpeg.clone());
    let (st, o) = json(octet.send().await.unwrap()).await;
    assert_eq!(st, 200, "{o}");
    assert_eq!(o["model"], "tiny", "the first configured model is the default");
    let body = serde_json::json!({"image": b64, "model": "tiny", "top_k": 3});
    let (st, j) = json(c.post(s.url("/classify")).json(&body).send().await.unwrap()).await;
    assert_eq!(st, 200, "{j}");
    for other in [&b, &o, &j] {
        assert_eq!(top_indices(&a), top_indices(other));
        assert_eq!(a["top"][0]["probability"], other["top"][0]["probability"], "same bytes, same answer");
    }
    // A PNG of the same pixels goes through the same pipeline (JPEG decoded identically).
    let (st, p) =
        json(c.post(s.url("/classify?top_k=3")).header("content-type", "image/png").body(png).send().await.unwrap())
            .await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(top_indices(&a), top_indices(&p));
    assert_eq!(p["image"]["format"], "png");
    let probs: f64 = a["top"].as_array().unwrap().iter().map(|t| t["probability"].as_f64().unwrap()).sum();
    assert!(probs > 0.0 && probs <= 1.0 + 1e-6);
}

#[tokio::test]
async fn every_error_is_json_with_the_right_status() {
    let s = Server::start(&tiny_config("[limits]\nmax_body_bytes = 300000\n"));
    let c = client();
    let png = png_from(&fixture("images/n02219486_ant.JPEG"));
    let mut bomb = common_png_header(20000, 20000);
    let text = b"this is not an image, just text".to_vec();
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "truncated PNG",
            c.post(s.url("/classify")).header("content-type", "image/png").body(png[..png.len() / 3].to_vec()),
            400,
            "undecodable_image",
        ),
        (
            "20000×20000 PNG header",
            c.post(s.url("/classify")).header("content-type", "image/png").body(std::mem::take(&mut bomb)),
            413,
            "payload_too_large",
        ),
        (
            "text sent as image/png",
            c.post(s.url("/classify")).header("content-type", "image/png").body(text.clone()),
            400,
            "undecodable_image",
        ),
        (
            "empty body",
            c.post(s.url("/classify")).header("content-type", "image/png").body(Vec::<u8>::new()),
            400,
            "undecodable_image",
        ),
        (
            "unknown model",
            c.post(s.url("/classify?model=resnet9000")).header("content-type", "image/jpeg").body(zebra()),
            404,
            "unknown_model",
        ),
        (
            "top_k=0",
            c.post(s.url("/classify?top_k=0")).header("content-type", "image/jpeg").body(zebra()),
            422,
            "invalid_parameter",
        ),
        (
            "top_k not a number",
            c.post(s.url("/classify?top_k=many")).header("content-type", "image/jpeg").body(zebra()),
            422,
            "invalid_parameter",
        ),
        (
            "unknown parameter",
            c.post(s.url("/classify?topk=3")).header("content-type", "image/jpeg").body(zebra()),
            422,
            "invalid_parameter",
        ),
        (
            "text/plain",
            c.post(s.url("/classify")).header("content-type", "text/plain").body(text.clone()),
            415,
            "unsupported_media_type",
        ),
        ("no content type", c.post(s.url("/classify")).body(zebra()), 415, "unsupported_media_type"),
        (
            "body over the limit",
            c.post(s.url("/classify")).header("content-type", "image/png").body(vec![0u8; 400_000]),
            413,
            "payload_too_large",
        ),
        (
            "multipart without image",
            c.post(s.url("/classify")).multipart(reqwest::multipart::Form::new().text("model", "tiny")),
            400,
            "missing_image",
        ),
        (
            "bad JSON",
            c.post(s.url("/classify")).header("content-type", "application/json").body("{nope"),
            400,
            "bad_json",
        ),
        ("bad base64", c.post(s.url("/classify")).json(&serde_json::json!({"image": "%%%"})), 400, "bad_base64"),
        ("unknown route", c.get(s.url("/nope")), 404, "not_found"),
        ("preview: unknown class", c.get(s.url("/target-label?class=unicorn")), 422, "invalid_parameter"),
        ("preview: unknown model", c.get(s.url("/target-label?class=1&model=x")), 404, "unknown_model"),
    ];
    for (what, req, status, code) in cases {
        let (st, v) = json(req.send().await.unwrap()).await;
        assert_eq!(st, status, "{what}: {v}");
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
    }
    // The server is fine afterwards.
    let ok = c.post(s.url("/classify")).header("content-type", "image/jpeg").body(zebra()).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

fn common_png_header(w: u32, h: u32) -> Vec<u8> {
    // A real 1×1 PNG whose IHDR claims w×h (CRC fixed): a decompression bomb's header.
    let mut buf = Vec::new();
    image::RgbImage::new(1, 1).write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
    buf[16..20].copy_from_slice(&w.to_be_bytes());
    buf[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&buf[12..29]);
    buf[29..33].copy_from_slice(&crc.to_be_bytes());
    buf
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    // Jobs wait in the batcher for up to 3 s (batch of 64 never fills), so with room for 2 the
    // third concurrent request finds the queue full.
    let s = Server::start(&tiny_config(
        "[engine]\ndevice = \"cpu\"\nqueue_capacity = 2\nmax_batch_size = 64\nmax_batch_wait_ms = 3000\n",
    ));
    let c = client();
    let reqs = (0..6).map(|_| c.post(s.url("/classify")).header("content-type", "image/jpeg").body(zebra()).send());
    let res = futures::future::join_all(reqs).await;
    let mut statuses = Vec::new();
    for r in res {
        let r = r.unwrap();
        let status = r.status().as_u16();
        if status == 503 {
            assert_eq!(r.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
            let (_, v) = json(r).await;
            assert_eq!(v["error"]["code"], "queue_full");
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 503, 503, 503, 503], "exactly the capacity is served");
}

#[tokio::test]
async fn concurrent_requests_all_succeed_and_agree() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    let images = sample_images();
    let reqs = (0..32).map(|i| {
        let bytes = std::fs::read(&images[i % images.len()]).unwrap();
        c.post(s.url("/classify?top_k=5")).header("content-type", "image/jpeg").body(bytes).send()
    });
    let res = futures::future::join_all(reqs).await;
    let mut by_image: std::collections::HashMap<usize, Vec<u64>> = Default::default();
    for (i, r) in res.into_iter().enumerate() {
        let (st, v) = json(r.unwrap()).await;
        assert_eq!(st, 200, "{v}");
        let top = top_indices(&v);
        let first = by_image.entry(i % images.len()).or_insert_with(|| top.clone());
        assert_eq!(first, &top, "the same image must get the same answer whatever its batch");
    }
}

#[tokio::test]
async fn models_health_ready_and_openapi() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    let (st, v) = json(c.get(s.url("/health")).send().await.unwrap()).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("ok")));
    let (st, v) = json(c.get(s.url("/ready")).send().await.unwrap()).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("ready")));
    let (st, v) = json(c.get(s.url("/models")).send().await.unwrap()).await;
    assert_eq!(st, 200);
    assert_eq!(v["device"], "cpu");
    let names: Vec<&str> = v["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tiny", "tiny-faulty"]);
    assert_eq!(v["models"][0]["num_classes"], 10);
    assert_eq!(v["models"][0]["input"]["size"], 32);
    assert_eq!(v["models"][0]["matrix"]["method"], "from-weights");
    let (st, classes) = json(c.get(s.url("/models/tiny/classes")).send().await.unwrap()).await;
    assert_eq!(st, 200);
    assert_eq!(classes[0]["wnid"], "n01440764");

    // The served document is the checked-in one, which is what the code generates.
    let served = c.get(s.url("/openapi.json")).send().await.unwrap().text().await.unwrap();
    let served: Value = serde_json::from_str(&served).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        served, file,
        "openapi/openapi.json is stale: run `target/release/labelfool openapi -o openapi/openapi.json`"
    );
    for path in [
        "/classify",
        "/target-label",
        "/attack",
        "/models",
        "/health",
        "/ready",
        "/metrics",
        "/v2/models/{name}/infer",
        "/v2/repository/index",
        "/v2/repository/models/{name}/load",
        "/models/{name}/unload",
    ] {
        assert!(file["paths"].get(path).is_some(), "{path} missing from the spec");
    }
    // Operation ids are unique (clients generated from the spec rely on it).
    let mut ids: Vec<&str> = file["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|p| p.as_object().unwrap().values().filter_map(|op| op["operationId"].as_str()))
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate operationId in the spec");
}

#[test]
fn checked_in_openapi_matches_the_binary() {
    let out = std::process::Command::new(BIN).arg("openapi").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json")).unwrap();
    assert!(
        generated == file,
        "openapi/openapi.json differs from `labelfool openapi`; regenerate it with `target/release/labelfool openapi -o openapi/openapi.json`"
    );
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    let r = c.get(s.url("/health")).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = c.get(s.url("/health")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID is generated: {id}");
}
