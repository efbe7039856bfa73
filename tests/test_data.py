import numpy as np
import pytest
import torch

from ssl_bench.data import LAData, TwoStreamSampler, TrainStream, augment, pad_for_crop, rot_flip
from ssl_bench.errors import UserError

FIRST_16 = ("06SR5RBREL16DQ6M8LWS 0RZDK210BSMWAA6467LU 1D7CUD1955YZPGK8XHJX 1GU15S0GJ6PFNARO469W "
            "1MHBF3G6DCPWHSKG7XCP 23X6SY44VT9KFHR7S7OC 2XL5HSFSE93RMOJDRGR4 38CWS74285MFGZZXR09Z "
            "3C2QTUNI0852XV7ZH4Q1 3DA0T2V6JJ2NLUAV6FWM 4498CA6DZWELOXCBRYRF 45C45I6IXAFGNRO067W9 "
            "4CHFJGF6ZUM7CMZTNFQF 4EPVTT1HPA8U60CDUKXE 57SGAJMLCTCH92QUA0EE 5BHTH9RHH3PQT913I59W").split()


def test_real_splits(la_root):
    data = LAData(la_root)
    s8, s16 = data.split(8), data.split(16)
    assert list(s8.labeled) == FIRST_16[:8] and list(s16.labeled) == FIRST_16
    assert len(s8.unlabeled) == 72 and len(s16.unlabeled) == 64
    assert list(s8.labeled + s8.unlabeled) == data.train_ids
    assert len(s8.test) == 20 and s8.test[0] == "UPT6DX9IQY9JAZ7HJKA7" and s8.test[-1] == "ZQPMJ4XEC5A4BISD45P1"
    assert s8.test == s16.test
    with pytest.raises(UserError, match="between 1 and 80"):
        data.split(81)
    with pytest.raises(UserError):
        data.split(0)


def _volume(shape):
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return torch.from_numpy((x * 10000 + y * 100 + z).astype(np.float32))


def test_rot_flip_gives_the_four_reflections_and_never_a_rotation():
    vol = _volume((5, 7, 3))
    lab = vol.clone()
    outs = {}
    for k in range(4):
        for a in range(2):
            img, l2 = rot_flip(vol, lab, k, a)
            assert torch.equal(img, l2)
            outs.setdefault(img.shape, []).append(img)
    distinct = []
    for imgs in outs.values():
        for img in imgs:
            if not any(img.shape == d.shape and torch.equal(img, d) for d in distinct):
                distinct.append(img)
    assert len(distinct) == 4  # the 8 (k, axis) pairs give 4 reflections, twice each
    rotations = [torch.rot90(vol, k, dims=(0, 1)) for k in range(4)]
    for d in distinct:
        assert not any(d.shape == r.shape and torch.equal(d, r) for r in rotations)
        depth = d.numpy() % 100  # the depth axis is never rotated or flipped
        assert all((depth[..., z] == z).all() for z in range(3))


def test_augment_draws_all_reflections_with_equal_frequency():
    vol = _volume((17, 17, 5))
    rng = np.random.default_rng(0)
    refl = []
    for k in range(4):
        for a in range(2):
            r, _ = rot_flip(vol, vol, k, a)
            if not any(torch.equal(r, q) for q in refl):
                refl.append(r)
    counts = np.zeros(4, int)
    for _ in range(400):
        img, _ = augment(vol, vol, (16, 16, 4), rng)  # s - t = 1 → crop origin always 0
        hits = [i for i, r in enumerate(refl) if torch.equal(img, r[:16, :16, :4])]
        assert len(hits) == 1, "every sample is one of the reflections"
        counts[hits[0]] += 1
        assert not torch.equal(img, vol[:16, :16, :4])  # the original orientation never occurs
    assert counts.min() > 60  # each with probability 1/4


def test_crop_upper_bound_is_exclusive():
    vol = _volume((20, 20, 9))
    rng = np.random.default_rng(1)
    origins = set()
    for _ in range(300):
        img, _ = augment(vol, vol, (16, 16, 6), rng)
        v = int(img[0, 0, 0])
        origins.add(v % 100)  # depth is never rotated or flipped: its origin is readable directly
    assert origins == {0, 1, 2}  # size 9, target 6: {0, 1, 2}, never 3


