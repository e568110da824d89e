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

/// The folder of the libtorch this process loaded (read from `/proc/self/maps`): the one linked
/// at build time unless `LD_LIBRARY_PATH` chose another.
pub fn libtorch_dir() -> std::path::PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| std::path::Path::new(p).parent().map(std::path::Path::to_path_buf))
        .unwrap_or_else(|| std::path::PathBuf::from(env!("LABELFOOL_LIBTORCH_LIB")))
}

/// The version of the libtorch in `lib`: a wheel's `torch/version.py`, or a libtorch archive's
/// `build-version`.
pub fn torch_version(lib: &std::path::Path) -> Option<String> {
    let root = lib.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        return text
            .lines()
            .find_map(|l| l.strip_prefix("__version__ = "))
            .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_string());
    }
    std::fs::read_to_string(root.join("build-version")).ok().map(|v| v.trim().to_string())
}

pub async fn run(cli: &Cli, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_config(cli)?;
    let lib = libtorch_dir();
    let torch = torch_version(&lib);
    let cuda = tch::Cuda::is_available();
    let device = config.device().resolve();
    // An unknown version is reported, not a problem: what matters is that the models run.
    let mut ok = device.is_ok();
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
        "libtorch_dir": lib,
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
        println!("torch           {}", torch.as_deref().unwrap_or("unknown (no version.py or build-version)"));
        println!("libtorch        {}", lib.display());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaded_libtorch_is_found() {
        assert!(libtorch_dir().join("libtorch_cpu.so").is_file(), "{}", libtorch_dir().display());
    }

    #[test]
    fn versions_of_a_wheel_and_of_a_libtorch_archive() {
        let root = tempfile::tempdir().unwrap();
        let lib = root.path().join("lib");
        assert_eq!(torch_version(&lib), None);
        std::fs::write(root.path().join("build-version"), "2.11.0+cu130\n").unwrap();
        assert_eq!(torch_version(&lib).as_deref(), Some("2.11.0+cu130"));
        std::fs::write(root.path().join("version.py"), "from x import y\n__version__ = '2.13.0+cpu'\n").unwrap();
        assert_eq!(torch_version(&lib).as_deref(), Some("2.13.0+cpu"), "version.py first");
    }
}
