"""The CUDA-path items of issue 15, checked on CPU: padded window batches, the run's backend flags in
`eval` and `occlusion`, the foreach EMA, SS-Net's host synchronisations, Ray trials' GPU memory caps.

Expected values are written out here (window counts from docs/methods.md §2.1, TF32/cuDNN flags from
Decision 7, the EMA as today's per-parameter formula), never taken from the code's own helpers.
"""
import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_bench.data import Batch
from ssl_bench.evaluate import EvalSettings, evaluate_cases, sliding_window
from ssl_bench.networks import VNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CPU = torch.device("cpu")


def _prob_fn(net, x):
    return torch.softmax(net(x), dim=1)[:, 1]


def _n_windows(shape, patch, strides):
    """§2.1: per axis ceil((size - patch) / stride) + 1 windows (after padding a short axis up to the patch)."""
    return math.prod(math.ceil((max(s, p) - p) / st) + 1 for s, p, st in zip(shape, patch, strides))


# ------------------------------------------------------------------ padded window batches

#: (case shape, window batch): 4, 8, 18 and 24 windows, none a multiple of its batch (remainders 1, 3, 2, 3)
SHAPES = [((40, 30, 20), 3), ((33, 33, 17), 5), ((41, 36, 22), 4), ((45, 38, 27), 7)]
PATCH, STRIDE_XY, STRIDE_Z = (32, 32, 16), 8, 4


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return VNet(n_filters=2).eval()


