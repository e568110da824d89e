//! `labelfool doctor`: what this host and config give the server, checked for real (the models
//! are loaded and run once, as the worker does at start-up).

use std::process::ExitCode;

use super::Cli;
use crate::model::{Catalog, LoadedModel, device_name};

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// The libtorch version, read from the wheel this binary was linked against (`torch/version.py`).
pub fn torch_version() -> Option<String> {
    let lib = std::path::Path::new(env!("LABELFOOL_LIBTORCH_LIB"));
    let text = std::fs::read_to_string(lib.parent()?.join("version.py")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
}

pub async fn run(cli: &Cli, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_config(cli)?;
    let torch = torch_version();
    let cuda = tch::Cuda::is_available();
    let device = config.device().resolve();
    let mut ok = device.is_ok() && torch.is_some();
    let mut models = Vec::new();
    match Catalog::from_config(&config) {
        Err(e) => {
            ok = false;
            models.push(serde_json::json!({"error": e.to_string()}));
        }
        Ok(catalog) => {
            for info in catalog.iter() {
                let loaded = match &device {
                    Ok(d) => LoadedModel::load(info.clone(), *d).map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.clone()),
                };
                ok &= loaded.is_ok();
                models.push(serde_json::json!({
                    "name": info.name,
                    "dir": info.bundle.dir,
                    "architecture": info.bundle.meta.architecture,
                    "classes": info.num_classes(),
                    "matrix": info.matrix().map(|m| serde_json::json!({"method": m.meta.method, "size": m.len()})),
                    "loads_and_runs": loaded.is_ok(),
                    "error": loaded.err(),
                }));
            }
        }
    }
    let report = serde_json::json!({
        "labelfool": env!("CARGO_PKG_VERSION"),
        "torch": torch,
        "libtorch_dir": env!("LABELFOOL_LIBTORCH_LIB"),
        "cuda_available": cuda,
        "cuda_devices": tch::Cuda::device_count(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "configured_device": config.engine.device,
        "device": device.as_ref().map(|d| device_name(*d)).map_err(Clone::clone),
        "threads": tch::get_num_threads(),
        "models": models,
        "ok": ok,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("labelfool {}", env!("CARGO_PKG_VERSION"));
        println!("torch           {}", torch.as_deref().unwrap_or("unknown (version.py not found)"));
        println!("libtorch        {}", env!("LABELFOOL_LIBTORCH_LIB"));
        println!(
            "CUDA available  {cuda} ({} device(s), cuDNN {})",
            tch::Cuda::device_count(),
            tch::Cuda::cudnn_is_available()
        );
        match &device {
            Ok(d) => println!("device          {} → {}", config.engine.device, device_name(*d)),
            Err(e) => println!("device          {} → ERROR: {e}", config.engine.device),
        }
        println!("threads         {}", tch::get_num_threads());
        for m in report["models"].as_array().into_iter().flatten() {
            if let Some(e) = m.get("error").and_then(|e| e.as_str()) {
                println!("model           {}: ERROR {e}", m["name"].as_str().unwrap_or("?"));
            } else {
                println!(
                    "model           {}: {} classes, matrix {}, loads and runs on the device ({})",
                    m["name"].as_str().unwrap_or("?"),
                    m["classes"],
                    m["matrix"]["method"].as_str().unwrap_or("none"),
                    m["dir"].as_str().unwrap_or("?")
                );
            }
        }
        println!("{}", if ok { "ok" } else { "PROBLEMS FOUND" });
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
