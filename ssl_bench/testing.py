"""The method contract test kit: ``check_method(name)`` from any pytest suite.

    from ssl_bench.testing import check_method

    def test_my_method_keeps_the_contract(tmp_path):
        check_method("my-method", workdir=tmp_path)

It checks, on CPU with tiny settings (patch 16³, n_filters 2, 2 iterations per stage) and the built-in
demo data unless ``data_dir`` names an LA-layout data root, that the registered method

1. constructs without data: every stage is a :class:`~ssl_bench.method.Stage`, builds its networks,
   names its trained network among them, has an optimiser per phase, and its evaluated network maps a
   patch to a foreground probability of the patch's shape in [0, 1];
2. trains end to end through the real trainer (``ssl_bench.trainer.run_training``): every loss of every
   phase and iteration is a finite scalar, its logged parts are finite, and before every optimiser step
   the gradients are finite and the trained network has a non-zero gradient (main phase);
3. gives bit-identical losses, weights and metrics for the same seed twice;
4. interrupted after the first iteration of every stage and resumed equals the uninterrupted run
   (losses, every stage's handed-over weights, the final checkpoint: networks, optimisers, RNG, stream);
   and every later stage starts from the earlier stage's weights: after its ``init_from`` one of its
   networks holds every tensor the previous stage handed over (a stage 2 that forgets to load them
   would train from random weights);
5. evaluates: finite metrics with Dice in [0, 1] for every post-processing, and ``ssl-bench eval`` of the
   run folder reproduces them.

A failure raises :class:`MethodContractError` (an AssertionError) saying which part broke. Torch runs on
``threads`` threads (default 1: the networks are tiny) during the check and is set back afterwards; the
comparisons are made within one process and one thread count.
"""
from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["check_method", "MethodContractError", "demo_data"]

ITERATIONS = 2
PATCH = (16, 16, 16)
N_FILTERS = 2
LABELED = 4

_DEMO: list[Path] = []


class MethodContractError(AssertionError):
    """A method broke the contract that every registered method keeps."""


def _fail(name: str, what: str):
    raise MethodContractError(f"method {name!r}: {what}")


def demo_data() -> Path:
    """The built-in synthetic demo data set, written once per process to a temporary folder."""
    if not _DEMO:
        from .demo import make_demo

        _DEMO.append(make_demo(Path(tempfile.mkdtemp(prefix="ssl-bench-contract-")) / "LA"))
    return _DEMO[0]


def _finite(value) -> bool:
    if torch.is_tensor(value):
        return bool(torch.isfinite(value.detach().float()).all())
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return True


class _Recorder:
    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind
        self.losses: list[tuple] = []   # (stage class, phase, it0, loss value)

    def fail(self, what: str):
        """Stop the run at once (the trainer lets the error through)."""
        _fail(self.name, f"{self.kind} run: {what}")


