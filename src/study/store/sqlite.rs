//! The studies' statements on SQLite (the schema is versioned with the jobs' tables, in
//! `jobs::store::schema`). Answers are written one statement each, as they are given.

use rusqlite::{Connection, OptionalExtension, params};

use super::{AnswerRow, ObserverRow, Reference};
use crate::jobs::StoreError;
use crate::jobs::store::now_ms;
use crate::study::design::StudyDesign;
use crate::study::{ObserverInfo, Puzzle, StudyInfo, StudyRow};

pub fn insert_study(
    c: &mut Connection,
    s: &StudyRow,
    puzzles: &[Puzzle],
    refs: &[Reference],
) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    let categories = serde_json::to_string(&s.categories).unwrap_or_default();
    tx.execute(
        "INSERT INTO studies (id, job_id, name, model, categories, groups, refs, created_ms, seed, design, \
         reference_images) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            s.id,
            s.job,
            s.name,
            s.model,
            categories,
            s.groups,
            s.references,
            s.created_ms,
            s.seed.map(|v| v as i64),
            s.design.as_str(),
            s.reference_images,
        ],
    )?;
    for p in puzzles {
        tx.execute(
            "INSERT INTO puzzles (study_id, id, source, category, image, label, label_wnid, truth, animal, grp) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![s.id, p.id, p.source, p.category, p.image, p.label, p.label_wnid, p.truth, p.animal, p.group],
        )?;
    }
    for (wnid, image, source) in refs {
        tx.execute(
            "INSERT OR IGNORE INTO study_references (study_id, label_wnid, image, source) VALUES (?1, ?2, ?3, ?4)",
            params![s.id, wnid, image, source],
        )?;
    }
    tx.commit()?;
    Ok(())
}

pub fn study(c: &Connection, id: &str) -> Result<Option<StudyRow>, StoreError> {
    let row = c
        .query_row(
            "SELECT id, job_id, name, model, categories, groups, refs, created_ms, seed, design, reference_images \
             FROM studies WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?),
                    r.get::<_, String>(4)?,
                    r.get::<_, u32>(5)?,
                    r.get::<_, u32>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                    r.get::<_, String>(9)?,
                    r.get::<_, Option<String>>(10)?,
                ))
            },
        )
        .optional()?;
    row.map(|((id, job, name, model), categories, groups, references, created_ms, seed, design, reference_images)| {
        let categories =
            serde_json::from_str(&categories).map_err(|e| StoreError::Corrupt(id.clone(), format!("study: {e}")))?;
        let design = StudyDesign::parse(&design)
            .ok_or_else(|| StoreError::Corrupt(id.clone(), format!("study: design {design:?}")))?;
        Ok(StudyRow {
            id,
            job,
            name,
            model,
            categories,
            groups,
            references,
            created_ms,
            seed: seed.map(|v| v as u64),
            design,
            reference_images,
        })
    })
    .transpose()
}

