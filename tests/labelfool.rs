//! LabelFool over HTTP: target-label preview and decision, `/attack` round trips on the real
//! default model (the delivered PNG is what `/classify` says it is), and parameter validation.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::Value;

/// Attacks `bytes`, then classifies the returned PNG; checks what the issue promises.
async fn round_trip(s: &Server, c: &reqwest::Client, name: &str, bytes: Vec<u8>, content_type: &str) -> (bool, Value) {
    let dims = decode_dims(&bytes);
    let (st, v) =
        json(c.post(s.url("/attack")).header("content-type", content_type).body(bytes).send().await.unwrap()).await;
    assert_eq!(st, 200, "{name}: {v}");
    let png = base64::engine::general_purpose::STANDARD.decode(v["png_base64"].as_str().unwrap()).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let got = decode_dims(&png);
    assert_eq!((got.0, got.1), (dims.0, dims.1), "{name}: the PNG must have the upload's size");
    assert_eq!(got.2, dims.2, "{name}: alpha must be kept exactly when the upload had it");
    // /classify agrees with the reported final label, and success means the PNG is the target.
    let success = assert_delivered(s, None, &png, &v, name).await;
    let target = v["target"]["index"].as_u64().unwrap();
    assert_ne!(target, v["original"]["index"].as_u64().unwrap(), "{name}: the target is never the prediction");
    let p = &v["perturbation"];
    assert!(p["perceptibility"].as_f64().unwrap() > 0.0 && p["linf"].as_f64().unwrap() <= 1.0);
    assert!(v["iterations"].as_u64().unwrap() >= 1 && v["iterations"].as_u64().unwrap() <= 50);
    (success, v)
}

#[tokio::test]
async fn attack_round_trips_on_the_real_model() {
    let s = Server::start(&default_model_config(""));
    let c = client();
    let images = sample_images();
    assert!(images.len() >= 10);
    let mut jobs: Vec<(String, Vec<u8>, &str)> = images
        .iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(p).unwrap(), "image/jpeg"))
        .collect();
    jobs.push(("zebra as PNG".into(), png_from(&fixture("images/n02391049_zebra.JPEG")), "image/png"));
    jobs.push((
        "otter, 333×250 RGBA".into(),
        rgba_png_from(&fixture("images/n02444819_otter.JPEG"), 333, 250),
        "image/png",
    ));
    // Submitted together: the worker batches them continuously.
    let results = futures::future::join_all(jobs.into_iter().map(|(name, bytes, ct)| {
        let (s, c) = (&s, &c);
        async move { (name.clone(), round_trip(s, c, &name, bytes, ct).await) }
    }))
    .await;
    let successes = results.iter().filter(|(_, (ok, _))| *ok).count();
    let failed: Vec<&String> = results.iter().filter(|(_, (ok, _))| !*ok).map(|(n, _)| n).collect();
    assert!(successes >= results.len() - 1, "only {successes}/{} attacks succeeded; failed: {failed:?}", results.len());
    let (_, (_, alpha)) = results.iter().find(|(n, _)| n.contains("RGBA")).unwrap();
    assert_eq!(alpha["image"]["has_alpha"], true);
}

#[tokio::test]
async fn attack_as_png_carries_its_metadata_in_headers() {
    let s = Server::start(&default_model_config(""));
    let res = client()
        .post(s.url("/attack?target=n02129604"))
        .header("accept", "image/png")
        .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "zebra.JPEG"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "image/png");
    let h = |k: &str| res.headers().get(format!("x-labelfool-{k}")).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(h("target-label").as_deref(), Some("tiger"));
    assert_eq!(h("target-chosen-by").as_deref(), Some("caller"));
    assert_eq!(h("original-label").as_deref(), Some("zebra"));
    assert_eq!(h("success").as_deref(), Some("true"));
    assert_eq!(h("final-label").as_deref(), Some("tiger"));
    assert!(h("iterations").unwrap().parse::<u32>().unwrap() >= 1);
    assert!(h("perceptibility").unwrap().parse::<f64>().unwrap() > 0.0);
    let index = |k: &str| h(&format!("{k}-index")).and_then(|i| i.parse::<u64>().ok());
    let report = serde_json::json!({
        "success": h("success").map(|v| v == "true"),
        "original": {"index": index("original")},
        "target": {"index": index("target")},
        "final": {"index": index("final")},
    });
    let png = res.bytes().await.unwrap();
    assert_eq!(decode_dims(&png), (500, 375, false));
    // The headers are the attack's word; the PNG itself, re-classified by the server, is a tiger.
    let (top1, label) = classify_top1(&s, None, &png).await;
    assert_eq!(label, "tiger", "the delivered PNG is classified as {label}, not the target");
    assert!(assert_verdict(top1, &report, "Accept: image/png"));
}

