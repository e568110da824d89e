//! `labelfool matrix …`: distance-matrix builders.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use ndarray::Array2;

use super::Cli;
use crate::matrix::{DistanceMatrix, MatrixMeta, from_weights};
use crate::model::{BatchPolicy, LoadedModel, ModelInfo};

#[derive(Debug, clap::Subcommand)]
pub enum MatrixCommand {
    /// Data-free matrix: D[i,j] = 1 − cos(w_i, w_j) over the classifier's last-layer rows.
    FromWeights {
        /// A configured model…
        #[arg(long, conflicts_with = "bundle", required_unless_present = "bundle")]
        model: Option<String>,
        /// …or a bundle directory (model.pt + model.json + classes.txt).
        #[arg(long)]
        bundle: Option<PathBuf>,
        #[arg(short, long)]
        output: PathBuf,
    },
}

pub async fn run(cli: &Cli, cmd: &MatrixCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MatrixCommand::FromWeights { model, bundle, output } => {
            let info = match (model, bundle) {
                (_, Some(dir)) => {
                    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string();
                    ModelInfo::open(&name, dir, None, BatchPolicy { max_size: 1, max_wait: Default::default() })?
                }
                (Some(name), None) => {
                    let config = super::load_config(cli)?;
                    let m = config
                        .models
                        .iter()
                        .find(|m| &m.name == name)
                        .with_context(|| format!("no model {name:?} in the config"))?;
                    ModelInfo::open(name, &m.dir()?, None, BatchPolicy { max_size: 1, max_wait: Default::default() })?
                }
                (None, None) => anyhow::bail!("give --model or --bundle"),
            };
            let name = info.name.clone();
            let layer = info.bundle.meta.classifier.weight.clone();
            let loaded = LoadedModel::load(Arc::new(info), tch::Device::Cpu)?;
            let w = loaded.classifier_weight()?;
            let (n, d) = (w.size()[0] as usize, w.size()[1] as usize);
            let mut flat = vec![0f32; n * d];
            w.f_copy_data(&mut flat, n * d)?;
            let w = Array2::from_shape_vec((n, d), flat)?;
            let dist = from_weights::cosine_distances(&w);
            let meta = MatrixMeta {
                model: name.clone(),
                num_classes: n,
                method: "from-weights".into(),
                details: serde_json::json!({"layer": layer, "feature_dim": d, "distance": "1 - cos(w_i, w_j)"}),
                content_sha256: None,
            };
            DistanceMatrix::new(dist, meta).map_err(anyhow::Error::msg)?.save(output)?;
            eprintln!("wrote {} ({n}×{n}, from the {d}-d rows of {layer} of {name})", output.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
