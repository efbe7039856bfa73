"""`ssl-bench data import --format nnunet`: a tiny nnU-Net v2 raw data set written as NIfTI here.

Every expected value is computed in the test from the NIfTI arrays it wrote (plain numpy), not from
the importer's helpers.
"""
import hashlib
import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from ssl_bench.cli import main

SPACING = (1.25, 1.25, 2.5)
CASES_DIR = "2018LA_Seg_Training Set"


def run_cli(*args):
    return main([str(a) for a in args])


def _volume(rng, shape):
    """Image and a label with value 1 (a box, the 'atrium') and value 2 (a smaller box elsewhere)."""
    label = np.zeros(shape, np.uint8)
    label[4:14, 5:15, 3:9] = 1
    label[shape[0] - 6:shape[0] - 2, 2:6, 1:4] = 2
    image = 300.0 + 40.0 * rng.standard_normal(shape) + 200.0 * (label == 1) + 100.0 * (label == 2)
    return image.astype(np.float32), label


def _affine(spacing=SPACING):
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = (-10.0, 5.0, 2.0)
    return aff


def _save(arr, path, affine):
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def make_nnunet(root, n_train=6, n_test=0, labels=None, seed=0):
    """SRC/dataset.json, imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz[, imagesTs, labelsTs]."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if n_test else ()):
        (root / sub).mkdir(parents=True)
    truth = {}
    for i in range(n_train + n_test):
        cid = f"syn_{i:03d}"
        shape = (24 + 2 * (i % 3), 20 + (i % 2), 12)
        image, label = _volume(rng, shape)
        tr = "Tr" if i < n_train else "Ts"
        _save(image, root / f"images{tr}" / f"{cid}_0000.nii.gz", _affine())
        _save(label, root / f"labels{tr}" / f"{cid}.nii.gz", _affine())
        truth[cid] = (image, label)
    meta = {"name": "Synthetic", "channel_names": {"0": "MRI"},
            "labels": labels or {"background": 0, "atrium": 1, "other": 2},
            "numTraining": n_train, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return truth


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "Dataset001_Syn"
    truth = make_nnunet(root)
    return root, truth


def _read_h5(out, cid):
    with h5py.File(out / CASES_DIR / cid / "mri_norm2.h5", "r") as f:
        return f["image"][...], f["label"][...], f["spacing"][...]


def _lines(path):
    return [x for x in path.read_text().splitlines() if x.strip()]


def test_import_writes_the_la_layout_zscored_binary_with_spacing_and_checksums(src, tmp_path, capsys):
    root, truth = src
    out = tmp_path / "OUT"
    assert run_cli("data", "import", "--format", "nnunet", root, out, "--test-fraction", 0.34, "--seed", 3) == 0
    train, test = _lines(out / "train.list"), _lines(out / "test.list")
    assert sorted(train + test) == sorted(truth) and not set(train) & set(test)
    assert len(test) == round(0.34 * 6)
    sums = {}
    for line in _lines(out / "SHA256SUMS.h5.txt"):
        digest, name = line.split("  ")
        assert name.startswith("./") and name.endswith("/mri_norm2.h5")
        sums[name.split("/")[1]] = digest
    for cid, (image, label) in truth.items():
        img, lab, sp = _read_h5(out, cid)
        assert img.dtype == np.float32 and lab.dtype == np.uint8
        expected = (image.astype(np.float64) - image.mean(dtype=np.float64)) / image.std(dtype=np.float64)
        np.testing.assert_allclose(img, expected, atol=1e-5)
        np.testing.assert_array_equal(lab, (label > 0).astype(np.uint8))  # default: every nonzero label
        np.testing.assert_allclose(sp, SPACING)
        h = hashlib.sha256((out / CASES_DIR / cid / "mri_norm2.h5").read_bytes()).hexdigest()
        assert sums[cid] == h
    record = json.loads((out / "ssl_bench_dataset.json").read_text())
    assert record["split"]["train"] == train and record["split"]["test"] == test and record["split"]["seed"] == 3
    assert record["settings"]["patch"] == [112, 112, 80]
    assert (record["settings"]["eval_stride_xy"], record["settings"]["eval_stride_z"]) == (18, 4)
    steps = {s["step"]: s for s in record["preprocessing"]}
    assert steps["crop_around_label"]["done"] is False and steps["crop_around_label"]["uses_ground_truth"] is False
    assert steps["resample"]["done"] is False and steps["foreground"]["values"] == [1, 2]
    capsys.readouterr()
    assert run_cli("data", "verify", "--data", out) == 0
    said = capsys.readouterr().out
    assert said.strip().endswith("ok") and "checked against SHA256SUMS.h5.txt" in said and "patch (112, 112, 80)" in said


def test_same_seed_same_split_and_bytes_other_seed_other_order(src, tmp_path):
    root, _ = src
    for name, seed in (("a", 0), ("b", 0), ("c", 1), ("d", 2)):
        assert run_cli("data", "import", "--format", "nnunet", root, tmp_path / name, "--seed", seed) == 0
    lists = {n: (_lines(tmp_path / n / "train.list"), _lines(tmp_path / n / "test.list")) for n in "abcd"}
    assert lists["a"] == lists["b"]
    assert (tmp_path / "a/SHA256SUMS.h5.txt").read_text() == (tmp_path / "b/SHA256SUMS.h5.txt").read_text()
    assert lists["c"] != lists["a"] or lists["d"] != lists["a"]  # the seed orders the shuffle
    assert len(lists["a"][1]) == round(0.2 * 6)  # default test fraction


def test_label_option_selects_one_foreground_value(src, tmp_path):
    root, truth = src
    (root / "imagesTr" / "._syn_000_0000.nii.gz").write_bytes(b"macOS fork")  # hidden files are not cases
    (root / "labelsTr" / "._syn_000.nii.gz").write_bytes(b"macOS fork")
    assert run_cli("data", "import", "--format", "nnunet", root, tmp_path / "o2", "--label", 2) == 0
    assert run_cli("data", "import", "--format", "nnunet", root, tmp_path / "o1", "--label", "atrium") == 0
    for cid, (_, label) in truth.items():
        np.testing.assert_array_equal(_read_h5(tmp_path / "o2", cid)[1], (label == 2).astype(np.uint8))
        np.testing.assert_array_equal(_read_h5(tmp_path / "o1", cid)[1], (label == 1).astype(np.uint8))
    record = json.loads((tmp_path / "o2/ssl_bench_dataset.json").read_text())
    assert [s for s in record["preprocessing"] if s["step"] == "foreground"][0]["values"] == [2]


def test_test_list_and_imagests_splits(tmp_path):
    root = tmp_path / "src"
    truth = make_nnunet(root, n_train=5, n_test=2)
    (tmp_path / "t.txt").write_text("syn_001\nsyn_003\n")
    assert run_cli("data", "import", "--format", "nnunet", root, tmp_path / "L", "--test-list", tmp_path / "t.txt") == 0
    assert _lines(tmp_path / "L/test.list") == ["syn_001", "syn_003"]
    assert sorted(_lines(tmp_path / "L/train.list")) == ["syn_000", "syn_002", "syn_004"]
    assert run_cli("data", "import", "--format", "nnunet", root, tmp_path / "T", "--test-from", "imagesTs") == 0
    assert _lines(tmp_path / "T/test.list") == ["syn_005", "syn_006"]
    assert sorted(_lines(tmp_path / "T/train.list")) == [f"syn_{i:03d}" for i in range(5)]
    np.testing.assert_array_equal(_read_h5(tmp_path / "T", "syn_006")[1], (truth["syn_006"][1] > 0).astype(np.uint8))


def test_resampling_to_a_target_spacing(src, tmp_path):
    from scipy import ndimage

    root, truth = src
    assert run_cli("data", "import", "--format", "nnunet", root, tmp_path / "R", "--spacing", "2.5,2.5,2.5") == 0
    for cid, (image, label) in list(truth.items())[:2]:
        img, lab, sp = _read_h5(tmp_path / "R", cid)
        shape = tuple(int(round(n * s / 2.5)) for n, s in zip(image.shape, SPACING))
        assert img.shape == lab.shape == shape
        np.testing.assert_allclose(sp, (2.5, 2.5, 2.5))
        zoom = [a / b for a, b in zip(shape, image.shape)]
        ref_lab = ndimage.zoom(label, zoom, order=0) > 0
        np.testing.assert_array_equal(lab, ref_lab.astype(np.uint8))
        ref = ndimage.zoom(image, zoom, order=1).astype(np.float64)
        np.testing.assert_allclose(img, (ref - ref.mean()) / ref.std(), atol=1e-4)
        # physical foreground volume is kept roughly (nearest-neighbour label): within 35 %
        assert abs(lab.sum() * 2.5 ** 3 - (label > 0).sum() * np.prod(SPACING)) < 0.35 * (label > 0).sum() * np.prod(SPACING)


def test_crop_around_label_is_named_and_recorded_as_using_ground_truth(src, tmp_path, capsys):
    root, truth = src
    assert run_cli("data", "import", "--format", "nnunet", root, tmp_path / "C", "--label", 1,
                   "--crop-around-label", "2,2,1") == 0
    assert "ground truth" in capsys.readouterr().err
    record = json.loads((tmp_path / "C/ssl_bench_dataset.json").read_text())
    crop = [s for s in record["preprocessing"] if s["step"] == "crop_around_label"][0]
    assert crop["done"] is True and crop["uses_ground_truth"] is True and "TEST CASES INCLUDED" in crop["note"]
    image, label = truth["syn_000"]
    img, lab, _ = _read_h5(tmp_path / "C", "syn_000")
    assert lab.shape == (10 + 4, 10 + 4, 6 + 2)  # box 4:14, 5:15, 3:9 plus the margin
    box = image[2:16, 3:17, 2:10].astype(np.float64)
    np.testing.assert_allclose(img, (box - box.mean()) / box.std(), atol=1e-5)


def _break_missing_json(root):
    (root / "dataset.json").unlink()


def _break_image_without_label(root):
    (root / "labelsTr" / "syn_002.nii.gz").unlink()


def _break_shape(root):
    _save(np.zeros((5, 5, 5), np.uint8), root / "labelsTr" / "syn_004.nii.gz", _affine())


def _break_affine(root):
    lab = np.asarray(nib.load(str(root / "labelsTr" / "syn_003.nii.gz")).dataobj)
    _save(lab, root / "labelsTr" / "syn_003.nii.gz", _affine((1.0, 1.0, 1.0)))


def _break_unreadable(root):
    (root / "imagesTr" / "syn_001_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip" * 10)


def _break_undeclared_value(root):
    lab = np.asarray(nib.load(str(root / "labelsTr" / "syn_005.nii.gz")).dataobj).copy()
    lab[0, 0, 0] = 7
    _save(lab, root / "labelsTr" / "syn_005.nii.gz", _affine())


@pytest.mark.parametrize("breaker, args, message", [
    (_break_missing_json, (), "missing dataset.json"),
    (_break_image_without_label, (), "case syn_002: image imagesTr/syn_002_0000.nii.gz has no label"),
    (_break_shape, (), "case syn_004: image shape"),
    (_break_affine, (), "case syn_003: image and label affines differ"),
    (_break_unreadable, (), "case syn_001: cannot read image"),
    (_break_undeclared_value, (), "case syn_005: label value(s) [7]"),
    (None, ("--label", 5), "--label 5: no such label value in dataset.json"),
    (None, ("--label", "tumour"), "no such label in dataset.json"),
    (None, ("--test-list", "/nonexistent/list.txt"), "--test-list: file not found"),
    (None, ("--test-from", "imagesTs"), "imagesTs does not exist"),
])
def test_bad_input_one_line_exit_2_nothing_written(src, tmp_path, capsys, breaker, args, message):
    root, _ = src
    if breaker:
        breaker(root)
    out = tmp_path / "parent" / "OUT"
    capsys.readouterr()
    assert run_cli("data", "import", "--format", "nnunet", root, out, *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
    assert not (tmp_path / "parent").exists() or list((tmp_path / "parent").iterdir()) == []  # no temporary leftovers


def test_existing_output_is_refused(src, tmp_path, capsys):
    root, _ = src
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("data", "import", "--format", "nnunet", root, out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_imported_data_set_trains_and_evaluates(tmp_path):
    root = tmp_path / "src"
    make_nnunet(root, n_train=8)
    out = tmp_path / "OUT"
    assert run_cli("data", "import", "--format", "nnunet", root, out, "--test-fraction", 0.25) == 0
    run = tmp_path / "run"
    assert run_cli("run", "--method", "vnet", "--profile", "smoke", "--labeled", 4, "--iterations", 2,
                   "--patch", "16,16,16", "--n-filters", 2, "--data", out, "--out", run, "--quiet") == 0
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["split"]["labeled"] == _lines(out / "train.list")[:4]
    assert config["split"]["test"] == _lines(out / "test.list")
    assert summary["metrics"]["raw"]["n_cases"] == 2


def test_distances_in_mm_match_medpy_with_voxelspacing_and_voxels_stay_default():
    from medpy.metric import binary
    from scipy import ndimage

    from ssl_bench.metrics import case_metrics, distances_mm

    rng = np.random.default_rng(5)
    a = ndimage.gaussian_filter(rng.standard_normal((26, 22, 14)), 2) > 0.05
    b = ndimage.gaussian_filter(rng.standard_normal((26, 22, 14)), 2) > 0.05
    d = distances_mm(a, b, SPACING)
    assert d["hd95_mm"] == pytest.approx(binary.hd95(a, b, voxelspacing=SPACING), rel=1e-12)
    assert d["asd_mm"] == pytest.approx(binary.asd(a, b, voxelspacing=SPACING), rel=1e-12)
    m = case_metrics(a, b)  # voxel units, unchanged
    assert m["hd95"] == binary.hd95(a, b) and m["asd"] == binary.asd(a, b)
    assert d["hd95_mm"] != pytest.approx(m["hd95"])  # anisotropic spacing changes the number
    empty = distances_mm(np.zeros_like(a), b, SPACING)
    diag = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(a.shape, SPACING))))
    assert empty == {"hd95_mm": pytest.approx(diag), "asd_mm": pytest.approx(diag)}


def test_spacing_and_settings_are_readable_through_the_data_layer(src, tmp_path):
    from ssl_bench.data import LAData

    root, truth = src
    out = tmp_path / "OUT"
    assert run_cli("data", "import", "--format", "nnunet", root, out, "--patch", "32,32,16",
                   "--stride-xy", 8, "--stride-z", 4) == 0
    ds = LAData(out)
    assert ds.dataset_settings()["patch"] == [32, 32, 16]
    assert (ds.dataset_settings()["eval_stride_xy"], ds.dataset_settings()["eval_stride_z"]) == (8, 4)
    assert ds.spacing(ds.train_ids[0]) == SPACING
    assert ds.run_defaults() == {"patch": (32, 32, 16), "eval_stride_xy": 8, "eval_stride_z": 4, "units": "voxel"}
    assert run_cli("data", "import", "--format", "nnunet", root, tmp_path / "bad", "--patch", "30,32,16") == 2


def test_test_case_without_the_chosen_foreground_is_refused(src, tmp_path, capsys):
    root, _ = src
    lab = np.asarray(nib.load(str(root / "labelsTr" / "syn_002.nii.gz")).dataobj).copy()
    lab[lab == 2] = 0
    _save(lab, root / "labelsTr" / "syn_002.nii.gz", _affine())
    (tmp_path / "t.txt").write_text("syn_002\n")
    args = ("data", "import", "--format", "nnunet", root, tmp_path / "O", "--test-list", tmp_path / "t.txt")
    assert run_cli(*args, "--label", 2) == 2
    assert "case syn_002: test case has no foreground" in capsys.readouterr().err and not (tmp_path / "O").exists()
    assert run_cli(*args, "--label", 1) == 0


def test_la_layout_without_a_record_keeps_la_defaults(tmp_path):
    from ssl_bench.data import LAData

    for cid in ("A", "B"):
        (tmp_path / CASES_DIR / cid).mkdir(parents=True)
        with h5py.File(tmp_path / CASES_DIR / cid / "mri_norm2.h5", "w") as f:
            f["image"] = np.zeros((4, 4, 4), np.float32)
            f["label"] = np.zeros((4, 4, 4), np.uint8)
    (tmp_path / "train.list").write_text("A\n")
    (tmp_path / "test.list").write_text("B\n")
    ds = LAData(tmp_path)
    assert ds.dataset_settings() is None and ds.run_defaults() == {} and ds.spacing("A") is None
