"""Occlusion robustness, the paper's Fig. 3 (docs/methods.md §3.7.8, Decisions 5).

Trained run folders are evaluated on their test cases with one axis-aligned cuboid of each test
image set to 0 (the scan-mean intensity, §1.1); the label is never touched. Every prediction goes
through the one evaluator, ``evaluate.evaluate_cases(..., image_fn=...)``.

Variants (§3.7.8):

- ``volume`` (variant B, primary): a proportion p of the voxels; sides s_i = round(dim_i · p^(1/3)),
  origin uniform over the whole volume, {0..dim_i − s_i}.
- ``code`` (variant A, the OMF helper ``patch_mask``): a per-axis side ratio r; sides ⌊dim_i · r⌋,
  origin uniform over {0..patch_i − 1 − s_i} with the training patch (112,112,80 → the code's
  hard-coded 111−s_x, 111−s_y, 79−s_z). A (case, ratio) whose side reaches the patch cannot be
  placed (the reference raises there) and is skipped and reported.

Every box comes from its own numpy Generator seeded from (seed, variant, ratio, repeat, case id),
never from global state, so every method sees identical occlusions; the boxes are stored
(boxes.csv) so any figure can be rebuilt. Ratio 0 is always evaluated (once: it has no box) and
reproduces the clean numbers exactly.

Output folder::

    occlusion_per_case.csv   tidy: run, method, labeled, seed, protocol, precision, variant, ratio, repeat,
                             case, post (raw, lcc), paper_post, dice, jaccard, hd95, asd, empty, units
    occlusion_summary.csv    per run, ratio and post: mean ± sample std over repeats of the per-case-mean metrics,
                             then units
    occlusion.json           settings, units, runs, skipped (case, ratio), the ratio-0 check, the summary table;
                             written first with "status": "running", last with "complete"

hd95 and asd are in the runs' ``units`` (voxel, or mm under ``--units mm``): every run of one call must have
the same, and the files say which.
    boxes.csv                every (ratio, repeat, case) box: volume shape, origin, sides, skip reason
    fig3.png, fig3.pdf       Dice against occluded proportion (built from occlusion_per_case.csv alone)
    fig3_data.csv            the numbers drawn in fig3
    panel.png, panel.npz     one occluded test slice: ground truth and each method's prediction outlined
                             (--no-panel skips it: it costs one more inference per method)
"""
from __future__ import annotations

from functools import partial

import csv
import hashlib
import io
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from .errors import UserError
from .run_folder import RunFolder

VARIANTS = ("volume", "code")
#: §3.7.8: variant B proportions {0.05, 0.1, ..., 0.5}; variant A ratios {0.1, ..., 0.5} (0 is always added)
DEFAULT_RATIOS = {"volume": "0.05,0.1,0.2,0.3,0.4,0.5", "code": "0.1..0.5"}
_VARIANT_KEY = {"code": 1, "volume": 2}  # part of every box's RNG seed (A = 1, B = 2)
MAX_RATIOS = 100
MANIFEST = "occlusion.json"
PER_CASE = "occlusion_per_case.csv"
SUMMARY = "occlusion_summary.csv"
BOXES = "boxes.csv"
METRIC_COLS = ("dice", "jaccard", "hd95", "asd")
TIDY_COLS = ("run", "method", "labeled", "seed", "protocol", "precision", "variant", "ratio", "repeat", "case", "post",
             "paper_post", *METRIC_COLS, "empty", "units")  # units last: columns are only ever appended
BOX_COLS = ("variant", "occlusion_seed", "ratio", "repeat", "case", "dim_x", "dim_y", "dim_z",
            "x0", "y0", "z0", "sx", "sy", "sz", "occluded_fraction", "skipped", "reason")


# ---------------------------------------------------------------------------------- ratios

def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--ratios: {what} {text.strip()!r} is not a number") from None


def _check_range(values, text: str) -> None:
    bad = [v for v in values if not 0.0 <= v < 1.0]  # NaN fails the comparison too
    if bad:
        raise UserError(f"--ratios {text!r}: every ratio must lie in [0, 1), got {bad[0]!r}")


