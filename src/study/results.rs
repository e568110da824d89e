//! The study's numbers, from its answers alone (pure, so a fixed answer set can be checked by
//! hand). A puzzle is *misjudged* when the observer's answer disagrees with the truth of the
//! label shown: "Incorrect" on a clean image with its true label, "Correct" on an adversarial
//! image with the label the model now gives it. Confusion Rate CR = misjudged ÷ answered, per
//! observer and category (`clean` or a method); Performance Gain (the paper's Eq. 5) against the
//! clean baseline PG = (CR_method − CR_clean) ÷ CR_clean, undefined where CR_clean = 0.
//! The mean of the observers' PGs leaves out those with CR_clean = 0 (they are counted, as
//! `observers_dropped`); the pooled PG keeps every answer and comes with a bootstrap interval
//! over observers ([`super::bootstrap`]).

use std::collections::HashMap;

use serde::Serialize;

use super::bootstrap::{self, Interval};

/// The category of clean puzzles; the others are named after the attack method.
pub const CLEAN: &str = "clean";

/// One answer, with what the results need to know of its puzzle.
#[derive(Debug, Clone)]
pub struct Answer {
    pub observer: String,
    /// `clean` or the method.
    pub category: String,
    /// The shown image's true class is an animal (WordNet).
    pub animal: bool,
    /// The shown label is the image's true class.
    pub truth: bool,
    /// The observer answered "Correct".
    pub said_correct: bool,
    /// Milliseconds from the picture's display to the answer, where the page said.
    pub elapsed_ms: Option<u32>,
    /// The observer opened the puzzle's reference pictures, where the page said.
    pub references_opened: Option<bool>,
}

impl Answer {
    fn misjudged(&self) -> bool {
        self.said_correct != self.truth
    }
}

/// One category as one observer (or everybody pooled) answered it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct CategoryRate {
    pub category: String,
    pub answered: u32,
    pub misjudged: u32,
    /// Confusion Rate: misjudged ÷ answered (None when nothing was answered).
    pub cr: Option<f64>,
    /// Performance Gain against the clean baseline (None for `clean` itself, or where the clean
    /// CR is 0 or unknown).
    pub pg: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ObserverRates {
    pub observer: String,
    pub rates: Vec<CategoryRate>,
}

/// A category over observers: the mean and sample standard deviation of the observers' CR and
/// PG (over the observers where each is defined), and the CR and PG of all answers pooled.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct CategorySummary {
    pub category: String,
    /// Observers with a CR for this category (and of those, with a PG).
    pub observers: u32,
    pub observers_with_pg: u32,
    pub cr_mean: Option<f64>,
    pub cr_std: Option<f64>,
    pub pg_mean: Option<f64>,
    pub pg_std: Option<f64>,
    /// Observers with a CR for this method but no PG (their clean CR is 0 or unknown): left out
    /// of `pg_mean` and `pg_std`, which therefore lean towards the less accurate observers.
    pub observers_dropped: u32,
    pub pooled: CategoryRate,
    /// The 95% bootstrap interval of `pooled.pg`, resampling observers (None for `clean`).
    pub pooled_pg_ci: Option<Interval>,
    /// The median time from a picture's display to its answer, in ms (None without times).
    pub answer_ms_median: Option<f64>,
    /// The share of answers given with the reference pictures opened, of those that say (a
    /// puzzle without references counts as not opened; None when no answer said).
    pub references_opened_rate: Option<f64>,
}

/// The numbers for one set of answers (all of them, or the animal subset).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Rates {
    pub answers: u32,
    pub per_observer: Vec<ObserverRates>,
    pub summary: Vec<CategorySummary>,
}

