//! The start-up sweep: what a process killed in the middle of its work left in the jobs' folder,
//! put right before anything runs. It runs only when the server starts alone on its database
//! (no other server is writing to the folder: an upload or a PNG in flight would look the same).
//! The database is the truth; the folder is made to agree with it:
//! - uploads being received (`.uploads/*`) are removed: no upload survives a restart;
//! - a job-named folder (16 hex digits) with no job row is removed: an archive half-unpacked
//!   before its job was created, or a purged job whose folder was being removed;
//! - temporaries (`*.part`) anywhere in a job's folder are removed;
//! - a delivered PNG under `images/` that no result row names is removed: it was renamed into
//!   place but its row never committed, so the image is not finished and will be redone;
//! - a result row whose PNG is missing (written by a version that did not fsync, then a power
//!   cut; or deleted by hand) is removed: without its file the image is not finished, and its
//!   work item is pending again. Its job, if it was `done`, is queued again to redo it (or
//!   marked `interrupted` with the count when `jobs.resume` is off); a job in another state
//!   keeps going, its `done` count now honest.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::StoreError;
use super::disk::PART;
use super::store::{MissingPng, Store, SweepView, blocking};

/// What the sweep removed or changed (logged; returned for tests).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub uploads: usize,
    pub orphan_dirs: usize,
    pub parts: usize,
    pub orphan_pngs: usize,
    pub missing_pngs: usize,
    /// `done` jobs that lost a result and were queued again (or marked interrupted).
    pub reopened: Vec<String>,
}

/// Sweeps `dir` (the jobs' folder) against the database; see the module doc.
pub async fn sweep(store: &Store, dir: &Path, uploads: &Path, resume: bool) -> Result<Swept, StoreError> {
    let view = store.sweep_view().await?;
    let (dir, uploads) = (dir.to_path_buf(), uploads.to_path_buf());
    let (mut out, missing) = blocking(move || walk(view, &dir, &uploads)).await?;
    if !missing.is_empty() {
        out.missing_pngs = missing.len();
        out.reopened = store.drop_missing(missing, resume).await?;
        out.reopened.sort();
    }
    Ok(out)
}

/// The folder's half of the sweep: removes what no row accounts for and returns the rows whose
/// PNG is gone.
fn walk(view: SweepView, dir: &Path, uploads: &Path) -> Result<(Swept, Vec<MissingPng>), StoreError> {
    let mut out = Swept { uploads: remove_all_in(uploads), ..Swept::default() };
    let jobs: HashSet<String> = view.jobs.into_iter().collect();
    let mut named: HashMap<String, HashSet<String>> = HashMap::new();
    let mut rows: Vec<MissingPng> = Vec::new();
    for (job, png, model, method, file) in view.pngs {
        named.entry(job.clone()).or_default().insert(png.clone());
        rows.push(MissingPng { job, png, model, method, file });
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_job_id(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if !jobs.contains(&name) {
            if std::fs::remove_dir_all(entry.path()).is_ok() {
                out.orphan_dirs += 1;
            }
            continue;
        }
        let pngs = named.get(&name).cloned().unwrap_or_default();
        sweep_job(&entry.path(), &entry.path(), &pngs, &mut out);
    }
    // Rows whose PNG is gone.
    let missing = rows.into_iter().filter(|m| !dir.join(&m.job).join(&m.png).is_file()).collect();
    Ok((out, missing))
}

/// Removes `*.part` files anywhere under `dir`, and the PNGs under `<job>/images/` no row names.
fn sweep_job(job_dir: &Path, dir: &Path, named: &HashSet<String>, out: &mut Swept) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => sweep_job(job_dir, &path, named, out),
            Ok(t) if t.is_file() => {
                let rel = path.strip_prefix(job_dir).unwrap_or(&path);
                if path.extension().is_some_and(|e| e == PART) {
                    out.parts += usize::from(std::fs::remove_file(&path).is_ok());
                } else if rel.starts_with("images")
                    && path.extension().is_some_and(|e| e == "png")
                    && !named.contains(rel.to_string_lossy().as_ref())
                {
                    out.orphan_pngs += usize::from(std::fs::remove_file(&path).is_ok());
                }
            }
            _ => {}
        }
    }
}

