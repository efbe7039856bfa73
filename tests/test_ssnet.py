"""SS-Net (docs/methods.md §3.5): memory bank, class-separation loss, one full iteration, and a smoke run."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from methods.ssnet import SSNet, class_contrastive_loss, update_memory
from ssl_bench.data import Batch
from ssl_bench.errors import UserError
from ssl_bench.method import StageContext
from ssl_bench.networks import VNet

PATCH = (16, 16, 16)


def _axis_selector(axis: int, dim: int = 32) -> nn.Linear:
    """A selector whose logit is coordinate ``axis`` of its input (known scores)."""
    lin = nn.Linear(dim, 1)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, axis] = 1.0
        lin.bias.zero_()
    return lin


def _sig(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


# --------------------------------------------------------------------------- memory bank (§3.5 step 3)


def test_memory_keeps_the_32_lowest_scored_candidates():
    torch.manual_seed(0)
    projected = torch.randn(100, 32)
    projected[:, 0] = torch.randperm(100).float() / 10 - 5  # selector score σ(x₀): distinct, known order
    labels = torch.ones(100, dtype=torch.long)
    previous0 = torch.full((3, 32), 7.0)
    new = update_memory([previous0, None], projected, labels, [None, _axis_selector(0)], per_class=32)
    lowest = torch.argsort(projected[:, 0])[:32]
    assert torch.equal(new[1], projected[lowest])  # ascending sort, first 32 kept: the lowest scores
    assert new[1][:, 0].max() < projected[:, 0].sort().values[32]
    assert new[0] is previous0  # a class without candidates keeps its memory


def test_memory_with_few_candidates_keeps_them_all_and_is_replaced():
    old = [None, torch.zeros(32, 32)]
    projected = torch.randn(10, 32)
    new = update_memory(old, projected, torch.ones(10, dtype=torch.long), [None, None], per_class=32)
    assert torch.equal(new[1], projected) and new[0] is None
    assert old[1].shape == (32, 32)  # the input list is not modified


# --------------------------------------------------------------------------- class-separation loss (§3.5 steps 4-5)


class _Recording(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x)
        return self.inner(x)


def _tiny_example():
    e = torch.eye(32)
    queries = torch.stack([2 * e[0], e[1], e[0] + e[1], e[0], -e[1]]).requires_grad_(True)
    labels = torch.tensor([1, 1, 1, 0, 0])
    memory = [None, torch.stack([e[0], 3 * e[1]])]  # normalised: e0, e1
    return queries, labels, memory


def _hand_loss(memory_weights: str) -> float:
    # D = 1 - cos: q = 2e0 -> [0, 1]; e1 -> [1, 0]; e0+e1 -> [1-1/√2, 1-1/√2]
    r = 1 - 1 / math.sqrt(2)
    dist = [[0.0, 1.0], [1.0, 0.0], [r, r]]
    raw_w = [_sig(2.0), _sig(0.0), _sig(1.0)]  # s_1 reads coordinate 0 of the RAW query: 2, 0, 1
    w = [x * 3 / sum(raw_w) for x in raw_w]
    if memory_weights == "code":
        v = [1.0, 1.0]
    else:
        raw_v = [_sig(0.0), _sig(1.0)]  # s^mem_1 reads coordinate 1 of the normalised memory: 0, 1
        v = [x * 2 / sum(raw_v) for x in raw_v]
    loss_1 = sum(dist[i][j] * w[i] * v[j] for i in range(3) for j in range(2)) / 6
    return loss_1 / 2  # Σ_c loss_c / n_classes, class 0 has no memory


@pytest.mark.parametrize("mode", ["code", "mean"])
def test_weighted_cosine_loss_tiny_example_by_hand(mode):
    queries, labels, memory = _tiny_example()
    sel_feat = _Recording(_axis_selector(0))
    sel_mem = _axis_selector(1)
    loss = class_contrastive_loss(queries, labels, memory, [None, sel_feat], [None, sel_mem], mode)
    assert loss.item() == pytest.approx(_hand_loss(mode), rel=1e-6)
    # the query selector sees the raw class-1 queries, detached
    (seen,) = sel_feat.seen
    assert torch.equal(seen, queries[:3].detach()) and not seen.requires_grad
    loss.backward()
    assert queries.grad[:3].abs().sum() > 0 and queries.grad[3:].abs().sum() == 0
    if mode == "code":  # every memory weight is (1/s)·s = 1 up to rounding: no useful gradient
        assert sel_mem.weight.grad.abs().max().item() < 1e-6
    else:
        assert sel_mem.weight.grad.abs().max().item() > 1e-3


def test_loss_needs_two_queries_and_two_memory_vectors():
    queries, labels, memory = _tiny_example()
    sel = [None, _axis_selector(0)]
    one_memory = [None, memory[1][:1]]
    assert class_contrastive_loss(queries, labels, one_memory, sel, sel).item() == 0.0
    one_query = torch.tensor([1, 0, 0, 0, 0])
    assert class_contrastive_loss(queries, one_query, memory, sel, sel).item() == 0.0
    assert class_contrastive_loss(queries, labels, [None, None], sel, sel).item() == 0.0


# --------------------------------------------------------------------------- one full iteration (§3.5 steps 1-7)


@pytest.fixture(scope="module")
def iteration():
    torch.manual_seed(0)
    stage = SSNet(StageContext(labeled=8, patch=PATCH, n_filters=4))
    # dropout off so that a twin network reproduces the iteration's forward exactly
    net = VNet(n_filters=4, n_classes=2, head="A", dropout=False, mlp_heads=True)
    with torch.no_grad():
        net.out_conv.bias.copy_(torch.tensor([-5.0, 5.0]))  # every voxel predicted foreground
    image = torch.randn(4, 1, *PATCH)
    label = torch.zeros(2, *PATCH, dtype=torch.long)
    label[:, 5:11, 5:11, 5:11] = 1  # 2·216 correctly predicted foreground voxels > 32
    batch = Batch(image=image, label=label, n_labeled=2)
    twin = copy.deepcopy(net)
    net.train()
    loss, parts = stage.losses("main", {"student": net}, batch, it0=5999)
    return stage, net, twin, batch, loss, parts


def test_memory_after_an_iteration(iteration):
    stage, net, twin, batch, _, _ = iteration
    assert stage.memory[0] is None  # background never enters the memory
    twin.train()
    with torch.no_grad():
        logits, feats = twin(batch.image, return_features=True)
        pred = logits.argmax(dim=1)[:2]
        correct_fg = (pred == batch.label) & (pred == 1)
        assert int(correct_fg.sum()) == 432
        cand = feats.permute(0, 2, 3, 4, 1)[:2][correct_fg]
        twin.projection_head.eval()  # running statistics
        proj = twin.projection_head(cand)
        twin.projection_head.train()
        assert not torch.allclose(twin.projection_head(cand), proj, atol=1e-3)  # the mode matters here
        score = torch.sigmoid(twin.selectors_feat[1](proj))[:, 0]  # selector in train mode
        expected = proj[torch.argsort(score)[:32]]
    assert stage.memory[1].shape == (32, 32)
    assert torch.allclose(stage.memory[1], expected, atol=1e-5)
    # every module is back in train mode after the temporary eval
    assert all(m.training for m in net.modules())


def test_bn_statistics_are_updated_only_where_the_reference_updates_them(iteration):
    _, net, _, _, _, _ = iteration
    counts = {name: int(m.num_batches_tracked) for name, m in net.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    # BN3d: the main forward and the VAT target forward; the two perturbed VAT forwards do not count
    assert all(c == 2 for name, c in counts.items() if not name.startswith(("projection", "prediction", "selectors")))
    assert counts["projection_head.1"] == 2 and counts["prediction_head.1"] == 2  # labeled + unlabeled; eval pass not
    assert counts["selectors_feat.1.1"] == 3  # memory ranking + labeled + unlabeled queries
    assert counts["selectors_mem.1.1"] == 2
    assert counts["selectors_feat.0.1"] == 0 and counts["selectors_mem.0.1"] == 0


def test_total_loss_composition(iteration):
    stage, _, twin, batch, loss, parts = iteration
    with torch.no_grad():
        logits = twin.train()(batch.image)
        p = torch.softmax(logits, dim=1)[:2, 1]
        g = batch.label.float()
        dice = 1 - (2 * (p * g).sum() + 1e-8) / (p.sum() + g.sum() + 1e-8)
        ce = -torch.log_softmax(logits[:2], dim=1).gather(1, batch.label[:, None]).mean()
    assert parts["dice"].item() == pytest.approx(dice.item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["consistency_weight"] == 1.0  # it0 = 5999: (5999 + 1) // 150 = 40
    assert parts["cl_l"].item() > 0 and parts["cl_u"].item() > 0 and parts["vat"].item() >= 0
    expected = parts["dice"] + 1.0 * (parts["vat"] + 0.1 * (parts["cl_l"] + parts["cl_u"]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(loss.item() - (expected + parts["ce"]).item()) > 1.0  # the CE is logged, not added


def test_rampup_counts_the_current_iteration():
    stage = SSNet(StageContext(labeled=8, patch=PATCH, n_filters=4))
    assert stage.consistency_weight(0) == pytest.approx(math.exp(-5))
    assert stage.consistency_weight(148) == pytest.approx(math.exp(-5))
    assert stage.consistency_weight(149) == pytest.approx(math.exp(-5 * (39 / 40) ** 2))
    assert stage.consistency_weight(5998) < 1.0 and stage.consistency_weight(5999) == 1.0


def test_memory_survives_resume(iteration):
    stage = iteration[0]
    other = SSNet(StageContext(labeled=8, patch=PATCH, n_filters=4))
    other.load_extra_state(stage.extra_state())
    assert other.memory[0] is None and torch.equal(other.memory[1], stage.memory[1])


def test_unknown_memory_weight_option_is_refused():
    with pytest.raises(UserError):
        SSNet(StageContext(labeled=8, patch=PATCH, n_filters=4, options={"ssnet_memory_weights": "typo"}))


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("protocol", ["honest", "literature"])
def test_ssnet_smoke_run(la_root, tmp_path, protocol):
    """Every file, and how the trainer treats a literature selection that starts after the run ends.

    SS-Net's selection starts at iteration 2000; a smoke run is far shorter, so under `literature`
    no test-set evaluation happens during training and the LAST weights are handed on and evaluated,
    exactly as under `honest`. (The smoke profile is shortened further to 1 iteration and 1 test case
    to keep the CPU time of the test suite small.)
    """
    from ssl_bench.cli import main

    out = tmp_path / "r"
    rc = main(["run", "--method", "ssnet", "--profile", "smoke", "--protocol", protocol,
               "--iterations", "1", "--eval-cases", "1", "--data", str(la_root), "--out", str(out), "--quiet"])
    assert rc == 0
    for name in ("config.json", "log.jsonl", "metrics_per_case.csv", "summary.json", "checkpoints/last.pt",
                 "stages/stage1.pt"):
        assert (out / name).is_file(), name
    st = json.loads((out / "config.json").read_text())["method"]["stages"][0]
    assert st["literature_selection"] == [2000, 200] and st["paper_lcc"] is True
    assert (st["batch_labeled"], st["batch_unlabeled"]) == (2, 2)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"dice", "ce", "vat", "cl_l", "cl_u", "memory_fg"} <= set(rows[0])
    assert all("test_dice_raw" not in r for r in rows)
    assert not (out / "checkpoints" / "stage1_best.pt").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == protocol and summary["paper_post"] == "lcc"
    assert summary["checkpoint"]["selection"] == "last"
    assert summary["best_on_test"] == {"dice": None, "iteration": None}


def _contrastive_by_hand(queries, memory, sel_feat, sel_mem, v_rule):
    """§3.5 step 4 for one class with memory, written out with the reference's operation order."""
    q_raw = queries.float()
    k = torch.nn.functional.normalize(memory.float(), dim=1)
    q = torch.nn.functional.normalize(q_raw, dim=1)
    dist = 1.0 - q @ k.t()
    w = torch.sigmoid(sel_feat(q_raw.detach()))[:, 0]
    w = w * (w.shape[0] / w.sum())
    s = torch.sigmoid(sel_mem(k))[:, 0]
    total = torch.zeros(()) + torch.mean(dist * w[:, None] * v_rule(s)[None, :])
    return total / 2