def parse_ratios(text: str, step: float = 0.1) -> list[float]:
    """``a..b`` (inclusive, every ``step``) or a comma list → sorted ratios, 0 first (always included)."""
    text = text.strip()
    if not step > 0 or not math.isfinite(step):
        raise UserError(f"--step must be a positive number, got {step!r}")
    if ".." in text:
        first, _, last = text.partition("..")
        a, b = _number(first, "range start"), _number(last, "range end")
        _check_range([a, b], text)
        if a > b:
            raise UserError(f"--ratios {text!r}: the range is reversed (start {a} > end {b})")
        n = math.floor((b - a) / step + 1e-9)
        if n + 1 > MAX_RATIOS:
            raise UserError(f"--ratios {text!r} with --step {step} gives {n + 1} ratios; at most {MAX_RATIOS}")
        values = [a + i * step for i in range(n + 1)]
    else:
        values = [_number(t, "ratio") for t in text.split(",")]
    values = sorted({round(v, 6) for v in values})  # 0.1 + 2·0.1 → 0.3, as a user would write it
    _check_range(values, text)
    if len(values) > MAX_RATIOS:
        raise UserError(f"--ratios {text!r} lists {len(values)} ratios; at most {MAX_RATIOS}")
    return [0.0] + [v for v in values if v != 0.0]


# ---------------------------------------------------------------------------------- boxes

@dataclass(frozen=True)
class Box:
    """An axis-aligned cuboid: origin (x0, y0, z0) and sides (sx, sy, sz) in voxels."""

    origin: tuple[int, int, int]
    size: tuple[int, int, int]

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + s) for o, s in zip(self.origin, self.size))

    def fraction(self, shape) -> float:
        """Occluded share of the volume (numpy slicing clips a box that runs past the border)."""
        covered = [max(min(o + s, d) - o, 0) for o, s, d in zip(self.origin, self.size, shape)]
        return float(np.prod(covered) / np.prod(shape))


def box_rng(seed: int, variant: str, ratio: float, repeat: int, case_id: str) -> np.random.Generator:
    """The dedicated Generator of one (variant, ratio, repeat, case) (§3.7.8 "common rules").

    Seeded from values, not list positions, so the same ratio gets the same box whatever else is
    asked for; the case enters through a stable hash of its id.
    """
    case_key = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, _VARIANT_KEY[variant], round(ratio * 1_000_000), repeat, case_key])


def volume_box(shape, proportion: float, rng: np.random.Generator) -> Box:
    """Variant B: sides round(dim·p^(1/3)) (half up), origin uniform over {0..dim−s} per axis (x, y, z)."""
    side = [min(d, math.floor(d * proportion ** (1.0 / 3.0) + 0.5)) for d in shape]
    origin = [int(rng.integers(0, d - s + 1)) for d, s in zip(shape, side)]
    return Box(tuple(origin), tuple(side))


def code_box(shape, ratio: float, patch, rng: np.random.Generator) -> tuple[Box | None, str]:
    """Variant A: sides ⌊dim·r⌋, origin uniform over {0..patch−1−s} (OMF ``patch_mask``'s bounds).

    Returns (None, reason) when a side reaches the training patch: the reference's draw fails there.
    """
    side = [int(d * ratio) for d in shape]  # the reference's int(dim * r) in floating point
    for axis, s, p in zip("xyz", side, patch):
        if s >= p:
            return None, f"side {axis} {s} >= training patch {p}"
    origin = [int(rng.integers(0, p - s)) for s, p in zip(side, patch)]
    return Box(tuple(origin), tuple(side)), ""


def make_box(variant: str, shape, ratio: float, repeat: int, case_id: str, seed: int, patch):
    """(box or None, skip reason). Ratio 0 has no box and draws nothing."""
    if ratio == 0:
        return None, ""
    rng = box_rng(seed, variant, ratio, repeat, case_id)
    if variant == "volume":
        return volume_box(shape, ratio, rng), ""
    return code_box(shape, ratio, patch, rng)


def apply_box(image: np.ndarray, box: Box | None) -> np.ndarray:
    """A copy of ``image`` with the box set to 0 (the cached clean image is never modified)."""
    if box is None:
        return image
    out = image.copy()
    out[box.slices()] = 0
    return out


