//! `labelfool model add`: turns a user's TorchScript or ONNX classifier into a bundle the server
//! serves, after checking it the way requests will use it. Nothing is written unless every check
//! passes: the bundle is assembled in a staging directory and renamed into place at the end.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use sha2::Digest;

use super::Cli;
use crate::model::bundle::{Description, IMAGENET, ModelMeta};
use crate::model::{BatchPolicy, Bundle, LoadedModel, ModelInfo, tensor_rows};

/// The converter `--onnx` runs (onnx2torch, torch.jit.trace, onnxruntime), with the setup's Python.
const ONNX_SCRIPT: &str = include_str!("../../scripts/onnx_to_torchscript.py");

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Check a TorchScript or ONNX classifier and write it as a bundle, with its data-free matrix.
    Add(AddArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct AddArgs {
    /// The model's name (letters, digits, '-', '_', '.').
    pub name: String,
    /// A TorchScript file: `forward(x) -> logits` for `[B,3,S,S]` input.
    #[arg(long, conflicts_with = "onnx", required_unless_present = "onnx")]
    pub torchscript: Option<PathBuf>,
    /// An ONNX file, converted with onnx2torch and checked against onnxruntime.
    #[arg(long)]
    pub onnx: Option<PathBuf>,
    /// Class list: a file (one class per line, `<wnid> <name>` or `<name>`) or `imagenet`.
    #[arg(long, default_value = IMAGENET)]
    pub classes: String,
    /// Side of the square the network sees.
    #[arg(long, default_value_t = 224)]
    pub size: i64,
    /// Shorter side after resizing, before the centre crop (default: size / 0.875).
    #[arg(long)]
    pub resize: Option<i64>,
    /// Normalisation the server applies to [0,1] RGB, per channel (give both or neither).
    #[arg(long, value_delimiter = ',')]
    pub mean: Option<Vec<f32>>,
    #[arg(long, value_delimiter = ',')]
    pub std: Option<Vec<f32>>,
    /// The classifier's last linear layer (default: the one 2-D parameter with a row per class).
    #[arg(long)]
    pub classifier_weight: Option<String>,
    /// Largest batch the module takes in one call.
    #[arg(long)]
    pub max_batch_size: Option<usize>,
    /// ONNX only: largest max-abs logit difference to onnxruntime accepted.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
    /// Images to classify with the new model as a last check (their top-1 is printed).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// Where the bundle goes (default: `${LABELFOOL_CACHE}/models/NAME`); must not exist.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Python with torch, onnx, onnxruntime and onnx2torch (default: the setup's venv).
    #[arg(long, env = "LABELFOOL_PYTHON")]
    pub python: Option<PathBuf>,
}

pub async fn run(cli: &Cli, cmd: &ModelCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCommand::Add(a) => {
            let config = super::load_config(cli)?;
            let device = config.device().resolve().map_err(anyhow::Error::msg)?;
            let a = a.clone();
            // libtorch work runs on a thread of its own (tokio's threads are single-threaded for it).
            tokio::task::spawn_blocking(move || add(&a, device)).await.context("the model-add thread died")??;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Removes the staging directory unless the bundle was moved into place.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn add(a: &AddArgs, device: tch::Device) -> anyhow::Result<()> {
    let name = &a.name;
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "model name {name:?} must be ASCII letters, digits, '-', '_' or '.'"
    );
    let out = match &a.output {
        Some(o) => o.clone(),
        None => crate::config::cache_dir().join("models").join(name),
    };
    anyhow::ensure!(!out.exists(), "{} already exists; choose another --output or remove it", out.display());
    let three = |v: &Option<Vec<f32>>, what: &str| -> anyhow::Result<Option<[f32; 3]>> {
        v.as_ref()
            .map(|v| <[f32; 3]>::try_from(v.as_slice()).map_err(|_| anyhow::anyhow!("--{what} takes three values")))
            .transpose()
    };
    let (mean, std) = (three(&a.mean, "mean")?, three(&a.std, "std")?);
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = Staging(parent.join(format!(".{name}.staging-{}", std::process::id())));
    std::fs::create_dir_all(&staging.0)?;
    let model_pt = staging.0.join("model.pt");

    // 1. The TorchScript file: as given, or converted from ONNX and checked against onnxruntime.
    let mut max_batch_size = a.max_batch_size;
    let source = match (&a.torchscript, &a.onnx) {
        (Some(ts), _) => {
            std::fs::copy(ts, &model_pt).with_context(|| format!("cannot read {}", ts.display()))?;
            serde_json::json!({"torchscript": ts})
        }
        (None, Some(onnx)) => {
            let report = convert_onnx(a, onnx, &model_pt, mean, std)?;
            if let Some(n) = report["max_batch_size"].as_u64() {
                eprintln!(
                    "onnx: the traced module takes one image per call (shapes baked in by tracing): max_batch_size = {n}"
                );
                max_batch_size = Some(max_batch_size.map_or(n as usize, |m| m.min(n as usize)));
            }
            eprintln!(
                "onnx: converted with onnx2torch and traced; max |logit − onnxruntime| = {:.3e} over {} inputs (tolerance {:e})",
                report["max_abs_diff"].as_f64().unwrap_or(f64::NAN),
                report["inputs"],
                a.tolerance
            );
            serde_json::json!({"onnx": onnx, "converter": "onnx2torch + torch.jit.trace", "onnxruntime_check": report, "tolerance": a.tolerance})
        }
        (None, None) => anyhow::bail!("give --torchscript FILE or --onnx FILE"),
    };

    // 2. The description.
    let classes_file = if a.classes == IMAGENET {
        IMAGENET.to_string()
    } else {
        std::fs::copy(&a.classes, staging.0.join("classes.txt"))
            .with_context(|| format!("cannot read the class list {}", a.classes))?;
        "classes.txt".to_string()
    };
    let classes = Bundle::read_classes(&staging.0, &classes_file).map_err(anyhow::Error::msg)?;
    let description = Description {
        size: Some(a.size),
        resize_short_side: a.resize,
        mean,
        std,
        classes: Some(a.classes.clone()),
        classifier_weight: a.classifier_weight.clone(),
        module_max_batch: max_batch_size,
        matrix: None,
    };
    let mut meta = ModelMeta::described(
        name,
        format!("user model ({})", if a.onnx.is_some() { "ONNX" } else { "TorchScript" }),
        "model.pt".into(),
        a.size,
        classes.len(),
        classes_file,
        &description,
        source,
    );
    meta.model_sha256 = Some(hex::encode(sha2::Sha256::digest(std::fs::read(&model_pt)?)));
    let bundle = Bundle::new(&staging.0, meta.clone(), classes).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;

    // 3. Loaded the way the server loads it: forward at the declared size, output width against
    // the class list, a gradient that reaches the input, the classifier layer for the matrix.
    let info = Arc::new(
        ModelInfo::from_bundle(name, bundle, None, BatchPolicy::default()).map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let model = LoadedModel::load(info.clone(), device).map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "checks: forward at {s}×{s} gives {} classes, a gradient reaches the input (device {})",
        info.num_classes(),
        crate::model::device_name(device),
        s = a.size
    );
    let matrix = model.data_free_matrix().map_err(|e| anyhow::anyhow!("{e}"))?;
    for image in &a.images {
        let bytes = std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
        let img = crate::imaging::decode(&bytes, &crate::imaging::DecodeLimits::from_config(&Default::default()))
            .with_context(|| format!("{}", image.display()))?;
        let input = crate::model::preprocess::prepare_rgb8(&img.rgb, img.width, img.height, info.input())?
            .f_to_device(device)?;
        let probs = tch::no_grad(|| model.forward(&input)?.f_softmax(-1, tch::Kind::Float))?;
        let row = tensor_rows(&probs)?.remove(0);
        let (top, p) = row.iter().enumerate().fold((0, f32::MIN), |b, (i, &p)| if p > b.1 { (i, p) } else { b });
        eprintln!("  {}: {} ({:.3})", image.display(), info.classes().label(top), p);
    }

    // 4. Written in one move.
    std::fs::write(staging.0.join("model.json"), serde_json::to_string_pretty(&meta)? + "\n")?;
    matrix.save(&staging.0.join("distance.npy"))?;
    std::fs::rename(&staging.0, &out).with_context(|| format!("cannot move the bundle to {}", out.display()))?;
    eprintln!(
        "wrote {} (model.pt, model.json, distance.npy{})",
        out.display(),
        if a.classes == IMAGENET { "" } else { ", classes.txt" }
    );
    println!("[[models]]\nname = \"{name}\"\ndir = \"{}\"", out.display());
    Ok(())
}

/// Runs the embedded converter; its JSON report on success, its message as the error otherwise.
fn convert_onnx(
    a: &AddArgs,
    onnx: &Path,
    model_pt: &Path,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(onnx.is_file(), "{} does not exist", onnx.display());
    let python = match &a.python {
        Some(p) => p.clone(),
        None => setup_python()?,
    };
    let script = model_pt.with_file_name("onnx_to_torchscript.py");
    std::fs::write(&script, ONNX_SCRIPT)?;
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&script).arg(onnx).arg(model_pt).args([
        "--size",
        &a.size.to_string(),
        "--tolerance",
        &a.tolerance.to_string(),
    ]);
    if let (Some(m), Some(s)) = (mean, std) {
        cmd.arg("--mean").args(m.map(|v| v.to_string())).arg("--std").args(s.map(|v| v.to_string()));
    }
    let output = cmd.output().with_context(|| format!("cannot run {}", python.display()))?;
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value =
        stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok()).with_context(|| {
            format!("the ONNX converter failed: {}", String::from_utf8_lossy(&output.stderr).trim())
        })?;
    if report["ok"] != true {
        anyhow::bail!("{}", report["error"].as_str().unwrap_or("the ONNX converter failed"));
    }
    Ok(report)
}

/// The setup's venv Python: libtorch lives at `<venv>/lib/pythonX.Y/site-packages/torch/lib`.
fn setup_python() -> anyhow::Result<PathBuf> {
    let venv = std::env::var_os("LABELFOOL_VENV")
        .map(PathBuf::from)
        .or_else(|| Path::new(env!("LABELFOOL_LIBTORCH_LIB")).ancestors().nth(5).map(Path::to_path_buf));
    let python = venv.map(|v| v.join("bin/python")).filter(|p| p.is_file());
    python.context("cannot find the setup's Python (run scripts/setup, or pass --python / LABELFOOL_PYTHON)")
}
