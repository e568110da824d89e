#!/usr/bin/env python3
"""Writes the SSIM reference fixtures that tests check `imaging::metrics::ssim` against:
image pairs (PNG) in tests/fixtures/ssim/ and the values scikit-image gives for them in
tests/fixtures/ssim/reference.json.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install scikit-image==0.26.0 pillow numpy
    /tmp/ref/bin/python scripts/ssim_reference.py

The call is the standard SSIM of Wang et al. (2004) as scikit-image spells it: an 11×11 Gaussian
window (σ = 1.5), K1 = 0.01, K2 = 0.03, data range 1, population covariance, the mean over R, G, B.
"""
import json
import pathlib

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/ssim"


def ssim(a, b):
    return float(structural_similarity(
        a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2))


def main():
    rng = np.random.default_rng(20261125)
    photo = np.asarray(Image.open(ROOT / "tests/fixtures/images/n02391049_zebra.JPEG").convert("RGB"))
    crop = photo[100:196, 150:230]
    pairs = {}
    # A flat grey area with ±1 grey-level noise: the case that read 0.65 instead of ~0.99.
    flat = np.full((64, 64, 3), 128, np.uint8)
    pairs["flat_noise1"] = (flat, (flat.astype(int) + rng.integers(-1, 2, flat.shape)).astype(np.uint8))
    # A photo crop with ±4 noise, with a brighter copy, and with a one-pixel shift.
    pairs["photo_noise4"] = (crop, np.clip(crop.astype(int) + rng.integers(-4, 5, crop.shape), 0, 255).astype(np.uint8))
    pairs["photo_brighter"] = (crop, np.clip(crop.astype(int) + 20, 0, 255).astype(np.uint8))
    pairs["photo_shift"] = (crop, np.roll(crop, 1, axis=1))
    # Just above the window size, odd shape.
    small = photo[300:313, 300:317]
    pairs["small_13x17"] = (small, np.clip(small.astype(int) + rng.integers(-10, 11, small.shape), 0, 255).astype(np.uint8))
    OUT.mkdir(parents=True, exist_ok=True)
    values = {}
    for name, (a, b) in pairs.items():
        Image.fromarray(a).save(OUT / f"{name}_a.png")
        Image.fromarray(b).save(OUT / f"{name}_b.png")
        values[name] = ssim(a, b)
    import skimage
    doc = {"generator": "scripts/ssim_reference.py", "scikit_image": skimage.__version__, "ssim": values}
    (OUT / "reference.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(values, indent=2))


if __name__ == "__main__":
    main()
