"""The one training loop for every method, and the run folder it writes.

Run folder (self-describing; every file is plain data, loaded with ``weights_only=True``)::

    config.json            every setting, the method's stage defaults, split, data checksums, provenance
    log.jsonl              one line per logged iteration: stage, iteration, lr, losses, it/s; at each selection point
                           val_dice_raw (`val`) or test_dice_raw (`literature`)
    checkpoints/last.pt    full state for --resume (weights, optimisers, RNG and sampler state)
    checkpoints/previous.pt  the checkpoint before it, kept while the run is in progress (a damaged
                           last.pt falls back to it); removed when the run finishes
    .lock                  the one-writer lock (fcntl.flock) of run, --resume and eval
    stages/stageK.pt       the weights a stage hands on (last, or best-on-test under `literature`, best-on-val under `val`)
    metrics_per_case.csv   per test case and post-processing (raw, lcc): dice, jaccard, hd95, asd, empty
    summary.json           means ± std, protocol, selected checkpoints, empty counts, timings
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from .data import LAData, TrainStream, check_split
from .prefetch import PrefetchStream
from .errors import Interrupted, UserError
from .experiments import ADDED_DEFAULTS
from .evaluate import EvalSettings, evaluate_cases, mean_dice, summarize
from .method import StageContext, get_method
from .precision import (DEFAULT_PRECISION, FP16_ON_CPU, PRECISIONS, autocast_dtype,  # noqa: F401 (re-exported)
                        recorded_precision, set_backend, with_precision)
from .precision import make_scalers as _make_scalers, numerics as _numerics
from .progress import Progress
from . import selection as _selection
from .runs import (LAST, PREVIOUS, DamagedFileError, atomic_torch_save, atomic_write_json, atomic_write_text,
                   load_torch, lock_folder, open_append, prepare_run_dir, provenance, read_json,
                   require_run_entries, save_checkpoint)

PROTOCOLS = ("honest", "literature", "val")  # ssl_bench/selection.py: what each selects
UNITS = ("voxel", "mm")


@dataclass
class RunConfig:
    method: str
    labeled: int = 8
    seed: int = 1337
    iterations: int | None = None  # None: each stage's own default; otherwise applied to every stage
    #: Decision 10: every constant a method counts in iterations follows it (lengths, lr steps, ramps, selection)
    schedule_scale: float = 1.0
    patch: tuple[int, int, int] = (112, 112, 80)
    n_filters: int = 16
    device: str = "auto"
    profile: str = "paper"
    protocol: str = "honest"
    checkpoint_every: int = 1000
    log_every: int = 20
    selection_every: int | None = None  # None: the reference's 200
    val_cases: int | None = None  # `val` only (None there: 8, Decision 8); None under honest/literature, not their identity
    eval_stride_xy: int = 18
    eval_stride_z: int = 4
    eval_cases: int | None = None  # None: every case of test.list
    empty_policy: str = "penalty"
    units: str = "voxel"  # hd95/asd in voxels (the LA literature) or "mm" from an imported data set's spacing
    precision: str = DEFAULT_PRECISION  # PRECISIONS; part of what defines a run (Decision 7)
    fast: bool = True  # CUDA fast-path switches besides precision: data on the GPU, channels_last_3d, cudnn.benchmark
    teacher: str | None = None  # a run folder whose stage 1 is reused instead of trained (multi-stage methods)
    #: what was asked for when it differs from ``precision`` (bf16 on a CPU without bf16: fp32, said on stderr)
    requested_precision: str | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.protocol == "val" and self.val_cases is None:
            self.val_cases = _selection.DEFAULT_VAL_CASES

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UserError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.val_cases is not None and self.protocol != "val":
            raise UserError(f"--val-cases applies to --protocol val only (this run's protocol is {self.protocol})")
        if self.val_cases is not None and self.val_cases < 1:
            raise UserError(f"--val-cases must be at least 1, got {self.val_cases}")
        if self.selection_every is not None and self.selection_every < 1:
            raise UserError(f"--selection-every must be at least 1, got {self.selection_every}")
        if self.iterations is not None and self.iterations < 1:
            raise UserError(f"--iterations must be at least 1, got {self.iterations}")
        if isinstance(self.schedule_scale, bool) or not isinstance(self.schedule_scale, (int, float)) \
                or not 0.001 <= self.schedule_scale <= 10:
            raise UserError(f"--schedule-scale must be a number from 0.001 to 10, got {self.schedule_scale!r}")
        self.schedule_scale = float(self.schedule_scale)
        if len(self.patch) != 3 or any(p < 16 or p % 16 for p in self.patch):
            raise UserError(f"--patch needs three sizes, each a multiple of 16 (the V-Net halves 4 times), got {self.patch}")
        if self.n_filters < 1:
            raise UserError(f"--n-filters must be positive, got {self.n_filters}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise UserError("checkpoint and log intervals must be positive")
        if self.empty_policy not in ("penalty", "zero"):
            raise UserError(f"unknown empty-prediction policy {self.empty_policy!r}; choose penalty or zero")
        if self.eval_cases is not None and self.eval_cases < 1:
            raise UserError(f"--eval-cases must be at least 1, got {self.eval_cases}")
        if self.units not in UNITS:
            raise UserError(f"unknown units {self.units!r}; choose one of {', '.join(UNITS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and self.device == "cpu":
            raise UserError(FP16_ON_CPU)

    def to_json(self) -> dict:
        d = asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_json(cls, d: dict, ran_on: str | None = None) -> "RunConfig":
        """A stored config; one made before precision was recorded gets what it computed (recorded_precision)."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in with_precision(d, ran_on).items() if k in known}
        d["patch"] = tuple(d["patch"])
        return cls(**d)


