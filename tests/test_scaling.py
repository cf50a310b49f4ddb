"""Scaling rules and the warmup + decay LR schedule against hand-computed numbers (pure, milliseconds)."""

from __future__ import annotations

import ast
import inspect
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from localsgd.core import scaling
from localsgd.core.scaling import (
    AdamHyperparams,
    WarmupDecayLR,
    intrinsic_lr,
    linear_scaling_rule,
    sgdm_effective_lr,
    sgdm_lr_for_effective,
    sqrt_scaling_rule,
    warmup_decay_factor,
)

SQRT8 = 2.8284271247461903


def test_imports_no_lightning_and_no_distributed() -> None:
    tree = ast.parse(Path(scaling.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names == {"__future__", "math", "collections.abc", "dataclasses", "typing", "torch.optim",
                     "torch.optim.lr_scheduler"}  # fmt: skip


# --- linear rule (Goyal et al. 2017) ---------------------------------------------------------------------


def test_linear_scaling_rule() -> None:
    assert linear_scaling_rule(0.1, base_batch=256, batch=8192) == pytest.approx(3.2)  # 0.1 * 32
    assert linear_scaling_rule(0.1, base_batch=256, batch=64) == pytest.approx(0.025)  # 0.1 / 4
    assert linear_scaling_rule(0.1, base_batch=256, batch=256) == 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -0.1, "base_batch": 256, "batch": 512}, r"lr \(-0.1\) must be >= 0"),
        ({"lr": 0.1, "base_batch": 0, "batch": 512}, r"base_batch \(0\) must be >= 1"),
        ({"lr": 0.1, "base_batch": 256, "batch": 0}, r"^batch \(0\) must be >= 1"),
    ],
)
def test_linear_scaling_rule_errors(kwargs: dict[str, Any], match: str) -> None:
    lr = kwargs.pop("lr")
    with pytest.raises(ValueError, match=match):
        linear_scaling_rule(lr, **kwargs)


# --- square-root rule (Malladi et al. 2022) --------------------------------------------------------------


def test_sqrt_scaling_rule_kappa_8() -> None:
    hp = sqrt_scaling_rule(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, kappa=8)
    assert hp.lr == pytest.approx(1e-3 * SQRT8)
    assert hp.betas == pytest.approx((0.2, 0.992))  # 1 - 0.1 * 8, 1 - 0.001 * 8
    assert hp.eps == pytest.approx(1e-8 / SQRT8)
    assert isinstance(hp, AdamHyperparams) and isinstance(hp.betas, tuple)


def test_sqrt_scaling_rule_smaller_batch_and_identity() -> None:
    hp = sqrt_scaling_rule(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, kappa=0.25)
    assert hp.lr == pytest.approx(5e-4)
    assert hp.betas == pytest.approx((0.975, 0.99975))  # 1 - 0.1 / 4, 1 - 0.001 / 4
    assert hp.eps == pytest.approx(2e-8)
    same = sqrt_scaling_rule(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, kappa=1)
    assert (same.lr, same.betas, same.eps) == (1e-3, pytest.approx((0.9, 0.999)), 1e-8)
    # at kappa = 1 / (1 - beta1) beta1 reaches 0, still allowed
    assert sqrt_scaling_rule(lr=1e-3, betas=(0.5, 0.999), eps=1e-8, kappa=2).betas[0] == 0.0


