"""An imported data set's own run settings (torch-free: the report reads them from run folders)."""
from __future__ import annotations

from .errors import UserError


def run_defaults_from(settings: dict | None, where) -> dict:
    """RunConfig fields from a data set's settings (``ssl_bench_dataset.json``, or a run's recorded
    ``data.imported``): patch, sliding-window strides and distance units; {} for None (the LA release)."""
    settings = settings or {}
    out = {}
    try:
        if "patch" in settings:
            out["patch"] = tuple(int(v) for v in settings["patch"])
        for key in ("eval_stride_xy", "eval_stride_z"):
            if key in settings:
                out[key] = int(settings[key])
        if "units" in settings:
            if settings["units"] not in ("voxel", "mm"):
                raise ValueError(settings["units"])
            out["units"] = settings["units"]
    except (TypeError, ValueError):
        raise UserError(f"{where}: invalid data-set settings {settings}; re-import the data set") from None
    return out
