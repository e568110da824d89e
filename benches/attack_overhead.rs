//! Attack overhead: seconds per attack divided by (iterations × one forward+backward pass of the
//! model on the same image, at the same size, measured in the same run). 1.0 would mean the attack
//! costs nothing beyond its gradient steps; the rest is the 8-bit re-checks (forward only), the
//! update arithmetic, queueing, decoding and PNG encoding.
//!
//!     cargo bench --bench attack_overhead -- [--images DIR] [--limit N] [--device cpu|cuda]
//!
//! The forward+backward reference is measured in a child process (this binary, re-run with
//! `--probe`), image by image, right before the engine attacks the same image: libtorch ops on a
//! second thread of the engine's process would give it a second OpenMP team and slow the worker
//! down (see `model::single_threaded_torch_here`), and interleaving keeps both measurements under
//! the same machine load. Both sides take medians of repeated runs (attacks are deterministic).
//! Writes benches/results/attack_overhead-<device>.json and prints a Markdown table.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use labelfool::config::{Config, DeviceSpec};
use labelfool::engine::{AttackRequest, Engine};
use labelfool::model::preprocess::{prepare_rgb8, resize_crop, rgb8_to_tensor};
use labelfool::model::{Catalog, LoadedModel};
use tch::Kind;

mod common;
use common::{arg, median};

/// One forward + backward of the attack's graph (resize, crop, model, f_1 − f_0) at full size.
fn forward_backward(model: &LoadedModel, rgb: &[u8], w: u32, h: u32) -> f64 {
    let x = rgb8_to_tensor(rgb, w, h).unwrap().to_device(model.device()).set_requires_grad(true);
    let started = Instant::now();
    let logits = model.forward(&resize_crop(&x, model.info.input()).unwrap()).unwrap();
    let loss = logits.get(0).get(1) - logits.get(0).get(0);
    let g = model.backward(&loss.sum(Kind::Float), &[x], false).unwrap();
    let _ = g[0].sum(Kind::Float).double_value(&[]); // synchronise (CUDA)
    started.elapsed().as_secs_f64()
}

/// One no-grad forward of the classify path (what an 8-bit re-check costs).
fn forward_only(model: &LoadedModel, rgb: &[u8], w: u32, h: u32) -> f64 {
    let started = Instant::now();
    let x = prepare_rgb8(rgb, w, h, model.info.input()).unwrap().to_device(model.device());
    let logits = tch::no_grad(|| model.forward(&x).unwrap());
    let _ = logits.sum(Kind::Float).double_value(&[]);
    started.elapsed().as_secs_f64()
}

fn load_config(root: &Path) -> anyhow::Result<Config> {
    let mut config = Config::load(Some(&root.join("config/default.toml")))?;
    if let Some(d) = arg("--device") {
        config.engine.device = DeviceSpec::parse(&d).map_err(anyhow::Error::msg)?;
    }
    config.validate()?;
    Ok(config)
}

