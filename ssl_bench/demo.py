"""A small built-in LA-like data set in the release layout, generated deterministically.

Each case is a z-scored noisy volume with a bright, smooth, blob-shaped "atrium" (its label) and a
few distractor blobs. Same seed → byte-identical arrays. It exists for the README's main job and
for fast tests; it says nothing about real LA performance. ``ssl_bench_demo.json`` records how it was made
(the seed and case counts; no date, so the same seed gives the same bytes).
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from . import __version__
from .data import CASES_DIR, H5_NAME, SUMS_NAME, sha256_file
from .errors import UserError

DEMO_RECORD = "ssl_bench_demo.json"  # not DATASET_RECORD: the demo is in LA's layout with LA's settings


def _case(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array(shape, np.float32) * rng.uniform(0.4, 0.6, 3)
    radii = np.array(shape, np.float32) * rng.uniform(0.16, 0.24, 3)
    d = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4) * 6.0
    label = (d + wobble < 1.0)
    image = 1.5 * label.astype(np.float32)
    for _ in range(3):  # distractors the network must learn to ignore
        c = np.array(shape) * rng.uniform(0.1, 0.9, 3)
        r = rng.uniform(3, 6)
        blob = (((grid - c[:, None, None, None]) ** 2).sum(0) < r * r)
        image += 1.0 * (blob & ~label)
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 0.35, shape).astype(np.float32)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), label.astype(np.uint8)


def make_demo(out: Path, n_train: int = 16, n_test: int = 4, seed: int = 0) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose a new folder")
    rng = np.random.default_rng(seed)
    ids = [f"DEMO{i:03d}" for i in range(n_train + n_test)]
    sums = []
    for case_id in ids:
        shape = (int(rng.integers(76, 92)), int(rng.integers(68, 84)), 56)
        image, label = _case(rng, shape)
        path = out / CASES_DIR / case_id / H5_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=image, compression="gzip")
            f.create_dataset("label", data=label, compression="gzip")
        sums.append(f"{sha256_file(path)}  ./{case_id}/{H5_NAME}")
    (out / "train.list").write_text("".join(i + "\n" for i in ids[:n_train]))
    (out / "test.list").write_text("".join(i + "\n" for i in ids[n_train:]))
    (out / SUMS_NAME).write_text("\n".join(sums) + "\n")
    (out / DEMO_RECORD).write_text(json.dumps({"ssl_bench_demo": 1, "ssl_bench_version": __version__, "seed": seed,
                                               "n_train": n_train, "n_test": n_test}, indent=2) + "\n")
    return out