def test_sqrt_scaling_rule_splats_into_adam() -> None:
    hp = sqrt_scaling_rule(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, kappa=8)
    opt = torch.optim.Adam(nn.Linear(2, 1).parameters(), **hp.as_kwargs())  # type: ignore[arg-type]
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (hp.lr, hp.betas, hp.eps)
    with pytest.raises(AttributeError):
        hp.lr = 1.0  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kappa": 0}, r"kappa \(0\) must be > 0"),
        ({"kappa": -2}, r"kappa \(-2\) must be > 0"),
        ({"lr": -1e-3}, r"lr \(-0.001\) must be >= 0"),
        ({"eps": -1e-8}, r"eps \(-1e-08\) must be >= 0"),
        ({"betas": (0.9, 0.99, 0.999)}, r"betas \(\(0.9, 0.99, 0.999\)\) must be a pair"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\] \(1.0\) must be in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\] \(-0.1\) must be in \[0, 1\)"),
        # 1 - 0.1 * 11 = -0.1 < 0; the largest kappa is 1 / (1 - 0.9) = 10
        (
            {"kappa": 11},
            r"betas\[0\] \(0.9\) rescaled by kappa \(11\) is 1 - \(1 - 0.9\) \* 11 = -0.1, which must be in "
            r"\[0, 1\)\. HINT: kappa must be <= 1 / \(1 - beta\) = 10 ",
        ),
        # beta2 = 0.4 fails first: 1 - 0.6 * 1.8 = -0.08; the largest kappa is 1 / 0.6 = 1.66667
        (
            {"betas": (0.5, 0.4), "kappa": 1.8},
            r"betas\[1\] \(0.4\) rescaled by kappa \(1.8\) is .* = -0.08, .*kappa must be <= .* = 1.66667 ",
        ),
    ],
)
def test_sqrt_scaling_rule_errors(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "kappa": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        sqrt_scaling_rule(**args)


# --- SGDM <-> SGD (Wang et al. 2023) and intrinsic LR (Li, Lyu & Arora 2020) ----------------------------


def test_sgdm_effective_lr_and_inverse() -> None:
    assert sgdm_effective_lr(0.1, 0.9) == pytest.approx(1.0)  # 0.1 / 0.1
    assert sgdm_effective_lr(0.1, 0.0) == 0.1
    assert sgdm_lr_for_effective(1.0, 0.9) == pytest.approx(0.1)
    assert sgdm_lr_for_effective(2.0, 0.99) == pytest.approx(0.02)
    assert sgdm_lr_for_effective(sgdm_effective_lr(0.05, 0.95), 0.95) == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sgdm_effective_lr(0.1, 1.0), r"momentum \(1.0\) must be in \[0, 1\)"),
        (lambda: sgdm_effective_lr(0.1, -0.1), r"momentum \(-0.1\) must be in \[0, 1\)"),
        (lambda: sgdm_effective_lr(-0.1, 0.9), r"lr \(-0.1\) must be >= 0"),
        (lambda: sgdm_lr_for_effective(1.0, 1.5), r"momentum \(1.5\) must be in \[0, 1\)"),
        (lambda: sgdm_lr_for_effective(-1.0, 0.9), r"effective_lr \(-1.0\) must be >= 0"),
        (lambda: intrinsic_lr(-0.1, 5e-4), r"lr \(-0.1\) must be >= 0"),
        (lambda: intrinsic_lr(0.1, -5e-4), r"weight_decay \(-0.0005\) must be >= 0"),
    ],
)
def test_sgdm_and_intrinsic_errors(call: Callable[[], float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_intrinsic_lr() -> None:
    assert intrinsic_lr(0.1, 5e-4) == pytest.approx(5e-5)
    assert intrinsic_lr(0.4, 0.0) == 0.0


# --- warmup + decay ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # cosine, warmup 4, decay over steps 4..12 down to 0.1
        (
            {"warmup_steps": 4, "total_steps": 12, "decay": "cosine", "final_lr_ratio": 0.1},
            # step 6: p = 1/4, 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.868198; step 8: p = 1/2, 0.1 + 0.9 / 2
            {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: 0.8681980515, 8: 0.55, 12: 0.1, 13: 0.1, 1000: 0.1},
        ),
        # linear, warmup 2, decay over steps 2..10 down to 0.2
        (
            {"warmup_steps": 2, "total_steps": 10, "decay": "linear", "final_lr_ratio": 0.2},
            {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.8, 6: 0.6, 10: 0.2, 15: 0.2},
        ),
        # step, x0.5 at steps 4 and 7
        (
            {"warmup_steps": 2, "total_steps": 10, "decay": "step", "milestones": (4, 7), "gamma": 0.5},
            {0: 0.5, 1: 1.0, 2: 1.0, 3: 1.0, 4: 0.5, 6: 0.5, 7: 0.25, 10: 0.25, 99: 0.25},
        ),
        ({"warmup_steps": 3, "total_steps": 5, "decay": "constant"}, {0: 1 / 3, 2: 1.0, 3: 1.0, 100: 1.0}),
        # no warmup: the first step is at the full lr
        ({"total_steps": 4}, {0: 1.0, 1: 0.8535533906, 2: 0.5, 4: 0.0, 5: 0.0}),
        ({"total_steps": 1, "decay": "linear"}, {0: 1.0, 1: 0.0, 2: 0.0}),
        # all warmup: the final ratio from total_steps on
        ({"warmup_steps": 5, "total_steps": 5, "final_lr_ratio": 0.3}, {0: 0.2, 4: 1.0, 5: 0.3, 6: 0.3}),
    ],
)
def test_warmup_decay_factor(kwargs: dict[str, Any], expected: dict[int, float]) -> None:
    got = {step: warmup_decay_factor(step, **kwargs) for step in expected}
    assert got == pytest.approx(expected)


def _scheduler(**kwargs: Any) -> WarmupDecayLR:
    return WarmupDecayLR(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), **kwargs)


def _factor(**kwargs: Any) -> float:
    return warmup_decay_factor(0, **kwargs)


