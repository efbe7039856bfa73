"""Evaluating a run folder: its final network on the test cases, the metrics CSVs and summary.json.

Needs no :class:`~ssl_bench.trainer.Trainer`. The end of training, ``ssl-bench eval`` and the occlusion
test all go through here: :func:`evaluate_folder` scores the last stage's handed-on weights (the
protocol's selection) and, where the stage also kept them, its last weights; :func:`load_run` opens a
finished folder for reading, checked against its records first.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .config import RunConfig
from .data import LAData, check_split
from .errors import UserError
from .evaluate import evaluate_cases, summarize
from .run_folder import RunFolder
from .run_setup import RunSetup


def final_network(setup: RunSetup, folder: RunFolder, which: str = "selected"):
    """The last stage's evaluated network: the protocol's selection, or (``which="last"``) its last weights."""
    k = len(setup.stages) - 1
    stage = setup.stages[k]
    handed = folder.load_stage(k + 1, which)
    torch.manual_seed(setup.cfg.seed)
    net = stage.networks()[stage.trained]
    net.load_state_dict(handed["weights"])
    net.to(setup.device)
    if setup.cuda_fast:
        net.to(memory_format=torch.channels_last_3d)
    return stage, net, handed


def _evaluate_one(setup: RunSetup, folder: RunFolder, which: str, progress: bool):
    stage, net, handed = final_network(setup, folder, which)
    rows, eval_t = evaluate_cases(stage.foreground_probability, net, setup.data, setup.test_ids,
                                  setup.eval_settings, setup.device, progress=progress)
    folder.write_metrics(rows, which)
    checkpoint = {"stage": len(setup.stages), "iteration": handed["iteration"], "selection": handed["selection"]}
    return stage, handed, rows, eval_t, checkpoint


def evaluate_folder(setup: RunSetup, folder: RunFolder, timings: dict | None = None, progress: bool = True) -> dict:
    """Score the folder's final weights on the test cases; write the metrics CSV(s) and summary.json."""
    setup._setup_backend()  # TF32 and cuDNN flags as the run declares, also when `ssl-bench eval` calls this
    cfg = setup.cfg
    if timings is None:  # read before anything is rewritten: a damaged summary.json stops here
        timings = folder.read_summary().get("timings", {}) if folder.is_finished() else {}
    stage, handed, rows, eval_t, checkpoint = _evaluate_one(setup, folder, "selected", progress)
    timings = dict(timings)
    timings["eval"] = {k: round(v, 3) for k, v in eval_t.items()}
    summary = {
        "method": setup.spec.name, "labeled": cfg.labeled, "seed": cfg.seed,
        "protocol": cfg.protocol, "profile": cfg.profile,
        "precision": cfg.precision, "numerics": setup.numerics(),
        "checkpoint": checkpoint,
        "best_on_test": handed.get("best_on_test"),
        **({"best_on_val": handed.get("best_on_val"), "val_cases": list(setup.split.val)}
           if cfg.protocol == "val" else {}),
        "selection_note": handed.get("selection_note"),
        "paper_post": "lcc" if stage.paper_lcc else "raw",
        "empty_policy": cfg.empty_policy,
        "units": cfg.units,
        "test_cases": setup.test_ids,
        "metrics": summarize(rows),
        "timings": timings,
        "device": str(setup.device),
        "gpu": torch.cuda.get_device_name(0) if setup.device.type == "cuda" else None,
    }
    if folder.has_stage(len(setup.stages), "last"):
        _, _, rows_last, _, ck_last = _evaluate_one(setup, folder, "last", progress)
        summary["last"] = {"checkpoint": ck_last, "metrics": summarize(rows_last)}
    folder.write_summary(summary)
    return summary


class FinishedRun(RunSetup):
    """A finished run folder opened for reading (:func:`load_run`): its set-up, its folder, its networks."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, data: LAData, progress: bool = True):
        super().__init__(cfg, data)
        self.folder, self.out, self.progress = folder, folder.path, progress

    def final_network(self, which: str = "selected"):
        return final_network(self, self.folder, which)

    def evaluate(self, timings: dict | None = None) -> dict:
        return evaluate_folder(self, self.folder, timings, self.progress)


def load_run(run_dir: Path, data_dir=None, device: str | None = None, progress: bool = True) -> FinishedRun:
    """A finished run folder, checked: its config, its data (sha256 of the test cases it reads), its stage files."""
    folder = RunFolder(Path(run_dir).resolve())
    run_dir = folder.path
    config_path = folder.config_path
    stored = folder.read_config()
    try:
        legacy = isinstance(stored["config"], dict) and stored["config"].get("precision") is None
        cfg = RunConfig.from_json(stored["config"], folder.summary_device() if legacy else None)
        cfg.validate()
    except (KeyError, TypeError, ValueError, UserError) as exc:  # an edited config.json: types and ranges too
        what = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        raise UserError(f"{config_path} is damaged (its config section: {what}); it cannot be "
                        f"rebuilt: restore it from a copy of the run folder, or retrain the run") from None
    if device is not None:
        cfg = replace(cfg, device=device)
    recorded = stored.get("data") if isinstance(stored.get("data"), dict) else {}
    if data_dir is None and not recorded.get("root"):
        raise UserError(f"{config_path} records no data root; pass --data")
    data = LAData(data_dir if data_dir is not None else recorded["root"])
    run = FinishedRun(cfg, folder, data, progress=progress)
    last = len(run.stages)
    if not folder.has_stage(last):
        raise UserError(f"{run_dir} has no trained model yet (stages/stage{last}.pt); finish it with --resume")
    check_split(stored, data, f"{run_dir} (config.json)", "pass --data with the lists the run was evaluated on, or "
                "restore test.list and train.list")
    run.check_data(recorded.get("sha256"), run.test_ids, f"{run_dir.name} was evaluated on",
                   "pass --data with the data the run was trained on")
    for which in ("selected", "last"):  # unsafe or damaged: refused before anything is written
        if which == "selected" or folder.has_stage(last, which):
            folder.load_stage(last, which)
    return run


def evaluate_run(run_dir: Path, data_dir=None, device: str | None = None, progress: bool = True) -> dict:
    """`ssl-bench eval`: re-evaluate a finished run folder, holding its one-writer lock."""
    folder = RunFolder(Path(run_dir).resolve())
    if not folder.path.is_dir():
        raise UserError(f"run folder not found: {folder.path}")
    if not folder.has_config():
        raise UserError(f"missing file: {folder.config_path} (is {folder.path} a run folder?)")
    with folder.lock():
        folder.require_entries()  # eval rewrites summary.json and the CSVs: never through a link
        return load_run(folder.path, data_dir, device, progress=progress).evaluate()
