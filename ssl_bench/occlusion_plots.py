"""Figures of the occlusion test (docs/methods.md §3.7.8): the paper's Fig. 3 and a qualitative panel.

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

from .errors import UserError
from .runs import atomic_savefig, atomic_write

X_LABEL = {"volume": "occluded proportion of the volume (%)",
           "code": "occlusion side ratio r (% of each axis; hidden volume ≈ r³)"}
VARIANT_NAME = {"volume": "variant B: volume proportion", "code": "variant A: code-faithful"}


def _save_figure(fig: Figure, path: Path, fmt: str) -> None:
    atomic_savefig(fig, path, dpi=200)


def _line_labels(df: pd.DataFrame) -> pd.Series:
    """One line per method; the labeled count and protocol join the name only where they vary."""
    label = df["method"].astype(str)
    if df["labeled"].nunique() > 1:
        label = label + " L" + df["labeled"].astype(str)
    if df["protocol"].nunique() > 1:
        label = label + " (" + df["protocol"].astype(str) + ")"
    return label


def fig3_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per method and ratio: mean ± std (population) of the per-case-mean Dice over runs (seeds) × repeats.

    Only each method's own post-processing (``paper_post``, Decisions 3) is drawn.
    """
    df = df[df["paper_post"].astype(str) == "True"].copy()
    if df.empty:
        raise UserError("the occlusion CSV has no rows with the methods' own post-processing (paper_post)")
    df["label"] = _line_labels(df)
    per_repeat = df.groupby(["label", "run", "ratio", "repeat"], sort=False)["dice"].mean()
    g = per_repeat.groupby(level=["label", "ratio"], sort=False)
    runs = per_repeat.reset_index().groupby(["label", "ratio"], sort=False)["run"].nunique()
    table = pd.DataFrame({"dice_mean": g.mean(), "dice_std": g.std(ddof=0), "n_runs": runs, "n_samples": g.size()})
    table = table.reset_index()
    order = {label: i for i, label in enumerate(dict.fromkeys(df["label"]))}  # methods in the order given
    table = table.assign(_order=table["label"].map(order)).sort_values(["_order", "ratio"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def plot_fig3(csv_path, out_prefix) -> pd.DataFrame:
    """Dice against occluded proportion, one line per method with a mean ± std band → ``out_prefix``.png/.pdf.

    Reads only the tidy CSV written by ``ssl-bench occlusion``; returns the table it drew.
    """
    df = pd.read_csv(csv_path)
    variants = sorted(df["variant"].unique())
    if len(variants) != 1:
        raise UserError(f"{csv_path}: one occlusion variant per figure, found {variants}")
    variant = variants[0]
    table = fig3_table(df)
    labels = list(dict.fromkeys(table["label"]))
    palette = dict(zip(labels, sns.color_palette("colorblind", len(labels))))
    plot = table.assign(x=100 * table["ratio"], y=100 * table["dice_mean"], s=100 * table["dice_std"])
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig = Figure(figsize=(5.5, 4.0))
        ax = fig.add_subplot()
        sns.lineplot(data=plot, x="x", y="y", hue="label", hue_order=labels, palette=palette, marker="o",
                     errorbar=None, ax=ax)
        for label in labels:
            sel = plot[plot["label"] == label]
            ax.fill_between(sel["x"], sel["y"] - sel["s"], sel["y"] + sel["s"], color=palette[label], alpha=0.2,
                            linewidth=0)
        ax.set_xlabel(X_LABEL[variant])
        ax.set_ylabel("Dice (%)")
        n_rep = int(df["repeat"].max()) + 1
        ax.set_title(f"Occlusion robustness ({VARIANT_NAME[variant]})\n"
                     f"mean ± std over seeds × {n_rep} repeat(s), {df['case'].nunique()} test case(s)", fontsize=9)
        ax.legend(title=None, fontsize=8)
    out_prefix = Path(out_prefix)
    _save_figure(fig, out_prefix.with_name(out_prefix.name + ".png"), "png")
    _save_figure(fig, out_prefix.with_name(out_prefix.name + ".pdf"), "pdf")
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
