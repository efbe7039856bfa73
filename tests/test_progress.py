"""Long work shows progress (count, rate, ETA) on stderr, and `--quiet` silences it: the line itself, and each
command that has the option (run, eval, occlusion)."""
import io
import re

import pytest

from ssl_bench.cli import main
from ssl_bench.progress import Progress

#: one progress line as `Progress` writes it: label, done/total unit, rate, ETA
LINE = re.compile(r"^(?P<label>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \| (?P<rate>[\d.]+) (?P=unit)/s \| "
                  r"ETA (?P<eta>\S+)")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_line_holds_the_count_the_rate_and_the_eta():
    out = io.StringIO()
    bar = Progress(10, "vnet", stream=out, every_s=0.0)
    for done in (1, 4, 10):
        bar.update(done, extra="loss 0.5")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m["done"], m["total"], m["unit"], m["label"]) for m in parsed] == [
        ("1", "10", "it", "vnet"), ("4", "10", "it", "vnet"), ("10", "10", "it", "vnet")]
    assert all(float(m["rate"]) > 0 for m in parsed) and parsed[-1]["eta"] == "0m00s"
    assert all(line.endswith("| loss 0.5") for line in lines)


def test_off_a_terminal_a_line_is_written_at_most_every_interval_and_always_at_the_end():
    out = io.StringIO()
    bar = Progress(100, "eval", stream=out, every_s=3600.0, unit="case")
    for done in range(1, 101):
        bar.update(done)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert LINE.match(out.getvalue())["done"] == "100" and LINE.match(out.getvalue())["unit"] == "case"


def test_a_resumed_bar_counts_its_rate_from_where_it_started():
    out = io.StringIO()
    bar = Progress(50, "x", stream=out, every_s=0.0, start=40)
    bar.update(41)
    assert LINE.match(out.getvalue())["done"] == "41"
    assert bar.rate > 0 and bar.done == 41


def test_on_a_terminal_the_line_is_redrawn_in_place():
    tty = _Tty()
    bar = Progress(3, "x", stream=tty, every_s=3600.0)
    for done in (1, 2, 3):
        bar.update(done)
    bar.close()
    text = tty.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1  # every update, one line


def test_disabled_writes_nothing_but_still_counts():
    out = io.StringIO()
    bar = Progress(5, "x", stream=out, enabled=False, every_s=0.0)
    bar.update(5)
    bar.close()
    assert out.getvalue() == "" and bar.done == 5


def _progress_lines(err: str) -> list[re.Match]:
    return [m for m in map(LINE.match, err.splitlines()) if m]


@pytest.fixture(scope="module")
def demo_run(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "vnet"
    assert main(["run", "--method", "vnet", "--profile", "smoke", "--labeled", "4", "--iterations", "6",
                 "--eval-cases", "2", "--data", str(demo_root), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("quiet", [False, True])
def test_run_shows_training_and_evaluation_progress_unless_quiet(demo_root, tmp_path, capsys, quiet):
    args = ["run", "--method", "vnet", "--profile", "smoke", "--labeled", "4", "--iterations", "6",
            "--eval-cases", "2", "--data", str(demo_root), "--out", str(tmp_path / "r")]
    assert main(args + (["--quiet"] if quiet else [])) == 0
    lines = _progress_lines(capsys.readouterr().err)
    if quiet:
        assert lines == []
    else:
        assert ("6", "6", "it") in [(m["done"], m["total"], m["unit"]) for m in lines]  # training, to the end
        assert any(m["unit"] == "case" and m["done"] == m["total"] for m in lines)  # the test-set evaluation


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_shows_progress_unless_quiet(demo_run, capsys, quiet):
    capsys.readouterr()
    assert main(["eval", str(demo_run)] + (["--quiet"] if quiet else [])) == 0
    lines = _progress_lines(capsys.readouterr().err)
    assert (lines == []) if quiet else [(m["done"], m["total"], m["unit"]) for m in lines][-1:] == [("2", "2", "case")]


@pytest.mark.parametrize("quiet", [False, True])
def test_occlusion_shows_progress_unless_quiet(demo_run, demo_root, tmp_path, capsys, quiet):
    capsys.readouterr()
    assert main(["occlusion", str(demo_run), "--data", str(demo_root), "--ratios", "0,0.5", "--repeats", "1",
                 "--no-panel", "--out", str(tmp_path / "occ")] + (["--quiet"] if quiet else [])) == 0
    lines = _progress_lines(capsys.readouterr().err)
    if quiet:
        assert lines == []
    else:
        last = lines[-1]
        assert last["label"] == "occlusion" and last["unit"] == "case" and last["done"] == last["total"]