@contextmanager
def _instrumented(stage_classes, recorder_ref: list):
    """Wrap each stage class's ``losses`` and ``optimizers`` to record losses and check gradients; undone after."""
    classes = list(dict.fromkeys(stage_classes))
    saved = [(cls, cls.__dict__.get("losses"), cls.__dict__.get("optimizers"), cls.__dict__.get("init_from"))
             for cls in classes]
    # before any is wrapped (subclasses)
    originals = {cls: (cls.losses, cls.optimizers, cls.init_from) for cls in classes}
    for cls in classes:
        inner_losses, inner_opts, inner_init = originals[cls]

        def losses(self, phase, nets, batch, it0, _inner=inner_losses, _cls=cls):
            loss, parts = _inner(self, phase, nets, batch, it0)
            rec = recorder_ref[0]
            where = f"{_cls.__name__} phase {phase!r} iteration {it0}"
            if not torch.is_tensor(loss) or loss.numel() != 1:
                rec.fail(f"{where}: the loss is not a scalar tensor ({type(loss).__name__})")
            elif not _finite(loss):
                rec.fail(f"{where}: the loss is not finite ({float(loss.detach())})")
            elif not loss.requires_grad:
                rec.fail(f"{where}: the loss does not depend on any trained parameter")
            for key, value in (parts or {}).items():
                if not _finite(value):
                    rec.fail(f"{where}: logged part {key!r} is not finite")
            rec.losses.append((_cls.__name__, phase, it0,
                               float(loss.detach()) if torch.is_tensor(loss) and loss.numel() == 1 else None))
            return loss, parts

        def optimizers(self, nets, _inner=inner_opts, _cls=cls):
            opts = _inner(self, nets)
            for phase in self.phases:
                if phase not in opts:
                    recorder_ref[0].fail(f"{_cls.__name__}: no optimiser for phase {phase!r}")
            trained = list(nets[self.trained].parameters())
            for phase, opt in opts.items():
                def step(*args, _step=opt.step, _opt=opt, _phase=phase, **kwargs):
                    rec = recorder_ref[0]
                    where = f"{_cls.__name__} phase {_phase!r}"
                    params = [p for g in _opt.param_groups for p in g["params"]]
                    if any(p.grad is not None and not _finite(p.grad) for p in params):
                        rec.fail(f"{where}: a gradient is not finite")
                    if _phase == "main" and not any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                                    for p in trained):
                        rec.fail(f"{where}: no gradient reached the trained network {self.trained!r}")
                    return _step(*args, **kwargs)
                opt.step = step
            return opts

        def init_from(self, nets, previous, _inner=inner_init, _cls=cls):
            _inner(self, nets, previous)
            if not any(_holds(net, previous) for net in nets.values()):
                recorder_ref[0].fail(f"{_cls.__name__} does not start from the previous stage's weights: after its "
                                     f"init_from none of its networks {sorted(nets)} holds them (load them there, "
                                     f"e.g. nets[\"student\"].load_state_dict(previous))")

        cls.losses, cls.optimizers, cls.init_from = losses, optimizers, init_from
    try:
        yield
    finally:
        for cls, losses, opts, init in saved:
            for attr, value in (("losses", losses), ("optimizers", opts), ("init_from", init)):
                if value is None:
                    delattr(cls, attr)
                else:
                    setattr(cls, attr, value)


def _holds(net: nn.Module, weights: dict) -> bool:
    """Whether ``net`` holds every tensor of ``weights`` (a handed-over state dict), under its name or inside a
    submodule (``backbone.<name>``); a net with none of the names does not hold them."""
    state = net.state_dict()
    if not weights:
        return True
    for key, value in weights.items():
        mine = state.get(key)
        if mine is None:
            found = [v for k, v in state.items() if k.endswith("." + key)]
            mine = found[0] if len(found) == 1 else None
        if mine is None or mine.shape != value.shape or not torch.equal(mine.detach().cpu(), value.detach().cpu()):
            return False
    return True


def state_differences(a, b, path="", out=None) -> list[str]:
    """Where two nested states (dicts, lists, tensors, numbers) differ, wall times ignored; [] when identical."""
    out = [] if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append(f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}")
        for k in set(a) & set(b):
            if k not in ("elapsed_s", "timings", "train_s", "eval_s", "it_per_s"):  # wall times
                state_differences(a[k], b[k], f"{path}/{k}", out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            state_differences(x, y, f"{path}[{i}]", out)
    elif torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b)):
            out.append(path)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        pass
    elif a != b:
        out.append(f"{path}: {a!r} vs {b!r}")
    return out


