#!/usr/bin/env python3
"""Re-train a committed run record from its config.json and compare: the same seed on CPU gives identical numbers.

    python scripts/reproduce_cell.py results/cpu/runs/vnet-L8-s1337-val-cpu-fp32 --data data/LA-z05 [--out DIR]

Run it from a checkout of the commit the record names (config.json "provenance"); it says which commit that is
and which one it runs. It trains the run again with the recorded settings into DIR (default: a temporary
folder), then compares log.jsonl (all but the timing fields) and every metrics_per_case*.csv byte for byte.
Exit 0 when everything is identical, 1 when anything differs (the first difference is printed).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TIMING = ("it_per_s", "elapsed_s")


def _log(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path)
    ap.add_argument("--data", required=True, help="the data the record was trained on (its sha256 are checked)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from ssl_bench.runs import provenance
    from ssl_bench.trainer import RunConfig, run_training

    config = json.loads((args.record / "config.json").read_text())
    cfg = RunConfig.from_json(config["config"])
    if cfg.teacher:
        print("a record that reused another run's stage 1 (--teacher): reproduce that run first", file=sys.stderr)
        return 2
    recorded, now = config["provenance"].get("git"), provenance().get("git")
    print(f"record made at {recorded}; reproducing at {now}")
    out = args.out or Path(tempfile.mkdtemp(prefix="reproduce-")) / args.record.name
    run_training(cfg, out, args.data, progress=False)
    a, b = _log(args.record / "log.jsonl"), _log(out / "log.jsonl")
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"log.jsonl differs at line {first + 1}", file=sys.stderr)
        return 1
    for csv in sorted(p.name for p in args.record.glob("metrics_per_case*.csv")):
        if (args.record / csv).read_bytes() != (out / csv).read_bytes():
            print(f"{csv} differs", file=sys.stderr)
            return 1
    print(f"identical: {len(a)} log lines and every per-case metrics file ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