/// CR and PG per observer and category, and their summaries. `categories` fixes the order
/// (`clean` first, then the methods); observers come in the order of their first answer; the
/// bootstrap draws from `seed`.
pub fn rates<'a>(answers: impl IntoIterator<Item = &'a Answer>, categories: &[String], seed: u64) -> Rates {
    let answers: Vec<&Answer> = answers.into_iter().collect();
    let mut observers: Vec<&str> = Vec::new();
    let mut theirs: HashMap<&str, Vec<&Answer>> = HashMap::new();
    for a in &answers {
        let mine = theirs.entry(&a.observer).or_default();
        if mine.is_empty() {
            observers.push(&a.observer);
        }
        mine.push(a);
    }
    let per_observer: Vec<ObserverRates> = observers
        .iter()
        .map(|o| ObserverRates {
            observer: o.to_string(),
            rates: category_rates(theirs[o].iter().copied(), categories),
        })
        .collect();
    let pooled = category_rates(answers.iter().copied(), categories);
    let clean = categories.iter().position(|c| c == CLEAN);
    let summary = categories
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let crs: Vec<f64> = per_observer.iter().filter_map(|o| o.rates[i].cr).collect();
            let pgs: Vec<f64> = per_observer.iter().filter_map(|o| o.rates[i].pg).collect();
            let ci = clean.filter(|&k| k != i).and_then(|k| {
                let counts: Vec<bootstrap::Counts> = per_observer
                    .iter()
                    .map(|o| (o.rates[k].answered, o.rates[k].misjudged, o.rates[i].answered, o.rates[i].misjudged))
                    .collect();
                bootstrap::interval(&counts, seed ^ super::design::mix(i as u64))
            });
            let mut times: Vec<u32> =
                answers.iter().filter(|a| a.category == *c).filter_map(|a| a.elapsed_ms).collect();
            let opened: Vec<f64> = answers
                .iter()
                .filter(|a| a.category == *c)
                .filter_map(|a| a.references_opened)
                .map(|o| f64::from(u8::from(o)))
                .collect();
            CategorySummary {
                category: c.clone(),
                observers: crs.len() as u32,
                observers_with_pg: pgs.len() as u32,
                cr_mean: mean(&crs),
                cr_std: std(&crs),
                pg_mean: mean(&pgs),
                pg_std: std(&pgs),
                observers_dropped: if c == CLEAN { 0 } else { (crs.len() - pgs.len()) as u32 },
                pooled: pooled[i].clone(),
                pooled_pg_ci: ci,
                answer_ms_median: median(&mut times),
                references_opened_rate: mean(&opened),
            }
        })
        .collect();
    Rates { answers: answers.len() as u32, per_observer, summary }
}

fn category_rates<'a>(answers: impl Iterator<Item = &'a Answer> + Clone, categories: &[String]) -> Vec<CategoryRate> {
    let count = |c: &str| {
        let (mut n, mut m) = (0u32, 0u32);
        for a in answers.clone().filter(|a| a.category == c) {
            n += 1;
            m += u32::from(a.misjudged());
        }
        (n, m, (n > 0).then(|| f64::from(m) / f64::from(n)))
    };
    let (_, _, clean) = count(CLEAN);
    categories
        .iter()
        .map(|c| {
            let (answered, misjudged, cr) = count(c);
            let pg = match (c.as_str(), cr, clean) {
                (CLEAN, ..) => None,
                (_, Some(cr), Some(base)) if base > 0.0 => Some((cr - base) / base),
                _ => None,
            };
            CategoryRate { category: c.clone(), answered, misjudged, cr, pg }
        })
        .collect()
}

fn mean(x: &[f64]) -> Option<f64> {
    (!x.is_empty()).then(|| x.iter().sum::<f64>() / x.len() as f64)
}

fn median(x: &mut [u32]) -> Option<f64> {
    x.sort_unstable();
    let n = x.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(f64::from(x[n / 2])),
        _ => Some((f64::from(x[n / 2 - 1]) + f64::from(x[n / 2])) / 2.0),
    }
}

