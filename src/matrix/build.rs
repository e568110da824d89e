//! `labelfool matrix build | reduce`: the paper's perceptual matrix from a folder of images.
//!
//! Extraction writes one feature file per class into a cache directory (`class-NNNN.npy`: the
//! class's unit-length features, in file order, plus a JSON list of the files used), atomically,
//! so an interrupted run resumes where it stopped, and `--shard I/N` extracts only the classes
//! with `index % N == I` (run the shards anywhere that sees the cache, e.g. as a Kubernetes
//! Indexed Job). Each class's images go through the model in fixed batches of their own, so a
//! class's features — and therefore the reduced matrix — are bit-identical however the work was
//! split. `reduce` turns a complete cache into D.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use super::hausdorff::{ClassFeatures, Linkage, class_distances, l2_normalise};
use crate::dataset;
use crate::engine::Engine;
use crate::model::ModelInfo;
use crate::model::matrix::{DistanceMatrix, MatrixMeta};

/// `--shard I/N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected I/N, e.g. 0/4"))?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| format!("{s:?}: bad I"))?,
            n.trim().parse().map_err(|_| format!("{s:?}: bad N"))?,
        );
        if count == 0 || index >= count {
            return Err(format!("{s:?}: need 0 ≤ I < N"));
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };
    fn owns(&self, class: usize) -> bool {
        class % self.count == self.index
    }
}

