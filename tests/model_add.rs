//! `labelfool model add`: a user's ONNX file (the setup's Lite1, exported with torch.onnx.export)
//! becomes a bundle that matches onnxruntime and attacks; broken models are refused with a
//! message naming the problem, and nothing is written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("LABELFOOL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| models_dir().parent().unwrap().join("torch-2.13.0"));
    venv.join("bin/python")
}

fn add(args: &[&str]) -> Output {
    Command::new(BIN).args(["--device", "cpu", "model", "add"]).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Nothing but `keep` in `dir` (no bundle, no staging directory left behind).
fn assert_nothing_written(dir: &Path, keep: &[&str]) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    assert!(left.is_empty(), "written despite the failure: {left:?}");
}

/// Small TorchScript models a user might bring by mistake, made with the setup's torch.
fn faulty_models(dir: &Path) {
    let script = r#"
import sys, torch, torch.nn as nn
out = sys.argv[1]
torch.manual_seed(0)
class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)
    def forward(self, x):
        return self.fc(x.detach().mean(dim=(2, 3)))
class Fixed32(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)
    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], 3 * 32 * 32))
x = torch.rand(2, 3, 32, 32)
torch.jit.trace(NoGrad(), x).save(f"{out}/no-grad.pt")
torch.jit.trace(Fixed32(), x).save(f"{out}/fixed-32.pt")
"#;
    let status = Command::new(venv_python()).args(["-c", script]).arg(dir).status().unwrap();
    assert!(status.success());
}

#[ignore = "partner tier (onnxruntime): scripts/test runs it"]
#[tokio::test]
async fn onnx_model_matches_onnxruntime_and_attacks() {
    let onnx = models_dir().join("triton-repo/efficientnet-lite1/1/model.onnx");
    assert!(onnx.is_file(), "the setup exports Lite1 to ONNX: {}", onnx.display());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lite1");
    let zebra = fixture("images/n02391049_zebra.JPEG");
    let o = add(&[
        "efficientnet-lite1",
        "--onnx",
        onnx.to_str().unwrap(),
        "--size",
        "240",
        "--resize",
        "274",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.5,0.5,0.5",
        "--output",
        out.to_str().unwrap(),
        "--image",
        zebra.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // The reported difference to onnxruntime, within the tolerance.
    let diff: f64 = err
        .split("max |logit − onnxruntime| = ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no reported difference: {err}"));
    assert!(diff <= 1e-3, "{diff}");
    assert!(err.contains("zebra"), "the check image is a zebra: {err}");
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    let stored = meta["source"]["onnxruntime_check"]["max_abs_diff"].as_f64().unwrap();
    assert!((stored - diff).abs() <= stored * 1e-3, "stored {stored}, printed {diff}");
    assert_eq!(meta["input"]["mean"], serde_json::json!([0.5, 0.5, 0.5]));
    assert!(meta["model_sha256"].as_str().unwrap().len() == 64);
    assert!(out.join("distance.npy").is_file());
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(printed.contains("[[models]]") && printed.contains(out.to_str().unwrap()), "{printed}");
    // The bundle serves and attacks, pasted as printed.
    let s = Server::start(&printed);
    let res = client()
        .post(s.url("/attack"))
        .multipart(multipart_image(read_fixture("images/n02391049_zebra.JPEG"), "z.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["model"], "efficientnet-lite1");
    assert_eq!(v["original"]["label"], "zebra", "{v}");
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["final"]["index"], v["target"]["index"]);
    // The delivered PNG, re-classified by the added model, is the target.
    assert!(assert_delivered(&s, Some("efficientnet-lite1"), &png_of(&v), &v, "model add").await);
    // A second add to the same place is refused: nothing is overwritten.
    let o = add(&["again", "--torchscript", out.join("model.pt").to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
}

#[test]
fn broken_models_are_refused_with_the_reason_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    faulty_models(d);
    let garbage = d.join("corrupt.onnx");
    std::fs::write(&garbage, b"\x08\x07this is not a protobuf").unwrap();
    let five = d.join("five.txt");
    std::fs::write(&five, "a\nb\nc\nd\ne\n").unwrap();
    let tiny = models_dir().join("tiny/model.pt");
    let lite1 = models_dir().join("triton-repo/efficientnet-lite1/1/model.onnx");
    let out = d.join("bundle");
    let out_s = out.to_str().unwrap();
    let (no_grad, fixed_32, tiny_classes) =
        (d.join("no-grad.pt"), d.join("fixed-32.pt"), tiny.with_file_name("classes.txt"));
    let (no_grad, fixed_32, tiny_classes) =
        (no_grad.to_str().unwrap(), fixed_32.to_str().unwrap(), tiny_classes.to_str().unwrap());
    let fixtures = ["no-grad.pt", "fixed-32.pt", "corrupt.onnx", "five.txt"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["m", "--onnx", garbage.to_str().unwrap(), "--output", out_s], "is not a valid ONNX model"),
        (vec!["m", "--torchscript", garbage.to_str().unwrap(), "--output", out_s, "--size", "32"], "cannot load"),
        (
            vec![
                "m",
                "--torchscript",
                tiny.to_str().unwrap(),
                "--classes",
                five.to_str().unwrap(),
                "--size",
                "32",
                "--output",
                out_s,
            ],
            "outputs 10 classes per image but the class list has 5",
        ),
        (
            vec!["m", "--torchscript", no_grad, "--classes", tiny_classes, "--size", "32", "--output", out_s],
            "no gradient reaches the input",
        ),
        (
            vec!["m", "--torchscript", fixed_32, "--classes", tiny_classes, "--size", "64", "--output", out_s],
            "forward failed on a 2×3×64×64 batch",
        ),
        (vec!["m", "--onnx", lite1.to_str().unwrap(), "--size", "224", "--output", out_s], "wrong input size"),
    ];
    for (args, expect) in cases {
        let o = add(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} must fail");
        assert!(err.contains(expect), "{args:?}: stderr lacks {expect:?}:\n{err}");
        assert_nothing_written(d, &fixtures);
    }
    // The fixed-size model is fine at its own size.
    let o = add(&[
        "m",
        "--torchscript",
        fixed_32,
        "--classes",
        tiny_classes,
        "--size",
        "32",
        "--resize",
        "36",
        "--output",
        out_s,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.join("model.json").is_file() && out.join("classes.txt").is_file() && out.join("distance.npy").is_file()
    );
}