/// Sample standard deviation (n − 1); None below two values.
fn std(x: &[f64]) -> Option<f64> {
    let m = mean(x)?;
    (x.len() > 1).then(|| (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(observer: &str, category: &str, animal: bool, said_correct: bool) -> Answer {
        Answer {
            observer: observer.into(),
            category: category.into(),
            animal,
            truth: category == CLEAN,
            said_correct,
            elapsed_ms: None,
            references_opened: None,
        }
    }

    /// Two observers, four clean and four LabelFool puzzles each, two DeepFool puzzles each.
    fn fixed() -> Vec<Answer> {
        vec![
            // Ann: clean — 1 of 4 said "Incorrect" (misjudged); LabelFool — 3 of 4 said "Correct";
            // DeepFool — 1 of 2.
            a("ann", CLEAN, true, true),
            a("ann", CLEAN, true, false),
            a("ann", CLEAN, false, true),
            a("ann", CLEAN, false, true),
            a("ann", "labelfool", true, true),
            a("ann", "labelfool", true, true),
            a("ann", "labelfool", false, true),
            a("ann", "labelfool", false, false),
            a("ann", "deepfool", true, false),
            a("ann", "deepfool", false, true),
            // Bob: clean — 2 of 4; LabelFool — 2 of 4; DeepFool — 0 of 2.
            a("bob", CLEAN, true, false),
            a("bob", CLEAN, true, true),
            a("bob", CLEAN, false, false),
            a("bob", CLEAN, false, true),
            a("bob", "labelfool", true, true),
            a("bob", "labelfool", true, false),
            a("bob", "labelfool", false, true),
            a("bob", "labelfool", false, false),
            a("bob", "deepfool", true, false),
            a("bob", "deepfool", false, false),
        ]
    }

    fn close(x: Option<f64>, y: f64) {
        let x = x.expect("a value");
        assert!((x - y).abs() < 1e-12, "{x} vs {y}");
    }

    #[test]
    fn confusion_rate_and_performance_gain_match_a_hand_computation() {
        let cats: Vec<String> = [CLEAN, "labelfool", "deepfool"].map(String::from).to_vec();
        let r = rates(&fixed(), &cats, 1);
        assert_eq!(r.answers, 20);
        let ann = &r.per_observer[0];
        let bob = &r.per_observer[1];
        assert_eq!((ann.observer.as_str(), bob.observer.as_str()), ("ann", "bob"));
        // Ann: CR clean 1/4, LabelFool 3/4 → PG (0.75 − 0.25)/0.25 = 2; DeepFool 1/2 → PG 1.
        assert_eq!((ann.rates[0].answered, ann.rates[0].misjudged), (4, 1));
        close(ann.rates[0].cr, 0.25);
        assert_eq!(ann.rates[0].pg, None);
        close(ann.rates[1].cr, 0.75);
        close(ann.rates[1].pg, 2.0);
        close(ann.rates[2].cr, 0.5);
        close(ann.rates[2].pg, 1.0);
        // Bob: CR clean 2/4, LabelFool 2/4 → PG 0; DeepFool 0/2 → PG −1.
        close(bob.rates[0].cr, 0.5);
        close(bob.rates[1].pg, 0.0);
        close(bob.rates[2].cr, 0.0);
        close(bob.rates[2].pg, -1.0);
        // LabelFool over observers: CR mean (0.75 + 0.5)/2 = 0.625, sample std √(2 · 0.125²) =
        // 0.1767767; PG mean (2 + 0)/2 = 1, std √2; pooled CR 5/8 = 0.625, clean pooled 3/8 =
        // 0.375, pooled PG (0.625 − 0.375)/0.375 = 2/3.
        let lf = &r.summary[1];
        assert_eq!((lf.observers, lf.observers_with_pg), (2, 2));
        close(lf.cr_mean, 0.625);
        close(lf.cr_std, 0.125 * 2f64.sqrt());
        close(lf.pg_mean, 1.0);
        close(lf.pg_std, 2f64.sqrt());
        close(lf.pooled.cr, 0.625);
        close(lf.pooled.pg, 2.0 / 3.0);
        // DeepFool: PG mean (1 − 1)/2 = 0; pooled CR 1/4 → PG (0.25 − 0.375)/0.375 = −1/3.
        close(r.summary[2].pg_mean, 0.0);
        close(r.summary[2].pooled.pg, -1.0 / 3.0);
        assert_eq!(r.summary[0].pooled.pg, None);
        // Resampling two observers gives Ann twice (PG 2), Bob twice (PG 0) or both (2/3): the
        // interval spans 0 to 2; none is dropped from the mean; clean has no interval.
        let ci = lf.pooled_pg_ci.clone().unwrap();
        assert_eq!((ci.low, ci.high, ci.undefined), (Some(0.0), Some(2.0), 0));
        assert_eq!(lf.observers_dropped, 0);
        assert_eq!(r.summary[0].pooled_pg_ci, None);
        // No answer said whether references were opened: no rate.
        assert_eq!(lf.references_opened_rate, None);
    }

    #[test]
    fn the_rate_of_opened_references_counts_the_answers_that_say() {
        let cats: Vec<String> = [CLEAN, "labelfool"].map(String::from).to_vec();
        let mut answers =
            vec![a("ann", CLEAN, true, true), a("ann", CLEAN, true, true), a("ann", "labelfool", true, true)];
        answers[0].references_opened = Some(true);
        answers[1].references_opened = Some(false);
        let r = rates(&answers, &cats, 1);
        close(r.summary[0].references_opened_rate, 0.5);
        assert_eq!(r.summary[1].references_opened_rate, None);
    }

    #[test]
    fn the_animal_subset_and_undefined_gains() {
        let cats: Vec<String> = [CLEAN, "labelfool", "deepfool"].map(String::from).to_vec();
        let fixed = fixed();
        let r = rates(fixed.iter().filter(|a| a.animal), &cats, 1);
        assert_eq!(r.answers, 10);
        // Ann's animal clean puzzles: 1 of 2 misjudged; LabelFool 2 of 2 → PG (1 − 0.5)/0.5 = 1.
        close(r.per_observer[0].rates[1].pg, 1.0);
        // Bob's animal clean: 1 of 2; DeepFool 0 of 1 → PG −1.
        close(r.per_observer[1].rates[2].pg, -1.0);
        // A clean CR of 0 leaves PG undefined; one observer has no standard deviation.
        let perfect = [a("cy", CLEAN, true, true), a("cy", "labelfool", true, true)];
        let r = rates(&perfect, &cats, 1);
        close(r.per_observer[0].rates[1].cr, 1.0);
        assert_eq!(r.per_observer[0].rates[1].pg, None);
        assert_eq!(r.per_observer[0].rates[2].cr, None);
        assert_eq!(r.summary[1].cr_std, None);
        assert_eq!(r.summary[1].observers_with_pg, 0);
        // The observer left out of the mean PG is counted, not silently dropped; every resample
        // of them has CR_clean = 0.
        assert_eq!(r.summary[1].observers_dropped, 1);
        let ci = r.summary[1].pooled_pg_ci.clone().unwrap();
        assert_eq!((ci.low, ci.high, ci.undefined), (None, None, ci.resamples));
    }
}
