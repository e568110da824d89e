//! The worker's time per attack tick for 16 LabelFool rows of one size against 16 rows of 16
//! different sizes (issue 33: within 1.2× on the CPU). Each tick is the first of fresh rows —
//! one forward and one backward pass for all 16, the rows resized by the path `--resize` picks
//! (default: the configured `engine.batch_resize` for the device) — timed around
//! `attack::runner::tick` alone, as the worker calls it.
//!
//!     cargo bench --bench tick_sizes -- [--reps N] [--device cpu|cuda] [--resize auto|per_row|matrix]
//!
//! "first" is each layout's first tick (the first time the model meets those sizes); "warm" the
//! median of the next `--reps` ticks, one size and mixed sizes alternated so both see the same
//! machine load. Prints one JSON line.

use std::path::PathBuf;
use std::time::Instant;

use labelfool::attack::params::AttackLimits;
use labelfool::attack::{AttackParams, AttackRequest, new_row, runner};
use labelfool::config::{Config, DeviceSpec};
use labelfool::model::preprocess::rgb8_to_tensor;
use labelfool::model::{Catalog, LoadedModel};

mod common;
use common::{arg, median};

const ROWS: usize = 16;

/// A smooth, non-constant test picture of `w`×`h` (the model sees structure, not noise).
fn picture(w: u32, h: u32) -> Vec<u8> {
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            rgb.push((255.0 * fx) as u8);
            rgb.push((255.0 * fy) as u8);
            rgb.push((255.0 * (0.5 + 0.5 * (6.0 * fx + 4.0 * fy).sin())) as u8);
        }
    }
    rgb
}

/// Seconds of one tick of fresh rows with `params` on `pictures` (width, height, RGB).
fn tick(model: &LoadedModel, params: &AttackParams, pictures: &[(u32, u32, Vec<u8>)]) -> anyhow::Result<f64> {
    let mut rows = pictures
        .iter()
        .map(|(w, h, rgb)| {
            let x0 = rgb8_to_tensor(rgb, *w, *h)?.to_device(model.device());
            Ok(new_row(model.info.clone(), x0, params.clone())?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let started = Instant::now();
    let (errors, stats) = runner::tick(model, &mut rows);
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(errors.iter().all(Option::is_none), "tick errors: {errors:?}");
    anyhow::ensure!(stats.stepped_rows == ROWS && stats.backward_passes == 1, "{stats:?}");
    Ok(secs)
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config = Config::load(Some(&root.join("config/default.toml")))?;
    if let Some(d) = arg("--device") {
        config.engine.device = DeviceSpec::parse(&d).map_err(anyhow::Error::msg)?;
    }
    config.validate()?;
    let reps: usize = arg("--reps").and_then(|v| v.parse().ok()).unwrap_or(7);
    labelfool::model::configure_jit(config.engine.jit_fuser, config.engine.jit_optimize)?;
    let catalog = Catalog::from_config(&config)?;
    let device = config.device().resolve().map_err(anyhow::Error::msg)?;
    let mut model = LoadedModel::load(catalog.get(None).ok_or_else(|| anyhow::anyhow!("no model"))?.1, device)?;
    if let Some(r) = arg("--resize") {
        config.engine.batch_resize = serde_json::from_value(serde_json::Value::String(r))?;
    }
    if let Some(timed) = model.apply_batch_resize(config.engine.batch_resize)? {
        eprintln!("auto on CUDA: per row and matrix timed {timed:?} s");
    }
    let limits = AttackLimits::from_config(&config.limits);
    let params = AttackRequest::default().validate(&model.info, &config.attack, &limits)?;

    // One size: ImageNet's commonest, 500×375. Mixed: 16 sizes around it (pixels within ±40%).
    let one: Vec<(u32, u32, Vec<u8>)> = (0..ROWS).map(|_| (500, 375, picture(500, 375))).collect();
    let mixed: Vec<(u32, u32, Vec<u8>)> = (0..ROWS as u32)
        .map(|i| {
            let (w, h) = if i % 2 == 0 { (380 + 17 * i, 300 + 9 * i) } else { (300 + 11 * i, 400 + 13 * i) };
            (w, h, picture(w, h))
        })
        .collect();
    let pixels = |p: &[(u32, u32, Vec<u8>)]| p.iter().map(|(w, h, _)| f64::from(w * h)).sum::<f64>();

    let first_one = tick(&model, &params, &one)?;
    let first_mixed = tick(&model, &params, &mixed)?;
    let (mut t_one, mut t_mixed) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        t_one.push(tick(&model, &params, &one)?);
        t_mixed.push(tick(&model, &params, &mixed)?);
    }
    let (one_s, mixed_s) = (median(t_one), median(t_mixed));
    println!(
        "{}",
        serde_json::json!({
            "device": format!("{device:?}"),
            "resize": format!("{:?}", model.batch_resize()),
            "rows": ROWS,
            "reps": reps,
            "one_size": {"width": 500, "height": 375, "megapixels": pixels(&one) / 1e6, "first_s": first_one, "warm_median_s": one_s},
            "mixed_sizes": {
                "sizes": mixed.iter().map(|(w, h, _)| format!("{w}x{h}")).collect::<Vec<_>>(),
                "megapixels": pixels(&mixed) / 1e6,
                "first_s": first_mixed,
                "warm_median_s": mixed_s,
            },
            "ratio_warm": mixed_s / one_s,
            "ratio_first": first_mixed / first_one,
        })
    );
    Ok(())
}
