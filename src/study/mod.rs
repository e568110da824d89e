//! Human studies: the paper's subjective experiment (Section 4.1, Appendix A) run on a finished
//! job. Puzzles are each source image clean with its true label and each method's adversarial
//! image with the label the model now gives it; observers (a link each, no account) answer
//! "is this label correct?"; the answers give the Confusion Rate and Performance Gain per
//! observer and method ([`results`]).
//!
//! A study copies what it shows into its own folder (`<jobs.dir>/studies/<id>/`), every puzzle
//! image as a PNG named by an opaque id, so neither the file type nor its name tells a clean
//! image from an adversarial one; its rows live in the jobs' SQLite database. Only files whose
//! real path (links resolved) lies inside the folder they were found in are copied.
//!
//! Reference pictures come only from a reference set given when the study is made, by one rule
//! for every puzzle: pictures of the label it shows. The observer's page shows them on request,
//! and each answer records whether they were opened.
//!
//! An observer link expires (`[studies]`, or per link) and can be revoked on its own; an
//! expired link answers 410 Gone, a revoked one 404 like a link that never existed.

pub mod bootstrap;
mod build;
pub mod design;
mod export;
mod observers;
pub mod results;
pub mod store;
mod types;

use std::collections::HashMap;
use std::path::PathBuf;

use crate::engine::Engine;
use crate::jobs::{JobState, Jobs, StoreError};
pub use design::StudyDesign;
pub use results::{CLEAN, Rates};
pub use types::*;

pub use crate::config::studies::StudiesConfig;
/// The studies service: on the jobs' store and folder.
#[derive(Clone)]
pub struct Studies {
    jobs: Jobs,
    engine: Engine,
    config: StudiesConfig,
}

impl Studies {
    /// With the default `[studies]` settings (see [`Self::with_config`]).
    pub fn new(jobs: Jobs, engine: Engine) -> Self {
        Self { jobs, engine, config: StudiesConfig::default() }
    }

    pub fn with_config(mut self, config: StudiesConfig) -> Self {
        self.config = config;
        self
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.jobs.root_dir().join("studies").join(id)
    }

