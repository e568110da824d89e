//! The distance-matrix builder end to end: extraction through the engine, shards and reduce (bit
//! for bit), class-mapping errors, semantic and blended matrices, and serving the result.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// The tiny model's ten classes, as ImageFolder directories with 1–3 fixture images each (the
/// builder does not care what the pictures show), plus one corrupt image.
fn image_folder(root: &Path) {
    let names = [
        "tench",
        "goldfish",
        "great white shark",
        "tiger shark",
        "hammerhead",
        "electric ray",
        "stingray",
        "cock",
        "hen",
        "ostrich",
    ];
    let images = sample_images();
    for (c, name) in names.iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for k in 0..(1 + c % 3) {
            let src = &images[(c + k) % images.len()];
            std::fs::copy(src, dir.join(format!("{k}.JPEG"))).unwrap();
        }
    }
    let jpeg = read_fixture("images/n02219486_ant.JPEG");
    std::fs::write(root.join("hen/corrupt.JPEG"), &jpeg[..jpeg.len() / 3]).unwrap();
}

fn labelfool(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("--config").arg(config).args(args).output().unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sidecar(npy: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(npy.with_extension("json")).unwrap()).unwrap()
}

#[tokio::test]
async fn build_shard_reduce_semantic_blend_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    image_folder(&root);
    let config = dir.path().join("c.toml");
    std::fs::write(&config, tiny_config("[engine]\ndevice = \"cpu\"\n")).unwrap();
    let p = |name: &str| -> PathBuf { dir.path().join(name) };
    let s = |p: &PathBuf| p.to_string_lossy().into_owned();

    // One run.
    let single = p("single.npy");
    let log = ok(labelfool(&config, &["matrix", "build", "--model", "tiny", "--images", &s(&root), "-o", &s(&single)]));
    assert!(log.contains("1 skipped"), "the corrupt image is skipped and counted: {log}");
    let meta = sidecar(&single);
    assert_eq!(meta["method"], "hausdorff");
    assert_eq!(meta["num_classes"], 10);
    assert_eq!(meta["details"]["images"], 19);
    assert_eq!(meta["details"]["skipped_images"], 1);

    // Two shards into another cache, then reduce: bit for bit the same matrix.
    let cache = p("shards");
    for shard in ["0/2", "1/2"] {
        ok(labelfool(
            &config,
            &["matrix", "build", "--model", "tiny", "--images", &s(&root), "--shard", shard, "--cache", &s(&cache)],
        ));
    }
    let reduced = p("reduced.npy");
    ok(labelfool(&config, &["matrix", "reduce", "--model", "tiny", "--cache", &s(&cache), "-o", &s(&reduced)]));
    assert_eq!(
        sidecar(&reduced)["content_sha256"],
        meta["content_sha256"],
        "shard-then-reduce must equal a single run"
    );
    assert_eq!(std::fs::read(&reduced).unwrap(), std::fs::read(&single).unwrap());

    // A reduce over an incomplete cache says what is missing.
    let half = p("half");
    ok(labelfool(
        &config,
        &["matrix", "build", "--model", "tiny", "--images", &s(&root), "--shard", "0/2", "--cache", &s(&half)],
    ));
    let out = labelfool(&config, &["matrix", "reduce", "--model", "tiny", "--cache", &s(&half), "-o", &s(&p("x.npy"))]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("remaining shards"));

    // Class names that match nothing are listed.
    std::fs::create_dir(root.join("unicorn")).unwrap();
    std::fs::copy(&sample_images()[0], root.join("unicorn/a.JPEG")).unwrap();
    let out = labelfool(&config, &["matrix", "build", "--model", "tiny", "--images", &s(&root), "-o", &s(&p("y.npy"))]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unicorn"), "{err}");

    // Semantic (WordNet) and blended matrices.
    let sem = p("semantic.npy");
    ok(labelfool(&config, &["matrix", "semantic", "--model", "tiny", "-o", &s(&sem)]));
    assert_eq!(sidecar(&sem)["method"], "semantic-wup");
    // Values, not only names: both matrices are distances (symmetric, zero diagonal, positive
    // off it), and WordNet's closeness shows in the semantic one. The classes, in the tiny
    // model's order: 0 tench, 1 goldfish, 2 great white shark, 3 tiger shark, 4 hammerhead,
    // 5 electric ray, 6 stingray, 7 cock, 8 hen, 9 ostrich.
    let read = |p: &PathBuf| -> ndarray::Array2<f32> { ndarray_npy::read_npy(p).unwrap() };
    let (perceptual, semantic) = (read(&single), read(&sem));
    for (name, m) in [("perceptual", &perceptual), ("semantic", &semantic)] {
        assert_eq!(m.dim(), (10, 10), "{name}");
        for i in 0..10 {
            assert_eq!(m[[i, i]], 0.0, "{name}: diagonal at {i}");
            for j in (0..10).filter(|&j| j != i) {
                assert_eq!(m[[i, j]], m[[j, i]], "{name}: not symmetric at ({i}, {j})");
                assert!(m[[i, j]].is_finite() && m[[i, j]] > 0.0, "{name}: ({i}, {j}) = {}", m[[i, j]]);
            }
        }
    }
    assert!(semantic.iter().all(|v| (0.0..=1.0).contains(v)), "1 − Wu-Palmer lies in [0, 1]: {semantic}");
    let d = |i: usize, j: usize| semantic[[i, j]];
    assert!(d(7, 8) < d(0, 9), "cock–hen ({}) must be closer than tench–ostrich ({})", d(7, 8), d(0, 9));
    assert!(d(2, 3) < d(2, 8), "great white–tiger shark ({}) vs great white–hen ({})", d(2, 3), d(2, 8));
    assert!(d(5, 6) < d(5, 7), "electric ray–stingray ({}) vs electric ray–cock ({})", d(5, 6), d(5, 7));
    assert!(d(0, 1) < d(0, 8), "tench–goldfish ({}) vs tench–hen ({})", d(0, 1), d(0, 8));
    let blend = p("blend.npy");
    ok(labelfool(
        &config,
        &["matrix", "blend", "--perceptual", &s(&single), "--semantic", &s(&sem), "--alpha", "0.5", "-o", &s(&blend)],
    ));
    let b: ndarray::Array2<f32> = ndarray_npy::read_npy(&blend).unwrap();
    assert!(b.iter().all(|v| (0.0..=1.0).contains(v)));
    // The blend is ½ of each matrix rescaled to [0, 1] over its off-diagonal entries, computed
    // here on its own.
    let unit = |m: &ndarray::Array2<f32>| {
        let off: Vec<f32> = m.indexed_iter().filter(|((i, j), _)| i != j).map(|(_, &v)| v).collect();
        let (lo, hi) = off.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        ndarray::Array2::from_shape_fn(m.dim(), |(i, j)| if i == j { 0.0 } else { (m[[i, j]] - lo) / (hi - lo) })
    };
    let expected = (unit(&perceptual) + unit(&semantic)) * 0.5;
    for ((ij, got), want) in b.indexed_iter().zip(expected.iter()) {
        assert!((got - want).abs() <= 1e-5, "blend at {ij:?}: {got}, expected {want}");
    }

    // The built matrix serves /target-label.
    let models = models_dir();
    let serve_cfg = format!(
        "[engine]\ndevice = \"cpu\"\n[[models]]\nname = \"tiny\"\ndir = \"{}\"\nmatrix = \"{}\"\n",
        models.join("tiny").display(),
        single.display()
    );
    let server = Server::start(&serve_cfg);
    let c = client();
    let v: Value = c.get(server.url("/target-label?class=tench&top=3")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["matrix_method"], "hausdorff");
    assert_eq!(v["neighbours"].as_array().unwrap().len(), 3);
    let res = c
        .post(server.url("/target-label"))
        .header("content-type", "image/jpeg")
        .body(read_fixture("images/n01440764_tench.JPEG"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = c
        .post(server.url("/attack"))
        .header("content-type", "image/jpeg")
        .body(read_fixture("images/n01440764_tench.JPEG"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_matrix_from_a_few_images_per_class_serves_the_default_model() {
    // Twelve ImageNet classes with one image each (flat `<wnid>_*` files); the other 988 classes
    // are filled with the largest measured distance.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.npy");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, default_model_config("[engine]\ndevice = \"cpu\"\n")).unwrap();
    let log = ok(labelfool(
        &config,
        &[
            "matrix",
            "build",
            "--images",
            &fixture("images").to_string_lossy(),
            "--per-class",
            "1",
            "-o",
            &out.to_string_lossy(),
        ],
    ));
    assert!(log.contains("12 images"), "{log}");
    let meta = sidecar(&out);
    assert_eq!(meta["num_classes"], 1000);
    assert_eq!(meta["details"]["classes_without_images"], 988);
    let serve_cfg = format!(
        "[engine]\ndevice = \"cpu\"\n[[models]]\nname = \"efficientnet-lite0\"\ndir = \"{}\"\nmatrix = \"{}\"\n",
        models_dir().join("efficientnet-lite0").display(),
        out.display()
    );
    let server = Server::start(&serve_cfg);
    let v: Value =
        client().get(server.url("/target-label?class=zebra&top=3")).send().await.unwrap().json().await.unwrap();
    let neighbours: Vec<&str> =
        v["neighbours"].as_array().unwrap().iter().map(|n| n["wnid"].as_str().unwrap()).collect();
    let measured: Vec<String> = sample_images().iter().map(|p| wnid_of(p)).collect();
    assert!(
        neighbours.iter().all(|w| measured.iter().any(|m| m == w)),
        "the nearest classes are the measured ones: {neighbours:?}"
    );
}