def test_memory_weights_use_the_reference_arithmetic_one_over_s_times_s():
    # docs/methods.md §3.5 step 4: v = (1/s)·s as the code computes it, not s/s. The loss value cannot
    # tell them apart, but the float-noise gradient the memory selector receives can.
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(40, 32, generator=g)
    labels = torch.ones(40, dtype=torch.long)
    memory = torch.randn(32, 32, generator=g)
    sel_feat, sel_mem = nn.Linear(32, 1), nn.Linear(32, 1)
    with torch.no_grad():
        for lin in (sel_feat, sel_mem):
            lin.weight.copy_(torch.randn(1, 32, generator=g))
            lin.bias.zero_()

    def selector_grad(loss_fn):
        sel_feat.zero_grad()
        sel_mem.zero_grad()
        loss_fn(queries.clone().requires_grad_(True)).backward()
        return sel_mem.weight.grad.clone()

    got = selector_grad(lambda q: class_contrastive_loss(q, labels, [None, memory], [None, sel_feat],
                                                         [None, sel_mem], "code"))
    reference = selector_grad(lambda q: _contrastive_by_hand(q, memory, sel_feat, sel_mem, lambda s: (1.0 / s) * s))
    self_divided = selector_grad(lambda q: _contrastive_by_hand(q, memory, sel_feat, sel_mem, lambda s: s / s))
    assert not torch.equal(reference, self_divided)  # the example tells the two forms apart
    assert torch.equal(got, reference)
    assert got.abs().max() < 1e-6  # float noise only, in the reference too
