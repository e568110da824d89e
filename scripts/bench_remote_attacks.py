#!/usr/bin/env python3
"""Query-based LabelFool against a remote Open Inference Protocol model, side by side with the
anchors a user would otherwise reach for through a predict function: ART's SquareAttack
(score-based) and Foolbox's HopSkipJumpAttack (decision-based), on the same images and the same
targets (the ones LabelFool chose from the remote's probabilities), at the upload's size, every
query an 8-bit PNG posted to the remote.

Needs a LabelFool server with the remote configured and the remote itself (MLServer serving
Lite2 in `bytes` mode, see README "Remote targets"), and a Python with foolbox and ART, e.g. a
venv beside the setup's torch venv (never installed by the setup: benchmark only):
  python -m venv $LABELFOOL_CACHE/bench-anchors
  $LABELFOOL_CACHE/torch-2.13.0/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
      > $LABELFOOL_CACHE/bench-anchors/lib/python3.11/site-packages/torch-venv.pth
  $LABELFOOL_CACHE/bench-anchors/bin/python -m pip install foolbox==3.3.4 adversarial-robustness-toolbox==1.20.1
Usage:
  bench_remote_attacks.py --labelfool URL --remote NAME --infer URL/v2/models/M/infer \
      --images DIR --every 5 --budget 1000 --out OUT.json
"""
import argparse
import base64
import io
import json
import math
import os
import statistics
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image


def post(url, body, content_type, timeout=600):
    req = urllib.request.Request(url, data=body, headers={"content-type": content_type})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def multipart(path):
    boundary = "labelfoolbench"
    data = open(path, "rb").read()
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def png(rgb_u8):
    buf = io.BytesIO()
    Image.fromarray(rgb_u8).save(buf, format="PNG")
    return buf.getvalue()


def perceptibility(a, b):
    d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    return float(math.sqrt((d**2).sum(axis=2).mean()))


class BudgetSpent(Exception):
    pass


class Remote:
    """The predict function a user writes: images in [0,1] (N,H,W,3) -> probabilities; every image
    is rounded to 8 bits and posted as a PNG. Counts queries and remembers the first image whose
    top-1 is the target."""

    def __init__(self, infer, target, budget):
        self.infer, self.target, self.budget = infer, target, budget
        self.queries, self.first_success = 0, None

    def probs(self, x):
        out = []
        for img in x:
            if self.queries >= self.budget:
                raise BudgetSpent()
            u8 = np.clip(np.rint(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)
            self.queries += 1
            body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                           "data": [base64.b64encode(png(u8)).decode()]}]}).encode()
            p = np.asarray(post(self.infer, body, "application/json")["outputs"][0]["data"], dtype=np.float32)
            if self.first_success is None and int(p.argmax()) == self.target:
                self.first_success = (self.queries, u8)
            out.append(p)
        return np.stack(out)


def run_square(infer, x_u8, target, budget, eps):
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    r = Remote(infer, target, budget)
    h, w, _ = x_u8.shape
    clf = BlackBoxClassifierNeuralNetwork(r.probs, input_shape=(h, w, 3), nb_classes=1000,
                                          channels_first=False, clip_values=(0.0, 1.0))
    # ART's SquareAttack is untargeted; made targeted the way its API allows: success is the
    # target's top-1 and the loss the target's cross-entropy (the Square paper's targeted loss).
    attack = SquareAttack(
        clf, norm=np.inf, eps=eps, max_iter=budget, p_init=0.05, nb_restarts=1, batch_size=1, verbose=False,
        adv_criterion=lambda y_pred, y: np.argmax(y_pred, axis=1) == np.argmax(y, axis=1),
        loss=lambda x, y: -np.log(np.maximum(np.take_along_axis(
            clf.predict(x, batch_size=1), np.argmax(y, axis=1)[:, None], axis=1)[:, 0], 1e-30)),
    )
    y = np.zeros((1, 1000), dtype=np.float32)
    y[0, target] = 1
    try:
        attack.generate(x_u8[None].astype(np.float32) / 255.0, y=y)
    except BudgetSpent:
        pass
    return r


