"""The vectorized diagonal-network toy (localsgd.research.toy): closed forms against autograd, and the
algorithm against SGD on the concatenated batch (H = 1) and against per-worker
DiagonalLinearNet + torch.optim.SGD by hand (H > 1), on the same draws."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from localsgd.research.models import DiagonalLinearNet, Regressor
from localsgd.research.toy import draw_batches, gradients, hessian_trace, mse, train

DIM, NUM_TRAIN, K, B, LR, ALPHA, NOISE = 6, 7, 3, 2, 0.05, 0.7, 0.5


def _problem(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w_star = torch.tensor([1.0, 0, 0, 1.0, 0, 0], dtype=torch.float64)
    x = torch.randn(NUM_TRAIN + 20, DIM, generator=g, dtype=torch.float64)
    y = x @ w_star
    return x[:NUM_TRAIN], y[:NUM_TRAIN], x[NUM_TRAIN:], y[NUM_TRAIN:], w_star


def _sgd_step(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One torch.optim.SGD step of DiagonalLinearNet on Regressor's loss, from (u, v)."""
    net = DiagonalLinearNet(dim=DIM, alpha=1.0).double()
    with torch.no_grad():
        net.u.copy_(u)
        net.v.copy_(v)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    Regressor(net, lr=LR).loss((x, y)).backward()
    opt.step()
    return net.u.detach(), net.v.detach()


