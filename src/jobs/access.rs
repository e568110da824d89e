//! What a job may read: folders under `jobs.allowed_dirs` and nothing a link inside them points
//! to elsewhere. A folder named by a client is first checked by its text alone (absolute, no
//! `..`, under an allowed root), so that the answer for a path outside the allowed folders is the
//! same 403 whether it exists or not — the file system is touched only inside them. Then every
//! file the job would read is resolved (links followed) and must still lie inside: a link that
//! leads out refuses the job at creation (403, naming it) and fails it if it appears later.

use std::path::{Component, Path, PathBuf};

use super::JobError;
use crate::dataset::Sample;

/// The allowed folders, as configured (made absolute) and as resolved at start-up.
#[derive(Debug, Clone, Default)]
pub struct Roots {
    configured: Vec<PathBuf>,
    resolved: Vec<PathBuf>,
    /// `jobs.allowed_dirs` as written, for messages.
    shown: Vec<String>,
}

impl Roots {
    pub fn new(allowed_dirs: &[String]) -> Self {
        let cwd = std::env::current_dir().unwrap_or_default();
        let expanded: Vec<PathBuf> = allowed_dirs
            .iter()
            .filter_map(|d| crate::config::expand_path(d).ok())
            .map(|d| normalise(&cwd.join(d)))
            .collect();
        let resolved = expanded.iter().filter_map(|d| d.canonicalize().ok()).collect();
        Self { configured: expanded, resolved, shown: allowed_dirs.to_vec() }
    }

    /// The resolved roots (links followed), where every file a job reads must lie.
    pub fn resolved(&self) -> &[PathBuf] {
        &self.resolved
    }

    fn forbidden(&self, what: &str) -> JobError {
        JobError::Forbidden(format!("{what} is not under a folder jobs may read (jobs.allowed_dirs: {:?})", self.shown))
    }

    /// The folder a client named, resolved, or why not. Outside the allowed folders nothing is
    /// looked at: existing or not, the answer is the same 403.
    pub fn folder(&self, raw: &str) -> Result<PathBuf, JobError> {
        self.folder_for("images", raw)
    }

    /// [`Self::folder`], for the request's parameter `param`.
    pub fn folder_for(&self, param: &'static str, raw: &str) -> Result<PathBuf, JobError> {
        let path = Path::new(raw);
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(JobError::invalid(param, format!("{raw:?} must be an absolute path without `..`")));
        }
        let path = normalise(path);
        let under = |roots: &[PathBuf]| roots.iter().any(|r| path.starts_with(r));
        if !under(&self.configured) && !under(&self.resolved) {
            return Err(self.forbidden(raw));
        }
        let folder = path.canonicalize().map_err(|e| JobError::invalid(param, format!("{raw}: {e}")))?;
        if !self.resolved.iter().any(|r| folder.starts_with(r)) {
            return Err(self.forbidden(raw));
        }
        if !folder.is_dir() {
            return Err(JobError::invalid(param, format!("{raw} is not a folder")));
        }
        Ok(folder)
    }

    /// Every sample resolves (links followed) inside one of these roots or `also` (a job's own
    /// folder, where uploads are unpacked); the first that does not refuses the job.
    pub fn check_samples(&self, samples: &[Sample], also: Option<&Path>) -> Result<(), JobError> {
        for s in samples {
            let inside = s
                .path
                .canonicalize()
                .is_ok_and(|real| self.resolved.iter().map(PathBuf::as_path).chain(also).any(|r| real.starts_with(r)));
            if !inside {
                return Err(JobError::Forbidden(format!(
                    "{} leads outside the folders jobs may read (a link; jobs.allowed_dirs: {:?})",
                    s.path.display(),
                    self.shown
                )));
            }
        }
        Ok(())
    }
}

/// `path` without `.` components (lexically; `..` is refused before this is used on input).
fn normalise(path: &Path) -> PathBuf {
    path.components().filter(|c| *c != Component::CurDir).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: PathBuf) -> Sample {
        Sample { path, label: None, class_key: None }
    }

    #[test]
    fn a_path_outside_is_refused_alike_whether_it_exists_or_not() {
        let allowed = tempfile::tempdir().unwrap();
        let roots = Roots::new(&[allowed.path().to_string_lossy().into_owned()]);
        for outside in ["/etc", "/no/such/folder/anywhere"] {
            assert!(matches!(roots.folder(outside), Err(JobError::Forbidden(_))), "{outside}");
        }
        let dotdot = format!("{}/../etc", allowed.path().display());
        assert!(matches!(roots.folder(&dotdot), Err(JobError::Invalid { .. })));
        assert!(matches!(roots.folder("relative/x"), Err(JobError::Invalid { .. })));
        // Inside, a missing folder is 422: revealing it is harmless there.
        let missing = allowed.path().join("missing");
        assert!(matches!(roots.folder(&missing.to_string_lossy()), Err(JobError::Invalid { .. })));
        std::fs::create_dir(allowed.path().join("ok")).unwrap();
        assert!(roots.folder(&format!("{}/./ok", allowed.path().display())).is_ok());
    }

    #[test]
    fn a_link_leading_out_is_refused_and_one_staying_inside_is_not() {
        let allowed = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.png"), b"x").unwrap();
        std::fs::write(allowed.path().join("a.png"), b"x").unwrap();
        let folder = allowed.path().join("in");
        std::fs::create_dir(&folder).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.png"), folder.join("out.png")).unwrap();
        std::os::unix::fs::symlink(allowed.path().join("a.png"), folder.join("in.png")).unwrap();
        // A folder that is itself a link out.
        std::os::unix::fs::symlink(outside.path(), allowed.path().join("away")).unwrap();
        let roots = Roots::new(&[allowed.path().to_string_lossy().into_owned()]);
        assert!(roots.check_samples(&[sample(folder.join("in.png"))], None).is_ok());
        let e = roots.check_samples(&[sample(folder.join("out.png"))], None).unwrap_err();
        assert!(matches!(e, JobError::Forbidden(_)) && e.to_string().contains("out.png"), "{e}");
        assert!(roots.check_samples(&[sample(folder.join("out.png"))], Some(outside.path())).is_ok());
        assert!(matches!(roots.folder(&allowed.path().join("away").to_string_lossy()), Err(JobError::Forbidden(_))));
    }
}
