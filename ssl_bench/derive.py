"""`ssl-bench data derive`: the LA release at reduced resolution, for the CPU track (docs/methods.md, Decision 10).

Every listed case (``train.list`` then ``test.list``, the same ids in the same order) is resampled by one
zoom factor per axis with ``scipy.ndimage.zoom`` (``grid_mode=False``, ``mode="nearest"``; output shape
``round(shape · zoom)``):

- image: order 1 (trilinear), float32, not re-normalised (the release's per-scan z-score, interpolated);
- label: the label as float32, zoomed with order 1, then ``>= 0.5`` (the 50 % rule: a voxel is foreground
  where the trilinear interpolation of the binary mask is at least one half). Nearest-neighbour (order 0)
  is biased by scipy's half-voxel rounding at a factor of 0.5; the 50 % rule is not.

OUT has the layout of the release (``train.list``, ``test.list``, ``2018LA_Seg_Training Set/<id>/mri_norm2.h5``,
``SHA256SUMS.h5.txt``) and a record ``ssl_bench_dataset.json``: the source folder and the sha256 of every source
file, the zoom, both rules, per-case shapes and foreground voxels, and the per-data-set settings that
``run``, ``sweep`` and ``report`` take from it (patch, sliding-window strides, units). The strides are the
paper's (18 in x/y, 4 in z) scaled by the zoom unless given. No date is recorded: the same source, zoom and
options give the same bytes (h5 files without timestamps).

OUT is written into a temporary folder beside it and renamed into place only when every case succeeded.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import CASES_DIR, DATASET_RECORD, H5_NAME, SUMS_NAME, LAData, sha256_file, write_case_h5
from .errors import UserError
from .importer import LA_PATCH, LA_STRIDES, writing_dataset

#: a zoom factor must lie in this range (a larger factor is upsampling, which the track never needs)
ZOOM_RANGE = (0.1, 1.0)
LABEL_RULE = "label zoomed as float32 with order 1 (trilinear), then >= 0.5"
IMAGE_RULE = "scipy.ndimage.zoom order 1 (trilinear), grid_mode=False, mode='nearest'; float32; not re-normalised"


def _zoom_factors(zoom) -> tuple[float, float, float]:
    try:
        parts = [float(v) for v in (zoom.split(",") if isinstance(zoom, str) else
                                    (zoom if isinstance(zoom, (list, tuple)) else [zoom]))]
    except (TypeError, ValueError):
        raise UserError(f"--zoom must be a number or three numbers like 0.5,0.5,0.5, got {zoom!r}") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not all(np.isfinite(p) and ZOOM_RANGE[0] <= p <= ZOOM_RANGE[1] for p in parts):
        raise UserError(f"--zoom needs one or three factors from {ZOOM_RANGE[0]} to {ZOOM_RANGE[1]}, got {zoom!r}")
    return tuple(parts)


def _positive_triple(value, name: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise UserError(f"{name} must look like 64,64,32, got {value!r}") from None
    if len(parts) != 3:
        raise UserError(f"{name} needs three sizes like 64,64,32, got {value!r}")
    return parts


def derive_case(image: np.ndarray, label: np.ndarray, zoom: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8 {0,1}) of one case at ``zoom`` by the declared rules."""
    from scipy import ndimage

    shape = tuple(int(round(s * z)) for s, z in zip(image.shape, zoom))
    if min(shape) < 1:
        raise ValueError(f"zoom {zoom} leaves an empty axis of shape {image.shape}")
    factors = tuple(n / s for n, s in zip(shape, image.shape))  # exactly the rounded output shape
    img = ndimage.zoom(image.astype(np.float32), factors, order=1, mode="nearest", grid_mode=False)
    lab = ndimage.zoom(label.astype(np.float32), factors, order=1, mode="nearest", grid_mode=False) >= 0.5
    assert img.shape == shape == lab.shape
    return img.astype(np.float32), lab.astype(np.uint8)


