"""Host-side work of a training iteration (issue 10, part 2): edt SDF targets, cc3d LCC, numpy-view
augmentation, background prefetch, and the host-ms benchmark helper.

Every expected value is computed here independently: SDF targets from scipy's EDT and an erosion-based inner
boundary (the docs/methods.md §1.6 definition), LCC from scipy.ndimage.label with the lowest-label tie rule,
batches from the torch augmentation path and the plain (un-prefetched) stream.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from ssl_bench.data import Batch, LAData, TrainStream
from ssl_bench.errors import Interrupted, UserError
from ssl_bench.losses import signed_distance_target
from ssl_bench.postprocess import largest_component, largest_component_batch
from ssl_bench.prefetch import PrefetchStream
from ssl_bench.testing import make_tiny_la, state_differences
from ssl_bench.trainer import Trainer, build_config, run_training

CPU = torch.device("cpu")


# ------------------------------------------------------------------ references written here

def sdf_reference(labels: np.ndarray) -> np.ndarray:
    """compute_sdf as docs/methods.md §1.6 defines it, with scipy, float64; degenerate samples as documented."""
    out = np.zeros(labels.shape, np.float64)
    for b in range(labels.shape[0]):
        fg = labels[b] != 0
        if not fg.any() or fg.all():
            continue  # no foreground, or no background: all zeros
        neg = ndimage.distance_transform_edt(~fg)
        pos = ndimage.distance_transform_edt(fg)
        neg = (neg - neg.min()) / (neg.max() - neg.min())
        pos = (pos - pos.min()) / (pos.max() - pos.min())
        sdm = neg - pos
        # inner boundary, face connectivity; outside the array counts as foreground (not a boundary)
        interior = ndimage.binary_erosion(fg, ndimage.generate_binary_structure(fg.ndim, 1), border_value=1)
        sdm[fg & ~interior] = 0.0
        out[b] = sdm
    return out


def lcc_reference(mask: np.ndarray) -> np.ndarray:
    """scipy's full-connectivity labels; the largest component, ties to the lowest label."""
    m = mask != 0
    labels, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, bool))
    if n == 0:
        return m.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


# ------------------------------------------------------------------ SDF targets (edt)

def test_sdf_equals_scipy_definition_on_real_la_labels(la_root):
    data = LAData(la_root)
    crops = []
    for case in data.train_ids[:2]:
        label = data.load(case)[1]
        c = [int(v.mean()) for v in np.nonzero(label)]  # centred on the atrium, both classes present
        crops.append(label[c[0] - 40:c[0] + 40, c[1] - 40:c[1] + 40, c[2] - 24:c[2] + 24])
        crops.append(label[c[0]:c[0] + 56, c[1] - 30:c[1] + 30, :40])  # cut through it, foreground on a border
    for crop in crops:
        assert 0 < crop.mean() < 1
        labels = crop[None].astype(np.int64)
        out = signed_distance_target(torch.from_numpy(labels))
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), sdf_reference(labels), rtol=0, atol=1e-5)


