"""`ssl-bench data derive`: the LA release at reduced resolution (the CPU track's data).

Expected values are computed here with scipy directly from the arrays the test wrote, not from the
module's helpers.
"""
import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
from scipy import ndimage

from ssl_bench.cli import main
from ssl_bench.data import LAData, verify
from ssl_bench.testing import make_tiny_la

CASES = "2018LA_Seg_Training Set"


def _tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_la(tmp_path / "LA", n_train=6, n_test=2, shape=(25, 24, 20))


def _read(root, cid):
    with h5py.File(root / CASES / cid / "mri_norm2.h5", "r") as f:
        return f["image"][...], f["label"][...]


def test_derive_writes_the_same_cases_at_the_zoom(tiny, tmp_path, capsys):
    out = tmp_path / "LA-z05"
    assert main(["data", "derive", str(tiny), str(out), "--zoom", "0.5"]) == 0
    src = LAData(tiny)
    dst = LAData(out)
    assert (dst.train_ids, dst.test_ids) == (src.train_ids, src.test_ids)
    for cid in src.train_ids + src.test_ids:
        image, label = _read(tiny, cid)
        img, lab = _read(out, cid)
        shape = tuple(round(s * 0.5) for s in image.shape)
        assert img.shape == lab.shape == shape == (12, 12, 10)  # 25 * 0.5 = 12.5 rounds to 12
        assert img.dtype == np.float32 and lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
        factors = [n / s for n, s in zip(shape, image.shape)]
        want_img = ndimage.zoom(image.astype(np.float32), factors, order=1, mode="nearest", grid_mode=False)
        want_lab = ndimage.zoom(label.astype(np.float32), factors, order=1, mode="nearest", grid_mode=False) >= 0.5
        np.testing.assert_array_equal(img, want_img)
        np.testing.assert_array_equal(lab, want_lab.astype(np.uint8))
        assert lab.any()
    record = json.loads((out / "ssl_bench_dataset.json").read_text())
    step = record["preprocessing"][0]
    assert step["zoom"] == [0.5, 0.5, 0.5] and ">= 0.5" in step["label"] and "order 1" in step["image"]
    assert record["settings"] == {**record["settings"], "patch": [64, 64, 32], "eval_stride_xy": 9, "eval_stride_z": 2,
                                  "units": "voxel"}
    for cid, info in record["cases"].items():
        assert info["source_sha256"] == hashlib.sha256((tiny / CASES / cid / "mri_norm2.h5").read_bytes()).hexdigest()
        assert info["sha256"] == hashlib.sha256((out / CASES / cid / "mri_norm2.h5").read_bytes()).hexdigest()
    assert record["source"]["train_list_sha256"] == hashlib.sha256((tiny / "train.list").read_bytes()).hexdigest()
    # run, sweep and report take the derived set's patch and strides; `data verify` passes on it
    assert dst.run_defaults() == {"patch": (64, 64, 32), "eval_stride_xy": 9, "eval_stride_z": 2, "units": "voxel"}
    lines, problems = verify(dst)
    assert problems == [] and "checked against" in lines[-2]
    assert main(["data", "verify", "--data", str(out)]) == 0


def test_derive_is_deterministic_to_the_byte(tiny, tmp_path):
    a, b = tmp_path / "a" / "LA", tmp_path / "b" / "LA"
    for out in (a, b):
        assert main(["data", "derive", str(tiny), str(out), "--zoom", "0.5,0.5,0.25", "--patch", "16,16,16",
                     "--stride-xy", "4", "--stride-z", "2"]) == 0
    ta, tb = _tree(a), _tree(b)
    assert ta.keys() == tb.keys() and len(ta) == 8 + 3 + 1
    assert {k: v for k, v in ta.items()} == {k: v for k, v in tb.items()}
    rec = json.loads((a / "ssl_bench_dataset.json").read_text())
    assert rec["settings"]["patch"] == [16, 16, 16] and rec["preprocessing"][0]["zoom"] == [0.5, 0.5, 0.25]


