"""`ssl-bench bench`: training it/s and evaluation s/case, fast path vs reference-style path, one process.

Fast path: volumes on the training device, channels_last_3d, cudnn.benchmark, batched sliding windows
accumulated on the device, in the precision asked for (``--precision``, default tf32; bf16/fp16 autocast
are the opt-in fast modes of METHODS.md Decision 7). Reference-style path: tf32 (the references' fp32
on current GPUs), deterministic cuDNN, volumes kept and augmented on the CPU and moved per batch, one
window at a time with host accumulation. Both precisions are recorded in the result.
(The reference repositories also re-read each h5 file per sample; here both paths read each case once.)
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from .data import LAData
from .evaluate import evaluate_cases
from .runs import atomic_write_json, provenance
from .trainer import Trainer, build_config, resolve_device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(trainer: Trainer, k: int, iterations: int, warmup: int) -> float:
    """Iterations per second of stage k (data draw + augmentation + every phase + after-step)."""
    trainer._setup_backend()
    stage, nets = trainer.build_stage(k, previous=None)
    opts = stage.optimizers(nets)
    stream = trainer.make_stream(k, stage)
    scalers = trainer.make_scalers(stage)
    for it0 in range(warmup + iterations):
        if it0 == warmup:
            _sync(trainer.device)
            t0 = time.perf_counter()
        batch = stream.next()
        if trainer.cuda_fast:
            batch.image = batch.image.contiguous(memory_format=torch.channels_last_3d)
        trainer.train_step(stage, nets, opts, batch, it0, scalers)
    _sync(trainer.device)
    return iterations / (time.perf_counter() - t0)


def time_eval(trainer: Trainer, n_cases: int, reference_style: bool) -> float:
    """Seconds per test case, inference + LCC + metrics, with an untrained network of the method."""
    k = len(trainer.stages) - 1
    trainer._setup_backend()
    stage, nets = trainer.build_stage(k, previous=None)
    ids = trainer.test_ids[:n_cases]
    evaluate_cases(stage.foreground_probability, nets[stage.trained], trainer.data, ids[:1],
                   trainer.eval_settings, trainer.device, reference_style=reference_style, progress=False)  # warm-up
    _sync(trainer.device)
    t0 = time.perf_counter()
    evaluate_cases(stage.foreground_probability, nets[stage.trained], trainer.data, ids,
                   trainer.eval_settings, trainer.device, reference_style=reference_style, progress=False)
    _sync(trainer.device)
    return (time.perf_counter() - t0) / len(ids)


def run_bench(method, data_dir, device, profile, iterations, eval_cases, out, precision: str = "tf32") -> dict:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    iterations = iterations or (50 if cuda else 3)
    eval_cases = eval_cases or (20 if cuda else 1)
    warmup = 5 if cuda else 1
    data = LAData(data_dir)
    base = build_config(method, profile, device=dev.type, precision=precision)
    paths = {"fast": {"fast": True, "precision": precision}, "reference": {"fast": False, "precision": "tf32"}}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: Trainer(replace(base, **settings), Path(tmp), data, progress=False)
                    for name, settings in paths.items()}
        result = {"method": method, "profile": profile, "device": str(dev), "timed_iterations": iterations,
                  "eval_cases": eval_cases, "precision": {name: s["precision"] for name, s in paths.items()},
                  "numerics": {name: tr.numerics() for name, tr in trainers.items()}, "stages": [],
                  "provenance": provenance()}
        for k, stage in enumerate(trainers["fast"].stages):
            row = {"stage": k + 1, "name": type(stage).__name__}
            for name, tr in trainers.items():
                row[f"{name}_it_per_s"] = time_training(tr, k, iterations, warmup)
            row["speedup"] = row["fast_it_per_s"] / row["reference_it_per_s"]
            result["stages"].append(row)
            click.echo(f"train {method} stage {k + 1} ({row['name']}): fast ({precision}) {row['fast_it_per_s']:.2f} it/s, "
                       f"reference-style (tf32) {row['reference_it_per_s']:.2f} it/s, ratio {row['speedup']:.2f}x")
        ev = {name: time_eval(tr, eval_cases, reference_style=(name == "reference")) for name, tr in trainers.items()}
    result["eval_s_per_case"] = ev
    result["eval_speedup"] = ev["reference"] / ev["fast"]
    click.echo(f"eval ({eval_cases} case(s)): fast {ev['fast']:.3f} s/case, reference-style {ev['reference']:.3f} s/case, "
               f"ratio {result['eval_speedup']:.2f}x")
    if out is not None:
        atomic_write_json(Path(out), result)
        click.echo(f"written: {out}")
    return result
