"""Local SGD on the diagonal linear network with label noise, vectorized in plain torch.

The theory's toy (f(x) = <x, u*u - v*v>, MSE, label noise) needs hundreds of thousands of steps,
which Lightning's per-step overhead (milliseconds) makes impractical. Here the K workers'
parameters are (K, d) tensors, gradients and the Hessian trace are closed-form, and several sync
periods H run side by side as one (R, K, d) tensor. Same math as :class:`localsgd.research.models.Regressor`
on :class:`localsgd.research.models.DiagonalLinearNet` with plain SGD; tests prove it against both.

Sampling: every worker draws each local batch i.i.d. with replacement from the whole training
set, with fresh Rademacher label noise, from one generator (:func:`draw_batches`). The R runs of
one :func:`train` call share these draws (common random numbers: they differ only in H). H = 1
averages after every step, which for plain SGD is synchronous SGD with total batch K * B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK_STEPS = 1000
""":func:`train` draws its batches for this many steps at a time (one :func:`draw_batches` call)."""


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
    return value


def gradients(u: Tensor, v: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients in (u, v) of L = mean_i (<x_i, u*u - v*v> - y_i)^2 (F.mse_loss), batched:
    u, v of shape (..., d), x of shape (..., B, d), y of shape (..., B), leading dims broadcast.

    dL/dw = (2/B) X^T r with residuals r = X w - y; chain rule: dL/du = 2u dL/dw, dL/dv = -2v dL/dw.
    """
    w = u * u - v * v
    r = (x @ w.unsqueeze(-1)).squeeze(-1) - y
    grad_w = (r.unsqueeze(-2) @ x).squeeze(-2) * (2.0 / x.shape[-2])
    return 2.0 * u * grad_w, -2.0 * v * grad_w


