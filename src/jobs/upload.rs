//! Jobs on uploaded archives, and the jobs' folder's quota (`jobs.max_total_bytes`) that
//! bounds them: what the folder holds is walked when a job or an upload asks for room (no
//! running count to drift from the disk), and an archive is unpacked within what is left.

use std::path::{Path, PathBuf};

use super::store::blocking;
use super::{ArchiveSpec, JobError, JobInfo, JobSpec, Jobs, StoreError, archive, disk, new_id};

impl Jobs {
    /// Bytes the jobs' folder holds now (walked: uploads, inputs, PNGs, reports).
    pub async fn usage(&self) -> Result<u64, JobError> {
        let dir = self.inner.dir.clone();
        Ok(blocking(move || Ok::<_, StoreError>(disk::usage(&dir))).await?)
    }

    /// Bytes that may still be added to the jobs' folder, refusing (507) when `adding` more
    /// would pass `jobs.max_total_bytes`; `u64::MAX` without a quota.
    pub async fn room_for(&self, adding: u64) -> Result<u64, JobError> {
        let max = self.inner.config.max_total_bytes;
        if max == 0 {
            return Ok(u64::MAX);
        }
        let used = self.usage().await?;
        disk::check_quota(max, used, adding)?;
        Ok(max - used)
    }

    /// What the quota leaves for unpacking `archive`, not counting the archive itself (it goes
    /// once unpacked).
    async fn room_beside(&self, archive: &Path) -> Result<u64, JobError> {
        let max = self.inner.config.max_total_bytes;
        if max == 0 {
            return Ok(u64::MAX);
        }
        let size = std::fs::metadata(archive).map_or(0, |m| m.len());
        let used = self.usage().await?.saturating_sub(size);
        disk::check_quota(max, used, 0)?;
        Ok(max - used)
    }

    /// A job on the images of an uploaded zip archive (at `archive`, removed afterwards): it is
    /// unpacked into the job's own folder (`<id>/input/`), within `jobs.max_archive_files`,
    /// `jobs.max_unpacked_bytes` and what `jobs.max_total_bytes` leaves (the archive itself not
    /// counted: it goes once unpacked), synced, and the job runs on that folder.
    pub async fn create_from_archive(&self, spec: ArchiveSpec, archive: PathBuf) -> Result<JobInfo, JobError> {
        let id = new_id();
        let dest = self.job_dir(&id).join("input");
        let room = match self.room_beside(&archive).await {
            Ok(room) => room,
            Err(e) => {
                let _ = std::fs::remove_file(&archive);
                return Err(e);
            }
        };
        let limits = archive::Limits {
            max_files: self.inner.config.max_archive_files,
            max_bytes: self.inner.config.max_unpacked_bytes,
            room,
        };
        let (d, root) = (dest.clone(), self.inner.dir.clone());
        let unpacked = blocking(move || {
            let r = archive::unpack(&archive, &d, limits);
            let _ = std::fs::remove_file(&archive);
            // On disk before the job's row says it exists.
            let synced = |files: usize| -> Result<usize, JobError> {
                disk::sync_tree(&d)
                    .and_then(|()| disk::sync_up(d.parent().unwrap_or(&d), &root))
                    .map_err(StoreError::Io)?;
                Ok(files)
            };
            Ok::<_, StoreError>(r.and_then(synced))
        })
        .await?;
        let files = match unpacked {
            Ok(files) => files,
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.job_dir(&id));
                return Err(e);
            }
        };
        tracing::info!(job = %id, files, "archive unpacked");
        let spec = JobSpec {
            images: dest.to_string_lossy().into_owned(),
            methods: spec.methods,
            models: spec.models,
            limit: spec.limit,
            max_iter: spec.max_iter,
        };
        let created = self.queue_new(id.clone(), spec).await;
        if created.is_err() {
            let _ = std::fs::remove_dir_all(self.job_dir(&id));
        }
        created
    }
}
