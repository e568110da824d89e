//! `labelfool matrix …`: distance-matrix builders.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use super::Cli;
use crate::matrix::build::{self, Fill, Shard};
use crate::matrix::hausdorff::Linkage;
use crate::matrix::semantic;
use crate::model::matrix::DistanceMatrix;
use crate::model::{BatchPolicy, Catalog, LoadedModel, ModelInfo};

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
    /// The paper's perceptual matrix from images: features, then class distances.
    Build {
        /// A configured model (default: the first).
        #[arg(long)]
        model: Option<String>,
        /// ImageFolder (`ROOT/<class>/*`) or a flat folder of `<wnid>_*` files.
        #[arg(long)]
        images: PathBuf,
        /// Use at most the first N images of each class (by file name).
        #[arg(long)]
        per_class: Option<usize>,
        #[arg(long, value_enum, default_value_t = Linkage::Hausdorff)]
        linkage: Linkage,
        /// Extract only the classes with index % N == I into the cache (no matrix is written).
        #[arg(long)]
        shard: Option<Shard>,
        /// Feature cache (default: `<output>.features`); an interrupted run resumes from it.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Images per forward pass.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Classes without images: `max` distance, or the data-free `weights` distances.
        #[arg(long, value_enum, default_value_t = Fill::Max)]
        fill: Fill,
        #[arg(short, long, required_unless_present = "shard")]
        output: Option<PathBuf>,
    },
    /// Combine a complete feature cache (all shards done) into the matrix.
    Reduce {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        cache: PathBuf,
        #[arg(long, value_enum, default_value_t = Linkage::Hausdorff)]
        linkage: Linkage,
        #[arg(long, value_enum, default_value_t = Fill::Max)]
        fill: Fill,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Semantic matrix: 1 − Wu-Palmer similarity in WordNet (for WordNet-id class lists).
    Semantic {
        #[arg(long)]
        model: Option<String>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// alpha·perceptual + (1 − alpha)·semantic, each rescaled to [0,1] first.
    Blend {
        #[arg(long)]
        perceptual: PathBuf,
        #[arg(long)]
        semantic: PathBuf,
        #[arg(long)]
        alpha: f64,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn configured_model(cli: &Cli, name: Option<&str>) -> anyhow::Result<(crate::config::Config, Arc<ModelInfo>)> {
    let config = super::load_config(cli)?;
    let catalog = Catalog::from_config(&config)?;
    let (_, info) =
        catalog.get(name).with_context(|| format!("no model {:?} in the config", name.unwrap_or_default()))?;
    Ok((config.clone(), info.clone()))
}

/// The data-free matrix of a model, for `--fill weights` and `from-weights`.
fn weight_distances(info: Arc<ModelInfo>) -> anyhow::Result<DistanceMatrix> {
    Ok(LoadedModel::load(info, tch::Device::Cpu)?.data_free_matrix()?)
}

/// Reduces on a thread of its own: libtorch's matrix products get every core there (tokio's
/// threads are single-threaded for libtorch, see `single_threaded_torch_here`).
async fn reduce_and_save(
    info: Arc<ModelInfo>,
    cache: PathBuf,
    linkage: Linkage,
    fill: Fill,
    device: tch::Device,
    output: PathBuf,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let run = || -> anyhow::Result<DistanceMatrix> {
            let weights =
                if fill == Fill::Weights { Some(weight_distances(info.clone())?.data().clone()) } else { None };
            build::reduce(&info, &cache, linkage, fill, weights.as_ref(), device)
        };
        let _ = tx.send(run());
    });
    let m = rx.await.context("the reduce thread died")??;
    m.save(&output)?;
    eprintln!("wrote {} ({n}×{n}, {} linkage, {})", output.display(), m.meta.method, m.meta.details, n = m.len());
    Ok(())
}

fn save(m: DistanceMatrix, output: &Path) -> anyhow::Result<ExitCode> {
    m.save(output)?;
    eprintln!("wrote {} ({n}×{n}, {})", output.display(), m.meta.method, n = m.len());
    Ok(ExitCode::SUCCESS)
}

pub async fn run(cli: &Cli, cmd: &MatrixCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MatrixCommand::FromWeights { model, bundle, output } => {
            let info = match (model, bundle) {
                (_, Some(dir)) => {
                    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string();
                    Arc::new(ModelInfo::open(
                        &name,
                        dir,
                        None,
                        BatchPolicy { max_size: 1, max_wait: Default::default() },
                    )?)
                }
                (Some(name), None) => configured_model(cli, Some(name))?.1,
                (None, None) => anyhow::bail!("give --model or --bundle"),
            };
            save(weight_distances(info)?, output)
        }
        MatrixCommand::Build { model, images, per_class, linkage, shard, cache, batch, fill, output } => {
            let config = super::load_config(cli)?;
            let cache = match (cache, output) {
                (Some(c), _) => c.clone(),
                (None, Some(o)) => o.with_extension("features"),
                (None, None) => anyhow::bail!("--cache is required with --shard"),
            };
            let (engine, worker) = super::start_engine(&config).await?;
            let report = build::extract(
                &engine,
                model.as_deref(),
                images,
                &cache,
                *per_class,
                shard.unwrap_or(Shard::ALL),
                *batch,
            )
            .await;
            let (_, info) = engine.model(model.as_deref())?;
            super::stop_engine(engine).await;
            let report = report?;
            eprintln!(
                "features: {} classes extracted ({} already cached), {} images, {} skipped → {}",
                report.classes_done,
                report.classes_cached,
                report.images,
                report.skipped,
                cache.display()
            );
            if let (None, Some(output)) = (shard, output) {
                let device = config.device().resolve().map_err(anyhow::Error::msg)?;
                tracing::debug!(device = %worker.device, "reducing");
                reduce_and_save(info, cache, *linkage, *fill, device, output.clone()).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        MatrixCommand::Reduce { model, cache, linkage, fill, output } => {
            let (config, info) = configured_model(cli, model.as_deref())?;
            let device = config.device().resolve().map_err(anyhow::Error::msg)?;
            reduce_and_save(info, cache.clone(), *linkage, *fill, device, output.clone()).await?;
            Ok(ExitCode::SUCCESS)
        }
        MatrixCommand::Semantic { model, output } => {
            let (_, info) = configured_model(cli, model.as_deref())?;
            save(semantic::semantic(&info).map_err(anyhow::Error::msg)?, output)
        }
        MatrixCommand::Blend { perceptual, semantic: sem, alpha, output } => {
            let p = DistanceMatrix::load(perceptual)?;
            let s = DistanceMatrix::load(sem)?;
            save(semantic::blend(&p, &s, *alpha).map_err(anyhow::Error::msg)?, output)
        }
    }
}
