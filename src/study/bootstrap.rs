//! The pooled Performance Gain's 95% confidence interval: a percentile bootstrap that resamples
//! observers (not answers: one observer's answers are not independent of each other), so two
//! methods can be compared beyond noise. Pure and seeded: the same answers and seed give the
//! same interval, whatever the server did in between.

use serde::Serialize;

use super::design::mix;

/// Resamples drawn per interval: every interval is bounded by this many draws of the observers.
pub const RESAMPLES: u32 = 2000;

/// One observer's counts: (clean answered, clean misjudged, method answered, method misjudged).
pub type Counts = (u32, u32, u32, u32);

/// A pooled PG's percentile interval over [`RESAMPLES`] resamples of the observers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Interval {
    /// The 2.5th and 97.5th percentiles of the defined resampled PGs (None when none was).
    pub low: Option<f64>,
    pub high: Option<f64>,
    pub resamples: u32,
    /// Resamples whose pooled PG is undefined (their pooled clean CR is 0, or they hold no
    /// answer of the method); left out of the percentiles.
    pub undefined: u32,
}

/// The pooled PG of summed counts: (CR − CR_clean) / CR_clean, None where CR_clean is 0 or a
/// side has no answer.
pub fn pooled_pg(counts: impl IntoIterator<Item = Counts>) -> Option<f64> {
    let (cn, cm, n, m) = counts.into_iter().fold((0u64, 0u64, 0u64, 0u64), |t, c| {
        (t.0 + u64::from(c.0), t.1 + u64::from(c.1), t.2 + u64::from(c.2), t.3 + u64::from(c.3))
    });
    if cn == 0 || cm == 0 || n == 0 {
        return None;
    }
    let base = cm as f64 / cn as f64;
    Some((m as f64 / n as f64 - base) / base)
}

/// The percentile bootstrap interval of the pooled PG over `observers`, drawn with `seed`.
/// None without observers.
pub fn interval(observers: &[Counts], seed: u64) -> Option<Interval> {
    if observers.is_empty() {
        return None;
    }
    let k = observers.len() as u64;
    let mut draw = 0u64;
    let mut next = || {
        draw += 1;
        (mix(seed ^ mix(draw)) % k) as usize
    };
    let mut pgs: Vec<f64> = Vec::with_capacity(RESAMPLES as usize);
    for _ in 0..RESAMPLES {
        if let Some(pg) = pooled_pg((0..observers.len()).map(|_| observers[next()])) {
            pgs.push(pg);
        }
    }
    pgs.sort_by(f64::total_cmp);
    let at = |q: f64| pgs.get(((pgs.len() - 1) as f64 * q).round() as usize).copied();
    let (low, high) = if pgs.is_empty() { (None, None) } else { (at(0.025), at(0.975)) };
    Some(Interval { low, high, resamples: RESAMPLES, undefined: RESAMPLES - pgs.len() as u32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `observers` observers, each answering `per` clean and `per` method puzzles, misjudging
    /// with `p_clean` and `p_method`: their counts, drawn from `seed`.
    fn study(observers: usize, per: u32, p_clean: f64, p_method: f64, seed: u64) -> Vec<Counts> {
        let mut draw = 0u64;
        let mut coin = |p: f64| {
            draw += 1;
            ((mix(seed ^ mix(draw)) >> 11) as f64 / (1u64 << 53) as f64) < p
        };
        (0..observers)
            .map(|_| {
                let cm = (0..per).filter(|_| coin(p_clean)).count() as u32;
                let m = (0..per).filter(|_| coin(p_method)).count() as u32;
                (per, cm, per, m)
            })
            .collect()
    }

    #[test]
    fn the_interval_covers_the_true_gain_about_95_times_in_100() {
        // CR 0.2 clean, 0.4 with the method: PG = 1.
        let trials = 200;
        let covered = (0..trials)
            .filter(|&t| {
                let i = interval(&study(20, 10, 0.2, 0.4, t), 1000 + t).unwrap();
                i.low.unwrap() <= 1.0 && 1.0 <= i.high.unwrap()
            })
            .count();
        assert!(covered >= trials as usize * 88 / 100, "covered {covered} of {trials}");
        assert!(covered < trials as usize, "an interval that always covers is too wide to tell anything");
    }

    #[test]
    fn the_interval_narrows_as_observers_are_added_and_is_reproducible() {
        let width = |observers, seed| {
            let i = interval(&study(observers, 10, 0.2, 0.4, seed), seed).unwrap();
            i.high.unwrap() - i.low.unwrap()
        };
        let mean = |observers| (0..20).map(|s| width(observers, s)).sum::<f64>() / 20.0;
        let (few, many) = (mean(10), mean(40));
        // About 1/√4 = 0.5 as wide with four times the observers.
        assert!(many < 0.7 * few, "{many} vs {few}");
        let counts = study(15, 10, 0.2, 0.4, 3);
        assert_eq!(interval(&counts, 9), interval(&counts, 9));
    }

    #[test]
    fn resamples_without_a_clean_confusion_are_undefined_and_counted() {
        // One observer of three ever misjudged a clean puzzle: (2/3)^3 ≈ 30% of the resamples
        // miss them and have CR_clean = 0.
        let counts = [(10, 0, 10, 3), (10, 0, 10, 2), (10, 2, 10, 4)];
        let i = interval(&counts, 1).unwrap();
        let share = f64::from(i.undefined) / f64::from(i.resamples);
        assert!((share - 8.0 / 27.0).abs() < 0.05, "{share}");
        assert_eq!(interval(&[(10, 0, 10, 3)], 1).unwrap().low, None);
        assert_eq!(interval(&[], 1), None);
        // Pooled: clean 2/30, method 9/30 → (0.3 − 1/15)/(1/15) = 3.5.
        assert!((pooled_pg(counts).unwrap() - 3.5).abs() < 1e-12);
    }
}