@pytest.mark.parametrize("make", [_factor, _scheduler], ids=["function", "scheduler"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0}, r"total_steps \(0\) must be an integer >= 1"),
        ({"total_steps": 10.0}, r"total_steps \(10.0\) must be an integer >= 1"),
        ({"total_steps": True}, r"total_steps \(True\) must be an integer >= 1"),
        ({"warmup_steps": -1}, r"warmup_steps \(-1\) must be an integer >= 0"),
        ({"warmup_steps": 11}, r"warmup_steps \(11\) must be <= total_steps \(10\)"),
        ({"decay": "exp"}, r"decay \('exp'\) must be one of 'cosine', 'linear', 'step', 'constant'"),
        ({"final_lr_ratio": 1.5}, r"final_lr_ratio \(1.5\) must be in \[0, 1\]"),
        ({"final_lr_ratio": -0.1}, r"final_lr_ratio \(-0.1\) must be in \[0, 1\]"),
        ({"gamma": 0.0}, r"gamma \(0.0\) must be in \(0, 1\]"),
        ({"gamma": 2.0}, r"gamma \(2.0\) must be in \(0, 1\]"),
        ({"milestones": (5,)}, r"milestones \(\[5\]\) only apply to decay='step', not decay='cosine'"),
        (
            {"decay": "step"},
            r"milestones must not be empty under decay='step'\. HINT: or use decay='constant'",
        ),
        (
            {"decay": "step", "milestones": (5, 3)},
            r"milestones \(\[5, 3\]\) must be increasing integers, each > warmup_steps \(0\) and <= "
            r"total_steps \(10\); 3 is not",
        ),
        ({"decay": "step", "milestones": (0,)}, r"milestones \(\[0\]\) must be increasing .*; 0 is not"),
        ({"decay": "step", "milestones": (11,)}, r"<= total_steps \(10\); 11 is not"),
        ({"decay": "step", "milestones": (2.5,)}, r"; 2.5 is not"),
        ({"decay": "step", "milestones": (2,), "warmup_steps": 2}, r"each > warmup_steps \(2\).*; 2 is not"),
    ],
)
def test_schedule_errors(make: Callable[..., object], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**({"total_steps": 10} | kwargs))


def test_factor_rejects_negative_step() -> None:
    with pytest.raises(ValueError, match=r"step \(-1\) must be an integer >= 0"):
        warmup_decay_factor(-1, total_steps=10)


def test_scheduler_signature_suits_lightning_cli() -> None:
    params = list(inspect.signature(WarmupDecayLR).parameters.values())
    assert params[0].name == "optimizer" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    assert [p.name for p in params if p.default is inspect.Parameter.empty] == ["optimizer", "total_steps"]


SCHEDULE: dict[str, Any] = {"warmup_steps": 3, "total_steps": 12, "decay": "cosine", "final_lr_ratio": 0.1}


def _training(**schedule: Any) -> tuple[nn.Linear, torch.optim.SGD, WarmupDecayLR]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    groups: list[dict[str, Any]] = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.05}]
    opt = torch.optim.SGD(groups, lr=0.2, momentum=0.9)
    return model, opt, WarmupDecayLR(opt, **schedule)


def _steps(model: nn.Linear, opt: torch.optim.SGD, sched: WarmupDecayLR, n: int) -> list[list[float]]:
    lrs = []
    for _ in range(n):
        lrs.append([g["lr"] for g in opt.param_groups])
        model(torch.ones(4, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return lrs


def test_scheduler_drives_sgd_like_the_factor() -> None:
    model, opt, sched = _training(**SCHEDULE)
    lrs = _steps(model, opt, sched, 16)  # past total_steps
    expected = [
        [0.2 * warmup_decay_factor(i, **SCHEDULE), 0.05 * warmup_decay_factor(i, **SCHEDULE)]
        for i in range(16)
    ]
    assert torch.allclose(torch.tensor(lrs, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))
    assert lrs[0] == pytest.approx([0.2 / 3, 0.05 / 3]) and lrs[2] == pytest.approx([0.2, 0.05])
    assert lrs[15] == pytest.approx([0.02, 0.005])


def test_state_dict_round_trip_equals_uninterrupted_run() -> None:
    model, opt, sched = _training(**SCHEDULE)
    uninterrupted = _steps(model, opt, sched, 14)
    final = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = _training(**SCHEDULE)
    first = _steps(model, opt, sched, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain data only: no pickled lambdas or classes
    assert checkpoint["sched"]["last_epoch"] == 5

    # resumed with a different schedule: the checkpoint's schedule wins
    model, opt, sched = _training(total_steps=99, decay="linear")
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sched.load_state_dict(checkpoint["sched"])
    assert (sched.total_steps, sched.decay) == (12, "cosine")
    resumed = first + _steps(model, opt, sched, 9)
    assert resumed == uninterrupted  # same arithmetic: exactly equal
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), final))
    assert not math.isclose(resumed[5][0], 0.2 * warmup_decay_factor(5, total_steps=99, decay="linear"))