#: the CPU track's schedule scale s (docs: the CPU track, Decision 10): chosen so the one-seed Table 1 grid fits 4 hours
CPU_SCHEDULE_SCALE = 0.04

PROFILES = {
    "paper": {},
    # tiny preset: finishes on 2 CPU cores in well under a minute on the real data
    "smoke": {"patch": (48, 48, 32), "n_filters": 4, "iterations": 12, "checkpoint_every": 6, "log_every": 3,
              "eval_stride_xy": 48, "eval_stride_z": 20, "eval_cases": 2, "selection_every": 6},
    # the README's main job on the built-in demo data: a few minutes on 2 CPU cores
    "demo": {"patch": (48, 48, 32), "n_filters": 4, "iterations": 200, "checkpoint_every": 100, "log_every": 10,
             "eval_stride_xy": 24, "eval_stride_z": 12, "selection_every": 50},
    # the CPU track (docs/methods.md Decision 10; experiments/cpu.toml): on `ssl-bench data derive --zoom 0.5` data, whose
    # record sets the patch (64,64,32) and strides; every method's schedule scaled by one factor, fp32 (measured)
    # sliding window at half-patch strides (32/16 on the 64×64×32 patch: 8 windows a case instead of the 56 of the
    # paper's strides × 0.5), since the val protocol evaluates 8 cases at every selection point
    "cpu": {"n_filters": 8, "schedule_scale": CPU_SCHEDULE_SCALE, "precision": "fp32", "eval_stride_xy": 32,
            "eval_stride_z": 16, "checkpoint_every": 50, "log_every": 10},
}


