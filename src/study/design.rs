//! The study's design: puzzles split into groups so that no group holds two puzzles of the same
//! source image (as the paper does: an observer who saw the clean zebra would judge its
//! adversarial copy differently), and each observer's order shuffled, reproducibly, so a
//! resumed session continues where it stopped. An observer answers one group, or (the paper's
//! mode) every group one after the other ([`StudyDesign`]).

use serde::{Deserialize, Serialize};

/// How observers take a study's puzzles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StudyDesign {
    /// Each observer answers one group: nobody sees two puzzles of the same source.
    #[default]
    OneGroup,
    /// Each observer answers every group, one after the other, from their own group on (the
    /// paper's mode, 3000 puzzles each there): two puzzles of one source are a group apart.
    AllGroups,
}

impl StudyDesign {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OneGroup => "one_group",
            Self::AllGroups => "all_groups",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "one_group" => Some(Self::OneGroup),
            "all_groups" => Some(Self::AllGroups),
            _ => None,
        }
    }
}

/// The puzzles (id, group) an observer with `seed`, placed in group `start`, answers, in the
/// order they answer them: their group's (`OneGroup`), or every group's, group after group from
/// `start` on — `start`, `start + 1`, … modulo `groups` (`AllGroups`); within a group in the
/// observer's own order ([`order`]).
pub fn sequence(design: StudyDesign, seed: u64, start: u32, groups: u32, puzzles: &[(i64, u32)]) -> Vec<i64> {
    let runs: Vec<u32> = match design {
        StudyDesign::OneGroup => vec![start],
        StudyDesign::AllGroups => (0..groups).map(|k| (start + k) % groups.max(1)).collect(),
    };
    let mut out = Vec::with_capacity(puzzles.len());
    for g in runs {
        let mut ids: Vec<i64> = puzzles.iter().filter(|p| p.1 == g).map(|p| p.0).collect();
        order(seed, &mut ids);
        out.extend(ids);
    }
    out
}

/// The groups (numbered from 0) that hold puzzles nobody will answer: no observer is placed in
/// them (`OneGroup`), or there is no observer at all (`AllGroups`). `observers` are each one's
/// group and whether they still cover it (false: their link was revoked before they finished).
pub fn groups_without_observers(
    design: StudyDesign,
    sizes: &[u32],
    observers: impl IntoIterator<Item = (u32, bool)>,
) -> Vec<u32> {
    let covering: Vec<u32> = observers.into_iter().filter(|o| o.1).map(|o| o.0).collect();
    (0..sizes.len() as u32)
        .filter(|&g| sizes[g as usize] > 0)
        .filter(|g| match design {
            StudyDesign::OneGroup => !covering.contains(g),
            StudyDesign::AllGroups => covering.is_empty(),
        })
        .collect()
}

/// Groups for `kinds` puzzle kinds (clean + each method): a Latin square, so source `s`'s kind
/// `k` goes to group `(s + k) mod kinds`. Every group holds each source at most once, and the
/// kinds are spread evenly over the groups.
pub fn group_of(source: usize, kind: usize, kinds: usize) -> usize {
    (source + kind) % kinds.max(1)
}

/// The order in which an observer with `seed` sees `puzzles` (ids): sorted by a keyed hash of
/// the id, so the same observer always gets the same order and two observers different ones.
pub fn order(seed: u64, puzzles: &mut [i64]) {
    puzzles.sort_by_key(|&id| (mix(seed ^ mix(id as u64)), id));
}

/// `sources` (in their alphabetical order) reordered by `seed`: the order the Latin square
/// numbers them in, so which source's clean picture lands in which group is drawn, not set by
/// file names, and the same seed gives the same groups.
pub fn shuffle_sources<T>(seed: u64, sources: &mut Vec<T>) {
    let mut keyed: Vec<(u64, T)> = sources.drain(..).enumerate().map(|(i, s)| (mix(seed ^ mix(i as u64)), s)).collect();
    keyed.sort_by_key(|(k, _)| *k);
    sources.extend(keyed.into_iter().map(|(_, s)| s));
}

