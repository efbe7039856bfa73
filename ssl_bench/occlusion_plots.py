"""Figures of the occlusion test (docs/methods.md §3.7.8): the paper's Fig. 3 and a qualitative panel.

Fig. 3 has one pipeline: ``ssl-bench occlusion`` (:func:`plot_fig3`) and ``ssl-bench report`` both compute its
table with ssl_bench.report_rows.fig3_table and draw it with :func:`draw_fig3`.

Both are drawn from stored files alone (``occlusion_per_case.csv``, ``panel.npz``), so a figure can
be rebuilt or restyled without evaluating anything. Figures are built on ``matplotlib.figure.Figure``
(no pyplot, no global backend or style change) and written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from . import published
from .errors import UserError
from .report_rows import fig3_table, own_post_rows
from .runs import atomic_savefig, atomic_write

X_LABEL = {"volume": "occluded proportion of the volume (%)",
           "code": "occlusion side ratio r (% of each axis; hidden volume ≈ r³)"}
VARIANT_NAME = {"volume": "variant B: volume proportion", "code": "variant A: code-faithful"}


def _save_figure(fig: Figure, path: Path, fmt: str) -> None:
    atomic_savefig(fig, path, dpi=200)


def _line_label(method: str, protocol: str, precision: str, varies: dict, paper: str | None) -> str:
    """A line's name: the method, with its protocol and precision where those vary in the figure."""
    label = published.display_name(method, paper)
    extra = [v for k, v in (("protocol", protocol), ("precision", precision)) if varies[k]]
    return label + (f" ({', '.join(extra)})" if extra else "")


def fig3_figure(table: pd.DataFrame, variant: str, paper: str | None = None, note: str = "") -> Figure:
    """Fig. 3 from ssl_bench.report_rows.fig3_table's table: one panel per labeled count, one line per (method,
    protocol, precision) with a mean ± std band (sample std over repeats; none where one repeat, as at ratio 0)."""
    if variant not in X_LABEL:
        raise UserError(f"unknown occlusion variant {variant!r}; choose {' or '.join(X_LABEL)}")
    varies = {k: table[k].nunique() > 1 for k in ("protocol", "precision")}
    lines = list(dict.fromkeys(zip(table["method"], table["protocol"], table["precision"])))
    palette = dict(zip(lines, sns.color_palette("colorblind", len(lines))))
    labeled = sorted(table["labeled"].unique())
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=(max(5.5, 4.8 * len(labeled)), 4.0))
        axes = fig.subplots(1, len(labeled), squeeze=False, sharey=True)[0]
        for ax, n in zip(axes, labeled):
            sub = table[table["labeled"] == n]
            for line in lines:
                g = sub[(sub["method"] == line[0]) & (sub["protocol"] == line[1]) & (sub["precision"] == line[2])]
                if g.empty:
                    continue
                g = g.sort_values("ratio")
                x, y, s = 100 * g["ratio"], 100 * g["dice_mean"], 100 * g["dice_std"].fillna(0)
                ax.plot(x, y, marker="o", markersize=3, color=palette[line],
                        label=_line_label(*line, varies=varies, paper=paper))
                ax.fill_between(x, y - s, y + s, color=palette[line], alpha=0.2, linewidth=0)
            ax.set_title(f"{n} labeled", fontsize=9)
            ax.set_xlabel(X_LABEL[variant])
        axes[0].set_ylabel("Dice (%)")
        axes[-1].legend(title=None, fontsize=7)
        fig.suptitle(f"Occlusion robustness ({VARIANT_NAME[variant]})\nmean ± std (n−1) over repeats of the case-mean "
                     f"Dice, averaged over seeds{note}", fontsize=9)
    return fig


def draw_fig3(table: pd.DataFrame, variant: str, stem, paper: str | None = None, note: str = "") -> list[Path]:
    """:func:`fig3_figure` written to ``stem``.png and ``stem``.pdf (atomically); returns both paths."""
    fig = fig3_figure(table, variant, paper, note)
    stem = Path(stem)
    written = []
    for ext in ("png", "pdf"):
        path = stem.with_name(f"{stem.name}.{ext}")
        _save_figure(fig, path, ext)
        written.append(path)
    return written


def plot_fig3(csv_path, out_prefix) -> pd.DataFrame:
    """Fig. 3 of an ``ssl-bench occlusion`` output → ``out_prefix``.png/.pdf; returns the table it drew
    (ssl_bench.report_rows.fig3_table, the same as ``ssl-bench report``'s occlusion.csv).

    Reads only the tidy CSV written by ``ssl-bench occlusion``; only each method's own post-processing
    (``paper_post``, Decisions 3) is drawn.
    """
    df = pd.read_csv(csv_path)
    variants = sorted(df["variant"].unique())
    if len(variants) != 1:
        raise UserError(f"{csv_path}: one occlusion variant per figure, found {variants}")
    own = own_post_rows(df)
    if own.empty:
        raise UserError("the occlusion CSV has no rows with the methods' own post-processing (paper_post)")
    table = fig3_table(own)
    draw_fig3(table, variants[0], out_prefix, note=f", {df['case'].nunique()} test case(s)")
    return table


def save_panel(path, **arrays) -> None:
    """Store the panel's data (occluded slice, ground truth, predictions, labels, box) as .npz."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write(Path(path), write)


def _outline(ax, mask: np.ndarray, color: str) -> None:
    if mask.any() and not mask.all():  # contour needs both levels present
        ax.contour(mask.T.astype(float), levels=[0.5], colors=[color], linewidths=1.0)


def plot_panel(npz_path, out_png) -> None:
    """One occluded test slice per method: ground truth (green) and the method's prediction (red) outlined."""
    d = np.load(npz_path, allow_pickle=False)
    labels, preds, dice = list(d["labels"]), d["preds"], d["dice"]
    n = len(labels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    x0, y0, _, sx, sy, _ = (int(v) for v in d["box"])
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(d["image"].T, cmap="gray", origin="lower", interpolation="nearest")
        _outline(ax, d["gt"], "lime")
        _outline(ax, preds[i], "red")
        if sx and sy:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), sx, sy, fill=False, edgecolor="yellow",
                                   linestyle="--", linewidth=0.8))
        ax.set_title(f"{labels[i]}\nDice {100 * float(dice[i]):.1f}%", fontsize=8)
    handles = [Line2D([], [], color="lime", label="ground truth"), Line2D([], [], color="red", label="prediction"),
               Line2D([], [], color="yellow", linestyle="--", label="occluded box")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"case {d['case']}, {d['variant']} ratio {float(d['ratio']):g}, repeat {int(d['repeat'])}, "
                 f"slice z={int(d['z'])}", fontsize=9)
    _save_figure(fig, Path(out_png), "png")