def build_config(method: str, profile: str = "paper", dataset_defaults: dict | None = None, **overrides) -> RunConfig:
    """The data set's own settings (``LAData.run_defaults()``: an imported set's patch and strides; {} for LA),
    then the profile's, then every explicitly given (non-None) override."""
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    values = {"method": method, "profile": profile, **(dataset_defaults or {}), **PROFILES[profile]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig(**values)
    cfg.validate()
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


def _notice(text: str) -> None:
    print(f"ssl-bench: {text}", file=sys.stderr, flush=True)


#: what a checkpoint and a stage file must hold
CHECKPOINT_KEYS = ("stage", "iteration", "nets", "optimizers", "stream", "torch_rng")
STAGE_KEYS = ("weights", "iteration", "selection")
RETRAIN = "retrain the run (`ssl-bench run ... --overwrite`) or restore the file from a copy of the run folder"


def _require(obj: dict, keys, path: Path, what_to_do: str, kind: str) -> dict:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DamagedFileError(path, f"not a {kind}: no {missing[0]!r}", what_to_do)
    return obj


def load_stage_file(path: Path, what_to_do: str = RETRAIN) -> dict:
    """A stage file (the weights a stage hands on), loaded as plain data; one UserError if unsafe or damaged."""
    handed = load_torch(path, what_to_do, kind="stage file")
    _require(handed, STAGE_KEYS, path, what_to_do, "stage file")
    if not isinstance(handed["weights"], dict):
        raise DamagedFileError(path, "its weights are not a state dict", what_to_do)
    return handed


def load_checkpoint_file(path: Path, what_to_do: str) -> dict:
    return _require(load_torch(path, what_to_do, kind="checkpoint"), CHECKPOINT_KEYS, path, what_to_do, "checkpoint")


class _StopRequest:
    """Ctrl-C asks the loop to stop at the next iteration boundary (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    #: prepare batch i+1 (and the stage's host targets) in a background thread while i trains; same numbers off
    prefetch = True

    def __init__(self, cfg: RunConfig, out: Path, data: LAData, progress: bool = True):
        self.cfg, self.out, self.data, self.progress = cfg, Path(out), data, progress
        self.spec = get_method(cfg.method)
        self.device = resolve_device(cfg.device)
        self.split = data.split(cfg.labeled, cfg.val_cases or 0)
        self.test_ids = list(self.split.test[: cfg.eval_cases] if cfg.eval_cases else self.split.test)
        # the cases a selecting protocol scores during training: under `val` never a test case
        self.selection_ids = list(self.split.val) if cfg.protocol == "val" else self.test_ids
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise UserError(FP16_ON_CPU)
        self.cuda_fast = self.device.type == "cuda" and cfg.fast  # the fast-path switches besides precision
        self.amp_dtype = autocast_dtype(cfg.precision)  # None: no autocast (fp32, tf32)
        self.eval_settings = EvalSettings(patch=cfg.patch, stride_xy=cfg.eval_stride_xy, stride_z=cfg.eval_stride_z,
                                          precision=cfg.precision, empty_policy=cfg.empty_policy, units=cfg.units)
        self.ctx = StageContext(labeled=cfg.labeled, patch=tuple(cfg.patch), n_filters=cfg.n_filters,
                                iterations=cfg.iterations, options=dict(cfg.options),
                                schedule_scale=cfg.schedule_scale)
        known = {name for cls in self.spec.stages for name in cls.known_options}
        unknown = sorted(set(cfg.options) - known)
        if unknown:
            raise UserError(f"{cfg.method} has no option {unknown[0]!r}; its options: {', '.join(sorted(known)) or 'none'}")
        self.stages = [cls(self.ctx) for cls in self.spec.stages]
        self._sums: dict[str, str] = {}  # sha256 of the data files, computed once
        self._teacher: dict | None = None  # the validated stage 1 of --teacher

    # -- folder ---------------------------------------------------------------------------
    def stage_iterations(self, k: int) -> int:
        return self.stages[k].run_iterations()

    def selection_rule(self, stage) -> tuple[tuple[int, int] | None, int]:
        """(first iteration, reference interval) of the stage's selection under the run's protocol, or None,
        and the interval used: both scaled (Decision 10) unless --selection-every sets the interval."""
        selection = _selection.rule(self.cfg.protocol, stage.literature_selection)
        if selection is not None:
            selection = (stage.scaled(selection[0]) if selection[0] else 0, stage.scaled(selection[1]))
        return selection, self.cfg.selection_every or (selection[1] if selection else stage.scaled(200))

    def describe(self) -> dict:
        stages = []
        for k, st in enumerate(self.stages):
            stages.append({"stage": type(st).__name__, "iterations": self.stage_iterations(k),
                           "batch_labeled": st.batch_labeled, "batch_unlabeled": st.batch_unlabeled,
                           "base_lr": st.base_lr, "phases": list(st.phases), "paper_lcc": st.paper_lcc,
                           "literature_selection": st.literature_selection,
                           **({"scaled_selection": self.selection_rule(st)[0]} if self.cfg.schedule_scale != 1.0 else {})})
        return {"name": self.spec.name, "summary": self.spec.summary, "stages": stages}

    def used_ids(self) -> list[str]:
        return list(self.split.labeled) + list(self.split.unlabeled) + list(self.test_ids)

    def data_sums(self, ids) -> dict[str, str]:
        todo = [i for i in ids if i not in self._sums]
        if todo:
            self._sums.update(self.data.checksums(todo))
        return {i: self._sums[i] for i in ids}

    def check_data(self, recorded, ids, where: str, what_to_do: str) -> None:
        """The data files read now must be the ones whose sha256 ``recorded`` holds (config.json's data.sha256)."""
        recorded = recorded if isinstance(recorded, dict) else {}
        ids = [i for i in ids if i in recorded]
        current = self.data_sums(ids)
        for case in ids:
            if current[case] != recorded[case]:
                raise UserError(f"data changed: case {case} ({self.data.case_path(case)}) differs from the file {where} "
                                f"(sha256 in its config.json); {what_to_do}")

    def numerics(self) -> dict:
        """What the run computes with, as set up on its device: precision, autocast, TF32, the other switches."""
        return _numerics(self.cfg.precision, self.device.type, self.cuda_fast)

    def write_config(self) -> None:
        used = self.used_ids()
        cfg_json = self.cfg.to_json()
        atomic_write_json(self.out / "config.json", {
            "config": cfg_json,
            "numerics": self.numerics(),
            "evaluation": asdict(self.eval_settings),  # sliding window, its batch and padding, units
            "method": self.describe(),
            "split": {"labeled": list(self.split.labeled), "n_unlabeled": len(self.split.unlabeled),
                      "unlabeled": list(self.split.unlabeled), "test": self.test_ids,
                      "val": list(self.split.val)},  # `val`: the selection cases, inside the unlabeled pool
            "data": {"root": str(self.data.root), "sha256": self.data_sums(used),
                     # an imported data set's settings (ssl_bench_dataset.json); None for the LA release
                     "imported": self.data.dataset_settings(),
                     "listed_sha256_file": self.data.listed_sums() is not None},
            "provenance": provenance(),
        })

    def check_resumable(self) -> None:
        config = read_json(self.out / "config.json")
        stored = with_precision(config["config"], str(self.device))  # a folder from before precision was recorded
        stored = {**ADDED_DEFAULTS, **stored}  # and settings added since, at the value it computed with
        mine = self.cfg.to_json()
        # the device may change (e.g. a sweep resumed on other hardware); everything that defines the run may not
        diff = [k for k in mine if k != "device" and stored.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise UserError(f"cannot resume {self.out}: setting {k!r} was {stored.get(k)!r}, now {mine[k]!r}")
        check_split(config, self.data, f"{self.out} (config.json)", "resume with --data pointing at the lists it was "
                    "trained on, or restore train.list and test.list")
        self.check_data((config.get("data") or {}).get("sha256"), self.used_ids(), f"{self.out.name} was trained on",
                        "resume with --data pointing at the data it was trained on")

    def load_checkpoint(self) -> dict | None:
        """The newest readable checkpoint generation (None: none written yet); says which one it used.

        A damaged ``last.pt`` falls back to ``previous.pt`` and is kept aside as ``last.pt.damaged``; a
        file that would run code is refused outright.
        """
        folder = self.out / "checkpoints"
        last, prev = folder / LAST, folder / PREVIOUS
        restart = ("move it away to restart the interrupted stage from its beginning, or start over with "
                   "`ssl-bench run ... --overwrite`")
        damaged = None
        if last.is_file():
            try:
                hint = restart if prev.is_file() else f"there is no earlier checkpoint: {restart}"
                state = load_checkpoint_file(last, hint)
            except DamagedFileError as exc:
                if not prev.is_file():
                    raise
                damaged = exc
            else:
                _notice(f"resuming from checkpoints/{LAST} (stage {state['stage'] + 1}, iteration {state['iteration']})")
                return state
        if not prev.is_file():
            return None
        try:
            state = load_checkpoint_file(prev, restart)
        except DamagedFileError as exc:
            if damaged is None:
                raise UserError(f"{exc} (and {last} is missing)") from None
            raise UserError(f"both checkpoints of {self.out} are damaged: {LAST} ({damaged.reason}) and {PREVIOUS} "
                            f"({exc.reason}); {restart.replace('move it away', 'move both away')}") from None
        if damaged is not None:
            os.replace(last, folder / f"{LAST}.damaged")  # the next checkpoint must not push the good one out
        why = f"{LAST} is damaged, kept as checkpoints/{LAST}.damaged" if damaged is not None else f"{LAST} is missing"
        _notice(f"{why}; resuming from checkpoints/{PREVIOUS} (stage {state['stage'] + 1}, iteration {state['iteration']})")
        return state

    # -- training -------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_at: tuple[int, int] | None = None) -> dict:
        """Train every stage, then evaluate. ``stop_at=(stage, iteration)`` simulates an interruption (tests)."""
        state = None
        if resume:
            self.check_resumable()
            state = self.load_checkpoint()
        else:
            self.write_config()
        self._truncate_log(state)
        timings = state["timings"] if state else {}
        previous = None
        if self.cfg.teacher and not (self.out / "stages" / "stage1.pt").is_file():
            self.adopt_teacher(Path(self.cfg.teacher))
        for k in range(len(self.stages)):
            final = self.out / "stages" / f"stage{k + 1}.pt"
            if final.is_file() and (state is None or state["stage"] > k):
                previous = load_stage_file(final)
                continue
            stage_state = state if state is not None and state["stage"] == k else None
            previous = self.train_stage(k, previous, stage_state, timings, stop_at)
            state = None
        summary = self.evaluate(timings)
        # finished: last.pt and the stage files are all that --resume, eval and --teacher need
        (self.out / "checkpoints" / PREVIOUS).unlink(missing_ok=True)
        return summary

    def teacher_stage1(self) -> dict:
        """Stage 1 of ``--teacher``, checked (before this run writes anything): method, settings, data, plain file."""
        if self._teacher is not None:
            return self._teacher
        run_dir = Path(self.cfg.teacher)
        if len(self.stages) < 2:
            raise UserError(f"--teacher needs a multi-stage method; {self.spec.name} has one stage")
        src = run_dir / "stages" / "stage1.pt"
        if not src.is_file():
            raise UserError(f"--teacher {run_dir}: no finished stage 1 (stages/stage1.pt)")
        config = read_json(run_dir / "config.json")
        theirs = with_precision(config["config"], _summary_device(run_dir))
        handed = load_stage_file(src, "retrain the teacher run or pass another --teacher")
        want = type(self.stages[0]).__name__
        if handed.get("stage_class") != want:
            raise UserError(f"--teacher {run_dir}: its stage 1 is {handed.get('stage_class')}, {self.spec.name} needs {want}")
        for key in ("labeled", "patch", "n_filters", "protocol", "precision", "val_cases"):
            mine = self.cfg.to_json()[key]
            if theirs.get(key) != mine:
                raise UserError(f"--teacher {run_dir}: its {key} is {theirs.get(key)!r}, this run's is {mine!r}")
        check_split(config, self.data, f"--teacher {run_dir}", "pass --data with the lists the teacher was trained "
                    "on, or retrain the teacher")
        self.check_data((config.get("data") or {}).get("sha256"), self.used_ids(), f"--teacher {run_dir} was trained on",
                        "pass --data with the data the teacher was trained on, or retrain the teacher")
        self._teacher = handed
        return handed

    def adopt_teacher(self, run_dir: Path) -> None:
        """Reuse stage 1 of another run (e.g. one `omf-s1` run feeding several stage-2 runs)."""
        handed = dict(self.teacher_stage1())
        handed["adopted_from"] = str(run_dir)
        atomic_torch_save(handed, self.out / "stages" / "stage1.pt")

    def _truncate_log(self, state) -> None:
        log = self.out / "log.jsonl"
        if not log.is_file():
            return
        keep_until = (state["stage"] + 1, state["iteration"]) if state else None
        lines = []
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the interruption
            if keep_until is None or (row["stage"], row["iteration"]) <= keep_until:
                lines.append(line)
        if keep_until is None:
            # completed stages are kept; the interrupted stage restarts from its beginning
            done = {int(m.group(1)) for p in (self.out / "stages").glob("stage*.pt")
                    if (m := re.fullmatch(r"stage(\d+)", p.stem))}
            lines = [ln for ln in lines if json.loads(ln)["stage"] in done]
        atomic_write_text(log, "".join(ln + "\n" for ln in lines))

    def _autocast(self):
        """bf16/fp16 autocast on the run's device (CPU bf16 too, so tests exercise it); none for fp32/tf32."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def _setup_backend(self) -> None:
        set_backend(self.cfg.precision, self.device.type, self.cfg.fast)

    def make_scalers(self, stage) -> dict:
        return _make_scalers(self.cfg.precision, self.device.type, stage.phases)

    def build_stage(self, k: int, previous):
        stage = self.stages[k]
        torch.manual_seed(self.cfg.seed + 1000 * k)
        nets = stage.networks()
        for name, net in nets.items():
            net.to(self.device)
            if self.cuda_fast:
                net.to(memory_format=torch.channels_last_3d)
        if previous is not None:
            stage.init_from(nets, previous["weights"])
        return stage, nets

    def make_stream(self, k: int, stage) -> TrainStream:
        storage = self.device if self.cuda_fast else torch.device("cpu")
        return TrainStream(self.data, self.split, self.cfg.patch, stage.batch_labeled, stage.batch_unlabeled,
                           seed=self.cfg.seed + 1000 * k, storage=storage, device=self.device,
                           keep_last=stage.keep_last_batch)

    def train_step(self, stage, nets, opts, batch, it0: int, scalers: dict | None = None) -> dict:
        """One iteration: every phase's loss, backward and optimiser step, then the stage's after-step.

        ``scalers`` (fp16, :meth:`make_scalers`): the phase's gradient scaler scales its loss, unscales and
        checks the gradients of its optimiser before the step (skipped on inf/nan), then updates its scale.
        """
        stage.train_modes(nets)
        logs = {}
        scalers = scalers or {}
        for phase in stage.phases:
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            with self._autocast():
                loss, parts = stage.losses(phase, nets, batch, it0)
            scaler = scalers.get(phase)
            if scaler is None:
                loss.backward()
                opts[phase].step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opts[phase])
                scaler.update()
            logs["loss" if phase == "main" else f"loss_{phase}"] = loss.detach()
            logs.update({k: (v.detach() if torch.is_tensor(v) else v) for k, v in parts.items()})
        stage.after_step(nets, it0)
        return logs

    def train_stage(self, k: int, previous, state, timings: dict, stop_at) -> dict:
        self._setup_backend()
        stage, nets = self.build_stage(k, previous)
        opts = stage.optimizers(nets)
        scalers = self.make_scalers(stage)
        stream = PrefetchStream(self.make_stream(k, stage), getattr(stage, "host_targets", None), enabled=self.prefetch)
        iters = self.stage_iterations(k)
        protocol = self.cfg.protocol
        selection, sel_every = self.selection_rule(stage)
        sel_key, sel_label = _selection.LOG_KEY.get(protocol), _selection.LABEL.get(protocol)
        best = {"dice": None, "iteration": None}
        start, elapsed_before = 0, 0.0
        if state is not None:
            for name, net in nets.items():
                net.load_state_dict(state["nets"][name])
            for name, opt in opts.items():
                opt.load_state_dict(state["optimizers"][name])
            stream.load_state_dict(state["stream"])
            torch.set_rng_state(state["torch_rng"])
            self._restore_cuda_rng(state)
            start, best, elapsed_before = state["iteration"], state["best"], state["elapsed_s"]
            stage.load_extra_state(state.get("extra"))
            for name, scaler in scalers.items():
                saved = (state.get("scalers") or {}).get(name)
                if saved is None:
                    raise UserError(f"cannot resume {self.out}: its checkpoint has no fp16 gradient-scaler state "
                                    f"for phase {name!r}; restart it with `ssl-bench run ... --overwrite`")
                scaler.load_state_dict(saved)
        for opt in opts.values():
            for g in opt.param_groups:
                g["lr"] = stage.lr(start) if opt is opts["main"] else g["lr"]
        key = f"stage{k + 1}"
        bar = Progress(iters, f"{self.spec.name} {key}" if len(self.stages) > 1 else self.spec.name,
                       enabled=self.progress, start=start)
        log_path = self.out / "log.jsonl"
        t0 = time.perf_counter()
        t_last, it_last = t0, start
        with _StopRequest() as stop, open_append(log_path) as log, stream:  # `stream`: ends the prefetch thread
            for it0 in range(start, iters):
                batch = stream.next()
                if self.cuda_fast:
                    batch.image = batch.image.contiguous(memory_format=torch.channels_last_3d)
                logs = self.train_step(stage, nets, opts, batch, it0, scalers)
                done = it0 + 1
                lr = stage.lr(done)
                for g in opts["main"].param_groups:
                    g["lr"] = lr
                if selection and done >= selection[0] and done % sel_every == 0:
                    dice = self._selection_dice(stage, nets)
                    logs[sel_key] = dice
                    if best["dice"] is None or dice > best["dice"]:
                        # Decision 9: the running best is round(dice, 4), as the SS-Net/BCP/OMF scripts keep it
                        best = {"dice": round(dice, 4), "iteration": done}
                        self._save_weights(stage, nets, self.out / "checkpoints" / f"{key}_best.pt", done, sel_label)
                if done % self.cfg.log_every == 0 or done in (iters, start + 1) or sel_key in logs:
                    now = time.perf_counter()
                    rate = (done - it_last) / (now - t_last) if now > t_last else 0.0
                    t_last, it_last = now, done
                    row = {"stage": k + 1, "iteration": done, "lr": lr, "it_per_s": round(rate, 4),
                           "elapsed_s": round(elapsed_before + now - t0, 3)}
                    row.update({n: (float(v) if torch.is_tensor(v) else v) for n, v in logs.items()})
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.update(done, f"loss {row['loss']:.4f} lr {lr:.2e}")
                elapsed = elapsed_before + time.perf_counter() - t0
                interrupt = stop.requested or (stop_at is not None and stop_at == (k + 1, done))
                if done % self.cfg.checkpoint_every == 0 or done == iters or interrupt:
                    self._save_state(k, done, stage, nets, opts, stream, best, elapsed, timings, scalers)
                if interrupt:
                    bar.close()
                    raise Interrupted(f"interrupted at {key} iteration {done}; continue with --resume")
        bar.close()
        elapsed = elapsed_before + time.perf_counter() - t0
        timings[key] = {"train_s": round(elapsed, 3), "iterations": iters, "it_per_s": round(iters / elapsed, 4)}
        if selection and best["iteration"] is not None:
            handed = load_stage_file(self.out / "checkpoints" / f"{key}_best.pt")
            # the last weights are kept beside the test-selected ones, so both can be reported
            self._save_weights(stage, nets, self.out / "stages" / f"{key}_last.pt", iters, "last")
        else:
            handed = {"weights": self._weights(stage, nets), "iteration": iters, "selection": "last"}
            if selection:  # e.g. SS-Net's selection starts at 2000, beyond a short run
                handed["selection_note"] = _selection.no_selection_note(protocol, selection, sel_every, iters)
        handed.update({"stage": k + 1, "stage_class": type(stage).__name__,
                       _selection.BEST_KEY.get(protocol, "best_on_test"): best, "protocol": self.cfg.protocol})
        atomic_torch_save(handed, self.out / "stages" / f"{key}.pt")
        return handed

    def _weights(self, stage, nets) -> dict:
        return {n: v.detach().cpu().clone() for n, v in nets[stage.trained].state_dict().items()}

    def _save_weights(self, stage, nets, path: Path, iteration: int, selection: str) -> None:
        atomic_torch_save({"weights": self._weights(stage, nets), "iteration": iteration, "selection": selection}, path)

    def _save_state(self, k, done, stage, nets, opts, stream, best, elapsed, timings, scalers=None) -> None:
        # plain data only (tensors, numbers, strings, lists, dicts): --resume loads it with weights_only=True
        save_checkpoint({
            "stage": k, "iteration": done, "best": best, "elapsed_s": elapsed, "timings": dict(timings),
            "nets": {n: net.state_dict() for n, net in nets.items()},
            "optimizers": {n: o.state_dict() for n, o in opts.items()},
            "stream": stream.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "extra": stage.extra_state(),
            "scalers": {n: s.state_dict() for n, s in (scalers or {}).items()},  # fp16 only; plain numbers
        }, self.out / "checkpoints")

    def _restore_cuda_rng(self, state) -> None:
        """The generator of the run's own device only: a CPU run never opens a CUDA context."""
        saved = state.get("cuda_rng")
        if saved is None or self.device.type != "cuda":
            return
        if isinstance(saved, (list, tuple)):  # older checkpoints held every visible GPU's generator
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            if index < len(saved):
                torch.cuda.set_rng_state(saved[index], self.device)
            return
        torch.cuda.set_rng_state(saved, self.device)

    def _selection_dice(self, stage, nets) -> float:
        """Mean raw Dice on the selection cases: the test cases under `literature`, the validation cases under `val`."""
        rows, _ = evaluate_cases(stage.foreground_probability, nets[stage.trained], self.data, self.selection_ids,
                                 self.eval_settings, self.device, progress=False, dice_only=True)
        return mean_dice(rows)

    # -- evaluation -----------------------------------------------------------------------
    def final_network(self, which: str = "selected"):
        """The last stage's evaluated network: the protocol's selection, or (``which="last"``) its last weights."""
        k = len(self.stages) - 1
        stage = self.stages[k]
        name = f"stage{k + 1}.pt" if which == "selected" else f"stage{k + 1}_last.pt"
        handed = load_stage_file(self.out / "stages" / name)
        torch.manual_seed(self.cfg.seed)
        net = stage.networks()[stage.trained]
        net.load_state_dict(handed["weights"])
        net.to(self.device)
        if self.cuda_fast:
            net.to(memory_format=torch.channels_last_3d)
        return stage, net, handed

    def _evaluate_one(self, which: str, csv_name: str):
        stage, net, handed = self.final_network(which)
        rows, eval_t = evaluate_cases(stage.foreground_probability, net, self.data, self.test_ids,
                                      self.eval_settings, self.device, progress=self.progress)
        write_metrics_csv(self.out / csv_name, rows)
        checkpoint = {"stage": len(self.stages), "iteration": handed["iteration"], "selection": handed["selection"]}
        return stage, handed, rows, eval_t, checkpoint

    def evaluate(self, timings: dict | None = None) -> dict:
        self._setup_backend()  # TF32 and cuDNN flags as the run declares, also when `ssl-bench eval` calls this
        if timings is None:  # read before anything is rewritten: a damaged summary.json stops here
            old = self.out / "summary.json"
            timings = read_json(old).get("timings", {}) if old.is_file() else {}
        stage, handed, rows, eval_t, checkpoint = self._evaluate_one("selected", "metrics_per_case.csv")
        timings = dict(timings)
        timings["eval"] = {k: round(v, 3) for k, v in eval_t.items()}
        summary = {
            "method": self.spec.name, "labeled": self.cfg.labeled, "seed": self.cfg.seed,
            "protocol": self.cfg.protocol, "profile": self.cfg.profile,
            "precision": self.cfg.precision, "numerics": self.numerics(),
            "checkpoint": checkpoint,
            "best_on_test": handed.get("best_on_test"),
            **({"best_on_val": handed.get("best_on_val"), "val_cases": list(self.split.val)}
               if self.cfg.protocol == "val" else {}),
            "selection_note": handed.get("selection_note"),
            "paper_post": "lcc" if stage.paper_lcc else "raw",
            "empty_policy": self.cfg.empty_policy,
            "units": self.cfg.units,
            "test_cases": self.test_ids,
            "metrics": summarize(rows),
            "timings": timings,
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(0) if self.device.type == "cuda" else None,
        }
        if (self.out / "stages" / f"stage{len(self.stages)}_last.pt").is_file():
            _, _, rows_last, _, ck_last = self._evaluate_one("last", "metrics_per_case_last.csv")
            summary["last"] = {"checkpoint": ck_last, "metrics": summarize(rows_last)}
        atomic_write_json(self.out / "summary.json", summary)
        return summary


def _summary_device(run_dir: Path) -> str | None:
    """The device a finished run used (its summary.json), for folders made before precision was recorded."""
    try:
        summary = read_json(Path(run_dir) / "summary.json")
    except (UserError, OSError):
        return None
    return summary.get("device") if isinstance(summary, dict) else None


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    cols = ["case", "post", "dice", "jaccard", "hd95", "asd", "empty"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: (repr(float(r[c])) if c in ("dice", "jaccard", "hd95", "asd") else r[c]) for c in cols})
    atomic_write_text(path, buf.getvalue())


def run_training(cfg: RunConfig, out: Path, data_dir=None, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, stop_at=None) -> dict:
    """Validate everything that can be checked cheaply BEFORE touching the output folder, then train."""
    data = LAData(data_dir)
    given = Path(out)  # unresolved: --overwrite refuses a symbolic link
    out = given.resolve()
    trainer = Trainer(cfg, out, data, progress=progress)  # method, options, split, device: checked, nothing written
    data.check(trainer.split.labeled + trainer.split.unlabeled + trainer.split.test)
    if cfg.units == "mm":
        data.require_spacing(trainer.test_ids)
    if cfg.teacher and not (resume and (out / "stages" / "stage1.pt").is_file()):
        trainer.teacher_stage1()  # its method, settings, data and file, before this run writes anything
    # holds the folder's one-writer lock; --overwrite empties only a run folder, never the data
    with prepare_run_dir(given, resume=resume, overwrite=overwrite, data_root=data.root):
        return trainer.run(resume=resume, stop_at=stop_at)


def load_run(run_dir: Path, data_dir=None, device: str | None = None, progress: bool = True) -> Trainer:
    """A finished run folder, checked: its config, its data (sha256 of the test cases it reads), its stage files."""
    run_dir = Path(run_dir).resolve()
    config_path = run_dir / "config.json"
    stored = read_json(config_path)
    try:
        legacy = isinstance(stored["config"], dict) and stored["config"].get("precision") is None
        cfg = RunConfig.from_json(stored["config"], _summary_device(run_dir) if legacy else None)
        cfg.validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{config_path} is damaged (its config section: {type(exc).__name__}: {exc}); it cannot be "
                        f"rebuilt: restore it from a copy of the run folder, or retrain the run") from None
    if device is not None:
        cfg = replace(cfg, device=device)
    recorded = stored.get("data") if isinstance(stored.get("data"), dict) else {}
    if data_dir is None and not recorded.get("root"):
        raise UserError(f"{config_path} records no data root; pass --data")
    data = LAData(data_dir if data_dir is not None else recorded["root"])
    trainer = Trainer(cfg, run_dir, data, progress=progress)
    last = len(trainer.stages)
    if not (run_dir / "stages" / f"stage{last}.pt").is_file():
        raise UserError(f"{run_dir} has no trained model yet (stages/stage{last}.pt); finish it with --resume")
    check_split(stored, data, f"{run_dir} (config.json)", "pass --data with the lists the run was evaluated on, or "
                "restore test.list and train.list")
    trainer.check_data(recorded.get("sha256"), trainer.test_ids, f"{run_dir.name} was evaluated on",
                       "pass --data with the data the run was trained on")
    for name in (f"stage{last}.pt", f"stage{last}_last.pt"):  # unsafe or damaged: refused before anything is written
        if name == f"stage{last}.pt" or (run_dir / "stages" / name).is_file():
            load_stage_file(run_dir / "stages" / name)
    return trainer


def evaluate_run(run_dir: Path, data_dir=None, device: str | None = None, progress: bool = True) -> dict:
    """`ssl-bench eval`: re-evaluate a finished run folder, holding its one-writer lock."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    if not (run_dir / "config.json").is_file():
        raise UserError(f"missing file: {run_dir / 'config.json'} (is {run_dir} a run folder?)")
    with lock_folder(run_dir):
        require_run_entries(run_dir)  # eval rewrites summary.json and the CSVs: never through a link
        return load_run(run_dir, data_dir, device, progress=progress).evaluate()
