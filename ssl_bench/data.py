"""The one data layer: the LA release layout, the split, exact reference augmentation, batches.

Layout (docs/methods.md §1.1)::

    ROOT/train.list, ROOT/test.list           one case id per line
    ROOT/2018LA_Seg_Training Set/<ID>/mri_norm2.h5   datasets `image` (float32), `label` ({0,1})
    ROOT/SHA256SUMS.h5.txt                   optional: sha256 per h5, paths relative to the folder above

The root comes from ``--data`` or the ``SSL_BENCH_DATA`` environment variable.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from .dataset_settings import run_defaults_from
from .errors import UserError

ENV_VAR = "SSL_BENCH_DATA"
CASES_DIR = "2018LA_Seg_Training Set"
H5_NAME = "mri_norm2.h5"
SUMS_NAME = "SHA256SUMS.h5.txt"
DATASET_RECORD = "ssl_bench_dataset.json"  # written by `ssl-bench data import` (ssl_bench/importer.py)
#: the largest volume any reader or writer of ssl-bench allocates (512³ = 134,217,728 voxels, 0.5 GiB as float32;
#: an LA scan has about 29 million). Sizes read from a file (an h5 dataset's shape, a NIfTI header, a resampled
#: shape) are checked against it before anything is allocated, so a hostile or damaged file is one line, not
#: an out-of-memory kill
MAX_VOXELS = 512 ** 3
MAX_VOXELS_TEXT = f"{MAX_VOXELS:,} voxels (512³)"


def resolve_root(data: str | os.PathLike | None) -> Path:
    """The data root from the CLI option, else the environment variable; one clear error otherwise."""
    if data is None or str(data) == "":
        data = os.environ.get(ENV_VAR)
        if not data:
            raise UserError(f"no data location: pass --data DIR or set {ENV_VAR}")
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    return root


def plain_name_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot be a case id (it becomes a folder name and a line of a list), or None when it can:
    a plain name has no path separator, no control character (a newline would split a list's line), no
    surrounding blanks, does not start with a dot and fits a file name (255 bytes)."""
    if not case_id or case_id != case_id.strip():
        return "empty, or with blanks around it"
    if "/" in case_id or "\\" in case_id:
        return "it holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 or 0x80 <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in case_id):
        return "it holds a control character or a line break"
    if case_id.startswith("."):
        return "it starts with a dot"
    if len(case_id.encode("utf-8", "surrogateescape")) > 255:
        return "it is longer than a file name may be (255 bytes)"
    return None


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"missing case list: {path}")
    ids = [line.strip() for line in path.read_text(errors="surrogateescape").splitlines() if line.strip()]
    for n, case_id in enumerate(ids, 1):  # an id is a folder under the root: "../x" would read outside it
        why = plain_name_problem(case_id)
        if why:
            raise UserError(f"case list {path}: id {case_id!r} (entry {n}) is not a plain name ({why})")
    if not ids:
        raise UserError(f"empty case list: {path}")
    if len(set(ids)) != len(ids):
        raise UserError(f"duplicate ids in case list: {path}")
    return ids


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_voxels(shape, what: str) -> None:
    """Refuse a volume of more than MAX_VOXELS voxels (one line naming ``what``) before it is allocated."""
    n = 1
    for s in shape:
        n *= max(int(s), 0)
    if n > MAX_VOXELS:
        dims = "×".join(str(int(s)) for s in shape)
        raise UserError(f"{what}: a volume of {dims} = {n:,} voxels is larger than ssl-bench reads or writes "
                        f"(at most {MAX_VOXELS_TEXT})")


