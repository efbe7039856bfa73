"""The CUDA fast path's numerics, emulated on CPU: one step of every method under bf16 autocast
with channels_last_3d networks and inputs must run and give finite float32 losses."""
import pytest
import torch

from ssl_bench.data import LAData
from ssl_bench.method import registry
from ssl_bench.trainer import Trainer, build_config

METHODS = ["vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf"]


def test_every_paper_method_is_covered():
    assert set(METHODS) <= set(registry())


@pytest.mark.parametrize("method", METHODS)
def test_one_step_under_bf16_autocast_and_channels_last(method, demo_root, tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = build_config(method, "smoke", labeled=4, device="cpu")
    trainer = Trainer(cfg, tmp_path, LAData(demo_root), progress=False)
    monkeypatch.setattr(trainer, "_autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for k in range(len(trainer.stages)):
        stage, nets = trainer.build_stage(k, previous=None)
        for net in nets.values():
            net.to(memory_format=torch.channels_last_3d)
        opts = stage.optimizers(nets)
        before = {n: p.detach().clone() for n, p in nets[stage.trained].named_parameters()}
        batch = trainer.make_stream(k, stage).next()
        batch.image = batch.image.contiguous(memory_format=torch.channels_last_3d)
        logs = trainer.train_step(stage, nets, opts, batch, it0=0)
        assert logs["loss"].dtype == torch.float32 and torch.isfinite(logs["loss"])
        for name, value in logs.items():
            if torch.is_tensor(value):
                assert torch.isfinite(value).all(), (method, k, name)
        moved = [n for n, p in nets[stage.trained].named_parameters() if not torch.equal(p, before[n])]
        assert moved, "the trained network was updated"
