#!/usr/bin/env python3
"""Build the data folder one GPU session stages: the first N training cases (default 16) and every test case.

    python3 scripts/stage_subset.py ../shared/data/LA /tmp/ssl-stage/LA [--train 16] [--copy]
    ../shared/tools/device-stage pack /tmp/ssl-stage/LA /tmp/ssl-stage/wheels

DEST gets train.list (the first N ids of SRC's train.list, so "8 labeled" is the same 8 cases), test.list (all
of SRC's), ``2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` as symbolic links to SRC's files (``--copy``: copies;
device-stage's ``tar -h`` follows the links either way) and SHA256SUMS.h5.txt for exactly these cases, taken
from SRC's list when it has one and checked against the files (``ssl-bench data verify --data DEST`` checks
them again). About 80 MB for LA's 16 + 20 cases. DEST must not exist yet. Standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

CASES_DIR = "2018LA_Seg_Training Set"
H5 = "mri_norm2.h5"
SUMS = "SHA256SUMS.h5.txt"


def _ids(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listed(src: Path) -> dict[str, str]:
    sums = {}
    path = src / SUMS
    if path.is_file():
        for line in path.read_text().splitlines():
            digest, _, name = line.strip().partition("  ")
            parts = [p for p in Path(name.strip()).parts if p != "."]
            if parts:
                sums[parts[0]] = digest.strip()
    return sums


def stage_subset(src, dest, n_train: int = 16, copy: bool = False) -> dict:
    src, dest = Path(src).resolve(), Path(dest)
    train, test = _ids(src / "train.list"), _ids(src / "test.list")
    if not 1 <= n_train <= len(train):
        raise SystemExit(f"stage_subset: --train must be between 1 and {len(train)}, got {n_train}")
    if dest.exists():
        raise SystemExit(f"stage_subset: {dest} already exists; remove it or choose another folder")
    listed = _listed(src)
    chosen = train[:n_train] + test
    lines, size = [], 0
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for case in chosen:
        file = src / CASES_DIR / case / H5
        if not file.is_file():
            raise SystemExit(f"stage_subset: missing file {file}")
        digest = _sha256(file)
        if case in listed and listed[case] != digest:
            raise SystemExit(f"stage_subset: {file} differs from {src / SUMS}")
        target = tmp / CASES_DIR / case / H5
        target.parent.mkdir(parents=True)
        if copy:
            shutil.copy2(file, target)
        else:
            target.symlink_to(file)
        lines.append(f"{digest}  ./{case}/{H5}\n")
        size += file.stat().st_size
    (tmp / "train.list").write_text("".join(i + "\n" for i in train[:n_train]))
    (tmp / "test.list").write_text("".join(i + "\n" for i in test))
    (tmp / SUMS).write_text("".join(lines))
    tmp.rename(dest)  # DEST appears only when complete
    return {"dest": str(dest), "train": n_train, "test": len(test), "bytes": size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="the LA data root (with train.list)")
    p.add_argument("dest", help="the folder to create (its name is the one staged: /tmp/stage/root/<name>)")
    p.add_argument("--train", type=int, default=16, help="the first N training cases (default 16)")
    p.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    a = p.parse_args(argv)
    r = stage_subset(a.src, a.dest, a.train, a.copy)
    print(f"staged folder {r['dest']}: {r['train']} training + {r['test']} test cases, {r['bytes'] / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