@pytest.mark.parametrize("shape, batch", SHAPES)
def test_padding_the_last_batch_gives_the_unpadded_probabilities(small_net, shape, batch):
    n = _n_windows(shape, PATCH, (STRIDE_XY, STRIDE_XY, STRIDE_Z))
    assert n % batch  # the case this test is about: a short last batch
    image = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    seen = {}

    def recording(pad):
        def prob_fn(net, x):
            seen.setdefault(pad, []).append(x.shape[0])
            return _prob_fn(net, x)
        return prob_fn

    s = EvalSettings(patch=PATCH, stride_xy=STRIDE_XY, stride_z=STRIDE_Z, window_batch=batch)
    # oneDNN picks another convolution for a batch of ONE window (a 1-ulp difference), so the bit-for-bit
    # comparison runs on PyTorch's own convolution, whose per-window result does not depend on the batch
    with torch.backends.mkldnn.flags(enabled=False):
        plain = sliding_window(recording(False), small_net, image, replace(s, pad_windows=False), CPU)
        padded = sliding_window(recording(True), small_net, image, replace(s, pad_windows=True), CPU)
    assert np.array_equal(plain, padded)
    assert seen[False] == [batch] * (n // batch) + [n % batch]  # today: a short last batch
    assert seen[True] == [batch] * math.ceil(n / batch)  # padded: one input shape for the whole case
    # with the default CPU backend: the same probabilities up to that ulp
    default = sliding_window(_prob_fn, small_net, image, replace(s, pad_windows=True), CPU)
    assert np.abs(default - plain).max() < 1e-6


class _Data:
    def __init__(self, cases):
        self.cases = cases

    def load(self, case_id):
        return self.cases[case_id]


def test_padding_leaves_the_metrics_unchanged_and_is_recorded(small_net):
    rng = np.random.default_rng(3)
    cases = {}
    for k, (shape, _) in enumerate(SHAPES):
        label = np.zeros(shape, np.uint8)
        label[5:25, 6:22, 4:14] = 1
        cases[f"c{k}"] = ((2.0 * label + rng.normal(0, 0.5, shape)).astype(np.float32), label)
    data, ids = _Data(cases), list(cases)
    s = EvalSettings(patch=PATCH, stride_xy=STRIDE_XY, stride_z=STRIDE_Z, window_batch=5)
    plain, t_plain = evaluate_cases(_prob_fn, small_net, data, ids, replace(s, pad_windows=False), CPU, progress=False)
    padded, t_pad = evaluate_cases(_prob_fn, small_net, data, ids, replace(s, pad_windows=True), CPU, progress=False)
    assert plain == padded  # every metric of every case and post-processing, exactly
    counts = [_n_windows(shape, PATCH, (STRIDE_XY, STRIDE_XY, STRIDE_Z)) for shape, _ in SHAPES]
    assert t_pad["window_batch"] == t_plain["window_batch"] == 5
    assert t_pad["windows"] == t_plain["windows"] == sum(counts) == 4 + 8 + 18 + 24
    assert t_pad["padded_windows"] == 1 + 2 + 2 + 1 and t_plain["padded_windows"] == 0
    # the default pads on CUDA only: on CPU it changes nothing
    default, t_default = evaluate_cases(_prob_fn, small_net, data, ids, s, CPU, progress=False)
    assert default == plain and t_default["padded_windows"] == 0


# ------------------------------------------------------------------ the run's backend in eval and occlusion

FLAGS = ("benchmark", "deterministic", "matmul_tf32", "cudnn_tf32")


def _flags():
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def _set_flags(values):
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = values


def _declared(precision, fast):
    """Decision 7 on CUDA: cuDNN autotuning on the fast path, deterministic off it; TF32 off only for fp32."""
    return (fast, not fast, precision != "fp32", precision != "fp32")


#: two runs that declare opposite settings
RUNS = {"a": ("fp32", False), "b": ("bf16", True)}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from ssl_bench.testing import make_tiny_la
    from ssl_bench.trainer import build_config, run_training

    base = tmp_path_factory.mktemp("cuda_path")
    root = make_tiny_la(base / "LA", n_train=4, n_test=2)  # the V-Net baseline's batch is 4 labeled cases
    out = {}
    for name, (precision, fast) in RUNS.items():
        cfg = build_config("vnet", "smoke", labeled=4, patch=(16, 16, 16), n_filters=2, device="cpu", iterations=2,
                           eval_cases=2, eval_stride_xy=8, eval_stride_z=8, precision=precision, fast=fast)
        run_training(cfg, base / name, root, progress=False)
        out[name] = base / name
    return root, out


@pytest.fixture
def flag_spy(monkeypatch):
    """The backend as set on a GPU host (the flags can be set on CPU too), and the flags each evaluation sees."""
    import ssl_bench.evaluate as evaluate_mod
    import ssl_bench.precision as precision_mod
    import ssl_bench.run_setup as run_setup_mod

    saved = _flags()
    real_set, real_window = precision_mod.set_backend, evaluate_mod.sliding_window

    def as_on_cuda(precision, device_type, fast):
        assert device_type == "cpu"
        real_set(precision, "cuda", fast)

    seen = []

    def window(prob_fn, net, image, settings, device, reference_style=False):
        seen.append((settings.precision, _flags()))
        return real_window(prob_fn, net, image, settings, device, reference_style)

    monkeypatch.setattr(run_setup_mod, "set_backend", as_on_cuda)  # RunSetup._setup_backend
    monkeypatch.setattr(precision_mod, "set_backend", as_on_cuda)
    monkeypatch.setattr(evaluate_mod, "sliding_window", window)
    yield seen
    _set_flags(saved)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_eval_runs_under_the_runs_declared_backend(tiny_runs, flag_spy, name):
    from ssl_bench.cli import main

    precision, fast = RUNS[name]
    _set_flags(tuple(not v for v in _declared(precision, fast)))  # e.g. left behind by another run's training
    assert main(["eval", str(tiny_runs[1][name]), "--device", "cpu", "--quiet"]) == 0
    assert flag_spy and all(seen == (precision, _declared(precision, fast)) for seen in flag_spy)
    # the window batch the evaluation used is recorded with its timings (CPU: no padding by default)
    recorded = json.loads((tiny_runs[1][name] / "summary.json").read_text())["timings"]["eval"]
    assert recorded["window_batch"] == 8 and recorded["padded_windows"] == 0
    assert recorded["windows"] == 2 * _n_windows((24, 24, 20), (16, 16, 16), (8, 8, 8))  # 2 test cases


def test_occlusion_runs_each_run_under_its_declared_backend_and_records_precision(tiny_runs, flag_spy, tmp_path):
    from ssl_bench.occlusion import run_occlusion

    root, runs = tiny_runs
    _set_flags(_declared(*RUNS["b"]))  # the opposite of run a's, which is evaluated first
    out = tmp_path / "occ"
    manifest = run_occlusion([runs["a"], runs["b"]], ratios="0.2", repeats=1, out=out, device="cpu",
                             progress=False, panel=False, echo=lambda *_: None)
    assert {p for p, _ in flag_spy} == {"fp32", "bf16"}
    for precision, flags in flag_spy:
        name = "a" if precision == "fp32" else "b"
        assert flags == _declared(*RUNS[name]), (precision, dict(zip(FLAGS, flags)))
    with open(out / "occlusion_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["run"], r["precision"]) for r in rows} == {("a", "fp32"), ("b", "bf16")}
    with open(out / "occlusion_summary.csv") as f:
        assert {(r["run"], r["precision"]) for r in csv.DictReader(f)} == {("a", "fp32"), ("b", "bf16")}
    assert [(r["run"], r["precision"], r["fast"]) for r in manifest["runs"]] == [("a", "fp32", False), ("b", "bf16", True)]
    # ratio 0 under the run's own settings reproduces its clean evaluation
    assert all(r["ratio0_vs_clean"]["identical"] for r in manifest["runs"])


# ------------------------------------------------------------------ EMA as foreach operations

def _ema_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3), torch.nn.BatchNorm3d(3), torch.nn.Conv3d(3, 2, 1))


