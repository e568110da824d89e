//! Evaluation images: a flat folder of `<wnid>_*.<ext>` files or an ImageFolder tree
//! (`ROOT/<class>/*`). Classes map to the model's list by WordNet id or name.

use std::path::{Path, PathBuf};

use crate::model::ClassList;

#[derive(Debug, Clone)]
pub struct Sample {
    pub path: PathBuf,
    /// The true class, when the file or folder name names one of the model's classes.
    pub label: Option<usize>,
    /// What the name said, for reports when it matched no class.
    pub class_key: Option<String>,
}

/// Lists the samples under `root`, sorted by path. Non-files are skipped; everything else is
/// listed (unreadable and non-image files included), so the run can report them.
pub fn discover(root: &Path, classes: &ClassList) -> std::io::Result<Vec<Sample>> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(root)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for entry in entries {
        let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        if name.starts_with('.') {
            continue;
        }
        if entry.is_dir() {
            let label = classes.resolve(&name);
            let mut files: Vec<PathBuf> =
                std::fs::read_dir(&entry)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
            files.sort();
            out.extend(files.into_iter().map(|path| Sample { path, label, class_key: Some(name.clone()) }));
        } else if entry.is_file() || std::fs::symlink_metadata(&entry).is_ok() {
            let key = name.split('_').next().filter(|k| k.len() < name.len()).map(str::to_string);
            let label = key.as_deref().and_then(|k| classes.resolve(k));
            out.push(Sample { path: entry, label, class_key: key });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_and_image_folder_layouts() {
        let classes = ClassList::parse("n01440764 tench\nn02391049 zebra\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("n02391049_zebra.JPEG"), b"x").unwrap();
        std::fs::write(dir.path().join("n09999999_unknown.JPEG"), b"x").unwrap();
        std::fs::write(dir.path().join("README"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("tench")).unwrap();
        std::fs::write(dir.path().join("tench/a.jpg"), b"x").unwrap();
        let s = discover(dir.path(), &classes).unwrap();
        let got: Vec<(String, Option<usize>)> =
            s.iter().map(|s| (s.path.file_name().unwrap().to_string_lossy().into_owned(), s.label)).collect();
        assert_eq!(
            got,
            vec![
                ("README".into(), None),
                ("n02391049_zebra.JPEG".into(), Some(1)),
                ("n09999999_unknown.JPEG".into(), None),
                ("a.jpg".into(), Some(0)),
            ]
        );
    }
}