/// A 64-bit seed from a text (a study's id): FNV-1a, then [`mix`].
pub fn seed_of(text: &str) -> u64 {
    mix(text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)))
}

/// SplitMix64's finaliser: a well-spread 64-bit hash.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_group_holds_a_source_twice_and_every_puzzle_has_one() {
        for kinds in 1..6 {
            for sources in 1..12 {
                let mut seen = std::collections::HashSet::new();
                for s in 0..sources {
                    for k in 0..kinds {
                        let g = group_of(s, k, kinds);
                        assert!(g < kinds);
                        assert!(seen.insert((g, s)), "group {g} holds source {s} twice");
                    }
                }
                // Each group has `sources` puzzles, one per source, and all kinds over the groups.
                assert_eq!(seen.len(), sources * kinds);
            }
        }
    }

    #[test]
    fn sources_are_shuffled_by_the_seed_reproducibly() {
        let names: Vec<String> = (0..20).map(|i| format!("n{i:02}.JPEG")).collect();
        let shuffled = |seed| {
            let mut v = names.clone();
            shuffle_sources(seed, &mut v);
            v
        };
        assert_eq!(shuffled(7), shuffled(7));
        assert_ne!(shuffled(7), shuffled(8));
        assert_ne!(shuffled(7), names, "not alphabetical");
        let mut sorted = shuffled(7);
        sorted.sort();
        assert_eq!(sorted, names);
        assert_eq!(seed_of("abc"), seed_of("abc"));
        assert_ne!(seed_of("abc"), seed_of("abd"));
    }

    #[test]
    fn one_group_or_every_group_in_sequence_from_the_observers_own() {
        // Three groups of four puzzles: ids 10g..10g+3 in group g.
        let puzzles: Vec<(i64, u32)> = (0..3).flat_map(|g| (0..4).map(move |k| (i64::from(g) * 10 + k, g))).collect();
        let one = sequence(StudyDesign::OneGroup, 5, 1, 3, &puzzles);
        let mut own: Vec<i64> = (10..14).collect();
        order(5, &mut own);
        assert_eq!(one, own, "the group's puzzles in the observer's order");
        let all = sequence(StudyDesign::AllGroups, 5, 2, 3, &puzzles);
        let groups: Vec<i64> = all.iter().map(|id| id / 10).collect();
        assert_eq!(groups, [2, 2, 2, 2, 0, 0, 0, 0, 1, 1, 1, 1]);
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, puzzles.iter().map(|p| p.0).collect::<Vec<_>>());
        assert_eq!(StudyDesign::parse(StudyDesign::AllGroups.as_str()), Some(StudyDesign::AllGroups));
    }

    #[test]
    fn groups_nobody_answers_are_named() {
        let sizes = [5, 0, 5, 5];
        let g = |design, obs: &[(u32, bool)]| groups_without_observers(design, &sizes, obs.iter().copied());
        // Group 1 has no puzzles: never named.
        assert_eq!(g(StudyDesign::OneGroup, &[]), [0, 2, 3]);
        assert_eq!(g(StudyDesign::OneGroup, &[(0, true), (2, true)]), [3]);
        assert_eq!(g(StudyDesign::OneGroup, &[(0, true), (2, true), (3, false)]), [3]);
        assert_eq!(g(StudyDesign::AllGroups, &[]), [0, 2, 3]);
        assert_eq!(g(StudyDesign::AllGroups, &[(0, true)]), Vec::<u32>::new());
        assert_eq!(g(StudyDesign::AllGroups, &[(0, false)]), [0, 2, 3]);
    }

    #[test]
    fn an_observer_order_is_a_stable_permutation_that_differs_between_observers() {
        let ids: Vec<i64> = (0..40).collect();
        let (mut a, mut a2, mut b) = (ids.clone(), ids.clone(), ids.clone());
        order(1, &mut a);
        order(1, &mut a2);
        order(2, &mut b);
        assert_eq!(a, a2);
        assert_ne!(a, b);
        assert_ne!(a, ids);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, ids);
    }
}