/// What the cache was made from; a resumed or sharded run must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    pub model: String,
    pub model_sha256: Option<String>,
    pub feature_dim: usize,
    pub per_class: Option<usize>,
    pub images_root: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClassEntry {
    class: usize,
    label: String,
    files: Vec<String>,
    skipped: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ExtractReport {
    pub classes_done: usize,
    pub classes_cached: usize,
    pub images: usize,
    pub skipped: usize,
}

fn class_file(cache: &Path, class: usize) -> PathBuf {
    cache.join(format!("class-{class:04}.npy"))
}

/// Maps the images under `root` to the model's classes; every class key must match.
fn samples_by_class(info: &ModelInfo, root: &Path) -> anyhow::Result<Vec<Vec<PathBuf>>> {
    let samples = dataset::discover(root, info.classes()).with_context(|| format!("cannot list {}", root.display()))?;
    let mut unmatched: Vec<String> =
        samples.iter().filter(|s| s.label.is_none()).filter_map(|s| s.class_key.clone()).collect();
    unmatched.sort();
    unmatched.dedup();
    anyhow::ensure!(
        unmatched.is_empty(),
        "{} class name(s) under {} match no class of model {} (by WordNet id or name): {}",
        unmatched.len(),
        root.display(),
        info.name,
        unmatched.join(", ")
    );
    let mut by_class = vec![Vec::new(); info.num_classes()];
    for s in samples {
        if let Some(l) = s.label {
            by_class[l].push(s.path);
        }
    }
    Ok(by_class)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Extracts (and caches) the features of this shard's classes. Bad images are skipped and counted.
pub async fn extract(
    engine: &Engine,
    model: Option<&str>,
    root: &Path,
    cache: &Path,
    per_class: Option<usize>,
    shard: Shard,
    batch: usize,
) -> anyhow::Result<ExtractReport> {
    let (_, info) = engine.model(model)?;
    let Some(feature_dim) = info.bundle.meta.feature_dim else {
        anyhow::bail!(
            "model {} has no `features` method (the pooled penultimate layer a Hausdorff matrix is built from); \
             a plain traced network cannot give it: export one with a `features` method, or use the data-free \
             matrix (`labelfool matrix from-weights`), which the server computes on its own when none is stored",
            info.name
        );
    };
    let by_class = samples_by_class(&info, root)?;
    std::fs::create_dir_all(cache)?;
    let meta = CacheMeta {
        model: info.name.clone(),
        model_sha256: info.bundle.meta.model_sha256.clone(),
        feature_dim,
        per_class,
        images_root: root.display().to_string(),
    };
    let meta_path = cache.join("meta.json");
    match std::fs::read_to_string(&meta_path) {
        Ok(text) => {
            let existing: CacheMeta = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a feature cache", meta_path.display()))?;
            anyhow::ensure!(
                existing == meta,
                "{} was made with other settings ({existing:?}); use another --cache",
                cache.display()
            );
        }
        Err(_) => write_atomic(&meta_path, serde_json::to_string_pretty(&meta)?.as_bytes())?,
    }
    let mine: Vec<usize> = (0..info.num_classes()).filter(|&c| shard.owns(c)).collect();
    let bar = indicatif::ProgressBar::new(mine.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} features [{bar:30}] {pos}/{len} classes · {msg} · ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut report = ExtractReport::default();
    for c in mine {
        if class_file(cache, c).is_file() && class_file(cache, c).with_extension("json").is_file() {
            report.classes_cached += 1;
            bar.inc(1);
            continue;
        }
        let mut files = by_class[c].clone();
        if let Some(n) = per_class {
            files.truncate(n);
        }
        let mut feats: Vec<Vec<f32>> = Vec::new();
        let mut entry =
            ClassEntry { class: c, label: info.classes().label(c).into(), files: Vec::new(), skipped: Vec::new() };
        for chunk in files.chunks(batch.max(1)) {
            let mut bytes = Vec::new();
            let mut names = Vec::new();
            for p in chunk {
                let name = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                match tokio::fs::read(p).await {
                    Ok(b) => {
                        bytes.push(b.into());
                        names.push(name);
                    }
                    Err(e) => entry.skipped.push((name, format!("cannot read: {e}"))),
                }
            }
            let results = engine.features(Some(&info.name), bytes, crate::engine::OFFLINE_DEADLINE).await?;
            for (name, r) in names.into_iter().zip(results) {
                match r {
                    Ok(f) => {
                        feats.push(f);
                        entry.files.push(name);
                    }
                    Err(e) => entry.skipped.push((name, e.to_string())),
                }
            }
        }
        let d = feature_dim;
        let flat: Vec<f32> = feats.iter().flatten().copied().collect();
        let arr = l2_normalise(Array2::from_shape_vec((feats.len(), d), flat)?);
        let mut npy = Vec::new();
        ndarray_npy::WriteNpyExt::write_npy(&arr, &mut npy)?;
        // The feature file is written first and the list last: the list marks the class done.
        write_atomic(&class_file(cache, c), &npy)?;
        write_atomic(&class_file(cache, c).with_extension("json"), serde_json::to_string(&entry)?.as_bytes())?;
        report.classes_done += 1;
        report.images += entry.files.len();
        report.skipped += entry.skipped.len();
        bar.set_message(format!("{} images, {} skipped", report.images, report.skipped));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(report)
}

/// How to fill the rows and columns of classes that had no image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// The largest distance measured: such classes are never preferred as targets.
    Max,
    /// The data-free distances (1 − cos of the classifier's weight rows) for those pairs.
    Weights,
}

/// Builds D from a complete cache. `weights` is the data-free matrix, needed for `Fill::Weights`.
pub fn reduce(
    info: &ModelInfo,
    cache: &Path,
    linkage: Linkage,
    fill: Fill,
    weights: Option<&Array2<f32>>,
    device: tch::Device,
) -> anyhow::Result<DistanceMatrix> {
    let meta: CacheMeta = serde_json::from_str(
        &std::fs::read_to_string(cache.join("meta.json"))
            .with_context(|| format!("{} has no meta.json", cache.display()))?,
    )?;
    anyhow::ensure!(meta.model == info.name, "the cache was made for model {}, not {}", meta.model, info.name);
    let n = info.num_classes();
    let missing: Vec<usize> = (0..n).filter(|&c| !class_file(cache, c).with_extension("json").is_file()).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} classes are not extracted yet (e.g. {:?}): run the remaining shards",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let mut sizes = Vec::with_capacity(n);
    let mut rows: Vec<f32> = Vec::new();
    let (mut images, mut skipped) = (0usize, 0usize);
    for c in 0..n {
        let f: Array2<f32> =
            ndarray_npy::read_npy(class_file(cache, c)).with_context(|| format!("class {c} in the cache"))?;
        let entry: ClassEntry =
            serde_json::from_str(&std::fs::read_to_string(class_file(cache, c).with_extension("json"))?)?;
        anyhow::ensure!(
            f.ncols() == meta.feature_dim || f.nrows() == 0,
            "class {c}: {} features, expected {}",
            f.ncols(),
            meta.feature_dim
        );
        sizes.push(f.nrows());
        rows.extend(f.iter());
        images += entry.files.len();
        skipped += entry.skipped.len();
    }
    let total: usize = sizes.iter().sum();
    anyhow::ensure!(total > 0, "no image features in {}", cache.display());
    let features = Array2::from_shape_vec((total, meta.feature_dim), rows)?;
    let cf = ClassFeatures { features: features.view(), sizes: &sizes };
    let mut d = class_distances(&cf, linkage, 1024, device)?;
    let empty = sizes.iter().filter(|&&s| s == 0).count();
    if empty > 0 {
        let max = d.iter().filter(|v| v.is_finite()).cloned().fold(0.0f32, f32::max);
        for i in 0..n {
            for j in 0..n {
                if d[[i, j]].is_nan() {
                    d[[i, j]] = match (fill, weights) {
                        _ if i == j => 0.0,
                        (Fill::Weights, Some(w)) => w[[i, j]],
                        (Fill::Weights, None) => anyhow::bail!("--fill weights needs the data-free matrix"),
                        (Fill::Max, _) => max,
                    };
                }
            }
        }
    }
    let method = match linkage {
        Linkage::Hausdorff => "hausdorff",
        Linkage::Mean => "mean",
        Linkage::Centroid => "centroid",
    };
    let meta = MatrixMeta {
        model: info.name.clone(),
        num_classes: n,
        method: method.into(),
        details: serde_json::json!({
            "image_distance": "1 - cos(features)",
            "feature_dim": meta.feature_dim,
            "images_root": meta.images_root,
            "images_per_class": meta.per_class,
            "images": images,
            "skipped_images": skipped,
            "classes_without_images": empty,
            "fill": if empty > 0 { Some(fill) } else { None },
        }),
        content_sha256: None,
    };
    DistanceMatrix::new(d, meta).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_partition() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!((s.index, s.count), (1, 3));
        assert!(s.owns(4) && !s.owns(3));
        for bad in ["3/3", "1", "a/2", "0/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
