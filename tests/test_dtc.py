"""DTC (docs/methods.md §3.4): the SDM→mask transform, the loss composition, the heads, and a smoke run."""
import json
import math

import pytest
import torch

from methods.dtc import DTC, sdm_to_mask
from ssl_bench.data import Batch
from ssl_bench.losses import signed_distance_target
from ssl_bench.method import StageContext

PATCH = (16, 16, 16)


def test_sdm_to_mask_sign_and_scale():
    out = sdm_to_mask(torch.tensor([-0.01, 0.01, 0.0, -1.0, 1.0], dtype=torch.float64))
    # σ(-1500·x): x = -0.01 -> σ(15), x = +0.01 -> σ(-15), x = 0 -> 0.5
    assert out[0].item() == pytest.approx(1.0 / (1.0 + math.exp(-15.0)), rel=1e-12)
    assert out[0].item() > 0.9999996
    assert out[1].item() == pytest.approx(1.0 / (1.0 + math.exp(15.0)), rel=1e-9)
    assert out[1].item() < 4e-7
    assert out[2].item() == 0.5
    assert out[3].item() == pytest.approx(1.0) and out[4].item() == pytest.approx(0.0, abs=1e-300)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    stage = DTC(StageContext(labeled=8, patch=PATCH, n_filters=4))
    nets = stage.networks()
    image = torch.randn(4, 1, *PATCH)
    label = torch.zeros(2, *PATCH, dtype=torch.long)
    label[:, 4:11, 5:12, 3:9] = 1
    label[1, 2:4, 2:4, 2:4] = 1
    return stage, nets, Batch(image=image, label=label, n_labeled=2)


