"""`ssl-bench curves` reads a run folder's log and config through RunFolder (ssl_bench/curves.py): stage offsets from
the recorded stage lengths, and one line naming the file for a damaged record."""
import json

import pytest

from ssl_bench.cli import main
from ssl_bench.curves import load_curves
from ssl_bench.errors import UserError


def _run(tmp_path, iterations=(10, 20), log_rows=None):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"config": {}, "method": {"stages": [{"iterations": n} for n in iterations]}}))
    rows = log_rows or [{"stage": 1, "iteration": 5, "loss": 1.0}, {"stage": 2, "iteration": 5, "loss": 0.5,
                                                                     "val_dice_raw": 0.4}]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_stage_two_is_drawn_after_stage_ones_recorded_length(tmp_path):
    c = load_curves(_run(tmp_path))
    # config.json's stage list gives stage 1 ten iterations: stage 2's iteration 5 is drawn at 15
    assert c["series"]["loss"] == ([5, 15], [1.0, 0.5]) and c["series"]["val_dice_raw"] == ([15], [0.4])
    assert c["boundaries"] == [10]


def test_a_damaged_stage_length_is_one_line_naming_the_config(tmp_path, capsys):
    d = _run(tmp_path, iterations=("ten", 20))
    assert main(["curves", str(d), "--out", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(d / "config.json") in err[0] and "damaged" in err[0]
    assert not list(tmp_path.glob("fig*"))


def test_a_folder_without_a_log_is_refused(tmp_path):
    d = _run(tmp_path)
    (d / "log.jsonl").unlink()
    with pytest.raises(UserError, match="has no log.jsonl"):
        load_curves(d)