def _degenerate_masks():
    cases = {}
    cases["empty"] = np.zeros((1, 6, 7, 5), np.uint8)
    cases["full"] = np.ones((1, 6, 7, 5), np.uint8)
    single = np.zeros((1, 9, 8, 7), np.uint8)
    single[0, 4, 3, 2] = 1
    cases["single voxel"] = single
    corner = np.zeros((1, 9, 8, 7), np.uint8)
    corner[0, 0, 0, 0] = 1
    cases["single corner voxel"] = corner
    border = np.zeros((1, 12, 10, 8), np.uint8)
    border[0, :5, 2:9, :] = 1  # touches three faces of the array
    cases["foreground on the border"] = border
    slab = np.zeros((1, 12, 10, 8), np.uint8)
    slab[0, :, :, 3:] = 1  # the only background is one slab: EDT(fg) spans the array
    cases["background slab"] = slab
    rng = np.random.default_rng(3)
    for shape in [(1, 40, 3, 2), (1, 2, 17, 33), (1, 1, 30, 5)]:
        m = (rng.random(shape) < 0.3).astype(np.uint8)
        m[0].flat[0] = 1
        m[0].flat[-1] = 0
        cases[f"anisotropic {shape}"] = m
    cases["2-D samples"] = (rng.random((3, 23, 31)) < 0.2).astype(np.uint8)
    cases["1-D samples"] = np.array([[0, 1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    mixed = np.zeros((4, 10, 11, 9), np.uint8)  # per-sample normalisation: empty, full and ordinary samples
    mixed[1] = 1
    mixed[2, 2:6, 3:9, 1:4] = 1
    mixed[3, 5, 5, 5] = 1
    cases["a batch of mixed samples"] = mixed
    return cases


@pytest.mark.parametrize("name", list(_degenerate_masks()))
def test_sdf_degenerate_and_anisotropic_masks_equal_the_definition(name):
    labels = _degenerate_masks()[name]
    out = signed_distance_target(labels)
    assert out.shape == labels.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), sdf_reference(labels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_sdf_random_blobs_equal_the_definition(seed):
    rng = np.random.default_rng(seed)
    shape = (2,) + tuple(int(v) for v in rng.integers(8, 30, 3))
    blobs = ndimage.gaussian_filter(rng.random(shape), sigma=(0, 2, 2, 2)) > 0.5
    labels = torch.from_numpy(blobs.astype(np.int64))
    np.testing.assert_allclose(signed_distance_target(labels).numpy(), sdf_reference(blobs), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ LCC (cc3d), identical to scipy

def test_lcc_tie_goes_to_the_component_first_in_c_raster_order():
    m = np.zeros((8, 8, 8), bool)
    m[5:7, 0:2, 0:2] = True  # 8 voxels; first along the last axes, but later in C order
    m[0:2, 6:8, 6:8] = True  # 8 voxels, first in C order (x = 0): scipy's label 1
    m[3, 3, 3] = True  # a smaller one between them
    expected = np.zeros_like(m)
    expected[0:2, 6:8, 6:8] = True
    np.testing.assert_array_equal(largest_component(m), expected)
    np.testing.assert_array_equal(lcc_reference(m), expected)


def test_lcc_three_way_tie_and_a_later_bigger_component():
    m = np.zeros((10, 10, 10), bool)
    for z in (8, 4, 0):  # three 4-voxel blocks in one row; the one at z=0 comes first in C order
        m[2, 2:4, z:z + 2] = True
    expected = np.zeros_like(m)
    expected[2, 2:4, 0:2] = True
    np.testing.assert_array_equal(largest_component(m), expected)
    m[9, 9, 5:10] = True  # 5 voxels, last in raster order: no longer a tie
    expected = np.zeros_like(m)
    expected[9, 9, 5:10] = True
    np.testing.assert_array_equal(largest_component(m), expected)


@pytest.mark.parametrize("seed", range(12))
def test_lcc_random_and_mirrored_masks_identical_to_scipy(seed):
    rng = np.random.default_rng(seed)
    ndim = (3, 3, 3, 2, 1, 4)[seed % 6]
    shape = tuple(int(v) for v in rng.integers(3, {1: 60, 2: 30, 3: 14, 4: 6}[ndim], ndim))
    m = rng.random(shape) < rng.uniform(0.05, 0.4)
    if seed % 2:  # a mirrored copy of each component: equal sizes, ties certain
        half = m[: (shape[0] + 1) // 2]
        m = np.concatenate([half, np.zeros((1,) + shape[1:], bool), half[::-1]])
    out = largest_component(m)
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, lcc_reference(m))


def test_lcc_batch_identical_to_scipy_on_real_crops(la_root):
    data = LAData(la_root)
    rng = np.random.default_rng(0)
    masks = []
    for case in data.train_ids[:2]:
        label = data.load(case)[1][:96, :96, :64].astype(bool)
        masks.append(label & (rng.random(label.shape) < 0.9))  # a speckled prediction: many components
    out = largest_component_batch(torch.from_numpy(np.stack(masks)))
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(out[i].numpy(), lcc_reference(m))


# ------------------------------------------------------------------ batches: numpy views = torch copies

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    # shape 24x24x20 against patch 16x16x20: the last axis needs padding (a side equal to the patch)
    return make_tiny_la(tmp_path_factory.mktemp("host") / "LA", n_train=6, n_test=2)


def _stream(root, seed=5, patch=(16, 16, 20), b_l=2, b_u=2):
    data = LAData(root)
    return TrainStream(data, data.split(3), patch, b_l, b_u, seed=seed, storage=CPU, device=CPU)


def _same_batch(a, b):
    return (torch.equal(a.image, b.image) and torch.equal(a.label, b.label) and a.n_labeled == b.n_labeled
            and a.image.dtype == b.image.dtype and a.label.dtype == b.label.dtype)


@pytest.mark.parametrize("patch", [(16, 16, 20), (24, 12, 8), (8, 8, 8)])
def test_cpu_batches_equal_the_torch_augmentation_path(tiny_root, patch):
    fast = _stream(tiny_root, patch=patch)
    torch_path = _stream(tiny_root, patch=patch)
    data = torch_path.data
    for case in data.train_ids:  # volumes as tensors: augment takes its torch (copying) branch
        image, label = data.load(case)
        torch_path._volumes[case] = (torch.from_numpy(image), torch.from_numpy(label))
    for _ in range(6):
        a, b = fast.next(), torch_path.next()
        assert a.image.shape == (4, 1) + patch and a.label.dtype == torch.int64
        assert _same_batch(a, b)


# ------------------------------------------------------------------ prefetch

def _fake_sdf(batch):
    return {"sdf": batch.label.float() * 2 - 1, "thread": threading.current_thread() is not threading.main_thread()}


def test_prefetched_batches_and_states_equal_the_plain_stream(tiny_root):
    plain = _stream(tiny_root)
    pre = PrefetchStream(_stream(tiny_root), _fake_sdf)
    with pre:
        assert state_differences(pre.state_dict(), plain.state_dict()) == []
        for _ in range(7):
            a = pre.next()
            b = plain.next()
            assert _same_batch(a, b)
            assert torch.equal(a.host_targets["sdf"], b.label.float() * 2 - 1)
            assert a.host_targets["thread"] is True  # prepared in the background
            # the checkpointed state is the one BEFORE the batch already prefetched
            assert state_differences(pre.state_dict(), plain.state_dict()) == []


def test_resume_from_a_prefetch_state_and_after_close(tiny_root):
    reference = _stream(tiny_root)
    expected = [reference.next() for _ in range(8)]
    first = PrefetchStream(_stream(tiny_root))
    got = [first.next() for _ in range(3)]
    state = first.state_dict()
    first.close()  # drops the prefetched 4th batch and rewinds: next() continues with it
    got.append(first.next())
    first.close()
    resumed = PrefetchStream(_stream(tiny_root, seed=99))  # another seed: everything must come from the state
    resumed.load_state_dict(state)
    with resumed:
        got_resumed = [resumed.next() for _ in range(5)]
    assert all(_same_batch(a, b) for a, b in zip(got, expected[:4]))
    assert all(_same_batch(a, b) for a, b in zip(got_resumed, expected[3:]))


def test_prefetch_never_draws_from_torch_global_generator(tiny_root):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with PrefetchStream(_stream(tiny_root), _fake_sdf) as pre:
        for _ in range(4):
            pre.next()
    assert torch.equal(torch.get_rng_state(), before)


def test_an_error_in_the_background_reaches_the_caller_and_the_thread_ends(tiny_root):
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) == 2:
            raise UserError("case X: cannot read")
        return {}

    pre = PrefetchStream(_stream(tiny_root), failing)
    pre.next()  # batch 1 fine; batch 2 fails in the background
    with pytest.raises(UserError, match="cannot read"):
        pre.next()
    pre.close()
    assert not [t for t in threading.enumerate() if t.name == "ssl-bench-prefetch"]


def test_disabled_prefetch_gives_the_same_batches_in_the_calling_thread(tiny_root):
    plain = _stream(tiny_root)
    off = PrefetchStream(_stream(tiny_root), _fake_sdf, enabled=False)
    for _ in range(3):
        a = off.next()
        assert _same_batch(a, plain.next()) and a.host_targets["thread"] is False
        assert state_differences(off.state_dict(), plain.state_dict()) == []


def _dtc_config(**kw):
    values = dict(labeled=3, patch=(16, 16, 16), n_filters=2, device="cpu", eval_cases=1, iterations=3,
                  checkpoint_every=1000, log_every=1)
    values.update(kw)
    return build_config("dtc", "smoke", **values)


def test_dtc_run_identical_with_and_without_prefetch_and_thread_ends_on_interrupt(tiny_root, tmp_path, monkeypatch,
                                                                                 one_thread):
    monkeypatch.setattr(Trainer, "evaluate", lambda self, timings=None: {})  # training only
    logs, weights = {}, {}
    for prefetch in (True, False):
        monkeypatch.setattr(Trainer, "prefetch", prefetch)
        out = tmp_path / f"p{prefetch}"
        run_training(_dtc_config(), out, tiny_root, progress=False)
        logs[prefetch] = [{k: v for k, v in json.loads(line).items() if k not in ("it_per_s", "elapsed_s")}
                          for line in (out / "log.jsonl").read_text().splitlines()]
        weights[prefetch] = torch.load(out / "stages" / "stage1.pt", weights_only=False)["weights"]
    assert logs[True] == logs[False] and len(logs[True]) == 3
    assert state_differences(weights[True], weights[False]) == []

    monkeypatch.setattr(Trainer, "prefetch", True)
    from methods.dtc import DTC

    slow = DTC.host_targets

    def slow_targets(self, batch):  # the batch in flight at the interruption is still being made
        time.sleep(0.4)
        return slow(self, batch)

    monkeypatch.setattr(DTC, "host_targets", slow_targets)
    with pytest.raises(Interrupted):
        run_training(_dtc_config(), tmp_path / "cut", tiny_root, progress=False, stop_at=(1, 2))
    assert not [t for t in threading.enumerate() if t.name == "ssl-bench-prefetch" and t.is_alive()]


def test_dtc_and_sassnet_use_the_attached_target_and_compute_it_when_absent():
    from ssl_bench.method import StageContext, get_method

    label = torch.zeros((2, 16, 16, 16), dtype=torch.long)
    label[:, 4:12, 3:10, 5:13] = 1
    image = torch.randn((4, 1, 16, 16, 16))
    for name in ("dtc", "sassnet"):
        stage = get_method(name).stages[0](StageContext(labeled=2, patch=(16, 16, 16), n_filters=2))
        torch.manual_seed(0)
        nets = stage.networks()
        stage.train_modes(nets)
        targets = stage.host_targets(Batch(image, label, 2))
        np.testing.assert_allclose(targets["sdf"].numpy(), sdf_reference(label.numpy()), atol=1e-5)
        key = "mse_sdm" if name == "dtc" else "sdf"
        values = []
        for host in ({}, targets, {"sdf": torch.zeros_like(targets["sdf"])}):
            torch.manual_seed(1)  # dropout
            _, parts = stage.losses("main", nets, Batch(image, label, 2, host_targets=dict(host)), 0)
            values.append(float(parts[key].detach()))
        assert values[0] == values[1]  # computed when absent = the attached one
        assert values[2] != values[1]  # and the attached one is what is used


# ------------------------------------------------------------------ the benchmark helper (no timing asserted)

@pytest.mark.parametrize("method,k,samples", [("bcp", 1, 4), ("omf", 1, 2), ("dtc", 0, 0)])
def test_host_ms_counts_the_stage_lcc_passes(tiny_root, tmp_path, method, k, samples, one_thread):
    from ssl_bench.hostwork import host_ms_per_iteration

    cfg = build_config(method, "smoke", labeled=4, patch=(16, 16, 16), n_filters=2, device="cpu")
    out = host_ms_per_iteration(Trainer(cfg, tmp_path, LAData(tiny_root), progress=False), k, iterations=2, warmup=0)
    assert out["component_samples"] == samples
    assert {"batch_ms", "targets_ms", "components_ms", "transfer_ms", "total_ms", "best_total_ms", "cpu_ms"} <= set(out)
    assert (out["components_ms"] > 0) == (samples > 0)
    assert (out["targets_ms"] > 0) == (method == "dtc")  # DTC's signed distances are host targets
