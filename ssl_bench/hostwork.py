"""Host-side milliseconds per training iteration (issue 10): what the CPU must do for each step.

``host_ms_per_iteration(trainer, k, iterations)`` times, for stage ``k`` of a built :class:`Trainer` at its
patch, on real batches of its split:

* ``batch_ms``: one batch drawn as the trainer draws it (sampler, rotation/flip, crop, stacking), volumes
  already loaded (disk reads are a one-time cost, excluded);
* ``targets_ms``: the stage's host-side targets (:meth:`Stage.host_targets`, e.g. DTC/SASSNet signed distances);
* ``components_ms``: the largest-connected-component passes the stage makes per iteration (BCP and OMF
  pseudo-labels). How many, on how many samples, is found by running the stage's ``losses`` once at a tiny
  patch with tiny networks and counting ``largest_component_batch`` calls; each is then timed at the real
  patch on real crop labels (one large component plus specks, like a trained network's prediction) on the
  trainer's device, so a device round trip is included;
* ``transfer_ms``: moving the batch and its targets to the trainer's device (0 on a CPU run).

Medians over ``iterations`` batches after ``warmup`` untimed ones. This is the work, not what remains
exposed: the trainer prepares batch i+1 in the background while i computes (ssl_bench/prefetch.py).
A benchmark for ``ssl-bench bench``, never a timed test.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

__all__ = ["host_ms_per_iteration", "PROBE_PATCH"]

#: the patch and width of the probe run that counts a stage's LCC passes (counts do not depend on them)
PROBE_PATCH = (32, 32, 16)
PROBE_FILTERS = 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _component_calls(stage) -> list[int]:
    """Samples per ``largest_component_batch`` call in one iteration of ``stage`` (probe at a tiny patch)."""
    from . import mixing, postprocess
    from .data import Batch

    calls: list[int] = []
    real = postprocess.largest_component_batch

    def spy(masks):
        calls.append(int(masks.shape[0]))
        return real(masks)

    probe = type(stage)(replace(stage.ctx, patch=PROBE_PATCH, n_filters=PROBE_FILTERS))
    n_l, n_u = probe.batch_labeled, probe.batch_unlabeled
    with torch.random.fork_rng(devices=[]):  # the probe's draws never touch the run's torch generator
        torch.manual_seed(0)
        nets = probe.networks()
        probe.train_modes(nets)
        batch = Batch(torch.randn((n_l + n_u, 1) + PROBE_PATCH), torch.randint(0, 2, (n_l,) + PROBE_PATCH), n_l)
        batch.host_targets = probe.host_targets(batch) if hasattr(probe, "host_targets") else {}
        mixing.largest_component_batch = postprocess.largest_component_batch = spy
        try:
            for phase in probe.phases:
                probe.losses(phase, nets, batch, 0)
        finally:
            mixing.largest_component_batch = postprocess.largest_component_batch = real
    return calls


def host_ms_per_iteration(trainer, k: int = 0, iterations: int = 10, warmup: int = 2) -> dict:
    """Host-side milliseconds per iteration of stage ``k`` of ``trainer`` (medians; see the module docstring).

    Returns ``{"method", "stage", "patch", "iterations", "batch_ms", "targets_ms", "components_ms",
    "transfer_ms", "total_ms", "best_total_ms", "cpu_ms", "component_samples"}``: ``total_ms`` is the sum of
    the four medians (wall clock), ``best_total_ms`` the fastest single iteration's total and ``cpu_ms`` the
    median CPU time of the process per iteration, all threads together (the two figures least disturbed by
    other processes on a shared machine; on an idle one the wall time is about ``cpu_ms`` divided by the
    cores the EDT and labelling use), ``component_samples`` the volumes the stage's LCC passes label per iteration.
    """
    from .postprocess import largest_component_batch

    stage = trainer.stages[k]
    device = trainer.device
    storage = device if getattr(trainer, "cuda_fast", False) else torch.device("cpu")
    # the trainer's own stream, with the batch kept where it is made so the transfer is timed apart
    stream = trainer.make_stream(k, stage, on=storage)
    for case_id in trainer.split.labeled + (trainer.split.unlabeled if stage.batch_unlabeled else ()):
        stream._volume(case_id)  # disk reads and decompression: once per run, not per iteration
    calls = _component_calls(stage)
    has_targets = hasattr(stage, "host_targets")

    rows, cpu = [], []
    for i in range(warmup + iterations):
        c0 = time.process_time()
        t0 = time.perf_counter()
        batch = stream.next()
        _sync(storage)
        t1 = time.perf_counter()
        targets = stage.host_targets(batch) if has_targets else {}
        t2 = time.perf_counter()
        moved = [batch.image.to(device), batch.label.to(device)] + [t.to(device) for t in targets.values()]
        _sync(device)
        t3 = time.perf_counter()
        lcc = 0.0
        if calls:
            # pseudo-label-like masks at the real patch: the batch's crop labels, on the device
            labels = batch.label.to(device) != 0
            for n in calls:
                masks = labels[torch.arange(n) % labels.shape[0]]
                _sync(device)
                s0 = time.perf_counter()
                largest_component_batch(masks)
                _sync(device)
                lcc += time.perf_counter() - s0
        del moved
        if i >= warmup:
            rows.append(((t1 - t0), (t2 - t1), lcc, (t3 - t2)))
            cpu.append(time.process_time() - c0)
    med = np.median(np.array(rows) * 1e3, axis=0)
    out = {"method": trainer.cfg.method, "stage": k + 1, "patch": tuple(trainer.cfg.patch), "iterations": iterations,
           "batch_ms": round(float(med[0]), 2), "targets_ms": round(float(med[1]), 2),
           "components_ms": round(float(med[2]), 2), "transfer_ms": round(float(med[3]), 2),
           "component_samples": int(sum(calls))}
    out["total_ms"] = round(out["batch_ms"] + out["targets_ms"] + out["components_ms"] + out["transfer_ms"], 2)
    out["best_total_ms"] = round(float(np.min(np.sum(rows, axis=1))) * 1e3, 2)
    out["cpu_ms"] = round(float(np.median(cpu)) * 1e3, 2)
    return out
