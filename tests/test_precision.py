"""Declared precision (docs/methods.md Decision 7; issue 10 part 1): fp32 | tf32 | bf16 | fp16.

- SS-Net's VAT: the perturbation the network actually sees under bf16 autocast must have cosine
  >= 0.999 to the intended ε·d at a real crop size (it does not without the float32 VAT forwards);
- the trainer's autocast follows the precision (bf16 really autocasts on CPU; fp32 and tf32 compute
  the same numbers on CPU), evaluation too;
- precision is recorded (config.json, summary.json), names the default run folder, defines the run
  for --resume and --teacher; fp16 on CPU is a one-line error, exit 2;
- fp16's gradient scalers (one per optimiser phase) are saved in the checkpoint and restored;
- experiment files: a precision axis, in the cell ID; same_run treats it as defining;
- report: rows of different precision are never averaged or paired; folders made before precision
  was recorded are labelled with what they computed.
"""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.ssnet import SSNet
from ssl_bench.cli import main
from ssl_bench.data import Batch, LAData
from ssl_bench.errors import Interrupted, UserError
from ssl_bench.evaluate import EvalSettings, sliding_window
from ssl_bench.experiments import PLANNED_METHODS, load_experiment, same_run
from ssl_bench.losses import dice_fg_lin
from ssl_bench.method import StageContext
from ssl_bench.report import collect, write_report
from ssl_bench.runs import read_json
from ssl_bench.trainer import RunConfig, Trainer, build_config, recorded_precision, run_training
from ssl_bench.vat import vat_loss
from ssl_bench.networks import VNet

FIX = Path(__file__).parent / "fixtures" / "report"


def run_cli(*args):
    return main([str(a) for a in args])


# --------------------------------------------------------------------------- VAT fidelity under bf16


class FirstLayerProbe(nn.Module):
    """A tiny stand-in network whose first layer is an identity 1×1×1 convolution: its output is exactly
    the input the convolution consumed (under autocast: the input cast to bf16), recorded per forward,
    together with the float32 input handed to it."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv3d(1, 1, 1, bias=False)
        nn.init.ones_(self.first.weight)
        self.head = nn.Conv3d(1, 2, 1)
        self.given, self.seen = [], []
        self.first.register_forward_pre_hook(lambda m, a: self.given.append(a[0].detach().double()))
        self.first.register_forward_hook(lambda m, a, out: self.seen.append(out.detach().double()))

    def forward(self, x):
        return self.head(self.first(x))


@pytest.mark.parametrize("full_precision, faithful", [(True, True), (False, False)])
def test_vat_perturbation_the_network_sees_under_bf16(full_precision, faithful):
    torch.manual_seed(0)
    net = FirstLayerProbe()
    x = torch.randn(1, 1, 112, 112, 80)  # a z-scored crop of the paper's size
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vat_loss(lambda inp: torch.softmax(net(inp).float(), dim=1), x, distance=dice_fg_lin, xi=10.0, eps=10.0,
                 ip=1, full_precision=full_precision)
    assert len(net.seen) == 3  # target, power iteration, perturbed forward
    intended = net.given[-1] - x.double()  # ε·d as the VAT code formed x + ε·d (in float32)
    assert intended.norm().item() == pytest.approx(10.0, rel=1e-4)
    seen = net.seen[-1] - net.seen[0]  # what the first layer consumed: perturbed minus clean input
    cos = float((seen * intended).sum() / (seen.norm() * intended.norm()))
    if faithful:
        assert cos >= 0.999
    else:  # bf16's spacing (0.0078 in [1, 2)) is near the 0.009-per-voxel perturbation: it is quantised away
        assert cos < 0.999
        assert float(((seen == 0) & (intended != 0)).double().mean()) > 0.01


def test_ssnet_runs_its_vat_forwards_in_float32_under_bf16():
    """SS-Net's stage under bf16 autocast: its own forward in bf16, the three VAT forwards in float32."""
    torch.manual_seed(0)
    patch = (16, 16, 16)
    stage = SSNet(StageContext(labeled=8, patch=patch, n_filters=2))
    net = VNet(n_filters=2, n_classes=2, head="A", dropout=True, mlp_heads=True)
    first = next(m for m in net.modules() if isinstance(m, nn.Conv3d))
    seen = []
    first.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    label = torch.zeros(2, *patch, dtype=torch.long)
    label[:, 4:12, 4:12, 4:12] = 1
    batch = Batch(image=torch.randn(4, 1, *patch), label=label, n_labeled=2)
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = stage.losses("main", {"student": net}, batch, it0=3000)
    assert seen[0] == torch.bfloat16  # the method's own forward keeps the run's precision
    assert seen[-3:] == [torch.float32] * 3  # VAT target, power iteration, perturbed forward
    assert torch.isfinite(loss) and parts["vat"].dtype == torch.float32