    /// Makes the puzzles of a finished job, copies their images and the reference pictures
    /// into the study's folder, stores it, and adds `spec.observers` observers.
    pub async fn create(&self, spec: StudySpec) -> Result<StudyInfo, StudyError> {
        bounded("job", &spec.job, MAX_ID)?;
        let name = spec.name.as_deref().map(|n| bounded("name", n, MAX_STUDY_NAME)).transpose()?;
        if let Some(m) = &spec.model {
            bounded("model", m, MAX_STUDY_NAME)?;
        }
        if spec.methods.len() > MAX_METHODS {
            return Err(StudyError::invalid("methods", format!("at most {MAX_METHODS}")));
        }
        for m in &spec.methods {
            bounded("methods", m, MAX_METHOD)?;
        }
        let job = self.jobs.get(&spec.job).await?;
        if job.state != JobState::Done {
            return Err(StudyError::Conflict(format!(
                "job {} is {}; a study needs a finished (done) job",
                job.id,
                job.state.as_str()
            )));
        }
        let model = match &spec.model {
            Some(m) if job.spec.models.contains(m) => m.clone(),
            Some(m) => return Err(StudyError::invalid("model", format!("job {} did not attack with {m:?}", job.id))),
            None => job.spec.models.first().cloned().unwrap_or_default(),
        };
        let methods = if spec.methods.is_empty() { job.spec.methods.clone() } else { spec.methods.clone() };
        if let Some(m) = methods.iter().find(|m| !job.spec.methods.contains(m)) {
            return Err(StudyError::invalid("methods", format!("job {} did not run {m:?}", job.id)));
        }
        if spec.observers > MAX_OBSERVERS {
            return Err(StudyError::invalid("observers", format!("at most {MAX_OBSERVERS}")));
        }
        if spec.references > MAX_REFERENCES {
            return Err(StudyError::invalid("references", format!("at most {MAX_REFERENCES} per label")));
        }
        let reference_set = match &spec.reference_images {
            Some(raw) => {
                bounded("reference_images", raw, MAX_PATH)?;
                Some(self.jobs.readable_folder("reference_images", raw)?)
            }
            None => None,
        };
        let (_, info) = self.engine.model(Some(&model))?;
        let results = self.jobs.results(&job.id).await?;
        let id = crate::jobs::new_id();
        // 53 bits: the seed survives a round trip through a JavaScript number.
        let seed = spec.seed.unwrap_or_else(|| {
            use rand::Rng;
            rand::rng().random::<u64>() >> 11
        });
        let mut categories = vec![CLEAN.to_string()];
        categories.extend(methods.iter().cloned());
        let row = StudyRow {
            id: id.clone(),
            job: job.id.clone(),
            name: name.unwrap_or_else(|| format!("study of job {}", job.id)),
            model: model.clone(),
            groups: categories.len() as u32,
            categories: categories.clone(),
            references: if reference_set.is_some() { spec.references } else { 0 },
            created_ms: crate::jobs::store::now_ms(),
            seed: Some(seed),
            design: spec.design,
            reference_images: reference_set.as_ref().map(|p| p.to_string_lossy().into_owned()),
        };
        let groups = row.groups as usize;
        let folder = PathBuf::from(&job.spec.images);
        let job_dir = self.jobs.job_dir(&job.id);
        let dir = self.dir(&id);
        let refs_per_label = row.references as usize;
        let limits = self.engine.settings().decode;
        let built = crate::jobs::store::blocking(move || -> Result<_, StudyError> {
            let plan = build::plan(&results, &model, &categories, seed)?;
            if plan.is_empty() {
                return Err(StudyError::invalid("job", "no image of the job has a true class (from its file name)"));
            }
            let built = (|| {
                // The reference set first: a set refused (in the job's folder, or missing a
                // label) fails before the puzzles are copied.
                let refs = match &reference_set {
                    Some(set) => {
                        let samples = crate::dataset::discover(set, info.classes())
                            .map_err(|e| StudyError::invalid("reference_images", e.to_string()))?;
                        let labels = build::labels(&plan);
                        build::references(&labels, set, &samples, &[&folder, &job_dir], &dir, refs_per_label, &limits)?
                    }
                    None => Vec::new(),
                };
                let puzzles = build::materialise(plan, &folder, &job_dir, &dir, groups)?;
                Ok((puzzles, refs))
            })();
            if built.is_err() {
                // What was copied before the failure belongs to no study.
                let _ = std::fs::remove_dir_all(&dir);
            }
            built
        })
        .await?;
        let (puzzles, refs) = built;
        store::insert_study(self.jobs.store(), row.clone(), puzzles, refs).await?;
        for _ in 0..spec.observers {
            self.add_observer(&id, NewObserver { name: None, expires_in_hours: None }).await?;
        }
        tracing::info!(study = %id, job = %row.job, "study created");
        self.get(&id).await
    }

    pub async fn get(&self, id: &str) -> Result<StudyInfo, StudyError> {
        let info = store::study_info(self.jobs.store(), id).await?;
        info.ok_or_else(|| StudyError::NotFound(id.to_string()))
    }

    pub async fn list(&self) -> Result<Vec<StudyInfo>, StudyError> {
        Ok(store::study_infos(self.jobs.store()).await?)
    }

    /// Deletes a study: its rows (the observers' links stop working, their answers go) and then
    /// its folder, so a folder is never left behind by a row still in use.
    pub async fn delete(&self, id: &str) -> Result<(), StudyError> {
        if !store::delete_study(self.jobs.store(), id).await? {
            return Err(StudyError::NotFound(id.to_string()));
        }
        // The id named a stored study, so the path is one this service made.
        match tokio::fs::remove_dir_all(self.dir(id)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(StoreError::Io(e).into()),
            _ => {}
        }
        tracing::info!(study = %id, "study deleted");
        Ok(())
    }

    /// Every puzzle with its category and truth (the admin's view).
    pub async fn puzzles(&self, id: &str) -> Result<Vec<Puzzle>, StudyError> {
        self.get(id).await?;
        Ok(store::puzzles(self.jobs.store(), id).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_bounded_in_characters() {
        assert_eq!(bounded("name", "  a study ", 200).unwrap(), "a study");
        assert_eq!(bounded("name", &"é".repeat(200), 200).unwrap().chars().count(), 200);
        for bad in ["", "   ", &"x".repeat(201)] {
            match bounded("name", bad, 200) {
                Err(StudyError::Invalid { param: "name", .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn link_lifetimes_are_validated() {
        assert!(StudiesConfig::default().validate().is_ok());
        let c = |ttl, max| StudiesConfig {
            observer_link_ttl_hours: ttl,
            max_observer_link_ttl_hours: max,
            ..Default::default()
        };
        assert!(c(0, 10).validate().is_err());
        assert!(c(11, 10).validate().is_err());
        assert!(c(10, 10).validate().is_ok());
    }
}
