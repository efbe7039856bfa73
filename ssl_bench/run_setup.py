"""One run as set up on its data and device, and the checks of a run folder's records against it.

:class:`RunSetup` turns a :class:`~ssl_bench.config.RunConfig` and a data set into what training and
evaluation both need: the method's stages, the split, the test and selection cases, the device and its
numerics, the evaluation settings. It also checks a folder's records against this run before anything
is read from it or written to it: the settings (``--resume``), the split lists and the data checksums
(``--resume``, ``eval``, ``occlusion``, ``--teacher``), and a ``--teacher``'s stage 1. The training loop
(:mod:`ssl_bench.trainer`) and the evaluation of a finished folder (:mod:`ssl_bench.evaluation`) build on it.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict

import torch

from .config import ADDED_DEFAULTS, RunConfig
from .data import LAData, TrainStream, check_split
from .errors import UserError
from .evaluate import EvalSettings
from .method import StageContext, get_method
from .precision import FP16_ON_CPU, autocast_dtype, set_backend, with_precision
from .precision import make_scalers as _make_scalers, numerics as _numerics
from . import selection as _selection
from .run_folder import RunFolder
from .runs import provenance


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


class RunSetup:
    def __init__(self, cfg: RunConfig, data: LAData):
        self.cfg, self.data = cfg, data
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

    # -- the method's stages -----------------------------------------------------------------------
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

    def build_stage(self, k: int, previous):
        """Stage k's networks (seeded by the run's seed and k) on the device, started from ``previous``'s weights."""
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

    def make_stream(self, k: int, stage, on: torch.device | None = None) -> TrainStream:
        """Stage k's sampler (seeded by the run's seed and k); ``on``: keep the batches on that device instead of
        moving them to the run's (the host-work measurement times the transfer apart)."""
        storage = self.device if self.cuda_fast else torch.device("cpu")
        return TrainStream(self.data, self.split, self.cfg.patch, stage.batch_labeled, stage.batch_unlabeled,
                           seed=self.cfg.seed + 1000 * k, storage=on or storage, device=on or self.device,
                           keep_last=stage.keep_last_batch)

    # -- numerics ---------------------------------------------------------------------------------
    def numerics(self) -> dict:
        """What the run computes with, as set up on its device: precision, autocast, TF32, the other switches."""
        return _numerics(self.cfg.precision, self.device.type, self.cuda_fast)

    def _autocast(self):
        """bf16/fp16 autocast on the run's device (CPU bf16 too, so tests exercise it); none for fp32/tf32."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def _setup_backend(self) -> None:
        set_backend(self.cfg.precision, self.device.type, self.cfg.fast)

    def make_scalers(self, stage) -> dict:
        return _make_scalers(self.cfg.precision, self.device.type, stage.phases)

    # -- data and records ---------------------------------------------------------------------------
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

    def config_record(self) -> dict:
        """config.json: every setting, numerics, evaluation, the method's stages, split, data checksums, provenance."""
        used = self.used_ids()
        return {
            "config": self.cfg.to_json(),
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
        }

    def check_resumable(self, folder: RunFolder) -> None:
        """``--resume``: the folder was started with this run's settings, split and data."""
        config = folder.read_config()
        stored = with_precision(config["config"], str(self.device))  # a folder from before precision was recorded
        stored = {**ADDED_DEFAULTS, **stored}  # and settings added since, at the value it computed with
        mine = self.cfg.to_json()
        # the device may change (e.g. a sweep resumed on other hardware); everything that defines the run may not
        diff = [k for k in mine if k != "device" and stored.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise UserError(f"cannot resume {folder.path}: setting {k!r} was {stored.get(k)!r}, now {mine[k]!r}")
        check_split(config, self.data, f"{folder.path} (config.json)", "resume with --data pointing at the lists it "
                    "was trained on, or restore train.list and test.list")
        self.check_data((config.get("data") or {}).get("sha256"), self.used_ids(), f"{folder.path.name} was trained on",
                        "resume with --data pointing at the data it was trained on")

    def teacher_stage1(self) -> dict:
        """Stage 1 of ``--teacher``, checked (before this run writes anything): method, settings, data, plain file."""
        if self._teacher is not None:
            return self._teacher
        teacher = RunFolder(self.cfg.teacher)
        run_dir = teacher.path
        if len(self.stages) < 2:
            raise UserError(f"--teacher needs a multi-stage method; {self.spec.name} has one stage")
        if not teacher.has_stage(1):
            raise UserError(f"--teacher {run_dir}: no finished stage 1 (stages/stage1.pt)")
        config = teacher.read_config()
        theirs = with_precision(config["config"], teacher.summary_device())
        handed = teacher.load_stage(1, what_to_do="retrain the teacher run or pass another --teacher")
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

