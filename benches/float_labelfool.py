"""A plain PyTorch LabelFool, float only, on the 224 crop: the baseline of issue 33's CPU figure.

The paper's attack as a reader would write it from the method's description, with no 8-bit
rounding, no checks and no server around it, on the same TorchScript model and class-distance
matrix the server uses:

  1. decode, resize the short side to 256 (bilinear, antialiased), centre-crop 224, to [0, 1];
  2. target: if p̂1 > δ1 (0.8), the class nearest the prediction in D; else the class minimising
     Σ_{j ∈ S} p̂j·D[i, j] over the classes i outside S = {j: p̂j > δ2} (δ2 = 0.01);
  3. while argmax f(x) ≠ t (at most 50 steps): w = ∇(f_t − f_k), x += (1 + overshoot)·
     (|f_k − f_t| + 1e-4)/‖w‖²·w, clipped to [0, 1].

Run it alternated with the server's eval on the same images (see benches/README.md):

  $LABELFOOL_CACHE/torch-2.13.0/bin/python benches/float_labelfool.py --images DIR \
      --model $LABELFOOL_CACHE/models/efficientnet-lite0

It prints one JSON line: images, successes, mean iterations, wall seconds and seconds per image
(wall time over images, as `labelfool eval` reports its own).
"""

import argparse
import json
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DELTA1, DELTA2, OVERSHOOT, MAX_ITER = 0.8, 0.01, 0.02, 50


def load(path: pathlib.Path) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255.0
    h, w = x.shape[2:]
    s = 256 / min(h, w)
    x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[2] - 224) // 2, (x.shape[3] - 224) // 2
    return x[:, :, top : top + 224, left : left + 224].clamp(0, 1).contiguous()


def target(probs: torch.Tensor, d: torch.Tensor) -> int:
    p, order = probs.sort(descending=True)
    top = int(order[0])
    if float(p[0]) > DELTA1:
        row = d[:, top].clone()
        row[top] = float("inf")
        return int(row.argmin())
    # The official code's convention (and the server's): D's diagonal counts as +inf, so no class
    # of S can be the target. Without it the weighted branch often picks the prediction itself,
    # and the "attack" ends at step 0.
    keep = probs > DELTA2
    if not keep.any():
        keep[top] = True
    score = (d[:, keep] * probs[keep]).sum(1)
    score[keep] = float("inf")
    return int(score.argmin())


def attack(model, x0: torch.Tensor, d: torch.Tensor):
    with torch.no_grad():
        logits = model(x0)[0]
    t = target(logits.softmax(0), d)
    x = x0.clone()
    for it in range(MAX_ITER + 1):
        x.requires_grad_(True)
        f = model(x)[0]
        k = int(f.argmax())
        if k == t:
            return True, it
        if it == MAX_ITER:
            break
        gap = f[t] - f[k]
        (w,) = torch.autograd.grad(gap, x)
        with torch.no_grad():
            step = (1 + OVERSHOOT) * (abs(float(gap)) + 1e-4) / float(w.square().sum())
            x = (x + step * w).clamp(0, 1)
    return False, MAX_ITER


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, type=pathlib.Path)
    ap.add_argument("--model", required=True, type=pathlib.Path, help="a model bundle folder (model.pt, distance.npy)")
    ap.add_argument("--limit", type=int)
    a = ap.parse_args()
    model = torch.jit.load(str(a.model / "model.pt")).eval()
    d = torch.from_numpy(np.load(a.model / "distance.npy")).float()
    paths = sorted(p for p in a.images.iterdir() if p.suffix.lower() in {".jpeg", ".jpg", ".png"})[: a.limit]
    # One untimed forward and backward, as the server loads and warms its model before eval.
    attack(model, load(paths[0]), d)
    started = time.perf_counter()
    results = [attack(model, load(p), d) for p in paths]
    wall = time.perf_counter() - started
    print(json.dumps({
        "images": len(paths),
        "successes": sum(ok for ok, _ in results),
        "mean_iterations": sum(i for _, i in results) / len(paths),
        "wall_seconds": wall,
        "seconds_per_image": wall / len(paths),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
