"""SS-Net (Wu et al., MICCAI 2022), docs/methods.md §3.5 (ycwu1997/SS-Net ``code/train_ss_3d.py``).

V-Net head A with SS-Net's MLP heads (§1.5): projection head g, prediction head h, per-class
selectors s_c (queries) and s^mem_c (memory). The forward also returns F, the dec9 features after
dropout. Per iteration, batch 2 labeled + 2 unlabeled, network in train mode (§3.5 steps 1–7):

1. logits, F = f(x); P = softmax(logits).
2. M = (argmax P = y) ∧ (argmax P = 1) on the labeled samples: correctly predicted foreground.
3. Memory update, no gradient: g(F[M]) with the network temporarily in eval mode; per class at most
   32 vectors; more than 32 candidates are ranked by σ(s_c(·)) (selector in train mode) sorted
   ASCENDING and the first 32 kept (the reference's quirk: the lowest-scored ones). A class with no
   candidate this iteration keeps its previous memory; otherwise the memory is replaced. Only class
   1 ever gets candidates, so the class-0 memory stays empty.
4. L_cl^L: h(g(F)) of every labeled voxel (gradient, BN1d in train mode), classes = y.
5. L_cl^U: the same on the unlabeled voxels, classes = argmax P (no threshold).
   For a class c with memory (≥ 2 vectors) and ≥ 2 queries (:func:`class_contrastive_loss`):
   D_ij = 1 - cos(q_i, k_j), w_i = σ(s_c(raw query, detached)) rescaled to mean 1, v_j the memory
   weights, loss_c = mean_ij D_ij·w_i·v_j; L_cl = Σ_c loss_c / 2.
6. L_vat: VAT on all 4 samples (``ssl_bench.vat``): ξ = 10, ε = 10, one power iteration,
   DiceFG-lin over the full two-channel softmax tensors, BN running-stat tracking off in the
   perturbed forwards.
7. L = DiceFG-lin(P[L, 1], y) + λ(t)·(L_vat + 0.1·(L_cl^L + L_cl^U)), λ(t) = sigmoid_rampup(t//150, 40).
   The labeled CE is computed and logged, not added.

Memory weights (option ``ssnet_memory_weights``): the reference rescales σ(s^mem_c(k)) "to mean 1"
over a transposed (1, N) tensor, so each weight is multiplied by its own reciprocal, (1/s)·s, and
every v_j is 1 up to rounding (the memory selector gets only float-noise gradients). The arithmetic
is the reference's, (1/s)·s and not s/s (docs/methods.md §3.5 step 4). ``"code"`` (default) reproduces that;
``"mean"`` is the named variant that rescales the N memory weights to mean 1 as §3.5 words it.

Ramp: the reference increments ``iter_num`` before computing λ, so t = completed iterations + 1.

Memory use: the projection and prediction heads run over every labeled and every unlabeled voxel
(≈ 2.0 M vectors each at 112×112×80), as in the reference — their BN1d batch statistics couple all
voxels, so a subset would change the result. What is avoided: no per-class copy is made of the
queries of a class that has no memory (the ≈ 1.9 M background vectors), the memory update projects
only the correct-foreground voxels, and the cosine/weight computations touch only the
queries of class 1 against ≤ 32 memory vectors (run in float32, outside autocast).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ssl_bench.errors import UserError
from ssl_bench.losses import dice_fg_lin, sigmoid_rampup
from ssl_bench.method import Stage, register
from ssl_bench.vat import vat_loss

N_CLASSES = 2
MEMORY_WEIGHT_MODES = ("code", "mean")


@contextmanager
def _eval_mode(net: nn.Module):
    """Every module of ``net`` in eval mode for the block; each module's own mode restored after."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _take(x: torch.Tensor, mask: torch.Tensor, count: int | None) -> torch.Tensor:
    """``x[mask]`` (rows of x where the 1-D ``mask`` holds); with its ``count`` known, without a host sync.

    Boolean indexing runs ``nonzero`` and waits for the device to learn the result's size; given the
    size, ``nonzero_static`` yields the same indices in the same order, and indexing with them is the
    very operation ``x[mask]`` performs after its ``nonzero`` (same values, same gradient).
    """
    if count is None:
        return x[mask]
    try:
        index = torch.nonzero_static(mask, size=count)[:, 0]
    except NotImplementedError:  # a build without it for this device: the same rows, with the sync
        return x[mask]
    return x[index]


