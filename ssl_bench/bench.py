"""`ssl-bench bench`: training it/s and evaluation s/case per method, fast path vs reference-style path, one process.

Fast path: volumes on the training device, channels_last_3d, cudnn.benchmark, batched sliding windows
accumulated on the device, in the precision asked for (``--precision``, repeatable, default tf32; bf16/fp16
autocast are the opt-in fast modes of docs/methods.md Decision 7). Reference-style path: ``--reference-precision``
(default tf32, the references' fp32 on current GPUs; fp32 turns TF32 off too), deterministic cuDNN, volumes
kept and augmented on the CPU and moved per batch, one window at a time with host accumulation.

What makes the figures comparable (issue 15):
- every case the bench reads (the split's labeled and unlabeled cases, the timed test cases) is loaded and
  decompressed once, before anything is timed, into the one LAData cache both paths share;
- each path sets its own backend (cuDNN deterministic/benchmark, TF32; ``precision.set_backend``) right
  before each of its own timed parts, training and evaluation alike, and records the flags in force;
- evaluation reports inference apart from host work (LCC + metrics);
- host ms/iteration per stage (``ssl_bench.hostwork``: batch preparation, targets, LCC passes, transfers),
  beside the time the timed loop actually waited for its batch;
- on CUDA the peak device memory of each timed part, warm-up included (``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats``); None on CPU.
The networks are untrained: host (LCC + metrics) time depends on the predicted masks, so a trained run's
``summary.json`` timings are the representative figure for it. The reference repositories also re-read
each h5 file per sample; here both paths read each case once.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from .data import LAData
from .errors import UserError
from .evaluate import evaluate_cases
from .precision import FP16_ON_CPU, set_backend
from .runs import atomic_write_json, provenance
from .trainer import Trainer, build_config, resolve_device

#: the paper's seven methods, in the order `--method all` benches them
ALL_METHODS = ("vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf")
PATHS = ("fast", "reference")
FORMAT = 2  # the JSON layout written by --out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def resolve_methods(methods) -> list[str]:
    """``--method`` values (repeatable; ``all`` = the paper's seven), each registered, in order, no repeats."""
    from .method import get_method

    out = []
    for m in methods or ("vnet",):
        for name in (ALL_METHODS if m == "all" else (m,)):
            get_method(name)  # unknown: one line, exit 2, before anything is loaded
            if name not in out:
                out.append(name)
    return out


def backend_flags(device) -> dict | None:
    """The process-wide flags in force now (CUDA only; on CPU they change nothing and are not recorded)."""
    if device.type != "cuda":
        return None
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def _use_backend(trainer: Trainer) -> dict | None:
    """This path's backend, set right before one of its timed parts; returns the flags then in force."""
    set_backend(trainer.cfg.precision, trainer.device.type, trainer.cfg.fast)
    return backend_flags(trainer.device)


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def bench_case_ids(trainer: Trainer, eval_cases: int) -> list[str]:
    """Every case the bench reads: the split's labeled and unlabeled cases and the timed test cases."""
    return list(trainer.split.labeled) + list(trainer.split.unlabeled) + list(trainer.test_ids[:eval_cases])


def preload(data: LAData, ids) -> dict:
    """Read (and decompress) every case once, into the LAData cache both paths share, before any timing."""
    t0 = time.perf_counter()
    todo = list(dict.fromkeys(ids))
    for case_id in todo:
        data.load(case_id)
    return {"cases": len(todo), "seconds": round(time.perf_counter() - t0, 3)}


def host_work(trainer: Trainer, k: int, iterations: int):
    """Host-side ms per iteration of stage k (batch preparation, SDF targets, pseudo-label components, transfers:
    the work, whether or not the background preparation hides it), from ``ssl_bench.hostwork``; None without
    that module (the time the timed loop waited in ``stream.next()`` is then the host figure recorded)."""
    try:
        from . import hostwork
    except ImportError:
        return None
    return hostwork.host_ms_per_iteration(trainer, k, iterations=iterations)


def time_training(trainer: Trainer, k: int, iterations: int, warmup: int) -> dict:
    """Stage k: it/s over ``iterations`` after ``warmup`` (data draw + augmentation + every phase + after-step),
    the ms per iteration the loop waited in ``stream.next()`` (host work left exposed), whether every loss was
    finite, peak device memory."""
    stage, nets = trainer.build_stage(k, previous=None)
    opts = stage.optimizers(nets)
    stream = trainer.open_stream(k, stage)  # the loop's own stream, prefetch and all
    scalers = trainer.make_scalers(stage)
    losses, batch_s = [], 0.0
    try:
        backend = _use_backend(trainer)
        _reset_peak(trainer.device)  # the peak includes warm-up (cuDNN autotuning's workspaces): what a run needs
        for it0 in range(warmup + iterations):
            if it0 == warmup:
                _sync(trainer.device)
                batch_s = 0.0
                t0 = time.perf_counter()
            tb = time.perf_counter()
            batch = trainer.next_batch(stream)
            batch_s += time.perf_counter() - tb
            logs = trainer.train_step(stage, nets, opts, batch, it0, scalers)
            if it0 >= warmup:
                losses.append(logs["loss"])  # kept on the device: checked after the clock stops, no sync per step
        _sync(trainer.device)
        seconds = time.perf_counter() - t0
        peak = _peak(trainer.device)
    finally:
        stream.close()  # ends the background preparation
    values = torch.stack([v.float() for v in losses]).cpu()
    return {"stage": k + 1, "name": type(stage).__name__, "iterations": iterations, "warmup": warmup,
            "it_per_s": iterations / seconds, "batch_wait_ms_per_iteration": 1000 * batch_s / iterations,
            "losses_finite": bool(torch.isfinite(values).all()), "last_loss": float(values[-1]),
            "peak_memory_bytes": peak, "backend": backend}


def time_eval(trainer: Trainer, n_cases: int, reference_style: bool, window_batch: int | None = None) -> dict:
    """Per test case: inference (sliding window) and host work (LCC + metrics) timed apart, with an untrained
    network of the method's last stage; one untimed warm-up case first; peak device memory.
    ``window_batch``: windows per forward on the fast path (default: the run's EvalSettings)."""
    settings = trainer.eval_settings if window_batch is None else replace(trainer.eval_settings,
                                                                            window_batch=window_batch)
    k = len(trainer.stages) - 1
    stage, nets = trainer.build_stage(k, previous=None)
    net = nets[stage.trained]
    ids = trainer.test_ids[:n_cases]
    backend = _use_backend(trainer)
    _reset_peak(trainer.device)
    evaluate_cases(stage.foreground_probability, net, trainer.data, ids[:1], settings, trainer.device,
                   reference_style=reference_style, progress=False)  # warm-up (cuDNN autotuning on the fast path)
    _sync(trainer.device)
    t0 = time.perf_counter()
    _, t = evaluate_cases(stage.foreground_probability, net, trainer.data, ids, settings, trainer.device,
                          reference_style=reference_style, progress=False)
    _sync(trainer.device)
    total = time.perf_counter() - t0
    n = len(ids)
    return {"cases": n, "inference_s_per_case": t["inference_s"] / n, "host_s_per_case": t["metrics_s"] / n,
            "s_per_case": total / n, "window_batch": None if reference_style else settings.window_batch,
            "peak_memory_bytes": _peak(trainer.device), "backend": backend}


def bench_path(trainer: Trainer, path: str, iterations: int, warmup: int, eval_cases: int,
               window_batches=()) -> dict:
    """One path of one method: every stage's training, then its evaluation, each under this path's backend;
    on the fast path also at each of ``window_batches`` (the measurement behind EvalSettings.window_batch)."""
    train = [time_training(trainer, k, iterations, warmup) for k in range(len(trainer.stages))]
    ev = time_eval(trainer, eval_cases, reference_style=(path == "reference"))
    if path == "fast" and window_batches:
        ev["by_window_batch"] = {str(b): time_eval(trainer, eval_cases, False, window_batch=b) for b in window_batches}
    peaks = [r["peak_memory_bytes"] for r in train] + [ev["peak_memory_bytes"]]
    peaks += [e["peak_memory_bytes"] for e in ev.get("by_window_batch", {}).values()]
    return {"path": path, "precision": trainer.cfg.precision, "numerics": trainer.numerics(), "train": train,
            "eval": ev, "peak_memory_bytes": None if peaks[0] is None else max(peaks)}


def _paths(paths, precisions, reference_precision) -> list[tuple[str, str, str]]:
    """(label, path, precision) of every timed path: the fast path at each precision, the reference-style one."""
    out = []
    for path in (paths or PATHS):
        if path == "fast":
            out += [(f"fast-{p}", "fast", p) for p in dict.fromkeys(precisions or ("tf32",))]
        else:
            out.append((f"reference-{reference_precision}", "reference", reference_precision))
    return out


def _mb(b):
    return "n/a" if b is None else f"{b / 2 ** 20:.0f} MiB"


def _provenance() -> dict:
    prov = provenance()
    commit = os.environ.get("SSL_BENCH_COMMIT")  # a device without git: the commit written down before the call
    if commit and not (prov.get("git") or {}).get("commit"):
        prov["git"] = {"commit": commit, "dirty": None, "source": "SSL_BENCH_COMMIT"}
    return prov


def run_bench(method, data_dir, device, profile, iterations, eval_cases, out, precision="tf32", *, precisions=None,
              reference_precision: str = "tf32", paths=None, warmup=None, labeled: int = 8, window_batches=()) -> dict:
    """Bench every method in ``method`` (a name, ``all``, or a list of them) after one preload of every case.

    ``--out`` is rewritten (atomically) after each path of each method, so a killed bench leaves what it finished
    (``complete`` stays false until the end).
    """
    methods = resolve_methods([method] if isinstance(method, str) else method)
    precisions = list(dict.fromkeys(precisions or [precision]))
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if not cuda and "fp16" in precisions:
        raise UserError(FP16_ON_CPU)
    if reference_precision not in ("fp32", "tf32"):
        raise UserError(f"--reference-precision is fp32 or tf32 (the references compute in float32), got {reference_precision!r}")
    for name, value in (("--iterations", iterations), ("--eval-cases", eval_cases)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if any(b < 1 for b in window_batches):
        raise UserError(f"--window-batch must be at least 1, got {min(window_batches)}")
    if warmup is not None and warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    iterations = iterations or (50 if cuda else 3)
    eval_cases = eval_cases or (20 if cuda else 1)
    warmup = (5 if cuda else 1) if warmup is None else warmup
    timed = _paths(paths, precisions, reference_precision)
    data = LAData(data_dir)
    defaults = data.run_defaults()  # an imported data set's own patch and strides
    configs = {m: build_config(m, profile, dataset_defaults=defaults, device=dev.type, labeled=labeled,
                               eval_cases=eval_cases) for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: {label: Trainer(replace(configs[m], fast=(path == "fast"), precision=p), Path(tmp), data,
                                       progress=False) for label, path, p in timed} for m in methods}
        eval_cases = min(len(next(iter(t.values())).test_ids) for t in trainers.values())  # a short test.list
        ids = [i for m in methods for i in bench_case_ids(next(iter(trainers[m].values())), eval_cases)]
        loaded = preload(data, ids)  # before anything is timed: no path pays h5 decompression in its timing
        click.echo(f"preloaded {loaded['cases']} cases in {loaded['seconds']:.1f} s")
        result = {"format": FORMAT, "methods": methods, "data": str(data.root), "profile": profile, "device": str(dev),
                  "gpu": torch.cuda.get_device_name(dev) if cuda else None, "labeled": labeled,
                  "timed_iterations": iterations, "warmup_iterations": warmup, "eval_cases": eval_cases,
                  "paths": [{"label": label, "path": path, "precision": p} for label, path, p in timed],
                  "preload": loaded, "results": {}, "complete": False, "provenance": _provenance()}
        for m in methods:
            cfg = configs[m]
            row = {"method": m, "patch": list(cfg.patch), "n_filters": cfg.n_filters, "paths": {}}
            result["results"][m] = row
            for label, path, p in timed:
                r = bench_path(trainers[m][label], path, iterations, warmup, eval_cases, window_batches)
                row["paths"][label] = r
                if out is not None:
                    atomic_write_json(Path(out), result)  # after each path: a killed bench keeps what it finished
                for s in r["train"]:
                    click.echo(f"train {m} stage {s['stage']} ({s['name']}) {label}: {s['it_per_s']:.2f} it/s, batch wait "
                               f"{s['batch_wait_ms_per_iteration']:.1f} ms/it, peak {_mb(s['peak_memory_bytes'])}"
                               + ("" if s["losses_finite"] else ", NON-FINITE LOSS"))
                e = r["eval"]
                click.echo(f"eval {m} {label} ({e['cases']} case(s)): {e['s_per_case']:.3f} s/case (inference "
                           f"{e['inference_s_per_case']:.3f}, LCC+metrics {e['host_s_per_case']:.3f}), "
                           f"peak {_mb(e['peak_memory_bytes'])}")
                for b, eb in e.get("by_window_batch", {}).items():
                    click.echo(f"eval {m} {label} window batch {b}: {eb['s_per_case']:.3f} s/case (inference "
                               f"{eb['inference_s_per_case']:.3f}), peak {_mb(eb['peak_memory_bytes'])}")
            row["host_ms_per_iteration"] = _host(trainers[m], row["paths"], iterations)
            for h in row["host_ms_per_iteration"]:
                d = h["detail"] or {}
                parts = ", ".join(f"{k[:-3]} {d[k]:.1f}" for k in ("batch_ms", "targets_ms", "components_ms", "transfer_ms")
                                  if isinstance(d.get(k), (int, float)))
                click.echo(f"host {m} stage {h['stage']}: {h['ms']:.1f} ms/iteration ({parts or h['source']})")
            row["speedup"] = _speedups(row["paths"])
            ref = next((label for label, path, _ in timed if path == "reference"), None)
            for label, sp in row["speedup"].items():
                click.echo(f"ratio {m} {label} vs {ref} (reference-style): train "
                           f"{', '.join(f'{x:.2f}x' for x in sp['train'])}, eval {sp['eval']:.2f}x")
        result["complete"] = True
    if out is not None:
        atomic_write_json(Path(out), result)
        click.echo(f"written: {out}")
    return result


def _host(trainers: dict, paths: dict, iterations: int) -> list[dict]:
    """Host ms/iteration per stage, under the first timed path's settings: ``ssl_bench.hostwork``'s measurement
    when present, else the time spent in ``stream.next()`` during the timed iterations (batch preparation only)."""
    label, tr = next(iter(trainers.items()))
    out = []
    for k in range(len(tr.stages)):
        measured = host_work(tr, k, iterations)
        if measured is None:
            out.append({"stage": k + 1, "ms": paths[label]["train"][k]["batch_wait_ms_per_iteration"],
                        "source": "stream.next() wait", "path": label, "detail": None})
            continue
        ms = measured.get("total_ms", measured.get("ms")) if isinstance(measured, dict) else measured
        out.append({"stage": k + 1, "ms": float(ms), "source": "ssl_bench.hostwork", "path": label,
                    "detail": measured if isinstance(measured, dict) else None})
    return out


def _speedups(paths: dict) -> dict:
    """Each fast path's ratio to the reference-style path: per training stage and for evaluation."""
    ref = next((r for r in paths.values() if r["path"] == "reference"), None)
    if ref is None:
        return {}
    out = {}
    for label, r in paths.items():
        if r["path"] != "fast":
            continue
        out[label] = {"train": [f["it_per_s"] / g["it_per_s"] for f, g in zip(r["train"], ref["train"])],
                      "eval": ref["eval"]["s_per_case"] / r["eval"]["s_per_case"]}
    return out
