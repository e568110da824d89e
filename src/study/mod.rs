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
pub mod results;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError};
use crate::jobs::{JobState, Jobs, StoreError};
pub use design::StudyDesign;
pub use results::{CLEAN, Rates};

pub use crate::config::studies::StudiesConfig;

/// `POST /studies`: which finished job to make a study of.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StudySpec {
    /// A finished (`done`) job.
    #[cfg_attr(feature = "http", schema(max_length = 64))]
    pub job: String,
    /// A name for people, 1 to 200 characters (default: "study of job <id>").
    #[serde(default)]
    #[cfg_attr(feature = "http", schema(max_length = 200))]
    pub name: Option<String>,
    /// One of the job's models (default: its first).
    #[serde(default)]
    #[cfg_attr(feature = "http", schema(max_length = 200))]
    pub model: Option<String>,
    /// The job's methods to show (default: all of them); at most 64, each at most 100
    /// characters.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Observers to create at once, named "observer 1", "observer 2", … (more can be added).
    #[serde(default)]
    pub observers: u32,
    /// Reference pictures per puzzle, at most: pictures of the label it shows, from
    /// `reference_images` (without a reference set, none).
    #[serde(default = "default_references")]
    pub references: u32,
    /// A folder of reference pictures the server may read (under `jobs.allowed_dirs`), apart
    /// from the job's pictures, laid out as a job's: a folder per class (`<wnid>/…` or the
    /// class's name) or files named `<wnid>_….jpg`. It must hold a picture of every label a
    /// puzzle shows; every puzzle, clean or adversarial, gets up to `references` pictures of its
    /// label from it. Without one, no puzzle has reference pictures.
    #[serde(default)]
    #[cfg_attr(feature = "http", schema(max_length = 4096))]
    pub reference_images: Option<String>,
    /// `one_group` (default): each observer answers one group; `all_groups`: each answers every
    /// group, one after the other (the paper's mode).
    #[serde(default)]
    pub design: StudyDesign,
    /// The seed the sources are shuffled with before they are spread over the groups (default:
    /// drawn; the study reports it, so the same groups can be made again).
    #[serde(default)]
    pub seed: Option<u64>,
}

fn default_references() -> u32 {
    3
}

/// The most observers and reference pictures a study takes.
const MAX_OBSERVERS: u32 = 1000;
const MAX_REFERENCES: u32 = 10;
/// The most characters of a study's and an observer's name, and of the other strings a
/// create body names: what is stored and echoed back is bounded by these, not by the body limit.
const MAX_STUDY_NAME: usize = 200;
const MAX_OBSERVER_NAME: usize = 100;
const MAX_ID: usize = 64;
const MAX_METHOD: usize = 100;
const MAX_METHODS: usize = 64;
const MAX_PATH: usize = 4096;

/// The key a label's reference pictures are stored under: its wnid, else its name.
fn reference_key(wnid: Option<&str>, label: &str) -> String {
    wnid.unwrap_or(label).to_string()
}

/// `value` trimmed, when it has 1 to `max` characters; else 422 naming `param`.
fn bounded(param: &'static str, value: &str, max: usize) -> Result<String, StudyError> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > max {
        return Err(StudyError::invalid(param, format!("1 to {max} characters")));
    }
    Ok(v.to_string())
}

/// A study as `/studies` shows it.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct StudyInfo {
    pub id: String,
    pub job: String,
    pub name: String,
    pub model: String,
    /// `clean`, then the methods.
    pub categories: Vec<String>,
    /// Puzzles per group, groups numbered from 0 (as `group` everywhere: observers, puzzles,
    /// the CSV and the studio).
    pub groups: Vec<u32>,
    /// How observers take the puzzles: one group each, or every group in sequence.
    pub design: StudyDesign,
    /// Groups with puzzles that no observer will answer: none is placed in them (or, in
    /// `all_groups`, there is no observer), or only observers whose links were revoked before
    /// they finished. Add observers until it is empty.
    pub groups_without_observers: Vec<u32>,
    /// Reference pictures per puzzle, at most.
    pub references: u32,
    /// The reference set the study was made with (None: no puzzle has reference pictures).
    pub reference_images: Option<String>,
    pub puzzles: u32,
    pub observers: Vec<ObserverInfo>,
    /// Answers given so far.
    pub answers: u32,
    pub created_ms: i64,
    /// The seed the sources were shuffled with (None: a study made before seeds, alphabetical).
    pub seed: Option<u64>,
}

