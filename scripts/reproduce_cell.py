#!/usr/bin/env python3
"""Re-train a committed run record from its config.json and compare: the same seed on CPU gives identical numbers.

    python scripts/reproduce_cell.py results/cpu/runs/vnet-L8-s1337-val-cpu-fp32 --data data/LA-z05 [--out DIR] [--save]

Run it with the code of the commit the record names (config.json "provenance"): from a checkout of that commit, or
this script with `PYTHONPATH=<a worktree at that commit>`. It says which commit the record names and which one it
runs. It trains the run again with the recorded settings into DIR (default: a temporary folder), then compares
log.jsonl (all but the timing fields; a resumed record's extra row at each resume, see compare) and every
metrics_per_case*.csv byte for byte.

A record that reused another run's stage 1 (`run --teacher`) is re-trained from that run's stage 1: the recorded
teacher folder, or --teacher (its weights are not committed: they must be on this machine).

--save writes the outcome, the re-run's wall and CPU time and the load average before and after it to
<the record's runs folder>/_reproductions/<run>.json (atomically), which `ssl-bench report` reads: its "Measured
time" section sets a re-run's minutes beside the record's own. Re-run with nothing else on the machine for a
timing that measures the run alone.

Exit 0 when everything is identical, 1 when anything differs (the first difference is printed), 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

TIMING = ("it_per_s", "elapsed_s")
REPRODUCTIONS = "_reproductions"


def _log(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in path.read_text().splitlines() if line.strip()]


def _cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def compare(record: Path, again: Path) -> tuple[str | None, int, list[str], list[list[int]]]:
    """(the first difference or None, log lines compared, metrics files compared, the record's resume rows).

    A record that was interrupted and resumed logged one more row, the first iteration after each resume (the
    loop logs `start + 1`); an uninterrupted re-run has no such row. Those rows (off the log_every grid, inside a
    stage the re-run went past) are the only ones the record may have beyond the re-run's, and they are returned
    (as [stage, iteration]); every other row must be equal in all but the timing fields, in the same order."""
    a, b = _log(record / "log.jsonl"), _log(again / "log.jsonl")
    csvs = sorted(p.name for p in record.glob("metrics_per_case*.csv"))
    every = int(json.loads((record / "config.json").read_text())["config"].get("log_every") or 1)
    rerun_keys = {(r.get("stage"), r.get("iteration")) for r in b}
    last = {}
    for r in b:
        last[r.get("stage")] = max(last.get(r.get("stage"), 0), r.get("iteration", 0))

    def resume_row(r) -> bool:  # not logged by the re-run, off the log grid, inside the stage the re-run went past
        stage, it = r.get("stage"), r.get("iteration")
        return (stage, it) not in rerun_keys and isinstance(it, int) and it % every != 0 and it < last.get(stage, 0)

    resumed = [[r.get("stage"), r.get("iteration")] for r in a if resume_row(r)]
    kept = [(n, r) for n, r in enumerate(a, 1) if not resume_row(r)]
    if [r for _, r in kept] != b:
        first = next((i for i, ((_, x), y) in enumerate(zip(kept, b)) if x != y), min(len(kept), len(b)))
        line = kept[first][0] if first < len(kept) else len(a) + 1
        return f"log.jsonl differs at line {line}", len(a), csvs, resumed
    for csv in csvs:
        if not (again / csv).is_file() or (record / csv).read_bytes() != (again / csv).read_bytes():
            return f"{csv} differs", len(a), csvs, resumed
    return None, len(a), csvs, resumed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path)
    ap.add_argument("--data", required=True, help="the data the record was trained on (its sha256 are checked)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--teacher", type=Path, default=None,
                    help="the run folder whose stage 1 the record reused (default: the recorded one)")
    ap.add_argument("--save", action="store_true",
                    help=f"write the outcome and the re-run's timings to <runs folder>/{REPRODUCTIONS}/<run>.json")
    args = ap.parse_args(argv)

    from ssl_bench.errors import UserError
    from ssl_bench.runs import atomic_write_json, provenance
    from ssl_bench.trainer import RunConfig, run_training

    try:
        config = json.loads((args.record / "config.json").read_text())
        cfg = RunConfig.from_json(config["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{args.record}: not a run record ({exc})", file=sys.stderr)
        return 2
    if cfg.teacher or args.teacher:
        teacher = args.teacher or Path(cfg.teacher)
        if not (teacher / "stages" / "stage1.pt").is_file():
            print(f"{args.record.name} re-trains from the stage 1 of {teacher}, whose weights are not here: "
                  "re-run that record first, or give --teacher", file=sys.stderr)
            return 2
        cfg = replace(cfg, teacher=str(teacher))
    recorded, now = config["provenance"].get("git"), provenance().get("git")
    print(f"record made at {recorded}; reproducing at {now}")
    out = args.out or Path(tempfile.mkdtemp(prefix="reproduce-")) / args.record.name
    load_before, cpu0, t0 = os.getloadavg(), _cpu_seconds(), time.perf_counter()
    try:
        summary = run_training(cfg, out, args.data, progress=False)
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    wall, cpu, load_after = time.perf_counter() - t0, _cpu_seconds() - cpu0, os.getloadavg()
    difference, n_lines, csvs, resumed = compare(args.record, out)
    if args.save:
        import torch
        atomic_write_json(args.record.parent / REPRODUCTIONS / f"{args.record.name}.json", {
            "run": args.record.name, "record_git": recorded, "reproduced_git": now, "identical": difference is None,
            "difference": difference, "log_lines": n_lines, "resume_rows": resumed, "metrics_files": csvs,
            "teacher": cfg.teacher, "timings": summary.get("timings", {}), "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
            "host": provenance().get("host"), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    if difference is not None:
        print(difference, file=sys.stderr)
        return 1
    beyond = f" (and {len(resumed)} row(s) the record logged on resuming: {resumed})" if resumed else ""
    print(f"identical: {n_lines - len(resumed)} log lines{beyond} and every per-case metrics file ({out}); "
          f"{wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
