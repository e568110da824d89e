//! A job's files on disk: written so that a crash or a power cut never leaves a torn file under
//! its final name (a `*.part` temporary, fsynced, renamed, its folder fsynced — all before the
//! row that names it commits), and the jobs' folder measured for `jobs.max_total_bytes`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::JobError;

/// The suffix of every temporary file; whatever carries it at start-up is a leftover.
pub const PART: &str = "part";

/// Writes `bytes` to `path` durably: a temporary beside it (its own random name, so a second
/// writer never shares it), fsynced, renamed into place, then its folder fsynced — and every
/// folder created for it, up to the one that already existed (a name is durable only once the
/// folder holding it is synced).
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    Part::write(path, bytes)?.place()
}

/// A file written and synced under a temporary name beside its final one, not yet in place:
/// `place` renames it (when its row may commit); dropped unplaced, it is removed.
pub struct Part {
    tmp: PathBuf,
    path: PathBuf,
    /// The folder above `path` that existed before: folders from here down are synced.
    existing: PathBuf,
    placed: bool,
}

impl Part {
    pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<Self> {
        let dir = path.parent().ok_or_else(|| std::io::Error::other(format!("{} has no folder", path.display())))?;
        let existing = dir.ancestors().find(|d| d.is_dir()).unwrap_or(dir).to_path_buf();
        std::fs::create_dir_all(dir)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let part = Self {
            tmp: dir.join(format!("{name}.{}.{PART}", super::new_id())),
            path: path.into(),
            existing,
            placed: false,
        };
        let mut f = std::fs::File::create(&part.tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(part)
    }

    /// Renames the file into place and syncs its folder (and those made for it).
    pub fn place(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.placed = true;
        let dir = self.path.parent().unwrap_or(&self.path);
        sync_up(dir, &self.existing)
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Fsyncs `dir` and each folder above it up to and including `root` (a folder's entry is
/// durable only once its parent is synced).
pub fn sync_up(dir: &Path, root: &Path) -> std::io::Result<()> {
    for d in dir.ancestors() {
        sync_dir(d)?;
        if d == root || !d.starts_with(root) {
            break;
        }
    }
    Ok(())
}

/// Fsyncs one folder (its entries: names created, renamed or removed in it).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Fsyncs every file and folder under `dir` (the report, written by `eval::report` in place,
/// before the job is marked done).
pub fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Bytes held by the files under `dir` (links are not followed; a missing folder holds 0).
pub fn usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => usage(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// `jobs.max_total_bytes` as a check: `adding` more bytes to a folder that holds `used` must
/// stay within `max` (0: no quota).
pub fn check_quota(max: u64, used: u64, adding: u64) -> Result<(), JobError> {
    if max == 0 || used.saturating_add(adding) <= max {
        return Ok(());
    }
    Err(JobError::QuotaExceeded(format!(
        "the jobs' folder holds {used} bytes; {adding} more would pass its quota of {max} bytes \
         (jobs.max_total_bytes)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_write_leaves_the_file_and_no_temporary() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("images/m/fgsm/a.png");
        write_durably(&path, b"one").unwrap();
        write_durably(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.png")]);
        assert_eq!(usage(root.path()), 3);
        sync_tree(root.path()).unwrap();
    }

    #[test]
    fn the_quota_counts_what_is_held_and_what_comes() {
        assert!(check_quota(0, u64::MAX, 1).is_ok(), "0 is no quota");
        assert!(check_quota(10, 4, 6).is_ok());
        let e = check_quota(10, 4, 7).unwrap_err().to_string();
        assert!(e.contains("jobs.max_total_bytes"), "{e}");
    }
}
