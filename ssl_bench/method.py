"""The Method interface and the registry.

A registered method is a sequence of stages (most methods have one). A stage declares its networks,
its batch composition and schedule defaults, and what one iteration computes (its losses). It owns
nothing of the loop: the one trainer (``ssl_bench.trainer``) draws batches, runs backward and the
optimiser steps, sets learning rates, checkpoints, selects and evaluates.

Iteration conventions handed to a stage:
- ``it0`` in :meth:`Stage.losses` is the number of completed iterations (0-based, before the
  increment) — what the reference scripts call ``iter_num`` when they compute ramps.
- ``done`` in :meth:`Stage.lr` is the number of completed iterations (1-based after a step); the
  returned value is the learning rate for the next step.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from .errors import UserError
from .plugins import PluginError
from .networks import VNet

#: The public API that method code (``methods/`` and plugins) may use; a later rename keeps the old name
#: working (README "Your method beside the seven"). Batch fields: ``labeled_image``, ``label``,
#: ``unlabeled_image`` (ssl_bench.data.Batch); helpers: ``ssl_bench.losses``, ``ssl_bench.mixing``.
__all__ = ["Stage", "StageContext", "register", "registry", "get_method", "MethodSpec", "MethodClash",
           "scale_iterations"]


@dataclass(frozen=True)
class StageContext:
    """What a stage may know about the run it is part of, fixed before training starts."""

    labeled: int
    patch: tuple[int, int, int]
    n_filters: int = 16
    iterations: int | None = None  # the run's per-stage override (--iterations); None: each stage's own default
    options: dict = field(default_factory=dict)
    #: the run's schedule scale s (docs/methods.md Decision 10 and "The CPU track"): every constant a stage counts in
    #: iterations (its length, lr steps, ramps, selection) is ``Stage.scaled(n)`` = round(n·s); 1.0 is the paper
    schedule_scale: float = 1.0


def scale_iterations(n: int, scale: float) -> int:
    """An iteration-counted constant ``n`` under schedule scale ``scale``: round(n·s), at least 1; exactly ``n`` at 1.0."""
    if scale == 1.0:
        return int(n)
    return max(1, int(round(n * scale)))


class MethodClash(PluginError, ValueError):
    """A method name that is already registered (a ValueError too, as before plugins existed)."""


class Stage(ABC):
    """One training stage. Subclasses set the class attributes and implement :meth:`networks` and :meth:`losses`."""

    iterations: ClassVar[int] = 6000
    batch_labeled: ClassVar[int] = 2
    batch_unlabeled: ClassVar[int] = 2
    base_lr: ClassVar[float] = 0.01
    #: optimiser phases run in order each iteration; each has its own optimiser (see :meth:`optimizers`)
    phases: ClassVar[tuple[str, ...]] = ("main",)
    #: the network that is trained by the "main" phase, evaluated, and handed to a following stage
    trained: ClassVar[str] = "student"
    #: largest-connected-component post-processing in the method's own test script (§2.2)
    paper_lcc: ClassVar[bool] = False
    #: reference best-on-test selection: (first iteration, every) or None when the reference uses the last
    literature_selection: ClassVar[tuple[int, int] | None] = None
    #: names of the method's options (``--option KEY=VALUE``); any other key is refused
    known_options: ClassVar[tuple[str, ...]] = ()
    #: the plain shuffled DataLoader of the labeled-only baseline keeps a final short batch
    keep_last_batch: ClassVar[bool] = False

    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    # -- what the method declares ------------------------------------------------------------
    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """The stage's networks by name; ``trained`` names the one the main optimiser updates."""

    @abstractmethod
    def losses(self, phase: str, nets: dict[str, nn.Module], batch, it0: int) -> tuple[torch.Tensor, dict]:
        """The loss to minimise in ``phase`` and a dict of floats/tensors to log."""

    def optimizers(self, nets: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """SGD, momentum 0.9, weight decay 1e-4 on the trained network (§1.8)."""
        return {"main": torch.optim.SGD(nets[self.trained].parameters(), lr=self.base_lr,
                                        momentum=0.9, weight_decay=1e-4)}

    def scaled(self, n: int) -> int:
        """A constant counted in iterations (a stage length, an lr step, a ramp unit, a selection point) under
        the run's schedule scale (:func:`scale_iterations`); ``n`` itself at scale 1.0 (the paper)."""
        return scale_iterations(n, self.ctx.schedule_scale)

    def run_iterations(self) -> int:
        """The iterations this stage runs: the run's ``--iterations`` override, else its scaled default."""
        return int(self.ctx.iterations if self.ctx.iterations is not None else self.scaled(self.iterations))

    def lr(self, done: int) -> float:
        """Step schedule (§1.8): ×0.1 after every 2500 (scaled) completed iterations."""
        return self.base_lr * 0.1 ** (done // self.scaled(2500))

    def host_targets(self, batch) -> dict:
        """Per-batch targets computed on the host from the batch, before :meth:`losses` (optional; none by default).

        The trainer computes them in a background thread while the previous iteration trains (issue 10:
        e.g. DTC's and SASSNet's signed-distance targets) and attaches them to the batch as
        ``batch.host_targets``. They must be a pure function of the batch: no random draws, no networks, no
        stage state. :meth:`losses` must still compute a target itself when ``batch.host_targets`` lacks it
        (a batch built by hand, a caller that bypasses the trainer), so the numbers are the same either way.
        """
        return {}

    def after_step(self, nets: dict[str, nn.Module], it0: int) -> None:
        """Runs after every optimiser phase of iteration ``it0`` (e.g. an EMA update)."""

    def train_modes(self, nets: dict[str, nn.Module]) -> None:
        """Put networks in their training modes (teachers of these codebases stay in train mode)."""
        for net in nets.values():
            net.train()

    def extra_state(self):
        """State outside networks and optimisers that --resume must restore (none by default)."""
        return None

    def load_extra_state(self, state) -> None:
        """Restore what :meth:`extra_state` returned."""

    def init_from(self, nets: dict[str, nn.Module], previous: dict[str, torch.Tensor]) -> None:
        """Initialise from the previous stage's handed-over weights (multi-stage methods)."""

    def foreground_probability(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, X, Y, Z) foreground probability of the evaluated network, used by the sliding window (§2.1)."""
        out = net(x)
        if isinstance(out, tuple):
            out = out[0]
        return torch.softmax(out.float(), dim=1)[:, 1]

    # -- helpers shared by the methods -------------------------------------------------------
    def vnet(self, **kwargs) -> VNet:
        return VNet(n_filters=self.ctx.n_filters, **kwargs)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stages: tuple[type[Stage], ...]
    summary: str
    #: "built-in", or where a plugin method came from ("plugin <package> <version>", "SSL_BENCH_PLUGINS module m")
    origin: str = "built-in"

    def with_origin(self, origin: str) -> "MethodSpec":
        return MethodSpec(self.name, self.stages, self.summary, origin)


_REGISTRY: dict[str, MethodSpec] = {}

#: a method name: letters, digits and ``- _ . +``, starting with a letter or digit (it becomes a folder name)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _origin_of(stages: tuple[type[Stage], ...]) -> str:
    from .plugins import BUILTIN, current_origin

    origin = current_origin()
    if origin is not None:
        return origin
    module = stages[-1].__module__
    return BUILTIN if module.split(".")[0] in ("methods", "ssl_bench") else f"module {module}"


def register(name: str, *stages: type[Stage], summary: str = "") -> Callable:
    """Register a method. As a class decorator: ``@register("vnet")`` registers a one-stage method.

    With explicit stages, ``register("omf", Stage1, Stage2)`` registers a multi-stage method.
    A name that is already registered is refused (:class:`MethodClash`, one line naming both sides).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PluginError(f"cannot register method {name!r}: a name is letters, digits and - _ . + "
                          "(it becomes part of a run folder's name)")

    def _add(spec_stages: tuple[type[Stage], ...]) -> None:
        bad = [s for s in spec_stages if not (isinstance(s, type) and issubclass(s, Stage))]
        if bad:
            raise PluginError(f"cannot register method {name!r}: {bad[0]!r} is not a subclass of ssl_bench.method.Stage")
        origin = _origin_of(spec_stages)
        if name in _REGISTRY:
            raise MethodClash(f"method {name!r} ({origin}) clashes with the registered method {name!r} "
                              f"({_REGISTRY[name].origin}); choose another name")
        doc = summary or ((spec_stages[-1].__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = MethodSpec(name, spec_stages, doc, origin)

    if stages:
        _add(tuple(stages))
        return lambda cls: cls

    def decorator(cls: type[Stage]) -> type[Stage]:
        _add((cls,))
        return cls
    return decorator


def _require_builtin_package(module) -> None:
    """The name ``methods`` must be the project's own package: a user's ``methods.py`` (or folder) found first on
    sys.path would otherwise replace all seven built-in methods without a word."""
    from pathlib import Path

    builtin = (Path(__file__).resolve().parents[1] / "methods").resolve()
    found = Path(getattr(module, "__file__", "") or "").resolve()
    if found.parent != builtin:
        raise PluginError(f"the module 'methods' was imported from {found}, not from ssl-bench's built-in methods "
                          f"({builtin}): rename your methods.py (or run from another folder) so it cannot hide them")


def registry() -> dict[str, MethodSpec]:
    """Every registered method: the built-in ones (package ``methods``), then the plugins (entry points in
    the group ``ssl_bench.methods``, then the modules named in ``SSL_BENCH_PLUGINS``). An import error is an
    error (:class:`ssl_bench.plugins.PluginError`, a :class:`UserError`), never swallowed."""
    import methods  # noqa: F401  (imports every method module; an import error is an error, never swallowed)
    from .plugins import load_plugins

    _require_builtin_package(methods)

    load_plugins(_REGISTRY)
    return dict(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    reg = registry()
    if name not in reg:
        raise UserError(f"unknown method {name!r}; registered: {', '.join(sorted(reg))}")
    return reg[name]
