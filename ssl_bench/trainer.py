"""The one training loop for every method: build, restore, iterate, hand on; then evaluate.

What a run is (settings, profiles): :mod:`ssl_bench.config`. What it is on its data and device (stages,
split, numerics, checks of a folder's records): :mod:`ssl_bench.run_setup`. Where everything is written
and how it is read back: :mod:`ssl_bench.run_folder` (the run-folder schema). Scoring the final weights:
:mod:`ssl_bench.evaluation`. Which checkpoint a protocol selects: :mod:`ssl_bench.selection`.

Per stage k, :meth:`Trainer.train_stage` reads as the algorithm: build the stage's networks from the
weights the previous stage handed on, restore an interrupted stage from its checkpoint, then per
iteration draw a batch, take one step per phase (:meth:`Trainer.train_step`), set the learning rate,
score a selection point, log, checkpoint; at the end hand on the last or the selected weights.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import torch

from .config import PROFILES, RunConfig, build_config
from .data import LAData
from .errors import Interrupted, UserError
from .evaluate import evaluate_cases, mean_dice
from .evaluation import evaluate_folder, evaluate_run, final_network, load_run
from .precision import recorded_precision
from .prefetch import PrefetchStream
from .progress import Progress
from .run_folder import RunFolder, load_stage_file, prepare_run_dir
from .run_setup import RunSetup, resolve_device
from .runs import atomic_torch_save
from .selection import Selector

#: re-exported: the names callers have imported from here (settings: ssl_bench.config; evaluation: ssl_bench.evaluation)
__all__ = ["Trainer", "run_training", "RunConfig", "PROFILES", "build_config", "resolve_device", "load_run",
           "evaluate_run", "load_stage_file", "recorded_precision"]


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


class Trainer(RunSetup):
    #: prepare batch i+1 (and the stage's host targets) in a background thread while i trains; same numbers off
    prefetch = True

    def __init__(self, cfg: RunConfig, out: Path, data: LAData, progress: bool = True):
        super().__init__(cfg, data)
        self.folder = RunFolder(out)
        self.out, self.progress = self.folder.path, progress

    # -- the run --------------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_at: tuple[int, int] | None = None) -> dict:
        """Train every stage, then evaluate. ``stop_at=(stage, iteration)`` simulates an interruption (tests)."""
        folder, state = self.folder, None
        if resume:
            self.check_resumable(folder)
            state = folder.load_checkpoint()
        else:
            folder.write_config(self.config_record())
        folder.truncate_log(state)
        timings = state["timings"] if state else {}
        previous = None
        if self.cfg.teacher and not folder.has_stage(1):
            self.adopt_teacher(Path(self.cfg.teacher))
        for k in range(len(self.stages)):
            if folder.has_stage(k + 1) and (state is None or state["stage"] > k):
                previous = folder.load_stage(k + 1)
                continue
            stage_state = state if state is not None and state["stage"] == k else None
            previous = self.train_stage(k, previous, stage_state, timings, stop_at)
            state = None
        summary = self.evaluate(timings)
        folder.drop_previous()
        return summary

    def check_resumable(self, folder: RunFolder | None = None) -> None:
        super().check_resumable(folder or self.folder)

    def adopt_teacher(self, run_dir: Path) -> None:
        """Reuse stage 1 of another run (e.g. one `omf-s1` run feeding several stage-2 runs)."""
        handed = dict(self.teacher_stage1())
        handed["adopted_from"] = str(run_dir)
        self.folder.save_stage(1, handed)

    # -- one stage -------------------------------------------------------------------------------
    def train_stage(self, k: int, previous, state, timings: dict, stop_at) -> dict:
        self._setup_backend()
        stage, nets = self.build_stage(k, previous)
        opts = stage.optimizers(nets)
        scalers = self.make_scalers(stage)
        stream = self.open_stream(k, stage)
        iters = self.stage_iterations(k)
        rule, every = self.selection_rule(stage)
        selector = Selector(self.cfg.protocol, rule, every)
        start, elapsed_before = 0, 0.0
        if state is not None:
            start, elapsed_before = self._restore(state, stage, nets, opts, stream, scalers)
            selector.best = state["best"]
        for opt in opts.values():
            for g in opt.param_groups:
                g["lr"] = stage.lr(start) if opt is opts["main"] else g["lr"]
        key = f"stage{k + 1}"
        bar = Progress(iters, f"{self.spec.name} {key}" if len(self.stages) > 1 else self.spec.name,
                       enabled=self.progress, start=start)
        clock = _Clock(start, elapsed_before)
        with _StopRequest() as stop, self.folder.open_log() as log, stream:  # `stream`: ends the prefetch thread
            for it0 in range(start, iters):
                batch = self.next_batch(stream)
                logs = self.train_step(stage, nets, opts, batch, it0, scalers)
                done = it0 + 1
                lr = stage.lr(done)
                for g in opts["main"].param_groups:
                    g["lr"] = lr
                if selector.due(done):
                    dice = self._selection_dice(stage, nets)
                    logs[selector.log_key] = dice
                    if selector.offer(dice, done):
                        self._save_weights(stage, nets, self.folder.best_path(k + 1), done, selector.label)
                if done % self.cfg.log_every == 0 or done in (iters, start + 1) or selector.log_key in logs:
                    row = {"stage": k + 1, "iteration": done, "lr": lr, **clock.lap(done)}
                    row.update({n: (float(v) if torch.is_tensor(v) else v) for n, v in logs.items()})
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.update(done, f"loss {row['loss']:.4f} lr {lr:.2e}")
                interrupt = stop.requested or (stop_at is not None and stop_at == (k + 1, done))
                if done % self.cfg.checkpoint_every == 0 or done == iters or interrupt:
                    self._save_state(k, done, stage, nets, opts, stream, selector.best, clock.elapsed(), timings,
                                     scalers)
                if interrupt:
                    bar.close()
                    raise Interrupted(f"interrupted at {key} iteration {done}; continue with --resume")
        bar.close()
        elapsed = clock.elapsed()
        timings[key] = {"train_s": round(elapsed, 3), "iterations": iters, "it_per_s": round(iters / elapsed, 4)}
        return self._hand_on(k, stage, nets, iters, selector)

    def open_stream(self, k: int, stage) -> PrefetchStream:
        """Stage k's batches as the loop draws them: the next one (and the stage's host targets) prepared in a
        background thread while this one trains. Close it (``with``) to end the thread."""
        return PrefetchStream(self.make_stream(k, stage), getattr(stage, "host_targets", None), enabled=self.prefetch)

    def next_batch(self, stream):
        batch = stream.next()
        if self.cuda_fast:
            batch.image = batch.image.contiguous(memory_format=torch.channels_last_3d)
        return batch

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

    def _selection_dice(self, stage, nets) -> float:
        """Mean raw Dice on the selection cases: the test cases under `literature`, the validation cases under `val`."""
        rows, _ = evaluate_cases(stage.foreground_probability, nets[stage.trained], self.data, self.selection_ids,
                                 self.eval_settings, self.device, progress=False, dice_only=True)
        return mean_dice(rows)

    def _hand_on(self, k: int, stage, nets, iters: int, selector: Selector) -> dict:
        """stages/stageK.pt: the selected weights (the last kept beside them), or the last; what the next stage gets."""
        if selector.selected:
            handed = self.folder.load_best(k + 1)
            # the last weights are kept beside the selected ones, so both can be reported
            self._save_weights(stage, nets, self.folder.stage_path(k + 1, "last"), iters, "last")
        else:
            handed = {"weights": self._weights(stage, nets), "iteration": iters, "selection": "last"}
            if selector.rule:  # e.g. SS-Net's selection starts at 2000, beyond a short run
                handed["selection_note"] = selector.note(iters)
        handed.update({"stage": k + 1, "stage_class": type(stage).__name__,
                       selector.best_key: selector.best, "protocol": self.cfg.protocol})
        self.folder.save_stage(k + 1, handed)
        return handed

    # -- state on disk ---------------------------------------------------------------------------
    def _restore(self, state, stage, nets, opts, stream, scalers) -> tuple[int, float]:
        """An interrupted stage's networks, optimisers, sampler, RNG, extra and fp16 scaler state."""
        for name, net in nets.items():
            net.load_state_dict(state["nets"][name])
        for name, opt in opts.items():
            opt.load_state_dict(state["optimizers"][name])
        stream.load_state_dict(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        self._restore_cuda_rng(state)
        stage.load_extra_state(state.get("extra"))
        for name, scaler in scalers.items():
            saved = (state.get("scalers") or {}).get(name)
            if saved is None:
                raise UserError(f"cannot resume {self.out}: its checkpoint has no fp16 gradient-scaler state "
                                f"for phase {name!r}; restart it with `ssl-bench run ... --overwrite`")
            scaler.load_state_dict(saved)
        return state["iteration"], state["elapsed_s"]

    def _weights(self, stage, nets) -> dict:
        return {n: v.detach().cpu().clone() for n, v in nets[stage.trained].state_dict().items()}

    def _save_weights(self, stage, nets, path: Path, iteration: int, selection: str) -> None:
        atomic_torch_save({"weights": self._weights(stage, nets), "iteration": iteration, "selection": selection}, path)

    def _save_state(self, k, done, stage, nets, opts, stream, best, elapsed, timings, scalers=None) -> None:
        # plain data only (tensors, numbers, strings, lists, dicts): --resume loads it with weights_only=True
        self.folder.save_checkpoint({
            "stage": k, "iteration": done, "best": best, "elapsed_s": elapsed, "timings": dict(timings),
            "nets": {n: net.state_dict() for n, net in nets.items()},
            "optimizers": {n: o.state_dict() for n, o in opts.items()},
            "stream": stream.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "extra": stage.extra_state(),
            "scalers": {n: s.state_dict() for n, s in (scalers or {}).items()},  # fp16 only; plain numbers
        })

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

    # -- evaluation (ssl_bench.evaluation) -------------------------------------------------------
    def final_network(self, which: str = "selected"):
        return final_network(self, self.folder, which)

    def evaluate(self, timings: dict | None = None) -> dict:
        return evaluate_folder(self, self.folder, timings, self.progress)


class _Clock:
    """The log's it/s since the last logged line, and the stage's time across interruptions."""

    def __init__(self, start: int, elapsed_before: float):
        self.elapsed_before, self.t0 = elapsed_before, time.perf_counter()
        self.t_last, self.it_last = self.t0, start

    def lap(self, done: int) -> dict:
        now = time.perf_counter()
        rate = (done - self.it_last) / (now - self.t_last) if now > self.t_last else 0.0
        self.t_last, self.it_last = now, done
        return {"it_per_s": round(rate, 4), "elapsed_s": round(self.elapsed_before + now - self.t0, 3)}

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0


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
    if cfg.teacher and not (resume and trainer.folder.has_stage(1)):
        trainer.teacher_stage1()  # its method, settings, data and file, before this run writes anything
    # holds the folder's one-writer lock; --overwrite empties only a run folder, never the data
    with prepare_run_dir(given, resume=resume, overwrite=overwrite, data_root=data.root):
        return trainer.run(resume=resume, stop_at=stop_at)
