"""The one evaluator: sliding-window inference (§2.1), LCC post-processing (§2.2), medpy-exact metrics (§2.3).

Windows are batched and accumulated on the model's device. ``reference_style=True`` reproduces the
reference repositories' loop (one window at a time, host-side numpy accumulation); it exists for
``ssl-bench bench`` and gives the same probabilities up to float rounding.

Window batch (``EvalSettings.window_batch``, recorded in summary.json's ``timings.eval``): on CUDA the
last, short batch of a case is padded with zero windows to the full batch, whose outputs are discarded, so
every forward has one input shape and cuDNN (``benchmark`` on the fast path) autotunes once, not once per
remainder. The probabilities are those of the unpadded batches (tests/test_cuda_path.py; on CPU oneDNN rounds
a batch of ONE window differently, by an ulp, which is why CPU does not pad by default). Default 8, measured
on CPU (2 cores, V-Net n_filters 16, 112x112x80, fp32; 2026-12-02): peak memory 0.65 / 1.0 / 1.5 / 2.5 GB
at 1 / 2 / 4 / 8 windows (about 0.27 GB a window), time per window flat within the shared machine's noise
(1.2-8 s). On the 20 LA test cases (45-84 windows each, 1128 in all) 8 pads 40 windows (3.5 %; 4: 36,
16: 120). Throughput on a GPU is not measured yet: it is to be timed there (evaluate_cases with
``replace(settings, window_batch=B)``) and this default set from it.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .metrics import case_metrics, dice, distances_mm
from .postprocess import largest_component
from .progress import Progress

METRICS = ("dice", "jaccard", "hd95", "asd")


@dataclass(frozen=True)
class EvalSettings:
    patch: tuple[int, int, int] = (112, 112, 80)
    stride_xy: int = 18
    stride_z: int = 4
    window_batch: int = 8  # windows per forward (module notes)
    pad_windows: bool | None = None  # pad the last batch to window_batch; None: on CUDA only (no gain on CPU)
    precision: str = "fp32"  # RunConfig.precision: bf16/fp16 autocast the windows (bf16 on CPU too); fp32/tf32 do not
    empty_policy: str = "penalty"  # Decisions 4; "zero" = the reference repositories' (0,0,0,0)
    units: str = "voxel"  # hd95/asd in voxels (the LA literature) or "mm" from the data set's stored spacing


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """n = ceil((size - patch) / stride) + 1 windows starting at min(stride·i, size - patch)."""
    n = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(n)]


def _pad_amounts(shape, patch):
    return [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(shape, patch)]


def _windows(shape, settings: EvalSettings):
    strides = (settings.stride_xy, settings.stride_xy, settings.stride_z)
    xs, ys, zs = (window_starts(s, p, st) for s, p, st in zip(shape, settings.patch, strides))
    return [(x, y, z) for x in xs for y in ys for z in zs]


def pads_windows(settings: EvalSettings, device: torch.device) -> bool:
    return settings.pad_windows if settings.pad_windows is not None else device.type == "cuda"


def window_counts(shape, settings: EvalSettings, device: torch.device) -> tuple[int, int]:
    """(windows, zero windows added to the last batch) of a case of ``shape`` on the batched path."""
    padded = [s + sum(p) for s, p in zip(shape, _pad_amounts(shape, settings.patch))]
    n = len(_windows(padded, settings))
    return n, (-n % settings.window_batch) if pads_windows(settings, device) else 0


@torch.no_grad()
def sliding_window(prob_fn: Callable, net, image: np.ndarray, settings: EvalSettings, device: torch.device,
                   reference_style: bool = False) -> np.ndarray:
    """Average foreground probability over overlapping windows, cropped back to the image shape."""
    pads = _pad_amounts(image.shape, settings.patch)
    if any(sum(p) for p in pads):  # symmetric zero padding, left = pad // 2
        image = np.pad(image, pads, mode="constant", constant_values=0)
    shape = image.shape
    px, py, pz = settings.patch
    windows = _windows(shape, settings)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    if reference_style:
        score = np.zeros(shape, np.float32)
        count = np.zeros(shape, np.float32)
        for x, y, z in windows:
            patch = torch.from_numpy(np.ascontiguousarray(image[x:x + px, y:y + py, z:z + pz]))[None, None].to(device)
            prob = prob_fn(net, patch)[0].float().cpu().numpy()
            score[x:x + px, y:y + py, z:z + pz] += prob
            count[x:x + px, y:y + py, z:z + pz] += 1
        prob = score / count
    else:
        vol = torch.from_numpy(np.ascontiguousarray(image)).to(device)
        score = torch.zeros(shape, dtype=torch.float32, device=device)
        count = torch.zeros(shape, dtype=torch.float32, device=device)
        batch = settings.window_batch
        pad = pads_windows(settings, device)
        for i in range(0, len(windows), batch):
            chunk = windows[i:i + batch]
            x_in = torch.stack([vol[x:x + px, y:y + py, z:z + pz] for x, y, z in chunk])[:, None]
            if pad and len(chunk) < batch:  # one input shape per evaluation: cuDNN autotunes once
                x_in = torch.cat([x_in, x_in.new_zeros((batch - len(chunk), *x_in.shape[1:]))])
            if device.type == "cuda":
                x_in = x_in.contiguous(memory_format=torch.channels_last_3d)
            with autocast:
                prob = prob_fn(net, x_in).float()
            for (x, y, z), p in zip(chunk, prob):  # zip stops at the real windows: padded outputs dropped
                score[x:x + px, y:y + py, z:z + pz] += p
                count[x:x + px, y:y + py, z:z + pz] += 1
        prob = (score / count).cpu().numpy()
    (xl, xr), (yl, yr), (zl, zr) = pads
    return prob[xl:shape[0] - xr, yl:shape[1] - yr, zl:shape[2] - zr]


def evaluate_cases(prob_fn: Callable, net, data, case_ids, settings: EvalSettings, device: torch.device,
                   image_fn: Callable | None = None, reference_style: bool = False,
                   progress: bool = True, label: str = "eval", dice_only: bool = False,
                   on_prediction: Callable | None = None) -> tuple[list[dict], dict]:
    """Per-case rows for both post-processings ("raw" and "lcc") and timings.

    ``image_fn(case_id, image) -> image`` transforms the test image before inference (occlusion).
    ``dice_only`` computes only the raw Dice, as the reference scripts' periodic test-set selection does.
    ``on_prediction(case_id, post, mask)`` sees every final binary mask (e.g. for a figure).
    """
    was_training = net.training
    net.eval()
    rows, t_infer, t_metrics = [], 0.0, 0.0
    n_windows = n_padded = 0
    bar = Progress(len(case_ids), label, enabled=progress, unit="case")
    try:
        for n, case_id in enumerate(case_ids):  # the bar counts cases: n is the case's index
            image, gt = data.load(case_id)
            if image_fn is not None:
                image = image_fn(case_id, image)
            windows, padded = window_counts(image.shape, settings, device)
            n_windows, n_padded = n_windows + windows, n_padded + (0 if reference_style else padded)
            t0 = time.perf_counter()
            prob = sliding_window(prob_fn, net, image, settings, device, reference_style)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            pred = prob > 0.5
            if dice_only:
                rows.append({"case": case_id, "post": "raw", "dice": dice(pred, gt)})
                t_infer += t1 - t0
                bar.update(n + 1)
                continue
            for post, mask in (("raw", pred), ("lcc", largest_component(pred))):
                if on_prediction is not None:
                    on_prediction(case_id, post, mask)
                row = {"case": case_id, "post": post}
                row.update(case_metrics(mask, gt, empty_policy=settings.empty_policy))
                if settings.units == "mm":  # the same two distances, in millimetres (issue 16's --units mm)
                    mm = distances_mm(mask, gt, data.spacing(case_id), empty_policy=settings.empty_policy)
                    row.update(hd95=mm["hd95_mm"], asd=mm["asd_mm"])
                rows.append(row)
            t_metrics += time.perf_counter() - t1
            t_infer += t1 - t0
            bar.update(n + 1)
    finally:
        bar.close()
        net.train(was_training)
    n = max(len(case_ids), 1)
    # the window batch and its padding travel with the timings (summary.json's timings.eval)
    return rows, {"inference_s": t_infer, "metrics_s": t_metrics, "s_per_case": (t_infer + t_metrics) / n,
                  "window_batch": 1 if reference_style else settings.window_batch, "windows": n_windows,
                  "padded_windows": n_padded}


def summarize(rows: list[dict]) -> dict:
    """Mean, std (population, over cases) and empty-prediction count per post-processing."""
    out = {}
    for post in ("raw", "lcc"):
        sel = [r for r in rows if r["post"] == post]
        if not sel:
            continue
        s = {"n_cases": len(sel), "n_empty": int(sum(bool(r["empty"]) for r in sel))}
        for m in METRICS:
            vals = np.array([r[m] for r in sel], dtype=np.float64)
            s[m] = float(vals.mean())
            s[m + "_std"] = float(vals.std())
        out[post] = s
    return out


def mean_dice(rows: list[dict], post: str = "raw") -> float:
    return float(np.mean([r["dice"] for r in rows if r["post"] == post]))
