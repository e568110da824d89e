#!/usr/bin/env python3
"""Writes tests/fixtures/wordnet_nltk.tsv: NLTK's Wu-Palmer similarity for ImageNet class pairs,
which `eval::wordnet` must reproduce exactly. Every pair whose lowest common subsumer is a tie
(several common hypernyms of the same, deepest minimum depth: NLTK then takes the first by synset
name) is listed, with a fixed random sample of other pairs.

Runs NLTK on Debian's WordNet 3.0 (`apt-get install wordnet-base`), copied into an NLTK data
directory (NLTK wants a `lexnames` file, which Debian does not ship; the script writes WordNet's
standard one):

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install nltk==3.10.4
    /tmp/ref/bin/python scripts/wordnet_reference.py
"""
import pathlib
import random
import shutil
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
verb.possession verb.social verb.stative verb.weather adj.ppl""".split()


def nltk_wordnet(debian="/usr/share/wordnet"):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    data = pathlib.Path(tempfile.mkdtemp()) / "nltk_data"
    corpus = data / "corpora" / "wordnet"
    corpus.mkdir(parents=True)
    for f in pathlib.Path(debian).iterdir():
        if f.name.startswith(("data.", "index.")) or f.name.endswith(".exc"):
            shutil.copy(f, corpus / f.name)
    pos = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    (corpus / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{pos[n.split('.')[0]]}\n" for i, n in enumerate(LEXNAMES)))
    nltk.data.path.insert(0, str(data))
    # This is WordNet 3.0 itself: no mapping to another version (which would need index.sense).
    WordNetCorpusReader.map_wn = lambda self, version="wordnet": None
    return WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)


def main():
    rows = [l.rstrip("\n").split("\t") for l in open(ROOT / "data/wordnet_imagenet.tsv") if not l.startswith("#")]
    parents = {r[0]: [h for h in r[2].split(",") if h] for r in rows}
    classes = [l.split()[0] for l in open(ROOT / "data/imagenet_classes.txt")]
    min_depth = {}

    def depth(s):
        if s not in min_depth:
            min_depth[s] = 0 if not parents[s] else 1 + min(depth(p) for p in parents[s])
        return min_depth[s]

    def ancestors(s):
        out, todo = set(), [s]
        while todo:
            x = todo.pop()
            if x not in out:
                out.add(x)
                todo.extend(parents[x])
        return out

    anc = {c: ancestors(c) for c in classes}
    ties, others = [], []
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            common = anc[a] & anc[b]
            deepest = max(depth(c) for c in common)
            (ties if sum(depth(c) == deepest for c in common) > 1 else others).append((a, b))
    random.Random(20261125).shuffle(others)
    wn = nltk_wordnet()
    out = ROOT / "tests/fixtures/wordnet_nltk.tsv"
    with open(out, "w") as f:
        f.write("# NLTK Wu-Palmer on WordNet 3.0 (scripts/wordnet_reference.py). a<TAB>b<TAB>wup<TAB>tie|sample\n")
        for kind, pairs in (("tie", ties), ("sample", others[:500])):
            for a, b in pairs:
                sa, sb = (wn.synset_from_pos_and_offset("n", int(x[1:])) for x in (a, b))
                f.write(f"{a}\t{b}\t{sa.wup_similarity(sb)!r}\t{kind}\n")
    print(f"wrote {out}: {len(ties)} tie pairs, 500 sampled pairs")


if __name__ == "__main__":
    main()
