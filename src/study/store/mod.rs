//! The studies' rows, in whichever engine holds the jobs (`crate::jobs::Store`): the same
//! calls over `sqlite` (a connection on the blocking pool) and `postgres` (the pool). Each call
//! is one statement or one transaction: an observer is placed (name, group) and written in one,
//! locked against others added to the same study at once.

pub mod postgres;
pub mod sqlite;

use crate::jobs::{Store, StoreError};
use crate::study::design;
use crate::study::{ObserverInfo, Puzzle, StudyError, StudyInfo, StudyRow};

/// A reference picture: (the label it shows: its wnid, else its name; path within the study's
/// folder; the picture it was copied from, relative to the reference set — to the job's folder
/// for a study made before reference sets).
pub type Reference = (String, String, String);

/// An observer's row (the `observers` table).
#[derive(Debug, Clone)]
pub struct ObserverRow {
    pub token: String,
    pub study: String,
    pub name: String,
    pub group: u32,
    /// Their puzzle order ([`crate::study::design::order`]).
    pub seed: i64,
    /// When the link stops working (ms since the Unix epoch).
    pub expires_ms: i64,
}

/// One stored answer, joined with its observer and puzzle.
#[derive(Debug, Clone)]
pub struct AnswerRow {
    pub observer: String,
    pub group: u32,
    pub puzzle: Puzzle,
    pub correct: bool,
    pub answered_ms: i64,
    /// Time from the picture's display to the answer (None: not sent, or answered before v4).
    pub elapsed_ms: Option<u32>,
    /// The observer opened the reference pictures (None: not said, or answered before v5).
    pub references_opened: Option<bool>,
}

/// What `/studies` lists, from the study's row, its groups' sizes (group, puzzles) and its
/// observers with their progress.
fn assemble(row: StudyRow, sizes: Vec<(u32, u32)>, observers: Vec<ObserverInfo>) -> StudyInfo {
    let mut groups = vec![0u32; row.groups as usize];
    for (g, n) in sizes {
        if let Some(slot) = groups.get_mut(g as usize) {
            *slot = n;
        }
    }
    let without = design::groups_without_observers(
        row.design,
        &groups,
        observers.iter().map(|o| (o.group, o.revoked_ms.is_none() || o.answered >= o.total)),
    );
    StudyInfo {
        puzzles: groups.iter().sum(),
        answers: observers.iter().map(|o| o.answered).sum(),
        id: row.id,
        job: row.job,
        name: row.name,
        model: row.model,
        categories: row.categories,
        groups,
        observers,
        created_ms: row.created_ms,
        seed: row.seed,
        design: row.design,
        references: row.references,
        reference_images: row.reference_images,
        groups_without_observers: without,
    }
}

/// What an observer's every call reads: the study, the observer, the puzzles they may see and
/// their answers (puzzle id → said "Correct").
pub type Session = (StudyRow, ObserverRow, Vec<Puzzle>, Vec<(i64, bool)>);

/// Decides an observer's (name, group) from the study's observers so far.
pub type Place = Box<dyn FnOnce(&[ObserverInfo]) -> Result<(String, u32), StudyError> + Send>;

pub async fn insert_study(
    store: &Store,
    s: StudyRow,
    puzzles: Vec<Puzzle>,
    refs: Vec<Reference>,
) -> Result<(), StoreError> {
    match store {
        Store::Sqlite(db) => db.with(move |c| sqlite::insert_study(c, &s, &puzzles, &refs)).await,
        Store::Postgres(p) => postgres::insert_study(p, &s, &puzzles, &refs).await,
    }
}

/// A study as `/studies/{id}` shows it.
pub async fn study_info(store: &Store, id: &str) -> Result<Option<StudyInfo>, StoreError> {
    let i = id.to_string();
    match store {
        Store::Sqlite(db) => db.with(move |c| sqlite::study(c, &i)?.map(|row| sqlite::info(c, row)).transpose()).await,
        Store::Postgres(p) => match postgres::study(p, id).await? {
            Some(row) => Ok(Some(postgres::info(p, row).await?)),
            None => Ok(None),
        },
    }
}