class Occluder:
    """The ``image_fn`` handed to the evaluator for one (ratio, repeat, case)."""

    def __init__(self, ratio: float, repeat: int, case: str, box: Box | None):
        self.ratio, self.repeat, self.case, self.box = ratio, repeat, case, box

    def __call__(self, case_id: str, image: np.ndarray) -> np.ndarray:
        if case_id != self.case:
            raise RuntimeError(f"occluder for case {self.case} received case {case_id}")
        return apply_box(image, self.box)


def box_row(variant: str, seed: int, ratio: float, repeat: int, case: str, shape, box, reason: str) -> dict:
    o, s = (box.origin, box.size) if box is not None else ((0, 0, 0), (0, 0, 0))
    return {"variant": variant, "occlusion_seed": seed, "ratio": ratio, "repeat": repeat, "case": case,
            "dim_x": shape[0], "dim_y": shape[1], "dim_z": shape[2],
            "x0": o[0], "y0": o[1], "z0": o[2], "sx": s[0], "sy": s[1], "sz": s[2],
            "occluded_fraction": repr(box.fraction(shape)) if box is not None else "0.0",
            "skipped": bool(reason), "reason": reason}


def box_from_row(row: dict) -> Box | None:
    """The Box stored in one boxes.csv row (None for ratio 0 or a skipped combination)."""
    size = tuple(int(row[k]) for k in ("sx", "sy", "sz"))
    if str(row["skipped"]) == "True" or float(row["ratio"]) == 0:
        return None
    return Box(tuple(int(row[k]) for k in ("x0", "y0", "z0")), size)


# ---------------------------------------------------------------------------------- runs

@dataclass
class RunInfo:
    path: Path
    name: str
    trainer: object
    method: str
    labeled: int
    seed: int
    protocol: str
    profile: str
    paper_post: str
    precision: str  # the run's declared (or, for an older folder, inferred) numerics, Decision 7
    units: str = "voxel"  # of hd95 and asd: "voxel" or "mm" (the run's --units)


def _load_runs(run_dirs, data_dir, device: str) -> list[RunInfo]:
    from .evaluation import load_run

    runs, seen, names = [], set(), set()
    for d in run_dirs:
        path = Path(d).resolve()
        if not path.is_dir():
            raise UserError(f"run folder not found: {d}")
        if path in seen:
            raise UserError(f"run folder given twice: {d}")
        seen.add(path)
        trainer = load_run(path, data_dir, device, progress=False)
        folder = RunFolder(path)
        stage = trainer.stages[-1]
        paper_post = (folder.read_summary().get("paper_post") if folder.is_finished() else None) \
            or ("lcc" if stage.paper_lcc else "raw")
        folder.read_metrics()  # ratio 0 is compared with it at the end: one line now if it is damaged
        name, k = path.name, 2
        while name in names:  # two folders with the same name under different parents
            name, k = f"{path.name}#{k}", k + 1
        names.add(name)
        cfg = trainer.cfg
        runs.append(RunInfo(path, name, trainer, trainer.spec.name, cfg.labeled, cfg.seed, cfg.protocol,
                            cfg.profile, paper_post, cfg.precision, getattr(cfg, "units", None) or "voxel"))
    return runs