def write_case_h5(path: Path, image: np.ndarray, label: np.ndarray, spacing=None) -> None:
    """One case file: ``image`` and ``label`` gzip-compressed (and ``spacing``, if given), without timestamps.

    The HDF5 file is built in memory (h5py's core driver) and written with one plain ``write``, so that a full
    disk is an ordinary OSError (ENOSPC) with nothing of HDF5 left to flush: a file-backed h5py file that fails
    to write crashes the interpreter when it is closed (a segfault, issue 23). The bytes are those of a
    file-backed write (same library, same layout), so derived and imported data sets keep their checksums.
    """
    with h5py.File(path.name, "w", driver="core", backing_store=False, track_order=False) as f:
        f.create_dataset("image", data=image, compression="gzip", track_times=False)
        f.create_dataset("label", data=label, compression="gzip", track_times=False)
        if spacing is not None:
            f.create_dataset("spacing", data=np.asarray(spacing, dtype=np.float64), track_times=False)
        f.flush()
        blob = f.id.get_file_image()
    with open(path, "xb") as out:  # a new file inside the writer's temporary folder, never an existing one
        out.write(blob)


@dataclass(frozen=True)
class Split:
    """Labeled = the first N ids of train.list, unlabeled = the rest, test = test.list (§1.2)."""

    labeled: tuple[str, ...]
    unlabeled: tuple[str, ...]
    test: tuple[str, ...]
    #: the `val` protocol's selection cases (Decision 8): the last K of train.list, inside the unlabeled pool
    val: tuple[str, ...] = ()


def with_validation(split: Split, k: int) -> Split:
    """``split`` with its last K unlabeled cases (= the last K of train.list) as the validation cases.

    They stay in the unlabeled pool, so training sees exactly what `honest` and `literature` see; only their
    labels are new to the run, and those serve model selection alone (docs/methods.md Decision 8).
    """
    if k < 1:
        raise UserError(f"--val-cases must be at least 1, got {k}")
    if k > len(split.unlabeled):
        raise UserError(f"--val-cases {k} is more than the {len(split.unlabeled)} unlabeled cases (train.list minus the "
                        f"{len(split.labeled)} labeled); the validation cases are the last of train.list, never labeled")
    val = split.unlabeled[-k:]
    clash = sorted((set(val) & set(split.labeled)) | (set(val) & set(split.test)))
    if clash:  # cannot happen with distinct ids and disjoint lists; checked because selection must never see them
        raise UserError(f"validation case {clash[0]} is also labeled or a test case")
    return replace(split, val=tuple(val))


#: the lists of a run's split (config.json "split"), in the order they are compared, and the file each comes from
SPLIT_LISTS = (("labeled", "train.list"), ("unlabeled", "train.list"), ("val", "train.list"), ("test", "test.list"))


def split_lists(data: "LAData", config: dict) -> dict[str, list[str]]:
    """The labeled, unlabeled, validation and evaluated test ids that ``data``'s lists give now for a run's settings
    (config.json "config": labeled, protocol, val_cases, eval_cases), as the trainer derives them."""
    from .selection import DEFAULT_VAL_CASES

    val_cases = config.get("val_cases")
    if val_cases is None and config.get("protocol") == "val":
        val_cases = DEFAULT_VAL_CASES  # a folder from before val_cases was recorded
    split = data.split(int(config["labeled"]), int(val_cases or 0))
    eval_cases = config.get("eval_cases")
    test = split.test[:eval_cases] if eval_cases else split.test  # as Trainer.test_ids
    return {"labeled": list(split.labeled), "unlabeled": list(split.unlabeled), "val": list(split.val),
            "test": list(test)}


def check_split(stored: dict, data: "LAData", source: str, what_to_do: str) -> None:
    """A run's recorded split (config.json "split") must be what ``data``'s train.list and test.list give now, id by id
    and in order; else one UserError naming the first differing id and its list. A folder whose config lacks a list
    (an older one: no "unlabeled" or "val") is compared on the lists it has (and its "n_unlabeled" count)."""
    recorded = stored.get("split") if isinstance(stored, dict) else None
    config = stored.get("config") if isinstance(stored, dict) else None
    if not isinstance(recorded, dict) or not isinstance(config, dict) or "labeled" not in config:
        return
    try:
        current = split_lists(data, config)
    except UserError as exc:
        raise UserError(f"split changed: {data.root}'s lists cannot give the split {source} recorded ({exc}); "
                        f"{what_to_do}") from None
    except (TypeError, ValueError):
        return  # a damaged config section is reported where the settings are read
    for key, listed in SPLIT_LISTS:
        ids = recorded.get(key)
        if not isinstance(ids, list):
            continue
        now = current[key]
        for i in range(max(len(ids), len(now))):
            was = ids[i] if i < len(ids) else None
            got = now[i] if i < len(now) else None
            if was != got:
                had = f"{was} as {key} case {i + 1}" if was is not None else f"{len(ids)} {key} cases"
                gives = (f"only {len(now)} {key} cases" if got is None else
                         f"{got} there" if was is not None else f"more, {got} as {key} case {i + 1}")
                raise UserError(f"split changed: {source} recorded {had}, but {data.root / listed} now gives {gives}; "
                                f"{what_to_do}")
    n_unlabeled = recorded.get("n_unlabeled")
    if not isinstance(recorded.get("unlabeled"), list) and isinstance(n_unlabeled, int) \
            and n_unlabeled != len(current["unlabeled"]):
        raise UserError(f"split changed: {source} recorded {n_unlabeled} unlabeled cases, but {data.root / 'train.list'} "
                        f"now gives {len(current['unlabeled'])}; {what_to_do}")


