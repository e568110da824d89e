//! Class lists: `classes.txt`, line i = class i, `"<wnid> <name>, <synonym>, …"` (ImageNet's
//! synset file) or just `"<name>"` for datasets without WordNet ids.

use std::collections::HashMap;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassInfo {
    pub index: usize,
    /// WordNet id (`n01440764`) when the dataset has one.
    pub wnid: Option<String>,
    /// The first name: what responses call the class.
    pub label: String,
    pub synonyms: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ClassList {
    classes: Vec<ClassInfo>,
    by_key: HashMap<String, usize>,
}

impl ClassList {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut classes = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                return Err(format!("line {} is empty: every line must name a class", index + 1));
            }
            let (wnid, rest) = match line.split_once(' ') {
                Some((first, rest)) if is_wnid(first) => (Some(first.to_string()), rest),
                _ if is_wnid(line) => (Some(line.to_string()), line),
                _ => (None, line),
            };
            let mut names = rest.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
            let label = names.next().unwrap_or_else(|| rest.to_string());
            classes.push(ClassInfo { index, wnid, label, synonyms: names.collect() });
        }
        if classes.is_empty() {
            return Err("the class list is empty".into());
        }
        // Keys resolve in order of precedence: wnid, then first label, then synonyms; an ambiguous
        // synonym keeps its first class (ImageNet has e.g. two "crane"s: the bird wins by index).
        let mut by_key = HashMap::new();
        for c in &classes {
            if let Some(w) = &c.wnid {
                by_key.insert(w.to_ascii_lowercase(), c.index);
            }
        }
        for c in &classes {
            by_key.entry(c.label.to_lowercase()).or_insert(c.index);
        }
        for c in &classes {
            for s in &c.synonyms {
                by_key.entry(s.to_lowercase()).or_insert(c.index);
            }
        }
        Ok(Self { classes, by_key })
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<&ClassInfo> {
        self.classes.get(index)
    }

    pub fn label(&self, index: usize) -> &str {
        self.classes.get(index).map(|c| c.label.as_str()).unwrap_or("?")
    }

    pub fn iter(&self) -> impl Iterator<Item = &ClassInfo> {
        self.classes.iter()
    }

    /// A class given as an index (`340`), a WordNet id (`n02391049`) or a name (`zebra`,
    /// case-insensitive, synonyms too; `_` stands for a space as in sample file names).
    pub fn resolve(&self, key: &str) -> Option<usize> {
        let key = key.trim();
        if let Ok(i) = key.parse::<usize>() {
            return (i < self.classes.len()).then_some(i);
        }
        let lower = key.to_lowercase();
        self.by_key.get(&lower).or_else(|| self.by_key.get(&lower.replace('_', " "))).copied()
    }

    /// The same class in another model's list: by WordNet id when both lists have them, else by
    /// name (case-insensitive). None when `other` has no such class.
    pub fn same_class_in(&self, index: usize, other: &ClassList) -> Option<usize> {
        let c = self.classes.get(index)?;
        match (&c.wnid, other.has_wnids()) {
            (Some(w), true) => other.classes.iter().position(|o| o.wnid.as_deref() == Some(w.as_str())),
            _ => other.classes.iter().position(|o| o.label.eq_ignore_ascii_case(&c.label)),
        }
    }

    pub fn has_wnids(&self) -> bool {
        self.classes.iter().all(|c| c.wnid.is_some())
    }
}

fn is_wnid(s: &str) -> bool {
    s.len() == 9 && s.starts_with('n') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\nn02391049 zebra\n";

    #[test]
    fn resolves_index_wnid_name_and_synonym() {
        let c = ClassList::parse(SAMPLE).unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(c.resolve("3"), Some(3));
        assert_eq!(c.resolve("4"), None);
        assert_eq!(c.resolve("n02391049"), Some(3));
        assert_eq!(c.resolve("Zebra"), Some(3));
        assert_eq!(c.resolve("tinca_tinca"), Some(0));
        assert_eq!(c.resolve("crane"), Some(1), "ambiguous names keep the first class");
        assert_eq!(c.resolve("n03126707"), Some(2), "the wnid still reaches the second crane");
        assert_eq!(c.resolve("unicorn"), None);
        assert_eq!(c.label(0), "tench");
        assert!(c.has_wnids());
        let other = ClassList::parse("n02391049 zebra\nn01440764 tench\n").unwrap();
        assert_eq!(c.same_class_in(3, &other), Some(0));
        assert_eq!(c.same_class_in(1, &other), None);
        let plain = ClassList::parse("Tench\nzebra\n").unwrap();
        assert_eq!(c.same_class_in(0, &plain), Some(0), "by name when the other list has no wnids");
    }

    #[test]
    fn plain_names_and_bad_files() {
        let c = ClassList::parse("cat\ndog\n").unwrap();
        assert_eq!(c.resolve("dog"), Some(1));
        assert!(!c.has_wnids());
        assert!(ClassList::parse("").is_err());
        assert!(ClassList::parse("cat\n\ndog\n").is_err());
    }
}