/// Removes everything in `dir` (kept itself); returns how many entries went.
fn remove_all_in(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) }
                .is_ok()
        })
        .count()
}

/// A job's id as `new_id` makes it: 16 lowercase hex digits.
fn is_job_id(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::store::Sqlite;
    use crate::jobs::{JobSpec, JobState, StoredResult};

    fn result(file: &str, png: Option<&str>) -> StoredResult {
        StoredResult {
            model: "m".into(),
            method: "fgsm".into(),
            file: file.into(),
            record: "{}".into(),
            png: png.map(String::from),
            success: Some(true),
        }
    }

    #[tokio::test]
    async fn the_folder_is_made_to_agree_with_the_database() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("jobs");
        let uploads = dir.join(".uploads");
        std::fs::create_dir_all(&uploads).unwrap();
        std::fs::write(uploads.join("0123456789abcdef.zip"), b"zip").unwrap();
        let sqlite = Sqlite::open(&tmp.path().join("db.sqlite3")).unwrap();
        let store = Store::Sqlite(sqlite.clone());
        let spec = JobSpec { images: "/x".into(), methods: vec![], models: vec![], limit: None, max_iter: None };
        let (job, other) = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb");
        let images = dir.join(job).join("images/m/fgsm");
        {
            let mut c = sqlite.lock();
            for id in [job, other] {
                Sqlite::insert_job(&mut c, id, &spec, 3, &[]).unwrap();
                Sqlite::set_state(&c, id, JobState::Done, None).unwrap();
            }
            Sqlite::insert_result(&c, job, &result("kept.jpg", Some("images/m/fgsm/kept.png"))).unwrap();
            Sqlite::insert_result(&c, job, &result("gone.jpg", Some("images/m/fgsm/gone.png"))).unwrap();
            Sqlite::insert_result(&c, job, &result("nopng.jpg", None)).unwrap();
        }
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("kept.png"), b"png").unwrap();
        std::fs::write(images.join("norow.png"), b"png").unwrap();
        std::fs::write(images.join("half.png.0123456789abcdef.part"), b"pn").unwrap();
        std::fs::create_dir_all(dir.join(other).join("report")).unwrap();
        std::fs::write(dir.join(other).join("report/report.md"), b"# r").unwrap();
        // Half-unpacked, no row; and what is not a job's is left alone.
        std::fs::create_dir_all(dir.join("cccccccccccccccc/input")).unwrap();
        std::fs::create_dir_all(dir.join("studies/dddddddddddddddd")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();

        let swept = sweep(&store, &dir, &uploads, true).await.unwrap();
        assert_eq!(
            swept,
            Swept {
                uploads: 1,
                orphan_dirs: 1,
                parts: 1,
                orphan_pngs: 1,
                missing_pngs: 1,
                reopened: vec![job.to_string()]
            }
        );
        assert!(images.join("kept.png").is_file() && !images.join("norow.png").exists());
        assert!(!dir.join("cccccccccccccccc").exists());
        assert!(dir.join("studies/dddddddddddddddd").is_dir() && dir.join("notes.txt").is_file());
        assert!(dir.join(other).join("report/report.md").is_file());
        {
            let c = sqlite.lock();
            let job_now = Sqlite::job(&c, job).unwrap().unwrap();
            assert_eq!((job_now.state, job_now.done, job_now.resumed), (JobState::Queued, 2, 1));
            assert_eq!(Sqlite::job(&c, other).unwrap().unwrap().state, JobState::Done);
        }
        // A second sweep finds nothing.
        assert_eq!(sweep(&store, &dir, &uploads, true).await.unwrap(), Swept::default());
    }
}