pub fn study_ids(c: &Connection) -> Result<Vec<String>, StoreError> {
    let mut st = c.prepare("SELECT id FROM studies ORDER BY created_ms DESC, id")?;
    let ids = st.query_map([], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

pub fn puzzles(c: &Connection, study: &str) -> Result<Vec<Puzzle>, StoreError> {
    let mut st = c.prepare(
        "SELECT id, source, category, image, label, label_wnid, truth, animal, grp FROM puzzles \
         WHERE study_id = ?1 ORDER BY id",
    )?;
    let rows = st.query_map([study], |r| puzzle_at(r, 0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The puzzles of one group (on the `(study_id, grp)` index): what an observer's every call
/// needs, without reading the whole study.
pub fn group_puzzles(c: &Connection, study: &str, group: u32) -> Result<Vec<Puzzle>, StoreError> {
    let mut st = c.prepare(
        "SELECT id, source, category, image, label, label_wnid, truth, animal, grp FROM puzzles \
         WHERE study_id = ?1 AND grp = ?2 ORDER BY id",
    )?;
    let rows = st.query_map(params![study, group], |r| puzzle_at(r, 0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// A puzzle from the nine columns `id, source, category, image, label, label_wnid, truth,
/// animal, grp` starting at column `at`.
fn puzzle_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Puzzle> {
    Ok(Puzzle {
        id: r.get(at)?,
        source: r.get(at + 1)?,
        category: r.get(at + 2)?,
        image: r.get(at + 3)?,
        label: r.get(at + 4)?,
        label_wnid: r.get(at + 5)?,
        truth: r.get(at + 6)?,
        animal: r.get(at + 7)?,
        group: r.get(at + 8)?,
    })
}

/// The reference pictures of a label (paths within the study's folder), at most `limit`; none
/// copied from `except` (a study made before reference sets took them from the job's folder,
/// where one could be the puzzle's own source).
pub fn references(
    c: &Connection,
    study: &str,
    label: &str,
    except: Option<&str>,
    limit: u32,
) -> Result<Vec<String>, StoreError> {
    let mut st = c.prepare(
        "SELECT image FROM study_references WHERE study_id = ?1 AND label_wnid = ?2 \
         AND (?3 IS NULL OR source != ?3) ORDER BY image LIMIT ?4",
    )?;
    let rows = st.query_map(params![study, label, except, limit], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn insert_observer(c: &Connection, o: &ObserverRow) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO observers (token, study_id, name, grp, seed, created_ms, expires_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![o.token, o.study, o.name, o.group, o.seed, now_ms(), o.expires_ms],
    )?;
    Ok(())
}

/// The observer whose link holds `token`, unless revoked (found by SQL equality on the
/// primary key's index; an expired one is found, so it can be told apart from an unknown one).
pub fn observer(c: &Connection, token: &str) -> Result<Option<ObserverRow>, StoreError> {
    Ok(c.query_row(
        "SELECT token, study_id, name, grp, seed, expires_ms FROM observers WHERE token = ?1 AND revoked_ms IS NULL",
        [token],
        |r| {
            Ok(ObserverRow {
                token: r.get(0)?,
                study: r.get(1)?,
                name: r.get(2)?,
                group: r.get(3)?,
                seed: r.get(4)?,
                expires_ms: r.get(5)?,
            })
        },
    )
    .optional()?)
}

/// Revokes the link of the study's observer `name`: None when there is no such observer,
/// else whether this call revoked it (false: it already was).
pub fn revoke_observer(c: &Connection, study: &str, name: &str) -> Result<Option<bool>, StoreError> {
    let n = c.execute(
        "UPDATE observers SET revoked_ms = ?3 WHERE study_id = ?1 AND name = ?2 AND revoked_ms IS NULL",
        params![study, name, now_ms()],
    )?;
    if n == 1 {
        return Ok(Some(true));
    }
    let exists = c
        .query_row("SELECT 1 FROM observers WHERE study_id = ?1 AND name = ?2", [study, name], |_| Ok(()))
        .optional()?;
    Ok(exists.map(|()| false))
}

/// The study's observers in the order they were added, with their progress: the puzzles are
/// counted once per group (on the `(study_id, grp)` index), each observer's answers on the
/// answers' primary key. In the `all_groups` design an observer's total is every puzzle.
pub fn observers(c: &Connection, study: &str) -> Result<Vec<ObserverInfo>, StoreError> {
    let mut st = c.prepare(
        "WITH sizes AS (SELECT grp, COUNT(*) AS n FROM puzzles WHERE study_id = ?1 GROUP BY grp), \
              every AS (SELECT COALESCE(SUM(n), 0) AS n FROM sizes) \
         SELECT o.token, o.name, o.grp, \
           (SELECT COUNT(*) FROM answers a WHERE a.token = o.token), \
           CASE WHEN st.design = 'all_groups' THEN (SELECT n FROM every) ELSE COALESCE(s.n, 0) END, \
           o.expires_ms, o.revoked_ms \
         FROM observers o JOIN studies st ON st.id = o.study_id LEFT JOIN sizes s ON s.grp = o.grp \
         WHERE o.study_id = ?1 ORDER BY o.created_ms, o.rowid",
    )?;
    let rows = st
        .query_map([study], |r| {
            let token: String = r.get(0)?;
            Ok(ObserverInfo {
                link: format!("/observe/{token}"),
                token,
                name: r.get(1)?,
                group: r.get(2)?,
                answered: r.get(3)?,
                total: r.get(4)?,
                expires_ms: r.get(5)?,
                revoked_ms: r.get(6)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The observer whose link holds `token`, with their study, puzzles and answers.
pub fn session(c: &Connection, token: &str) -> Result<Option<super::Session>, StoreError> {
    let Some(o) = observer(c, token)? else { return Ok(None) };
    let Some(study) = study(c, &o.study)? else { return Ok(None) };
    let puzzles = match study.design {
        StudyDesign::OneGroup => group_puzzles(c, &o.study, o.group)?,
        StudyDesign::AllGroups => puzzles(c, &o.study)?,
    };
    let answers = answers_of(c, token)?;
    Ok(Some((study, o, puzzles, answers)))
}

/// The observer's answers: puzzle id → said "Correct".
pub fn answers_of(c: &Connection, token: &str) -> Result<Vec<(i64, bool)>, StoreError> {
    let mut st = c.prepare("SELECT puzzle, correct FROM answers WHERE token = ?1")?;
    let rows = st.query_map([token], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Deletes a study's row; its puzzles, references, observers and their answers go with it
/// (`ON DELETE CASCADE`). False when there was none.
pub fn delete_study(c: &Connection, id: &str) -> Result<bool, StoreError> {
    Ok(c.execute("DELETE FROM studies WHERE id = ?1", [id])? == 1)
}

/// Stores an answer; false when the puzzle was already answered (the first answer stands).
pub fn insert_answer(
    c: &Connection,
    token: &str,
    puzzle: i64,
    correct: bool,
    elapsed_ms: Option<u32>,
    references_opened: Option<bool>,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "INSERT OR IGNORE INTO answers (token, puzzle, correct, answered_ms, elapsed_ms, references_opened) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![token, puzzle, correct, now_ms(), elapsed_ms, references_opened],
    )?;
    Ok(n == 1)
}

/// Every answer of the study, observers in the order they were added, then by time.
pub fn answers(c: &Connection, study: &str) -> Result<Vec<AnswerRow>, StoreError> {
    let mut st = c.prepare(
        "SELECT o.name, o.grp, p.id, p.source, p.category, p.image, p.label, p.label_wnid, p.truth, p.animal, p.grp, \
                a.correct, a.answered_ms, a.elapsed_ms, a.references_opened \
         FROM answers a JOIN observers o ON o.token = a.token \
         JOIN puzzles p ON p.study_id = o.study_id AND p.id = a.puzzle \
         WHERE o.study_id = ?1 ORDER BY o.created_ms, o.rowid, a.answered_ms, p.id",
    )?;
    let rows = st
        .query_map([study], |r| {
            Ok(AnswerRow {
                observer: r.get(0)?,
                group: r.get(1)?,
                puzzle: puzzle_at(r, 2)?,
                correct: r.get(11)?,
                answered_ms: r.get(12)?,
                elapsed_ms: r.get(13)?,
                references_opened: r.get(14)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// What `/studies` lists, read in one go.
pub fn info(c: &Connection, row: StudyRow) -> Result<StudyInfo, StoreError> {
    let mut st = c.prepare("SELECT grp, COUNT(*) FROM puzzles WHERE study_id = ?1 GROUP BY grp ORDER BY grp")?;
    let sizes: Vec<(u32, u32)> = st.query_map([&row.id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
    let observers = observers(c, &row.id)?;
    Ok(super::assemble(row, sizes, observers))
}
