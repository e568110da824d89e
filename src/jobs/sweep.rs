//! The start-up sweep: what a process killed in the middle of its work left in the jobs' folder,
//! put right before anything runs (one server per jobs folder, so nothing else is writing).
//! The database is the truth; the folder is made to agree with it:
//! - uploads being received (`.uploads/*`) are removed: no upload survives a restart;
//! - a job-named folder (16 hex digits) with no job row is removed: an archive half-unpacked
//!   before its job was created, or a purged job whose folder was being removed;
//! - temporaries (`*.part`) anywhere in a job's folder are removed;
//! - a delivered PNG under `images/` that no result row names is removed: it was renamed into
//!   place but its row never committed, so the image is not finished and will be redone;
//! - a result row whose PNG is missing (written by a version that did not fsync, then a power
//!   cut; or deleted by hand) is removed: without its file the image is not finished. Its job,
//!   if it was `done`, is queued again to redo it (or marked `interrupted` with the count when
//!   `jobs.resume` is off); a job in another state keeps it, its `done` count now honest.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rusqlite::{Connection, params};

use super::StoreError;
use super::disk::PART;
use super::store::now_ms;

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
pub fn sweep(c: &mut Connection, dir: &Path, uploads: &Path, resume: bool) -> Result<Swept, StoreError> {
    let mut out = Swept { uploads: remove_all_in(uploads), ..Swept::default() };
    let jobs: HashSet<String> = {
        let mut st = c.prepare("SELECT id FROM jobs")?;
        st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?
    };
    let mut named: HashMap<String, HashSet<String>> = HashMap::new();
    {
        let mut st = c.prepare("SELECT job_id, png FROM results WHERE png IS NOT NULL")?;
        for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (job, png) = row?;
            named.entry(job).or_default().insert(png);
        }
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
    let mut missing: Vec<(String, String)> = Vec::new();
    for (job, pngs) in &named {
        for png in pngs {
            if !dir.join(job).join(png).is_file() {
                missing.push((job.clone(), png.clone()));
            }
        }
    }
    if !missing.is_empty() {
        let tx = c.transaction()?;
        let mut reopen = HashSet::new();
        for (job, png) in &missing {
            tx.execute("DELETE FROM results WHERE job_id = ?1 AND png = ?2", params![job, png])?;
            reopen.insert(job.clone());
        }
        for job in reopen {
            let changed = if resume {
                tx.execute(
                    "UPDATE jobs SET state = 'queued', resumed = resumed + 1 WHERE id = ?1 AND state = 'done'",
                    params![job],
                )?
            } else {
                tx.execute(
                    "UPDATE jobs SET state = 'interrupted', finished_ms = ?2, \
                     error = 'result files were missing at start-up; their results were removed' \
                     WHERE id = ?1 AND state = 'done'",
                    params![job, now_ms()],
                )?
            };
            if changed > 0 {
                out.reopened.push(job);
            }
        }
        tx.commit()?;
        out.missing_pngs = missing.len();
    }
    out.reopened.sort();
    Ok(out)
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
    use crate::jobs::{JobSpec, JobState, Store, StoredResult};

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

    #[test]
    fn the_folder_is_made_to_agree_with_the_database() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("jobs");
        let uploads = dir.join(".uploads");
        std::fs::create_dir_all(&uploads).unwrap();
        std::fs::write(uploads.join("0123456789abcdef.zip"), b"zip").unwrap();
        let store = Store::open(&tmp.path().join("db.sqlite3")).unwrap();
        let mut c = store.lock();
        let spec = JobSpec { images: "/x".into(), methods: vec![], models: vec![], limit: None, max_iter: None };
        let (job, other) = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb");
        for id in [job, other] {
            Store::insert_job(&c, id, &spec, 3).unwrap();
            Store::set_state(&c, id, JobState::Done, None).unwrap();
        }
        let images = dir.join(job).join("images/m/fgsm");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("kept.png"), b"png").unwrap();
        std::fs::write(images.join("norow.png"), b"png").unwrap();
        std::fs::write(images.join("half.png.0123456789abcdef.part"), b"pn").unwrap();
        Store::insert_result(&c, job, &result("kept.jpg", Some("images/m/fgsm/kept.png"))).unwrap();
        Store::insert_result(&c, job, &result("gone.jpg", Some("images/m/fgsm/gone.png"))).unwrap();
        Store::insert_result(&c, job, &result("nopng.jpg", None)).unwrap();
        std::fs::create_dir_all(dir.join(other).join("report")).unwrap();
        std::fs::write(dir.join(other).join("report/report.md"), b"# r").unwrap();
        // Half-unpacked, no row; and what is not a job's is left alone.
        std::fs::create_dir_all(dir.join("cccccccccccccccc/input")).unwrap();
        std::fs::create_dir_all(dir.join("studies/dddddddddddddddd")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();

        let swept = sweep(&mut c, &dir, &uploads, true).unwrap();
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
        let job_now = Store::job(&c, job).unwrap().unwrap();
        assert_eq!((job_now.state, job_now.done, job_now.resumed), (JobState::Queued, 2, 1));
        assert_eq!(Store::job(&c, other).unwrap().unwrap().state, JobState::Done);
        // A second sweep finds nothing.
        assert_eq!(sweep(&mut c, &dir, &uploads, true).unwrap(), Swept::default());
    }
}