def _check_construction(name, spec, ctx) -> None:
    from .method import Stage

    if not spec.stages:
        _fail(name, "has no stages")
    for k, cls in enumerate(spec.stages, 1):
        where = f"stage {k} ({getattr(cls, '__name__', cls)!r})"
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            _fail(name, f"{where} is not a subclass of ssl_bench.method.Stage")
        torch.manual_seed(0)
        stage = cls(ctx)
        nets = stage.networks()
        if not isinstance(nets, dict) or not nets or not all(isinstance(n, nn.Module) for n in nets.values()):
            _fail(name, f"{where}: networks() must return a non-empty dict of torch.nn.Module")
        if stage.trained not in nets:
            _fail(name, f"{where}: the trained network {stage.trained!r} is not among its networks {sorted(nets)}")
        if "main" not in stage.phases:
            _fail(name, f"{where}: its phases {stage.phases} have no 'main' phase (the trainer sets its lr)")
        opts = stage.optimizers(nets)
        missing = [p for p in stage.phases if p not in opts]
        if missing:
            _fail(name, f"{where}: no optimiser for phase(s) {missing}")
        if not isinstance(stage.lr(0), (int, float)) or not stage.lr(0) > 0:
            _fail(name, f"{where}: lr(0) must be a positive number, got {stage.lr(0)!r}")
        net = nets[stage.trained]
        net.eval()
        with torch.no_grad():
            prob = stage.foreground_probability(net, torch.randn(1, 1, *ctx.patch))
        if tuple(prob.shape) != (1, *ctx.patch):
            _fail(name, f"{where}: foreground_probability gives shape {tuple(prob.shape)}, expected {(1, *ctx.patch)}")
        if not (torch.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1):
            _fail(name, f"{where}: foreground_probability is not a probability in [0, 1]")


def _stage_weights(out: Path, n_stages: int) -> list[dict]:
    from .run_folder import RunFolder

    return [RunFolder(out).load_stage(k)["weights"] for k in range(1, n_stages + 1)]


def _last_checkpoint(out: Path) -> dict:
    from .run_folder import RunFolder

    return RunFolder(out).last_checkpoint("the contract check reads it")


