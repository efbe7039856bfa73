"""Guards on the one training loop (ssl_bench/trainer.py): the wiring that silently changes the science
when it breaks: the EMA teacher after a real step, one optimiser step per phase and iteration, the
learning rate each step actually uses on both sides of a schedule step (also across a resume),
gradients that do not accumulate, and resume equal to an uninterrupted run for EVERY registered method
(optimiser state incl. SASSNet's Adam, RNG, SS-Net's memory bank).

Expected values are written out here from docs/methods.md (EMA §3.2 item 8 and §3.6; schedules §1.8,
§3.6, §3.7.2 item 7, §3.7.3 item 8; SASSNet's Adam §3.3), never taken from the code's helpers.
Data: a tiny hand-made LA-layout set (24×24×20 volumes, patch 16³, n_filters 2); torch runs on one
thread here (this 2-core machine is shared; comparisons are within one thread count).
"""
import copy
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from ssl_bench.data import LAData
from ssl_bench.errors import Interrupted
from ssl_bench.method import Stage, registry
from ssl_bench.testing import make_tiny_la, state_differences
from ssl_bench.trainer import Trainer, build_config, run_training

PATCH = (16, 16, 16)
#: every registered method; a new one must be added here (and so gets the resume guard)
METHODS = ("vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf", "omf-s1", "omf-s1-orgloss", "omf-s1-s2")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py




@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_la(tmp_path_factory.mktemp("tiny") / "LA")


def _config(method, **kw):
    values = dict(labeled=4, patch=PATCH, n_filters=2, device="cpu", eval_cases=1, checkpoint_every=1000)
    values.update(kw)
    return build_config(method, "smoke", **values)


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def _buffers(net):
    return {n: b.detach().clone() for n, b in net.named_buffers()}


# ------------------------------------------------------------------ EMA after a real trainer step

def _real_steps(trainer, k, it0s):
    """Real Trainer.train_step calls of stage k at the given it0s; per step what the EMA check needs."""
    stage, nets = trainer.build_stage(k, previous=None)  # student and teacher from different random draws
    opts = stage.optimizers(nets)
    stream = trainer.make_stream(k, stage)
    original = stage.after_step
    steps = []
    for it0 in it0s:
        spy = {}

        def after_step(nets_, it, _spy=spy):
            _spy["it0"] = it
            _spy["teacher_buffers"] = _buffers(nets_["teacher"])  # after the teacher's own forwards
            original(nets_, it)

        stage.after_step = after_step
        teacher_before, buffers_before = _params(nets["teacher"]), _buffers(nets["teacher"])
        student_before = _params(nets["student"])
        trainer.train_step(stage, nets, opts, stream.next(), it0)
        assert spy.get("it0") == it0, "the trainer ran the stage's after-step with the iteration's it0"
        steps.append({"it0": it0, "teacher_before": teacher_before, "buffers_before": buffers_before,
                      "student_before": student_before, "student": _params(nets["student"]),
                      "teacher": _params(nets["teacher"]), "buffers_at_ema": spy["teacher_buffers"],
                      "buffers": _buffers(nets["teacher"]), "student_buffers": _buffers(nets["student"])})
    return steps


def _check_ema(step, alpha):
    moved = [not torch.equal(a, b) for a, b in zip(step["student_before"], step["student"])]
    assert any(moved), "the student stepped"
    for t0, s, t in zip(step["teacher_before"], step["student"], step["teacher"]):
        expected = alpha * t0.double() + (1.0 - alpha) * s.double()  # θ_T ← α·θ_T + (1−α)·θ_S, after the step
        torch.testing.assert_close(t.double(), expected, rtol=1e-6, atol=1e-7)
    # parameters only: the EMA leaves every buffer as the teacher's own train-mode forwards left it ...
    for name, value in step["buffers"].items():
        assert torch.equal(value, step["buffers_at_ema"][name]), name
    # ... and those forwards did move its BatchNorm statistics (train mode), which are not the student's
    assert any(not torch.equal(step["buffers_at_ema"][n], step["buffers_before"][n]) for n in step["buffers"])
    assert any(not torch.equal(step["buffers"][n], step["student_buffers"][n])
               for n in step["buffers"] if "running" in n)