# --------------------------------------------------------------------------- the trainer's numerics on CPU


def _one_step_loss(demo_root, tmp_path, precision):
    cfg = build_config("vnet", "smoke", labeled=4, device="cpu", precision=precision, patch=(32, 32, 16), n_filters=2)
    trainer = Trainer(cfg, tmp_path / precision, LAData(demo_root), progress=False)
    stage, nets = trainer.build_stage(0, previous=None)
    opts = stage.optimizers(nets)
    batch = trainer.make_stream(0, stage).next()
    out = []
    first = next(m for m in nets[stage.trained].modules() if isinstance(m, nn.Conv3d))
    first.register_forward_hook(lambda m, a, o: out.append(o.dtype))
    logs = trainer.train_step(stage, nets, opts, batch, 0)
    return float(logs["loss"]), out[0], trainer


def test_autocast_follows_the_precision_on_cpu(demo_root, tmp_path):
    fp32, dt32, _ = _one_step_loss(demo_root, tmp_path, "fp32")
    tf32, dt_tf, _ = _one_step_loss(demo_root, tmp_path, "tf32")
    bf16, dt16, trainer = _one_step_loss(demo_root, tmp_path, "bf16")
    assert dt32 == dt_tf == torch.float32 and dt16 == torch.bfloat16
    assert fp32 == tf32  # the same numerics on CPU (no TF32 there)
    assert bf16 != fp32  # bf16 really autocasts (so tests exercise the low-precision code)
    assert trainer.numerics()["autocast"] == "bfloat16" and trainer.numerics()["tf32"] is None
    # evaluation autocasts as the run declares
    dtypes = []

    def prob_fn(net, x):
        y = net(x)
        dtypes.append(y.dtype)
        return torch.sigmoid(y.float())[:, 0]

    conv = nn.Conv3d(1, 1, 1)
    image = torch.randn(20, 20, 18).numpy()
    for precision, want in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        dtypes.clear()
        sliding_window(prob_fn, conv, image, EvalSettings(patch=(16, 16, 16), stride_xy=8, stride_z=8,
                                                          precision=precision), torch.device("cpu"))
        assert dtypes and set(dtypes) == {want}


def test_fp16_on_cpu_is_a_one_line_error(demo_root, tmp_path, capsys):
    for cmd in (["run", "--method", "vnet", "--profile", "smoke", "--data", demo_root, "--device", "cpu",
                 "--precision", "fp16", "--out", tmp_path / "r", "--quiet"],
                ["bench", "--method", "vnet", "--profile", "smoke", "--data", demo_root, "--device", "cpu",
                 "--precision", "fp16"]):
        rc = run_cli(*cmd)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "fp16" in err and "CUDA" in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):  # device auto on a CPU-only machine
        Trainer(RunConfig(method="vnet", precision="fp16", device="cpu" if torch.cuda.is_available() else "auto"),
                tmp_path / "x", LAData(demo_root))
    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        build_config("vnet", "smoke", precision="fp8")


def test_precision_is_recorded_names_the_folder_and_defines_resume(demo_root, tmp_path, monkeypatch, capsys):
    import ssl_bench.precision

    monkeypatch.chdir(tmp_path)
    # bf16 really autocasts here even on a CPU without bf16 instructions (which `run` otherwise replaces by fp32,
    # tests/test_cpu_track.py): this test is about recording what was computed
    monkeypatch.setattr(ssl_bench.precision, "cpu_bf16_supported", lambda: True)
    args = ["run", "--method", "vnet", "--profile", "smoke", "--labeled", 4, "--iterations", 2, "--eval-cases", 1,
            "--data", demo_root, "--device", "cpu", "--quiet"]
    assert run_cli(*args, "--precision", "bf16") == 0
    out = tmp_path / "runs" / "vnet-L4-s1337-honest-smoke-bf16"  # precision named when not the default
    config, summary = read_json(out / "config.json"), read_json(out / "summary.json")
    assert config["config"]["precision"] == "bf16" and summary["precision"] == "bf16"
    assert config["numerics"]["autocast"] == "bfloat16" and summary["numerics"]["grad_scaler"] is False
    assert {"data_on_device", "channels_last_3d", "cudnn_benchmark"} <= set(config["numerics"])
    capsys.readouterr()
    rc = run_cli(*args, "--precision", "tf32", "--out", out, "--resume")
    assert rc == 2 and "setting 'precision' was 'bf16', now 'tf32'" in capsys.readouterr().err
    # a run folder made before precision was recorded: what it computed (the old CUDA fast path was bf16)
    assert recorded_precision({"device": "cuda", "fast": True}) == "bf16"
    assert recorded_precision({"device": "auto", "fast": True}, ran_on="cuda") == "bf16"
    assert recorded_precision({"device": "cuda", "fast": False}) == "tf32"
    assert recorded_precision({"device": "cpu", "fast": True}) == "tf32"
    old = dict(config["config"], device="cuda")
    del old["precision"]
    assert RunConfig.from_json(old).precision == "bf16"