def hessian_trace(u: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """Exact trace of the Hessian in (u, v) of the mean squared error on inputs x (n, d), for
    parameters of shape (..., d); the targets drop out.

    d2L/du_j2 = (8/n) u_j^2 sum_i x_ij^2 + (4/n) sum_i r_i x_ij and d2L/dv_j2 is the same with v_j
    and the residual term negated, so the residual terms cancel at any point, not only at
    interpolation: tr = (8/n) sum_j (u_j^2 + v_j^2) sum_i x_ij^2.
    """
    return (8.0 / x.shape[0]) * ((u * u + v * v) * (x * x).sum(0)).sum(-1)


def mse(u: Tensor, v: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of the model(s) (..., d) on x (n, d), y (n,): shape (...)."""
    return ((u * u - v * v) @ x.T - y).square().mean(-1)


def draw_batches(
    train_x: Tensor,
    train_y: Tensor,
    *,
    num_workers: int,
    local_batch: int,
    label_noise: float,
    num_steps: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Inputs (num_steps, K, B, d) and noisy targets (num_steps, K, B): every worker's batch at every
    step, indices drawn uniformly with replacement, then targets + label_noise * (+-1)."""
    shape = (num_steps, num_workers, local_batch)
    index = torch.randint(0, len(train_y), shape, generator=generator)
    sign = torch.randint(0, 2, shape, generator=generator).to(train_y.dtype) * 2 - 1
    return train_x[index], train_y[index] + label_noise * sign


@dataclass(kw_only=True)
class ToyRun:
    """What :func:`train` returns. Metrics are (num_logs, R) tensors, one column per H, measured at
    the workers' averaged parameters (the synced model when the step is a multiple of H)."""

    sync_every: list[int]
    """H of each run (column)."""
    steps: list[int]
    """Optimizer steps taken before each log (0 first, ``num_steps`` last)."""
    hessian_trace: Tensor
    """Exact Hessian trace of the clean full-batch training loss."""
    train_loss: Tensor
    """Training MSE on the clean targets."""
    test_loss: Tensor
    """Test MSE."""
    w_error: Tensor
    """||w - w*|| (Euclidean)."""
    u: Tensor
    """Final per-worker u, (R, K, d)."""
    v: Tensor
    """Final per-worker v, (R, K, d)."""


def train(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    w_star: Tensor,
    *,
    sync_every: Sequence[int],
    num_workers: int = 8,
    local_batch: int = 4,
    lr: float = 0.01,
    alpha: float = 0.1,
    label_noise: float = 0.5,
    num_steps: int,
    log_every: int,
    seed: int = 0,
) -> ToyRun:
    """Local SGD on the diagonal linear network from u = v = alpha, one run per H in
    ``sync_every``, all on the same draws: batches come from :func:`draw_batches` with
    ``torch.Generator().manual_seed(seed)``, called for at most :data:`CHUNK_STEPS` steps at a time.

    Each step every worker takes one plain SGD step (lr ``lr``) on its own batch; after every
    H-th step a run replaces each worker's u and v by the workers' average.

    Args:
        train_x, train_y: clean training set (n, d), (n,); its dtype is the simulation's.
        test_x, test_y: test set.
        w_star: the ground truth (d,), for ``w_error``.
        sync_every: the H of each run, integers >= 1.
        num_workers: K.
        local_batch: B, samples per worker per step.
        lr: learning rate.
        alpha: initialization scale (> 0).
        label_noise: standard deviation of the Rademacher label noise (>= 0).
        num_steps: optimizer steps per worker.
        log_every: measure every this many steps (and after the last).
        seed: seed of the batch and noise draws.
    """
    if len(sync_every) == 0:
        raise ValueError("sync_every is empty: pass at least one H (1 is synchronous SGD)")
    hs = [_positive_int("sync_every", h) for h in sync_every]
    k = _positive_int("num_workers", num_workers)
    _positive_int("local_batch", local_batch)
    _positive_int("num_steps", num_steps)
    _positive_int("log_every", log_every)
    for name, value in (("lr", lr), ("alpha", alpha)):
        if not value > 0:
            raise ValueError(f"{name} ({value!r}) must be > 0")
    if not label_noise >= 0:
        raise ValueError(f"label_noise ({label_noise!r}) must be >= 0")
    n, d = train_x.shape if train_x.dim() == 2 else (-1, -1)
    if n < 1 or train_y.shape != (n,) or w_star.shape != (d,) or test_x.shape[1:] != (d,):
        raise ValueError(
            f"shapes disagree: train_x {tuple(train_x.shape)}, train_y {tuple(train_y.shape)}, "
            f"test_x {tuple(test_x.shape)}, w_star {tuple(w_star.shape)}; want (n, d), (n,), (m, d), (d,)"
        )

    u = torch.full((len(hs), k, d), float(alpha), dtype=train_x.dtype)
    v = u.clone()
    generator = torch.Generator().manual_seed(seed)
    logs: list[tuple[int, Tensor, Tensor, Tensor, Tensor]] = []

    def log(step: int) -> None:
        mu, mv = u.mean(1), v.mean(1)
        error = (mu * mu - mv * mv - w_star).norm(dim=-1)
        logs.append(
            (
                step,
                hessian_trace(mu, mv, train_x),
                mse(mu, mv, train_x, train_y),
                mse(mu, mv, test_x, test_y),
                error,
            )
        )

    log(0)
    for start in range(0, num_steps, CHUNK_STEPS):
        count = min(CHUNK_STEPS, num_steps - start)
        xs, ys = draw_batches(
            train_x,
            train_y,
            num_workers=k,
            local_batch=local_batch,
            label_noise=label_noise,
            num_steps=count,
            generator=generator,
        )
        for i in range(count):
            # x (K, B, d) broadcasts against u (R, K, d): all runs see the same batches
            gu, gv = gradients(u, v, xs[i], ys[i])
            u.sub_(lr * gu)
            v.sub_(lr * gv)
            step = start + i + 1
            for r, h in enumerate(hs):
                if step % h == 0:
                    u[r] = u[r].mean(0)
                    v[r] = v[r].mean(0)
            if step % log_every == 0 or step == num_steps:
                log(step)
    columns = list(zip(*logs))
    return ToyRun(
        sync_every=hs,
        steps=list(columns[0]),
        hessian_trace=torch.stack(columns[1]),
        train_loss=torch.stack(columns[2]),
        test_loss=torch.stack(columns[3]),
        w_error=torch.stack(columns[4]),
        u=u,
        v=v,
    )