def test_uamt_ema_after_a_real_step_warm_up_and_cap(tiny_root, tmp_path):
    trainer = Trainer(_config("uamt"), tmp_path, LAData(tiny_root), progress=False)
    steps = _real_steps(trainer, 0, [0, 3, 250])
    for step in steps:
        it0 = step["it0"]
        alpha = min(1.0 - 1.0 / (it0 + 1), 0.99)  # §3.2 item 8: 0, 0.75, 0.99 (cap; 1 − 1/251 ≈ 0.996)
        _check_ema(step, alpha)
    for t, s in zip(steps[0]["teacher"], steps[0]["student"]):  # it0 = 0: an exact copy of the student
        assert torch.equal(t, s)


def test_bcp_stage2_ema_is_fixed_0_99_after_a_real_step(tiny_root, tmp_path):
    trainer = Trainer(_config("bcp"), tmp_path, LAData(tiny_root), progress=False)
    for step in _real_steps(trainer, 1, [0, 7]):
        _check_ema(step, 0.99)  # §3.6 stage 2 item 5: fixed α, no warm-up (α would be 0 at it0 = 0)


# ------------------------------------------------------------------ schedules through the real loop

class Tiny(Stage):
    """A stand-in stage: y = w·1 + b, loss (y − 1)², so thousands of real loop iterations take about a second.

    Each optimiser step records the lr it is about to use, the gradients it sees and the parameters.
    """

    batch_labeled = 1
    batch_unlabeled = 0
    base_lr = 0.01

    def networks(self):
        return {"student": nn.Linear(1, 1)}

    def losses(self, phase, nets, batch, it0):
        return ((nets["student"](batch) - 1.0) ** 2).mean(), {}

    def optimizers(self, nets):
        opts = super().optimizers(nets)
        opt, inner = opts["main"], opts["main"].step
        params = list(nets["student"].parameters())

        def step(*args, **kwargs):
            self.steps.append({"lr": opt.param_groups[0]["lr"], "w": float(params[0].detach()),
                               "b": float(params[1].detach()),
                               "grad": [None if p.grad is None else float(p.grad) for p in params]})
            return inner(*args, **kwargs)

        opt.step = step
        return opts


class _Ones:
    def next(self):
        return torch.ones(1, 1)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _tiny_trainer(root, out, cls, iterations):
    cfg = _config("vnet", iterations=iterations, checkpoint_every=10 ** 6, log_every=10 ** 6)
    trainer = Trainer(cfg, out, LAData(root), progress=False)
    stage = cls(trainer.ctx)
    stage.steps = []
    trainer.stages = [stage]
    trainer.make_stream = lambda k, st: _Ones()
    trainer.evaluate = lambda timings=None: {}
    return trainer, stage


def _lrs(stage):
    return [s["lr"] for s in stage.steps]


