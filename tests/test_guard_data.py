"""Guards for the data pipeline (docs/methods.md §1.2-§1.4): these tests fail when the science breaks.

Every expectation here is computed independently of ssl_bench.data:
- volumes whose intensities encode their own coordinates (0 is reserved for padding) and labels
  that are a fixed random function (lookup table) of the same coordinates, so any misalignment
  between image and label, any wrong crop or padding shows up voxel by voxel;
- a plain numpy re-implementation of the reference chain RandomRotFlip -> RandomCrop with the
  draw order of §1.3 (k = integers(0, 4), then axis = integers(0, 2), rotation in the plane of
  axes (0, 1), ALWAYS a flip, pad all axes by max((t - s)//2 + 3, 0) per side when any s <= t,
  crop origin from integers(0, s - t), upper bound exclusive), replayed on the same seed;
- hand-made LA-layout data sets whose every voxel says which case (and where in it) it came from;
- counting properties of the two-stream sampler (§1.4) over many batches;
- resumed streams compared tensor by tensor with uninterrupted ones.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ssl_bench.data import LAData, TrainStream, TwoStreamSampler, augment

CPU = torch.device("cpu")
CASES_DIR = "2018LA_Seg_Training Set"  # written out here on purpose: the layout is the spec (§1.1)
H5_NAME = "mri_norm2.h5"


# ---------------------------------------------------------------- independent helpers

def coord_volume(shape, base: int = 100, dtype=np.float32, offset: int = 0) -> np.ndarray:
    """offset + 1 + x*base² + y*base + z: every voxel names its own coordinates; 0 never occurs."""
    assert all(s < base for s in shape)
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.int64) for s in shape], indexing="ij")
    v = offset + 1 + x * base * base + y * base + z
    assert v.max() < (1 << 24) or dtype != np.float32  # exact in float32
    return v.astype(dtype)


def decode(values: np.ndarray, base: int = 100):
    """Inverse of coord_volume (offset 0) for the non-padding voxels: (pad mask, x, y, z)."""
    v = np.asarray(values).astype(np.int64)
    pad = v == 0
    w = v - 1
    return pad, w // (base * base), (w // base) % base, w % base


def label_table(shape, seed: int) -> np.ndarray:
    """A label that is a fixed random function of the coordinates: any misplacement shows."""
    return np.random.default_rng(seed).integers(0, 2, shape).astype(np.uint8)


def reference_augment(image: np.ndarray, label: np.ndarray, patch, rng: np.random.Generator):
    """docs/methods.md §1.3, written out in numpy: RandomRotFlip then RandomCrop, one shared rng."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))  # drawn after k
    image = np.flip(np.rot90(image, k, axes=(0, 1)), axis=axis)
    label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
    if any(s <= t for s, t in zip(image.shape, patch)):  # less-OR-EQUAL triggers padding
        pads = [max((t - s) // 2 + 3, 0) for s, t in zip(image.shape, patch)]  # all three axes
        image = np.pad(image, [(p, p) for p in pads], mode="constant", constant_values=0)
        label = np.pad(label, [(p, p) for p in pads], mode="constant", constant_values=0)
    origin = [int(rng.integers(0, s - t)) for s, t in zip(image.shape, patch)]  # exclusive upper bound
    sl = tuple(slice(o, o + t) for o, t in zip(origin, patch))
    return np.ascontiguousarray(image[sl]), np.ascontiguousarray(label[sl]), (k, axis, origin)


def check_alignment(out_img: np.ndarray, out_lab: np.ndarray, table: np.ndarray, base: int = 100):
    """Each output label voxel = the label function at the coordinates decoded from the image voxel."""
    pad, x, y, z = decode(out_img, base)
    assert (out_lab[pad] == 0).all(), "padding voxels must carry label 0"
    real = ~pad
    assert real.any(), "a crop always contains some of the volume"
    xs, ys, zs = x[real], y[real], z[real]
    assert (xs >= 0).all() and (ys >= 0).all() and (zs >= 0).all()
    assert (xs < table.shape[0]).all() and (ys < table.shape[1]).all() and (zs < table.shape[2]).all()
    np.testing.assert_array_equal(out_lab[real], table[xs, ys, zs],
                                  err_msg="label voxel does not belong to the image voxel beside it")
    # the decoded coordinates of a crop of a reflected volume are all distinct (no voxel duplicated)
    codes = out_img[real].astype(np.int64)
    assert np.unique(codes).size == codes.size


PATCH = (8, 10, 6)  # x != y, so a quarter rotation changes which axis is cropped how
SHAPES = [
    (8, 10, 6),    # equal to the patch: padding (+3 every side) must happen
    (10, 8, 6),    # equal after an odd rotation; depth equal always
    (5, 13, 9),    # x smaller: all three axes padded, y and z (larger) by (t - s)//2 + 3 = 1
    (12, 7, 20),   # smaller in y; z much larger (pad 0); x = t+4 (pad (t-s)//2+3 = 1)
    (20, 16, 11),  # larger everywhere: no padding in any orientation
    (11, 11, 7),   # s = t+1 (unrotated x, z): crop origin along those axes can only be 0
    (3, 4, 2),     # far smaller than the patch
]


# ---------------------------------------------------------------- 1. image/label alignment

@pytest.mark.parametrize("shape", SHAPES)
def test_augment_keeps_label_on_its_image_voxel_and_matches_reference_chain(shape):
    table = label_table(shape, seed=sum(shape))
    img_np = coord_volume(shape)
    img, lab = torch.from_numpy(img_np), torch.from_numpy(table)
    seen_k, seen_axis = set(), set()
    for seed in range(48):
        out_img, out_lab = augment(img, lab, PATCH, np.random.default_rng(seed))
        out_img, out_lab = out_img.numpy(), out_lab.numpy()
        assert out_img.shape == PATCH and out_lab.shape == PATCH
        assert out_img.dtype == np.float32 and out_lab.dtype == np.uint8
        check_alignment(out_img, out_lab, table)
        exp_img, exp_lab, (k, axis, _) = reference_augment(img_np, table, PATCH, np.random.default_rng(seed))
        np.testing.assert_array_equal(out_img, exp_img, err_msg=f"image crop differs from §1.3 (seed {seed})")
        np.testing.assert_array_equal(out_lab, exp_lab, err_msg=f"label crop differs from §1.3 (seed {seed})")
        seen_k.add(k)
        seen_axis.add(axis)
    assert seen_k == {0, 1, 2, 3} and seen_axis == {0, 1}  # the replay exercised every branch


def test_augment_rng_consumption_matches_reference():
    """Several augmentations from ONE rng (as TrainStream does): the draws stay in lock-step."""
    rng_a, rng_b = np.random.default_rng(2024), np.random.default_rng(2024)
    for i in range(60):
        shape = SHAPES[i % len(SHAPES)]
        table = label_table(shape, seed=i)
        img_np = coord_volume(shape)
        out_img, out_lab = augment(torch.from_numpy(img_np), torch.from_numpy(table), PATCH, rng_a)
        exp_img, exp_lab, _ = reference_augment(img_np, table, PATCH, rng_b)
        np.testing.assert_array_equal(out_img.numpy(), exp_img)
        np.testing.assert_array_equal(out_lab.numpy(), exp_lab)
    assert rng_a.integers(0, 1 << 30) == rng_b.integers(0, 1 << 30)  # same number of draws consumed


def test_crop_origin_distribution_and_padding_geometry():
    """Direct, replay-free facts of §1.3 read off the coordinate encoding."""
    # depth is never rotated or flipped, so the z-origin is readable from the first voxel.
    # size 9, target 6, other axes large: origins {0, 1, 2}; 3 (= s - t) is never drawn.
    vol = torch.from_numpy(coord_volume((30, 30, 9)))
    z0 = set()
    for seed in range(120):
        out, _ = augment(vol, vol.to(torch.uint8), PATCH, np.random.default_rng(seed))
        _, _, _, z = decode(out.numpy())
        z0.add(int(z[0, 0, 0]))
        assert (np.diff(z, axis=2) == 1).all()  # depth order preserved
    assert z0 == {0, 1, 2}
    # a volume EQUAL to the patch is padded by 3 per side on every axis (padded size t + 6) and
    # the origin o is drawn from {0..5}; in the crop the real rows along an axis start at
    # max(3 - o, 0) and leave max(o - 3, 0) padding rows at the end, so o = 3 - first + trailing.
    patch = (8, 8, 6)  # square in-plane: every rotation leaves the shape equal to the patch
    vol = torch.from_numpy(coord_volume(patch))
    origins = [set(), set(), set()]
    for seed in range(200):
        out, lab = augment(vol, vol.to(torch.uint8), patch, np.random.default_rng(seed))
        real = out.numpy() != 0
        assert (lab.numpy()[~real] == 0).all()
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            idx = np.flatnonzero(real.any(axis=other))
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # one contiguous block
            first, trailing = int(idx[0]), int(patch[ax] - 1 - idx[-1])
            assert first == 0 or trailing == 0
            origins[ax].add(3 - first + trailing)
    assert all(o == set(range(6)) for o in origins), origins  # {0..5}: never 6 (exclusive bound)


def test_real_cases_label_crop_is_label_of_image_crop(la_root):
    root = Path(la_root)
    ids = [line.strip() for line in (root / "train.list").read_text().splitlines() if line.strip()][:2]
    for n, case_id in enumerate(ids):
        with h5py.File(root / CASES_DIR / case_id / H5_NAME, "r") as f:
            image = np.asarray(f["image"][...], dtype=np.float32)
            label = np.asarray(f["label"][...]).astype(np.uint8)
        img_t, lab_t = torch.from_numpy(image), torch.from_numpy(label)
        coords = coord_volume(image.shape, base=1000, dtype=np.int64)
        coords_t = torch.from_numpy(coords)
        # the paper patch (no padding: 88 > 80) and one whose depth EQUALS the volume's (padding)
        for patch in [(112, 112, 80), (96, 96, image.shape[2])]:
            for seed in range(3):
                s = 1000 * n + seed
                out_img, out_lab = augment(img_t, lab_t, patch, np.random.default_rng(s))
                exp_img, exp_lab, _ = reference_augment(image, label, patch, np.random.default_rng(s))
                np.testing.assert_array_equal(out_img.numpy(), exp_img)
                np.testing.assert_array_equal(out_lab.numpy(), exp_lab)
                # the same draws applied to the coordinate volume say where each image voxel came
                # from: the label voxel beside it must be the real label at exactly that place
                out_coord, out_lab2 = augment(coords_t, lab_t, patch, np.random.default_rng(s))
                assert torch.equal(out_lab2, out_lab)
                pad, x, y, z = decode(out_coord.numpy(), base=1000)
                real = ~pad
                np.testing.assert_array_equal(out_img.numpy()[real], image[x[real], y[real], z[real]])
                np.testing.assert_array_equal(out_lab.numpy()[real], label[x[real], y[real], z[real]])
                assert (out_lab.numpy()[pad] == 0).all() and (out_img.numpy()[pad] == 0).all()
                assert out_lab.numpy()[real].any()  # the crop is not all background here


# ---------------------------------------------------------------- hand-made LA-layout data

CASE_BASE = 1_000_000  # image = code * CASE_BASE + coord encoding (base 100); exact in float32
# file order deliberately not sorted: the split must follow train.list order (§1.2)
TRAIN_IDS = ["K7TRAIN", "A1TRAIN", "Q9TRAIN", "C3TRAIN", "Z0TRAIN", "B5TRAIN", "M2TRAIN", "D8TRAIN", "H4TRAIN"]
TEST_IDS = ["T1TEST", "T0TEST", "T2TEST"]
CASE_SHAPES = [(8, 10, 6), (12, 14, 9), (5, 13, 9), (14, 7, 11), (16, 16, 8), (9, 11, 7), (10, 12, 6),
               (6, 6, 5), (13, 12, 10), (11, 12, 8), (12, 11, 9), (15, 13, 7)]


def _case_arrays(code: int, shape):
    image = coord_volume(shape, offset=code * CASE_BASE)
    return image, label_table(shape, seed=100 + code)


@pytest.fixture(scope="module")
def handmade_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guard_la")
    for code, (case_id, shape) in enumerate(zip(TRAIN_IDS + TEST_IDS, CASE_SHAPES), start=1):
        image, label = _case_arrays(code, shape)
        path = root / CASES_DIR / case_id / H5_NAME
        path.parent.mkdir(parents=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label)
    (root / "train.list").write_text("".join(i + "\n" for i in TRAIN_IDS))
    (root / "test.list").write_text("".join(i + "\n" for i in TEST_IDS))
    return root


def _trace(sample: np.ndarray):
    """(case id, pad mask, x, y, z) of one augmented sample; every real voxel must be one case."""
    v = sample.astype(np.int64)
    pad = v == 0
    codes = np.unique(v[~pad] // CASE_BASE)
    assert codes.size == 1, f"a sample mixes cases {codes.tolist()}"
    code = int(codes[0])
    ids = TRAIN_IDS + TEST_IDS
    assert 1 <= code <= len(ids)
    _, x, y, z = decode(np.where(pad, 0, v - code * CASE_BASE))
    return ids[code - 1], pad, x, y, z


def _stream(root, labeled, b_l, b_u, seed, keep_last=False):
    data = LAData(root)
    return TrainStream(data, data.split(labeled), PATCH, b_l, b_u, seed=seed, storage=CPU, device=CPU,
                       keep_last=keep_last)


@pytest.mark.parametrize("labeled,b_l,b_u", [(4, 2, 3), (7, 2, 2), (3, 3, 1)])
def test_every_batch_sample_traces_to_a_case_of_the_right_stream(handmade_root, labeled, b_l, b_u):
    stream = _stream(handmade_root, labeled, b_l, b_u, seed=labeled)
    lab_ids, unl_ids = TRAIN_IDS[:labeled], TRAIN_IDS[labeled:]
    seen_l, seen_u = set(), set()
    for _ in range(40):
        batch = stream.next()
        assert batch.n_labeled == b_l
        assert batch.image.shape == (b_l + b_u, 1) + PATCH and batch.label.shape == (b_l,) + PATCH
        assert batch.label.dtype == torch.int64
        images, labels = batch.image[:, 0].numpy(), batch.label.numpy()
        batch_l = []
        for i in range(b_l + b_u):
            case_id, pad, x, y, z = _trace(images[i])
            assert case_id not in TEST_IDS, "a test case reached training"
            if i < b_l:
                assert case_id in lab_ids, f"labeled slot {i} holds {case_id}, not one of the first {labeled} ids"
                batch_l.append(case_id)
                seen_l.add(case_id)
                code = (TRAIN_IDS + TEST_IDS).index(case_id) + 1
                shape = CASE_SHAPES[code - 1]
                table = label_table(shape, seed=100 + code)
                assert (labels[i][pad] == 0).all()
                np.testing.assert_array_equal(labels[i][~pad], table[x[~pad], y[~pad], z[~pad]],
                                              err_msg=f"the label of slot {i} is not {case_id}'s label at these voxels")
            else:
                assert case_id in unl_ids, f"unlabeled slot {i} holds {case_id}, not one of train.list[{labeled}:]"
                seen_u.add(case_id)
        assert len(set(batch_l)) == b_l  # one labeled permutation per epoch: no case twice in a batch
    assert seen_l == set(lab_ids) and seen_u == set(unl_ids)  # both streams really are drawn from


# ---------------------------------------------------------------- 3. the two-stream sampler (§1.4)

def _is_perm(seq, n):
    return sorted(seq) == list(range(n))


def test_sampler_labeled_epochs_drop_leftovers_and_unlabeled_never_repeats_within_an_epoch():
    s = TwoStreamSampler(5, 7, 2, 3, np.random.default_rng(11))
    per_epoch = 5 // 2  # floor: the leftover labeled case is dropped
    dropped = []
    orders = set()
    first_unl = set()
    for _ in range(150):
        batches = [s.next() for _ in range(per_epoch)]
        assert all(len(lab) == 2 and len(unl) == 3 for lab, unl in batches)
        lab = [i for b, _ in batches for i in b]
        unl = [i for _, u in batches for i in u]
        assert len(set(lab)) == 4 and set(lab) <= set(range(5))
        dropped.append((set(range(5)) - set(lab)).pop())
        orders.add(tuple(lab))
        # 6 unlabeled draws from a pool of 7 in one labeled epoch: a fresh permutation, no repeat
        assert len(set(unl)) == 6 and set(unl) <= set(range(7)), unl
        first_unl.add(unl[0])
    counts = np.bincount(dropped, minlength=5)
    assert counts.min() >= 15, counts  # each case is the dropped leftover ~1/5 of the time
    assert len(orders) > 50 and first_unl == set(range(7))  # fresh permutations, not a fixed order


def test_sampler_unlabeled_permutations_restart_every_labeled_epoch():
    # 10 labeled / 2 → 5 batches per epoch → 15 unlabeled draws from a pool of 7: the draws of
    # each labeled epoch are perm, perm, first of a third perm; the chain restarts at every epoch
    s = TwoStreamSampler(10, 7, 2, 3, np.random.default_rng(5))
    for _ in range(40):
        batches = [s.next() for _ in range(5)]
        lab = [i for b, _ in batches for i in b]
        unl = [i for _, u in batches for i in u]
        assert _is_perm(lab, 10)  # 10 divisible by 2: every case once per epoch
        assert len(unl) == 15
        assert _is_perm(unl[0:7], 7) and _is_perm(unl[7:14], 7), unl
        assert 0 <= unl[14] < 7


def test_sampler_unlabeled_chain_refills_mid_batch():
    # 8 labeled / 2 → 4 batches per epoch, 3 unlabeled per batch → 12 draws over a pool of 5: the
    # permutation runs out inside a batch and a fresh one continues it
    s = TwoStreamSampler(8, 5, 2, 3, np.random.default_rng(9))
    for _ in range(30):
        unl = [i for _ in range(4) for i in s.next()[1]]
        assert _is_perm(unl[0:5], 5) and _is_perm(unl[5:10], 5)
        assert len(set(unl[10:12])) == 2


def test_sampler_keep_last_keeps_the_short_batch():
    s = TwoStreamSampler(5, 0, 2, 0, np.random.default_rng(3), keep_last=True)
    orders = set()
    for _ in range(40):
        batches = [s.next() for _ in range(3)]
        assert [len(b) for b, _ in batches] == [2, 2, 1]
        assert all(u == [] for _, u in batches)
        lab = [i for b, _ in batches for i in b]
        assert _is_perm(lab, 5)  # nothing dropped with keep_last
        orders.add(tuple(lab))
    assert len(orders) > 20
    # divisible: no empty trailing batch
    s = TwoStreamSampler(4, 0, 2, 0, np.random.default_rng(3), keep_last=True)
    for _ in range(20):
        batches = [s.next()[0] for _ in range(2)]
        assert [len(b) for b in batches] == [2, 2] and _is_perm(batches[0] + batches[1], 4)
    # without keep_last the same set drops the leftover: every batch is full
    s = TwoStreamSampler(5, 0, 2, 0, np.random.default_rng(3))
    assert all(len(s.next()[0]) == 2 for _ in range(60))


# ---------------------------------------------------------------- 4. resume determinism

def _same(a, b):
    return a.n_labeled == b.n_labeled and torch.equal(a.image, b.image) and torch.equal(a.label, b.label)


def _roundtrip_torch(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=False)


def _roundtrip_json(state):
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_resumed_stream_draws_the_uninterrupted_batches(handmade_root, k):
    labeled, b_l, b_u, seed, more = 4, 2, 3, 17, 6
    reference = _stream(handmade_root, labeled, b_l, b_u, seed)
    uninterrupted = [reference.next() for _ in range(k + more)]

    first = _stream(handmade_root, labeled, b_l, b_u, seed)
    before = [first.next() for _ in range(k)]
    assert all(_same(a, b) for a, b in zip(before, uninterrupted))  # same seed → same batches
    state = first.state_dict()
    # the saved state is a snapshot: drawing on from the saved stream must not change it
    for _ in range(4):
        first.next()

    for how, transform in [("in memory", lambda s: s), ("torch.save", _roundtrip_torch), ("json", _roundtrip_json)]:
        for fresh_seed in (seed, seed + 1000):  # the state alone decides, whatever the fresh seed
            resumed = _stream(handmade_root, labeled, b_l, b_u, fresh_seed)
            resumed.load_state_dict(transform(state))
            after = [resumed.next() for _ in range(more)]
            for j, (a, b) in enumerate(zip(after, uninterrupted[k:])):
                assert _same(a, b), f"batch {k + j} after resume ({how}, fresh seed {fresh_seed}) differs"


def test_resumed_sampler_continues_both_streams():
    """The sampler alone (shared rng restored by its owner): labeled epoch and unlabeled queue."""
    def make(seed):
        rng = np.random.default_rng(seed)
        return rng, TwoStreamSampler(5, 7, 2, 3, rng)

    rng_a, a = make(4)
    seq = [a.next() for _ in range(12)]
    for k in (1, 3, 5):  # mid-epoch, unlabeled queue partly used
        rng_b, b = make(4)
        for _ in range(k):
            b.next()
        state = json.loads(json.dumps({"rng": rng_b.bit_generator.state, "sampler": b.state_dict()}))
        rng_c, c = make(99)
        rng_c.bit_generator.state = state["rng"]
        c.load_state_dict(state["sampler"])
        assert [c.next() for _ in range(12 - k)] == seq[k:]