class LAData:
    """Reads and validates cases lazily; each case is read from disk once and cached."""

    def __init__(self, data: str | os.PathLike | None = None):
        self.root = resolve_root(data)
        self.train_ids = _read_list(self.root / "train.list")
        self.test_ids = _read_list(self.root / "test.list")
        overlap = set(self.train_ids) & set(self.test_ids)
        if overlap:
            raise UserError(f"train.list and test.list share ids: {sorted(overlap)[:3]}")
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def case_path(self, case_id: str) -> Path:
        return self.root / CASES_DIR / case_id / H5_NAME

    def split(self, labeled: int, val_cases: int = 0) -> Split:
        """§1.2's split; ``val_cases`` K > 0 (the `val` protocol) also names the last K of train.list as validation."""
        n = len(self.train_ids)
        if not 1 <= labeled <= n:
            raise UserError(f"--labeled must be between 1 and {n} (the training list has {n} cases), got {labeled}")
        if val_cases:
            return with_validation(self.split(labeled), val_cases)
        return Split(tuple(self.train_ids[:labeled]), tuple(self.train_ids[labeled:]), tuple(self.test_ids))

    def _read(self, case_id: str, image: bool) -> tuple[np.ndarray | None, np.ndarray]:
        path = self.case_path(case_id)
        if not path.is_file():
            raise UserError(f"case {case_id}: missing file {path}")
        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in ("image", "label") if k not in f]
                if missing:
                    raise UserError(f"case {case_id}: {path} has no dataset {' or '.join(map(repr, missing))}")
                shape_i, shape_l = f["image"].shape, f["label"].shape
                if len(shape_i) != 3 or shape_i != shape_l:
                    raise UserError(f"case {case_id}: image shape {shape_i} and label shape {shape_l} differ or are not 3-D")
                check_voxels(shape_i, f"case {case_id}: {path}")  # before a compressed dataset is inflated
                img = np.asarray(f["image"][...], dtype=np.float32) if image else None
                label = f["label"][...]
        except UserError:
            raise
        except Exception as exc:  # h5py raises OSError/KeyError/ValueError for damaged files
            raise UserError(f"case {case_id}: cannot read {path} ({type(exc).__name__}: {exc})") from None
        if label.size and (label.min() < 0 or label.max() > 1 or not np.array_equal(label, np.round(label))):
            values = np.unique(label)[:6].tolist()
            raise UserError(f"case {case_id}: label values must be 0 or 1, found {values}")
        if img is not None and not np.isfinite(img).all():
            raise UserError(f"case {case_id}: image contains NaN or infinite values")
        return img, label.astype(np.uint8)

    def load(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(image float32, label uint8 in {0,1}) of one case, validated; one clear error if not."""
        if case_id not in self._cache:
            self._cache[case_id] = self._read(case_id, image=True)
        return self._cache[case_id]

    def check(self, ids) -> None:
        """Validate cases before any output is written: files, datasets, shapes, label values (images are read lazily)."""
        for case_id in ids:
            if case_id not in self._cache:
                self._read(case_id, image=False)

    def dataset_settings(self) -> dict | None:
        """Per-data-set settings of an imported data set (``ssl_bench_dataset.json``: patch, strides, units), or None (LA)."""
        path = self.root / DATASET_RECORD
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            settings = dict(record["settings"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}); re-import the data set") from None
        return settings

    def run_defaults(self) -> dict:
        """The RunConfig fields this data set sets (an imported one: patch, sliding-window strides); {} for LA."""
        return run_defaults_from(self.dataset_settings(), self.root / DATASET_RECORD)

    def spacing(self, case_id: str) -> tuple[float, float, float] | None:
        """Voxel spacing in mm stored in the case's h5 (dataset ``spacing``), or None where absent (the LA release)."""
        path = self.case_path(case_id)
        try:
            with h5py.File(path, "r") as f:
                if "spacing" not in f:
                    return None
                if f["spacing"].size != 3:  # checked before reading: a damaged file could declare any size
                    raise UserError(f"case {case_id}: {path} has a spacing of shape {f['spacing'].shape}, not 3 values")
                sp = np.asarray(f["spacing"][...], dtype=np.float64).ravel()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"case {case_id}: cannot read {path} ({type(exc).__name__}: {exc})") from None
        if sp.shape != (3,) or not np.all(np.isfinite(sp) & (sp > 0)):
            raise UserError(f"case {case_id}: {path} has an invalid spacing {sp.tolist()}")
        return tuple(float(v) for v in sp)

    def require_spacing(self, case_ids) -> None:
        """``--units mm`` needs every evaluated case to store its voxel spacing (an imported data set does; LA does not)."""
        for case_id in case_ids:
            if self.spacing(case_id) is None:
                raise UserError(f"--units mm needs voxel spacings, but case {case_id} ({self.case_path(case_id)}) stores "
                                f"none (the LA release has none; import a data set with `ssl-bench data import`)")

    def listed_sums(self) -> dict[str, str] | None:
        """The sha256 per case id from SHA256SUMS.h5.txt, or None when the file is absent."""
        path = self.root / SUMS_NAME
        if not path.is_file():
            return None
        sums = {}
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            digest, _, name = line.strip().partition("  ")
            parts = Path(name.strip()).parts
            parts = [p for p in parts if p != "."]
            if len(parts) >= 1:
                sums[parts[0]] = digest.strip()
        return sums

    def checksums(self, ids) -> dict[str, str]:
        """Actual sha256 of each case's h5 file (recorded in every run's config)."""
        out = {}
        for case_id in ids:
            path = self.case_path(case_id)
            if not path.is_file():
                raise UserError(f"case {case_id}: missing file {path}")
            out[case_id] = sha256_file(path)
        return out