def test_total_is_the_hand_assembled_sum_without_bce(setup):
    stage, nets, batch = setup
    net = nets["student"].eval()  # eval: no dropout, running BN stats -> the hand forward is identical
    it0 = 3000  # 3000 // 150 = 20 of 40: λ = exp(-5·(1 - 20/40)²)
    loss, parts = stage.losses("main", nets, batch, it0)
    with torch.no_grad():
        sdm, seg = net(batch.image)
        p = torch.sigmoid(seg)
        g = batch.label.float()
        pl = p[:2, 0]
        dice = 1 - (2 * (pl * g).sum() + 1e-5) / ((pl * pl).sum() + (g * g).sum() + 1e-5)
        mse = ((sdm[:2, 0] - signed_distance_target(batch.label)) ** 2).mean()
        heav = 1.0 / (1.0 + torch.exp(1500.0 * sdm))  # σ(-1500·sdm), over all 4 samples
        cons = ((heav - p) ** 2).mean()
        bce = -(g * torch.log(pl) + (1 - g) * torch.log(1 - pl)).mean()
    lam = math.exp(-5 * 0.5 ** 2)
    expected = dice + 0.3 * mse + lam * cons
    assert parts["consistency_weight"] == pytest.approx(lam)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["bce"].item() == pytest.approx(bce.item(), rel=1e-5)  # computed and logged ...
    assert abs(loss.item() - (expected + bce).item()) > 0.1  # ... but not added
    assert parts["dice"].item() == pytest.approx(dice.item(), rel=1e-5)
    assert parts["mse_sdm"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert parts["consistency"].item() == pytest.approx(cons.item(), rel=1e-5)


def test_rampup_uses_completed_iterations():
    stage = DTC(StageContext(labeled=8, patch=PATCH, n_filters=4))
    assert stage.consistency_weight(0) == pytest.approx(math.exp(-5))
    assert stage.consistency_weight(149) == pytest.approx(math.exp(-5))  # 149 // 150 = 0
    assert stage.consistency_weight(150) == pytest.approx(math.exp(-5 * (39 / 40) ** 2))
    assert stage.consistency_weight(6000) == 1.0 and stage.consistency_weight(5999) < 1.0


def test_consistency_has_no_stop_gradient(setup):
    stage, nets, batch = setup
    net = nets["student"].eval()
    net.zero_grad(set_to_none=True)
    _, parts = stage.losses("main", nets, batch, 0)
    parts["consistency"].backward()
    # both heads and the shared trunk receive the consistency gradient
    for p in (net.sdm_conv.weight, net.seg_conv.weight, net.enc1[0].weight):
        assert p.grad is not None and p.grad.abs().sum().item() > 0
    net.zero_grad(set_to_none=True)


def test_foreground_probability_is_the_seg_head_sigmoid(setup):
    stage, nets, batch = setup
    net = nets["student"].eval()
    with torch.no_grad():
        prob = stage.foreground_probability(net, batch.image)
        _, seg = net(batch.image)
    assert prob.shape == (4, *PATCH)
    assert torch.allclose(prob, torch.sigmoid(seg)[:, 0])


def test_dtc_smoke_run_writes_every_file(la_root, tmp_path):
    from ssl_bench.cli import main

    out = tmp_path / "r"
    # the smoke profile, shortened to 1 iteration and 1 test case to keep the suite's CPU time small
    rc = main(["run", "--method", "dtc", "--profile", "smoke", "--iterations", "1", "--eval-cases", "1",
               "--data", str(la_root), "--out", str(out), "--quiet"])
    assert rc == 0
    for name in ("config.json", "log.jsonl", "metrics_per_case.csv", "summary.json", "checkpoints/last.pt",
                 "stages/stage1.pt"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    st = cfg["method"]["stages"][0]
    assert (st["batch_labeled"], st["batch_unlabeled"], st["base_lr"]) == (2, 2, 0.01)
    assert st["paper_lcc"] is True and st["literature_selection"] is None
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1]
    assert {"dice", "mse_sdm", "bce", "consistency", "consistency_weight"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paper_post"] == "lcc" and summary["checkpoint"]["selection"] == "last"
    assert set(summary["metrics"]) == {"raw", "lcc"}


def _reference_compute_sdf(img_gt, out_shape):
    """DTC's ``compute_sdf`` (HiLab-git/DTC code/utils/util.py), transcribed: scipy EDT, skimage boundaries, the
    normalisation in float64; the training script then takes ``torch.from_numpy(gt_dis).float()``."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt as distance
    from skimage import segmentation

    img_gt = img_gt.astype(np.uint8)
    normalized_sdf = np.zeros(out_shape)
    for b in range(out_shape[0]):
        posmask = img_gt[b].astype(bool)
        if posmask.any():
            negmask = ~posmask
            posdis = distance(posmask)
            negdis = distance(negmask)
            boundary = segmentation.find_boundaries(posmask, mode="inner").astype(np.uint8)
            sdf = (negdis - np.min(negdis)) / (np.max(negdis) - np.min(negdis)) \
                - (posdis - np.min(posdis)) / (np.max(posdis) - np.min(posdis))
            sdf[boundary == 1] = 0
            normalized_sdf[b] = sdf
    return torch.from_numpy(normalized_sdf).float()


def test_signed_distance_target_is_bit_identical_to_the_reference_compute_sdf():
    """Random smooth masks of several shapes and foreground shares, a batch with an empty sample, and one at the
    paper's patch: np.array_equal with the reference, not a tolerance (issue 23: float64 normalisation)."""
    import numpy as np
    from scipy import ndimage

    pytest.importorskip("skimage")
    rng = np.random.default_rng(23)
    masks = []
    while len(masks) < 12:
        shape = tuple(int(s) for s in rng.integers(9, 48, 3))
        smooth = ndimage.gaussian_filter(rng.standard_normal((2, *shape)), (0, *rng.uniform(1.0, 4.0, 3)))
        mask = (smooth > rng.uniform(-0.2, 0.3)).astype(np.uint8)
        if mask.reshape(2, -1).any(1).all() and not mask.reshape(2, -1).all(1).any():  # both classes in each
            masks.append(mask)
    empty = masks[0].copy()
    empty[1] = 0  # no foreground in the second sample: an all-zero target, as the reference's
    masks.append(empty)
    masks.append((ndimage.gaussian_filter(rng.standard_normal((2, 112, 112, 80)), (0, 6, 6, 6)) > 0.02).astype(np.uint8))
    n_off = 0
    for mask in masks:
        assert mask.reshape(2, -1).any(1)[0] and not mask.reshape(2, -1).all(1).any()  # both classes in sample 0
        want = _reference_compute_sdf(mask, mask.shape).numpy()
        got = signed_distance_target(torch.from_numpy(mask).long()).numpy()
        assert got.dtype == np.float32 and np.array_equal(got, want)
        # the float32 normalisation this replaced: dist/max in float32 differs from the reference
        fg = mask[0] != 0
        d = np.where(fg, ndimage.distance_transform_edt(fg), ndimage.distance_transform_edt(~fg)).astype(np.float32)
        old = np.where(fg, -(d / d[fg].max()), d / d[~fg].max())
        n_off += int((old[want[0] != 0] != want[0][want[0] != 0]).sum())
    assert n_off > 0  # the comparison is fine enough to see float32 rounding
