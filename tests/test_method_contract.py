"""The method contract kit (ssl_bench.testing.check_method): every built-in method keeps the contract, and
the kit fails a method that breaks it (NaN loss, no gradient into the trained network, a result that
depends on more than the seed, state that a resume loses).

Data: a tiny hand-made LA-layout set (24×24×20 volumes); check_method's own defaults (patch 16³, n_filters 2,
2 iterations per stage); torch on one thread (this 2-core machine is shared).
"""
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_bench import method as method_mod
from ssl_bench.losses import cross_entropy
from ssl_bench.method import Stage, register, registry
from ssl_bench.testing import MethodContractError, check_method, make_tiny_la

BUILTIN = sorted(name for name, spec in registry().items() if spec.origin == "built-in")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_la(tmp_path_factory.mktemp("contract") / "LA")


def test_the_seven_methods_and_their_variants_are_all_checked():
    assert set(BUILTIN) >= {"vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf"}


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_method_keeps_the_contract(name, tiny_root, tmp_path):
    result = check_method(name, tiny_root, workdir=tmp_path)
    n_evals = sum(2 * len(cls.phases) for cls in registry()[name].stages)
    assert len(result["losses"]) == n_evals  # 2 iterations of every phase of every stage, all recorded


# -- the kit fails a method that breaks the contract ----------------------------------------------------

class _Tiny(Stage):
    """A one-convolution two-class network; subclasses break one part of the contract."""

    batch_labeled = 2
    batch_unlabeled = 0
    iterations = 2

    def networks(self):
        return {"student": nn.Conv3d(1, 2, 3, padding=1)}

    def losses(self, phase, nets, batch, it0):
        ce = cross_entropy(nets["student"](batch.labeled_image), batch.label)
        return ce + self.extra(nets, batch, it0), {"ce": ce}

    def extra(self, nets, batch, it0):
        return 0.0


class _NaNLoss(_Tiny):
    def extra(self, nets, batch, it0):
        return torch.tensor(float("nan"))


class _NoGradient(_Tiny):
    def networks(self):
        return {"student": nn.Conv3d(1, 2, 3, padding=1), "other": nn.Conv3d(1, 2, 3, padding=1)}

    def losses(self, phase, nets, batch, it0):  # the trained student's output is detached: no gradient reaches it
        ce = cross_entropy(nets["other"](batch.labeled_image) + nets["student"](batch.labeled_image).detach(),
                           batch.label)
        return ce, {"ce": ce}


class _Unseeded(_Tiny):
    def extra(self, nets, batch, it0):  # noise from a generator the run's seed does not fix
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        return 1e-3 * torch.rand((), generator=g)


class _LosesStateOnResume(_Tiny):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.seen = 0  # not in extra_state(): a resumed run starts it again from 0

    def extra(self, nets, batch, it0):
        self.seen += 1
        return 0.01 * self.seen


@pytest.fixture
def broken(monkeypatch):
    """Register a broken stand-in method for one test; the registry is restored afterwards."""
    monkeypatch.setattr(method_mod, "_REGISTRY", dict(method_mod._REGISTRY))

    def add(name, cls):
        register(name)(cls)
        return name
    return add


@pytest.mark.parametrize("cls, message", [
    (_NaNLoss, "the loss is not finite"),
    (_NoGradient, "no gradient reached the trained network 'student'"),
    (_Unseeded, "the same seed twice gives different losses"),
    (_LosesStateOnResume, "interrupted and resumed differs from uninterrupted in its losses"),
], ids=["nan-loss", "no-gradient", "unseeded", "resume-loses-state"])
def test_check_method_fails_a_broken_method(cls, message, broken, tiny_root, tmp_path):
    name = broken(f"broken-{cls.__name__.lower()}", cls)
    with pytest.raises(MethodContractError, match=message):
        check_method(name, tiny_root, workdir=tmp_path)
    assert isinstance(MethodContractError("x"), AssertionError)  # pytest shows it as a failed assertion


def test_check_method_fails_a_method_without_its_trained_network(broken):
    class NoStudent(_Tiny):
        def networks(self):
            return {"net": nn.Conv3d(1, 2, 3, padding=1)}

    name = broken("broken-nostudent", NoStudent)
    with pytest.raises(MethodContractError, match="trained network 'student' is not among its networks"):
        check_method(name)  # constructs without data: fails before any data is touched or made


def test_the_kit_leaves_the_stage_classes_as_they_were(broken, tiny_root, tmp_path):
    name = broken("tiny-ok", _Tiny)
    before = dict(vars(_Tiny))
    check_method(name, tiny_root, workdir=tmp_path)
    assert dict(vars(_Tiny)) == before
    assert "losses" in vars(_Tiny) and "optimizers" not in vars(_Tiny)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [f"{name}-again", f"{name}-first", f"{name}-resumed"]


class _Stage2Forgets(_Tiny):
    """A second stage that never loads the first stage's weights (no init_from): it trains from random ones."""


class _Stage2Loads(_Tiny):
    def init_from(self, nets, previous):
        nets["student"].load_state_dict(previous)


class _Stage2LoadsPart(_Tiny):
    def init_from(self, nets, previous):  # loads the weight but forgets the bias: not the earlier stage's network
        nets["student"].load_state_dict({**previous, "bias": torch.zeros_like(previous["bias"])})


@pytest.mark.parametrize("second, fails", [(_Stage2Forgets, True), (_Stage2LoadsPart, True), (_Stage2Loads, False)],
                         ids=["no-init-from", "part-loaded", "loads"])
def test_a_later_stage_must_start_from_the_earlier_stages_weights(second, fails, tiny_root, tmp_path, monkeypatch):
    """A two-stage method whose stage 2 forgets to load stage 1's weights is failed by the kit (issue 23); the same
    method loading them passes."""
    monkeypatch.setattr(method_mod, "_REGISTRY", dict(method_mod._REGISTRY))
    name = f"two-stage-{second.__name__.lower()}"
    register(name, _Tiny, second)
    if fails:
        with pytest.raises(MethodContractError, match=f"{second.__name__} does not start from the previous stage's "
                                                      "weights"):
            check_method(name, tiny_root, workdir=tmp_path)
    else:
        result = check_method(name, tiny_root, workdir=tmp_path)
        assert [s for s, *_ in result["losses"]] == ["_Tiny"] * 2 + ["_Stage2Loads"] * 2
    assert "init_from" not in vars(_Tiny) and "init_from" not in vars(_Stage2Forgets)  # the kit undid its wrapping