def _check_comparable(runs: list[RunInfo], variant: str) -> list[str]:
    """Every run must be evaluated on the same test cases (and, for variant A, the same patch bounds)."""
    first = runs[0]
    for r in runs[1:]:  # one hd95/asd column holds one unit
        if r.units != first.units:
            raise UserError(f"runs with different distance units: {first.path.name} gives 95HD/ASD in {first.units}, "
                            f"{r.path.name} in {r.units}; occlude them in separate calls")
    test_ids = list(first.trainer.test_ids)
    for r in runs[1:]:
        ids = list(r.trainer.test_ids)
        if ids != test_ids:
            raise UserError(f"runs are evaluated on different test sets: {first.path.name} has {len(test_ids)} "
                            f"case(s) starting {test_ids[:1]}, {r.path.name} has {len(ids)} starting {ids[:1]}")
    sums = {}
    for r in runs:  # the same ids must also be the same files (checksums recorded at training time)
        recorded = RunFolder(r.path).read_config().get("data", {}).get("sha256", {})
        for case in test_ids:
            if case in recorded:
                if sums.setdefault(case, (recorded[case], r.path.name))[0] != recorded[case]:
                    raise UserError(f"runs are evaluated on different test sets: case {case} of "
                                    f"{r.path.name} differs from that of {sums[case][1]} (sha256)")
    if variant == "code":
        patches = {tuple(r.trainer.cfg.patch) for r in runs}
        if len(patches) > 1:
            raise UserError(f"--variant code places boxes within the training patch, and these runs use "
                            f"different patches {sorted(patches)}; occlusions would differ between methods")
    return test_ids


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Never overwrite silently: a non-empty folder needs --overwrite, and only an occlusion folder is replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output path exists and is not a folder: {out}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {out} already exists and is not empty; pass --overwrite to replace it")
        if not (out / MANIFEST).is_file():
            raise UserError(f"--overwrite refuses to empty {out}: it holds no {MANIFEST}, so it is not an occlusion output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _write_csv(path: Path, cols, rows) -> None:
    from .runs import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def _fmt(v):
    return repr(float(v)) if isinstance(v, (float, np.floating)) else v


# ---------------------------------------------------------------------------------- the sweep

def _plan_boxes(test_ids, data, ratios, repeats, variant, seed, patch):
    """Every (ratio, repeat, case) with its box; ratio 0 once (repeat 0), as it has no box."""
    plan = []
    for ratio in ratios:
        for repeat in range(1 if ratio == 0 else repeats):
            for case in test_ids:
                shape = data.load(case)[0].shape
                box, reason = make_box(variant, shape, ratio, repeat, case, seed, patch)
                plan.append((ratio, repeat, case, shape, box, reason))
    return plan


def _panel_choice(plan, data):
    """The panel shows the largest evaluated ratio, repeat 0, on the case and z-slice where the box hides most atrium."""
    placed = [p for p in plan if p[4] is not None and p[1] == 0]
    if not placed:
        case = plan[0][2]
        gt = data.load(case)[1]
        return plan[0][:3] + (None, int(np.argmax(gt.sum(axis=(0, 1)))))
    top = max(p[0] for p in placed)
    best = None
    for ratio, repeat, case, shape, box, _ in placed:
        if ratio != top:
            continue
        gt = data.load(case)[1]
        per_z = gt[box.slices()].sum(axis=(0, 1))
        hidden = int(per_z.sum())
        if best is None or hidden > best[0]:
            z = box.origin[2] + int(np.argmax(per_z)) if hidden else box.origin[2] + box.size[2] // 2
            best = (hidden, (ratio, repeat, case, box, min(z, shape[2] - 1)))
    return best[1]


def _clean_check(run: RunInfo, rows: list[dict]) -> dict:
    """Ratio 0 against the run's own metrics_per_case.csv (written by `ssl-bench run` / `eval`)."""
    folder = RunFolder(run.path)
    path = folder.metrics_path()
    if not folder.has_metrics():
        return {"compared": 0, "identical": None, "max_abs_diff": None}
    # whole (checked as the run was loaded); compared as written, not as pandas parses it
    clean = {(r["case"], r["post"]): r for r in csv.DictReader(path.open())}
    diffs, n, same = [], 0, True
    for r in rows:
        if r["ratio"] != 0 or (r["case"], r["post"]) not in clean:
            continue
        ref = clean[(r["case"], r["post"])]
        n += 1
        same &= str(r["empty"]) == ref["empty"]
        for m in METRIC_COLS:
            a, b = float(r[m]), float(ref[m])
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                same = False
                diffs.append(abs(a - b))
    return {"compared": n, "identical": bool(same and n > 0), "max_abs_diff": max(diffs) if diffs else 0.0}


def summarize_occlusion(rows: list[dict]) -> list[dict]:
    """Per run, ratio and post: mean ± sample std (n − 1, over repeats; 0 for one repeat) of the per-case-mean
    metrics: the std of docs/methods.md §3.7.8, as in Fig. 3 (ssl_bench.report_rows.fig3_table)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    keys = ["run", "method", "labeled", "seed", "protocol", "precision", "variant", "ratio", "post", "paper_post"]
    extra = {"units": ("units", "first")} if "units" in df else {}
    per_repeat = df.groupby(keys + ["repeat"], sort=False).agg(
        n_cases=("case", "size"), n_empty=("empty", "sum"), **{m: (m, "mean") for m in METRIC_COLS},
        **extra).reset_index()
    out = []
    for key, g in per_repeat.groupby(keys, sort=False):
        row = dict(zip(keys, key))
        row.update({"n_repeats": len(g), "n_cases": int(g["n_cases"].max()), "n_empty": int(g["n_empty"].sum())})
        for m in METRIC_COLS:
            row[f"{m}_mean"] = float(g[m].mean())
            row[f"{m}_std"] = float(g[m].std(ddof=1)) if len(g) > 1 else 0.0
        if extra:  # of hd95/asd; appended, so the columns before it keep their places
            row["units"] = g["units"].iloc[0]
        out.append(row)
    return out


def run_occlusion(run_dirs, ratios: str | None = None, step: float = 0.1, repeats: int = 5, variant: str = "volume",
                  seed: int = 0, out=None, data_dir=None, device: str = "auto", overwrite: bool = False,
                  progress: bool = True, panel: bool = True, echo=print, experiment: dict | None = None) -> dict:
    """Validate everything, then evaluate every run at every (ratio, repeat, case) and write the outputs.

    ``experiment``: where the run folders came from (``--experiment``: its name, file and ``--runs-dir``), recorded."""
    from .evaluate import evaluate_cases
    from .progress import Progress
    from .runs import atomic_write_json, provenance

    if variant not in VARIANTS:
        raise UserError(f"unknown occlusion variant {variant!r}; choose volume or code")
    ratio_text = ratios if ratios is not None else DEFAULT_RATIOS[variant]
    ratio_list = parse_ratios(ratio_text, step)
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if seed < 0:
        raise UserError(f"--seed must be non-negative, got {seed}")
    if not run_dirs:
        raise UserError("give at least one run folder")
    runs = _load_runs(run_dirs, data_dir, device)
    test_ids = _check_comparable(runs, variant)
    out = Path(out if out is not None else f"occlusion-{variant}").resolve()
    data = runs[0].trainer.data  # one cache of the test images for every run
    patch = tuple(runs[0].trainer.cfg.patch)
    data.check(test_ids)
    _prepare_out(out, overwrite)

    plan = _plan_boxes(test_ids, data, ratio_list, repeats, variant, seed, patch)
    _write_csv(out / BOXES, BOX_COLS, [box_row(variant, seed, *p) for p in plan])
    skipped = {(p[0], p[2]): {"ratio": p[0], "case": p[2], "reason": p[5]} for p in plan if p[5]}  # per (ratio, case)
    todo = [p for p in plan if not p[5]]
    shown = _panel_choice(todo, data) if panel else None
    manifest = {
        "status": "running", "variant": variant, "protocol_section": "docs/methods.md §3.7.8", "occlusion_seed": seed,
        "experiment": experiment,
        "ratios": ratio_list, "ratios_arg": ratio_text, "step": step, "repeats": repeats,
        "ratio0_repeats": 1, "fill_value": 0.0, "training_patch": list(patch) if variant == "code" else None,
        "std": "sample std (n - 1) over repeats of the per-case-mean metric; 0 for one repeat",
        "data": str(data.root), "test_cases": test_ids, "units": runs[0].units,
        "runs": [{"run": r.name, "path": str(r.path), "method": r.method, "labeled": r.labeled, "seed": r.seed,
                  "protocol": r.protocol, "profile": r.profile, "paper_post": r.paper_post,
                  "precision": r.precision, "units": r.units, "fast": r.trainer.cfg.fast, "numerics": r.trainer.numerics(),
                  "device": str(r.trainer.device)} for r in runs],
        "skipped": list(skipped.values()),
        "panel": {"case": shown[2], "ratio": shown[0], "repeat": shown[1], "z": shown[4]} if shown else None,
        "provenance": provenance(),
    }
    atomic_write_json(out / MANIFEST, manifest)  # marks the folder as an occlusion output from the start

    rows, panel_preds, checks = [], {}, {}
    bar = Progress(len(todo) * len(runs), "occlusion", enabled=progress, unit="case")
    done = 0
    try:
        for run in runs:
            tr = run.trainer
            # the run's own TF32 and cuDNN settings, as in training and `ssl-bench eval`, so that ratio 0
            # reproduces its clean evaluation on CUDA too (each run may declare other numerics)
            tr._setup_backend()
            stage, net, _ = tr.final_network()
            group = (run.method, run.labeled, run.protocol)
            for ratio, repeat, case, shape, box, _ in todo:
                occ = Occluder(ratio, repeat, case, box)
                hook = None
                if shown is not None and group not in panel_preds and (ratio, repeat, case) == tuple(shown[:3]):
                    hook = partial(_keep_panel_slice, panel_preds, group, run, shown[4])
                case_rows, _ = evaluate_cases(stage.foreground_probability, net, data, [case], tr.eval_settings,
                                              tr.device, image_fn=occ, progress=False, on_prediction=hook)
                for r in case_rows:
                    rows.append({"run": run.name, "method": run.method, "labeled": run.labeled, "seed": run.seed,
                                 "protocol": run.protocol, "precision": run.precision, "variant": variant,
                                 "ratio": ratio, "repeat": repeat,
                                 "case": case, "post": r["post"], "paper_post": r["post"] == run.paper_post,
                                 **{m: r[m] for m in METRIC_COLS}, "empty": bool(r["empty"]), "units": run.units})
                done += 1
                bar.update(done, f"{run.name} ratio {ratio:g} repeat {repeat}")
            checks[run.name] = _clean_check(run, [r for r in rows if r["run"] == run.name])
            del net
            if tr.device.type == "cuda":
                import torch
                torch.cuda.empty_cache()
            _write_csv(out / PER_CASE, TIDY_COLS, [{k: _fmt(v) for k, v in r.items()} for r in rows])
    finally:
        bar.close()

    table = summarize_occlusion(rows)
    _write_csv(out / SUMMARY, list(table[0]), [{k: _fmt(v) for k, v in r.items()} for r in table])
    from .occlusion_plots import plot_fig3, plot_panel, save_panel

    fig_table = plot_fig3(out / PER_CASE, out / "fig3")
    _write_csv(out / "fig3_data.csv", list(fig_table.columns),
               [{k: _fmt(v) for k, v in r.items()} for r in fig_table.to_dict("records")])
    files = [PER_CASE, SUMMARY, BOXES, "fig3.png", "fig3.pdf", "fig3_data.csv"]
    if shown is not None:
        _save_panel_data(out / "panel.npz", data, shown, list(panel_preds.values()), rows, variant, save_panel)
        plot_panel(out / "panel.npz", out / "panel.png")
        files += ["panel.png", "panel.npz"]

    manifest["status"] = "complete"
    for entry in manifest["runs"]:
        entry["ratio0_vs_clean"] = checks[entry["run"]]
    manifest.update({"summary": table, "files": files})
    atomic_write_json(out / MANIFEST, manifest)
    _report(manifest, table, out, echo)
    return manifest


def _keep_panel_slice(store: dict, group, run: RunInfo, z: int, case_id, post, mask) -> None:
    """An ``on_prediction`` hook: keep the panel slice of the run's final mask (its own post-processing)."""
    if post == run.paper_post:
        store[group] = (run, mask[:, :, z].astype(np.uint8))


def _save_panel_data(path, data, panel, shown, rows, variant, save_panel) -> None:
    """``shown``: (run, prediction slice) of the first run given of each method."""
    ratio, repeat, case, box, z = panel
    image, gt = data.load(case)
    dice = {r["run"]: r["dice"] for r in rows if r["case"] == case and r["ratio"] == ratio
            and r["repeat"] == repeat and r["paper_post"]}
    runs, preds = [r for r, _ in shown], [p for _, p in shown]
    save_panel(path, image=apply_box(image, box)[:, :, z], gt=gt[:, :, z].astype(np.uint8), preds=np.stack(preds),
               labels=[f"{r.method} (seed {r.seed}, {r.paper_post})" for r in runs],
               dice=[dice[r.name] for r in runs], case=case, ratio=ratio, repeat=repeat, z=z, variant=variant,
               box=list(box.origin + box.size) if box is not None else [0] * 6)


def _report(manifest, table, out: Path, echo) -> None:
    ratios = manifest["ratios"]
    echo(f"occlusion variant {manifest['variant']} (seed {manifest['occlusion_seed']}, {manifest['repeats']} repeats); "
         f"Dice % (method's own post) mean ± std over repeats:")
    for run in manifest["runs"]:
        cells = []
        for ratio in ratios:
            hit = [t for t in table if t["run"] == run["run"] and t["ratio"] == ratio and t["paper_post"]]
            cells.append(f"{ratio:g}: {100 * hit[0]['dice_mean']:.2f}±{100 * hit[0]['dice_std']:.2f}" if hit
                         else f"{ratio:g}: skipped")
        echo(f"  {run['run']} [{run['paper_post']}]  " + "  ".join(cells))
        check = run["ratio0_vs_clean"]
        if check["identical"] is False:
            echo(f"  note: ratio 0 of {run['run']} differs from its metrics_per_case.csv by up to "
                 f"{check['max_abs_diff']:.3g} (evaluated on {run['device']})")
    if manifest["skipped"]:
        by_ratio = {}
        for s in manifest["skipped"]:
            by_ratio.setdefault(s["ratio"], set()).add(s["case"])
        n_cases = len(manifest["test_cases"])
        parts = [f"ratio {r:g}: {len(c)}/{n_cases} case(s)" for r, c in sorted(by_ratio.items())]
        echo(f"skipped (box cannot be placed within the training patch {manifest['training_patch']}): "
             + "; ".join(parts) + f" — see {BOXES}")
    echo(f"occlusion results: {out}")


@click.command("occlusion")
@click.argument("run_dirs", metavar="[RUN_DIR...]", nargs=-1, type=click.Path(path_type=Path))
@click.option("--experiment", default=None,
              help="take the run folders (its cells under --runs-dir) and the variant, ratios and repeats from an "
                   "experiment file with an [occlusion] section, e.g. fig3; output defaults to results/<name>/occlusion")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="where --experiment's run folders are")
