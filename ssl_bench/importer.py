"""`ssl-bench data import`: a data set in the nnU-Net v2 raw layout -> the layout ssl-bench reads (LA's).

Source (nnU-Net v2 raw; what the Medical Segmentation Decathlon tasks convert to)::

    SRC/dataset.json                     "labels" (name -> value), "file_ending" (default .nii.gz)
    SRC/imagesTr/<case>_0000.nii.gz      one channel per file; --channel picks which (default 0)
    SRC/labelsTr/<case>.nii.gz
    SRC/imagesTs/, SRC/labelsTs/         optional; used as the test set with --test-from imagesTs

Output (the LA release layout, see ssl_bench/data.py)::

    OUT/train.list, OUT/test.list
    OUT/2018LA_Seg_Training Set/<case>/mri_norm2.h5   `image` float32 (z-scored), `label` uint8 {0,1},
                                                      `spacing` float64 (3,) in mm
    OUT/SHA256SUMS.h5.txt                             same format as the LA release / demo
    OUT/ssl_bench_dataset.json                        the record: source, every preprocessing step,
                                                      the split and how it was drawn, per-case
                                                      shapes/spacings, per-data-set settings
                                                      (patch, sliding-window strides, units)

Preprocessing, in this order: optional resampling to a target spacing (scipy.ndimage.zoom, order 1
for the image, order 0 for the label) -> foreground selection (``--label VALUE``, default every
nonzero label) -> optional crop around the label (``--crop-around-label``: USES THE GROUND TRUTH,
test cases included, as the LA release did; labelled so in the record) -> per-volume z-score
``(x - mean) / std``. No other cropping; volumes smaller than the patch are padded by the training
augmentation and the sliding-window evaluation as for LA.

OUT is written to a temporary folder beside it and moved into place only when every case succeeded; a
failed write (a full disk) removes it and is one line.

Bounds (untrusted sizes are checked before anything is allocated): a volume, as the NIfTI header declares it
(the decompressed size of a .nii.gz) and after resampling, has at most ``MAX_VOXELS`` = 512³ voxels
(ssl_bench/data.py); ``dataset.json`` is at most 64 MiB and nested at most a few hundred levels. Case ids must
be plain names (no path separator, newline or other control character, no leading dot).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .data import (CASES_DIR, DATASET_RECORD, H5_NAME, MAX_VOXELS, MAX_VOXELS_TEXT, SUMS_NAME, check_voxels,
                   plain_name_problem, sha256_file, write_case_h5)
from .errors import UserError

RECORD_NAME = DATASET_RECORD
FORMATS = ("nnunet",)
LA_PATCH = (112, 112, 80)
LA_STRIDES = (18, 4)
#: dataset.json is metadata (MSD's lists every case: a few hundred KB); a larger file is not read
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
#: the most a NIfTI file may inflate to: a volume of MAX_VOXELS voxels of 8 bytes, and 64 MiB of header extensions
MAX_NIFTI_BYTES = MAX_VOXELS * 8 + (64 << 20)
#: a label value written as text (MSD's "1": "left atrium", or --label): ASCII digits only, "²" or "--1" are names
_INTEGER = re.compile(r"-?[0-9]+")


def _one_line(exc: BaseException) -> str:
    """An exception as one line (h5py's and nibabel's messages can hold line breaks)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


