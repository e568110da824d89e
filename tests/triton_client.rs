//! The server's `/v2` routes as the official Triton client library (`tritonclient[http]`, from the
//! setup's Python) calls them: health, metadata, configuration, statistics, inference with JSON and
//! with binary tensor data (in and out), the classification extension, and readable errors.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::Value;

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("LABELFOOL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| models_dir().parent().unwrap().join("torch-2.13.0"));
    venv.join("bin/python")
}

#[ignore = "partner tier (the Triton client): scripts/test runs it"]
#[tokio::test]
async fn the_official_triton_client_passes_its_calls() {
    let s = Server::start(&tiny_config(""));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/partners/triton_client.py");
    let zebra = fixture("images/n02391049_zebra.JPEG");
    let out = Command::new(venv_python())
        .arg(&script)
        .arg(s.addr.to_string())
        .args(["tiny", zebra.to_str().unwrap(), "32"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tritonclient failed:\n{}\n{}", String::from_utf8_lossy(&out.stderr), s.log());
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (seen["live"].as_bool(), seen["ready"].as_bool(), seen["model_ready"].as_bool()),
        (Some(true), Some(true), Some(true))
    );
    for ext in ["binary_tensor_data", "classification", "model_configuration", "statistics", "model_repository"] {
        assert!(
            seen["extensions"].as_array().unwrap().iter().any(|e| e == ext),
            "{ext} missing: {}",
            seen["extensions"]
        );
    }
    assert_eq!(seen["metadata"]["name"], "tiny");
    assert_eq!(seen["config"]["input"][1]["dims"], serde_json::json!([-1, 3, 32, 32]));

    // The BYTES input gives what /classify gives for the same file.
    let res = client()
        .post(s.url("/classify?top_k=10"))
        .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "z.jpg"))
        .send()
        .await
        .unwrap();
    let v: Value = res.json().await.unwrap();
    let probs: Vec<f64> = seen["bytes_binary"][0].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
    for top in v["top"].as_array().unwrap() {
        let i = top["index"].as_u64().unwrap() as usize;
        assert!((probs[i] - top["probability"].as_f64().unwrap()).abs() < 1e-5, "class {i}: {} vs {top}", probs[i]);
    }
    // JSON, binary and default (binary) outputs agree, row for row.
    let json = &seen["fp32_json"];
    assert_eq!(json.as_array().unwrap().len(), 2);
    for other in ["fp32_binary", "fp32_default_outputs"] {
        for (a, b) in json.as_array().unwrap().iter().zip(seen[other].as_array().unwrap()) {
            for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
                assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-6, "{other}: {x} vs {y}");
            }
        }
    }
    // Classification: the top 3 of each row as "<probability>:<index>:<label>", best first.
    let row0: Vec<f64> = json[0].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
    let best = (0..row0.len()).max_by(|&a, &b| row0[a].total_cmp(&row0[b])).unwrap();
    let first = seen["classification"][0][0].as_str().unwrap();
    let parts: Vec<&str> = first.splitn(3, ':').collect();
    assert_eq!(parts[1].parse::<usize>().unwrap(), best, "{first}");
    assert!((parts[0].parse::<f64>().unwrap() - row0[best]).abs() < 1e-5);
    assert_eq!(seen["classification"][0].as_array().unwrap().len(), 3);
    // Statistics count what was served.
    let stat = &seen["stats"]["model_stats"][0];
    assert_eq!(stat["name"], "tiny");
    assert!(stat["inference_count"].as_u64().unwrap() >= 8, "{stat}");
    assert!(stat["execution_count"].as_u64().unwrap() >= 1);
    assert!(stat["inference_stats"]["success"]["ns"].as_u64().unwrap() > 0);
    // Errors reach the client in the protocol's shape: readable and printable.
    let unknown = &seen["errors"]["unknown_model"];
    assert_eq!(unknown["status"], "404", "{unknown}");
    assert!(unknown["message"].as_str().unwrap().contains("no-such-model"), "{unknown}");
    let shape = &seen["errors"]["bad_shape"];
    assert_eq!(shape["status"], "400", "{shape}");
    assert!(shape["printed"].as_str().unwrap().contains("[N, 3, 32, 32]"), "{shape}");
}
