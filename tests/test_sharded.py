"""Workers that are groups of processes sharding one model with FSDP2 (``LocalSGD(mesh=...)``).

Four gloo processes form K = 2 workers of S = 2 shards each (a ``("replicate", "shard")`` mesh).
Each rank trains on its own batches; FSDP2 averages the gradients inside a worker, so a worker
steps on the mean gradient of its two ranks' batches: what one unsharded worker would compute on
their concatenation. The reference is therefore the library's unsharded Local SGD, two simulated
workers in each process whose batches are those concatenations, run beside the sharded one.
"""

from __future__ import annotations

import functools
import io
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from common import StopAt, make_trainer
from distributed import run
from test_no_collectives import COLLECTIVES
from torch import Tensor, nn

from localsgd import DiLoCo, LocalSGD, LocalSGDStrategy, PostLocal
from localsgd.core.comm import InProcessCommunicator

pytestmark = pytest.mark.distributed

K, S, H, ROUNDS = 2, 2, 4, 3

SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "diloco": {"outer_optimizer": DiLoCo},
    "int8_feedback": {"outer_optimizer": DiLoCo, "wire": "int8", "error_feedback": True},
    "sync_delay": {"sync_delay": 2},
    "fragments": {"num_fragments": 2, "outer_optimizer": DiLoCo},
    "average_state": {"optimizer_state": "average"},  # each process averages its shards' Adam moments
    "divergence": {"log_divergence": True},  # summed over a worker's shards, averaged over workers
    # H = 1 for 4 steps (parameters and optimizer state averaged after each), then H = 4
    "postlocal": {"sync_every": lambda: PostLocal(H, switch_step=4), "h1_sync": "parameters"},
    # every round restarts Adam: its first step, g / (|g| + eps), turns rounding-level differences
    # of tiny gradients into visible ones, so this one is compared between front ends (bitwise)
    "reset": {"optimizer_state": "reset"},
}
"""The options of each compared run (a callable, such as an outer optimizer's class, is called
afresh for each driver: they hold state)."""


def _options(name: str) -> dict[str, Any]:
    """The setting's options (H = 4 unless it says otherwise), with fresh objects for each driver."""
    made = {k: v() if callable(v) else v for k, v in SETTINGS[name].items()}
    return {"sync_every": H, **made}


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
    ref = LocalSGD(refs, ref_opts, comm=InProcessCommunicator(K), **_options(setting))
    diffs = {}
    with LocalSGD(net, opt, mesh=mesh, **_options(setting)) as driver:
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
        if driver.divergence is not None:  # measured at the last round, relative to the reference's
            diffs["divergence"] = abs(driver.divergence / ref.divergence - 1)
    ref.finish()
    full = [p.full_tensor() for p in net.parameters()]
    diffs["final"] = max((a - b).abs().max().item() for a, b in zip(full, refs[worker].parameters()))
    diffs["bytes per round"] = sent - ref.comm.bytes("sync") / ref.comm.rounds("sync") / S
    ref.close()
    return diffs


@pytest.mark.parametrize("setting", [name for name in SETTINGS if name != "reset"])
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


def _fragments(rank: int) -> list[list[str]]:
    """The fragments of a sharded model whose units are Linear layers with a bias."""
    mesh = _mesh()
    torch.manual_seed(0)
    net = _shard(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), mesh)
    names = {id(p): n for n, p in net.named_parameters()}
    with LocalSGD(
        net, torch.optim.SGD(net.parameters(), lr=0.1), sync_every=H, mesh=mesh, num_fragments=2
    ) as ls:
        averager = ls.averager
        fragments: list[list[str]] = [[] for _ in range(2)]
        for f, bucket in zip(averager.bucket_fragments, averager._buckets[0]):
            fragments[f] += [names[id(t)] for t in bucket.tensors]
    return fragments


def test_a_sharded_models_fragments_are_whole_fsdp_units() -> None:
    """Each Linear is an FSDP2 unit: its weight and bias sync in the same round. Cut by tensors
    (the largest fragment smallest), the second layer's weight and bias land in different ones."""
    from localsgd.core.buckets import split_fragments

    whole = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    names = {id(p): n for n, p in whole.named_parameters()}
    by_tensor = [[names[id(t)] for t in part] for part in split_fragments(list(whole.parameters()), 2)]
    assert by_tensor == [["0.weight", "0.bias", "2.weight"], ["2.bias", "4.weight", "4.bias"]]
    for fragments in run(_fragments, K * S):
        assert fragments == [["0.weight", "0.bias", "2.weight", "2.bias"], ["4.weight", "4.bias"]]


