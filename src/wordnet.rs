//! Label-space closeness, measured objectively: Wu-Palmer similarity in the WordNet 3.0 noun
//! hierarchy, and whether two classes stay inside the same top-level group. The graph above the
//! 1000 ImageNet classes ships in the binary (`data/wordnet_imagenet.tsv`, made by
//! `scripts/build_wordnet.py`), so users need no WordNet install.
//!
//! Wu-Palmer as NLTK (and WordNet::Similarity) compute it: with the lowest common subsumer c
//! (among common hypernyms, the deepest by minimum depth), depth(c) = its longest path to the
//! root `entity` + 1, and d1, d2 the shortest hypernym-path distances of the two synsets to c:
//! wup = 2·depth(c) / (d1 + d2 + 2·depth(c)). When several common hypernyms tie for the lowest,
//! NLTK takes the first by synset *name* (`bread.n.01` before `starches.n.01`); so does this, from
//! the name column of the table (`tests/fixtures/wordnet_nltk.tsv` holds NLTK's own values).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::OnceLock;

/// A synset's hypernyms by index, each with its distance (steps up) from the synset.
type Distances = HashMap<usize, u32>;

pub struct WordNet {
    index: HashMap<String, usize>,
    wnids: Vec<String>,
    lemmas: Vec<String>,
    /// NLTK's synset names (`french_loaf.n.01`), which break ties between subsumers.
    names: Vec<String>,
    hypernyms: Vec<Vec<usize>>,
    max_depth: Vec<u32>,
    min_depth: Vec<u32>,
}

/// Top-level groups, tested in order (a person is also an organism; food before artifact).
const GROUPS: &[(&str, &[&str])] = &[
    ("animal", &["n00015388"]),
    ("person", &["n00007846"]),
    ("plant", &["n00017222"]),
    ("fungus", &["n12992868"]),
    ("food", &["n00021265", "n07555863"]),
    ("geological formation", &["n09287968"]),
    ("natural object", &["n00019128"]),
    ("artifact", &["n00021939"]),
];

