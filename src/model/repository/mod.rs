//! Triton model repositories, read as they are: `<repo>/<model>/config.pbtxt`,
//! `<repo>/<model>/<version>/model.pt`, the `label_filename` the config names, and an optional
//! `labelfool.toml` with what Triton's config does not carry (the preprocessing the network was
//! trained with, the WordNet ids of its classes). `pytorch_libtorch` models become [`Bundle`]s;
//! every other platform is listed with the reason it is not served, never skipped.

pub mod pbtxt;

use std::path::{Path, PathBuf};

use super::bundle::{Bundle, Description, ModelMeta};
use pbtxt::inference::{DataType, ModelConfig, model_input::Format};

/// One model directory of a repository.
#[derive(Debug, Clone)]
pub struct RepoModel {
    pub name: String,
    pub dir: PathBuf,
    /// The version directory served (the highest that holds the model file), when known.
    pub version: Option<String>,
    pub platform: String,
    /// What to load, or why LabelFool cannot serve this model.
    pub bundle: Result<Bundle, String>,
    /// `labelfool.toml`'s matrix, resolved.
    pub matrix: Option<PathBuf>,
}

/// Every model directory in `repo` (sorted by name). Fails only when `repo` cannot be listed.
pub fn scan(repo: &Path) -> Result<Vec<RepoModel>, String> {
    let entries =
        std::fs::read_dir(repo).map_err(|e| format!("cannot list model repository {}: {e}", repo.display()))?;
    let mut dirs: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    Ok(dirs.iter().filter(|d| d.join("config.pbtxt").is_file()).map(|d| read_model(d)).collect())
}

fn read_model(dir: &Path) -> RepoModel {
    let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut model = RepoModel {
        name: dir_name.clone(),
        dir: dir.to_path_buf(),
        version: None,
        platform: String::new(),
        bundle: Err(String::new()),
        matrix: None,
    };
    let config = match std::fs::read_to_string(dir.join("config.pbtxt"))
        .map_err(|e| e.to_string())
        .and_then(|t| pbtxt::parse(&t))
    {
        Ok(c) => c,
        Err(e) => {
            model.bundle = Err(format!("config.pbtxt: {e}"));
            return model;
        }
    };
    if !config.name.is_empty() && config.name != dir_name {
        model.bundle = Err(format!("config.pbtxt names the model {:?} but its directory is {dir_name:?}", config.name));
        return model;
    }
    model.platform = platform(&config);
    model.bundle = to_bundle(dir, &dir_name, &config).map(|(bundle, version, matrix)| {
        model.version = Some(version);
        model.matrix = matrix;
        bundle
    });
    model
}

/// `platform`, or the platform a `backend` implies (Triton accepts either).
fn platform(c: &ModelConfig) -> String {
    match (c.platform.as_str(), c.backend.as_str()) {
        ("", "pytorch") => "pytorch_libtorch".into(),
        ("", "onnxruntime") => "onnxruntime_onnx".into(),
        ("", b) => format!("backend {b}"),
        (p, _) => p.into(),
    }
}

fn to_bundle(dir: &Path, name: &str, c: &ModelConfig) -> Result<(Bundle, String, Option<PathBuf>), String> {
    let platform = platform(c);
    match platform.as_str() {
        "pytorch_libtorch" => {}
        "onnxruntime_onnx" => {
            return Err(format!(
                "platform onnxruntime_onnx is served through the ONNX path: `labelfool model add {name} --onnx {}`",
                dir.join("<version>/model.onnx").display()
            ));
        }
        other => return Err(format!("platform {other:?} is not supported (LabelFool serves pytorch_libtorch models)")),
    }
    let file = if c.default_model_filename.is_empty() { "model.pt" } else { &c.default_model_filename };
    let version = latest_version(dir, file)?;
    if c.input.len() != 1 {
        return Err(format!("{} inputs; LabelFool attacks image classifiers with exactly one input", c.input.len()));
    }
    let input = &c.input[0];
    if input.data_type() != DataType::TypeFp32 {
        return Err(format!("input {} is {:?}; only TYPE_FP32 images are supported", input.name, input.data_type()));
    }
    if !matches!(input.format(), Format::None | Format::Nchw) {
        return Err(format!("input {} is {:?}; only NCHW images are supported", input.name, input.format()));
    }
    // With max_batch_size > 0 the dims leave out the batch; with 0 they include it.
    let dims: Vec<i64> = match (c.max_batch_size, input.dims.as_slice()) {
        (n, d) if n > 0 => d.to_vec(),
        (_, [b, rest @ ..]) if *b == 1 || *b == -1 => rest.to_vec(),
        (_, d) => return Err(format!("max_batch_size 0 needs a leading batch dimension of 1 or -1, dims are {d:?}")),
    };
    let size = match dims.as_slice() {
        [3, h, w] if h == w && *h > 0 => *h,
        d => return Err(format!("input {} has dims {d:?}; LabelFool needs [3, S, S] (square RGB, NCHW)", input.name)),
    };
    let Some(output) = c.output.first().filter(|_| c.output.len() == 1) else {
        return Err(format!("{} outputs; LabelFool needs exactly one (the logits)", c.output.len()));
    };
    let classes_n = match (c.max_batch_size, output.dims.as_slice()) {
        (n, [k]) if n > 0 && *k > 1 => *k,
        (0, [1 | -1, k]) if *k > 1 => *k,
        (_, d) => return Err(format!("output {} has dims {d:?}; LabelFool needs [classes]", output.name)),
    };
    // The per-model LabelFool section: what Triton's config does not carry.
    let section = read_section(dir)?;
    if section.size.is_some_and(|s| s != size) {
        return Err(format!("labelfool.toml says size {:?} but config.pbtxt's input is {size}×{size}", section.size));
    }
    let classes_file = match (&section.classes, output.label_filename.as_str()) {
        (Some(c), _) => c.clone(),
        (None, "") => {
            return Err(format!("output {} has no label_filename and labelfool.toml no classes", output.name));
        }
        (None, f) => f.to_string(),
    };
    let classes = Bundle::read_classes(dir, &classes_file).map_err(|e| e.to_string())?;
    let mut description = section.clone();
    description.module_max_batch = Some(usize::try_from(c.max_batch_size).ok().filter(|n| *n > 0).unwrap_or(1));
    let meta = ModelMeta::described(
        name,
        format!("Triton {platform} model (config.pbtxt)"),
        format!("{version}/{file}"),
        size,
        usize::try_from(classes_n).map_err(|e| e.to_string())?,
        classes_file,
        &description,
        serde_json::json!({"triton_config": dir.join("config.pbtxt"), "platform": platform}),
    );
    let bundle = Bundle::new(dir, meta, classes).map_err(|e| e.to_string())?;
    Ok((bundle, version, section.matrix.map(|m| dir.join(m))))
}

