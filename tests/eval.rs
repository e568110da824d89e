//! `labelfool eval` end to end on the tiny model: bad files are reported and skipped, every method
//! runs, and the report's figures are real charts.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

#[test]
fn eval_reports_bad_files_goes_on_and_renders_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for f in ["n02391049_zebra.JPEG", "n01440764_tench.JPEG"] {
        std::fs::copy(fixture(&format!("images/{f}")), images.join(f)).unwrap();
    }
    let jpeg = read_fixture("images/n02219486_ant.JPEG");
    std::fs::write(images.join("n02219486_corrupt.JPEG"), &jpeg[..jpeg.len() / 4]).unwrap();
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    std::os::unix::fs::symlink(dir.path().join("missing.JPEG"), images.join("n01530575_unreadable.JPEG")).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, tiny_config("[engine]\ndevice = \"cpu\"\n")).unwrap();
    let out = dir.path().join("out");
    let run = Command::new(BIN)
        .args(["eval", "--methods", "labelfool,deepfool,fgsm,sparsefool", "--gallery", "1", "--config"])
        .arg(&config)
        .arg("--images")
        .arg(&images)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let records: Vec<Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 5 * 4, "every file under every method");
    for bad in ["n02219486_corrupt.JPEG", "notes.txt", "n01530575_unreadable.JPEG"] {
        let rs: Vec<&Value> = records.iter().filter(|r| r["file"] == bad).collect();
        assert_eq!(rs.len(), 4);
        assert!(rs.iter().all(|r| r["error"].is_string()), "{bad} must be reported as an error: {rs:?}");
    }
    let good: Vec<&Value> = records.iter().filter(|r| r["error"].is_null()).collect();
    assert_eq!(good.len(), 2 * 4);
    assert!(good.iter().any(|r| r["true_class"]["label"] == "tench") && good.iter().any(|r| r["true_class"].is_null()));
    for r in &good {
        assert!(r["perceptibility"].is_number() && r["ssim"].is_number(), "{r}");
        assert!(r["wup"].is_number(), "ImageNet class ids give Wu-Palmer figures: {r}");
        // The reference is the true class when the model has it (tench), else the prediction (zebra).
        let expect = if r["true_class"].is_null() { &r["original"] } else { &r["true_class"] };
        assert_eq!(r["reference"]["index"], expect["index"], "{r}");
    }

    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let methods: Vec<&str> =
        summary["methods"].as_array().unwrap().iter().map(|m| m["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["labelfool", "deepfool", "fgsm", "sparsefool"]);
    for m in summary["methods"].as_array().unwrap() {
        assert_eq!(
            (m["images"].as_u64(), m["errors"].as_u64(), m["attacked"].as_u64()),
            (Some(5), Some(3), Some(2)),
            "{m}"
        );
    }

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in ["| method |", "Wu-Palmer", "notes.txt", "n02219486_corrupt.JPEG"] {
        assert!(report.contains(needle), "report lacks {needle:?}");
    }
    // Every image the report references exists and is a real, non-blank chart.
    let refs: Vec<&str> =
        report.match_indices("](").map(|(i, _)| &report[i + 2..]).map(|r| &r[..r.find(')').unwrap()]).collect();
    assert!(refs.iter().filter(|r| r.starts_with("charts/")).count() >= 3, "{refs:?}");
    assert!(refs.iter().any(|r| r.starts_with("gallery/")), "{refs:?}");
    for r in refs {
        let img = image::open(out.join(r)).unwrap_or_else(|e| panic!("{r}: {e}")).to_rgb8();
        assert!(img.width() >= 300 && img.height() >= 200, "{r} is {}×{}", img.width(), img.height());
        let distinct: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(distinct.len() > 20, "{r} looks blank ({} colours)", distinct.len());
    }
}

/// `eval --verify remote:<name>`: every upload and delivered image goes to the remote as well, and
/// the report's transfer matrix gets its column. The remote serves the same tiny network as the
/// local `tiny`, so both columns agree image by image.
#[test]
fn eval_verify_sends_every_delivered_image_to_a_remote() {
    let prod = Server::start(&tiny_config(""));
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for f in ["n02391049_zebra.JPEG", "n01440764_tench.JPEG", "n02219486_ant.JPEG"] {
        std::fs::copy(fixture(&format!("images/{f}")), images.join(f)).unwrap();
    }
    let remote = format!(
        "[[remotes]]\nname = \"prod\"\nurl = \"{}\"\nmodel = \"tiny\"\nclasses = \"{}\"\n[engine]\ndevice = \"cpu\"\n",
        prod.base,
        models_dir().join("tiny/classes.txt").display()
    );
    let config = dir.path().join("c.toml");
    std::fs::write(&config, tiny_config(&remote)).unwrap();
    let eval = |verify: &str, out: &std::path::Path| {
        Command::new(BIN)
            .args(["eval", "--methods", "labelfool,fgsm", "--model", "tiny", "--verify", verify, "--config"])
            .arg(&config)
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = dir.path().join("out");
    let run = eval("remote:prod,tiny", &out);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let records: Vec<Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3 * 2);
    for r in &records {
        assert!(r["error"].is_null(), "{r}");
        let t = r["transfer"].as_array().unwrap();
        let (remote, local) = (
            t.iter().find(|x| x["model"] == "remote:prod").unwrap_or_else(|| panic!("no remote column: {r}")),
            t.iter().find(|x| x["model"] == "tiny").unwrap(),
        );
        assert_eq!(remote["adversarial"]["index"], local["adversarial"]["index"], "{r}");
        assert_eq!(remote["transferred"], local["transferred"], "{r}");
        assert!(remote["transferred"].is_boolean(), "{r}");
        // The remote is the served `tiny` itself: its verdict is the server's own /classify of the
        // delivered image, and the record's success must be that image's.
        let top1 = remote["adversarial"]["index"].as_u64().unwrap();
        assert_verdict(top1, r, &format!("eval record {}/{}", r["method"], r["file"]));
    }
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for m in summary["methods"].as_array().unwrap() {
        let cols: Vec<&str> = m["transfer"].as_array().unwrap().iter().map(|t| t["model"].as_str().unwrap()).collect();
        assert!(cols.contains(&"remote:prod") && cols.contains(&"tiny"), "{m}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("remote:prod"), "the transfer matrix names the remote");
    // An unknown remote is refused before any attack runs.
    let run = eval("remote:nope", &dir.path().join("out2"));
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("nope"), "{}", String::from_utf8_lossy(&run.stderr));
}