#[tokio::test]
async fn bad_attack_parameters_are_422_naming_the_parameter_while_others_are_served() {
    let s = Server::start(&tiny_config(""));
    let c = client();
    let img = read_fixture("images/n02219486_ant.JPEG");
    let (_, cls) = json(
        c.post(s.url("/classify?top_k=1")).header("content-type", "image/jpeg").body(img.clone()).send().await.unwrap(),
    )
    .await;
    let predicted = cls["top"][0]["index"].as_u64().unwrap();
    let cases = [
        ("target=unicorn".to_string(), "target"),
        (format!("target={predicted}"), "target"),
        ("target=10".to_string(), "target"),
        ("max_iter=0".to_string(), "max_iter"),
        ("max_iter=501".to_string(), "max_iter"),
        ("max_iter=-3".to_string(), "max_iter"),
        ("overshoot=NaN".to_string(), "overshoot"),
        ("overshoot=-0.1".to_string(), "overshoot"),
        ("delta1=1.5".to_string(), "delta1"),
        ("delta1=0".to_string(), "delta1"),
        ("delta2=-0.01".to_string(), "delta2"),
        ("delta2=1".to_string(), "delta2"),
        ("method=carlini-wagner".to_string(), "method"),
        ("method=pgd&step=0".to_string(), "step"),
        ("method=pgd&step=inf".to_string(), "step"),
        ("method=fgsm&step=0.01".to_string(), "step"),
        ("maxiter=5".to_string(), "maxiter"),
    ];
    // Fire all the bad requests and one good attack and classify at once: the bad ones must not
    // disturb the good ones.
    let bad = futures::future::join_all(cases.iter().map(|(q, _)| {
        c.post(s.url(&format!("/attack?{q}"))).header("content-type", "image/jpeg").body(img.clone()).send()
    }));
    let good_attack =
        c.post(s.url("/attack?max_iter=20")).header("content-type", "image/jpeg").body(img.clone()).send();
    let good_classify = c.post(s.url("/classify")).header("content-type", "image/jpeg").body(img.clone()).send();
    let (bad, good_attack, good_classify) = tokio::join!(bad, good_attack, good_classify);
    for ((q, param), res) in cases.iter().zip(bad) {
        let (st, v) = json(res.unwrap()).await;
        assert_eq!(st, 422, "{q}: {v}");
        assert_eq!(v["error"]["param"], *param, "{q}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(param), "{q}: {v}");
    }
    assert_eq!(good_attack.unwrap().status(), 200);
    assert_eq!(good_classify.unwrap().status(), 200);
    // JSON bodies carry parameters as numbers; the same validation applies.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&img);
    let (st, v) =
        json(c.post(s.url("/attack")).json(&serde_json::json!({"image": b64, "max_iter": 0})).send().await.unwrap())
            .await;
    assert_eq!((st, v["error"]["param"].as_str()), (422, Some("max_iter")));
}

#[tokio::test]
async fn preview_is_sorted_and_never_lists_the_class_itself() {
    let s = Server::start(&default_model_config(""));
    let c = client();
    for class in ["0", "zebra", "n02129604", "Siberian husky", "999"] {
        let (st, v) = json(c.get(s.url(&format!("/target-label?class={class}&top=10"))).send().await.unwrap()).await;
        assert_eq!(st, 200, "{v}");
        let me = v["class"]["index"].as_u64().unwrap();
        let n = v["neighbours"].as_array().unwrap();
        assert_eq!(n.len(), 10);
        let d: Vec<f64> = n.iter().map(|x| x["distance"].as_f64().unwrap()).collect();
        assert!(d.windows(2).all(|w| w[0] <= w[1]), "{class}: not sorted: {d:?}");
        assert!(n.iter().all(|x| x["index"].as_u64().unwrap() != me), "{class}: lists itself");
    }
    let (st, _) = json(c.get(s.url("/target-label?class=zebra&top=0")).send().await.unwrap()).await;
    assert_eq!(st, 422);
}

#[tokio::test]
async fn decision_follows_the_branches() {
    let s = Server::start(&default_model_config(""));
    let c = client();
    let zebra = read_fixture("images/n02391049_zebra.JPEG");
    // Zebra is classified with p̂1 ≈ 0.94 > δ1 = 0.8: MLE branch, target = nearest to zebra.
    let (st, v) = json(
        c.post(s.url("/target-label")).header("content-type", "image/jpeg").body(zebra.clone()).send().await.unwrap(),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let d = &v["decision"];
    assert_eq!(d["branch"], "mle");
    assert_eq!(d["candidates"].as_array().unwrap().len(), 1);
    let (_, preview) = json(c.get(s.url("/target-label?class=zebra&top=1")).send().await.unwrap()).await;
    assert_eq!(d["target"]["index"], preview["neighbours"][0]["index"], "MLE target = the preview's nearest class");
    // δ1 = 1 forces the weighted branch; with δ2 = 0.0001 S holds several classes, none a target.
    let (st, v) = json(
        c.post(s.url("/target-label?delta1=1&delta2=0.0001&alternatives=3"))
            .header("content-type", "image/jpeg")
            .body(zebra)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let d = &v["decision"];
    assert_eq!(d["branch"], "weighted");
    let s_set: Vec<u64> = d["candidates"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert!(s_set.len() > 1, "{d}");
    let ranking: Vec<(u64, f64)> = d["ranking"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["distance"].as_f64().unwrap()))
        .collect();
    assert_eq!(ranking.len(), 4);
    assert_eq!(ranking[0].0, d["target"]["index"].as_u64().unwrap());
    assert!(ranking.iter().all(|(i, _)| !s_set.contains(i)), "members of S are never targets");
    assert!(ranking.windows(2).all(|w| w[0].1 <= w[1].1));
}

#[test]
fn cli_attack_writes_the_png_it_reports() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[engine]\ndevice = \"cpu\"\n{}", default_model_config(""))).unwrap();
    let out_png = dir.path().join("adv.png");
    let out = std::process::Command::new(BIN)
        .args(["attack", "--json", "--config"])
        .arg(&config)
        .arg(fixture("images/n01440764_tench.JPEG"))
        .arg("-o")
        .arg(&out_png)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["success"], true);
    let cls = std::process::Command::new(BIN)
        .args(["classify", "--json", "--top-k", "1", "--config"])
        .arg(&config)
        .arg(&out_png)
        .output()
        .unwrap();
    let c: Value = serde_json::from_slice(&cls.stdout).unwrap();
    assert_eq!(c["top"][0]["index"], v["final"]["index"]);
    assert_eq!(c["top"][0]["index"], v["target"]["index"]);
}