# ---------------------------------------------------------------- augmentation (§1.3)

def _rot90(x, k: int):
    return np.rot90(x, k, axes=(0, 1)) if isinstance(x, np.ndarray) else torch.rot90(x, k, dims=(0, 1))


def _flip(x, axis: int):
    return np.flip(x, axis=axis) if isinstance(x, np.ndarray) else torch.flip(x, dims=(axis,))


def rot_flip(image: torch.Tensor, label: torch.Tensor, k: int, axis: int):
    """RandomRotFlip: rotate by k·90° in the plane of axes (0,1), then ALWAYS flip along `axis`.

    Tensors (and so the GPU) get copies; numpy arrays get views, so that on the CPU only the crop is ever
    copied (TrainStream: whole-volume copies were most of a batch's host time). Same values either way.
    """
    image = _flip(_rot90(image, k), axis)
    label = _flip(_rot90(label, k), axis)
    return image, label


def pad_for_crop(image: torch.Tensor, label: torch.Tensor, patch):
    """RandomCrop's padding: if ANY dim <= its target, pad all three axes by max((t-s)//2+3, 0) per side."""
    shape = image.shape
    if not any(s <= t for s, t in zip(shape, patch)):
        return image, label
    pads = [max((t - s) // 2 + 3, 0) for s, t in zip(shape, patch)]
    if isinstance(image, np.ndarray):
        width = [(p, p) for p in pads]
        return np.pad(image, width), np.pad(label, width)  # zeros, as F.pad below
    spec = []
    for p in reversed(pads):  # F.pad takes the last axis first
        spec += [p, p]
    image = torch.nn.functional.pad(image[None, None], spec, value=0.0)[0, 0]
    label = torch.nn.functional.pad(label[None, None], spec, value=0)[0, 0]
    return image, label


def augment(image: torch.Tensor, label: torch.Tensor, patch, rng: np.random.Generator):
    """The reference chain RandomRotFlip -> RandomCrop(patch) with its draw order and exclusive upper bound."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))  # drawn after k, as in the reference
    image, label = rot_flip(image, label, k, axis)
    image, label = pad_for_crop(image, label, patch)
    origin = []
    for s, t in zip(image.shape, patch):
        origin.append(int(rng.integers(0, s - t)))  # {0, ..., s-t-1}: the last position is never drawn
    sl = tuple(slice(o, o + t) for o, t in zip(origin, patch))
    return image[sl], label[sl]


# ---------------------------------------------------------------- batches (§1.4)

class TwoStreamSampler:
    """Labeled-first batches: B_L labeled indices, then B_U unlabeled indices.

    The labeled stream is one permutation per epoch of floor(N_L / B_L) batches (leftovers dropped);
    with ``keep_last`` (the V-Net baseline's plain shuffled DataLoader) a final short batch is kept.
    The unlabeled stream is an endless chain of fresh permutations, restarted every labeled epoch,
    as the reference sampler re-creates it on every pass. All draws come from ``rng``.
    """

    def __init__(self, n_labeled: int, n_unlabeled: int, b_labeled: int, b_unlabeled: int,
                 rng: np.random.Generator, keep_last: bool = False):
        if b_labeled < 1 or n_labeled < b_labeled:
            raise UserError(f"this method needs at least {b_labeled} labeled cases per batch, the split has {n_labeled}")
        if b_unlabeled and n_unlabeled < 1:
            raise UserError("this method needs unlabeled cases, but every training case is labeled")
        self.n_labeled, self.n_unlabeled = n_labeled, n_unlabeled
        self.b_labeled, self.b_unlabeled = b_labeled, b_unlabeled
        self.rng, self.keep_last = rng, keep_last
        self._labeled_batches: list[list[int]] = []
        self._unlabeled_queue: list[int] = []

    def next(self) -> tuple[list[int], list[int]]:
        if not self._labeled_batches:
            perm = self.rng.permutation(self.n_labeled).tolist()
            n_full = self.n_labeled // self.b_labeled
            self._labeled_batches = [perm[i * self.b_labeled:(i + 1) * self.b_labeled] for i in range(n_full)]
            if self.keep_last and n_full * self.b_labeled < self.n_labeled:
                self._labeled_batches.append(perm[n_full * self.b_labeled:])
            self._unlabeled_queue = []
        labeled = self._labeled_batches.pop(0)
        unlabeled = []
        while len(unlabeled) < self.b_unlabeled:
            if not self._unlabeled_queue:
                self._unlabeled_queue = self.rng.permutation(self.n_unlabeled).tolist()
            unlabeled.append(self._unlabeled_queue.pop(0))
        return labeled, unlabeled

    def state_dict(self) -> dict:
        return {"labeled_batches": [list(b) for b in self._labeled_batches],
                "unlabeled_queue": list(self._unlabeled_queue)}

    def load_state_dict(self, state: dict) -> None:
        self._labeled_batches = [list(b) for b in state["labeled_batches"]]
        self._unlabeled_queue = list(state["unlabeled_queue"])


@dataclass
class Batch:
    """image: (B_L + B_U, 1, X, Y, Z), labeled first; label: (B_L, X, Y, Z) int64 — unlabeled labels never leave the data layer."""

    image: torch.Tensor
    label: torch.Tensor
    n_labeled: int
    #: the stage's host-side per-batch targets (``Stage.host_targets``, e.g. DTC's signed distances), attached
    #: by ssl_bench.prefetch; empty when none were computed, and a stage then computes them itself
    host_targets: dict = field(default_factory=dict)

    @property
    def labeled_image(self) -> torch.Tensor:
        return self.image[: self.n_labeled]

    @property
    def unlabeled_image(self) -> torch.Tensor:
        return self.image[self.n_labeled:]


class TrainStream:
    """Draws augmented two-stream batches from volumes kept on ``storage`` (the GPU under CUDA)."""

    def __init__(self, data: LAData, split: Split, patch, b_labeled: int, b_unlabeled: int, seed: int,
                 storage: torch.device, device: torch.device, keep_last: bool = False):
        self.data, self.split, self.patch = data, split, tuple(patch)
        self.storage, self.device = storage, device
        self.rng = np.random.default_rng(seed)
        self.sampler = TwoStreamSampler(len(split.labeled), len(split.unlabeled), b_labeled, b_unlabeled,
                                        self.rng, keep_last=keep_last)
        self._volumes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _volume(self, case_id: str):
        if case_id not in self._volumes:
            image, label = self.data.load(case_id)
            if self.storage.type == "cpu":  # numpy: augmentation works on views, only the crop is copied
                self._volumes[case_id] = (image, label)
            else:
                self._volumes[case_id] = (torch.from_numpy(image).to(self.storage),
                                          torch.from_numpy(label).to(self.storage))
        return self._volumes[case_id]

    @staticmethod
    def _stack(parts, dtype=None) -> torch.Tensor:
        if isinstance(parts[0], np.ndarray):
            return torch.from_numpy(np.stack(parts).astype(dtype or parts[0].dtype, copy=False))
        return torch.stack([p if dtype is None else p.long() for p in parts])

    def next(self) -> Batch:
        lab, unl = self.sampler.next()
        ids = [self.split.labeled[i] for i in lab] + [self.split.unlabeled[i] for i in unl]
        images, labels = [], []
        for n, case_id in enumerate(ids):
            image, label = augment(*self._volume(case_id), self.patch, self.rng)
            images.append(image)
            if n < len(lab):
                labels.append(label)
        image = self._stack(images)[:, None].to(self.device, non_blocking=True)
        label = self._stack(labels, np.int64).to(self.device, non_blocking=True)
        return Batch(image.contiguous(), label.contiguous(), len(lab))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.sampler.load_state_dict(state["sampler"])


def verify(data: LAData) -> tuple[list[str], list[str]]:
    """Check every listed case (checksum when listed, readable, shapes, label values).

    Returns (summary lines, problem lines); the caller decides how to report.
    """
    sums = data.listed_sums()
    problems, lines = [], []
    for split_name, ids in (("train", data.train_ids), ("test", data.test_ids)):
        shapes, fg = [], []
        for case_id in ids:
            path = data.case_path(case_id)
            if not path.is_file():
                problems.append(f"{case_id}: missing file {path}")
                continue
            if sums is not None:
                if case_id not in sums:
                    problems.append(f"{case_id}: not listed in {SUMS_NAME}")
                elif sha256_file(path) != sums[case_id]:
                    problems.append(f"{case_id}: sha256 differs from {SUMS_NAME}")
            try:
                image, label = data.load(case_id)
            except UserError as exc:
                problems.append(str(exc))
                continue
            shapes.append(image.shape)
            fg.append(float(label.mean()))
            data._cache.pop(case_id, None)  # verification reads each case once; keep memory flat
        if shapes:
            arr = np.array(shapes)
            lo, hi = arr.min(0).tolist(), arr.max(0).tolist()
            lines.append(f"{split_name}: {len(ids)} listed, {len(shapes)} readable; shape min {tuple(lo)} max {tuple(hi)}; "
                         f"foreground fraction {np.mean(fg):.4f} (min {min(fg):.4f}, max {max(fg):.4f})")
        else:
            lines.append(f"{split_name}: {len(ids)} listed, none readable")
    lines.append(f"checksums: {'checked against ' + SUMS_NAME if sums is not None else SUMS_NAME + ' absent, not checked'}")
    settings = data.dataset_settings()
    if settings is not None:
        lines.append(f"imported data set ({DATASET_RECORD}): patch {tuple(settings.get('patch', ()))}, sliding-window "
                     f"strides {settings.get('eval_stride_xy')}/{settings.get('eval_stride_z')}, "
                     f"units {settings.get('units', 'voxel')}")
    return lines, problems
