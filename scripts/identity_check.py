#!/usr/bin/env python3
"""Bit-identity of a refactor: fingerprint smoke runs of every method, then compare two fingerprints.

A refactor of the loop, the run folder or the evaluator must not change one number. This script trains
every registered built-in method (and a `val` and a `literature` run, a `--teacher` run and an
interrupted-and-resumed run) with ``--profile smoke`` on the real data, re-evaluates each folder with
``ssl-bench eval``, and writes a fingerprint: the sha256 of every weight tensor of every stage file and
checkpoint, of the metrics CSVs, of summary.json and config.json without timings and provenance, and of
log.jsonl without its clock fields. Run it on the code before and after, then compare:

    PYTHONPATH=/path/to/old/checkout python scripts/identity_check.py --data ../shared/data/LA --out before.json
    python scripts/identity_check.py --data ../shared/data/LA --out after.json
    python scripts/identity_check.py --compare before.json after.json   # exit 0 only if identical

The subprocesses run in a temporary folder and import ``ssl_bench`` from ``PYTHONPATH`` first, so the old
checkout's code is what runs (the script prints where each run imported it from).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = [  # (name, extra args)
    *[(m, []) for m in ("vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf", "omf-s1", "omf-s1-orgloss",
                        "omf-s1-s2")],
    ("bcp-val", ["--method", "bcp", "--protocol", "val", "--val-cases", "2"]),
    # selection from 2000 every 200, scaled to 6 and 1 (then --selection-every 6 of the smoke profile)
    ("ssnet-literature", ["--method", "ssnet", "--protocol", "literature", "--schedule-scale", "0.003"]),
    ("uamt-scaled", ["--method", "uamt", "--schedule-scale", "0.5", "--iterations", "12"]),
]
#: log and summary fields that are clocks or hosts, not results
CLOCK = {"it_per_s", "elapsed_s", "train_s", "inference_s", "metrics_s", "s_per_case", "timings", "provenance",
         "date", "host"}


#: the subprocesses' working folder: never the repository, whose ssl_bench `python -c` would import before PYTHONPATH's
WORKDIR = tempfile.gettempdir()


def cli(*args) -> subprocess.CompletedProcess:
    code = "import sys; from ssl_bench.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=WORKDIR)


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in CLOCK}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_hashes(obj, prefix="") -> dict:
    import torch

    out = {}
    if torch.is_tensor(obj):
        out[prefix] = sha(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()) \
            if obj.numel() else "empty"
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            out.update(tensor_hashes(obj[k], f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensor_hashes(v, f"{prefix}[{i}]"))
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = repr(obj)
    return out


def fingerprint(folder: Path) -> dict:
    import torch

    fp = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if not path.is_file() or rel == ".lock":
            continue
        if path.suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = {k: v for k, v in obj.items() if k not in ("elapsed_s", "timings", "adopted_from")}
            fp[rel] = sha(json.dumps(tensor_hashes(obj), sort_keys=True).encode())
        elif path.name == "log.jsonl":
            rows = [strip(json.loads(line)) for line in path.read_text().splitlines()]
            fp[rel] = sha(json.dumps(rows, sort_keys=True).encode())
        elif path.suffix == ".json":
            obj = strip(json.loads(path.read_text()))
            if path.name == "config.json":
                obj.get("data", {}).pop("root", None)
                (obj.get("config") or {}).pop("teacher", None)
            fp[rel] = sha(json.dumps(obj, sort_keys=True).encode())
        else:
            fp[rel] = sha(path.read_bytes())
    return fp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="the LA data root")
    ap.add_argument("--out", help="write the fingerprint JSON here")
    ap.add_argument("--only", help="comma-separated run names")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    ap.add_argument("--keep", help="train into this (new) folder and keep the runs, instead of a temporary one")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        bad = 0
        for run in sorted(set(a) | set(b)):
            fa, fb = a.get(run, {}), b.get(run, {})
            for f in sorted(set(fa) | set(fb)):
                if fa.get(f) != fb.get(f):
                    bad += 1
                    print(f"DIFFERS {run}/{f}")
        n = sum(len(v) for v in a.values())
        print(f"{len(a)} runs, {n} files: {'identical' if not bad else f'{bad} differ'}")
        return 0 if not bad else 1
    if not args.data or not args.out:
        ap.error("--data and --out are needed (or --compare A B)")
    only = set(args.only.split(",")) if args.only else None
    result = {}
    with tempfile.TemporaryDirectory(prefix="ssl-identity-") as tmp:
        tmp = Path(args.keep or tmp).resolve()
        tmp.mkdir(parents=True, exist_ok=True)
        data = str(Path(args.data).resolve())
        common = ["--profile", "smoke", "--device", "cpu", "--precision", "fp32", "--data", data, "--quiet"]
        plan = list(RUNS) + [("omf-teacher", ["--method", "omf-s1-s2", "--teacher", str(tmp / "omf-s1-s2")]),
                             ("vnet-resumed", None)]
        for name, extra in plan:
            if only and name not in only:
                continue
            out = tmp / name
            if extra is None:  # interrupted at stage 1 iteration 5 (the trainer's stop_at), then --resume
                code = ("import sys; from ssl_bench.trainer import build_config, run_training\n"
                        "from ssl_bench.errors import Interrupted\n"
                        "cfg = build_config('vnet', 'smoke', device='cpu', precision='fp32')\n"
                        "try:\n    run_training(cfg, sys.argv[1], sys.argv[2], progress=False, stop_at=(1, 5))\n"
                        "except Interrupted:\n    sys.exit(0)\nsys.exit(3)")
                r = subprocess.run([sys.executable, "-c", code, str(out), data], capture_output=True, text=True,
                                   cwd=WORKDIR)
                if r.returncode == 0:
                    r = cli("run", "--method", "vnet", *common, "--out", str(out), "--resume")
            else:
                extra = extra if "--method" in extra else ["--method", name, *extra]
                r = cli("run", *extra, *common, "--out", str(out))
            if r.returncode != 0:
                print(f"{name}: run failed ({r.returncode}): {r.stderr.strip()[-400:]}", file=sys.stderr)
                return 2
            where = json.loads((out / "config.json").read_text())["provenance"]["git"]
            before = fingerprint(out)
            e = cli("eval", str(out), "--quiet", "--data", data)
            if e.returncode != 0:
                print(f"{name}: eval failed: {e.stderr.strip()[-400:]}", file=sys.stderr)
                return 2
            after = fingerprint(out)
            changed = [f for f in before if before[f] != after.get(f) and f.endswith(".csv")]
            if changed:
                print(f"{name}: eval changed {changed}", file=sys.stderr)
                return 1
            result[name] = after
            print(f"{name}: {len(after)} files (code: {where})", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