@contextlib.contextmanager
def writing_dataset(out: Path, tag: str):
    """Write a data set folder atomically: yields a temporary folder beside ``out`` (``.<name>.<tag>-*``), renamed
    to ``out`` when the block succeeds; on any failure it is removed and ``out`` is untouched (a failing write,
    a full disk: one line). Temporary folders a killed writer left behind are removed first."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.{tag}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot create {out} ({_one_line(exc)})") from None
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked by the caller
        os.replace(tmp, out)
    except OSError as exc:  # a full disk, permissions, OUT created meanwhile: nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial data set took
        full = " (the disk is full)" if getattr(exc, "errno", None) == errno.ENOSPC else ""
        raise UserError(f"cannot write {out}{full} ({_one_line(exc)}); nothing was written and the temporary "
                        f"folder is removed") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- reading the source

def _read_dataset_json(src: Path) -> dict:
    path = src / "dataset.json"
    if not path.is_file():
        raise UserError(f"missing dataset.json in {src} (is it an nnU-Net v2 raw data set folder?)")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UserError(f"{path} is {size:,} bytes; a dataset.json is metadata, at most {MAX_JSON_BYTES:,} bytes")
        meta, deep = json.loads(path.read_text()), False
    except RecursionError:  # Python's parser recurses once per level
        meta, deep = None, True
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} ({_one_line(exc)})") from None
    if deep or _depth(meta) > MAX_JSON_DEPTH:  # the record embeds it: json.dumps must not recurse out either
        raise UserError(f"cannot read {path}: it is nested more than {MAX_JSON_DEPTH} levels deep, which no "
                        f"dataset.json is")
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict) or not meta["labels"]:
        raise UserError(f"{path} has no \"labels\" mapping (nnU-Net v2 writes e.g. {{\"background\": 0, \"left atrium\": 1}})")
    return meta


def _depth(obj) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        item, d = todo.pop()
        deepest = max(deepest, d)
        if isinstance(item, dict):
            todo.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, d + 1) for v in item)
    return deepest


def declared_labels(meta: dict) -> dict[int, str]:
    """value -> name from dataset.json; accepts nnU-Net v2 (name -> value) and MSD (\"value\" -> name) styles."""
    out: dict[int, str] = {}
    for key, value in meta["labels"].items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[value] = str(key)
        elif isinstance(value, (list, tuple)):  # nnU-Net region-based labels: not a single value
            continue
        elif isinstance(key, str) and _INTEGER.fullmatch(key.strip()):
            out[int(key)] = str(value)
    if not out:
        raise UserError("dataset.json declares no integer label values")
    return out


def _declared_text(labels: dict[int, str]) -> str:
    """``0=background, 1=atrium``; a name that is not printable (a line break) shown quoted, so it stays one line."""
    return ", ".join(f"{v}={n if n.isprintable() else repr(n)}" for v, n in sorted(labels.items()))


def _foreground_values(label_opt: str | None, labels: dict[int, str]) -> tuple[list[int], str]:
    if label_opt is None:
        fg = sorted(v for v in labels if v != 0)
        if not fg:
            raise UserError("dataset.json declares no nonzero label; nothing to segment")
        return fg, "every nonzero label (binary)"
    text = str(label_opt).strip()
    by_name = {name.lower(): v for v, name in labels.items()}
    if _INTEGER.fullmatch(text):  # ASCII digits: "²" or "--1" is looked up as a name
        value = int(text)
    elif text.lower() in by_name:
        value = by_name[text.lower()]
    else:
        raise UserError(f"--label {label_opt!r}: no such label in dataset.json (declared: "
                        f"{_declared_text(labels)})")
    if value not in labels:
        raise UserError(f"--label {value}: no such label value in dataset.json (declared: "
                        f"{_declared_text(labels)})")
    if value == 0:
        raise UserError("--label 0 is the background; choose a foreground label")
    return [value], f"label {value} ({labels[value]})"


def _cases(src: Path, images: str, labels: str, ending: str, channel: int) -> dict[str, tuple[Path, Path]]:
    """case id -> (image file, label file); an image without a label (or the reverse) is an error."""
    img_dir, lab_dir = src / images, src / labels
    if not img_dir.is_dir():
        raise UserError(f"missing folder {img_dir}")
    if not lab_dir.is_dir():
        raise UserError(f"missing folder {lab_dir} (every training image needs a label)")
    suffix = f"_{channel:04d}{ending}"
    # hidden files (e.g. macOS "._<case>" forks shipped in some Decathlon archives) are not cases
    image_ids = sorted(p.name[: -len(suffix)] for p in img_dir.iterdir()
                       if p.name.endswith(suffix) and not p.name.startswith("."))
    label_ids = sorted(p.name[: -len(ending)] for p in lab_dir.iterdir()
                       if p.name.endswith(ending) and not p.name.startswith("."))
    for cid in image_ids + label_ids:  # before any message prints it: a newline would split that line
        why = plain_name_problem(cid)
        if why:
            where = images if cid in image_ids else labels
            raise UserError(f"case {cid!r} (from {where}/): a case id must be a plain name, and this one is not "
                            f"({why}); rename the file")
    for cid in image_ids:
        if cid not in label_ids:
            raise UserError(f"case {cid}: image {images}/{cid}{suffix} has no label {labels}/{cid}{ending}")
    for cid in label_ids:
        if cid not in image_ids:
            raise UserError(f"case {cid}: label {labels}/{cid}{ending} has no image {images}/{cid}{suffix}")
    if not image_ids:
        raise UserError(f"no images named <case>{suffix} in {img_dir}")
    return {cid: (img_dir / f"{cid}{suffix}", lab_dir / f"{cid}{ending}") for cid in image_ids}


def _inflated_size(path: Path, limit: int) -> int | None:
    """The bytes ``path`` decompresses to (its size when it is not gzip), counted 1 MiB at a time without keeping
    them; None as soon as the count passes ``limit`` (a gzip bomb is stopped there, never allocated)."""
    import gzip

    with open(path, "rb") as raw:
        if raw.read(2) != b"\x1f\x8b":  # not gzip: what is on disk is what is read
            size = os.fstat(raw.fileno()).st_size
            return size if size <= limit else None
    total = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
            if total > limit:
                return None
    return total


def _load_nifti(case_id: str, path: Path, what: str):
    import nibabel as nib

    try:
        if _inflated_size(path, MAX_NIFTI_BYTES) is None:
            raise UserError(f"case {case_id}: {what} {path} decompresses to more than {MAX_NIFTI_BYTES:,} bytes "
                            f"(a volume of at most {MAX_VOXELS_TEXT}); it is not read")
        img = nib.load(str(path))  # the header only: the voxels are read below, after their count is checked
        check_voxels(img.shape, f"case {case_id}: {what} {path} (its header)")
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except UserError:
        raise
    except Exception as exc:  # nibabel raises ImageFileError/OSError/EOFError/zlib errors for damaged files
        raise UserError(f"case {case_id}: cannot read {what} {path} ({_one_line(exc)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"case {case_id}: {what} {path} is not a 3-D volume (shape {data.shape})")
    if len(zooms) != 3 or not all(math.isfinite(z) and z > 0 for z in zooms):
        raise UserError(f"case {case_id}: {what} {path} has no valid voxel spacing ({zooms})")
    return data, affine, zooms


# ---------------------------------------------------------------- preprocessing

def resampled_shape(shape, spacing, target, what: str) -> tuple[int, int, int]:
    """round(shape · spacing / target) per axis (at least 1), refused in one line before anything is allocated when
    it has more than MAX_VOXELS voxels (a 1000 mm voxel resampled to 1 mm would need terabytes)."""
    sizes = [n * (s / t) for n, s, t in zip(shape, spacing, target)]
    if not all(math.isfinite(x) and x <= MAX_VOXELS for x in sizes):
        raise UserError(f"{what}: resampling spacing {tuple(spacing)} to {tuple(target)} mm would give a volume "
                        f"larger than ssl-bench reads or writes (at most {MAX_VOXELS_TEXT}); choose a coarser --spacing")
    new_shape = tuple(max(int(round(x)), 1) for x in sizes)
    check_voxels(new_shape, f"{what}: resampled to --spacing {','.join(f'{t:g}' for t in target)}")
    return new_shape


def _resample(image: np.ndarray, label: np.ndarray, new_shape):
    from scipy import ndimage

    zoom = [n / o for n, o in zip(new_shape, image.shape)]
    image = ndimage.zoom(image.astype(np.float32), zoom, order=1)
    label = ndimage.zoom(label, zoom, order=0)
    return image, label


def _crop_box(label: np.ndarray, margin) -> tuple[slice, ...]:
    idx = np.nonzero(label)
    return tuple(slice(max(int(i.min()) - m, 0), min(int(i.max()) + 1 + m, n))
                 for i, m, n in zip(idx, margin, label.shape))


def _process_case(case_id, img_path, lab_path, fg_values, declared, target_spacing, crop_margin):
    image, img_affine, spacing = _load_nifti(case_id, img_path, "image")
    raw_label, lab_affine, _ = _load_nifti(case_id, lab_path, "label")
    if image.shape != raw_label.shape:
        raise UserError(f"case {case_id}: image shape {image.shape} and label shape {raw_label.shape} differ")
    if not np.allclose(img_affine, lab_affine, rtol=1e-4, atol=1e-3):
        raise UserError(f"case {case_id}: image and label affines differ (they are not on the same voxel grid)")
    if not np.issubdtype(raw_label.dtype, np.integer):
        raw_label = np.asarray(raw_label, dtype=np.float64)
        if not np.isfinite(raw_label).all() or not np.array_equal(raw_label, np.round(raw_label)):
            raise UserError(f"case {case_id}: label {lab_path} has non-integer values")
    raw_label = raw_label.astype(np.int64)
    values = np.unique(raw_label)
    unknown = [int(v) for v in values if int(v) not in declared]
    if unknown:
        raise UserError(f"case {case_id}: label value(s) {unknown[:5]} in {lab_path} are not declared in dataset.json")
    image = np.asarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise UserError(f"case {case_id}: image {img_path} contains NaN or infinite values")
    source_shape = tuple(int(s) for s in image.shape)
    out_spacing = tuple(spacing)
    if target_spacing is not None:
        new_shape = resampled_shape(source_shape, spacing, target_spacing, f"case {case_id}")
        image, raw_label = _resample(image, raw_label, new_shape)
        out_spacing = tuple(float(t) for t in target_spacing)
    label = np.isin(raw_label, fg_values).astype(np.uint8)
    crop = None
    if crop_margin is not None:
        if not label.any():
            raise UserError(f"case {case_id}: --crop-around-label needs a foreground, this label is empty")
        box = _crop_box(label, crop_margin)
        image, label = image[box], label[box]
        crop = [[s.start, s.stop] for s in box]
    std = float(image.std(dtype=np.float64))
    if not std > 0:
        raise UserError(f"case {case_id}: image {img_path} is constant; it cannot be z-score normalised")
    image = ((image - image.mean(dtype=np.float64)) / std).astype(np.float32)
    info = {"source_image": str(img_path), "source_label": str(lab_path), "source_shape": list(source_shape),
            "source_spacing": list(spacing), "shape": [int(s) for s in image.shape], "spacing": list(out_spacing),
            "label_values": [int(v) for v in values], "foreground_voxels": int(label.sum())}
    if crop is not None:
        info["crop_box"] = crop
    return image, label, out_spacing, info


# ---------------------------------------------------------------- the split

def _split(ids_tr: list[str], ids_ts: list[str] | None, test_fraction, test_list, seed: int):
    rng = np.random.default_rng(seed)
    if ids_ts is not None:
        train = [ids_tr[i] for i in rng.permutation(len(ids_tr))]
        return train, list(ids_ts), {"method": "the data set's own imagesTs/labelsTs", "seed": seed,
                                     "train_order": "seeded shuffle of imagesTr"}
    if test_list is not None:
        path = Path(test_list)
        if not path.is_file():
            raise UserError(f"--test-list: file not found: {path}")
        wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not wanted:
            raise UserError(f"--test-list: {path} is empty")
        if len(set(wanted)) != len(wanted):
            raise UserError(f"--test-list: {path} lists a case twice")
        missing = [c for c in wanted if c not in ids_tr]
        if missing:
            raise UserError(f"case {missing[0]}: listed in --test-list {path} but not in imagesTr")
        rest = [c for c in ids_tr if c not in set(wanted)]
        train = [rest[i] for i in rng.permutation(len(rest))]
        return train, wanted, {"method": f"explicit test list {path}", "seed": seed,
                               "train_order": "seeded shuffle of the remaining cases"}
    fraction = 0.2 if test_fraction is None else float(test_fraction)
    if not 0 < fraction < 1:
        raise UserError(f"--test-fraction must be between 0 and 1 (exclusive), got {fraction}")
    perm = [ids_tr[i] for i in rng.permutation(len(ids_tr))]
    n_test = min(max(int(round(fraction * len(perm))), 1), len(perm) - 1)
    return perm[n_test:], perm[:n_test], {"method": f"seeded shuffle, test fraction {fraction}", "seed": seed,
                                          "n_test": n_test}


# ---------------------------------------------------------------- the import

def _triple(value, name: str, kind=float):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parts = tuple(kind(v) for v in value.split(","))
        except ValueError:
            raise UserError(f"{name} must look like three numbers separated by commas, got {value!r}") from None
    else:
        parts = tuple(kind(v) for v in value)
    if len(parts) != 3 or not all(p > 0 and math.isfinite(p) for p in parts):
        raise UserError(f"{name} needs three positive numbers, got {value!r}")
    return parts


def import_nnunet(src, out, *, label: str | None = None, test_fraction: float | None = None,
                  test_list=None, test_from_imagests: bool = False, seed: int = 0, spacing=None,
                  crop_around_label=None, channel: int = 0, patch=None, stride_xy: int | None = None,
                  stride_z: int | None = None, command: dict | None = None) -> dict:
    """Import an nnU-Net v2 raw data set from SRC into OUT (atomically). Returns the record."""
    from . import __version__

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise UserError(f"source folder not found: {src}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new folder")
    chosen = sum(x is not None and x is not False for x in (test_fraction, test_list, test_from_imagests or None))
    if chosen > 1:
        raise UserError("choose one of --test-fraction, --test-list, --test-from imagesTs")
    target = _triple(spacing, "--spacing")
    margin = _triple(crop_around_label, "--crop-around-label", int) if crop_around_label is not None else None
    patch = _triple(patch, "--patch", int) or LA_PATCH
    if any(p < 16 or p % 16 for p in patch):
        raise UserError(f"--patch needs three sizes, each a multiple of 16 (the V-Net halves 4 times), got {patch}")
    stride_xy = LA_STRIDES[0] if stride_xy is None else int(stride_xy)
    stride_z = LA_STRIDES[1] if stride_z is None else int(stride_z)
    if stride_xy < 1 or stride_z < 1:
        raise UserError("--stride-xy and --stride-z must be positive")
    if channel < 0:
        raise UserError(f"--channel must be 0 or more, got {channel}")

    meta = _read_dataset_json(src)
    ending = str(meta.get("file_ending", ".nii.gz"))
    if ending not in (".nii.gz", ".nii"):
        raise UserError(f"dataset.json file_ending {ending!r}: only NIfTI (.nii.gz, .nii) is supported")
    declared = declared_labels(meta)
    fg_values, fg_text = _foreground_values(label, declared)
    cases = _cases(src, "imagesTr", "labelsTr", ending, channel)
    ts_cases = None
    if test_from_imagests:
        if not (src / "imagesTs").is_dir():
            raise UserError(f"--test-from imagesTs: {src / 'imagesTs'} does not exist")
        ts_cases = _cases(src, "imagesTs", "labelsTs", ending, channel)
        both = set(ts_cases) & set(cases)
        if both:
            raise UserError(f"case {sorted(both)[0]}: present in both imagesTr and imagesTs")
    train_ids, test_ids, split_info = _split(sorted(cases), sorted(ts_cases) if ts_cases else None,
                                             test_fraction, test_list, seed)
    if not train_ids:
        raise UserError("the split leaves no training case")
    all_cases = {**cases, **(ts_cases or {})}

    test_set = set(test_ids)
    with writing_dataset(out, "importing") as tmp:
        per_case, sums = {}, []
        for cid in train_ids + test_ids:
            img_path, lab_path = all_cases[cid]
            image, lab, sp, info = _process_case(cid, img_path, lab_path, fg_values, declared, target, margin)
            if cid in test_set and not lab.any():
                raise UserError(f"case {cid}: test case has no foreground ({fg_text}); its surface distances are "
                                f"undefined: leave it out with --test-list, or choose another --label")
            path = tmp / CASES_DIR / cid / H5_NAME
            path.parent.mkdir(parents=True)
            write_case_h5(path, image, lab, sp)  # a full disk: an OSError, one line from writing_dataset
            info["sha256"] = sha256_file(path)
            per_case[cid] = info
            sums.append(f"{info['sha256']}  ./{cid}/{H5_NAME}")
        (tmp / "train.list").write_text("".join(i + "\n" for i in train_ids))
        (tmp / "test.list").write_text("".join(i + "\n" for i in test_ids))
        (tmp / SUMS_NAME).write_text("\n".join(sums) + "\n")
        empty = [c for c, i in per_case.items() if i["foreground_voxels"] == 0]
        record = {
            "ssl_bench_dataset": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "ssl_bench_version": __version__,
            "options": command,
            "source": {"format": "nnunet", "folder": str(src.resolve()), "name": meta.get("name"),
                       "dataset_json": meta, "channel": channel, "file_ending": ending},
            "preprocessing": [
                {"step": "resample", "done": target is not None,
                 "target_spacing": list(target) if target else None,
                 "how": "scipy.ndimage.zoom, order 1 (linear) for the image, order 0 (nearest) for the label; "
                        "output shape = round(shape * source spacing / target spacing)"},
                {"step": "foreground", "values": fg_values, "description": fg_text,
                 "how": "label = 1 where the source label is one of these values, else 0"},
                {"step": "crop_around_label", "done": margin is not None,
                 "margin_voxels": list(margin) if margin else None,
                 "uses_ground_truth": margin is not None,
                 "note": ("USES THE GROUND TRUTH OF EVERY CASE, TEST CASES INCLUDED (as the LA release did); "
                          "test scores on this data set are not comparable with uncropped evaluation")
                         if margin is not None else "no cropping"},
                {"step": "zscore", "done": True, "how": "per volume: (image - mean) / std over the whole volume"},
            ],
            "split": {**split_info, "train": train_ids, "test": test_ids,
                      "labeled": "the first N ids of train.list (--labeled N), as for LA"},
            "settings": {"patch": list(patch), "eval_stride_xy": stride_xy, "eval_stride_z": stride_z,
                         "units": "voxel", "units_available": ["voxel", "mm"],
                         "spacing_stored": "dataset `spacing` (mm, per axis of the stored array) in each h5"},
            "cases": per_case,
            "warnings": [f"{len(empty)} case(s) have an empty foreground: {', '.join(empty[:5])}"] if empty else [],
        }
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record