@torch.no_grad()
def update_memory(memory: list, projected: torch.Tensor, labels: torch.Tensor, selectors,
                  per_class: int = 32, counts: list[int] | None = None) -> list:
    """§3.5 step 3: the new per-class memory from projected candidate vectors (K, D) and their classes (K,).

    A class with candidates gets all of them when there are at most ``per_class``; otherwise the
    candidates are scored with σ(selectors[c](·)), sorted ascending, and the first ``per_class``
    (the lowest-scored) are kept. A class without candidates keeps ``memory[c]``. ``counts``: the
    candidates per class, when already known (no host synchronisation here then).
    """
    new = list(memory)
    for c in range(len(memory)):
        if counts is not None and counts[c] == 0:
            continue
        cand = _take(projected, labels == c, None if counts is None else counts[c])
        if cand.shape[0] == 0:
            continue
        if cand.shape[0] > per_class:
            score = torch.sigmoid(selectors[c](cand))[:, 0]
            order = torch.sort(score, dim=0).indices  # ascending: the reference's quirk
            cand = cand[order[:per_class]]
        new[c] = cand.detach().clone()
    return new


def class_contrastive_loss(queries: torch.Tensor, labels: torch.Tensor, memory: list, selectors_feat,
                           selectors_mem, memory_weights: str = "code", counts: list[int] | None = None) -> torch.Tensor:
    """§3.5 steps 4–5: Σ_c mean_ij (1 - cos(q_i, k_j))·w_i·v_j / n_classes over classes with memory.

    Args:
        queries: (N, D) predicted vectors h(g(F)), with gradient.
        labels: (N,) class of each query (ground truth or pseudo-label).
        memory: per class a (K_c, D) tensor (no gradient) or None.
        selectors_feat: per class the query selector s_c, fed the raw (unnormalised) queries, detached.
        selectors_mem: per class the memory selector s^mem_c, fed the L2-normalised memory.
        memory_weights: "code" (each weight times its own reciprocal, (1/s)·s: 1 up to rounding) or "mean"
            (rescaled to mean 1).
        counts: the queries per class, when already known (no host synchronisation here then).
    A class counts only when its memory has ≥ 2 vectors and it has ≥ 2 queries.
    """
    if memory_weights not in MEMORY_WEIGHT_MODES:
        raise ValueError(f"memory_weights must be one of {MEMORY_WEIGHT_MODES}, got {memory_weights!r}")
    total = torch.zeros((), device=queries.device, dtype=torch.float32)
    for c in range(len(memory)):
        mem = memory[c]
        if mem is None or mem.shape[0] < 2:
            continue  # no per-class copy of the queries of a class that cannot contribute
        if counts is not None and counts[c] < 2:
            continue
        q_raw = _take(queries, labels == c, None if counts is None else counts[c])
        if q_raw.shape[0] < 2:
            continue
        with _no_autocast(queries.device):
            q_raw = q_raw.float()
            k = F.normalize(mem.to(device=queries.device, dtype=torch.float32), dim=1)
            q = F.normalize(q_raw, dim=1)
            dist = 1.0 - q @ k.t()  # (M, K), in [0, 2]
            w = torch.sigmoid(selectors_feat[c](q_raw.detach()))[:, 0]
            w = w * (w.shape[0] / w.sum())  # rescaled to mean 1 over the queries
            s = torch.sigmoid(selectors_mem[c](k))[:, 0]
            # "code": (1/s)·s exactly as the reference computes it (docs/methods.md §3.5 step 4; not s/s, which
            # differs by an ulp and sends the memory selector other float-noise gradients)
            v = (1.0 / s) * s if memory_weights == "code" else s * (s.shape[0] / s.sum())
            total = total + torch.mean(dist * w[:, None] * v[None, :])
    return total / len(memory)