/// Every study, newest first.
pub async fn study_infos(store: &Store) -> Result<Vec<StudyInfo>, StoreError> {
    match store {
        Store::Sqlite(db) => {
            db.with(|c| {
                sqlite::study_ids(c)?
                    .into_iter()
                    .filter_map(|id| sqlite::study(c, &id).transpose())
                    .map(|row| sqlite::info(c, row?))
                    .collect()
            })
            .await
        }
        Store::Postgres(p) => {
            let mut out = Vec::new();
            for id in postgres::study_ids(p).await? {
                if let Some(row) = postgres::study(p, &id).await? {
                    out.push(postgres::info(p, row).await?);
                }
            }
            Ok(out)
        }
    }
}

/// Deletes a study with its puzzles, references, observers and answers; false when there was none.
pub async fn delete_study(store: &Store, id: &str) -> Result<bool, StoreError> {
    let i = id.to_string();
    match store {
        Store::Sqlite(db) => db.with(move |c| sqlite::delete_study(c, &i)).await,
        Store::Postgres(p) => postgres::delete_study(p, id).await,
    }
}

pub async fn puzzles(store: &Store, study: &str) -> Result<Vec<Puzzle>, StoreError> {
    let s = study.to_string();
    match store {
        Store::Sqlite(db) => db.with(move |c| sqlite::puzzles(c, &s)).await,
        Store::Postgres(p) => postgres::puzzles(p, study).await,
    }
}

/// Places a new observer with `place` (from the study's observers so far) and writes it, in one
/// transaction; `row`'s name and group are `place`'s. `place`'s refusal is returned as it is.
pub async fn add_observer(
    store: &Store,
    row: ObserverRow,
    place: Place,
) -> Result<Result<ObserverRow, StudyError>, StoreError> {
    match store {
        Store::Sqlite(db) => {
            db.with(move |c| {
                let tx = c.transaction()?;
                let placed = match place(&sqlite::observers(&tx, &row.study)?) {
                    Ok((name, group)) => ObserverRow { name, group, ..row },
                    Err(e) => return Ok(Err(e)),
                };
                sqlite::insert_observer(&tx, &placed)?;
                tx.commit()?;
                Ok(Ok(placed))
            })
            .await
        }
        Store::Postgres(p) => postgres::add_observer(p, row, place).await,
    }
}

/// None when the study has no observer `name`, else whether this call revoked the link.
pub async fn revoke_observer(store: &Store, study: &str, name: &str) -> Result<Option<bool>, StoreError> {
    let (s, n) = (study.to_string(), name.to_string());
    match store {
        Store::Sqlite(db) => db.with(move |c| sqlite::revoke_observer(c, &s, &n)).await,
        Store::Postgres(p) => postgres::revoke_observer(p, study, name).await,
    }
}

/// The observer whose link holds `token` (not revoked; expired ones are found), with what
/// their calls read. The token is found by SQL equality on its index.
pub async fn session(store: &Store, token: &str) -> Result<Option<Session>, StoreError> {
    let t = token.to_string();
    match store {
        Store::Sqlite(db) => db.with(move |c| sqlite::session(c, &t)).await,
        Store::Postgres(p) => postgres::session(p, token).await,
    }
}

/// The reference pictures of a label, at most `limit`, none copied from `except`.
pub async fn references(
    store: &Store,
    study: &str,
    label: &str,
    except: Option<String>,
    limit: u32,
) -> Result<Vec<String>, StoreError> {
    let (s, l) = (study.to_string(), label.to_string());
    match store {
        Store::Sqlite(db) => db.with(move |c| sqlite::references(c, &s, &l, except.as_deref(), limit)).await,
        Store::Postgres(p) => postgres::references(p, study, label, except.as_deref(), limit).await,
    }
}

/// Stores an answer; false when the puzzle was already answered (the first answer stands).
pub async fn insert_answer(
    store: &Store,
    token: &str,
    puzzle: i64,
    correct: bool,
    elapsed_ms: Option<u32>,
    references_opened: Option<bool>,
) -> Result<bool, StoreError> {
    let t = token.to_string();
    match store {
        Store::Sqlite(db) => {
            db.with(move |c| sqlite::insert_answer(c, &t, puzzle, correct, elapsed_ms, references_opened)).await
        }
        Store::Postgres(p) => postgres::insert_answer(p, token, puzzle, correct, elapsed_ms, references_opened).await,
    }
}

/// Every answer of the study, observers in the order they were added, then by time.
pub async fn answers(store: &Store, study: &str) -> Result<Vec<AnswerRow>, StoreError> {
    let s = study.to_string();
    match store {
        Store::Sqlite(db) => db.with(move |c| sqlite::answers(c, &s)).await,
        Store::Postgres(p) => postgres::answers(p, study).await,
    }
}
