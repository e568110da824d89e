//! A study's making: the puzzles a finished job's records give ([`plan`]), the copies of their
//! images in the study's folder ([`materialise`]) and of the reference pictures of the labels
//! they show, from a reference set apart from the job's folder ([`references`]). Only files
//! whose real path lies inside the folder they were found in are copied ([`inside`]), so a link
//! in a job's folder or a reference set cannot make the study serve a file from elsewhere to its
//! observers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{CLEAN, Puzzle, StudyError, design, store};
use crate::eval::Record;
use crate::imaging::{self, DecodeLimits};
use crate::jobs::StoreError;
use crate::wordnet::WordNet;

/// One puzzle before its image is copied: where its image comes from.
pub(super) struct Planned {
    source: String,
    kind: usize,
    category: String,
    /// Path of the image: the source (relative to the job's folder) for clean puzzles, the
    /// delivered PNG (relative to the job's own folder) for adversarial ones.
    from: String,
    label: String,
    label_index: usize,
    label_wnid: Option<String>,
    truth: bool,
    animal: bool,
    source_index: usize,
}

/// The puzzles a job's records give: each source with a true class, clean, and each method's
/// delivered image where the attack did what the paper counts as an adversarial example: the
/// model classified the source correctly, the attack reports success, and the label it now
/// gives is not the true class (an image the model already got wrong is no adversarial
/// puzzle). Sources are numbered for the Latin square in an order shuffled by `seed`, not
/// alphabetically. A method without one such image fails the study (422 `methods`, naming it):
/// its group would have nothing of it to show.
pub(super) fn plan(
    results: &[crate::jobs::StoredResult],
    model: &str,
    categories: &[String],
    seed: u64,
) -> Result<Vec<Planned>, StudyError> {
    let wn = WordNet::embedded();
    let mut by_source: BTreeMap<String, HashMap<String, (Record, Option<String>)>> = BTreeMap::new();
    for r in results.iter().filter(|r| r.model == model) {
        let record: Record = serde_json::from_str(&r.record)
            .map_err(|e| StoreError::Corrupt(r.file.clone(), format!("stored result: {e}")))?;
        by_source.entry(r.file.clone()).or_default().insert(r.method.clone(), (record, r.png.clone()));
    }
    let mut sources: Vec<_> = by_source.into_iter().collect();
    design::shuffle_sources(seed, &mut sources);
    let mut out = Vec::new();
    let mut source_index = 0;
    for (source, methods) in sources {
        let Some(truth) = methods.values().find_map(|(r, _)| r.true_class.clone()) else { continue };
        let animal = truth.wnid.as_deref().and_then(|w| wn.group(w)) == Some("animal");
        out.push(Planned {
            source: source.clone(),
            kind: 0,
            category: CLEAN.into(),
            from: source.clone(),
            label: truth.label.clone(),
            label_index: truth.index,
            label_wnid: truth.wnid.clone(),
            truth: true,
            animal,
            source_index,
        });
        for (k, method) in categories.iter().enumerate().skip(1) {
            let Some((record, Some(png))) = methods.get(method) else { continue };
            let Some(result) = &record.result else { continue };
            if !adversarial(result, truth.index) {
                continue;
            }
            out.push(Planned {
                source: source.clone(),
                kind: k,
                category: method.clone(),
                from: png.clone(),
                label: result.final_.label.clone(),
                label_index: result.final_.index,
                label_wnid: result.final_.wnid.clone(),
                truth: false,
                animal,
                source_index,
            });
        }
        source_index += 1;
    }
    if let Some(empty) = categories.iter().enumerate().skip(1).find(|(k, _)| !out.iter().any(|p| p.kind == *k)) {
        return Err(StudyError::invalid(
            "methods",
            format!(
                "{:?} fooled the model on no image it classified correctly, so it has no puzzle; \
                 leave it out of `methods`",
                empty.1
            ),
        ));
    }
    Ok(out)
}

/// An attack's result is an adversarial puzzle: the source was classified as its true class,
/// the attack reports success, and the final label is another class.
fn adversarial(result: &crate::eval::ResultFields, truth: usize) -> bool {
    result.original.index == truth && result.success && result.final_.index != truth
}

/// `path` resolved (links followed), when that is a file inside `root` (itself resolved): a
/// link in the job's folder must not make the study copy, and then serve to observers, a file
/// from elsewhere on the server.
fn inside(path: &Path, root: &Path) -> Option<PathBuf> {
    let real = path.canonicalize().ok()?;
    (real.starts_with(root) && real.is_file()).then_some(real)
}

/// The labels the puzzles show, each once: (class index, the key its reference pictures are
/// stored under — its wnid, else its name — and its name).
pub(super) fn labels(plan: &[Planned]) -> Vec<(usize, String, String)> {
    let mut seen = std::collections::HashSet::new();
    plan.iter()
        .filter(|p| seen.insert(p.label_index))
        .map(|p| (p.label_index, super::reference_key(p.label_wnid.as_deref(), &p.label), p.label.clone()))
        .collect()
}