def check_method(name: str, data_dir=None, *, workdir=None, options: dict | None = None,
                 iterations: int = ITERATIONS, patch=PATCH, n_filters: int = N_FILTERS, labeled: int = LABELED,
                 threads: int | None = 1) -> dict:
    """Check that the registered method ``name`` keeps the method contract (see the module docstring).

    ``data_dir``: an LA-layout data root (default: the built-in demo data, made once per process);
    ``workdir``: where the run folders go (default: a temporary folder, removed afterwards, e.g. pytest's
    ``tmp_path``); ``options``: the method's ``--option`` values; ``threads``: torch threads during the check
    (None: leave as is). Returns the uninterrupted run's summary and the recorded losses. Raises
    :class:`MethodContractError` on the first broken part.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _check(name, data_dir, workdir, options, iterations, patch, n_filters, labeled)
    finally:
        torch.set_num_threads(before)


def _check(name, data_dir, workdir, options, iterations, patch, n_filters, labeled) -> dict:
    from .errors import Interrupted
    from .method import StageContext, get_method
    from .trainer import build_config, evaluate_run, run_training

    if iterations < 2:
        raise ValueError("check_method needs at least 2 iterations per stage (it interrupts after the first)")
    spec = get_method(name)
    patch = tuple(patch)
    # 1. constructs without data
    _check_construction(name, spec, StageContext(labeled=labeled, patch=patch, n_filters=n_filters,
                                                 iterations=iterations, options=dict(options or {})))
    data = Path(data_dir) if data_dir is not None else demo_data()
    cfg = build_config(name, "smoke", labeled=labeled, patch=patch, n_filters=n_filters, iterations=iterations,
                       device="cpu", eval_cases=1, eval_stride_xy=patch[0], eval_stride_z=patch[2],
                       checkpoint_every=1000, log_every=1, options=dict(options or {}))
    n_stages = len(spec.stages)
    with tempfile.TemporaryDirectory(prefix="ssl-bench-contract-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        ref: list = [None]
        runs = {}
        with _instrumented(spec.stages, ref):
            for kind in ("first", "again", "resumed"):
                ref[0] = rec = _Recorder(name, kind)
                out = root / f"{name}-{kind}"
                if kind != "resumed":
                    summary = run_training(cfg, out, data, progress=False)
                else:
                    resume = False
                    for k in range(1, n_stages + 1):
                        try:
                            run_training(cfg, out, data, resume=resume, progress=False, stop_at=(k, 1))
                        except Interrupted:
                            pass
                        else:
                            _fail(name, f"the run was not interrupted at stage {k} iteration 1")
                        resume = True
                    summary = run_training(cfg, out, data, resume=True, progress=False)
                # 2. trained end to end (finite losses and gradients into the trained network: checked as it ran)
                expected = sum(iterations * len(cls.phases) for cls in spec.stages)
                if len(rec.losses) != expected:
                    _fail(name, f"{kind} run: {len(rec.losses)} loss evaluations, expected {expected} "
                                f"({iterations} iterations × phases per stage)")
                runs[kind] = (rec, out, summary)

        first_rec, first_out, first = runs["first"]
        first_last = _last_checkpoint(first_out)
        # 3. same seed twice: identical
        for kind, what in (("again", "the same seed twice gives different"),
                           ("resumed", "interrupted and resumed differs from uninterrupted in its")):
            rec, out, summary = runs[kind]
            if rec.losses != first_rec.losses:
                _fail(name, f"{what} losses: {first_rec.losses} vs {rec.losses}")
            for k, (a, b) in enumerate(zip(_stage_weights(first_out, n_stages), _stage_weights(out, n_stages)), 1):
                diff = state_differences(a, b)
                if diff:
                    _fail(name, f"{what} stage {k} weights ({', '.join(diff[:3])})")
            # 4. (resumed) networks, optimisers, RNG and stream state of the final checkpoint
            diff = state_differences(first_last, _last_checkpoint(out))
            if diff:
                _fail(name, f"{what} final checkpoint ({', '.join(diff[:3])})")
            diff = state_differences(first["metrics"], summary["metrics"])
            if diff:
                _fail(name, f"{what} metrics ({', '.join(diff[:3])})")

        # 5. evaluates
        if not first.get("metrics"):
            _fail(name, "the run's summary has no metrics")
        for post, m in first["metrics"].items():
            if not all(math.isfinite(float(m[k])) for k in ("dice", "jaccard", "hd95", "asd")):
                _fail(name, f"metrics under {post!r} are not finite: {m}")
            if not 0.0 <= float(m["dice"]) <= 1.0:
                _fail(name, f"Dice under {post!r} is {m['dice']}, not in [0, 1]")
        again = evaluate_run(first_out, data, progress=False)
        diff = state_differences(first["metrics"], again["metrics"])
        if diff:
            _fail(name, f"re-evaluating the run folder gives different metrics ({', '.join(diff[:3])})")
        return {"summary": first, "losses": list(first_rec.losses)}


def make_tiny_la(root, n_train: int = 8, n_test: int = 2, shape=(24, 24, 20), seed: int = 0) -> Path:
    """A tiny data set in the LA release layout at ``root``: each case a bright 16×16×12 box (its label) in noise.

    Small enough for a method to train a few iterations at a 16³ patch in seconds (tests, plugin checks).
    """
    import h5py

    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = [f"TINY{i:02d}" for i in range(n_train + n_test)]
    for case in ids:
        label = np.zeros(shape, np.uint8)
        o = rng.integers(0, 6, 3)
        label[o[0]:o[0] + 16, o[1]:o[1] + 16, o[2]:o[2] + 12] = 1
        image = (1.5 * label + rng.normal(0.0, 0.5, shape)).astype(np.float32)
        path = root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"
        path.parent.mkdir(parents=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label)
    (root / "train.list").write_text("".join(i + "\n" for i in ids[:n_train]))
    (root / "test.list").write_text("".join(i + "\n" for i in ids[n_train:]))
    return root
