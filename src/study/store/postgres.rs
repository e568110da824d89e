//! The studies' statements on PostgreSQL: `sqlite`'s, in PostgreSQL's SQL (flags are
//! `BOOLEAN`, counts `BIGINT`; observers break ties on their identity column `seq` where SQLite
//! uses `rowid`). Adding an observer locks the study's row, so links added at once never see the
//! same free name or group.

use tokio_postgres::Row;

use super::{AnswerRow, ObserverRow, Place, Reference, Session};
use crate::jobs::StoreError;
use crate::jobs::store::{Postgres, now_ms};
use crate::study::design::StudyDesign;
use crate::study::{ObserverInfo, Puzzle, StudyError, StudyInfo, StudyRow};

const PUZZLE: &str = "id, source, category, image, label, label_wnid, truth, animal, grp";

fn puzzle_at(r: &Row, at: usize) -> Puzzle {
    Puzzle {
        id: r.get(at),
        source: r.get(at + 1),
        category: r.get(at + 2),
        image: r.get(at + 3),
        label: r.get(at + 4),
        label_wnid: r.get(at + 5),
        truth: r.get(at + 6),
        animal: r.get(at + 7),
        group: r.get::<_, i64>(at + 8) as u32,
    }
}

pub async fn insert_study(
    p: &Postgres,
    s: &StudyRow,
    puzzles: &[Puzzle],
    refs: &[Reference],
) -> Result<(), StoreError> {
    let mut c = p.client().await?;
    let tx = c.transaction().await?;
    let categories = serde_json::to_string(&s.categories).unwrap_or_default();
    tx.execute(
        "INSERT INTO studies (id, job_id, name, model, categories, \"groups\", refs, created_ms, seed, design, \
         reference_images) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &s.id,
            &s.job,
            &s.name,
            &s.model,
            &categories,
            &i64::from(s.groups),
            &i64::from(s.references),
            &s.created_ms,
            &s.seed.map(|v| v as i64),
            &s.design.as_str(),
            &s.reference_images,
        ],
    )
    .await?;
    let insert = tx
        .prepare(&format!("INSERT INTO puzzles (study_id, {PUZZLE}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"))
        .await?;
    for q in puzzles {
        tx.execute(
            &insert,
            &[
                &s.id,
                &q.id,
                &q.source,
                &q.category,
                &q.image,
                &q.label,
                &q.label_wnid,
                &q.truth,
                &q.animal,
                &i64::from(q.group),
            ],
        )
        .await?;
    }
    for (wnid, image, source) in refs {
        tx.execute(
            "INSERT INTO study_references (study_id, label_wnid, image, source) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
            &[&s.id, wnid, image, source],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn study(p: &Postgres, id: &str) -> Result<Option<StudyRow>, StoreError> {
    let c = p.client().await?;
    let row = c
        .query_opt(
            "SELECT id, job_id, name, model, categories, \"groups\", refs, created_ms, seed, design, reference_images \
             FROM studies WHERE id = $1",
            &[&id],
        )
        .await?;
    row.map(|r| {
        let id: String = r.get(0);
        let categories: String = r.get(4);
        let categories =
            serde_json::from_str(&categories).map_err(|e| StoreError::Corrupt(id.clone(), format!("study: {e}")))?;
        let design: String = r.get(9);
        let design = StudyDesign::parse(&design)
            .ok_or_else(|| StoreError::Corrupt(id.clone(), format!("study: design {design:?}")))?;
        Ok(StudyRow {
            job: r.get(1),
            name: r.get(2),
            model: r.get(3),
            categories,
            groups: r.get::<_, i64>(5) as u32,
            references: r.get::<_, i64>(6) as u32,
            created_ms: r.get(7),
            seed: r.get::<_, Option<i64>>(8).map(|v| v as u64),
            design,
            reference_images: r.get(10),
            id,
        })
    })
    .transpose()
}

pub async fn study_ids(p: &Postgres) -> Result<Vec<String>, StoreError> {
    let c = p.client().await?;
    Ok(c.query("SELECT id FROM studies ORDER BY created_ms DESC, id", &[]).await?.iter().map(|r| r.get(0)).collect())
}

pub async fn puzzles(p: &Postgres, study: &str) -> Result<Vec<Puzzle>, StoreError> {
    let c = p.client().await?;
    let rows = c.query(&format!("SELECT {PUZZLE} FROM puzzles WHERE study_id = $1 ORDER BY id"), &[&study]).await?;
    Ok(rows.iter().map(|r| puzzle_at(r, 0)).collect())
}

/// As `sqlite::observers`.
async fn observers(c: &impl tokio_postgres::GenericClient, study: &str) -> Result<Vec<ObserverInfo>, StoreError> {
    let rows = c
        .query(
            "WITH sizes AS (SELECT grp, COUNT(*) AS n FROM puzzles WHERE study_id = $1 GROUP BY grp), \
                  every AS (SELECT COALESCE(SUM(n), 0)::bigint AS n FROM sizes) \
             SELECT o.token, o.name, o.grp, \
               (SELECT COUNT(*) FROM answers a WHERE a.token = o.token), \
               CASE WHEN st.design = 'all_groups' THEN (SELECT n FROM every) ELSE COALESCE(s.n, 0) END, \
               o.expires_ms, o.revoked_ms \
             FROM observers o JOIN studies st ON st.id = o.study_id LEFT JOIN sizes s ON s.grp = o.grp \
             WHERE o.study_id = $1 ORDER BY o.created_ms, o.seq",
            &[&study],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let token: String = r.get(0);
            ObserverInfo {
                link: format!("/observe/{token}"),
                token,
                name: r.get(1),
                group: r.get::<_, i64>(2) as u32,
                answered: r.get::<_, i64>(3) as u32,
                total: r.get::<_, i64>(4) as u32,
                expires_ms: r.get(5),
                revoked_ms: r.get(6),
            }
        })
        .collect())
}