/// Child process: for each image path read from stdin, prints `fwd+bwd<TAB>fwd` (seconds,
/// medians of 5 after a warm-up).
fn probe(root: &Path) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let config = load_config(root)?;
    // The same TorchScript settings as the engine's worker.
    labelfool::model::configure_jit(config.engine.jit_fuser, config.engine.jit_optimize)?;
    let catalog = Catalog::from_config(&config)?;
    let model = LoadedModel::load(
        catalog.get(None).ok_or_else(|| anyhow::anyhow!("no model"))?.1,
        config.device().resolve().map_err(anyhow::Error::msg)?,
    )?;
    for line in std::io::stdin().lock().lines() {
        let img = image::open(line?.trim())?.to_rgb8();
        let (w, h) = img.dimensions();
        forward_backward(&model, img.as_raw(), w, h);
        let fb = median((0..5).map(|_| forward_backward(&model, img.as_raw(), w, h)).collect());
        forward_only(&model, img.as_raw(), w, h);
        let f = median((0..5).map(|_| forward_only(&model, img.as_raw(), w, h)).collect());
        println!("{fb}\t{f}");
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// The probe child: one process for the whole run, asked image by image.
struct Probe {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Probe {
    fn start() -> anyhow::Result<Self> {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(std::env::args().skip(1))
            .arg("--probe")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let out = std::io::BufReader::new(child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?);
        Ok(Self { child, out })
    }

    fn measure(&mut self, path: &Path) -> anyhow::Result<(f64, f64)> {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        writeln!(stdin, "{}", path.display())?;
        stdin.flush()?;
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        let v: Vec<f64> = line.trim().split('\t').map(str::parse).collect::<Result<_, _>>()?;
        anyhow::ensure!(v.len() == 2, "probe said {line:?}");
        Ok((v[0], v[1]))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/data/imagenet-samples");
    let images_dir = arg("--images").map(PathBuf::from).unwrap_or(if shared.is_dir() {
        shared
    } else {
        root.join("tests/fixtures/images")
    });
    let limit: usize = arg("--limit").and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&images_dir)?.map(|e| e.unwrap().path()).collect();
    files.sort();
    files.truncate(limit);
    if std::env::args().any(|a| a == "--probe") {
        return probe(&root);
    }
    let mut probe = Probe::start()?;

    // The attacks go through the engine: queue, worker, decode, PNG encode — the server's path.
    let config = load_config(&root)?;
    let (engine, startup) = Engine::start(&config, Catalog::from_config(&config)?)?;
    let info = tokio::task::spawn_blocking(move || startup.wait()).await??;
    // Warm-up: the first attack pays TorchScript's graph profiling and optimisation.
    engine.attack(None, std::fs::read(&files[0])?.into(), AttackRequest::default(), Duration::from_secs(600)).await?;

    println!(
        "| image | size | iterations | checks | refinements | attack s | fwd+bwd s | fwd s | ratio (wall) | ratio (worker) | floor |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let (mut attack_total, mut step_total, mut device_total, mut floor_total) = (0.0, 0.0, 0.0, 0.0);
    let mut rows = Vec::new();
    for path in &files {
        let (fb, f) = probe.measure(path)?;
        let bytes = std::fs::read(path)?;
        let (w, h) = image::image_dimensions(path)?;
        let mut walls = Vec::new();
        let mut workers = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let started = Instant::now();
            let r =
                engine.attack(None, bytes.clone().into(), AttackRequest::default(), Duration::from_secs(600)).await?;
            walls.push(started.elapsed().as_secs_f64());
            workers.push(r.timings.compute_ms / 1e3);
            last = Some(r);
        }
        let r = last.ok_or_else(|| anyhow::anyhow!("no attack ran"))?;
        let wall = median(walls);
        let (it, checks) = (f64::from(r.outcome.iterations), f64::from(r.outcome.checks));
        let refinements = f64::from(r.outcome.refinements);
        let device_s = median(workers);
        // What the algorithm itself must spend: its steps, plus for each 8-bit check the forward
        // that found the margin reached and the check's own forward, and one forward per
        // refinement check after success.
        let floor = it * fb + (2.0 * checks + refinements) * f;
        attack_total += wall;
        device_total += device_s;
        step_total += it * fb;
        floor_total += floor;
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        println!(
            "| {name} | {w}×{h} | {it} | {checks} | {refinements} | {wall:.3} | {fb:.4} | {f:.4} | {:.3} | {:.3} | {:.3} |",
            wall / (it * fb),
            device_s / (it * fb),
            floor / (it * fb)
        );
        rows.push(serde_json::json!({"image": name, "width": w, "height": h, "iterations": it, "checks": checks, "refinements": refinements,
            "attack_seconds": wall, "worker_seconds": device_s, "forward_backward_seconds": fb, "forward_seconds": f}));
    }
    let ratio = attack_total / step_total;
    let worker_ratio = device_total / step_total;
    let floor_ratio = floor_total / step_total;
    println!(
        "\noverall: attack time / (iterations × forward+backward) = {ratio:.3} (wall), {worker_ratio:.3} (worker time); \
         the checks' forward passes alone account for {floor_ratio:.3}; {} images on {}, {} threads",
        files.len(),
        info.device,
        info.threads
    );
    let out = root.join("benches/results");
    std::fs::create_dir_all(&out)?;
    let result = serde_json::json!({"device": info.device, "threads": info.threads, "images": files.len(),
        "ratio_wall": ratio, "ratio_worker": worker_ratio, "ratio_floor": floor_ratio, "rows": rows,
        "command": "cargo bench --bench attack_overhead"});
    std::fs::write(
        out.join(format!("attack_overhead-{}.json", info.device.replace(':', ""))),
        serde_json::to_string_pretty(&result)? + "\n",
    )?;
    drop(probe.child.stdin.take());
    let _ = probe.child.wait();
    tokio::task::spawn_blocking(move || engine.shutdown()).await?;
    Ok(())
}