/// An observer: their link (the token is the only credential) and progress.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ObserverInfo {
    pub name: String,
    pub token: String,
    /// The observer's page.
    pub link: String,
    /// Their group (from 0); in `all_groups`, the group they start with.
    pub group: u32,
    pub answered: u32,
    pub total: u32,
    /// When the link stops working (ms since the Unix epoch); past it, it answers 410.
    pub expires_ms: i64,
    /// When the link was revoked (it then answers 404); the answers given before stay.
    pub revoked_ms: Option<i64>,
}

/// A puzzle as the study's admin sees it (the observer never sees `category` or `truth`).
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Puzzle {
    pub id: i64,
    /// The source image within the job's folder.
    pub source: String,
    /// `clean` or the method.
    pub category: String,
    /// Path within the study's folder.
    #[serde(skip)]
    pub image: String,
    /// The label shown.
    pub label: String,
    pub label_wnid: Option<String>,
    /// The label shown is the image's true class.
    pub truth: bool,
    /// The source's true class is an animal (WordNet).
    pub animal: bool,
    pub group: u32,
}

/// `POST /studies/{id}/observers`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewObserver {
    /// Unique within the study, 1 to 100 characters (default: "observer N").
    #[serde(default)]
    #[cfg_attr(feature = "http", schema(max_length = 100))]
    pub name: Option<String>,
    /// Hours the link works (default `studies.observer_link_ttl_hours`, at most
    /// `studies.max_observer_link_ttl_hours`).
    #[serde(default)]
    #[cfg_attr(feature = "http", schema(minimum = 1))]
    pub expires_in_hours: Option<u32>,
}

/// What the observer's page shows: progress and the next puzzle.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Session {
    pub study: String,
    pub observer: String,
    pub answered: u32,
    pub total: u32,
    pub done: bool,
    /// The next unanswered puzzle, None once all are answered.
    pub puzzle: Option<PuzzleView>,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct PuzzleView {
    pub id: i64,
    /// The image to judge.
    pub image: String,
    /// The label to judge.
    pub label: String,
    /// Pictures of the label's class from the study's reference set (none without one); the
    /// observer's page shows them only on request.
    pub references: Vec<String>,
}

/// "Is this label correct?"
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Judgement {
    Correct,
    Incorrect,
}

/// `POST /observe/{token}/answers`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AnswerIn {
    pub puzzle: i64,
    pub answer: Judgement,
    /// Milliseconds from the picture's display (its `load`) to the answer, 0 to 3 600 000;
    /// the observer's page always sends it.
    #[serde(default)]
    #[cfg_attr(feature = "http", schema(maximum = 3_600_000))]
    pub elapsed_ms: Option<u32>,
    /// Whether the observer opened the puzzle's reference pictures before answering (false
    /// where it had none); the observer's page always sends it.
    #[serde(default)]
    pub references_opened: Option<bool>,
}

/// The longest answer time stored, in ms (an hour: a page left open is no answer time).
const MAX_ELAPSED_MS: u32 = 3_600_000;

/// `GET /studies/{id}/results`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct StudyResults {
    pub study: String,
    /// How CR and PG are computed.
    pub definition: &'static str,
    pub categories: Vec<String>,
    pub design: StudyDesign,
    /// Groups with puzzles that no observer will answer (as in the study): their puzzles are
    /// missing from every number below until observers are added.
    pub groups_without_observers: Vec<u32>,
    pub all: Rates,
    /// The puzzles whose source's true class is an animal (WordNet).
    pub animals: Rates,
}