def test_teacher_must_have_the_same_precision(demo_root, tmp_path):
    cfg = build_config("omf", "smoke", labeled=4, device="cpu", teacher=str(tmp_path / "teacher"))
    trainer = Trainer(cfg, tmp_path / "r", LAData(demo_root), progress=False)
    teacher = tmp_path / "teacher"
    (teacher / "stages").mkdir(parents=True)
    stored = dict(cfg.to_json(), method="omf-s1-orgloss", precision="bf16", teacher=None)
    (teacher / "config.json").write_text(json.dumps({"config": stored, "data": {}}))
    torch.save({"weights": {}, "iteration": 12, "selection": "last", "stage_class": type(trainer.stages[0]).__name__},
               teacher / "stages" / "stage1.pt")
    with pytest.raises(UserError, match="its precision is 'bf16', this run's is 'tf32'"):
        trainer.teacher_stage1()


def test_fp16_gradient_scalers_per_phase_are_checkpointed_and_restored(demo_root, tmp_path, monkeypatch):
    """fp16 needs CUDA; its scaler plumbing is exercised on CPU with CPU scalers under bf16 (SASSNet: two phases)."""
    made = []

    def cpu_scalers(self, stage):
        scalers = {phase: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1) for phase in stage.phases}
        made.append(scalers)
        return scalers

    monkeypatch.setattr(Trainer, "make_scalers", cpu_scalers)
    cfg = build_config("sassnet", "smoke", labeled=4, iterations=3, eval_cases=1, device="cpu", precision="bf16",
                       checkpoint_every=2, patch=(32, 32, 16), n_filters=2)
    with pytest.raises(Interrupted):
        run_training(cfg, tmp_path / "r", demo_root, progress=False, stop_at=(1, 2))
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["scalers"]) == {"main", "disc"}
    saved = {n: s["scale"] for n, s in state["scalers"].items()}
    assert saved == {n: s.get_scale() for n, s in made[-1].items()}

    restored = {}
    orig_load = torch.amp.GradScaler.load_state_dict

    def spy(self, sd):
        restored[id(self)] = sd["scale"]
        return orig_load(self, sd)

    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", spy)
    run_training(cfg, tmp_path / "r", demo_root, resume=True, progress=False)
    assert sorted(restored.values()) == sorted(saved.values())
    # a checkpoint without the scaler state cannot resume an fp16-style run exactly: refused in one line
    state["scalers"] = {}
    state["iteration"] = 2
    (tmp_path / "r" / "summary.json").unlink()
    torch.save(state, tmp_path / "r" / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="no fp16 gradient-scaler state"):
        run_training(cfg, tmp_path / "r", demo_root, resume=True, progress=False)


# --------------------------------------------------------------------------- experiments and report