impl WordNet {
    /// The hierarchy built into the binary.
    pub fn embedded() -> &'static WordNet {
        static WN: OnceLock<WordNet> = OnceLock::new();
        WN.get_or_init(|| {
            WordNet::parse(include_str!("../data/wordnet_imagenet.tsv"))
                .expect("the embedded WordNet table is well-formed")
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let rows: Vec<(&str, &str, &str, &str)> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let mut f = l.split('\t');
                let wnid = f.next().ok_or("no wnid")?;
                let (lemma, hypernyms) = (f.next().ok_or("no lemma")?, f.next().unwrap_or(""));
                // Tables without names (hand-made ones in tests) order ties by wnid.
                Ok((wnid, lemma, hypernyms, f.next().filter(|n| !n.is_empty()).unwrap_or(wnid)))
            })
            .collect::<Result<_, &str>>()?;
        let index: HashMap<String, usize> = rows.iter().enumerate().map(|(i, r)| (r.0.to_string(), i)).collect();
        let mut hypernyms = Vec::with_capacity(rows.len());
        for (w, _, h, _) in &rows {
            let hs = h
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| index.get(s).copied().ok_or_else(|| format!("{w}: unknown hypernym {s}")))
                .collect::<Result<Vec<_>, _>>()?;
            hypernyms.push(hs);
        }
        let mut wn = Self {
            index,
            wnids: rows.iter().map(|r| r.0.to_string()).collect(),
            lemmas: rows.iter().map(|r| r.1.to_string()).collect(),
            names: rows.iter().map(|r| r.3.to_string()).collect(),
            hypernyms,
            max_depth: Vec::new(),
            min_depth: Vec::new(),
        };
        let n = wn.wnids.len();
        let (mut max_d, mut min_d) = (vec![None; n], vec![None; n]);
        for i in 0..n {
            wn.depths(i, &mut max_d, &mut min_d, 0)?;
        }
        wn.max_depth = max_d.into_iter().map(Option::unwrap_or_default).collect();
        wn.min_depth = min_d.into_iter().map(Option::unwrap_or_default).collect();
        Ok(wn)
    }

    fn depths(
        &self,
        i: usize,
        max_d: &mut [Option<u32>],
        min_d: &mut [Option<u32>],
        guard: usize,
    ) -> Result<(u32, u32), String> {
        if let (Some(a), Some(b)) = (max_d[i], min_d[i]) {
            return Ok((a, b));
        }
        if guard > 100 {
            return Err(format!("cycle in the hypernym graph at {}", self.wnids[i]));
        }
        let (mut hi, mut lo) = (0u32, u32::MAX);
        for &h in &self.hypernyms[i] {
            let (a, b) = self.depths(h, max_d, min_d, guard + 1)?;
            hi = hi.max(a + 1);
            lo = lo.min(b + 1);
        }
        let lo = if lo == u32::MAX { 0 } else { lo };
        max_d[i] = Some(hi);
        min_d[i] = Some(lo);
        Ok((hi, lo))
    }

    pub fn contains(&self, wnid: &str) -> bool {
        self.index.contains_key(wnid)
    }

    pub fn lemma(&self, wnid: &str) -> Option<&str> {
        self.index.get(wnid).map(|&i| self.lemmas[i].as_str())
    }

    /// Shortest upward (hypernym) distances from `i` to each of its ancestors, itself at 0.
    fn up_distances(&self, i: usize) -> Distances {
        let mut dist = HashMap::from([(i, 0)]);
        let mut queue = VecDeque::from([i]);
        while let Some(x) = queue.pop_front() {
            let d = dist[&x];
            for &h in &self.hypernyms[x] {
                if let std::collections::hash_map::Entry::Vacant(e) = dist.entry(h) {
                    e.insert(d + 1);
                    queue.push_back(h);
                }
            }
        }
        dist
    }

    fn path_distance(&self, a: &HashMap<usize, u32>, b: &HashMap<usize, u32>) -> u32 {
        a.iter().filter_map(|(s, da)| b.get(s).map(|db| da + db)).min().unwrap_or(u32::MAX)
    }

    /// The lowest common subsumer as NLTK picks it (deepest minimum depth; the first synset itself,
    /// then the first by name), with both synsets' hypernym distances.
    fn lcs(&self, a: &str, b: &str) -> Option<(usize, Distances, Distances)> {
        let (&ia, &ib) = (self.index.get(a)?, self.index.get(b)?);
        let (da, db) = (self.up_distances(ia), self.up_distances(ib));
        let common: HashSet<usize> = da.keys().filter(|k| db.contains_key(k)).copied().collect();
        let deepest = common.iter().map(|&c| self.min_depth[c]).max()?;
        let lcs = common.iter().copied().filter(|&c| self.min_depth[c] == deepest).min_by(|&x, &y| {
            // NLTK prefers the synset itself, then the first by name.
            (x != ia).cmp(&(y != ia)).then(self.names[x].cmp(&self.names[y]))
        })?;
        Some((lcs, da, db))
    }

    /// Wu-Palmer similarity of two synsets (1 for the same synset); None if either is unknown.
    pub fn wup(&self, a: &str, b: &str) -> Option<f64> {
        let (lcs, da, db) = self.lcs(a, b)?;
        let depth = f64::from(self.max_depth[lcs] + 1);
        let dl = self.up_distances(lcs);
        let (l1, l2) = (f64::from(self.path_distance(&da, &dl)), f64::from(self.path_distance(&db, &dl)));
        Some(2.0 * depth / (l1 + l2 + 2.0 * depth))
    }

    /// Mistake severity (Bertinetto et al., "Making Better Mistakes", CVPR 2020): the height of
    /// the lowest common ancestor of the true and the predicted class — here the levels from the
    /// farther of the two up to the same subsumer Wu-Palmer uses, which is the LCA's height in a
    /// tree whose leaves are level. 0 for the same class; lower is a milder mistake.
    pub fn mistake_severity(&self, a: &str, b: &str) -> Option<u32> {
        let (lcs, da, db) = self.lcs(a, b)?;
        let dl = self.up_distances(lcs);
        Some(self.path_distance(&da, &dl).max(self.path_distance(&db, &dl)))
    }

    /// The top-level group of a synset (`animal`, `artifact`, `food`, …), `other` when none fits.
    pub fn group(&self, wnid: &str) -> Option<&'static str> {
        let i = *self.index.get(wnid)?;
        let ancestors = self.up_distances(i);
        let names: HashSet<&str> = ancestors.keys().map(|&k| self.wnids[k].as_str()).collect();
        Some(
            GROUPS
                .iter()
                .find(|(_, roots)| roots.iter().any(|r| names.contains(r)))
                .map(|(g, _)| *g)
                .unwrap_or("other"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// entity ─┬─ animal ─┬─ dog ── terrier
    ///         │          └─ cat
    ///         └─ artifact ── car
    const TOY: &str =
        "n1\tentity\t\nn2\tanimal\tn1\nn3\tdog\tn2\nn4\tterrier\tn3\nn5\tcat\tn2\nn6\tartifact\tn1\nn7\tcar\tn6\n";

    #[test]
    fn wu_palmer_on_a_hand_made_tree() {
        let wn = WordNet::parse(TOY).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        // terrier–cat: lcs animal, depth 1+1 = 2; distances 2 and 1 → 4 / (3 + 4) = 4/7.
        assert!(close(wn.wup("n4", "n5").unwrap(), 4.0 / 7.0));
        // terrier–car: lcs entity, depth 1; distances 3 and 2 → 2 / (5 + 2) = 2/7.
        assert!(close(wn.wup("n4", "n7").unwrap(), 2.0 / 7.0));
        // terrier–dog: lcs dog, depth 3; distances 1 and 0 → 6 / 7.
        assert!(close(wn.wup("n4", "n3").unwrap(), 6.0 / 7.0));
        assert!(close(wn.wup("n3", "n3").unwrap(), 1.0));
        assert_eq!(wn.wup("n3", "n99"), None);
        // Symmetric.
        assert!(close(wn.wup("n5", "n4").unwrap(), 4.0 / 7.0));
        // Mistake severity: the LCA's height. terrier–cat: animal, 2 levels above terrier;
        // terrier–car: entity, 3; terrier–dog: dog, 1; a class with itself: 0.
        assert_eq!(wn.mistake_severity("n4", "n5"), Some(2));
        assert_eq!(wn.mistake_severity("n4", "n7"), Some(3));
        assert_eq!(wn.mistake_severity("n4", "n3"), Some(1));
        assert_eq!(wn.mistake_severity("n3", "n3"), Some(0));
        assert_eq!(wn.mistake_severity("n3", "n99"), None);
    }

    #[test]
    fn multiple_inheritance_takes_the_deepest_common_subsumer() {
        // x has two parents: a (depth 1) and b (under a: depth 2); y is under b.
        let wn = WordNet::parse("r\troot\t\na\ta\tr\nb\tb\ta\nx\tx\ta,b\ny\ty\tb\n").unwrap();
        // Common subsumers of x and y: b (min depth 2), a, r → lcs b, depth 2+1 = 3;
        // x→b = 1, y→b = 1 → 6 / (2 + 6) = 0.75.
        assert!((wn.wup("x", "y").unwrap() - 0.75).abs() < 1e-12);
        assert!(WordNet::parse("a\ta\tb\nb\tb\ta\n").is_err(), "cycles are rejected");
    }

    /// NLTK's values (`scripts/wordnet_reference.py`): every ImageNet pair whose lowest common
    /// subsumer is a tie, and a sample of the rest.
    #[test]
    fn wu_palmer_matches_nltk_including_ties() {
        let wn = WordNet::embedded();
        let reference = include_str!("../tests/fixtures/wordnet_nltk.tsv");
        let (mut ties, mut n) = (0, 0);
        for line in reference.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split('\t').collect();
            let expected: f64 = f[2].parse().unwrap();
            let got = wn.wup(f[0], f[1]).unwrap();
            assert!((got - expected).abs() < 1e-12, "{} vs {}: {got}, NLTK {expected}", f[0], f[1]);
            ties += usize::from(f[3] == "tie");
            n += 1;
        }
        assert!(ties > 1000 && n > 1500, "{ties} ties of {n}");
        // The reviewer's example: French loaf vs bagel, lcs bread.n.01 (not starches.n.01).
        assert!((wn.wup("n07684084", "n07693725").unwrap() - 0.8).abs() < 1e-12);
    }

    #[test]
    fn embedded_hierarchy_covers_imagenet() {
        let wn = WordNet::embedded();
        let classes = crate::model::ClassList::parse(include_str!("../data/imagenet_classes.txt")).unwrap();
        for c in classes.iter() {
            let w = c.wnid.as_deref().unwrap();
            assert!(wn.contains(w), "{w} missing");
        }
        // NLTK's documented example: dog.n.01 vs cat.n.01 = 0.857 (lcs carnivore).
        assert!((wn.wup("n02084071", "n02121620").unwrap() - 0.857_142_857).abs() < 1e-6);
        assert_eq!(wn.group("n02391049"), Some("animal"), "zebra");
        assert_eq!(wn.group("n04037443"), Some("artifact"), "racer");
        assert_eq!(wn.group("n07714990"), Some("food"), "broccoli");
        assert_eq!(wn.group("n09472597"), Some("geological formation"), "volcano");
        assert_eq!(wn.lemma("n02391049"), Some("zebra"));
    }
}
