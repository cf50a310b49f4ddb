"""GPU checks (marker ``gpu``): skipped without CUDA (CI has none). ``bench/gpu_check.sh`` runs
them on a lent GPU; ``bench/gpu_check.sh --device cpu --quick`` (what CI runs) runs them on the
CPU to check that they run, where NCCL-only checks skip."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from common import ToyModule, ToyNet, max_diff, mean_state, rank_file_of, snapshot
from torch import nn

from localsgd import Averager, InProcessCommunicator, LocalSGDStrategy
from localsgd.core.rounds import average

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("LOCALSGD_GPU_CHECK_DEVICE", "cuda")
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"


def _trainer(strategy: LocalSGDStrategy, max_steps: int = 8, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator=ACCELERATOR,
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(strategy=strategy, **{**defaults, **kwargs})


def _fit(path: str) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = ToyModule(bn=True, lr=0.05, momentum=0.9)
    _trainer(LocalSGDStrategy(sync_every=3, workers_per_device=4, simulation=path)).fit(module)
    return {k: v.cpu() for k, v in snapshot(module).items()}


def test_batched_path_equals_sequential_path_on_the_device() -> None:
    # TF32 would make the two paths differ by more than rounding
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert max_diff(_fit("batched"), _fit("sequential")) <= 1e-4


class _Autocast(ToyModule):
    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append((torch.is_autocast_enabled(DEVICE), self.model.net(x).dtype))
        return torch.nn.functional.cross_entropy(self.model(x).float(), y)


@pytest.mark.parametrize("workers", [(1, "sequential"), (4, "sequential"), (4, "batched")], ids=str)
def test_bf16_mixed_autocasts_on_every_path(workers: tuple[int, str]) -> None:
    k, path = workers
    module = _Autocast()
    _trainer(
        LocalSGDStrategy(sync_every=2, workers_per_device=k, simulation=path), 4, precision="bf16-mixed"
    ).fit(module)
    assert module.seen and set(module.seen) == {(True, torch.bfloat16)}


def test_16_mixed_scales_the_loss_per_process_and_is_refused_with_simulated_workers(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    def plugin() -> MixedPrecision:
        return MixedPrecision("16-mixed", DEVICE, scaler=torch.amp.GradScaler(DEVICE))

    pl.seed_everything(0, verbose=False)
    module = ToyModule(lr=0.05)
    trainer = _trainer(LocalSGDStrategy(sync_every=3), 6, plugins=[plugin()])
    trainer.fit(module)
    assert all(torch.isfinite(v).all() for v in snapshot(module).values())
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    local = torch.load(rank_file_of(tmp_path / "s.ckpt", 0), weights_only=False)
    assert "scale" in local["precision"]  # each process's own loss scale travels in its rank file
    for path in ("sequential", "batched"):
        trainer = _trainer(LocalSGDStrategy(workers_per_device=2, simulation=path), 2, plugins=[plugin()])
        with pytest.raises(ValueError, match=r"would need one GradScaler per simulated worker"):
            trainer.fit(ToyModule())


def test_buckets_on_the_device_are_views_and_average_right() -> None:
    nets = []
    for k in range(3):
        torch.manual_seed(k)
        nets.append(ToyNet(bn=True).to(DEVICE))
    conv = [nn.Conv2d(3, 4, 3).to(DEVICE).to(memory_format=torch.channels_last) for _ in range(3)]
    for net, c in zip(nets, conv):
        net.conv = c
    expected = mean_state([snapshot(n) for n in nets])
    avg = Averager(nets, InProcessCommunicator(3))
    assert all(f.device.type == DEVICE for f in avg.flat_tensors())
    average(avg)
    for n in nets:
        assert max_diff(snapshot(n), expected) <= 1e-6
        assert n.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for flat in avg.flat_tensors(0):  # the parameters are views of the flat storage: no copies
        flat.zero_()
    assert not any(p.any() for p in nets[0].parameters()) and nets[1].net[0].weight.any()


@pytest.mark.parametrize("workers", [1, 2])
def test_nccl_with_one_process_uses_the_fused_average(workers: int) -> None:
    if DEVICE != "cuda":
        pytest.skip("NCCL needs CUDA")
    pl.seed_everything(0, verbose=False)
    strategy = LocalSGDStrategy(sync_every=2, workers_per_device=workers, process_group_backend="nccl")
    module = ToyModule(lr=0.05)
    _trainer(strategy, 4).fit(module)
    assert torch.distributed.get_backend() == "nccl"
    assert strategy.comm.fused_average  # ReduceOp.AVG: no separate division pass
    assert strategy.comm.rounds("sync") == 2
    # the mean of the local workers' tensors, through ReduceOp.AVG across the one process
    ts = [torch.full((3,), float(i), device=DEVICE) for i in range(workers)]
    strategy.comm.all_reduce_(ts, op="mean", counted=False)
    assert all(torch.equal(t, torch.full((3,), (workers - 1) / 2, device=DEVICE)) for t in ts)


def _sharded_bf16(rank: int, device: str, shards: int) -> dict[str, Any]:
    """One worker of ``shards`` processes on ``device``: FSDP2 with bf16 compute and fp32
    gradient reduction (MixedPrecisionPolicy), DiLoCo every 2 steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from localsgd import DiLoCo, LocalSGD

    if device == "cuda":
        torch.cuda.set_device(rank)
    mesh = init_device_mesh(device, (1, shards), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in (net[0], net[2], net):
        fully_shard(layer, mesh=mesh["shard"], mp_policy=policy)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    seen = []
    with LocalSGD(net, opt, sync_every=2, mesh=mesh, outer_optimizer=DiLoCo()) as driver:
        for step in range(4):
            g = torch.Generator().manual_seed(10 * rank + step)
            x, y = (
                torch.randn(8, 16, generator=g).to(device),
                torch.randint(0, 4, (8,), generator=g).to(device),
            )
            out = net(x)
            seen.append(out.dtype)
            nn.functional.cross_entropy(out.float(), y).backward()
            opt.step()
            opt.zero_grad()
        flats = driver.averager.flat_tensors()
    return {
        "seen": seen,
        "rounds": driver.comm.rounds("sync"),
        "flat": [(f.dtype, f.device.type) for f in flats],
        "finite": all(bool(p.full_tensor().isfinite().all()) for p in net.parameters()),
    }


@pytest.mark.parametrize("shards", [1, 2])
def test_sharded_workers_with_fsdp2_bf16_compute_and_fp32_reduce(shards: int) -> None:
    from distributed import run

    if DEVICE == "cuda" and torch.cuda.device_count() < shards:
        pytest.skip(f"{shards} shards need {shards} GPUs")
    for r in run(_sharded_bf16, shards, DEVICE, shards):
        assert set(r["seen"]) == {torch.bfloat16} and r["rounds"] == 2 and r["finite"], r
        assert r["flat"] == [(torch.float32, DEVICE)], r  # the shards stay fp32: the sync averages fp32
