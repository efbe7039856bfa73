"""Published LA numbers as data (docs/methods.md §5): the OMF paper's Tables 1–2 (§5.1, verified) and
each method's own paper figure where §5 has one.

Every figure is (Dice %, Jaccard %, 95HD voxels, ASD voxels), keyed by (method, labeled).
"""
from __future__ import annotations

from dataclasses import dataclass

METRICS = ("dice", "jaccard", "hd95", "asd")


@dataclass(frozen=True)
class Figure:
    dice: float
    jaccard: float
    hd95: float
    asd: float
    source: str
    note: str = ""

    def value(self, metric: str) -> float:
        return getattr(self, metric)


def _f(d, j, h, a, source, note=""):
    return Figure(d, j, h, a, source, note)


_T1 = "OMF paper Table 1"
_T2 = "OMF paper Table 2"

#: §5.1, Table 1 of the seed paper (LA; 8 L + 72 U, 16 L + 64 U; V-Net labeled only)
TABLE1 = {
    ("vnet", 8): _f(82.74, 71.72, 13.35, 3.26, _T1),
    ("vnet", 16): _f(86.03, 76.06, 14.26, 3.51, _T1),
    ("vnet", 80): _f(91.47, 84.36, 5.48, 1.51, _T1),
    ("uamt", 8): _f(87.79, 78.39, 8.68, 2.12, _T1),
    ("sassnet", 8): _f(87.54, 78.05, 9.84, 2.59, _T1),
    ("dtc", 8): _f(87.51, 78.17, 8.23, 2.36, _T1),
    ("ssnet", 8): _f(88.55, 79.62, 7.49, 1.90, _T1),
    ("bcp", 8): _f(89.62, 81.31, 6.81, 1.76, _T1),
    ("omf", 8): _f(90.23, 82.34, 5.95, 1.63, _T1),
    ("uamt", 16): _f(88.88, 80.21, 7.32, 2.26, _T1),
    ("sassnet", 16): _f(89.42, 80.98, 7.32, 2.10, _T1,
                        "copy of DTC's 16-label row; SASSNet's own figure is 89.54 / 81.24 / 8.24 / 2.20 (§3.7.6 item 10)"),
    ("dtc", 16): _f(89.42, 80.98, 7.32, 2.10, _T1),
    ("ssnet", 16): _f(89.57, 81.25, 6.99, 1.77, _T1, "third-party re-run: SS-Net never published 16 labels"),
    ("bcp", 16): _f(88.69, 79.96, 8.46, 2.09, _T1, "third-party re-run: BCP never published 16 labels"),
    ("omf", 16): _f(90.30, 82.43, 6.52, 1.65, _T1),
}

#: §5.1, Table 2 (ablation): S1 = overlay stage 1, orgloss = + loss on the original images, S2 = distillation
TABLE2 = {
    ("vnet", 8): _f(82.74, 71.72, 13.35, 3.26, _T2),
    ("omf-s1", 8): _f(87.09, 77.48, 11.47, 2.64, _T2),
    ("omf-s1-orgloss", 8): _f(88.14, 79.10, 10.50, 2.31, _T2),
    ("omf-s1-s2", 8): _f(89.98, 81.90, 6.97, 1.58, _T2),
    ("omf", 8): _f(90.23, 82.34, 5.95, 1.63, _T2),
    ("vnet", 16): _f(86.03, 76.06, 14.26, 3.51, _T2),
    ("omf-s1", 16): _f(88.07, 79.37, 8.50, 1.96, _T2),
    ("omf-s1-orgloss", 16): _f(88.59, 79.76, 9.63, 2.24, _T2),
    ("omf-s1-s2", 16): _f(89.60, 81.30, 6.78, 1.97, _T2),
    ("omf", 16): _f(90.30, 82.43, 6.52, 1.65, _T2),
}

#: §5, each method's own publication (V-Net has none of its own: its rows are other papers' re-runs)
OWN_PAPER = {
    ("uamt", 16): _f(88.88, 80.21, 7.32, 2.26, "UA-MT (MICCAI'19), via DTC README"),
    ("sassnet", 8): _f(87.32, 77.72, 9.62, 2.55, "SASSNet (MICCAI'20), via DTC README"),
    ("sassnet", 16): _f(89.54, 81.24, 8.24, 2.20, "SASSNet (MICCAI'20), via DTC README"),
    ("dtc", 8): _f(86.57, 76.55, 14.47, 3.74, "DTC (AAAI'21) [paper, unverified]"),
    ("dtc", 16): _f(89.42, 80.98, 7.32, 2.10, "DTC (AAAI'21), DTC README"),
    ("ssnet", 8): _f(88.55, 79.62, 7.49, 1.90, "SS-Net (MICCAI'22), released performance.txt"),
    ("bcp", 8): _f(89.62, 81.31, 6.81, 1.76, "BCP (CVPR'23) [paper, unverified]"),
    ("omf", 8): _f(90.23, 82.34, 5.95, 1.63, "OMF (MICCAI'24) Table 1"),
    ("omf", 16): _f(90.30, 82.43, 6.52, 1.65, "OMF (MICCAI'24) Table 1"),
}

TABLES = {"table1": TABLE1, "table2": TABLE2}

#: methods trained on labeled data only (the tables' "Unlabeled" column is 0 for them)
LABELED_ONLY = {"vnet", "omf-s1", "omf-s1-orgloss"}

#: display names as the paper prints them
DISPLAY = {"vnet": "V-Net", "uamt": "UA-MT", "sassnet": "SASSNet", "dtc": "DTC", "ssnet": "SS-Net", "bcp": "BCP",
           "omf": "OMF", "omf-s1": "S1", "omf-s1-orgloss": "S1+orgloss", "omf-s1-s2": "S1+S2"}


def paper_figure(table: str | None, method: str, labeled: int) -> Figure | None:
    if table is None:
        return None
    return TABLES[table].get((method, labeled))


def own_figure(method: str, labeled: int) -> Figure | None:
    return OWN_PAPER.get((method, labeled))


def display_name(method: str, table: str | None = None) -> str:
    if table == "table2" and method == "omf":
        return "S1+orgloss+S2 (OMF)"
    return DISPLAY.get(method, method)
