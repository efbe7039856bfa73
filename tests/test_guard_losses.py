"""Guards: one step's loss total of every method equals docs/methods.md's formula, computed independently here.

For each method (§3.1-§3.7) one ``stage.losses(...)`` call runs on the stage's own networks (tiny: 16³
patch, n_filters 2) and a hand-made batch, and its total is compared with the total assembled in this
file from the spec with plain torch/numpy/scipy: CE, DiceFG-sq, DiceFG-lin, DiceMC, masked CE,
softmax-MSE, the sigmoid ramp, the signed-distance target, the 26-connected LCC and VAT (§1.6, §1.7,
§3.5) are all written out below, none is imported from ``ssl_bench``.

Determinism: every dropout module gets p = 0 (the networks keep their train modes, so BatchNorm uses
batch statistics and the sample grouping of each forward matters, as in the references); UA-MT's noise
is monkeypatched to fixed draws; BCP's cut mask is recorded (and checked against §3.6) by a spy around
``methods.bcp.random_cut_mask``; SS-Net's VAT direction is read back from the inputs the network sees.

Every check also computes the totals that single breakages would give (a term dropped, a sign or a
weight changed, the ramp one iteration off, ...) and asserts that each lies far outside the tolerance:
a test that could not tell them apart fails by itself instead of passing silently.

it0 = 2999 everywhere: 2999 // 150 = 19 but 3000 // 150 = 20, so a ramp read one iteration off changes λ
by 13 %, and neither ramp is near 0 or 1.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

import methods.bcp
import methods.uamt
from methods.bcp import BCPStage1, BCPStage2
from methods.dtc import DTC
from methods.omf import OMFStage1, OMFStage1Overlay, OMFStage2
from methods.sassnet import SASSNet
from methods.ssnet import SSNet
from methods.uamt import UAMT
from methods.vnet import VNetBaseline
from ssl_bench.data import Batch
from ssl_bench.method import StageContext

P = (16, 16, 16)
IT0 = 2999
RTOL, ATOL = 1e-5, 1e-6
LN2 = math.log(2.0)


def _ctx(**kw) -> StageContext:
    return StageContext(labeled=8, patch=P, n_filters=2, **kw)


# --------------------------------------------------------------------------- spec formulas, plain torch


def ramp(t, length):
    """§1.7: exp(-5·(1 - clip(t, 0, L)/L)²)."""
    t = min(max(float(t), 0.0), float(length))
    return math.exp(-5.0 * (1.0 - t / length) ** 2)


def ce(z, y):
    """Mean voxel cross-entropy on logits (N, C, ...) against class indices (N, ...)."""
    return -torch.log_softmax(z.double(), dim=1).gather(1, y[:, None].long()).mean()


def masked_ce(z, y, m):
    """§1.6: Σ(CE·m) / (Σm + 1e-16), m (X, Y, Z) shared by the batch."""
    ce_v = -torch.log_softmax(z.double(), dim=1).gather(1, y[:, None].long())[:, 0]
    mm = m.double().expand_as(ce_v)
    return (ce_v * mm).sum() / (mm.sum() + 1e-16)


def dice_sq(p, g):
    """DiceFG-sq, batch level: 1 - (2Σpg + 1e-5)/(Σp² + Σg² + 1e-5)."""
    p, g = p.double(), g.double()
    return 1 - (2 * (p * g).sum() + 1e-5) / ((p * p).sum() + (g * g).sum() + 1e-5)


def dice_lin(p, g):
    """DiceFG-lin, batch level: 1 - (2Σpg + 1e-8)/(Σp + Σg + 1e-8)."""
    p, g = p.double(), g.double()
    return 1 - (2 * (p * g).sum() + 1e-8) / (p.sum() + g.sum() + 1e-8)


def dice_mc(z, y, m=None):
    """DiceMC: 1 - mean over (sample, class) of (2Σ m·p·g + 1e-5)/(Σ m·(p + g) + 1e-5), background included."""
    p = torch.softmax(z.double(), dim=1)
    g = torch.stack([(y == c) for c in range(p.shape[1])], dim=1).double()
    mm = torch.ones_like(p[:, :1]) if m is None else m.double().expand_as(p[:, :1])
    inter = (p * g * mm).flatten(2).sum(2)
    union = ((p + g) * mm).flatten(2).sum(2)
    return 1 - ((2 * inter + 1e-5) / (union + 1e-5)).mean()


def sup_mc(z, y):
    """BCP/OMF ½(CE + DiceMC)."""
    return 0.5 * (ce(z, y) + dice_mc(z, y))


def softmax_sq(a, b):
    return (torch.softmax(a.double(), dim=1) - torch.softmax(b.double(), dim=1)) ** 2


def sdf_target(labels):
    """§1.6 compute_sdf: norm(EDT(bg)) - norm(EDT(fg)), 0 on the inner (face-connected) boundary."""
    out = []
    face = ndimage.generate_binary_structure(3, 1)
    for lab in labels.numpy():
        fg = lab != 0
        assert fg.any() and not fg.all()
        neg, pos = ndimage.distance_transform_edt(~fg), ndimage.distance_transform_edt(fg)
        sdf = (neg - neg.min()) / (neg.max() - neg.min()) - (pos - pos.min()) / (pos.max() - pos.min())
        # inner boundary: foreground voxels with a background face-neighbour inside the array
        sdf[fg & ~ndimage.binary_erosion(fg, face, border_value=1)] = 0.0
        out.append(sdf)
    return torch.from_numpy(np.stack(out))


def largest_cc(fg):
    """Per sample, the largest 26-connected component of a bool (N, X, Y, Z) tensor (empty stays empty)."""
    out = np.zeros(fg.shape, dtype=bool)
    for i, f in enumerate(fg.numpy()):
        lab, n = ndimage.label(f, structure=np.ones((3, 3, 3)))
        if n:
            sizes = np.bincount(lab.ravel())[1:]
            assert (sizes == sizes.max()).sum() == 1, "tie between components: change the seed"
            out[i] = lab == 1 + int(np.argmax(sizes))
    return torch.from_numpy(out)


def hard_pseudo_label(z):
    """BCP/OMF: LCC of [softmax channel 1 ≥ 0.5], as int64."""
    p1 = torch.softmax(z.double(), dim=1)[:, 1]
    assert (p1 - 0.5).abs().min() > 1e-5, "a probability at the 0.5 threshold: change the seed"
    return largest_cc(p1 >= 0.5).long()


# --------------------------------------------------------------------------- set-up helpers


def _deterministic(nets):
    """Dropout p = 0 everywhere (modes untouched): forwards are then a function of their input batch."""
    for net in nets.values():
        for m in net.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = 0.0
    return nets


@torch.no_grad()
def _set_foreground_fraction(net, x, frac):
    """Shift a head-A net's foreground logit so that about ``frac`` of the voxels of ``net(x)`` are foreground.

    The cut goes through the widest gap between logit differences near that quantile, so that no voxel
    lies at probability 0.5 (many voxels of a 2-filter net share one value: all-zero features after ReLU).
    """
    z = net(x)
    d = (z[:, 1] - z[:, 0]).flatten().double()
    lo, hi = torch.quantile(d, max(0.0, 1.0 - frac - 0.1)), torch.quantile(d, min(1.0, 1.0 - frac + 0.1))
    values = torch.unique(d[(d >= lo) & (d <= hi)])
    k = int(torch.argmax(values[1:] - values[:-1]))
    net.out_conv.bias[1] -= float(values[k] + values[k + 1]) / 2


def _labels(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, *P, dtype=torch.long)
    for i in range(n):
        o = torch.randint(1, 6, (3,), generator=g).tolist()
        s = torch.randint(5, 9, (3,), generator=g).tolist()
        y[i, o[0]:o[0] + s[0], o[1]:o[1] + s[1], o[2]:o[2] + s[2]] = 1
        y[i, 12:15, 2 + i:5 + i, 10:13] = 1  # a second blob
    return y


def _batch(n_l, n_u, seed):
    g = torch.Generator().manual_seed(seed)
    y = _labels(n_l, seed)
    image = torch.randn(n_l + n_u, 1, *P, generator=g)
    image[:n_l, 0] += 1.5 * y  # labeled images show their atrium
    return Batch(image=image, label=y, n_labeled=n_l)


def _check(loss, expected, alternatives):
    """``loss`` equals ``expected``; each alternative (a broken formula's total) is far outside the tolerance."""
    expected = float(expected)
    torch.testing.assert_close(loss.detach().double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)
    tol = RTOL * abs(expected) + ATOL
    for name, alt in alternatives.items():
        assert abs(float(alt) - expected) > 20 * tol, f"the check cannot tell the spec from '{name}'"


# --------------------------------------------------------------------------- §3.1 V-Net baseline


def test_vnet_baseline_total():
    stage = VNetBaseline(_ctx())
    torch.manual_seed(0)
    nets = _deterministic(stage.networks())
    stage.train_modes(nets)
    batch = _batch(4, 0, seed=1)
    loss, _ = stage.losses("main", nets, batch, IT0)
    with torch.no_grad():
        z = nets["student"](batch.image)
    y = batch.label
    c, d = ce(z, y), dice_sq(torch.softmax(z.double(), 1)[:, 1], y)
    _check(loss, 0.5 * (c + d), {
        "no 0.5": c + d,
        "Dice dropped": 0.5 * c,
        "CE dropped": 0.5 * d,
        "Dice subtracted": 0.5 * (c - d),
        "DiceFG-lin instead of DiceFG-sq": 0.5 * (c + dice_lin(torch.softmax(z.double(), 1)[:, 1], y)),
    })


# --------------------------------------------------------------------------- §3.2 UA-MT


def test_uamt_total(monkeypatch):
    stage = UAMT(_ctx())
    torch.manual_seed(2)
    nets = _deterministic(stage.networks())
    student, teacher = nets["student"], nets["teacher"]
    with torch.no_grad():  # a teacher confident in places (a partial certainty mask), a student that disagrees
        teacher.out_conv.weight.mul_(12.0)
        student.out_conv.weight.mul_(-12.0)
    stage.train_modes(nets)
    batch = _batch(2, 2, seed=3)
    batch.image[2:] *= 0.25  # low-contrast unlabeled images: the teacher's ±0.2 noise changes its predictions
    x, y, x_u = batch.image, batch.label, batch.unlabeled_image

    g = torch.Generator().manual_seed(4)

    def noise(n):  # clip(N(0, 0.1²), ±0.2) (§3.2 item 2), drawn here once and handed out below
        return torch.clamp(0.1 * torch.randn(n, 1, *P, generator=g), -0.2, 0.2)

    n_target = noise(2)
    n_mc = [noise(4) for _ in range(4)]
    calls = []

    def fixed_noise(t):
        # the consistency target's noise is drawn on the 2 unlabeled inputs, the MC passes' on them duplicated
        if t.shape[0] == 2:
            calls.append("target")
            return n_target
        assert t.shape[0] == 4 and torch.equal(t[:2], x_u) and torch.equal(t[2:], x_u)
        calls.append("mc")
        return n_mc[calls.count("mc") - 1]

    monkeypatch.setattr(methods.uamt, "teacher_noise", fixed_noise)
    loss, _ = stage.losses("main", nets, batch, IT0)
    assert sorted(calls) == ["mc"] * 4 + ["target"]  # 1 target draw + T = 8 passes as 4 forwards of 2·2

    with torch.no_grad():
        z = student(x)                    # all 4 clean inputs in one forward
        z_t = teacher(x_u + n_target)     # consistency target
        z_t_clean = teacher(x_u)          # (what a target without its noise would be)
        mc = torch.stack([torch.softmax(teacher(torch.cat([x_u, x_u]) + n).double(), 1) for n in n_mc])
    p_bar = mc.reshape(8, 2, *mc.shape[2:]).mean(0)             # (2, C, X, Y, Z): mean over the 8 passes
    u = -(p_bar * torch.log(p_bar + 1e-6)).sum(1, keepdim=True)  # nats
    h = (0.75 + 0.25 * ramp(IT0, 6000)) * LN2
    assert (u - h).abs().min() > 1e-5  # no voxel at the threshold: float32 vs float64 cannot flip the mask
    m = (u < h).double()
    assert 0.2 < float(m.mean()) < 0.8, float(m.mean())

    def cons(mask, target=z_t):
        return (mask * softmax_sq(z[2:], target)).sum() / (2 * mask.sum() + 1e-16)

    l_c = cons(m)
    c, d = ce(z[:2], y), dice_sq(torch.softmax(z[:2].double(), 1)[:, 1], y)
    sup = 0.5 * (c + d)
    lam = 0.1 * ramp(IT0 // 150, 40)
    sq_sigmoid = (torch.softmax(z[2:].double(), 1) - torch.sigmoid(z_t.double())) ** 2
    _check(loss, sup + lam * l_c, {
        "consistency dropped": sup,
        "consistency subtracted": sup - lam * l_c,
        "Dice dropped": 0.5 * c + lam * l_c,
        "no 0.5 on the supervised part": c + d + lam * l_c,
        "uncertain voxels kept": sup + lam * cons((u > h).double()),
        "no certainty mask": sup + lam * cons(torch.ones_like(m)),
        "target without noise": sup + lam * cons(m, z_t_clean),
        "λ ramp one iteration early": sup + 0.1 * ramp((IT0 + 1) // 150, 40) * l_c,
        "λ without 0.1": sup + ramp(IT0 // 150, 40) * l_c,
        "threshold not ramped": sup + lam * cons((u < 0.75 * LN2).double()),
        "softmax-MSE target through a sigmoid": sup + lam * (m * sq_sigmoid).sum() / (2 * m.sum()),
    })


# --------------------------------------------------------------------------- §3.3 SASSNet


@pytest.fixture
def sassnet():
    stage = SASSNet(_ctx())  # 8 labels: c = 0.015
    torch.manual_seed(5)
    nets = _deterministic(stage.networks())
    with torch.no_grad():  # a discriminator with an opinion (the random one answers ≈ 50/50 for every input)
        nets["disc"].classifier.weight.mul_(300.0)
        nets["disc"].classifier.bias.copy_(torch.tensor([1.5, -1.5]))  # leaning to "unlabeled"
    stage.train_modes(nets)
    return stage, nets, _batch(2, 2, seed=6)


def test_sassnet_segmentation_phase_total(sassnet):
    stage, nets, batch = sassnet
    seg, disc = nets["seg"], nets["disc"]
    x, y = batch.image, batch.label
    loss, _ = stage.losses("main", nets, batch, IT0)
    assert seg.training and not disc.training
    with torch.no_grad():
        sdm, logit = seg(x)
        d_u = disc(sdm[2:], x[2:]).double()
    p = torch.sigmoid(logit[:2, 0].double())
    dice = dice_sq(p, y)
    target = sdf_target(y)
    sdf = ((sdm[:2, 0].double() - target) ** 2).mean()
    adv = -torch.log_softmax(d_u, 1)[:, 1].mean()  # CE towards "labeled" (class 1)
    lam = 0.015 * ramp(IT0 // 150, 40)
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    _check(loss, dice + 0.3 * sdf + lam * adv, {
        "SDF weight 0.3 dropped": dice + sdf + lam * adv,
        "SDF term dropped": dice + lam * adv,
        "Dice dropped": 0.3 * sdf + lam * adv,
        "adversarial term dropped": dice + 0.3 * sdf,
        "adversarial towards 'unlabeled'": dice + 0.3 * sdf + lam * -torch.log_softmax(d_u, 1)[:, 0].mean(),
        "λ ramp one iteration early": dice + 0.3 * sdf + 0.015 * ramp((IT0 + 1) // 150, 40) * adv,
        "16-label weight 0.01": dice + 0.3 * sdf + 0.01 * ramp(IT0 // 150, 40) * adv,
        "BCE added": dice + 0.3 * sdf + lam * adv + bce,
        "SDF target sign flipped": dice + 0.3 * ((sdm[:2, 0].double() + target) ** 2).mean() + lam * adv,
    })


def test_sassnet_discriminator_phase_total(sassnet):
    stage, nets, batch = sassnet
    seg, disc = nets["seg"], nets["disc"]
    x = batch.image
    loss, _ = stage.losses("disc", nets, batch, IT0)
    assert not seg.training and disc.training
    with torch.no_grad():
        sdm_all, _ = seg(x)                # eval: running statistics, no dropout
        d = disc(sdm_all, x).double()      # predicted SDMs of all 4 samples, never ground-truth ones
        d_gt = disc(torch.cat([sdf_target(batch.label).float()[:, None], sdm_all[2:]]), x).double()
        sdm_train, _ = seg.train()(x)      # what a segmentation net left in train mode would give (last)
        d_train = disc(sdm_train, x).double()

    def ce_d(logits, t):
        return -torch.log_softmax(logits, 1)[torch.arange(4), torch.tensor(t)].mean()

    _check(loss, ce_d(d, [1, 1, 0, 0]), {
        "targets swapped": ce_d(d, [0, 0, 1, 1]),
        "all targets 'labeled'": ce_d(d, [1, 1, 1, 1]),
        "segmentation net in train mode": ce_d(d_train, [1, 1, 0, 0]),
        "ground-truth SDMs for the labeled samples": ce_d(d_gt, [1, 1, 0, 0]),
    })


# --------------------------------------------------------------------------- §3.4 DTC


def test_dtc_total():
    stage = DTC(_ctx())
    torch.manual_seed(7)
    nets = _deterministic(stage.networks())
    stage.train_modes(nets)
    batch = _batch(2, 2, seed=8)
    y = batch.label
    loss, _ = stage.losses("main", nets, batch, IT0)
    with torch.no_grad():
        sdm, seg = nets["student"](batch.image)
    sdm, prob = sdm.double(), torch.sigmoid(seg.double())
    target = sdf_target(y)
    dice = dice_sq(prob[:2, 0], y)
    mse = ((sdm[:2, 0] - target) ** 2).mean()
    heaviside = 1.0 / (1.0 + torch.exp(1500.0 * sdm))  # σ(-1500·sdm): inside (negative) -> 1
    l_dtc = ((heaviside - prob) ** 2).mean()            # all 4 samples, every voxel
    lam = ramp(IT0 // 150, 40)
    sup = dice + 0.3 * mse
    no_bd = sdf_target(y).numpy()
    face = ndimage.generate_binary_structure(3, 1)
    for i, lab in enumerate(y.numpy()):  # the target without the boundary zeros
        fg = lab != 0
        neg, pos = ndimage.distance_transform_edt(~fg), ndimage.distance_transform_edt(fg)
        no_bd[i] = (neg - neg.min()) / (neg.max() - neg.min()) - (pos - pos.min()) / (pos.max() - pos.min())
        assert (fg & ~ndimage.binary_erosion(fg, face, border_value=1)).any()
    bce = -(y * torch.log(prob[:2, 0]) + (1 - y) * torch.log(1 - prob[:2, 0])).mean()
    _check(loss, sup + lam * l_dtc, {
        "consistency dropped": sup,
        "consistency on the labeled samples only": sup + lam * ((heaviside[:2] - prob[:2]) ** 2).mean(),
        "Heaviside sign flipped": sup + lam * ((1.0 / (1.0 + torch.exp(-1500.0 * sdm)) - prob) ** 2).mean(),
        "λ ramp one iteration early": sup + ramp((IT0 + 1) // 150, 40) * l_dtc,
        "β = 0.3 dropped": dice + mse + lam * l_dtc,
        "SDF term dropped": dice + lam * l_dtc,
        "SDF target sign flipped": dice + 0.3 * ((sdm[:2, 0] + target) ** 2).mean() + lam * l_dtc,
        "SDF boundary not zeroed": dice + 0.3 * ((sdm[:2, 0] - torch.from_numpy(no_bd)) ** 2).mean() + lam * l_dtc,
        "BCE added": sup + bce + lam * l_dtc,
    })


# --------------------------------------------------------------------------- §3.5 SS-Net


def test_ssnet_total_with_vat_on_all_four_samples():
    stage = SSNet(_ctx())
    torch.manual_seed(9)
    nets = _deterministic(stage.networks())
    net = nets["student"]
    net.train()
    batch = _batch(2, 2, seed=10)
    _set_foreground_fraction(net, batch.image, 0.5)
    twin = copy.deepcopy(net)  # the same state before the step (the memory update reads BN1d running stats)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x, y = batch.image, batch.label
    loss, _ = stage.losses("main", nets, batch, IT0)

    # ---- the forwards the network saw: 2 clean ones (main, VAT target), then 2 perturbed ones of all 4
    clean = [t for t in seen if t.shape == x.shape and torch.equal(t, x)]
    perturbed = [t for t in seen if not (t.shape == x.shape and torch.equal(t, x))]
    assert len(clean) == 2 and len(perturbed) == 2, [tuple(t.shape) for t in seen]
    for t in perturbed:
        assert t.shape == x.shape  # VAT over the whole batch (2 labeled + 2 unlabeled)
        norms = (t - x).flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full((4,), 10.0), rtol=1e-4, atol=1e-4)  # ξ = ε = 10 per sample

    with torch.no_grad():
        logits, feats = twin(x, return_features=True)
    prob = torch.softmax(logits.double(), 1)
    pred = prob.argmax(1)
    assert (prob[:, 1] - 0.5).abs().min() > 1e-6
    dice = dice_lin(prob[:2, 1], y)

    # ---- memory (§3.5 step 3): correctly predicted foreground, projected in eval mode, 32 lowest-scored
    vox = feats.permute(0, 2, 3, 4, 1)
    correct_fg = (pred[:2] == y) & (pred[:2] == 1)
    with torch.no_grad():
        twin.projection_head.eval()
        proj = twin.projection_head(vox[:2][correct_fg])
        twin.projection_head.train()
        score = torch.sigmoid(twin.selectors_feat[1](proj))[:, 0]  # selector in train mode
    assert proj.shape[0] > 32
    order = torch.argsort(score)
    mem_low, mem_high = proj[order[:32]], proj[order.flip(0)[:32]]

    def cl(queries_raw, classes, mem1):
        """Σ_c mean_ij (1 - cos(q_i, k_j))·w_i·v_j / 2 over classes with memory (only c = 1 has one)."""
        q_raw = queries_raw[classes == 1]
        assert q_raw.shape[0] >= 2
        q = q_raw / q_raw.norm(dim=1, keepdim=True)
        k = mem1 / mem1.norm(dim=1, keepdim=True)
        dist = 1.0 - q @ k.t()
        w = torch.sigmoid(twin.selectors_feat[1](q_raw))[:, 0]
        w = w * (w.shape[0] / w.sum())
        s = torch.sigmoid(twin.selectors_mem[1](k))[:, 0]
        v = (1.0 / s) * s  # the reference's "normalisation" of the memory weights: all 1 (§3.5 step 4)
        return (dist * w[:, None] * v[None, :]).mean().double() / 2

    n_feat = vox.shape[-1]
    with torch.no_grad():
        q_l = twin.prediction_head(twin.projection_head(vox[:2].reshape(-1, n_feat)))  # every labeled voxel
        q_u = twin.prediction_head(twin.projection_head(vox[2:].reshape(-1, n_feat)))  # every unlabeled voxel
        cl_l, cl_u = cl(q_l, y.reshape(-1), mem_low), cl(q_u, pred[2:].reshape(-1), mem_low)
        cl_l_high, cl_u_high = cl(q_l, y.reshape(-1), mem_high), cl(q_u, pred[2:].reshape(-1), mem_high)

    # ---- VAT (§3.5 step 6), from the direction the power iteration started from
    with torch.no_grad():
        target = torch.softmax(twin(x), 1)  # clean prediction of all 4, train mode
    start = perturbed[0].clone().requires_grad_(True)  # x + ξ·d0
    (grad,) = torch.autograd.grad(dice_lin(torch.softmax(twin(start), 1), target), start)
    d1 = grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1) + 1e-8)
    x_adv = x + 10.0 * d1
    torch.testing.assert_close(perturbed[1], x_adv, rtol=0, atol=1e-4)  # x + ε·d, d the normalised gradient
    with torch.no_grad():
        vat = dice_lin(torch.softmax(twin(x_adv), 1), target)
    ce_l = ce(logits[:2], y)

    lam = ramp((IT0 + 1) // 150, 40)  # the reference increments iter_num before the ramp (§3.5 step 7)
    _check(loss, dice + lam * (vat + 0.1 * (cl_l + cl_u)), {
        "λ from it0 // 150": dice + ramp(IT0 // 150, 40) * (vat + 0.1 * (cl_l + cl_u)),
        "VAT dropped": dice + lam * 0.1 * (cl_l + cl_u),
        "unlabeled contrastive dropped": dice + lam * (vat + 0.1 * cl_l),
        "labeled contrastive dropped": dice + lam * (vat + 0.1 * cl_u),
        "contrastive weight 1": dice + lam * (vat + cl_l + cl_u),
        "memory keeps the highest-scored": dice + lam * (vat + 0.1 * (cl_l_high + cl_u_high)),
        "Dice dropped": lam * (vat + 0.1 * (cl_l + cl_u)),
        "CE added": dice + ce_l + lam * (vat + 0.1 * (cl_l + cl_u)),
    })


# --------------------------------------------------------------------------- §3.6 BCP


SIDE = 16 * 2 // 3  # ⌊16·2/3⌋ = 10 per axis


def _spy_cut_mask(monkeypatch):
    real, drawn = methods.bcp.random_cut_mask, []

    def spy(*args, **kwargs):
        m = real(*args, **kwargs)
        drawn.append(m.clone())
        return m

    monkeypatch.setattr(methods.bcp, "random_cut_mask", spy)
    return drawn


def _spec_mask(drawn):
    """M rebuilt from §3.6 after checking the drawn one: 1 outside one cuboid of sides ⌊n·2/3⌋, 0 inside."""
    assert len(drawn) == 1, "one cuboid per iteration, shared by the whole batch"
    inside = ~drawn[0].bool()
    assert tuple(inside.shape) == P
    idx = inside.nonzero()
    origin = idx.min(0).values.tolist()
    assert (idx.max(0).values - idx.min(0).values + 1).tolist() == [SIDE] * 3
    assert all(0 <= o <= 16 - SIDE - 1 for o in origin)
    m = torch.ones(P, dtype=torch.bool)
    m[origin[0]:origin[0] + SIDE, origin[1]:origin[1] + SIDE, origin[2]:origin[2] + SIDE] = False
    assert torch.equal(m, drawn[0].bool())
    return m


def _record_inputs(net):
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def test_bcp_stage1_total(monkeypatch):
    stage = BCPStage1(_ctx())
    torch.manual_seed(11)
    nets = _deterministic(stage.networks())
    stage.train_modes(nets)
    batch = _batch(4, 4, seed=12)
    drawn = _spy_cut_mask(monkeypatch)
    seen = _record_inputs(nets["student"])
    loss, _ = stage.losses("main", nets, batch, IT0)
    m = _spec_mask(drawn)
    lab, y = batch.labeled_image, batch.label
    mix_x = torch.where(m, lab[0:2], lab[2:4])  # L_a outside, L_b's centre cuboid; the label mixed alike
    mix_y = torch.where(m, y[0:2], y[2:4])
    assert len(seen) == 1 and torch.equal(seen[0], mix_x)  # one forward of the 2 mixed volumes
    with torch.no_grad():
        z = nets["student"](mix_x)
    c, d = ce(z, mix_y), dice_mc(z, mix_y)
    p, g = torch.softmax(z.double(), 1), torch.stack([mix_y == 0, mix_y == 1], 1).double()
    d_no2 = 1 - ((p * g).flatten(2).sum(2) + 1e-5) / ((p + g).flatten(2).sum(2) + 1e-5)
    _check(loss, 0.5 * (c + d), {
        "no 0.5": c + d,
        "Dice dropped": 0.5 * c,
        "CE dropped": 0.5 * d,
        "DiceMC without the factor 2": 0.5 * (c + d_no2.mean()),
    })


def test_bcp_stage2_total(monkeypatch):
    stage = BCPStage2(_ctx())
    torch.manual_seed(13)
    nets = _deterministic(stage.networks())
    student, teacher = nets["student"], nets["teacher"]
    stage.train_modes(nets)
    batch = _batch(4, 4, seed=14)
    with torch.no_grad():  # a confident teacher with ~20 % foreground ...
        teacher.out_conv.weight.mul_(6.0)
    _set_foreground_fraction(teacher, batch.unlabeled_image[0:2], 0.2)
    # ... and, as at the start of stage 2, the student initialised from the same weights: it agrees with the
    # pseudo-labels far more than with the labels, so the two regions' losses (and their weights) differ
    stage.init_from(nets, {k: v.clone() for k, v in teacher.state_dict().items()})
    drawn = _spy_cut_mask(monkeypatch)
    seen = _record_inputs(student)
    loss, _ = stage.losses("main", nets, batch, IT0)
    m = _spec_mask(drawn)
    lab, y, unl = batch.labeled_image, batch.label, batch.unlabeled_image
    with torch.no_grad():
        pl_a, pl_b = hard_pseudo_label(teacher(unl[0:2])), hard_pseudo_label(teacher(unl[2:4]))
    for pl in (pl_a, pl_b):
        assert 0 < int(pl.sum()) < pl.numel()
    x_in = torch.where(m, lab[0:2], unl[0:2])   # labeled outside, unlabeled cuboid inside
    x_out = torch.where(m, unl[2:4], lab[2:4])  # unlabeled outside, labeled cuboid inside
    assert len(seen) == 2 and torch.equal(seen[0], x_in) and torch.equal(seen[1], x_out)  # two forwards of 2
    with torch.no_grad():
        z_in, z_out = student(x_in), student(x_out)
        z_in_swapped = student(torch.where(m, unl[0:2], lab[0:2]))
    outside, inside = m.double(), 1.0 - m.double()

    def mix_loss(z, t_out, t_in, w_out, w_in, masked_ce_fn=masked_ce):
        return 0.5 * (w_out * dice_mc(z, t_out, outside) + w_in * dice_mc(z, t_in, inside)
                      + w_out * masked_ce_fn(z, t_out, outside) + w_in * masked_ce_fn(z, t_in, inside))

    def mean_ce(z, t, mm):  # masked CE normalised by every voxel instead of the mask
        ce_v = -torch.log_softmax(z.double(), 1).gather(1, t[:, None])[:, 0]
        return (ce_v * mm).mean()

    l_in = mix_loss(z_in, y[0:2], pl_a, 1.0, 0.5)
    l_out = mix_loss(z_out, pl_b, y[2:4], 0.5, 1.0)
    _check(loss, l_in + l_out, {
        "in-volume weights swapped": mix_loss(z_in, y[0:2], pl_a, 0.5, 1.0) + l_out,
        "out-volume weights swapped": l_in + mix_loss(z_out, pl_b, y[2:4], 1.0, 0.5),
        "u_weight 1": mix_loss(z_in, y[0:2], pl_a, 1.0, 1.0) + mix_loss(z_out, pl_b, y[2:4], 1.0, 1.0),
        "X_in with labeled and unlabeled swapped": mix_loss(z_in_swapped, y[0:2], pl_a, 1.0, 0.5) + l_out,
        "X_in dropped": l_out,
        "X_out dropped": l_in,
        "no 0.5": 2 * (l_in + l_out),
        "masked CE over all voxels": mix_loss(z_in, y[0:2], pl_a, 1.0, 0.5, mean_ce)
        + mix_loss(z_out, pl_b, y[2:4], 0.5, 1.0, mean_ce),
    })


# --------------------------------------------------------------------------- §3.7 OMF


def _omf_stage1_batch():
    batch = _batch(4, 4, seed=15)
    y = batch.label
    # y_A and y_B overlap partly in both pairs: union, intersection and either label all differ
    for i in (0, 1):
        inter = (y[i] & y[i + 2]).sum()
        assert 0 < inter < min(y[i].sum(), y[i + 2].sum())
    return batch


@pytest.mark.parametrize("cls", [OMFStage1, OMFStage1Overlay], ids=["omf-s1-orgloss", "omf-s1"])
def test_omf_stage1_total(cls):
    stage = cls(_ctx())
    torch.manual_seed(16)
    nets = _deterministic(stage.networks())
    stage.train_modes(nets)
    net = nets["student"]
    batch = _omf_stage1_batch()
    loss, _ = stage.losses("main", nets, batch, IT0)
    lab, y = batch.labeled_image, batch.label
    a, b, y_a, y_b = lab[0:2], lab[2:4], y[0:2], y[2:4]
    x_ov = torch.where(y_a[:, None].bool(), a, b)      # A's atrium pasted onto B
    y_ov = (y_a.bool() | y_b.bool()).long()           # union of both atria
    with torch.no_grad():                              # three forwards of 2 samples each
        z_ov, z_a, z_b = net(x_ov), net(a), net(b)
        z_rev = net(torch.where(y_b[:, None].bool(), b, a))
    l_ov, l_a, l_b = sup_mc(z_ov, y_ov), sup_mc(z_a, y_a), sup_mc(z_b, y_b)
    l_ov_inter = sup_mc(z_ov, (y_a.bool() & y_b.bool()).long())
    l_ov_a = sup_mc(z_ov, y_a)
    if cls.orgloss:
        _check(loss, l_ov + l_a + l_b, {
            "L_B dropped": l_ov + l_a,
            "L_A dropped": l_ov + l_b,
            "L_ov dropped": l_a + l_b,
            "overlay label: intersection": l_ov_inter + l_a + l_b,
            "overlay label: A's only": l_ov_a + l_a + l_b,
            "B's atrium pasted onto A": sup_mc(z_rev, y_ov) + l_a + l_b,
            "no 0.5": 2 * (l_ov + l_a + l_b),
        })
    else:
        _check(loss, l_ov, {
            "orgloss added": l_ov + l_a + l_b,
            "overlay label: intersection": l_ov_inter,
            "B's atrium pasted onto A": sup_mc(z_rev, y_ov),
            "no 0.5": 2 * l_ov,
        })


def test_omf_stage2_total():
    stage = OMFStage2(_ctx())
    torch.manual_seed(17)
    nets = _deterministic(stage.networks())
    student, teacher = nets["student"], nets["teacher"]
    with torch.no_grad():  # different student and teacher weights, as after a few stage-2 steps
        teacher.out_conv.weight.mul_(6.0)
    stage.train_modes(nets)
    batch = _batch(4, 4, seed=18)
    _set_foreground_fraction(teacher, batch.unlabeled_image[2:4], 0.3)
    loss, _ = stage.losses("main", nets, batch, IT0)
    q, p = batch.unlabeled_image[0:2], batch.unlabeled_image[2:4]
    with torch.no_grad():
        z_q, z_p = teacher(q), teacher(p)   # separate forwards of 2 (train mode: batch statistics)
    y_p = hard_pseudo_label(z_p)
    raw_p = (torch.softmax(z_p, 1)[:, 1] >= 0.5).long()
    assert 0 < int(y_p.sum()) < y_p.numel()
    assert not torch.equal(raw_p, y_p)  # the LCC removes something
    x_mix = torch.where(y_p[:, None].bool(), p, q)  # P's pseudo-atrium pasted onto the clean Q
    with torch.no_grad():
        z_s = student(x_mix)
        z_s_raw = student(torch.where(raw_p[:, None].bool(), p, q))
        z_s_rev = student(torch.where(y_p[:, None].bool(), q, p))
        z_t_mix = teacher(x_mix)
    l_a = softmax_sq(z_s, z_q).mean()  # mean over 2 samples × 2 channels × voxels
    _check(loss, 1.7 * l_a, {
        "weight 1.7 dropped": l_a,
        "weight 1.5 (an earlier run)": 1.5 * l_a,
        "target: the teacher on P": 1.7 * softmax_sq(z_s, z_p).mean(),
        "target: the teacher on the overlaid input": 1.7 * softmax_sq(z_s, z_t_mix).mean(),
        "overlay without LCC": 1.7 * softmax_sq(z_s_raw, z_q).mean(),
        "Q pasted onto P": 1.7 * softmax_sq(z_s_rev, z_q).mean(),
        "sum over the channels": 1.7 * 2 * l_a,
    })