def _one_line_error(capsys, args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ssl-bench: error:"), (code, err)
    return err[0]


@pytest.mark.parametrize("zoom", ["0", "2", "x", "0.5,0.5", "nan", "0.01"])
def test_an_impossible_zoom_is_one_line(tiny, tmp_path, capsys, zoom):
    assert "--zoom" in _one_line_error(capsys, ["data", "derive", tiny, tmp_path / "o", "--zoom", zoom])
    assert not (tmp_path / "o").exists()


def test_bad_folders_are_one_line_and_nothing_is_written(tiny, tmp_path, capsys):
    before = _tree(tiny)
    assert "not found" in _one_line_error(capsys, ["data", "derive", tmp_path / "nothing", tmp_path / "o"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "not empty" in _one_line_error(capsys, ["data", "derive", tiny, tmp_path / "full"])
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert "source data folder" in _one_line_error(capsys, ["data", "derive", tiny, tiny / "inside"])
    assert "--patch" in _one_line_error(capsys, ["data", "derive", tiny, tmp_path / "o", "--patch", "20,20,20"])
    assert _tree(tiny) == before and not (tmp_path / "o").exists()


def _write_sums(root):
    ids = LAData(root).train_ids + LAData(root).test_ids
    (root / "SHA256SUMS.h5.txt").write_text("".join(
        f"{hashlib.sha256((root / CASES / c / 'mri_norm2.h5').read_bytes()).hexdigest()}  ./{c}/mri_norm2.h5\n"
        for c in ids))


def test_a_changed_source_file_is_refused(tiny, tmp_path, capsys):
    _write_sums(tiny)
    path = tiny / CASES / LAData(tiny).train_ids[1] / "mri_norm2.h5"
    with h5py.File(path, "a") as f:
        f["image"][0, 0, 0] = 123.0
    assert "differs from its sha256" in _one_line_error(capsys, ["data", "derive", tiny, tmp_path / "o"])
    assert not (tmp_path / "o").exists()


def test_a_failure_midway_leaves_nothing_behind(tiny, tmp_path, capsys):
    """A damaged case (here: a label value 2) after some cases were written: no OUT, no temporary folder."""
    ids = LAData(tiny).train_ids
    path = tiny / CASES / ids[3] / "mri_norm2.h5"
    with h5py.File(path, "a") as f:
        f["label"][0, 0, 0] = 2
    # (no SHA256SUMS.h5.txt: the checksum check would refuse the file before anything is written)
    assert "label values" in _one_line_error(capsys, ["data", "derive", tiny, tmp_path / "o"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LA"]


def test_a_stale_temporary_folder_of_a_killed_derive_is_removed(tiny, tmp_path):
    stale = tmp_path / ".o.deriving-abc123"
    stale.mkdir()
    (stale / "junk").write_text("x")
    assert main(["data", "derive", str(tiny), str(tmp_path / "o")]) == 0
    assert not stale.exists() and (tmp_path / "o" / "train.list").is_file()


def test_derive_on_real_la_cases(la_root, tmp_path):
    """Three real cases (2 train, 1 test) copied beside their lists: shapes halve, the atrium stays the atrium."""
    src = tmp_path / "LA"
    ids = LAData(la_root)
    train, test = ids.train_ids[:2], ids.test_ids[:1]
    for cid in train + test:
        (src / CASES / cid).mkdir(parents=True)
        shutil.copyfile(la_root / CASES / cid / "mri_norm2.h5", src / CASES / cid / "mri_norm2.h5")
    (src / "train.list").write_text("".join(c + "\n" for c in train))
    (src / "test.list").write_text("".join(c + "\n" for c in test))
    out = tmp_path / "LA-z05"
    assert main(["data", "derive", str(src), str(out)]) == 0
    for cid in train + test:
        image, label = _read(src, cid)
        img, lab = _read(out, cid)
        assert lab.shape == tuple(round(s / 2) for s in label.shape)
        assert abs(lab.mean() - label.mean()) < 0.01  # the foreground share is kept
        # the derived atrium is the source's, subsampled: nearly every derived foreground voxel maps onto it
        hits = label[::2, ::2, ::2][: lab.shape[0], : lab.shape[1], : lab.shape[2]][lab.astype(bool)]
        assert hits.mean() > 0.9
        assert abs(float(img.mean()) - float(image.mean())) < 0.05


def test_the_label_rule_is_the_50_percent_rule_not_nearest_neighbour():
    """On a random mask the declared rule (trilinear of the mask >= 0.5) and nearest neighbour differ; derive
    follows the rule, voxel for voxel."""
    from ssl_bench.derive import derive_case

    rng = np.random.default_rng(0)
    label = (rng.random((25, 24, 20)) < 0.5).astype(np.uint8)
    image = rng.standard_normal((25, 24, 20)).astype(np.float32)
    _, lab = derive_case(image, label, (0.5, 0.5, 0.5))
    factors = [n / s for n, s in zip((12, 12, 10), label.shape)]
    rule = ndimage.zoom(label.astype(np.float32), factors, order=1, mode="nearest", grid_mode=False) >= 0.5
    nearest = ndimage.zoom(label.astype(np.float32), factors, order=0, mode="nearest", grid_mode=False) >= 0.5
    assert (rule != nearest).sum() > 50
    np.testing.assert_array_equal(lab, rule.astype(np.uint8))