pub async fn info(p: &Postgres, row: StudyRow) -> Result<StudyInfo, StoreError> {
    let c = p.client().await?;
    let sizes = c
        .query("SELECT grp, COUNT(*) FROM puzzles WHERE study_id = $1 GROUP BY grp ORDER BY grp", &[&row.id])
        .await?
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u32, r.get::<_, i64>(1) as u32))
        .collect::<Vec<_>>();
    let observers = observers(&**c, &row.id).await?;
    Ok(super::assemble(row, sizes, observers))
}

pub async fn delete_study(p: &Postgres, id: &str) -> Result<bool, StoreError> {
    let c = p.client().await?;
    Ok(c.execute("DELETE FROM studies WHERE id = $1", &[&id]).await? == 1)
}

pub async fn add_observer(
    p: &Postgres,
    row: ObserverRow,
    place: Place,
) -> Result<Result<ObserverRow, StudyError>, StoreError> {
    let mut c = p.client().await?;
    let tx = c.transaction().await?;
    tx.query("SELECT 1 FROM studies WHERE id = $1 FOR UPDATE", &[&row.study]).await?;
    let placed = match place(&observers(&*tx, &row.study).await?) {
        Ok((name, group)) => ObserverRow { name, group, ..row },
        Err(e) => return Ok(Err(e)),
    };
    tx.execute(
        "INSERT INTO observers (token, study_id, name, grp, seed, created_ms, expires_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &placed.token,
            &placed.study,
            &placed.name,
            &i64::from(placed.group),
            &placed.seed,
            &now_ms(),
            &placed.expires_ms,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(placed))
}