@register("ssnet")
class SSNet(Stage):
    """SS-Net: DiceFG-lin + λ(VAT + 0.1·class-separation contrastive), 15 000 iterations, best-on-test from 2000."""

    iterations = 15000
    batch_labeled = 2
    batch_unlabeled = 2
    base_lr = 0.01
    paper_lcc = True
    literature_selection = (2000, 200)
    known_options = ("ssnet_memory_weights",)

    consistency = 1.0  # --consistency
    rampup_length = 40.0  # --consistency_rampup, in units of 150 (scaled) iterations
    magnitude = 10.0  # --magnitude: VAT ε
    vat_xi = 10.0
    vat_ip = 1
    contrastive_weight = 0.1
    memory_per_class = 32

    def __init__(self, ctx):
        super().__init__(ctx)
        self.memory_weights = ctx.options.get("ssnet_memory_weights", "code")
        if self.memory_weights not in MEMORY_WEIGHT_MODES:
            raise UserError(f"ssnet_memory_weights must be one of {', '.join(MEMORY_WEIGHT_MODES)}, "
                            f"got {self.memory_weights!r}")
        self.memory: list = [None] * N_CLASSES

    def networks(self):
        return {"student": self.vnet(n_classes=N_CLASSES, head="A", dropout=True, mlp_heads=True)}

    def consistency_weight(self, it0: int) -> float:
        # the reference increments iter_num before computing the ramp: t = it0 + 1
        return self.consistency * sigmoid_rampup((it0 + 1) // self.scaled(150), self.rampup_length)

    def losses(self, phase, nets, batch, it0):
        net = nets["student"]
        nl = batch.n_labeled
        y = batch.label

        # 1. one forward of all samples
        logits, feats = net(batch.image, return_features=True)
        prob = torch.softmax(logits.float(), dim=1)
        pred = prob.argmax(dim=1)
        vox = feats.permute(0, 2, 3, 4, 1)  # (N, X, Y, Z, C): one feature vector per voxel
        n_feat = vox.shape[-1]

        # 2. correctly predicted foreground of the labeled samples
        correct_fg = (pred[:nl] == y) & (pred[:nl] == 1)
        fg_flat, y_flat, u_flat = correct_fg.reshape(-1), y.reshape(-1), pred[nl:].reshape(-1)
        # every data-dependent size of steps 3-5 in ONE host synchronisation (the sizes of the memory and
        # of the per-class query sets); the selections below then run without waiting for the device
        classes = range(N_CLASSES)
        counts = torch.stack([(fg_flat & (y_flat == c)).sum() for c in classes]
                             + [(y_flat == c).sum() for c in classes] + [(u_flat == c).sum() for c in classes]).tolist()
        n_cand, n_lab, n_unl = counts[:N_CLASSES], counts[N_CLASSES:2 * N_CLASSES], counts[2 * N_CLASSES:]

        # 3. memory update: projection in eval mode (BN1d running stats), no gradient
        vox_l = vox[:nl].reshape(-1, n_feat)  # one feature vector per labeled voxel
        if sum(n_cand) > 0:
            with torch.no_grad(), _no_autocast(vox.device):
                cand = _take(vox_l, fg_flat, sum(n_cand))
                with _eval_mode(net):
                    proj = net.projection_head(cand.float())
                self.memory = update_memory(self.memory, proj, _take(y_flat, fg_flat, sum(n_cand)),
                                            net.selectors_feat, self.memory_per_class, counts=n_cand)

        # 4. labeled class-separation loss, classes = ground truth
        q_lab = net.prediction_head(net.projection_head(vox_l))
        cl_l = class_contrastive_loss(q_lab, y_flat, self.memory, net.selectors_feat, net.selectors_mem,
                                      self.memory_weights, counts=n_lab)
        # 5. unlabeled class-separation loss, classes = argmax P (no threshold)
        q_unl = net.prediction_head(net.projection_head(vox[nl:].reshape(-1, n_feat)))
        cl_u = class_contrastive_loss(q_unl, u_flat, self.memory, net.selectors_feat,
                                      net.selectors_mem, self.memory_weights, counts=n_unl)

        # supervised: DiceFG-lin on the foreground channel; CE logged only
        y_fg = (y == 1).float()
        dice = dice_fg_lin(prob[:nl, 1], y_fg)
        with torch.no_grad():
            ce = F.cross_entropy(logits[:nl].float(), y)

        # 6. VAT on all samples, labeled included
        vat = vat_loss(lambda inp: torch.softmax(net(inp).float(), dim=1), batch.image, distance=dice_fg_lin,
                       xi=self.vat_xi, eps=self.magnitude, ip=self.vat_ip, bn_module=net,
                       full_precision=True)  # float32 VAT forwards under every precision (docs/methods.md Decision 7)

        # 7. total
        lam = self.consistency_weight(it0)
        loss = dice + lam * (vat + self.contrastive_weight * (cl_l + cl_u))
        mem1 = self.memory[1]
        return loss, {"dice": dice, "ce": ce, "vat": vat, "cl_l": cl_l, "cl_u": cl_u, "consistency_weight": lam,
                      "memory_fg": 0 if mem1 is None else int(mem1.shape[0])}

    def extra_state(self):
        return {"memory": [None if m is None else m.detach().cpu() for m in self.memory]}

    def load_extra_state(self, state) -> None:
        if state is not None:
            self.memory = list(state["memory"])
