//! What a study gives back: its results (CR and PG with their intervals), the answers as CSV, and
//! the chart, each computed off the async threads.

use super::*;
use crate::jobs::store::blocking;

impl Studies {
    /// CR and PG (computed on a blocking thread: a study's answers can be many); the bootstrap
    /// is seeded by the study's id, so its intervals are the same on every call and restart.
    pub async fn results(&self, id: &str) -> Result<StudyResults, StudyError> {
        let study = self.get(id).await?;
        let rows = store::answers(self.jobs.store(), id).await?;
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
        let rows = store::answers(self.jobs.store(), id).await?;
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
        blocking(move || {
            crate::charts::grouped_bars_png(
                &title,
                "PG = (CR - CR_clean) / CR_clean",
                &methods,
                &[("all images", all.as_slice()), ("animals", animals.as_slice())],
            )
            .map_err(|e| StudyError::Store(StoreError::Io(std::io::Error::other(e.to_string()))))
        })
        .await
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