const DEFINITION: &str = "A puzzle is misjudged when the answer disagrees with the truth of the label shown \
    (\"Incorrect\" for a clean image with its true label, \"Correct\" for an adversarial image with the \
    model's new label). CR = misjudged / answered, per observer and category; PG = (CR_method - CR_clean) \
    / CR_clean (Eq. 5), undefined where CR_clean = 0. Means and sample standard deviations are over the \
    observers where each is defined; pooled = all answers together.";

#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error("no study {0:?}")]
    NotFound(String),
    #[error("no observer with this link")]
    UnknownObserver,
    /// The link's time is over; the study's admin can add a new observer.
    #[error("this observer link expired; ask the study's organiser for a new one")]
    Expired,
    #[error("invalid parameter `{param}`: {message}")]
    Invalid { param: &'static str, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Job(#[from] crate::jobs::JobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl StudyError {
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { param, message: message.into() }
    }
}

/// A study's row.
#[derive(Debug, Clone)]
pub struct StudyRow {
    pub id: String,
    pub job: String,
    pub name: String,
    pub model: String,
    pub categories: Vec<String>,
    pub groups: u32,
    /// Reference pictures shown per puzzle.
    pub references: u32,
    pub created_ms: i64,
    /// The seed the sources were shuffled with (None for studies made before seeds).
    pub seed: Option<u64>,
    pub design: StudyDesign,
    /// The reference set's folder (None: none; or, for a study made before reference sets,
    /// references copied from the job's folder).
    pub reference_images: Option<String>,
}

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
        let built = tokio::task::spawn_blocking(move || -> Result<_, StudyError> {
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
                        build::references(&labels, set, &samples, &[&folder, &job_dir], &dir, refs_per_label)?
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
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))??;
        let (puzzles, refs) = built;
        let r = row.clone();
        self.jobs.store().with(move |c| store::insert_study(c, &r, &puzzles, &refs)).await?;
        for _ in 0..spec.observers {
            self.add_observer(&id, NewObserver { name: None, expires_in_hours: None }).await?;
        }
        tracing::info!(study = %id, job = %row.job, "study created");
        self.get(&id).await
    }

    pub async fn get(&self, id: &str) -> Result<StudyInfo, StudyError> {
        let i = id.to_string();
        let info =
            self.jobs.store().with(move |c| store::study(c, &i)?.map(|row| store::info(c, row)).transpose()).await?;
        info.ok_or_else(|| StudyError::NotFound(id.to_string()))
    }

    pub async fn list(&self) -> Result<Vec<StudyInfo>, StudyError> {
        Ok(self
            .jobs
            .store()
            .with(|c| {
                store::study_ids(c)?
                    .into_iter()
                    .filter_map(|id| store::study(c, &id).transpose())
                    .map(|row| store::info(c, row?))
                    .collect()
            })
            .await?)
    }

    /// Deletes a study: its rows (the observers' links stop working, their answers go) and then
    /// its folder, so a folder is never left behind by a row still in use.
    pub async fn delete(&self, id: &str) -> Result<(), StudyError> {
        let i = id.to_string();
        if !self.jobs.store().with(move |c| store::delete_study(c, &i)).await? {
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
        let i = id.to_string();
        Ok(self.jobs.store().with(move |c| store::puzzles(c, &i)).await?)
    }

    /// Adds an observer to the group with the fewest observers (the lowest on ties) among the
    /// groups that have puzzles: an observer is never given nothing to answer. In `all_groups`
    /// that is the group they start with, so observers start in different groups.
    pub async fn add_observer(&self, id: &str, new: NewObserver) -> Result<ObserverInfo, StudyError> {
        let study = self.get(id).await?;
        if study.observers.len() as u32 >= MAX_OBSERVERS {
            return Err(StudyError::Conflict(format!("study {id} has {MAX_OBSERVERS} observers already")));
        }
        let max_hours = self.config.max_observer_link_ttl_hours;
        let hours = match new.expires_in_hours {
            Some(h) if h == 0 || h > max_hours => {
                return Err(StudyError::invalid("expires_in_hours", format!("1 to {max_hours} hours")));
            }
            Some(h) => h,
            None => self.config.observer_link_ttl_hours,
        };
        let name = match new.name {
            Some(n) => bounded("name", &n, MAX_OBSERVER_NAME)?,
            None => {
                let mut k = study.observers.len() + 1;
                while study.observers.iter().any(|o| o.name == format!("observer {k}")) {
                    k += 1;
                }
                format!("observer {k}")
            }
        };
        if study.observers.iter().any(|o| o.name == name) {
            return Err(StudyError::Conflict(format!("study {id} has an observer named {name:?}")));
        }
        let mut counts = vec![0usize; study.groups.len()];
        for o in &study.observers {
            if let Some(c) = counts.get_mut(o.group as usize) {
                *c += 1;
            }
        }
        let group = (0..counts.len())
            .filter(|&g| study.groups[g] > 0)
            .min_by_key(|&g| (counts[g], g))
            .ok_or_else(|| StudyError::Conflict(format!("study {id} has no puzzle to answer")))?
            as u32;
        let token = format!("{}{}", crate::jobs::new_id(), crate::jobs::new_id());
        let seed = {
            use rand::Rng;
            rand::rng().random::<i64>()
        };
        let row = store::ObserverRow {
            token: token.clone(),
            study: id.to_string(),
            name,
            group,
            seed,
            expires_ms: crate::jobs::store::now_ms().saturating_add(i64::from(hours) * 3_600_000),
        };
        self.jobs.store().with(move |c| store::insert_observer(c, &row)).await?;
        let study = self.get(id).await?;
        study.observers.into_iter().find(|o| o.token == token).ok_or_else(|| StudyError::NotFound(id.to_string()))
    }

    /// Revokes the link of the study's observer `name`: it then answers 404 like one that never
    /// existed; the observer stays listed and their answers count. Revoking twice is no error.
    pub async fn revoke_observer(&self, id: &str, name: &str) -> Result<(), StudyError> {
        self.get(id).await?;
        let (i, n) = (id.to_string(), name.to_string());
        match self.jobs.store().with(move |c| store::revoke_observer(c, &i, &n)).await? {
            Some(_) => {
                tracing::info!(study = %id, "observer link revoked");
                Ok(())
            }
            None => Err(StudyError::UnknownObserver),
        }
    }

    /// The observer's study, row and puzzles in their order, and their answers. The token is
    /// looked up by SQL equality on its index (no comparison in Rust whose time would depend on
    /// how much of it matched); a revoked link is not found.
    async fn observer(
        &self,
        token: &str,
    ) -> Result<(StudyRow, store::ObserverRow, Vec<Puzzle>, HashMap<i64, bool>), StudyError> {
        let t = token.to_string();
        let found = self
            .jobs
            .store()
            .with(move |c| {
                let Some(o) = store::observer(c, &t)? else { return Ok(None) };
                let Some(study) = store::study(c, &o.study)? else { return Ok(None) };
                let puzzles = match study.design {
                    StudyDesign::OneGroup => store::group_puzzles(c, &o.study, o.group)?,
                    StudyDesign::AllGroups => store::puzzles(c, &o.study)?,
                };
                let answers = store::answers_of(c, &t)?;
                Ok(Some((study, o, puzzles, answers)))
            })
            .await?;
        let (study, o, puzzles, answers) = found.ok_or(StudyError::UnknownObserver)?;
        if o.expires_ms <= crate::jobs::store::now_ms() {
            return Err(StudyError::Expired);
        }
        let pairs: Vec<(i64, u32)> = puzzles.iter().map(|p| (p.id, p.group)).collect();
        let ids = design::sequence(study.design, o.seed as u64, o.group, study.groups, &pairs);
        let rank: HashMap<i64, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut mine: Vec<Puzzle> = puzzles.into_iter().filter(|p| rank.contains_key(&p.id)).collect();
        mine.sort_by_key(|p| rank[&p.id]);
        Ok((study, o, mine, answers.into_iter().collect()))
    }

    /// Progress and the next unanswered puzzle, in the observer's own order.
    pub async fn session(&self, token: &str) -> Result<Session, StudyError> {
        let (study, o, puzzles, answers) = self.observer(token).await?;
        let next = puzzles.iter().find(|p| !answers.contains_key(&p.id));
        let puzzle = match next {
            Some(p) => {
                let refs = self.references(&study, p).await?;
                Some(PuzzleView {
                    id: p.id,
                    image: format!("/observe/{token}/puzzles/{}/image", p.id),
                    label: p.label.clone(),
                    references: (0..refs.len())
                        .map(|n| format!("/observe/{token}/puzzles/{}/references/{n}", p.id))
                        .collect(),
                })
            }
            None => None,
        };
        Ok(Session {
            study: study.name,
            observer: o.name,
            answered: answers.len() as u32,
            total: puzzles.len() as u32,
            done: puzzle.is_none(),
            puzzle,
        })
    }

    /// The puzzle's reference pictures (paths within the study's folder): those of the label it
    /// shows, whatever its category. A study made before reference sets took them from the job's
    /// folder: for it, never a copy of the puzzle's own source.
    async fn references(&self, study: &StudyRow, p: &Puzzle) -> Result<Vec<String>, StudyError> {
        let key = reference_key(p.label_wnid.as_deref(), &p.label);
        let except = study.reference_images.is_none().then(|| p.source.clone());
        let (s, n) = (study.id.clone(), study.references);
        Ok(self.jobs.store().with(move |c| store::references(c, &s, &key, except.as_deref(), n)).await?)
    }

    /// Stores an answer as it is given; the first answer to a puzzle stands (409 after it).
    pub async fn answer(&self, token: &str, answer: AnswerIn) -> Result<Session, StudyError> {
        let (_, _, puzzles, _) = self.observer(token).await?;
        if !puzzles.iter().any(|p| p.id == answer.puzzle) {
            return Err(StudyError::invalid(
                "puzzle",
                format!("{} is not one of this observer's puzzles", answer.puzzle),
            ));
        }
        if answer.elapsed_ms.is_some_and(|ms| ms > MAX_ELAPSED_MS) {
            return Err(StudyError::invalid("elapsed_ms", format!("0 to {MAX_ELAPSED_MS} ms")));
        }
        let t = token.to_string();
        let said = answer.answer == Judgement::Correct;
        let stored = self
            .jobs
            .store()
            .with(move |c| {
                store::insert_answer(c, &t, answer.puzzle, said, answer.elapsed_ms, answer.references_opened)
            })
            .await?;
        if !stored {
            return Err(StudyError::Conflict(format!("puzzle {} is already answered", answer.puzzle)));
        }
        self.session(token).await
    }

    /// The bytes of one of the observer's puzzle images (a PNG), or of its `n`th reference
    /// picture (with its content type).
    pub async fn observer_file(
        &self,
        token: &str,
        puzzle: i64,
        reference: Option<usize>,
    ) -> Result<(Vec<u8>, &'static str), StudyError> {
        let (study, _, puzzles, _) = self.observer(token).await?;
        let p = puzzles
            .into_iter()
            .find(|p| p.id == puzzle)
            .ok_or_else(|| StudyError::NotFound(format!("puzzle {puzzle}")))?;
        let rel = match reference {
            None => p.image,
            Some(n) => {
                let refs = self.references(&study, &p).await?;
                refs.into_iter().nth(n).ok_or_else(|| StudyError::NotFound(format!("reference {n}")))?
            }
        };
        let path = self.dir(&study.id).join(&rel);
        let bytes = tokio::fs::read(&path).await.map_err(StoreError::Io)?;
        Ok((bytes, mime(&path)))
    }

    /// CR and PG (computed on a blocking thread: a study's answers can be many); the bootstrap
    /// is seeded by the study's id, so its intervals are the same on every call and restart.
    pub async fn results(&self, id: &str) -> Result<StudyResults, StudyError> {
        let study = self.get(id).await?;
        let i = id.to_string();
        let rows = self.jobs.store().with(move |c| store::answers(c, &i)).await?;
        blocking(move || {
            let answers: Vec<results::Answer> = rows
                .iter()
                .map(|r| results::Answer {
                    observer: r.observer.clone(),
                    category: r.puzzle.category.clone(),
                    animal: r.puzzle.animal,
                    truth: r.puzzle.truth,
                    said_correct: r.correct,
                    elapsed_ms: r.elapsed_ms,
                    references_opened: r.references_opened,
                })
                .collect();
            let seed = design::seed_of(&study.id);
            Ok(StudyResults {
                definition: DEFINITION,
                all: results::rates(&answers, &study.categories, seed),
                animals: results::rates(answers.iter().filter(|a| a.animal), &study.categories, seed ^ 1),
                categories: study.categories,
                design: study.design,
                groups_without_observers: study.groups_without_observers,
                study: study.id,
            })
        })
        .await
    }

    /// Every answer as CSV (one row each, with its puzzle, whether it was misjudged and how
    /// long the observer took), written on a blocking thread.
    pub async fn csv(&self, id: &str) -> Result<Vec<u8>, StudyError> {
        let study = self.get(id).await?;
        let i = id.to_string();
        let rows = self.jobs.store().with(move |c| store::answers(c, &i)).await?;
        blocking(move || answers_csv(&study.id, rows)).await
    }

    /// The paper's Figure 3 for this study: the Performance Gain per method (the mean over
    /// observers, whiskers one standard deviation), all puzzles and the animal subset side by
    /// side, as a PNG. A method without a PG (no observer with one) shows as 0 without whisker.
    pub async fn chart(&self, id: &str) -> Result<Vec<u8>, StudyError> {
        let r = self.results(id).await?;
        let series = |rates: &Rates| -> Vec<(f64, f64)> {
            rates
                .summary
                .iter()
                .filter(|s| s.category != CLEAN)
                .map(|s| (s.pg_mean.unwrap_or(0.0), s.pg_std.unwrap_or(0.0)))
                .collect()
        };
        let (all, animals) = (series(&r.all), series(&r.animals));
        let methods: Vec<String> = r.categories.iter().filter(|c| *c != CLEAN).cloned().collect();
        let title = format!("Performance gain, study {}", r.study);
        tokio::task::spawn_blocking(move || {
            crate::charts::grouped_bars_png(
                &title,
                "PG = (CR - CR_clean) / CR_clean",
                &methods,
                &[("all images", all.as_slice()), ("animals", animals.as_slice())],
            )
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
        .map_err(|e| StudyError::Store(StoreError::Io(std::io::Error::other(e.to_string()))))
    }
}

/// `rows` as the answers CSV.
fn answers_csv(study: &str, rows: Vec<store::AnswerRow>) -> Result<Vec<u8>, StudyError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let io = |e: csv::Error| StoreError::Io(std::io::Error::other(e.to_string()));
    w.write_record([
        "study",
        "observer",
        "group",
        "puzzle",
        "source",
        "category",
        "label",
        "label_wnid",
        "label_is_true",
        "answer",
        "misjudged",
        "animal",
        "answered_ms",
        "elapsed_ms",
        "references_opened",
    ])
    .map_err(io)?;
    for r in rows {
        let p = &r.puzzle;
        w.write_record([
            study.to_string(),
            r.observer,
            r.group.to_string(),
            p.id.to_string(),
            p.source.clone(),
            p.category.clone(),
            p.label.clone(),
            p.label_wnid.clone().unwrap_or_default(),
            p.truth.to_string(),
            if r.correct { "correct" } else { "incorrect" }.to_string(),
            (r.correct != p.truth).to_string(),
            p.animal.to_string(),
            r.answered_ms.to_string(),
            r.elapsed_ms.map(|ms| ms.to_string()).unwrap_or_default(),
            r.references_opened.map(|o| o.to_string()).unwrap_or_default(),
        ])
        .map_err(io)?;
    }
    w.into_inner().map_err(|e| StudyError::Store(StoreError::Io(std::io::Error::other(e.to_string()))))
}

/// Runs `f` on a blocking thread: numbers and files over every answer stay off the async ones.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StudyError> + Send + 'static,
) -> Result<T, StudyError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
}

fn mime(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
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