/// `<repo>/<model>/labelfool.toml`: a [`Description`] (absent: all defaults).
fn read_section(dir: &Path) -> Result<Description, String> {
    let path = dir.join("labelfool.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Description::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Triton's default version policy (`latest: 1`): the highest numeric version directory — here,
/// the highest that holds the model file.
fn latest_version(dir: &Path, file: &str) -> Result<String, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u64 = name.parse().ok()?;
            e.path().join(file).is_file().then_some((n, name))
        })
        .max()
        .map(|(_, name)| name)
        .ok_or_else(|| format!("no version directory holds {file} (expected {}/1/{file})", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    const CONFIG: &str = r#"name: "m"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
"#;

    #[test]
    fn reads_models_and_lists_the_rest_with_reasons() {
        let repo = tempfile::tempdir().unwrap();
        let r = repo.path();
        write(r, "m/config.pbtxt", CONFIG);
        write(r, "m/labels.txt", "cat\ndog\nfox\n");
        write(r, "m/1/model.pt", "x");
        write(r, "m/3/model.pt", "x");
        write(r, "m/7/other.bin", "x");
        write(r, "m/labelfool.toml", "mean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n");
        write(r, "o/config.pbtxt", "name: \"o\" platform: \"onnxruntime_onnx\"");
        write(r, "e/config.pbtxt", "platform: \"ensemble\"");
        write(r, "bad/config.pbtxt", "name: \"bad\"\nmax_batch_size: x\n");
        write(r, "wrongdims/config.pbtxt", &CONFIG.replace("3, 32, 32", "32, 32, 3").replace("\"m\"", "\"wrongdims\""));
        write(r, "wrongdims/labels.txt", "a\nb\nc\n");
        write(r, "wrongdims/1/model.pt", "x");
        write(r, "not-a-model/readme.txt", "no config here");
        let models = scan(r).unwrap();
        let names: Vec<_> = models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["bad", "e", "m", "o", "wrongdims"]);
        let m = &models[2];
        let b = m.bundle.as_ref().unwrap();
        assert_eq!(m.version.as_deref(), Some("3"));
        assert_eq!(b.model_path(), r.join("m/3/model.pt"));
        assert_eq!((b.meta.input.size, b.meta.input.resize_short_side), (32, 37));
        assert_eq!(b.meta.input.std, Some([0.25; 3]));
        assert_eq!(b.meta.max_batch_size, Some(4));
        assert_eq!(b.classes.label(2), "fox");
        assert!(models[0].bundle.as_ref().unwrap_err().contains("line 2"), "{:?}", models[0].bundle);
        assert!(models[1].bundle.as_ref().unwrap_err().contains("ensemble"));
        assert!(models[3].bundle.as_ref().unwrap_err().contains("--onnx"));
        assert!(models[4].bundle.as_ref().unwrap_err().contains("[3, S, S]"));
    }

    #[test]
    fn class_count_and_section_are_checked() {
        let repo = tempfile::tempdir().unwrap();
        let r = repo.path();
        write(r, "m/config.pbtxt", CONFIG);
        write(r, "m/labels.txt", "cat\ndog\n");
        write(r, "m/1/model.pt", "x");
        let e = scan(r).unwrap().remove(0).bundle.unwrap_err();
        assert!(e.contains("lists 2 classes but the model has 3"), "{e}");
        write(r, "m/labelfool.toml", "mean = [0.5, 0.5, 0.5]\n");
        write(r, "m/labels.txt", "cat\ndog\nfox\n");
        let e = scan(r).unwrap().remove(0).bundle.unwrap_err();
        assert!(e.contains("both mean and std"), "{e}");
        write(r, "m/labelfool.toml", "resize = 3\n");
        let e = scan(r).unwrap().remove(0).bundle.unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }
}
