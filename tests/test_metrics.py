"""Sharpness metrics: Hutchinson trace and power iteration against the exact Hessian, and the
callback through a Trainer (steps, averaged model, no effect on training)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from common import ToyModule, make_trainer, snapshot
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from localsgd import LocalSGDStrategy
from localsgd.research.metrics import SharpnessCallback, hessian_trace, top_eigenvalue


def ce_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def small_mlp() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # 682 parameters: a Hessian with a spread spectrum, so a few thousand probes give 2%
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    batches = [
        (torch.randn(128, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (128,), generator=g))
        for _ in range(2)
    ]
    return model, batches


def exact_hessian(model: nn.Module, batches: list[Any]) -> Tensor:
    """The Hessian of the mean batch loss in the flattened trainable parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

    def loss(theta: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[i : i + shape.numel()].view(shape)
            i += shape.numel()
        losses = [ce_loss(lambda x: functional_call(model, params, (x,)), b) for b in batches]
        return torch.stack(losses).mean()

    return torch.autograd.functional.hessian(loss, flat, vectorize=True)


def hutchinson_std(hessians: list[Tensor], num_probes: int) -> float:
    """The estimator's std: per batch Var(v^T H_b v) = 2 (||H_b||_F^2 - sum_i H_b,ii^2) over
    ``num_probes`` independent probes, averaged over the batches."""
    var = sum(2 * (h.square().sum() - h.diagonal().square().sum()).item() for h in hessians)
    return math.sqrt(var / num_probes) / len(hessians)


@pytest.mark.slow
def test_hutchinson_trace_matches_the_exact_hessian() -> None:
    model, batches = small_mlp()
    hessians = [exact_hessian(model, [b]) for b in batches]
    exact = torch.stack(hessians).mean(0).trace().item()
    # 2% must be at least 4 standard deviations, or the test would pass by luck
    assert 4 * hutchinson_std(hessians, 3000) <= 0.02 * abs(exact)
    g = torch.Generator().manual_seed(1)
    estimate = hessian_trace(model, ce_loss, batches, num_probes=3000, generator=g, probes_per_pass=500)
    assert estimate == pytest.approx(exact, rel=0.02)


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    # v_i^2 = 1 for Rademacher probes, so v^T H v = tr(H) when H is diagonal: one probe suffices
    a = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()

    def loss(m: nn.Module, batch: Tensor) -> Tensor:
        return 0.5 * (batch * m.weight.squeeze(0) ** 2).sum()

    trace = hessian_trace(model, loss, [a], num_probes=1, generator=torch.Generator().manual_seed(0))
    assert trace == pytest.approx(a.sum().item(), rel=1e-12)


@pytest.mark.slow
def test_power_iteration_matches_the_top_eigenvalue() -> None:
    model, batches = small_mlp()
    eigenvalues = torch.linalg.eigvalsh(exact_hessian(model, batches))
    top = eigenvalues[-1].item()
    assert top > 0 and abs(eigenvalues[0].item()) < top  # not the shifted case (tested below)
    estimate = top_eigenvalue(
        model, ce_loss, batches, iters=400, tol=1e-9, generator=torch.Generator().manual_seed(0)
    )
    assert estimate == pytest.approx(top, rel=1e-3)


def test_power_iteration_finds_the_top_eigenvalue_when_a_negative_one_dominates() -> None:
    a = torch.tensor([-5.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()

    def loss(m: nn.Module, batch: Tensor) -> Tensor:
        return 0.5 * (batch * m.weight.squeeze(0) ** 2).sum()

    g = torch.Generator().manual_seed(0)
    assert top_eigenvalue(model, loss, [a], iters=2000, tol=1e-12, generator=g) == pytest.approx(
        3.0, rel=1e-4
    )


def test_measuring_leaves_buffers_rng_and_grads_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    before = snapshot(model)
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(0)
    hessian_trace(model, ce_loss, [batch], num_probes=3, generator=g)
    top_eigenvalue(model, ce_loss, [batch], iters=3, tol=1e-3, generator=g)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


def test_only_trainable_parameters_count() -> None:
    model, batches = small_mlp()
    model[0].requires_grad_(False)
    hessians = [exact_hessian(model, [b]) for b in batches]  # over the last layer only
    exact = torch.stack(hessians).mean(0).trace().item()
    assert 4 * hutchinson_std(hessians, 3000) <= 0.02 * abs(exact)
    g = torch.Generator().manual_seed(0)
    trace = hessian_trace(model, ce_loss, batches, num_probes=3000, generator=g, probes_per_pass=1000)
    assert trace == pytest.approx(exact, rel=0.02)


def test_errors_name_the_argument() -> None:
    model, batches = small_mlp()
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"num_probes \(0\) must be an integer >= 1"):
        hessian_trace(model, ce_loss, batches, num_probes=0, generator=g)
    with pytest.raises(ValueError, match="batches is empty"):
        hessian_trace(model, ce_loss, [], num_probes=1, generator=g)
    with pytest.raises(ValueError, match=r"tol \(0\) must be > 0"):
        top_eigenvalue(model, ce_loss, batches, iters=3, tol=0, generator=g)
    with pytest.raises(ValueError, match="scalar"):
        hessian_trace(model, lambda m, b: m(b[0]), batches, num_probes=1, generator=g)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_trace(model.requires_grad_(False), ce_loss, batches, num_probes=1, generator=g)
    with pytest.raises(ValueError, match=r"every_n_steps \(0\) must be an integer >= 1"):
        SharpnessCallback(every_n_steps=0)
    with pytest.raises(ValueError, match=r"power_tol \(-1\) must be > 0"):
        SharpnessCallback(every_n_steps=1, power_tol=-1)

    class NoLoss(pl.LightningModule):
        pass

    with pytest.raises(ValueError, match=r"NoLoss has no `loss\(batch\) -> Tensor` method"):
        SharpnessCallback(every_n_steps=1).on_fit_start(None, NoLoss())  # type: ignore[arg-type]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def fit_toy(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> ToyModule:
    pl.seed_everything(0, verbose=False)
    module = ToyModule(bn=True)
    logger = CSVLogger(tmp_path, name="run", version=0)
    options = {"max_steps": 10, "logger": logger, "log_every_n_steps": 1, **kwargs}
    trainer = make_trainer("auto", callbacks=callbacks, **options)
    trainer.fit(module)
    return module


def test_callback_logs_both_metrics_at_every_nth_step_without_changing_training(tmp_path: Path) -> None:
    callback = SharpnessCallback(every_n_steps=3, num_batches=2, num_probes=4, power_iters=5)
    measured = fit_toy(tmp_path / "with", [callback])
    rows = read_csv(tmp_path / "with" / "run" / "version_0" / "metrics.csv")
    traces = {
        int(r["step"]): float(r["sharpness/hessian_trace"]) for r in rows if r["sharpness/hessian_trace"]
    }
    tops = {
        int(r["step"]): float(r["sharpness/top_eigenvalue"]) for r in rows if r["sharpness/top_eigenvalue"]
    }
    losses = {int(r["step"]) for r in rows if r.get("train/loss")}
    # after optimizer steps 3, 6, 9: in the rows Lightning gives those steps' training metrics
    assert sorted(traces) == sorted(tops) == [2, 5, 8]
    assert set(traces) <= losses
    assert [h["step"] for h in callback.history] == [3, 6, 9]
    assert all(math.isfinite(v) and v != 0 for v in [*traces.values(), *tops.values()])
    assert len(callback.batches) == 2 and callback.batches[0][0].shape == (8, 8)
    # measuring (BatchNorm forward passes, dropping the RNG) leaves training exactly as it was
    plain = fit_toy(tmp_path / "without", [])
    a, b = snapshot(measured), snapshot(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_callback_measures_the_average_of_simulated_workers(tmp_path: Path) -> None:
    class Capture(SharpnessCallback):
        def __init__(self) -> None:
            super().__init__(every_n_steps=3, num_batches=1, num_probes=2, compute_eigenvalue=False)
            self.seen: list[dict[str, Tensor]] = []
            self.workers: list[list[list[Tensor]]] = []

        def measure(self, module: nn.Module, *, step: int = 0) -> dict[str, float]:
            self.seen.append({n: p.detach().clone() for n, p in module.named_parameters()})
            return super().measure(module, step=step)

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            super().on_train_batch_end(trainer, *args)
            if len(self.workers) < len(self.seen):  # the workers' own models, back after measuring
                replicas = trainer.strategy.replicas.replicas  # type: ignore[attr-defined]
                self.workers.append([[p.detach().clone() for p in r.parameters()] for r in replicas])

    callback = Capture()
    pl.seed_everything(0, verbose=False)
    module = ToyModule()
    strategy = LocalSGDStrategy(sync_every=4, workers_per_device=2)
    trainer = make_trainer(strategy, 3, [callback])
    trainer.fit(module)
    assert len(callback.seen) == 1  # after step 3, mid-round: the workers differ
    seen = list(callback.seen[0].values())
    w0, w1 = callback.workers[0]
    assert any(not torch.allclose(a, b) for a, b in zip(w0, w1))
    for s, a, b in zip(seen, w0, w1):
        torch.testing.assert_close(s, (a + b) / 2)


def test_callback_with_a_dataset_a_loss_fn_and_gradient_accumulation(tmp_path: Path) -> None:
    calls = []

    def loss_fn(module: nn.Module, batch: Any) -> Tensor:
        calls.append(len(batch[0]))
        return module.loss(batch)  # type: ignore[operator]

    dataset = TensorDataset(torch.randn(50, 8), torch.randint(0, 4, (50,)))
    callback = SharpnessCallback(
        every_n_steps=2,
        num_batches=3,
        batch_size=20,
        num_probes=2,
        compute_eigenvalue=False,
        loss_fn=loss_fn,
        dataset=dataset,
    )
    # 2 micro-batches per optimizer step: measured once per step, after steps 2 and 4
    fit_toy(tmp_path, [callback], accumulate_grad_batches=2, max_steps=4)
    assert [h["step"] for h in callback.history] == [2, 4]
    assert all("sharpness/top_eigenvalue" not in h for h in callback.history)
    # 50 samples in batches of 20: 20, 20, 10, taken from the dataset as they are
    assert [len(b[0]) for b in callback.batches] == [20, 20, 10]
    assert sorted(set(calls)) == [10, 20]
    rows = read_csv(tmp_path / "run" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("sharpness/hessian_trace")] == [1, 3]