pub async fn revoke_observer(p: &Postgres, study: &str, name: &str) -> Result<Option<bool>, StoreError> {
    let c = p.client().await?;
    let n = c
        .execute(
            "UPDATE observers SET revoked_ms = $3 WHERE study_id = $1 AND name = $2 AND revoked_ms IS NULL",
            &[&study, &name, &now_ms()],
        )
        .await?;
    if n == 1 {
        return Ok(Some(true));
    }
    let exists = c.query_opt("SELECT 1 FROM observers WHERE study_id = $1 AND name = $2", &[&study, &name]).await?;
    Ok(exists.map(|_| false))
}

pub async fn session(p: &Postgres, token: &str) -> Result<Option<Session>, StoreError> {
    let o = {
        let c = p.client().await?;
        c.query_opt(
            "SELECT token, study_id, name, grp, seed, expires_ms FROM observers WHERE token = $1 AND revoked_ms IS NULL",
            &[&token],
        )
        .await?
    };
    let Some(o) = o.map(|r| ObserverRow {
        token: r.get(0),
        study: r.get(1),
        name: r.get(2),
        group: r.get::<_, i64>(3) as u32,
        seed: r.get(4),
        expires_ms: r.get(5),
    }) else {
        return Ok(None);
    };
    let Some(s) = study(p, &o.study).await? else { return Ok(None) };
    let c = p.client().await?;
    let rows = match s.design {
        StudyDesign::OneGroup => {
            c.query(
                &format!("SELECT {PUZZLE} FROM puzzles WHERE study_id = $1 AND grp = $2 ORDER BY id"),
                &[&o.study, &i64::from(o.group)],
            )
            .await?
        }
        StudyDesign::AllGroups => {
            c.query(&format!("SELECT {PUZZLE} FROM puzzles WHERE study_id = $1 ORDER BY id"), &[&o.study]).await?
        }
    };
    let puzzles = rows.iter().map(|r| puzzle_at(r, 0)).collect();
    let answers = c
        .query("SELECT puzzle, correct FROM answers WHERE token = $1", &[&token])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Some((s, o, puzzles, answers)))
}

pub async fn references(
    p: &Postgres,
    study: &str,
    label: &str,
    except: Option<&str>,
    limit: u32,
) -> Result<Vec<String>, StoreError> {
    let c = p.client().await?;
    let rows = c
        .query(
            "SELECT image FROM study_references WHERE study_id = $1 AND label_wnid = $2 \
             AND ($3::text IS NULL OR source != $3) ORDER BY image LIMIT $4",
            &[&study, &label, &except, &i64::from(limit)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub async fn insert_answer(
    p: &Postgres,
    token: &str,
    puzzle: i64,
    correct: bool,
    elapsed_ms: Option<u32>,
    references_opened: Option<bool>,
) -> Result<bool, StoreError> {
    let c = p.client().await?;
    let n = c
        .execute(
            "INSERT INTO answers (token, puzzle, correct, answered_ms, elapsed_ms, references_opened) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &[&token, &puzzle, &correct, &now_ms(), &elapsed_ms.map(i64::from), &references_opened],
        )
        .await?;
    Ok(n == 1)
}

pub async fn answers(p: &Postgres, study: &str) -> Result<Vec<AnswerRow>, StoreError> {
    let c = p.client().await?;
    let rows = c
        .query(
            "SELECT o.name, o.grp, p.id, p.source, p.category, p.image, p.label, p.label_wnid, p.truth, p.animal, p.grp, \
                    a.correct, a.answered_ms, a.elapsed_ms, a.references_opened \
             FROM answers a JOIN observers o ON o.token = a.token \
             JOIN puzzles p ON p.study_id = o.study_id AND p.id = a.puzzle \
             WHERE o.study_id = $1 ORDER BY o.created_ms, o.seq, a.answered_ms, p.id",
            &[&study],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AnswerRow {
            observer: r.get(0),
            group: r.get::<_, i64>(1) as u32,
            puzzle: puzzle_at(r, 2),
            correct: r.get(11),
            answered_ms: r.get(12),
            elapsed_ms: r.get::<_, Option<i64>>(13).map(|v| v as u32),
            references_opened: r.get(14),
        })
        .collect())
}