def test_padding_rule():
    img = torch.ones(10, 20, 30)
    lab = torch.ones(10, 20, 30, dtype=torch.int64)
    p_img, p_lab = pad_for_crop(img, lab, (16, 16, 16))
    # any dim <= target → pad all axes by max((t - s)//2 + 3, 0) per side: 6, 1, 0
    assert p_img.shape == (22, 22, 30) and p_lab.shape == (22, 22, 30)
    assert p_img[:6].abs().sum() == 0 and p_lab[:, :1].sum() == 0
    # a dimension EQUAL to the target also triggers padding (+3 per side)
    assert pad_for_crop(torch.ones(16, 40, 40), torch.ones(16, 40, 40), (16, 16, 16))[0].shape == (22, 40, 40)
    # none <= target: untouched
    assert pad_for_crop(torch.ones(17, 40, 40), torch.ones(17, 40, 40), (16, 16, 16))[0].shape == (17, 40, 40)


def test_two_stream_sampler():
    rng = np.random.default_rng(0)
    s = TwoStreamSampler(5, 7, 2, 3, rng)
    epoch = [s.next() for _ in range(2)]
    lab = [i for b, _ in epoch for i in b]
    assert len(set(lab)) == 4  # floor(5/2) = 2 batches per epoch, the leftover case dropped
    unl = []
    for _ in range(2):
        unl += s.next()[1]
    assert all(len(b) == 2 and len(u) == 3 for b, u in epoch)
    # keep_last: the labeled-only baseline's plain DataLoader keeps a final short batch
    s2 = TwoStreamSampler(5, 0, 2, 0, np.random.default_rng(0), keep_last=True)
    sizes = [len(s2.next()[0]) for _ in range(3)]
    assert sizes == [2, 2, 1]
    with pytest.raises(UserError):
        TwoStreamSampler(1, 7, 2, 2, rng)


def test_sampler_state_roundtrip():
    a = TwoStreamSampler(8, 20, 2, 2, np.random.default_rng(3))
    for _ in range(3):
        a.next()
    rng_state = a.rng.bit_generator.state
    b = TwoStreamSampler(8, 20, 2, 2, np.random.default_rng(99))
    b.load_state_dict(a.state_dict())
    b.rng.bit_generator.state = rng_state
    assert [a.next() for _ in range(10)] == [b.next() for _ in range(10)]


def test_train_stream_batch_is_labeled_first(demo_root):
    data = LAData(demo_root)
    split = data.split(4)
    stream = TrainStream(data, split, (32, 32, 16), 2, 3, seed=0, storage=torch.device("cpu"), device=torch.device("cpu"))
    batch = stream.next()
    assert batch.image.shape == (5, 1, 32, 32, 16) and batch.label.shape == (2, 32, 32, 16)
    assert batch.labeled_image.shape[0] == 2 and batch.unlabeled_image.shape[0] == 3
    assert batch.label.dtype == torch.int64 and set(batch.label.unique().tolist()) <= {0, 1}


def test_demo_is_deterministic(tmp_path):
    from ssl_bench.demo import make_demo
    a = make_demo(tmp_path / "a", n_train=2, n_test=1)
    b = make_demo(tmp_path / "b", n_train=2, n_test=1)
    da, db = LAData(a), LAData(b)
    for cid in da.train_ids + da.test_ids:
        ia, la = da.load(cid)
        ib, lb = db.load(cid)
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)


def test_case_files_are_written_in_memory_then_once_and_read_back(tmp_path):
    """write_case_h5 gives the bytes of a file-backed h5py write (checksums of derived data sets stay), refuses to
    replace an existing file, and a spacing dataset that is not 3 values is one error before it is read."""
    import h5py

    from ssl_bench.data import write_case_h5

    rng = np.random.default_rng(0)
    image = rng.standard_normal((20, 18, 9)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    with h5py.File(tmp_path / "disk.h5", "w", track_order=False) as f:
        f.create_dataset("image", data=image, compression="gzip", track_times=False)
        f.create_dataset("label", data=label, compression="gzip", track_times=False)
        f.create_dataset("spacing", data=np.array([1.0, 2.0, 3.0]), track_times=False)
    write_case_h5(tmp_path / "memory.h5", image, label, (1.0, 2.0, 3.0))
    assert (tmp_path / "memory.h5").read_bytes() == (tmp_path / "disk.h5").read_bytes()
    with pytest.raises(FileExistsError):
        write_case_h5(tmp_path / "memory.h5", image, label)

    root = tmp_path / "LA"
    path = root / "2018LA_Seg_Training Set" / "A" / "mri_norm2.h5"
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f["image"], f["label"], f["spacing"] = image, label, np.ones(10_000)
    (root / "train.list").write_text("A\n")
    (root / "test.list").write_text("B\n")
    with pytest.raises(UserError, match=r"case A: .* has a spacing of shape \(10000,\), not 3 values"):
        LAData(root).spacing("A")
