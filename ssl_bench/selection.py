"""Which checkpoint a protocol selects, on which cases, and how the trainer labels and logs it.

- ``honest``: no selection; the last weights of every stage (docs/methods.md Decision 2).
- ``literature``: best-on-TEST where the reference does it (``Stage.literature_selection``: first
  iteration, interval), in the stages that do it (§2.4).
- ``val``: best on the validation cases (the last K of train.list, ``Split.val``), every
  ``selection_every`` iterations (default 200, the references' interval), for every method and in every
  stage (Decision 8). The test set is not read before training ends.

Both selecting protocols keep the running best as ``round(dice, 4)`` and replace it only with a strictly
greater score (Decision 9), and a multi-stage method hands the selected weights on to its next stage.
"""
from __future__ import annotations

DEFAULT_VAL_CASES = 8  # Decision 8
DEFAULT_EVERY = 200  # the references' selection interval (§2.4)

#: log.jsonl key of the selection Dice (raw, no LCC) per protocol
LOG_KEY = {"literature": "test_dice_raw", "val": "val_dice_raw"}
#: the ``selection`` label of a selected stage file / summary checkpoint
LABEL = {"literature": "best-on-test", "val": "best-on-val"}
#: the key under which a stage file and summary.json hold the running best ({"dice", "iteration"})
BEST_KEY = {"literature": "best_on_test", "val": "best_on_val"}


def rule(protocol: str, literature_selection: tuple[int, int] | None) -> tuple[int, int] | None:
    """(first iteration, reference interval) of a stage's selection under ``protocol``, or None (the last weights)."""
    if protocol == "literature":
        return literature_selection
    if protocol == "val":
        return (0, DEFAULT_EVERY)  # every stage of every method, from the first interval on
    return None


def no_selection_note(protocol: str, selection: tuple[int, int], every: int, iterations: int) -> str:
    """Why a selecting protocol handed on the last weights: no selection point fell inside the stage."""
    if protocol == "val":
        return (f"val selection every {every} iterations; this stage's {iterations} iterations reach none, so the "
                "last weights were used")
    return (f"literature selection starts at iteration {selection[0]}, beyond this stage's {iterations}; "
            "the last weights were used")


class Selector:
    """The running best of a stage under a selecting protocol (Decision 9), and when to score.

    ``rule``: (first iteration, interval) of :func:`rule` after scaling, or None (``honest``: never
    scores); ``every``: the interval used. The best is kept as ``round(dice, 4)`` and replaced only by a
    strictly greater score, as the SS-Net/BCP/OMF scripts keep it.
    """

    def __init__(self, protocol: str, rule: tuple[int, int] | None, every: int, best: dict | None = None):
        self.protocol, self.rule, self.every = protocol, rule, every
        self.log_key, self.label = LOG_KEY.get(protocol), LABEL.get(protocol)
        self.best_key = BEST_KEY.get(protocol, "best_on_test")
        self.best = best if best is not None else {"dice": None, "iteration": None}

    def due(self, done: int) -> bool:
        return bool(self.rule) and done >= self.rule[0] and done % self.every == 0

    def offer(self, dice: float, done: int) -> bool:
        """Score ``dice`` at iteration ``done``; True when it is the new best (its weights are to be kept)."""
        best = self.best
        if best["dice"] is None or dice > best["dice"]:
            self.best = {"dice": round(dice, 4), "iteration": done}
            return True
        return False

    @property
    def selected(self) -> bool:
        """A selection point fell inside the stage: the best weights are handed on, not the last."""
        return bool(self.rule) and self.best["iteration"] is not None

    def note(self, iterations: int) -> str:
        return no_selection_note(self.protocol, self.rule, self.every, iterations)