@click.option("--ratios", default=None,
              help="a..b (every --step) or a comma list, each in [0,1); 0 is always added "
                   "[default: 0.05,0.1,0.2,0.3,0.4,0.5 for volume, 0.1..0.5 for code]")
@click.option("--step", type=float, default=0.1, show_default=True, help="spacing of an a..b ratio range")
@click.option("--repeats", type=int, default=None, help="boxes per (ratio, case) [default: 5]")
@click.option("--variant", type=click.Choice(VARIANTS), default=None,
              help="volume: proportion p of the voxels anywhere in the volume (§3.7.8 B, primary, the default); "
                   "code: the OMF helper's per-axis side ratio and placement bounds (§3.7.8 A)")
@click.option("--seed", type=int, default=0, show_default=True, help="base seed of every box")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="output folder [default: occlusion-<variant>]")
@click.option("--data", "data_dir", default=None, help="data root (default: the one recorded in the runs)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing occlusion output folder")
@click.option("--panel/--no-panel", default=True, show_default=True,
              help="draw the qualitative panel (one more inference per method)")
@click.option("--quiet", is_flag=True, help="no progress line")
def occlusion_command(run_dirs, experiment, runs_dir, ratios, step, repeats, variant, seed, out, data_dir, device,
                      overwrite, panel, quiet):
    """Occlusion robustness (paper Fig. 3): evaluate RUN_DIR... with one zero-filled cuboid per test image."""
    if experiment is not None:
        from .experiments import load_experiment

        if run_dirs:
            raise UserError("give either RUN_DIR... or --experiment, not both")
        exp = load_experiment(experiment)
        if exp.occlusion is None:
            raise UserError(f"experiment {exp.name} has no [occlusion] section")
        run_dirs = [cell.run_dir(runs_dir) for cell in exp.cells]
        source = {"name": exp.name, "file": str(exp.path), "runs_dir": str(Path(runs_dir).resolve())}
        missing = [str(d) for d in run_dirs if not RunFolder(d).is_finished()]
        if missing:
            raise UserError(f"{len(missing)} of {len(run_dirs)} runs of {exp.name} are not finished, e.g. {missing[0]}; "
                            f"train them with `ssl-bench sweep {exp.name}`")
        variant = variant or exp.occlusion.variant
        ratios = ratios or ",".join(f"{r:g}" for r in exp.occlusion.ratios)
        repeats = repeats or exp.occlusion.repeats
        out = out or Path("results") / exp.name / "occlusion"
    else:
        source = None
    if not run_dirs:
        raise UserError("give at least one run folder or --experiment")
    run_occlusion(run_dirs, ratios=ratios, step=step, repeats=repeats or 5, variant=variant or "volume", seed=seed,
                  out=out, data_dir=data_dir, device=device, overwrite=overwrite, progress=not quiet, panel=panel,
                  echo=click.echo, experiment=source)