def test_closed_forms_equal_autograd_away_from_interpolation() -> None:
    x, y, *_ = _problem()
    g = torch.Generator().manual_seed(1)
    u, v = (torch.rand(DIM, generator=g, dtype=torch.float64) + 0.2 for _ in range(2))

    def loss(uv: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(x @ (uv[:DIM] ** 2 - uv[DIM:] ** 2), y)

    uv = torch.cat([u, v]).requires_grad_()
    assert loss(uv) > 0.1  # residuals are large: the cancellation in the trace is really tested
    (auto_grad,) = torch.autograd.grad(loss(uv), uv)
    gu, gv = gradients(u, v, x, y)
    torch.testing.assert_close(torch.cat([gu, gv]), auto_grad)
    hessian = torch.autograd.functional.hessian(loss, uv.detach())
    torch.testing.assert_close(hessian_trace(u, v, x), hessian.diagonal().sum())
    torch.testing.assert_close(mse(u, v, x, y), loss(uv).detach())
    # batched over leading dims as the simulation uses them: (R, K, d) params, (K, B, d) batches
    us, vs = u.expand(2, 3, DIM), v.expand(2, 3, DIM)
    bgu, _ = gradients(us, vs, x[:6].view(3, 2, DIM), y[:6].view(3, 2))
    torch.testing.assert_close(bgu[1, 2], gradients(u, v, x[4:6], y[4:6])[0])


def test_draws_have_fresh_rademacher_noise_per_worker_and_step() -> None:
    x, y, _, _, w_star = _problem()
    xs, ys = draw_batches(
        x, y, num_workers=K, local_batch=B, label_noise=NOISE, num_steps=50, generator=torch.Generator()
    )
    assert xs.shape == (50, K, B, DIM) and ys.shape == (50, K, B)
    noise = ys - xs @ w_star
    torch.testing.assert_close(noise.abs(), torch.full_like(noise, NOISE))
    assert (noise[0] > 0).any() and (noise[0] < 0).any()  # workers differ within a step
    assert not torch.equal(noise[0], noise[1])  # and steps differ


def _run(sync_every: list[int], num_steps: int, seed: int = 3) -> Any:
    x, y, tx, ty, w_star = _problem()
    return train(
        x, y, tx, ty, w_star,
        sync_every=sync_every, num_workers=K, local_batch=B, lr=LR, alpha=ALPHA,
        label_noise=NOISE, num_steps=num_steps, log_every=4, seed=seed,
    )  # fmt: skip


def _same_draws(num_steps: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, *_ = _problem()
    generator = torch.Generator().manual_seed(seed)
    return draw_batches(
        x, y, num_workers=K, local_batch=B, label_noise=NOISE, num_steps=num_steps, generator=generator
    )


def test_h1_is_sgd_on_the_concatenated_batch_and_h4_is_local_sgd_by_hand() -> None:
    steps, h = 12, 4
    run = _run([1, h], steps)
    xs, ys = _same_draws(steps)
    # H = 1: one model, batch K * B, the same draws
    u = v = torch.full((DIM,), ALPHA, dtype=torch.float64)
    for t in range(steps):
        u, v = _sgd_step(u, v, xs[t].reshape(K * B, DIM), ys[t].reshape(K * B))
    assert torch.equal(run.u[0], run.u[0, :1].expand(K, DIM))  # workers stay equal
    torch.testing.assert_close(run.u[0, 0], u)
    torch.testing.assert_close(run.v[0, 0], v)
    # H = 4: each worker its own model and optimizer for H steps, then average, three rounds
    us = vs = torch.full((K, DIM), ALPHA, dtype=torch.float64)
    for start in range(0, steps, h):
        pairs = []
        for k in range(K):
            uk, vk = us[k], vs[k]
            for t in range(start, start + h):
                uk, vk = _sgd_step(uk, vk, xs[t, k], ys[t, k])
            pairs.append((uk, vk))
        us, vs = (torch.stack(p) for p in zip(*pairs))
        assert (us - us.mean(0)).abs().max() > 1e-3  # local steps made the workers differ
        us, vs = us.mean(0).expand(K, DIM), vs.mean(0).expand(K, DIM)
    torch.testing.assert_close(run.u[1], us)
    torch.testing.assert_close(run.v[1], vs)
    assert (run.u[1] - run.u[0]).abs().max() > 1e-3  # H matters: the two runs differ


def test_logs_measure_the_averaged_model_at_the_logged_steps() -> None:
    run = _run([1, 3], 10)
    x, y, tx, ty, w_star = _problem()
    assert run.steps == [0, 4, 8, 10]
    mu, mv = run.u.mean(1), run.v.mean(1)
    torch.testing.assert_close(run.hessian_trace[-1], hessian_trace(mu, mv, x))
    torch.testing.assert_close(run.train_loss[-1], mse(mu, mv, x, y))
    torch.testing.assert_close(run.test_loss[-1], mse(mu, mv, tx, ty))
    torch.testing.assert_close(run.w_error[-1], (mu**2 - mv**2 - w_star).norm(dim=-1))
    init = torch.full((2, DIM), ALPHA, dtype=torch.float64)
    torch.testing.assert_close(run.hessian_trace[0], hessian_trace(init, init, x))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sync_every", [], r"sync_every is empty"),
        ("sync_every", [10, 0], r"sync_every \(0\) must be an integer >= 1"),
        ("num_workers", 0, r"num_workers \(0\) must be an integer >= 1"),
        ("local_batch", 2.0, r"local_batch \(2.0\) must be an integer >= 1"),
        ("num_steps", -1, r"num_steps \(-1\) must be an integer >= 1"),
        ("log_every", True, r"log_every \(True\) must be an integer >= 1"),
        ("lr", 0.0, r"lr \(0.0\) must be > 0"),
        ("alpha", -0.5, r"alpha \(-0.5\) must be > 0"),
        ("label_noise", float("nan"), r"label_noise \(nan\) must be >= 0"),
        ("w_star", torch.zeros(DIM + 1), r"shapes disagree: .*w_star \(7,\)"),
    ],
)
def test_bad_arguments_raise_naming_the_field(field: str, value: object, match: str) -> None:
    x, y, tx, ty, w_star = _problem()
    kwargs: dict[str, Any] = {"sync_every": [1], "num_steps": 2, "log_every": 1, field: value}
    data = {"w_star": kwargs.pop("w_star", w_star)}
    with pytest.raises(ValueError, match=match):
        train(x, y, tx, ty, data["w_star"], **kwargs)