def test_ema_update_is_bit_identical_to_the_per_parameter_formula(monkeypatch):
    from ssl_bench.losses import ema_update

    teacher, student = _ema_net(1), _ema_net(2)
    ref_teacher = _ema_net(1)
    with torch.no_grad():
        for b in teacher.buffers():
            b.add_(3)  # buffers differ from the student's and must stay as they are
        for b in ref_teacher.buffers():
            b.add_(3)
    buffers_before = [b.clone() for b in teacher.buffers()]
    calls = []
    for name in ("_foreach_mul_", "_foreach_add_", "_foreach_copy_"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda tensors, *a, _real=real, _name=name, **k:
                            (calls.append((_name, len(tensors))), _real(tensors, *a, **k))[1])
    n_params = len(list(teacher.parameters()))
    for it0 in range(6):
        alpha = min(1.0 - 1.0 / (it0 + 1), 0.99)  # UA-MT's ramp (§3.2 item 8): 0, 1/2, 2/3, ...
        with torch.no_grad():
            for p in student.parameters():  # the student moves between updates
                p.add_(torch.randn_like(p) * 0.1)
            for t, s in zip(ref_teacher.parameters(), student.parameters()):  # today's formula, one tensor at a time
                if alpha == 0.0:
                    t.copy_(s)
                else:
                    t.mul_(alpha).add_(s, alpha=1.0 - alpha)
        calls.clear()
        ema_update(teacher, student, alpha)
        assert calls == ([("_foreach_copy_", n_params)] if alpha == 0.0
                         else [("_foreach_mul_", n_params), ("_foreach_add_", n_params)])
        for t, r in zip(teacher.parameters(), ref_teacher.parameters()):
            assert t.dtype == torch.float32 and torch.equal(t, r), it0
    for b, before in zip(teacher.buffers(), buffers_before):
        assert torch.equal(b, before)


# ------------------------------------------------------------------ SS-Net host synchronisations

class _SyncCounter:
    """Counts what makes the host wait for the device: reading a value (.item, .tolist, bool, int, float,
    .cpu, .numpy) and boolean-mask selection or nonzero (whose result size the host must learn)."""

    def __init__(self, monkeypatch):
        self.events = []
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero",
                     "masked_select"):
            self._wrap(monkeypatch, torch.Tensor, name, lambda *a, **k: True)
        self._wrap(monkeypatch, torch, "nonzero", lambda *a, **k: True)
        self._wrap(monkeypatch, torch, "masked_select", lambda *a, **k: True)
        self._wrap(monkeypatch, torch.Tensor, "__getitem__", lambda self_, index: _has_mask(index))

    def _wrap(self, monkeypatch, owner, name, counts):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if counts(*args, **kwargs):
                self.events.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def _has_mask(index):
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


def _ssnet_iteration():
    from methods.ssnet import SSNet
    from ssl_bench.method import StageContext

    torch.manual_seed(0)
    patch = (16, 16, 16)
    stage = SSNet(StageContext(labeled=8, patch=patch, n_filters=2))
    net = stage.networks()["student"]
    with torch.no_grad():
        net.out_conv.bias.copy_(torch.tensor([-0.3, 0.3]))  # both classes predicted: memory and both terms active
    g = torch.Generator().manual_seed(1)
    batch = Batch(image=torch.randn(4, 1, *patch, generator=g),
                  label=(torch.rand(2, *patch, generator=g) > 0.5).long(), n_labeled=2)
    net.train()
    return stage, net, batch


