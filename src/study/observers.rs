//! The observer's side of a study: links (added to the emptiest group, revoked one by one), the
//! session an observer's page shows, answers, and the pictures a link may fetch.

use std::path::Path;

use super::*;

impl Studies {
    /// Adds an observer to the group with the fewest observers (the lowest on ties) among the
    /// groups that have puzzles: an observer is never given nothing to answer. In `all_groups`
    /// that is the group they start with, so observers start in different groups.
    pub async fn add_observer(&self, id: &str, new: NewObserver) -> Result<ObserverInfo, StudyError> {
        let study = self.get(id).await?;
        let max_hours = self.config.max_observer_link_ttl_hours;
        let hours = match new.expires_in_hours {
            Some(h) if h == 0 || h > max_hours => {
                return Err(StudyError::invalid("expires_in_hours", format!("1 to {max_hours} hours")));
            }
            Some(h) => h,
            None => self.config.observer_link_ttl_hours,
        };
        let name = new.name.map(|n| bounded("name", &n, MAX_OBSERVER_NAME)).transpose()?;
        let token = format!("{}{}", crate::jobs::new_id(), crate::jobs::new_id());
        let seed = {
            use rand::Rng;
            rand::rng().random::<i64>()
        };
        let expires_ms = crate::jobs::store::now_ms().saturating_add(i64::from(hours) * 3_600_000);
        // The cap, the name and the emptiest group are read and the observer written in one
        // transaction: two links added at once must not both see the same free name or group.
        let (sid, groups) = (id.to_string(), study.groups.clone());
        let row = store::ObserverRow {
            token: token.clone(),
            study: sid.clone(),
            name: String::new(),
            group: 0,
            seed,
            expires_ms,
        };
        let place: store::Place = Box::new(move |observers| place_observer(observers, &groups, name, &sid));
        store::add_observer(self.jobs.store(), row, place).await??;
        let study = self.get(id).await?;
        study.observers.into_iter().find(|o| o.token == token).ok_or_else(|| StudyError::NotFound(id.to_string()))
    }

    /// Revokes the link of the study's observer `name`: it then answers 404 like one that never
    /// existed; the observer stays listed and their answers count. Revoking twice is no error.
    pub async fn revoke_observer(&self, id: &str, name: &str) -> Result<(), StudyError> {
        self.get(id).await?;
        match store::revoke_observer(self.jobs.store(), id, name).await? {
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
        let found = store::session(self.jobs.store(), token).await?;
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
        Ok(store::references(self.jobs.store(), &study.id, &key, except, study.references).await?)
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
        let said = answer.answer == Judgement::Correct;
        let stored = store::insert_answer(
            self.jobs.store(),
            token,
            answer.puzzle,
            said,
            answer.elapsed_ms,
            answer.references_opened,
        )
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
}

fn mime(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
}

/// The name and group of a new observer of study `id`, given its observers and its groups'
/// puzzle counts: within the cap, the name free (by default the first free `observer k`), the
/// group the emptiest of those with puzzles (the lowest on ties).
fn place_observer(
    observers: &[ObserverInfo],
    groups: &[u32],
    name: Option<String>,
    id: &str,
) -> Result<(String, u32), StudyError> {
    if observers.len() as u32 >= MAX_OBSERVERS {
        return Err(StudyError::Conflict(format!("study {id} has {MAX_OBSERVERS} observers already")));
    }
    let name = name.unwrap_or_else(|| {
        let mut k = observers.len() + 1;
        while observers.iter().any(|o| o.name == format!("observer {k}")) {
            k += 1;
        }
        format!("observer {k}")
    });
    if observers.iter().any(|o| o.name == name) {
        return Err(StudyError::Conflict(format!("study {id} has an observer named {name:?}")));
    }
    let mut counts = vec![0usize; groups.len()];
    for o in observers {
        if let Some(c) = counts.get_mut(o.group as usize) {
            *c += 1;
        }
    }
    let group = (0..counts.len())
        .filter(|&g| groups[g] > 0)
        .min_by_key(|&g| (counts[g], g))
        .ok_or_else(|| StudyError::Conflict(format!("study {id} has no puzzle to answer")))?;
    Ok((name, group as u32))
}
