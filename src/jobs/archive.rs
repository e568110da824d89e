//! A job's images uploaded as a zip archive: unpacked into the job's own folder with every
//! bound checked as it goes — names that would leave the folder, links, more files or more
//! unpacked bytes than configured or than the jobs' quota leaves (counted on the bytes actually
//! written, not the sizes the archive claims) — so a hostile archive stops with a clear error and
//! leaves nothing behind.

use std::io::Read;
use std::path::Path;

use super::JobError;

/// What an archive may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_files: usize,
    pub max_bytes: u64,
    /// What `jobs.max_total_bytes` leaves in the jobs' folder (`u64::MAX`: no quota).
    pub room: u64,
}

/// Unpacks the zip at `archive` into `dest` (created); returns the number of files written.
/// On error `dest` is removed.
pub fn unpack(archive: &Path, dest: &Path, limits: Limits) -> Result<usize, JobError> {
    let result = unpack_inner(archive, dest, limits);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

fn unpack_inner(archive: &Path, dest: &Path, limits: Limits) -> Result<usize, JobError> {
    let bad = |m: String| JobError::invalid("archive", m);
    let io = |e: std::io::Error| JobError::Store(super::StoreError::Io(e));
    let file = std::fs::File::open(archive).map_err(io)?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip archive: {e}")))?;
    std::fs::create_dir_all(dest).map_err(io)?;
    let (mut files, mut bytes) = (0usize, 0u64);
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(format!("entry {i}: {e}")))?;
        if entry.is_dir() {
            continue;
        }
        if entry.is_symlink() {
            return Err(bad(format!("{:?} is a link; only files are taken", entry.name())));
        }
        let Some(rel) = entry.enclosed_name() else {
            return Err(bad(format!("{:?} would be written outside the job's folder", entry.name())));
        };
        // Hidden files and macOS resource forks are not images.
        if rel.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.') || c.as_os_str() == "__MACOSX") {
            continue;
        }
        files += 1;
        if files > limits.max_files {
            return Err(bad(format!("more than {} files (jobs.max_archive_files)", limits.max_files)));
        }
        let path = dest.join(&rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut out = std::fs::File::create(&path).map_err(io)?;
        let left = limits.max_bytes.min(limits.room) - bytes;
        let written = std::io::copy(&mut (&mut entry).take(left.saturating_add(1)), &mut out)
            .map_err(|e| bad(format!("{:?}: {e}", rel.display())))?;
        bytes += written;
        if bytes > limits.max_bytes {
            return Err(bad(format!("unpacks to more than {} bytes (jobs.max_unpacked_bytes)", limits.max_bytes)));
        }
        if bytes > limits.room {
            return Err(JobError::QuotaExceeded(format!(
                "the archive unpacks to more than the {} bytes the jobs' folder has left (jobs.max_total_bytes)",
                limits.room
            )));
        }
    }
    if files == 0 {
        return Err(bad("the archive holds no files".into()));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn zip_of(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut z = zip::ZipWriter::new(f.reopen().unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            z.start_file(*name, opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
        f
    }

    const ROOMY: Limits = Limits { max_files: 10, max_bytes: 1 << 20, room: u64::MAX };

    #[test]
    fn files_are_unpacked_in_their_folders_and_hidden_ones_skipped() {
        let z =
            zip_of(&[("a/n1_x.JPEG", b"one"), ("b.png", b"two"), ("__MACOSX/._b.png", b"junk"), (".DS_Store", b"")]);
        let dest = tempfile::tempdir().unwrap();
        let out = dest.path().join("in");
        assert_eq!(unpack(z.path(), &out, ROOMY).unwrap(), 2);
        assert_eq!(std::fs::read(out.join("a/n1_x.JPEG")).unwrap(), b"one");
        assert_eq!(std::fs::read(out.join("b.png")).unwrap(), b"two");
        assert!(!out.join(".DS_Store").exists());
    }

    #[test]
    fn hostile_archives_stop_with_a_clear_error_and_leave_nothing() {
        let dest = tempfile::tempdir().unwrap();
        let out = dest.path().join("in");
        let cases: Vec<(tempfile::NamedTempFile, Limits, &str)> = vec![
            (zip_of(&[("../evil.png", b"x")]), ROOMY, "outside"),
            (zip_of(&[("/etc/evil.png", b"x")]), ROOMY, "outside"),
            (
                zip_of(&[("a.png", b"x"), ("b.png", b"y"), ("c.png", b"z")]),
                Limits { max_files: 2, max_bytes: 1 << 20, room: u64::MAX },
                "more than 2 files",
            ),
            // 1 MiB of zeros compresses to about 1 KiB: the unpacked bytes are what count.
            (
                zip_of(&[("bomb.png", &vec![0u8; 1 << 20])]),
                Limits { max_files: 10, max_bytes: 1000, room: u64::MAX },
                "more than 1000 bytes",
            ),
            // The same bomb against the jobs' quota.
            (
                zip_of(&[("bomb.png", &vec![0u8; 1 << 20])]),
                Limits { max_files: 10, max_bytes: 1 << 30, room: 5000 },
                "jobs.max_total_bytes",
            ),
            (zip_of(&[]), ROOMY, "no files"),
        ];
        for (z, limits, want) in cases {
            let e = unpack(z.path(), &out, limits).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want:?})");
            assert!(!out.exists(), "a refused archive left files behind");
        }
        let not_zip = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_zip.path(), b"PK but not really").unwrap();
        assert!(unpack(not_zip.path(), &out, ROOMY).unwrap_err().to_string().contains("not a zip"));
    }
}