def test_ssnet_iteration_synchronises_the_host_once(monkeypatch):
    from methods.ssnet import class_contrastive_loss, update_memory

    stage, net, batch = _ssnet_iteration()
    stage.losses("main", {"student": net}, batch, 5999)  # first iteration fills the memory
    assert stage.memory[1] is not None and stage.memory[1].shape[0] == 32
    counter = _SyncCounter(monkeypatch)
    loss, parts = stage.losses("main", {"student": net}, batch, 6000)
    loss.backward()
    assert counter.events == ["tolist"], counter.events  # every data-dependent size at once
    # both contrastive terms and the memory update really ran (a skipped step would need no sync at all)
    assert parts["cl_l"] > 0 and parts["cl_u"] > 0 and parts["memory_fg"] == 32
    # the counter does see the syncs of a selection whose size is not given (it can fail)
    counter.events.clear()
    q = torch.randn(10, 4)
    labels = torch.tensor([0, 1] * 5)
    class_contrastive_loss(q, labels, [None, torch.randn(3, 4)], [None, torch.nn.Linear(4, 1)],
                           [None, torch.nn.Linear(4, 1)])
    update_memory([None, None], q, labels, [None, None])
    assert len(counter.events) >= 3


# ------------------------------------------------------------------ Ray trials' share of GPU memory

def test_each_trial_caps_its_gpu_memory_at_its_share(monkeypatch, tmp_path):
    import ray.tune

    from ssl_bench import sweep
    from ssl_bench.experiments import load_experiment

    path = tmp_path / "grid.toml"
    path.write_text('profile = "smoke"\nseeds = [1]\n[[grid]]\nmethods = ["vnet"]\nlabeled = [4]\n\n'
                    '[[grid]]\nmethods = ["vnet"]\nlabeled = [2]\n[grid.run]\ndevice = "cpu"\n')
    cells = load_experiment(path).plan()
    log = tmp_path / "log.txt"
    jobs = [sweep.make_job(c, tmp_path / "runs", 0.25, 2, str(tmp_path), log) for c in cells]
    by_device = {j["config"]["device"]: j for j in jobs}
    assert sorted(by_device) == ["cpu", "cuda"]  # the second cell declares device = "cpu"
    assert by_device["cuda"]["gpu_memory_fraction"] == 0.25
    assert by_device["cpu"]["gpu_memory_fraction"] is None  # a CPU cell asks for no cap
    assert sweep.make_job(cells[0], tmp_path / "runs", 0.0, 1, str(tmp_path), log)["gpu_memory_fraction"] is None

    # inside the trial (no Ray scheduling, no GPU): the cap is set as on a GPU host, and logged
    caps = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: caps.append((f, device)))
    monkeypatch.setattr(sweep, "train_cell", lambda job: {"paper_post": "raw", "metrics": {"raw": {"dice": 0.5}}})
    monkeypatch.setattr(ray.tune, "report", lambda *a, **k: None)
    sweep._trial({"job": by_device["cuda"]})
    assert caps == [(0.25, 0)]
    assert "GPU memory cap 0.25 of the device" in log.read_text()
    caps.clear()
    sweep._trial({"job": dict(by_device["cuda"], gpu_memory_fraction=None)})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sweep._trial({"job": by_device["cuda"]})  # a CPU-only host: nothing to cap
    assert caps == []


def test_sweep_records_the_caps_in_its_status(monkeypatch, tmp_path, demo_root):
    from ssl_bench import sweep

    path = tmp_path / "grid.toml"
    path.write_text('profile = "smoke"\nseeds = [1, 2]\n[[grid]]\nmethods = ["vnet"]\nlabeled = [4]\n')
    monkeypatch.setattr(sweep, "_start_ray", lambda address: False)
    monkeypatch.setattr(sweep, "_check_resources", lambda gpus, cpus: None)
    handed = []

    def waves(name, todo, cells, status, runs_dir, state_dir, data_root, gpus, cpus, *rest):
        for c in todo:
            handed.append(sweep.make_job(c, runs_dir, gpus, cpus, data_root, state_dir / "x.log"))
            status[c.id].update(state="complete")

    monkeypatch.setattr(sweep, "_run_waves", waves)
    sweep.run_sweep(path, demo_root, tmp_path / "runs", gpus_per_trial=0.5, cpus_per_trial=1, echo=lambda *_: None)
    status = json.loads((tmp_path / "runs" / "_sweeps" / "grid" / "status.json").read_text())
    assert status["resources"] == {"gpus_per_trial": 0.5, "cpus_per_trial": 1}
    assert [c["gpu_memory_fraction"] for c in status["cells"].values()] == [0.5, 0.5]
    assert [j["gpu_memory_fraction"] for j in handed] == [0.5, 0.5]