def _experiment(tmp_path, body: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text('title = "t"\nprofile = "paper"\nseeds = [1, 2]\n' + body)
    return path


def test_precision_is_an_experiment_axis_in_the_cell_id(tmp_path):
    exp = load_experiment(_experiment(tmp_path, 'precision = ["tf32", "bf16"]\n[[grid]]\nmethods = ["vnet"]\n'
                                                'labeled = [8]\n[[grid]]\nmethods = ["uamt"]\nlabeled = [8]\n'
                                                'precision = "fp32"\n'), methods=PLANNED_METHODS)
    ids = [c.id for c in exp.cells]
    assert ids == ["vnet-L8-s1-honest", "vnet-L8-s2-honest", "vnet-L8-s1-honest-bf16", "vnet-L8-s2-honest-bf16",
                   "uamt-L8-s1-honest-fp32", "uamt-L8-s2-honest-fp32"]
    assert [c.config().precision for c in exp.cells] == ["tf32", "tf32", "bf16", "bf16", "fp32", "fp32"]
    wanted = exp.cells[0].config().to_json()
    assert same_run(dict(wanted, precision="bf16"), wanted) == \
        "precision is 'bf16' there, the experiment asks for 'tf32'"
    assert same_run(dict(wanted, fast=False), wanted) is None  # the other fast-path switches do not define a run
    for bad, msg in (('precision = "fp8"', "unknown precision 'fp8'"), ('[run]\nprecision = "bf16"', "is an axis")):
        with pytest.raises(UserError, match=msg):
            load_experiment(_experiment(tmp_path, bad + '\n[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n'),
                            methods=PLANNED_METHODS)


def test_report_never_averages_or_pairs_across_precisions(tmp_path):
    runs = tmp_path / "runs"
    for name in ("vnet-L8-s1-honest", "vnet-L8-s2-honest", "omf-L8-s1-honest", "omf-L8-s2-honest"):
        shutil.copytree(FIX / "runs" / name, runs / name)
    # bf16 copies of the vnet runs, recorded as bf16, with another Dice (.55 and .57 instead of .75 and .77)
    for seed in (1, 2):
        src, dst = runs / f"vnet-L8-s{seed}-honest", runs / f"vnet-L8-s{seed}-honest-bf16"
        shutil.copytree(src, dst)
        config = json.loads((dst / "config.json").read_text())
        config["config"]["precision"] = "bf16"
        (dst / "config.json").write_text(json.dumps(config))
        summary = json.loads((dst / "summary.json").read_text())
        summary["metrics"]["raw"]["dice"] -= 0.2
        (dst / "summary.json").write_text(json.dumps(summary))
        per_case = pd.read_csv(dst / "metrics_per_case.csv")  # the per-case Dice it was computed from, too
        per_case.loc[per_case["post"] == "raw", "dice"] -= 0.2
        per_case.to_csv(dst / "metrics_per_case.csv", index=False)
    exp_path = _experiment(tmp_path, 'compare_to = "omf"\n[[grid]]\nmethods = ["vnet", "omf"]\nlabeled = [8]\n'
                                     '[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\nprecision = "bf16"\n')
    exp = load_experiment(exp_path, methods=PLANNED_METHODS)
    rows = {(r.method, r.precision): r for r in collect(exp, runs)}
    assert set(rows) == {("vnet", "tf32"), ("omf", "tf32"), ("vnet", "bf16")}
    write_report(exp, runs, tmp_path / "out", echo=lambda *_: None)
    df = pd.read_csv(tmp_path / "out" / "table.csv")
    raw = df[(df.method == "vnet") & (df.post == "raw")].set_index("precision")
    assert raw.loc["tf32", "dice_mean"] == pytest.approx(76.0) and raw.loc["bf16", "dice_mean"] == pytest.approx(56.0)
    assert raw.loc["bf16", "n_seeds"] == 2 and raw.loc["tf32", "n_seeds"] == 2
    # the fixture folders were made before precision was recorded (CUDA fast path): labelled with what they computed
    assert raw.loc["tf32", "computed_precision"] == "bf16" and not raw.loc["tf32", "precision_recorded"]
    md = (tmp_path / "out" / "table.md").read_text()
    assert "## Protocol: honest · precision tf32" in md and "## Protocol: honest · precision bf16" in md
    bf16_section = md.split("## Protocol: honest · precision bf16")[1].split("\n## ")[0]
    assert "Precision not recorded" in md and "Precision not recorded" not in bf16_section
    tests = pd.read_csv(tmp_path / "out" / "wilcoxon.csv")
    assert set(zip(tests.precision, tests.method)) == {("tf32", "vnet")}  # OMF has no bf16 row to pair with


def test_report_refuses_a_row_mixing_a_recorded_precision_with_an_older_folder(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        shutil.copytree(FIX / "runs" / f"vnet-L8-s{seed}-honest", runs / f"vnet-L8-s{seed}-honest")
    config = json.loads((runs / "vnet-L8-s2-honest" / "config.json").read_text())
    config["config"]["precision"] = "tf32"  # seed 2 recorded tf32; seed 1 is an older CUDA fast-path (bf16) folder
    (runs / "vnet-L8-s2-honest" / "config.json").write_text(json.dumps(config))
    exp = load_experiment(_experiment(tmp_path, '[[grid]]\nmethods = ["vnet"]\nlabeled = [8]\n'), methods=PLANNED_METHODS)
    with pytest.raises(UserError, match="computed in different precisions .*vnet-L8-s1-honest bf16"):
        collect(exp, runs)


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True), ("bf16", True)])
def test_backend_flags_on_cuda(demo_root, tmp_path, precision, tf32, monkeypatch):
    """As on a GPU host: fp32 turns TF32 off for matmuls and cuDNN convolutions, tf32 turns it on (the
    references' numerics); the fast path's cuDNN switches follow ``fast``, separately from precision."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    trainer = Trainer(build_config("vnet", "smoke", device="cpu", precision=precision), tmp_path, LAData(demo_root))
    trainer.device = torch.device("cuda")  # only the flags are set; no CUDA call is made
    try:
        for fast in (True, False):
            trainer.cfg.fast = fast
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
            trainer._setup_backend()
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
            assert torch.backends.cudnn.benchmark is fast and torch.backends.cudnn.deterministic is (not fast)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic) = saved
