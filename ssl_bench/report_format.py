"""How the report writes numbers and tables: two decimals, mean ± std, Markdown and LaTeX tables.

Shared by ssl_bench/report.py, ssl_bench/selection_report.py and ssl_bench/track_report.py; it imports nothing of
the project, so every report module can use it without importing another.
"""
from __future__ import annotations

import math


def fmt(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def fmt_stats(s: tuple[float, float] | None) -> str:
    """Mean ± std; the mean alone where the std is NaN (one seed)."""
    if s is None:
        return "–"
    mean, std = s
    return fmt(mean) if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def fmt_four(values) -> str:
    return " / ".join(fmt(v) for v in values)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "±": r"$\pm$", "−": r"$-$", "–": "--", "§": r"\S{}", "≥": r"$\geq$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def latex_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    cols = "l" + "r" * (len(header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize", f"\\caption{{{tex_escape(caption)}}}",
             f"\\begin{{tabular}}{{{cols}}}", r"\hline", " & ".join(tex_escape(h) for h in header) + r" \\", r"\hline"]
    lines += [" & ".join(tex_escape(c) for c in r) + r" \\" for r in rows]
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
