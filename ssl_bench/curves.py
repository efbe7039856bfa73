"""`ssl-bench curves RUN_DIR... --out STEM`: training curves of one or more run folders in one figure.

Read from each run's ``log.jsonl`` (and ``config.json`` for the stage lengths), never from checkpoints:

- losses: the total ``loss`` of the main phase (solid) and every other logged ``loss*`` value (thinner);
- learning rate of the main optimiser;
- Dice at each selection point: ``val_dice_raw`` (the `val` protocol's validation cases, solid, circles)
  and ``test_dice_raw`` (the `literature` protocol's test cases, dashed, squares), raw, no LCC.

The x axis is the iteration counted across stages (stage 2's iteration i is drawn at stage 1's length + i),
with a dotted line at each stage boundary. Written as STEM.png and STEM.pdf (matplotlib, Agg), atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import UserError
from .run_folder import RunFolder
from .runs import atomic_savefig

DICE_KEYS = {"val_dice_raw": ("validation", "-", "o"), "test_dice_raw": ("test", "--", "s")}


def stage_offsets(run_dir: Path, rows: list[dict]) -> dict[int, int]:
    """Iterations before each stage: from config.json's stage lengths, else the largest logged iteration per stage."""
    lengths = {}
    folder = RunFolder(run_dir)
    if folder.has_config():
        stages = ((folder.read_config().get("method") or {}).get("stages")) or []
        try:
            lengths = {k + 1: int(s["iterations"]) for k, s in enumerate(stages)
                       if isinstance(s, dict) and "iterations" in s}
        except (TypeError, ValueError, AttributeError):
            raise UserError(f"{folder.config_path} is damaged (a stage's iterations is not a number)") from None
    for r in rows:  # a stage config.json does not describe: as far as it was logged
        lengths[r["stage"]] = max(lengths.get(r["stage"], 0), r["iteration"])
    offsets, total = {}, 0
    for k in sorted(lengths):
        offsets[k] = total
        total += lengths[k]
    return offsets


def load_curves(run_dir) -> dict:
    """{"name", "boundaries", "series": {key: (x, y)}} of one run folder; x = iteration across stages."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    log = folder.log_path
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    if not folder.has_log():
        raise UserError(f"{run_dir} has no {log.name} (is it a run folder?)")
    rows = []
    lines = log.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["stage"], row["iteration"] = int(row["stage"]), int(row["iteration"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                continue  # a last line cut by an interruption
            raise UserError(f"{log}: line {n} is not a log row") from None
        rows.append(row)
    if not rows:
        raise UserError(f"{log} has no rows yet")
    offsets = stage_offsets(run_dir, rows)
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        x = offsets[r["stage"]] + r["iteration"]
        for key, value in r.items():
            if key in ("stage", "iteration", "it_per_s", "elapsed_s") or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(x)
            ys.append(float(value))
    boundaries = [offsets[k] for k in sorted(offsets) if offsets[k] > 0]
    return {"name": run_dir.resolve().name, "boundaries": boundaries, "series": series}


def by_stage(xs, ys, boundaries):
    """(x, y) split into one segment per stage, so no line joins the end of one stage to the next one's start."""
    segments: dict[int, tuple[list, list]] = {}
    for x, y in zip(xs, ys):
        k = sum(1 for b in boundaries if x > b)
        segments.setdefault(k, ([], []))
        segments[k][0].append(x)
        segments[k][1].append(y)
    return [segments[k] for k in sorted(segments)]


def _plot(ax, xs, ys, boundaries, label, **style):
    for n, (x, y) in enumerate(by_stage(xs, ys, boundaries)):
        ax.plot(x, y, label=label if n == 0 else None, **style)


def plot_curves(run_dirs, stem) -> list[Path]:
    """The curves of ``run_dirs`` (:func:`load_curves`) in one figure: STEM.png and STEM.pdf."""
    runs = [load_curves(d) for d in run_dirs]
    if not runs:
        raise UserError("name at least one run folder")
    return draw_curves(runs, stem)


def draw_curves(runs: list[dict], stem) -> list[Path]:
    """Draw curves already read by :func:`load_curves` (the report reads them before it writes anything)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_dice) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_dice = False
    for i, run in enumerate(runs):
        color, s, bounds = colors[i % len(colors)], run["series"], run["boundaries"]
        width = 2.0 * (len(runs) - i) / len(runs)
        for key in sorted(k for k in s if k.startswith("loss")):
            main = key == "loss"
            # earlier runs drawn wider, so a run whose curve coincides with another's (same batches) stays visible
            _plot(ax_loss, *s[key], bounds, f"{run['name']}" if main else f"{run['name']}: {key}", color=color,
                  lw=(1.0 + width) if main else 0.8, alpha=0.9 if main else 0.6, ls="-" if main else ":")
        if "lr" in s:
            _plot(ax_lr, *s["lr"], bounds, run["name"], color=color, lw=1.0 + width)
        for key, (what, ls, marker) in DICE_KEYS.items():
            if key in s:
                any_dice = True
                _plot(ax_dice, s[key][0], [100 * v for v in s[key][1]], bounds, f"{run['name']}: {what}",
                      color=color, ls=ls, marker=marker, ms=4)
        for b in run["boundaries"]:
            for ax in (ax_loss, ax_lr, ax_dice):
                ax.axvline(b, color=color, ls=":", lw=0.8)
    ax_loss.set_title("losses (solid: total of the main phase)")
    ax_lr.set_title("learning rate (main optimiser)")
    ax_dice.set_title("Dice at the selection points (raw)" if any_dice else
                      "Dice at the selection points: none logged (honest)")
    ax_dice.set_ylabel("Dice (%)")
    for ax in (ax_loss, ax_lr, ax_dice):
        ax.set_xlabel("iteration (across stages)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    stem = Path(stem)
    written = []
    for ext in ("png", "pdf"):
        path = stem.parent / f"{stem.name}.{ext}"
        atomic_savefig(fig, path, dpi=150)
        written.append(path)
    plt.close(fig)
    return written


@click.command("curves")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "stem", required=True, type=click.Path(path_type=Path),
              help="file stem: writes STEM.png and STEM.pdf")
def curves_command(run_dirs, stem):
    """Losses, learning rate and the selection Dice (validation and/or test) against iteration, for RUN_DIRS in one figure."""
    for path in plot_curves(run_dirs, stem):
        click.echo(f"wrote {path}")
