"""Workers that are groups of processes sharding one model with FSDP2 (``LocalSGD(mesh=...)``).

Four gloo processes form K = 2 workers of S = 2 shards each (a ``("replicate", "shard")`` mesh).
Each rank trains on its own batches; FSDP2 averages the gradients inside a worker, so a worker
steps on the mean gradient of its two ranks' batches: what one unsharded worker would compute on
their concatenation. The reference is therefore the library's unsharded Local SGD, two simulated
workers in each process whose batches are those concatenations, run beside the sharded one.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed import run
from test_no_collectives import COLLECTIVES
from torch import Tensor, nn

from localsgd import DiLoCo, LocalSGD
from localsgd.core.comm import InProcessCommunicator

pytestmark = pytest.mark.distributed

K, S, H, ROUNDS = 2, 2, 4, 3

SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "diloco": {"outer_optimizer": DiLoCo},
    "int8_feedback": {"outer_optimizer": DiLoCo, "wire": "int8", "error_feedback": True},
    "sync_delay": {"sync_delay": 2},
    "fragments": {"num_fragments": 2, "outer_optimizer": DiLoCo},
}
"""The options of each compared run (an outer optimizer class is made afresh for each driver)."""


def _options(name: str) -> dict[str, Any]:
    return {k: v() if isinstance(v, type) else v for k, v in SETTINGS[name].items()}


def _net() -> nn.Module:
    # every weight 512 values, each shard 256: int8's blocks of 256 fall on the same values
    # whether a worker's model is whole or sharded, so the compressed runs compare exactly too
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False), nn.Linear(16, 32, bias=False)]
    return nn.Sequential(layers[0], nn.Tanh(), layers[1], nn.Tanh(), layers[2])


def _shard(net: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    return fully_shard(net, mesh=mesh["shard"])


def _batch(worker: int, shard: int, step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 * worker + 100 * shard + step)
    return torch.randn(3, 16, generator=g), torch.randn(3, 32, generator=g)


def _step(net: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()
    opt.zero_grad()


def _mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (K, S), mesh_dim_names=("replicate", "shard"))


def _against_unsharded(rank: int, setting: str) -> dict[str, float]:
    mesh = _mesh()
    worker, shard = mesh.get_coordinate()
    refs = [_net() for _ in range(K)]
    ref_opts = [torch.optim.AdamW(m.parameters(), lr=0.01) for m in refs]
    net = _shard(_net(), mesh)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    ref = LocalSGD(refs, ref_opts, sync_every=H, comm=InProcessCommunicator(K), **_options(setting))
    diffs = {}
    with LocalSGD(net, opt, sync_every=H, mesh=mesh, **_options(setting)) as driver:
        for step in range(H * ROUNDS + 2):  # three rounds, then two steps into the fourth
            _step(net, opt, _batch(worker, shard, step))
            for w, (m, o) in enumerate(zip(refs, ref_opts)):
                x, y = zip(*(_batch(w, s, step) for s in range(S)))
                _step(m, o, (torch.cat(x), torch.cat(y)))
            if step == H * ROUNDS + 1:  # mid-round, evaluation's global model (and the own ones back after)
                with driver.averaged(), ref.averaged():
                    full = [p.full_tensor() for p in net.parameters()]
                    diffs["global model"] = max(
                        (a - b).abs().max().item() for a, b in zip(full, refs[worker].parameters())
                    )
            if (step + 1) % H == 0 or step == H * ROUNDS + 1:
                full = [p.full_tensor() for p in net.parameters()]  # this worker's model, gathered
                diffs[f"step {step + 1}"] = max(
                    (a - b).abs().max().item() for a, b in zip(full, refs[worker].parameters())
                )
            if step == H * ROUNDS + 1:  # mid-round: the workers differ, and each equals its own
                diffs["workers apart"] = max(
                    (a - b).abs().max().item() for a, b in zip(refs[0].parameters(), refs[1].parameters())
                )
        sent = driver.comm.bytes("sync") / driver.comm.rounds("sync")
    ref.finish()
    full = [p.full_tensor() for p in net.parameters()]
    diffs["final"] = max((a - b).abs().max().item() for a, b in zip(full, refs[worker].parameters()))
    diffs["bytes per round"] = sent - ref.comm.bytes("sync") / ref.comm.rounds("sync") / S
    ref.close()
    return diffs


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sharded_workers_equal_unsharded_local_sgd_on_the_concatenated_batches(setting: str) -> None:
    for rank, diffs in enumerate(run(_against_unsharded, K * S, setting)):
        spread, sent = diffs.pop("workers apart"), diffs.pop("bytes per round")
        assert spread > 1e-3, f"the workers never differed ({spread}): the comparison shows nothing"
        assert all(d <= 1e-5 for d in diffs.values()), (setting, rank, diffs)
        if setting == "plain":  # each process sends its own shards: 1/S of what a whole worker sends
            assert sent == 0, sent


def _collectives(rank: int) -> dict[int, Counter[str]]:
    mesh = _mesh()
    worker, shard = mesh.get_coordinate()
    groups = {mesh.get_group("shard"): "shard", mesh.get_group("replicate"): "replicate"}
    calls: dict[int, Counter[str]] = {}
    step = 0

    def counted(original: Any, *args: Any, **kwargs: Any) -> Any:
        calls.setdefault(step, Counter())[groups.get(kwargs.get("group"), "every process")] += 1
        return original(*args, **kwargs)

    saved = {name: getattr(dist, name) for name in COLLECTIVES}
    for name, original in saved.items():
        setattr(dist, name, functools.partial(counted, original))
    try:
        net = _shard(_net(), mesh)
        opt = torch.optim.AdamW(net.parameters(), lr=0.01)
        with LocalSGD(net, opt, sync_every=H, mesh=mesh):
            for step in range(1, H * ROUNDS + 3):  # counted() reads it
                _step(net, opt, _batch(worker, shard, step))
            step = H * ROUNDS + 3  # the final average
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
    return calls


def test_between_syncs_only_the_shards_of_a_worker_talk() -> None:
    """FSDP2's all-gathers and reduce-scatters stay inside a worker (its shard group); across
    workers something travels only at a sync (every H steps) and in the final average."""
    for rank, calls in enumerate(run(_collectives, K * S)):
        across = {step for step, c in calls.items() if set(c) - {"shard"}}
        assert across == {0, 4, 8, 12, H * ROUNDS + 3}, (rank, {s: dict(c) for s, c in calls.items()})
        inside = [step for step in range(1, H * ROUNDS + 3) if calls.get(step, Counter())["shard"]]
        assert inside == list(range(1, H * ROUNDS + 3)), (rank, inside)  # FSDP2 itself, every step


def test_a_mesh_that_is_not_replicate_by_shard_is_refused_by_name() -> None:
    net = nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"mesh .* must be a 2-D DeviceMesh with mesh_dim_names \('replicate', 'shard'\)"
    ):
        LocalSGD(net, opt, mesh=object())
    with pytest.raises(ValueError, match="pass comm or mesh, not both"):
        LocalSGD(net, opt, mesh=object(), comm=InProcessCommunicator(1))