def test_a_mesh_that_is_not_replicate_by_shard_is_refused_by_name() -> None:
    net = nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"mesh .* must be a 2-D DeviceMesh with mesh_dim_names \('replicate', 'shard'\)"
    ):
        LocalSGD(net, opt, mesh=object())
    with pytest.raises(ValueError, match="pass comm or mesh, not both"):
        LocalSGD(net, opt, mesh=object(), comm=InProcessCommunicator(1))


# ---------------------------------------------------------------------- the Lightning front end
STEPS = H * ROUNDS + 2  # three rounds, then two steps into the fourth


class _ShardedModule(pl.LightningModule):
    """Shards itself in configure_model over the strategy's mesh, as under ModelParallelStrategy."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def configure_model(self) -> None:
        _shard(self.net, self.device_mesh)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return _own_batches(self.global_rank)


def _own_batches(rank: int) -> torch.utils.data.DataLoader:
    """Every rank its own batches of 3, in order (the same for the Trainer and the plain loop)."""
    g = torch.Generator().manual_seed(7)
    n = K * S * 3 * STEPS
    data = torch.utils.data.TensorDataset(torch.randn(n, 16, generator=g), torch.randn(n, 32, generator=g))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=K * S, rank=rank, shuffle=False)
    return torch.utils.data.DataLoader(data, batch_size=3, sampler=sampler)


def _lightning(setting: str, rank: int) -> tuple[list[Tensor], Any]:
    module = _ShardedModule()
    strategy = LocalSGDStrategy(shards_per_worker=S, **_options(setting))
    make_trainer(strategy, max_steps=STEPS, use_distributed_sampler=False).fit(module)
    return [p.full_tensor() for p in module.net.parameters()], strategy.device_mesh


def _fabric(setting: str, rank: int) -> tuple[list[Tensor], Any]:
    from lightning.fabric import Fabric

    from localsgd import LocalSGDFabricStrategy

    strategy = LocalSGDFabricStrategy(
        shards_per_worker=S,
        parallelize_fn=lambda net, mesh: _shard(net, mesh),
        **_options(setting),
    )
    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=K * S)
    fabric.launch()
    net = fabric.setup_module(_net())
    opt = fabric.setup_optimizers(torch.optim.AdamW(net.parameters(), lr=0.01))
    for step, (x, y) in enumerate(_own_batches(rank)):
        if step == STEPS:
            break
        opt.zero_grad()
        fabric.backward(nn.functional.mse_loss(net(x), y))
        opt.step()
    strategy.finish()
    return [p.full_tensor() for p in net.parameters()], strategy.device_mesh


FRONT_ENDS = {"lightning": _lightning, "fabric": _fabric}


def _front_end_against_plain(rank: int, front_end: str, setting: str) -> float:
    trained, mesh = FRONT_ENDS[front_end](setting, rank)
    # the plain loop on the same batches: what the sampler dealt this rank, in order
    net = _shard(_net(), mesh)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    batches = _own_batches(rank)
    with LocalSGD(net, opt, mesh=mesh, **_options(setting)):
        for step, batch in enumerate(batches):
            if step == STEPS:
                break
            _step(net, opt, batch)
    plain = [p.full_tensor() for p in net.parameters()]
    return max((a - b).abs().max().item() for a, b in zip(trained, plain))


@pytest.mark.parametrize(
    ("front_end", "setting"),
    [(f, s) for f in FRONT_ENDS for s in ("plain", "diloco", "int8_feedback", "sync_delay", "fragments")]
    + [("lightning", "reset")],
)
def test_the_strategies_equal_the_plain_loop_bitwise(front_end: str, setting: str) -> None:
    assert run(_front_end_against_plain, K * S, front_end, setting) == [0.0] * (K * S)


# ---------------------------------------------------------------------- checkpoints
def _resume(rank: int, ckpt_dir: str, setting: str) -> dict[str, Any]:
    """An uninterrupted fit, one stopped after a checkpoint at step 5 (mid-round; with sync_delay=2
    the round started at step 4 is in flight), and one resumed from it; then the same checkpoint
    resumed on another layout (1 worker x 4 shards)."""
    out: dict[str, Any] = {}
    for name, shards, ckpt in (
        ("full", S, None),
        ("first", S, None),
        ("resumed", S, "s5"),
        ("relaid", 4, "s5"),
    ):
        module = _ShardedModule()
        callbacks: list[pl.Callback] = []
        if name == "first":
            callbacks = [
                pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=5, filename="s5"),
                StopAt(5),
            ]
        strategy = LocalSGDStrategy(shards_per_worker=shards, **_options(setting))
        trainer = make_trainer(
            strategy,
            max_steps=5 if name == "relaid" else STEPS,  # relaid: takes the checkpoint, no step
            callbacks=callbacks,
            enable_checkpointing=bool(callbacks),
            use_distributed_sampler=False,
        )
        trainer.fit(module, ckpt_path=f"{ckpt_dir}/{ckpt}.ckpt" if ckpt else None)
        out[name] = [p.full_tensor() for p in module.net.parameters()]
        if name == "relaid":  # worker 0's Adam moments, resharded from 2 shards to 4
            opt = trainer.optimizers[0]
            out["relaid moments"] = [opt.state[p]["exp_avg"].full_tensor() for p in module.net.parameters()]
    return out


@pytest.mark.parametrize("setting", ["int8_feedback", "sync_delay"])
def test_a_sharded_checkpoint_mid_round_resumes_bitwise(setting: str, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    results = run(_resume, K * S, str(tmp_path), setting)
    folder = tmp_path / "s5.ckpt"  # written by DCP: each process its own shards
    assert sorted(p.name for p in folder.iterdir()) == [".metadata"] + [
        f"__{r}_0.distcp" for r in range(K * S)
    ] + ["meta.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s5.ckpt"]  # nothing partial, no rank files
    dcp_to_torch_save(folder, tmp_path / "one.pt")  # what the error for whole workers suggests
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    assert sorted(one) == ["rank0", "rank1", "rank2", "rank3", "state_dict", "worker0", "worker1"]
    whole = _ShardedModule()  # never sharded: the global model as full tensors
    whole.load_state_dict(one["state_dict"])
    moments = [one["worker0"]["optimizer_0"]["state"][f"net.{i}.weight"]["exp_avg"] for i in (0, 2, 4)]
    for rank, r in enumerate(results):
        assert all(torch.equal(a, b) for a, b in zip(r["resumed"], r["full"])), (setting, rank)
        assert not all(torch.equal(a, b) for a, b in zip(r["first"], r["full"])), "nothing was resumed"
        # another layout: every worker restarts from the global model, with worker 0's moments
        assert all(torch.equal(a, b) for a, b in zip(r["relaid"], whole.net.parameters())), (setting, rank)
        assert all(torch.equal(a, b) for a, b in zip(r["relaid moments"], moments)), (setting, rank)
    workers = [one[f"worker{k}"]["state_dict"]["net.0.weight"] for k in range(K)]
    assert not torch.equal(workers[0], workers[1])  # mid-round: each worker's own model, saved apart


def test_whole_workers_refuse_a_sharded_checkpoint_by_name(tmp_path: Path) -> None:
    """A sharded run's folder given to a run of whole workers: a ValueError that says how to use it."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "sharded.ckpt"
    dcp.save({"state_dict": _ShardedModule().state_dict()}, checkpoint_id=folder)
    torch.save({"localsgd": {"shards_per_worker": 2}}, folder / "meta.pt")
    trainer = make_trainer(LocalSGDStrategy(sync_every=H), max_steps=1, use_distributed_sampler=False)
    whole = _ShardedModule()
    whole.configure_model = lambda: None  # type: ignore[method-assign]  # stays whole
    with pytest.raises(ValueError, match=r"2 processes per worker.*shards_per_worker=S.*dcp_to_torch_save"):
        trainer.fit(whole, ckpt_path=str(folder))