def run_hsja(infer, x_u8, start_u8, target, budget):
    import eagerpy as ep
    import foolbox as fb
    import torch

    r = Remote(infer, target, budget)

    class Model(fb.models.Model):
        @property
        def bounds(self):
            return fb.types.Bounds(0.0, 1.0)

        def __call__(self, inputs):
            x, restore = ep.astensor_(inputs)
            p = r.probs(x.numpy())
            return restore(ep.astensor(torch.from_numpy(np.log(np.maximum(p, 1e-30)))))

    # Foolbox asks before it starts; a run past the budget is cut at the budget afterwards.
    attack = fb.attacks.HopSkipJumpAttack(steps=max(1, budget // 100), max_gradient_eval_steps=100)
    crit = fb.criteria.TargetedMisclassification(torch.tensor([target]))
    x = torch.from_numpy(x_u8[None].astype(np.float32) / 255.0)
    s = torch.from_numpy(start_u8[None].astype(np.float32) / 255.0)
    try:
        _, adv, _ = attack(Model(), x, crit, starting_points=s, epsilons=None)
        u8 = np.clip(np.rint(adv[0].numpy() * 255.0), 0, 255).astype(np.uint8)
    except BudgetSpent:
        # Foolbox keeps its best point to itself when stopped: the start stands.
        u8 = start_u8
    return r, u8


def wup_of(rows):
    """Wu-Palmer of the remote's original class and the target, with NLTK on Debian's WordNet 3.0
    (apt-get install wordnet-base; pip install nltk), as eval's figures; None without them."""
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from wordnet_reference import nltk_wordnet
        wn = nltk_wordnet()
    except Exception as e:  # noqa: BLE001
        print(f"no Wu-Palmer figures: {e}", file=sys.stderr)
        return
    syn = lambda w: wn.synset_from_pos_and_offset("n", int(w[1:]))
    wnids = [l.split()[0] for l in open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../data/imagenet_classes.txt"))]
    for x in rows:
        if not x.get("target_wnid") and x.get("target") is not None:
            x["target_wnid"] = wnids[x["target"]]
        o, t = (x.get("original") or {}).get("wnid"), x.get("target_wnid")
        if o and t:
            x["wup"] = syn(o).wup_similarity(syn(t))


def summary(rows, key, budget):
    ok = [x for x in rows if x.get(key) and x[key].get("queries_to_success") is not None]
    wups = [x["wup"] for x in ok if x.get("wup") is not None]
    within = {b: sum(1 for x in ok if x[key]["queries_to_success"] <= b) for b in (10, 100, 300, 1000) if b <= budget}
    q = [x[key]["queries_to_success"] for x in ok]
    return {
        "images": len(rows),
        "success_within": within,
        "success_rate_within_budget": len(ok) / max(1, len(rows)),
        "median_queries_to_success": statistics.median(q) if q else None,
        "mean_perceptibility_of_successes": statistics.mean(x[key]["perceptibility"] for x in ok) if ok else None,
        "mean_wup_of_successes": statistics.mean(wups) if wups else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--labelfool", required=True)
    ap.add_argument("--remote", required=True)
    ap.add_argument("--infer", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--epsilon", type=float, default=13 / 255)
    ap.add_argument("--anchors", default="square,hsja")
    ap.add_argument("--hsja-images", type=int, default=5, help="HSJA runs on the first N successes only")
    ap.add_argument("--reuse-anchors", help="take the anchors' results from an earlier output file for the images whose "
                    "target is the same (the anchors do not depend on LabelFool's code; only LabelFool is rerun)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resummarise", help="recompute the summary of an earlier output file (no queries)")
    a = ap.parse_args()
    if a.resummarise:
        old = json.load(open(a.resummarise))
        rows = old["results"]
        wup_of(rows)
        old["summary"].update({k: summary(rows, k, old["budget"]) for k in ("labelfool", "square")})
        json.dump(old, open(a.out, "w"), indent=1)
        print(json.dumps(old["summary"], indent=1))
        return
    earlier = {}
    if a.reuse_anchors:
        earlier = {(x["file"], x.get("target")): x for x in json.load(open(a.reuse_anchors))["results"]}
    files = sorted(os.listdir(a.images))[:: a.every]
    rows = []
    started = time.time()
    for f in files:
        path = os.path.join(a.images, f)
        x_u8 = np.asarray(Image.open(path).convert("RGB"))
        body, ct = multipart(path)
        q = f"{a.labelfool}/attack?model=remote:{a.remote}&budget={a.budget}&epsilon={a.epsilon}"
        t0 = time.time()
        try:
            v = post(q, body, ct)
        except urllib.error.HTTPError as e:
            # A clear JSON error (a remote timeout: 504): recorded for this image, the run goes on.
            v = {"error": json.load(e)}
        row = {"file": f, "target": v.get("target", {}).get("index"), "target_label": v.get("target", {}).get("label"),
               "target_wnid": v.get("target", {}).get("wnid"), "original": v.get("original")}
        if "error" in v:
            row["error"] = v["error"]
            rows.append(row)
            continue
        lf = {"success": v["success"], "queries": v["queries"], "seconds": time.time() - t0,
              "transfer_prior_success": v["search"] is None and v["success"],
              "perceptibility": v["perturbation"]["perceptibility"] if v.get("perturbation") else None}
        # Queries when the target was first reached (the refinement's probes come after it).
        lf["queries_to_success"] = v.get("queries_to_success", v["queries"]) if v["success"] else None
        lf["refinement"] = v.get("refinement")
        last = (v.get("candidates") or [{}])[-1]
        lf["last_candidate"] = last.get("method") and last["method"] + (f"-{last['steps']}" if last.get("steps") else "")
        row["labelfool"] = lf
        t = row["target"]
        reused = earlier.get((f, t))
        if reused:
            row.update({k: reused[k] for k in ("square", "hsja") if k in reused})
            row["anchors_from"] = a.reuse_anchors
        elif "square" in a.anchors:
            t0 = time.time()
            r = run_square(a.infer, x_u8, t, a.budget, a.epsilon)
            fs = r.first_success
            row["square"] = {"queries": r.queries, "seconds": time.time() - t0,
                             "queries_to_success": fs[0] if fs and fs[0] <= a.budget else None,
                             "perceptibility": perceptibility(x_u8, fs[1]) if fs and fs[0] <= a.budget else None}
        if "hsja" in a.anchors and not reused:
            # A targeted decision-based attack starts from an image the remote already labels as
            # the target: LabelFool's delivered one when it succeeded (its queries counted).
            if v["success"] and sum(1 for x in rows if x.get("hsja", {}).get("start")) < a.hsja_images:
                start = np.asarray(Image.open(io.BytesIO(base64.b64decode(v["png_base64"]))).convert("RGB"))
                t0 = time.time()
                r, adv = run_hsja(a.infer, x_u8, start, t, a.budget - v["queries"])
                # Is HSJA's image, rounded to 8 bits, still the target? (one query, not counted)
                check = Remote(a.infer, t, 1)
                still = int(check.probs(adv[None].astype(np.float32) / 255.0)[0].argmax()) == t
                row["hsja"] = {"queries": r.queries + v["queries"], "seconds": time.time() - t0,
                               "start": "labelfool", "perceptibility_start": lf["perceptibility"],
                               "perceptibility_final": perceptibility(x_u8, adv), "final_is_target": still}
            else:
                row["hsja"] = {"start": None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    wup_of(rows)
    out = {"command": " ".join(sys.argv), "seconds": time.time() - started, "budget": a.budget,
           "epsilon": a.epsilon, "summary": {k: summary(rows, k, a.budget) for k in ("labelfool", "square")},
           "results": rows}
    hs = [x["hsja"] for x in rows if x.get("hsja", {}).get("start")]
    if hs:
        out["summary"]["hsja_refining_labelfool"] = {
            "images": len(hs),
            "mean_perceptibility_start": statistics.mean(h["perceptibility_start"] for h in hs),
            "mean_perceptibility_final": statistics.mean(h["perceptibility_final"] for h in hs),
            "mean_queries": statistics.mean(h["queries"] for h in hs),
        }
    json.dump(out, open(a.out, "w"), indent=1)
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