def derive(src, out, *, zoom=0.5, patch=None, stride_xy: int | None = None, stride_z: int | None = None,
           command: dict | None = None, progress=None) -> dict:
    """Write the reduced-resolution copy of the data set at SRC into OUT (atomically). Returns the record."""
    from . import __version__

    zoom = _zoom_factors(zoom)
    patch = _positive_triple(patch, "--patch")
    src = LAData(src)  # one line for a missing root, list, or a list shared by train and test
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new folder")
    out_abs = out.resolve()
    if out_abs == src.root or src.root in out_abs.parents or out_abs in src.root.parents:
        raise UserError(f"{out} is the source data folder, inside it, or holds it; choose a folder outside {src.root}")
    if patch is None:
        patch = tuple(max(16, int(16 * round(p * z / 16))) for p, z in zip(LA_PATCH, zoom))
    if any(p < 16 or p % 16 for p in patch):
        raise UserError(f"--patch needs three sizes, each a multiple of 16 (the V-Net halves 4 times), got {patch}")
    stride_xy = max(1, int(round(LA_STRIDES[0] * min(zoom[:2])))) if stride_xy is None else int(stride_xy)
    stride_z = max(1, int(round(LA_STRIDES[1] * zoom[2]))) if stride_z is None else int(stride_z)
    if stride_xy < 1 or stride_z < 1:
        raise UserError("--stride-xy and --stride-z must be positive")
    sums = src.listed_sums()
    ids = list(src.train_ids) + list(src.test_ids)
    for cid in ids:  # every source file is readable and, where listed, the released one, before anything is written
        if sums is not None and cid in sums and sha256_file(src.case_path(cid)) != sums[cid]:
            raise UserError(f"case {cid}: {src.case_path(cid)} differs from its sha256 in {src.root / SUMS_NAME}; "
                            "restore the release before deriving from it")
    with writing_dataset(out, "deriving") as tmp:
        per_case, lines = {}, []
        for n, cid in enumerate(ids):
            image, label = src.load(cid)
            src._cache.pop(cid, None)  # one case in memory at a time
            try:
                img, lab = derive_case(image, label, zoom)
            except ValueError as exc:
                raise UserError(f"case {cid}: {exc}") from None
            path = tmp / CASES_DIR / cid / H5_NAME
            path.parent.mkdir(parents=True)
            write_case_h5(path, img, lab)  # the bytes of a file-backed h5py write; a full disk is one line
            digest = sha256_file(path)
            per_case[cid] = {"source_shape": list(image.shape), "shape": list(img.shape),
                             "source_foreground_voxels": int(label.sum()), "foreground_voxels": int(lab.sum()),
                             "source_sha256": sha256_file(src.case_path(cid)), "sha256": digest}
            lines.append(f"{digest}  ./{cid}/{H5_NAME}")
            if progress is not None:
                progress(n + 1, len(ids), cid)
        (tmp / "train.list").write_text("".join(i + "\n" for i in src.train_ids))
        (tmp / "test.list").write_text("".join(i + "\n" for i in src.test_ids))
        (tmp / SUMS_NAME).write_text("\n".join(lines) + "\n")
        record = {
            "ssl_bench_dataset": 1,
            "ssl_bench_version": __version__,
            "options": command,
            "source": {"format": "la-release", "folder": str(src.root),
                       "train_list_sha256": sha256_file(src.root / "train.list"),
                       "test_list_sha256": sha256_file(src.root / "test.list"),
                       "listed_sha256_file": sums is not None},
            "preprocessing": [
                {"step": "derive", "zoom": list(zoom), "image": IMAGE_RULE, "label": LABEL_RULE,
                 "shape": "round(source shape * zoom) per axis"},
            ],
            "split": {"method": "the source's train.list and test.list, unchanged", "train": list(src.train_ids),
                      "test": list(src.test_ids), "labeled": "the first N ids of train.list (--labeled N), as for LA"},
            "settings": {"patch": list(patch), "eval_stride_xy": stride_xy, "eval_stride_z": stride_z,
                         "units": "voxel", "units_available": ["voxel"],
                         "note": f"voxel units of the derived grid (zoom {list(zoom)}): distances are not comparable "
                                 "with the release's voxels"},
            "cases": per_case,
            "warnings": [],
        }
        (tmp / DATASET_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