def test_default_schedule_lr_used_at_2500_and_2501_also_across_a_resume(tiny_root, tmp_path):
    """§1.8: iterations 1–2500 run at 0.01, 2501– at 0.001 (×0.1 after the step of iteration 2500)."""
    a, b = tmp_path / "a", tmp_path / "b"
    trainer, stage = _tiny_trainer(tiny_root, a, Tiny, 2502)
    with pytest.raises(Interrupted):
        trainer.run(stop_at=(1, 2499))
    assert _lrs(stage) == pytest.approx([0.01] * 2499, rel=1e-12)
    # zero_grad between iterations: every step sees exactly this iteration's gradient 2(w + b − 1)
    for s in stage.steps:
        g = 2.0 * float(np.float32(s["w"]) + np.float32(s["b"]) - np.float32(1.0))  # float32, as the net
        assert s["grad"] == pytest.approx([g, g], rel=1e-5, abs=1e-7)
    shutil.copytree(a, b)

    trainer, stage = _tiny_trainer(tiny_root, a, Tiny, 2502)  # resumed before the step: crosses it in the loop
    trainer.run(resume=True)
    assert _lrs(stage) == pytest.approx([0.01, 0.001, 0.001], rel=1e-12)  # iterations 2500, 2501, 2502

    trainer, stage = _tiny_trainer(tiny_root, b, Tiny, 2502)
    with pytest.raises(Interrupted):
        trainer.run(resume=True, stop_at=(1, 2500))
    assert _lrs(stage) == pytest.approx([0.01], rel=1e-12)  # iteration 2500
    trainer, stage = _tiny_trainer(tiny_root, b, Tiny, 2502)  # resumed exactly at the step
    trainer.run(resume=True)
    assert _lrs(stage) == pytest.approx([0.001, 0.001], rel=1e-12)  # iterations 2501, 2502

    wa = torch.load(a / "stages/stage1.pt", weights_only=False)["weights"]
    wb = torch.load(b / "stages/stage1.pt", weights_only=False)["weights"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _omf_stage(name):
    from methods.omf import OMFStage1Overlay, OMFStage2

    real = {"OMFStage1Overlay": OMFStage1Overlay, "OMFStage2": OMFStage2}[name]
    return type(f"Tiny{name}", (Tiny,), {"lr": real.lr, "base_lr": real.base_lr})


@pytest.mark.parametrize("name, start, expected", [
    # §3.7.2 item 7: 0.1 for iterations 1..10 000, 0.01 from 10 001
    ("OMFStage1Overlay", 9998, {9999: 0.1, 10000: 0.1, 10001: 0.01, 10002: 0.01}),
    ("OMFStage1Overlay", 10000, {10001: 0.01, 10002: 0.01}),
    # §3.7.3 item 8: 0.1·0.8^⌊i/2500⌋ after iteration i: 0.1 up to 2500, 0.08 from 2501
    ("OMFStage2", 2498, {2499: 0.1, 2500: 0.1, 2501: 0.08, 2502: 0.08}),
    ("OMFStage2", 2500, {2501: 0.08, 2502: 0.08}),
])
def test_omf_schedules_on_both_sides_of_their_step(tiny_root, tmp_path, name, start, expected):
    """The real loop and resume path from iteration ``start``: the checkpoint of a 1-iteration run of the
    stand-in is relabelled as iteration ``start`` (nothing in its state depends on the count)."""
    cls = _omf_stage(name)
    end = max(expected)
    trainer, stage = _tiny_trainer(tiny_root, tmp_path, cls, end)
    with pytest.raises(Interrupted):
        trainer.run(stop_at=(1, 1))
    ckpt = tmp_path / "checkpoints/last.pt"
    state = torch.load(ckpt, weights_only=False)
    state["iteration"] = start
    torch.save(state, ckpt)
    trainer, stage = _tiny_trainer(tiny_root, tmp_path, cls, end)
    trainer.run(resume=True)
    assert _lrs(stage) == pytest.approx([expected[i] for i in range(start + 1, end + 1)], rel=1e-12)


# ------------------------------------------------------------------ every method: steps, lr, resume

#: docs/methods.md schedules, lr after `done` completed iterations, and base lrs (§1.8, §3.6, §3.7.2, §3.7.3)
SPEC_LR = {
    "default": lambda base, done: base * 0.1 ** (done // 2500),
    "BCPStage1": lambda base, done: base,
    "OMFStage1Overlay": lambda base, done: base * (0.1 if done >= 10000 else 1.0),
    "OMFStage1": lambda base, done: base * (0.1 if done >= 10000 else 1.0),
    "OMFStage2": lambda base, done: base * 0.8 ** (done // 2500),
}
SPEC_BASE_LR = {"OMFStage1Overlay": 0.1, "OMFStage1": 0.1, "OMFStage2": 0.1}  # every other stage: 0.01
#: the schedules are shortened: `done` completed iterations count as done·SCALE, so the step falls at done = 1
SCALE = {"OMFStage1Overlay": 10000, "OMFStage1": 10000}  # others 2500
SECOND_PHASE_LR = {"disc": 1e-4}  # SASSNet's discriminator: Adam, constant lr 1e-4 (§3.3)
ITERS, STOP = 2, 1  # per stage; interrupted after iteration 1, i.e. right at the shortened step


def _spec_lr(cls_name, done):
    rule = SPEC_LR.get(cls_name, SPEC_LR["default"])
    return rule(SPEC_BASE_LR.get(cls_name, 0.01), done * SCALE.get(cls_name, 2500))


class _Recorder:
    def __init__(self):
        self.events, self.lrs, self.dirty, self.extra = [], [], [], {}


def _instrument(monkeypatch, classes, holder):
    """Shorten each stage's own lr method, and record every loss call, optimiser step and lr."""
    for cls in classes:
        lr, losses, optimizers = cls.lr, cls.losses, cls.optimizers
        scale = SCALE.get(cls.__name__, 2500)

        def short_lr(self, done, _lr=lr, _scale=scale):
            return _lr(self, done * _scale)

        def recording_losses(self, phase, nets, batch, it0, _losses=losses):
            rec = holder[0]
            name = type(self).__name__
            rec.events.append(("loss", name, phase, it0))
            # gradients do not carry over from an earlier phase or iteration
            rec.dirty += [(name, phase, it0, n) for net in nets.values() for n, p in net.named_parameters()
                          if p.grad is not None and bool(p.grad.any())]
            if phase == self.phases[0]:
                rec.extra[(name, it0)] = copy.deepcopy(self.extra_state())
            return _losses(self, phase, nets, batch, it0)

        def recording_optimizers(self, nets, _optimizers=optimizers):
            opts = _optimizers(self, nets)
            for phase, opt in opts.items():
                def step(*args, _inner=opt.step, _opt=opt, _phase=phase, _name=type(self).__name__, **kwargs):
                    holder[0].events.append(("step", _name, _phase))
                    holder[0].lrs.append(_opt.param_groups[0]["lr"])
                    return _inner(*args, **kwargs)
                opt.step = step
            return opts

        monkeypatch.setattr(cls, "lr", short_lr)
        monkeypatch.setattr(cls, "losses", recording_losses)
        monkeypatch.setattr(cls, "optimizers", recording_optimizers)




@pytest.mark.parametrize("method", METHODS)
def test_interrupted_and_resumed_equals_uninterrupted(method, tiny_root, tmp_path, monkeypatch):
    """Every method, 2 iterations per stage, each stage interrupted after iteration 1 (where the shortened
    schedule steps: iteration 2 runs at the lower lr) and resumed in a fresh Trainer: the same optimiser steps,
    lrs, stage state seen by each iteration, and bit-identical final state (all networks, optimiser state,
    RNG, stream) and stage weights, as the uninterrupted run (whose loop crosses the step itself)."""
    spec = registry()[method]
    holder = [None]
    _instrument(monkeypatch, spec.stages, holder)
    monkeypatch.setattr(Trainer, "evaluate", lambda self, timings=None: {})  # training only
    cfg = _config(method, iterations=ITERS)
    n_stages = len(spec.stages)

    expected_events, expected_lrs = [], []
    for cls in spec.stages:
        for it0 in range(ITERS):
            for phase in cls.phases:
                expected_events += [("loss", cls.__name__, phase, it0), ("step", cls.__name__, phase)]
                expected_lrs.append(_spec_lr(cls.__name__, it0) if phase == "main" else SECOND_PHASE_LR[phase])

    runs = {}
    for kind in ("full", "cut"):
        holder[0] = rec = _Recorder()
        out = tmp_path / kind
        if kind == "full":
            run_training(cfg, out, tiny_root, progress=False)
        else:
            resume = False
            for k in range(1, n_stages + 1):
                with pytest.raises(Interrupted):
                    run_training(cfg, out, tiny_root, resume=resume, progress=False, stop_at=(k, STOP))
                resume = True
            run_training(cfg, out, tiny_root, resume=True, progress=False)
        assert rec.events == expected_events, kind  # each phase's optimiser steps once per iteration, in order
        assert rec.lrs == pytest.approx(expected_lrs, rel=1e-12), kind
        assert rec.dirty == [], kind
        runs[kind] = (rec, out)

    (full, full_out), (cut, cut_out) = runs["full"], runs["cut"]
    assert not state_differences(full.extra, cut.extra), "the stage state (extra_state) each iteration starts from"
    last_full = torch.load(full_out / "checkpoints/last.pt", weights_only=False)
    last_cut = torch.load(cut_out / "checkpoints/last.pt", weights_only=False)
    assert not state_differences(last_full, last_cut)
    for k in range(1, n_stages + 1):
        a = torch.load(full_out / f"stages/stage{k}.pt", weights_only=False)
        b = torch.load(cut_out / f"stages/stage{k}.pt", weights_only=False)
        assert a["iteration"] == b["iteration"] == ITERS and not state_differences(a["weights"], b["weights"])

    if method == "sassnet":  # the discriminator's Adam state came through the resume: one step per iteration
        adam = last_cut["optimizers"]["disc"]["state"]
        assert adam and all(float(s["step"]) == ITERS and "exp_avg_sq" in s for s in adam.values())
    if method == "ssnet":  # the memory bank the first resumed iteration starts from is non-empty
        memory = cut.extra[("SSNet", STOP)]["memory"]
        assert memory[1] is not None and memory[1].shape[0] >= 2
