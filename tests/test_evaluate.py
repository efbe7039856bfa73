import numpy as np
import pytest
import torch

from ssl_bench.evaluate import EvalSettings, _windows, evaluate_cases, sliding_window, summarize, window_starts
from ssl_bench.networks import VNet


def test_window_counts_match_the_reference_example():
    # §2.1: (183, 140, 88) gives 5 × 3 × 3 = 45 windows, the last one flush with the border
    assert window_starts(183, 112, 18) == [0, 18, 36, 54, 71]
    assert window_starts(140, 112, 18) == [0, 18, 28]
    assert window_starts(88, 80, 4) == [0, 4, 8]
    assert len(_windows((183, 140, 88), EvalSettings())) == 45
    assert window_starts(112, 112, 18) == [0]


def _prob_fn(net, x):
    return torch.softmax(net(x), dim=1)[:, 1]


def test_fast_and_reference_style_paths_agree_and_padding_crops_back():
    torch.manual_seed(0)
    net = VNet(n_filters=2).eval()
    image = np.random.default_rng(0).standard_normal((40, 30, 20)).astype(np.float32)  # smaller than the patch in y
    s = EvalSettings(patch=(32, 32, 16), stride_xy=5, stride_z=3, window_batch=3)
    fast = sliding_window(_prob_fn, net, image, s, torch.device("cpu"))
    ref = sliding_window(_prob_fn, net, image, s, torch.device("cpu"), reference_style=True)
    assert fast.shape == image.shape == ref.shape
    assert np.abs(fast - ref).max() < 1e-5


class _Oracle(torch.nn.Module):
    """Predicts foreground where the input is above a threshold: a known-answer network."""

    def forward(self, x):
        fg = (x > 0.5).float()
        return torch.cat([1 - fg, fg], dim=1) * 20 - 10


class _Data:
    def __init__(self, cases):
        self.cases = cases

    def load(self, case_id):
        return self.cases[case_id]


def test_perfect_prediction_scores_perfectly_and_empty_prediction_is_penalised():
    lab = np.zeros((40, 36, 20), np.uint8)
    lab[10:20, 8:22, 5:15] = 1
    lab[30:33, 30:33, 2:4] = 1  # a second blob: LCC removes it
    img = lab.astype(np.float32)
    data = _Data({"a": (img, lab), "empty": (np.zeros_like(img), lab)})
    s = EvalSettings(patch=(32, 32, 16), stride_xy=8, stride_z=4)
    rows, _ = evaluate_cases(_prob_fn, _Oracle(), data, ["a", "empty"], s, torch.device("cpu"), progress=False)
    by = {(r["case"], r["post"]): r for r in rows}
    assert by[("a", "raw")]["dice"] == 1.0 and by[("a", "raw")]["hd95"] == 0.0
    assert by[("a", "lcc")]["dice"] < 1.0  # the small blob is gone after LCC
    e = by[("empty", "raw")]
    assert e["empty"] and e["dice"] == 0.0 and e["hd95"] == pytest.approx(np.sqrt(40**2 + 36**2 + 20**2))
    summ = summarize(rows)
    assert summ["raw"]["n_empty"] == 1 and summ["raw"]["dice"] == pytest.approx(0.5)
    zero = EvalSettings(patch=(32, 32, 16), stride_xy=8, stride_z=4, empty_policy="zero")
    rows, _ = evaluate_cases(_prob_fn, _Oracle(), data, ["empty"], zero, torch.device("cpu"), progress=False)
    assert rows[0]["hd95"] == 0.0 and rows[0]["asd"] == 0.0  # the reference repositories' convention


def test_occlusion_hook_is_applied_before_inference():
    lab = np.zeros((40, 36, 20), np.uint8)
    lab[10:20, 8:22, 5:15] = 1
    data = _Data({"a": (lab.astype(np.float32), lab)})
    s = EvalSettings(patch=(32, 32, 16), stride_xy=8, stride_z=4)
    rows, _ = evaluate_cases(_prob_fn, _Oracle(), data, ["a"], s, torch.device("cpu"), progress=False,
                             image_fn=lambda cid, im: np.where(np.arange(40)[:, None, None] < 15, 0, im))
    assert rows[0]["dice"] == pytest.approx(2 * 5 / (10 + 5))


def test_summary_is_the_mean_and_population_std_over_cases_with_empty_count():
    # hand-computed: dice 0.9, 0.7, 0.0 -> mean 0.5333…, population std sqrt(((.3667)²+(.1667)²+(.5333)²)/3)
    rows = []
    for case, (d, h, empty) in zip("abc", [(0.9, 2.0, False), (0.7, 4.0, False), (0.0, 10.0, True)]):
        for post in ("raw", "lcc"):
            rows.append({"case": case, "post": post, "dice": d, "jaccard": d / 2, "hd95": h, "asd": h / 2,
                         "empty": empty})
    s = summarize(rows)
    mean = (0.9 + 0.7 + 0.0) / 3
    pop_std = (((0.9 - mean) ** 2 + (0.7 - mean) ** 2 + (0.0 - mean) ** 2) / 3) ** 0.5
    for post in ("raw", "lcc"):
        assert s[post]["n_cases"] == 3 and s[post]["n_empty"] == 1
        assert abs(s[post]["dice"] - mean) < 1e-12
        assert abs(s[post]["dice_std"] - pop_std) < 1e-12
        assert abs(s[post]["hd95"] - 16.0 / 3) < 1e-12
        assert abs(s[post]["asd_std"] - ((((1 - 8 / 3) ** 2 + (2 - 8 / 3) ** 2 + (5 - 8 / 3) ** 2) / 3) ** 0.5)) < 1e-12


def test_the_progress_bar_counts_cases_not_windows(monkeypatch):
    """Three cases of many windows each: the bar is told 1, 2, 3 of 3 (the loop index was overwritten by the
    window count, issue 23)."""
    import ssl_bench.evaluate as ev

    told = []

    class Recorded(ev.Progress):
        def __init__(self, total, label, **kwargs):
            super().__init__(total, label, **{**kwargs, "enabled": False})
            told.append(("total", total, kwargs.get("unit")))

        def update(self, done, extra=""):
            told.append(("done", done))
            super().update(done, extra)

    monkeypatch.setattr(ev, "Progress", Recorded)
    lab = np.zeros((40, 36, 20), np.uint8)
    lab[10:20, 8:22, 5:15] = 1
    data = _Data({c: (lab.astype(np.float32), lab) for c in "abc"})
    s = EvalSettings(patch=(32, 32, 16), stride_xy=4, stride_z=2)
    assert ev.window_counts(lab.shape, s, torch.device("cpu"))[0] > 3  # a window count would show
    for dice_only in (False, True):
        told.clear()
        _, timing = evaluate_cases(_prob_fn, _Oracle(), data, ["a", "b", "c"], s, torch.device("cpu"),
                                   dice_only=dice_only)
        assert told == [("total", 3, "case"), ("done", 1), ("done", 2), ("done", 3)]
        assert timing["windows"] == 3 * ev.window_counts(lab.shape, s, torch.device("cpu"))[0]
