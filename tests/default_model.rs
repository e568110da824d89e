//! End-to-end checks on the real default model (EfficientNet-Lite0, ImageNet): the server, the
//! CLI and the binary's link against the cached libtorch.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// `labelfool-official/groundtruth.csv`: file → 0-based ImageNet class.
fn ground_truth() -> Vec<(String, u64)> {
    std::fs::read_to_string(fixture("labelfool-official/groundtruth.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let (f, c) = l.split_once(',').unwrap();
            (f.to_string(), c.trim().parse().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn zebra_is_a_zebra_over_http() {
    let s = Server::start(&default_model_config(""));
    let res = client()
        .post(s.url("/classify"))
        .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "zebra.JPEG"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["model"], "efficientnet-lite0");
    assert_eq!(v["top"][0]["label"], "zebra", "{v}");
    assert_eq!(v["top"][0]["wnid"], "n02391049");
    assert!(v["top"][0]["probability"].as_f64().unwrap() > 0.5);
}

#[tokio::test]
async fn cli_and_server_agree_on_the_official_images_and_find_their_classes() {
    let truth = ground_truth();
    let files: Vec<_> = truth.iter().map(|(f, _)| fixture(&format!("labelfool-official/{f}"))).collect();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), format!("[engine]\ndevice = \"cpu\"\n{}", default_model_config(""))).unwrap();
    let out = Command::new(BIN)
        .args(["classify", "--json", "--top-k", "5", "--config"])
        .arg(config.path())
        .args(&files)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(cli.len(), 3);

    let s = Server::start(&default_model_config(""));
    let c = client();
    for ((file, class), line) in truth.iter().zip(&cli) {
        assert!(line["file"].as_str().unwrap().ends_with(file.as_str()));
        let cli_top: Vec<u64> = line["top"].as_array().unwrap().iter().map(|t| t["index"].as_u64().unwrap()).collect();
        assert!(cli_top.contains(class), "{file}: ground truth {class} not in the CLI's top-5 {cli_top:?}");
        let bytes = read_fixture(&format!("labelfool-official/{file}"));
        let v: Value = c
            .post(s.url("/classify?top_k=5"))
            .header("content-type", "image/jpeg")
            .body(bytes)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let server_top: Vec<u64> = v["top"].as_array().unwrap().iter().map(|t| t["index"].as_u64().unwrap()).collect();
        assert_eq!(cli_top, server_top, "{file}: the CLI and the server disagree");
        for (a, b) in line["top"].as_array().unwrap().iter().zip(v["top"].as_array().unwrap()) {
            let (pa, pb) = (a["probability"].as_f64().unwrap(), b["probability"].as_f64().unwrap());
            assert!((pa - pb).abs() < 1e-6, "{file}: {pa} vs {pb}");
        }
    }
}

#[test]
fn binary_finds_libtorch_without_ld_library_path_and_doctor_reports_the_pin() {
    // A missing or failing `ldd` fails the test: the linking check is never skipped silently.
    let ldd = Command::new("ldd")
        .arg(BIN)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd to check the binary's linking: {e}"));
    let text = String::from_utf8_lossy(&ldd.stdout);
    assert!(ldd.status.success(), "ldd {BIN} failed ({}):\n{text}{}", ldd.status, String::from_utf8_lossy(&ldd.stderr));
    assert!(!text.contains("not found"), "unresolved libraries:\n{text}");
    assert!(text.contains("libtorch_cpu.so"), "{text}");
    assert!(text.contains("libtorch_cuda.so"), "torch_cuda must be linked so CUDA is usable on GPU hosts:\n{text}");
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), default_model_config("")).unwrap();
    let out = Command::new(BIN)
        .args(["doctor", "--json", "--config"])
        .arg(config.path())
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["torch"].as_str().unwrap().starts_with("2.13.0"), "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["models"][0]["loads_and_runs"], true);
    assert_eq!(v["models"][0]["matrix"]["size"], 1000);
}

#[test]
fn start_up_fails_clearly_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[engine]\ndevice = \"tpu\"\n[[models]]\nname = \"m\"\ndir = \"/nowhere\"\n".to_string(), "engine.device"),
        ("[[models]]\nname = \"m\"\ndir = \"/nowhere\"\n".to_string(), "model.json"),
        (format!("[engine]\ndevice = \"cuda:7\"\n{}", default_model_config("")), "cuda:7"),
    ];
    for (i, (toml, expect)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = serve_until_exit(&path, dir.path());
        assert!(!out.status.success(), "case {i} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "case {i}: stderr lacks {expect:?}:\n{err}");
    }
    // A bundle whose class list disagrees with its metadata.
    let bad = dir.path().join("bad-bundle");
    std::fs::create_dir(&bad).unwrap();
    let tiny = models_dir().join("tiny");
    for f in ["model.pt", "model.json"] {
        std::fs::copy(tiny.join(f), bad.join(f)).unwrap();
    }
    std::fs::write(bad.join("classes.txt"), "a\nb\nc\n").unwrap();
    let path = dir.path().join("wrong-classes.toml");
    std::fs::write(&path, format!("[[models]]\nname = \"m\"\ndir = \"{}\"\n", bad.display())).unwrap();
    let out = serve_until_exit(&path, dir.path());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lists 3 classes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn kserve_v2_infer_answers_zebra() {
    use base64::Engine as _;
    let s = Server::start(&default_model_config(""));
    let b64 = base64::engine::general_purpose::STANDARD.encode(read_fixture("images/n02391049_zebra.JPEG"));
    let body = serde_json::json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]});
    let res = client().post(s.url("/v2/models/efficientnet-lite0/infer")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let out = &v["outputs"][0];
    assert_eq!(out["shape"], serde_json::json!([1, 1000]));
    let p: Vec<f64> = out["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(best, 340, "zebra is class 340");
}