def _plain_driver(mesh: Any, setting: str) -> tuple[nn.Module, torch.optim.Optimizer, LocalSGD]:
    """A fresh sharded model, its AdamW and a plain loop's driver over ``mesh``."""
    net = _shard(_net(), mesh)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    return net, opt, LocalSGD(net, opt, mesh=mesh, **_options(setting))


def _plain_train(worker: int, shard: int, net: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        _step(net, opt, _batch(worker, shard, step))


def _plain_resume(rank: int, setting: str) -> bool:
    """A plain loop's ``state_dict()`` taken mid-round (with sync_delay=2: a round in flight),
    saved per rank and loaded into a fresh model, optimizer and driver, continues bitwise."""
    mesh = _mesh()
    fresh = functools.partial(_plain_driver, mesh, setting)
    train = functools.partial(_plain_train, *mesh.get_coordinate())

    net, opt, ls = fresh()
    with ls:
        train(net, opt, range(STEPS))
    full = [p.full_tensor() for p in net.parameters()]
    net, opt, ls = fresh()
    train(net, opt, range(5))
    saved = io.BytesIO()
    torch.save(ls.state_dict(), saved)
    ls.close()
    net, opt, ls = fresh()
    with torch.no_grad():
        for p in net.parameters():
            p.to_local().mul_(0.5)  # the state must bring the model back, not the initialization
    saved.seek(0)
    ls.load_state_dict(torch.load(saved, weights_only=False))
    with ls:
        train(net, opt, range(5, STEPS))
    return all(torch.equal(a, p.full_tensor()) for a, p in zip(full, net.parameters()))


@pytest.mark.parametrize("setting", ["int8_feedback", "sync_delay"])
def test_a_plain_loops_state_dict_mid_round_resumes_bitwise(setting: str) -> None:
    assert run(_plain_resume, K * S, setting) == [True] * (K * S)


def _plain_dcp_resume(rank: int, ckpt_dir: str, setting: str) -> dict[str, Any]:
    """A plain loop's checkpoint through ``localsgd.sharding.save_checkpoint`` (a DCP folder) at
    step 5, loaded into a fresh model, optimizer and driver and continued; then loaded on another
    layout (1 worker x 4 shards)."""
    from torch.distributed.device_mesh import init_device_mesh

    from localsgd.sharding import load_checkpoint, save_checkpoint

    mesh = _mesh()
    train = functools.partial(_plain_train, *mesh.get_coordinate())

    def fresh(m: Any = mesh) -> tuple[nn.Module, torch.optim.Optimizer, LocalSGD]:
        return _plain_driver(m, setting)

    out: dict[str, Any] = {}
    net, opt, ls = fresh()
    with ls:
        train(net, opt, range(STEPS))
    out["full"] = [p.full_tensor() for p in net.parameters()]
    net, opt, ls = fresh()
    train(net, opt, range(5))
    save_checkpoint(f"{ckpt_dir}/s5", {"model": net, "optimizer": opt, "step": 5}, ls)
    ls.close()
    net, opt, ls = fresh()
    state: dict[str, Any] = {"model": net, "optimizer": opt, "step": 0}
    load_checkpoint(f"{ckpt_dir}/s5", state, ls)
    with ls:
        train(net, opt, range(state["step"], STEPS))
    out["resumed"] = [p.full_tensor() for p in net.parameters()]
    relaid = init_device_mesh("cpu", (1, K * S), mesh_dim_names=("replicate", "shard"))
    net, opt, ls = fresh(relaid)
    load_checkpoint(f"{ckpt_dir}/s5", {"model": net, "optimizer": opt}, ls, strict=False)
    out["relaid"] = [p.full_tensor() for p in net.parameters()]
    out["relaid moments"] = [opt.state[p]["exp_avg"].full_tensor() for p in net.parameters()]
    ls.close()
    return out


@pytest.mark.parametrize("setting", ["diloco", "sync_delay"])
def test_a_plain_loops_dcp_checkpoint_resumes_bitwise_and_reshards(setting: str, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    results = run(_plain_dcp_resume, K * S, str(tmp_path), setting)
    dcp_to_torch_save(tmp_path / "s5", tmp_path / "one.pt")
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    assert sorted(one) == ["model", "rank0", "rank1", "rank2", "rank3", "worker0", "worker1"]
    relaid = [one["model"][f"{i}.weight"] for i in (0, 2, 4)]
    moments = [one["worker0"]["optimizer"]["state"][f"{i}.weight"]["exp_avg"] for i in (0, 2, 4)]
    for rank, r in enumerate(results):
        assert all(torch.equal(a, b) for a, b in zip(r["resumed"], r["full"])), (setting, rank)
        assert all(torch.equal(a, b) for a, b in zip(r["relaid"], relaid)), (setting, rank)
        assert all(torch.equal(a, b) for a, b in zip(r["relaid moments"], moments)), (setting, rank)


def _fabric_resume(rank: int, ckpt_dir: str) -> dict[str, Any]:
    """Fabric: an uninterrupted run, and one saved at step 5 (with a round in flight), loaded into
    a fresh model and optimizer, and continued."""
    from lightning.fabric import Fabric

    from localsgd import LocalSGDFabricStrategy

    def fresh(shards: int = S) -> tuple[Any, nn.Module, torch.optim.Optimizer]:
        strategy = LocalSGDFabricStrategy(
            parallelize_fn=_shard, shards_per_worker=shards, **_options("sync_delay")
        )
        fabric = Fabric(strategy=strategy, accelerator="cpu", devices=K * S)
        fabric.launch()
        net = fabric.setup_module(_net())
        return fabric, net, fabric.setup_optimizers(torch.optim.AdamW(net.parameters(), lr=0.01))

    def train(fabric: Any, net: nn.Module, opt: Any, steps: range) -> None:
        for step, (x, y) in enumerate(_own_batches(rank)):
            if step in steps:
                opt.zero_grad()
                fabric.backward(nn.functional.mse_loss(net(x), y))
                opt.step()
        if steps.stop == STEPS:
            fabric.strategy.finish()

    out: dict[str, Any] = {}
    fabric, net, opt = fresh()
    train(fabric, net, opt, range(STEPS))
    out["full"] = [p.full_tensor() for p in net.parameters()]
    fabric, net, opt = fresh()
    train(fabric, net, opt, range(5))
    fabric.save(f"{ckpt_dir}/s5.ckpt", {"model": net, "optimizer": opt, "step": 5})
    fabric, net, opt = fresh()
    state = {"model": net, "optimizer": opt}
    left = fabric.load(f"{ckpt_dir}/s5.ckpt", state)
    train(fabric, net, opt, range(left["step"], STEPS))
    out["resumed"] = [p.full_tensor() for p in net.parameters()]
    fabric, net, opt = fresh(shards=4)  # another layout: 1 worker of 4 shards
    fabric.load(f"{ckpt_dir}/s5.ckpt", {"model": net, "optimizer": opt})
    out["relaid"] = [p.full_tensor() for p in net.parameters()]
    out["relaid moments"] = [opt.state[p]["exp_avg"].full_tensor() for p in net.parameters()]
    return out


def test_fabric_saves_and_loads_sharded_workers_bitwise(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    results = run(_fabric_resume, K * S, str(tmp_path))
    for rank, r in enumerate(results):
        assert all(torch.equal(a, b) for a, b in zip(r["resumed"], r["full"])), rank
    dcp_to_torch_save(tmp_path / "s5.ckpt", tmp_path / "one.pt")  # a DCP folder: each process its shards
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    assert sorted(one) == ["model", "rank0", "rank1", "rank2", "rank3", "worker0", "worker1"]
    assert sorted(one["worker0"]) == ["model", "optimizer"]
    whole = {k: tuple(v.shape) for k, v in _net().state_dict().items()}
    assert {k: tuple(v.shape) for k, v in one["model"].items()} == whole  # the global model, whole
    moments = [one["worker0"]["optimizer"]["state"][f"{i}.weight"]["exp_avg"] for i in (0, 2, 4)]
    for rank, r in enumerate(results):  # another layout: the global model, worker 0's moments
        relaid = [one["model"][f"{i}.weight"] for i in (0, 2, 4)]  # by name: DCP keeps no order
        assert all(torch.equal(a, b) for a, b in zip(r["relaid"], relaid)), rank
        assert all(torch.equal(a, b) for a, b in zip(r["relaid moments"], moments)), rank


def test_a_strategy_whose_model_is_not_sharded_says_how_to_shard_it() -> None:
    from localsgd.sharding import check_sharded

    with pytest.raises(
        ValueError, match=r"shards_per_worker \(2\) > 1 needs a model that is sharded.*configure_model"
    ):
        check_sharded(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match=r"shards_per_worker \(2\) > 1 needs parallelize_fn"):
        from localsgd import LocalSGDFabricStrategy

        LocalSGDFabricStrategy(shards_per_worker=2)
    with pytest.raises(ValueError, match=r"shards_per_worker \(0\) must be an integer >= 1"):
        LocalSGDStrategy(shards_per_worker=0)


def test_a_checkpoint_folder_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: Any) -> None:
    """A crash while the folder is written leaves the previous checkpoint; the next save replaces it."""
    import torch.distributed.checkpoint as dcp

    from localsgd.sharding import load_meta, save_dcp

    folder = tmp_path / "last.ckpt"
    save_dcp(folder, {"w": torch.zeros(3)}, {"step": 1}, 0, lambda: None)
    real_save = dcp.save

    def crash(state: Any, checkpoint_id: Any) -> None:
        real_save({"w": torch.ones(3)}, checkpoint_id=checkpoint_id)
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(RuntimeError, match="killed"):
        save_dcp(folder, {"w": torch.ones(3)}, {"step": 2}, 0, lambda: None)
    assert load_meta(folder) == {"step": 1}
    got = {"w": torch.empty(3)}
    dcp.load(got, checkpoint_id=folder)
    assert torch.equal(got["w"], torch.zeros(3))
    monkeypatch.setattr(dcp, "save", real_save)
    save_dcp(folder, {"w": torch.full((3,), 2.0)}, {"step": 3}, 0, lambda: None)  # the stale part goes
    dcp.load(got, checkpoint_id=folder)
    assert torch.equal(got["w"], torch.full((3,), 2.0)) and load_meta(folder) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
