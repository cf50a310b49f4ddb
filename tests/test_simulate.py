"""Simulated workers: K workers in fewer processes do exactly what K processes do."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from common import TIMEOUT, ToyModule, make_trainer, max_diff, snapshot
from distributed import run
from torch.utils.data import DataLoader, TensorDataset

from localsgd import LocalSGDStrategy
from localsgd.core.replicas import WorkerReplicas
from localsgd.research.models import ResNet

H, STEPS = 3, 9  # three rounds


def _fit(rank: int, workers_per_device: int, optimizer: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    module = _Module(bn=True, lr=0.05, momentum=0.9, weight_decay=1e-3, optimizer=optimizer)
    strategy = LocalSGDStrategy(
        sync_every=H, workers_per_device=workers_per_device, log_divergence=True, timeout=TIMEOUT
    )
    trainer = make_trainer(strategy, max_steps=STEPS)
    trainer.fit(module)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("comm/")}
    divergence = strategy.driver.divergence
    return {
        "final": snapshot(module),
        "metrics": metrics,
        "steps": trainer.global_step,
        "divergence": divergence,
    }


class _Module(ToyModule):
    def __init__(self, *, optimizer: str = "sgd", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.optimizer_name = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
        return super().configure_optimizers()


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_four_simulated_workers_equal_four_processes_and_two_by_two(optimizer: str) -> None:
    processes = run(_fit, 4, 1, optimizer)
    simulated = run(_fit, 1, 4, optimizer)[0]
    mixed = run(_fit, 2, 2, optimizer)
    reference = processes[0]["final"]
    assert max_diff(reference, processes[3]["final"]) == 0.0
    for got in (simulated, *mixed):
        assert max_diff(got["final"], reference) <= 1e-5  # parameters and BatchNorm buffers
        assert got["steps"] == STEPS
        # communication counted as K processes would send it
        assert got["metrics"] == processes[0]["metrics"]
        # how far the workers drifted in the last round, as measured before its sync
        assert got["divergence"] == pytest.approx(processes[0]["divergence"], rel=1e-4)
    assert processes[0]["divergence"] > 0
    assert processes[0]["metrics"]["comm/rounds"] == STEPS // H
    init = _Module(bn=True)
    assert max_diff(reference, snapshot(init)) > 1e-3  # it trained


def test_replicas_swap_tensors_optimizer_state_and_rng() -> None:
    torch.manual_seed(0)
    net = ToyModule(bn=True, momentum=0.9).model
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    replicas = WorkerReplicas(net, [opt], 3)
    draws = []
    for worker in range(3):
        replicas.activate(worker)
        draws.append(torch.rand(()).item())  # every worker starts from the same RNG state
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(worker))  # each worker its own data
        net(x).sum().backward()
        opt.step()
    replicas.deactivate()
    assert draws[0] == draws[1] == draws[2]
    states = [snapshot(r) for r in replicas.replicas]
    assert max_diff(states[0], states[1]) > 0  # different data, different workers
    # the module is worker 2 now; switching back shows worker 0's tensors and momentum
    replicas.activate(0)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), replicas.replicas[0].parameters()))
    momentum0 = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters() if p.requires_grad]
    replicas.activate(1)
    momentum1 = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(momentum0, momentum1))
    # each worker's RNG stream goes on where it left off
    replicas.activate(0)
    after0 = torch.rand(()).item()
    replicas.activate(1)
    after1 = torch.rand(()).item()
    assert after0 == after1 != draws[0]
    # the whole simulated state round-trips
    saved = replicas.state_dict()
    other = WorkerReplicas(net, [opt], 3)
    other.load_state_dict(saved)
    assert all(max_diff(snapshot(a), snapshot(b)) == 0.0 for a, b in zip(replicas.replicas, other.replicas))
    with pytest.raises(ValueError, match=r"holds 3 simulated workers per device, this run 2"):
        WorkerReplicas(net, [opt], 2).load_state_dict(saved)


@pytest.mark.parametrize("value", [0, -2, 1.5, "4", True])
def test_workers_per_device_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ValueError, match=rf"workers_per_device \({value!r}\) must be an integer >= 1"):
        LocalSGDStrategy(workers_per_device=value)  # type: ignore[arg-type]


def test_simulation_refuses_what_it_cannot_simulate() -> None:
    trainer = make_trainer(LocalSGDStrategy(workers_per_device=2), max_steps=2, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"does not support accumulate_grad_batches \(2\)"):
        trainer.fit(ToyModule())
    trainer = make_trainer(LocalSGDStrategy(workers_per_device=2), max_steps=2, use_distributed_sampler=False)
    with pytest.raises(ValueError, match=r"needs Trainer\(use_distributed_sampler=True\)"):
        trainer.fit(ToyModule())


def _paths(rank: int, optimizer: str, optimizer_state: str = "local") -> dict[str, Any]:
    out = {}
    for path in ("sequential", "batched"):
        pl.seed_everything(0, verbose=False)
        module = _Module(bn=True, lr=0.05, momentum=0.9, weight_decay=1e-3, optimizer=optimizer)
        strategy = LocalSGDStrategy(
            sync_every=H,
            workers_per_device=4,
            simulation=path,
            optimizer_state=optimizer_state,
            timeout=TIMEOUT,
        )
        trainer = make_trainer(strategy, max_steps=STEPS - 1)  # ends mid-round: the final average too
        trainer.fit(module)
        out[path] = {"final": snapshot(module), "loss": float(trainer.callback_metrics["train/loss"])}
        out[path]["momenta"] = trainer.strategy.replicas.state_dict()["optimizers"]
    return out


@pytest.mark.parametrize(
    ("optimizer", "optimizer_state"), [("sgd", "local"), ("adamw", "local"), ("adamw", "reset")]
)
def test_batched_path_equals_sequential_path(optimizer: str, optimizer_state: str) -> None:
    # with "reset", both paths restart every worker's AdamW as a new optimizer at each sync
    r = run(_paths, 1, optimizer, optimizer_state)[0]
    assert max_diff(r["batched"]["final"], r["sequential"]["final"]) <= 1e-5
    # per-worker optimizer state is kept per worker in both paths
    for seq_w, bat_w in zip(r["sequential"]["momenta"], r["batched"]["momenta"]):
        for seq_p, bat_p in zip(seq_w[0], bat_w[0]):
            for key in seq_p:
                if isinstance(seq_p[key], torch.Tensor):
                    assert (seq_p[key] - bat_p[key]).abs().max() <= 1e-5, key
    assert r["batched"]["loss"] > 0  # what training_step logs still reaches the loggers


MODELS = [(norm, opt) for norm in ("batch", "group") for opt in ("sgd", "sgdm", "adamw")]


class _ResNetModule(pl.LightningModule):
    def __init__(self, norm: str, optimizer: str) -> None:
        super().__init__()
        self.net = ResNet(depth=8, width=4, norm=norm)
        self.optimizer_name = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
        momentum = 0.9 if self.optimizer_name == "sgdm" else 0.0
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=momentum, weight_decay=1e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
        return DataLoader(data, batch_size=4, shuffle=True)


def _resnets(rank: int, workers_per_device: int, paths: tuple[str, ...]) -> dict[Any, Any]:
    out = {}
    for norm, opt in MODELS:
        for path in paths:
            pl.seed_everything(0, verbose=False)
            module = _ResNetModule(norm, opt)
            strategy = LocalSGDStrategy(
                sync_every=2, workers_per_device=workers_per_device, simulation=path, timeout=TIMEOUT
            )
            make_trainer(strategy, max_steps=4).fit(module)
            out[norm, opt, path] = snapshot(module)
    return out


@pytest.mark.distributed
def test_project_resnets_with_batchnorm_and_groupnorm_simulate_exactly() -> None:
    processes = run(_resnets, 2, 1, ("sequential",))[0]
    simulated = run(_resnets, 1, 2, ("sequential", "batched"))[0]
    for norm, opt in MODELS:
        reference = processes[norm, opt, "sequential"]
        for path in ("sequential", "batched"):
            assert max_diff(simulated[norm, opt, path], reference) <= 1e-5, (norm, opt, path)


def test_batched_path_refuses_restarting_one_adaptive_worker_alone() -> None:
    class _Adam(ToyModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    strategy = LocalSGDStrategy(workers_per_device=2, simulation="batched", nonfinite="skip_worker")
    with pytest.raises(ValueError, match=r"nonfinite='skip_worker' with simulation='batched' cannot restart"):
        make_trainer(strategy, max_steps=2).fit(_Adam())


def test_both_paths_log_the_mean_over_the_simulated_workers(tmp_path) -> None:
    import csv

    columns = {}
    for path in ("sequential", "batched"):
        pl.seed_everything(0, verbose=False)
        strategy = LocalSGDStrategy(sync_every=3, workers_per_device=4, simulation=path)
        logger = pl.loggers.CSVLogger(tmp_path, name=path)
        trainer = make_trainer(strategy, max_steps=6, logger=logger, log_every_n_steps=1)
        trainer.fit(ToyModule(lr=0.1))
        rows = list(csv.DictReader(open(next((tmp_path / path).rglob("metrics.csv")))))
        columns[path] = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(columns["sequential"]) == 6
    # the last worker's loss alone would differ from the mean by far more than rounding
    assert max(abs(a - b) for a, b in zip(columns["sequential"], columns["batched"], strict=True)) <= 1e-5


def test_a_parameter_added_after_setup_is_refused_with_simulated_workers() -> None:
    class _Grows(ToyModule):
        def on_train_batch_end(self, *args: Any) -> None:
            if not hasattr(self, "late"):
                self.late = torch.nn.Parameter(torch.zeros(2))

    trainer = make_trainer(LocalSGDStrategy(sync_every=2, workers_per_device=2), max_steps=4)
    with pytest.raises(
        ValueError, match=r"simulated workers \(workers_per_device > 1\) cannot take in tensors"
    ):
        trainer.fit(_Grows())
