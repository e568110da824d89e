//! What the studies service takes and gives: request bodies, the views of studies, observers and
//! puzzles, and its error type, with the bounds every stored string keeps.

use serde::{Deserialize, Serialize};

use super::{Rates, StudyDesign};
use crate::engine::EngineError;
use crate::jobs::StoreError;

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

pub(super) fn default_references() -> u32 {
    3
}

/// The most observers and reference pictures a study takes.
pub(super) const MAX_OBSERVERS: u32 = 1000;
pub(super) const MAX_REFERENCES: u32 = 10;
/// The most characters of a study's and an observer's name, and of the other strings a
/// create body names: what is stored and echoed back is bounded by these, not by the body limit.
pub(super) const MAX_STUDY_NAME: usize = 200;
pub(super) const MAX_OBSERVER_NAME: usize = 100;
pub(super) const MAX_ID: usize = 64;
pub(super) const MAX_METHOD: usize = 100;
pub(super) const MAX_METHODS: usize = 64;
pub(super) const MAX_PATH: usize = 4096;

/// The key a label's reference pictures are stored under: its wnid, else its name.
pub(super) fn reference_key(wnid: Option<&str>, label: &str) -> String {
    wnid.unwrap_or(label).to_string()
}

/// `value` trimmed, when it has 1 to `max` characters; else 422 naming `param`.
pub(super) fn bounded(param: &'static str, value: &str, max: usize) -> Result<String, StudyError> {
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
pub(super) const MAX_ELAPSED_MS: u32 = 3_600_000;

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

pub(super) const DEFINITION: &str = "A puzzle is misjudged when the answer disagrees with the truth of the label shown \
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
    pub(super) fn invalid(param: &'static str, message: impl Into<String>) -> Self {
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