/// Copies the puzzle images (as PNGs, under shuffled ids) into the study's folder, each puzzle
/// in one of `groups` groups (the study's categories: one number, stored with the study); only
/// files inside the folder they are named from ([`inside`]): a puzzle's image elsewhere fails
/// the study (422 `job`).
pub(super) fn materialise(
    mut plan: Vec<Planned>,
    folder: &Path,
    job_dir: &Path,
    dir: &Path,
    groups: usize,
) -> Result<Vec<Puzzle>, StudyError> {
    use rand::seq::SliceRandom;
    let io = |e: std::io::Error| StudyError::Store(StoreError::Io(e));
    let real_folder = folder.canonicalize().map_err(|e| StudyError::invalid("job", format!("its folder: {e}")))?;
    let real_job_dir = job_dir.canonicalize().map_err(io)?;
    std::fs::create_dir_all(dir.join("images")).map_err(io)?;
    // Ids in a random order, so an id tells nothing of its source or category.
    plan.shuffle(&mut rand::rng());
    let mut puzzles = Vec::with_capacity(plan.len());
    for (n, p) in plan.into_iter().enumerate() {
        let id = n as i64 + 1;
        let (src, root) =
            if p.kind == 0 { (folder.join(&p.from), &real_folder) } else { (job_dir.join(&p.from), &real_job_dir) };
        let src = inside(&src, root).ok_or_else(|| {
            StudyError::invalid("job", format!("{}: missing, or a link to a file outside its folder", p.from))
        })?;
        let rel = format!("images/{id}.png");
        let img = image::open(&src).map_err(|e| StudyError::invalid("job", format!("{}: {e}", p.from)))?;
        img.to_rgb8().save(dir.join(&rel)).map_err(|e| io(std::io::Error::other(e.to_string())))?;
        puzzles.push(Puzzle {
            id,
            group: design::group_of(p.source_index, p.kind, groups) as u32,
            source: p.source,
            category: p.category,
            image: rel,
            label: p.label,
            label_wnid: p.label_wnid,
            truth: p.truth,
            animal: p.animal,
        });
    }
    Ok(puzzles)
}

/// Labels named in a refusal before "and N more".
const NAMED_LABELS: usize = 10;

/// The reference pictures of every label shown (`labels`, from [`labels`]): up to `per_label`
/// pictures of each from the reference set `set` (resolved; `samples` its discovered files),
/// copied into the study's folder as PNGs under opaque names — the same rule for every label,
/// whether a clean or an adversarial puzzle shows it. Only pictures inside the set that decode
/// within the server's upload limits (`limits`: a client names the set) count. The set must lie
/// apart from the job's pictures and folder (`apart_from`: neither one of them, nor inside or
/// around one), and hold a picture of every label: else 422 `reference_images`, naming what is
/// missing.
pub(super) fn references(
    labels: &[(usize, String, String)],
    set: &Path,
    samples: &[crate::dataset::Sample],
    apart_from: &[&Path],
    dir: &Path,
    per_label: usize,
    limits: &DecodeLimits,
) -> Result<Vec<store::Reference>, StudyError> {
    let io = |e: std::io::Error| StudyError::Store(StoreError::Io(e));
    let invalid = |m: String| StudyError::invalid("reference_images", m);
    for other in apart_from.iter().filter_map(|p| p.canonicalize().ok()) {
        if set.starts_with(&other) || other.starts_with(set) {
            return Err(invalid(format!(
                "{} is, holds or lies in the job's own folder ({}): give a reference set apart from the pictures \
                 the study shows",
                set.display(),
                other.display()
            )));
        }
    }
    if per_label == 0 {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir.join("references")).map_err(io)?;
    let (mut refs, mut missing) = (Vec::new(), Vec::new());
    for (index, key, name) in labels {
        let mut copied = 0;
        for s in samples.iter().filter(|s| s.label == Some(*index)) {
            if copied == per_label {
                break;
            }
            let Some(real) = inside(&s.path, set) else { continue };
            let too_big = std::fs::metadata(&real).map_or(true, |m| m.len() > limits.max_bytes as u64);
            let Some(img) = (!too_big).then(|| std::fs::read(&real).ok()).flatten() else { continue };
            let Ok(img) = imaging::decode(&img, limits) else { continue };
            let png = imaging::encode_png(img.width, img.height, &img.rgb, None)
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            let rel = format!("references/{}.png", refs.len() + 1);
            std::fs::write(dir.join(&rel), png).map_err(io)?;
            let source = s.path.strip_prefix(set).unwrap_or(&s.path).to_string_lossy().into_owned();
            refs.push((key.clone(), rel, source));
            copied += 1;
        }
        if copied == 0 {
            missing.push(format!("{name:?} ({key})"));
        }
    }
    if !missing.is_empty() {
        let more = missing.len().saturating_sub(NAMED_LABELS);
        missing.truncate(NAMED_LABELS);
        let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
        return Err(invalid(format!(
            "{} has no picture of {}{tail}: a reference set holds every label a puzzle shows (a folder per class, \
             `<wnid>/…`, or files `<wnid>_….jpg`)",
            set.display(),
            missing.join(", ")
        )));
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_really_inside_the_folder_count() {
        let (root, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let real_root = root.path().canonicalize().unwrap();
        std::fs::write(root.path().join("a.png"), b"a").unwrap();
        std::fs::write(outside.path().join("secret.png"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.png"), root.path().join("leak.png")).unwrap();
        std::os::unix::fs::symlink(root.path().join("a.png"), root.path().join("alias.png")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("dir")).unwrap();
        assert_eq!(inside(&root.path().join("a.png"), &real_root), Some(real_root.join("a.png")));
        assert_eq!(inside(&root.path().join("alias.png"), &real_root), Some(real_root.join("a.png")));
        assert_eq!(inside(&root.path().join("leak.png"), &real_root), None);
        assert_eq!(inside(&root.path().join("dir/secret.png"), &real_root), None);
        assert_eq!(inside(&root.path().join("../x.png"), &real_root), None);
        assert_eq!(inside(root.path(), &real_root), None, "a folder is not a file");
    }
}
