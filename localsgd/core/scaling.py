"""Learning-rate scaling rules and a warmup + decay LR schedule.

=====================  =========================================  ======================================
rule                   formula                                    source
=====================  =========================================  ======================================
linear_scaling_rule    lr * batch / base_batch (SGD, SGDM)        Goyal et al. 2017, arXiv 1706.02677
sqrt_scaling_rule      batch * k (Adam, RMSprop): lr * sqrt(k),   Malladi et al. 2022, arXiv 2205.10287
                       1 - beta -> (1 - beta) * k, eps / sqrt(k)
sgdm_effective_lr      SGDM(lr, m) ~ SGD(lr / (1 - m))            Wang et al. 2023, arXiv 2307.15196
sgdm_lr_for_effective  effective_lr * (1 - m), the inverse        Wang et al. 2023, arXiv 2307.15196
intrinsic_lr           lr * weight_decay                          Li, Lyu & Arora 2020, arXiv 2010.02916
WarmupDecayLR          (step + 1) / warmup_steps, then cosine,    warmup: Goyal et al. 2017;
                       linear, step (x gamma at milestones)       cosine: Loshchilov & Hutter,
                       or constant                                arXiv 1608.03983
=====================  =========================================  ======================================

Imports only the standard library and ``torch.optim``: no Lightning, no distributed code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

Decay = Literal["cosine", "linear", "step", "constant"]


def _check_lr(name: str, lr: float) -> None:
    if lr < 0:
        raise ValueError(f"{name} ({lr}) must be >= 0")


def _check_momentum(momentum: float) -> None:
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum ({momentum}) must be in [0, 1)")


def linear_scaling_rule(lr: float, *, base_batch: int, batch: int) -> float:
    """SGD / SGDM lr for total batch ``batch``, tuned at ``base_batch``: ``lr * batch / base_batch``.

    Goyal et al., "Accurate, Large Minibatch SGD" (arXiv 1706.02677). For Local SGD the batch is the total
    one, ``num_workers * local_batch``. Pair it with a warmup (:class:`WarmupDecayLR`) for large factors.
    """
    _check_lr("lr", lr)
    for name, value in (("base_batch", base_batch), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")
    return lr * batch / base_batch


@dataclass(frozen=True, kw_only=True)
class AdamHyperparams:
    """Adam / RMSprop hyperparameters returned by :func:`sqrt_scaling_rule`.

    ``torch.optim.Adam(params, **hp.as_kwargs())`` (RMSprop takes ``alpha=hp.betas[1]`` instead of betas).
    """

    lr: float
    """Learning rate."""
    betas: tuple[float, float]
    """(beta1, beta2): decay rates of the first and second moment estimates."""
    eps: float
    """Term added to the denominator."""

    def as_kwargs(self) -> dict[str, float | tuple[float, float]]:
        """Keyword arguments for ``torch.optim.Adam`` / ``AdamW``."""
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps}


def sqrt_scaling_rule(*, lr: float, betas: tuple[float, float], eps: float, kappa: float) -> AdamHyperparams:
    """Adam / RMSprop hyperparameters for the batch multiplied by ``kappa`` (square-root scaling rule).

    Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022
    (arXiv 2205.10287): ``lr * sqrt(kappa)``, ``1 - beta`` times ``kappa`` for both betas and
    ``eps / sqrt(kappa)``. ``kappa < 1`` (a smaller batch) is allowed. A rescaled beta must stay in [0, 1),
    so ``kappa <= 1 / (1 - beta)`` for both betas.
    """
    if kappa <= 0:
        raise ValueError(f"kappa ({kappa}) must be > 0 (the factor by which the batch is multiplied)")
    _check_lr("lr", lr)
    if eps < 0:
        raise ValueError(f"eps ({eps}) must be >= 0")
    if len(betas) != 2:
        raise ValueError(f"betas ({betas!r}) must be a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if not 0 <= beta < 1:
            raise ValueError(f"betas[{i}] ({beta}) must be in [0, 1)")
    max_kappa = min(1 / (1 - beta) for beta in betas)
    scaled = tuple(1 - (1 - beta) * kappa for beta in betas)
    for i, (beta, new) in enumerate(zip(betas, scaled)):
        if not 0 <= new < 1:
            raise ValueError(
                f"betas[{i}] ({beta}) rescaled by kappa ({kappa}) is 1 - (1 - {beta}) * {kappa} = {new:.6g}, "
                f"which must be in [0, 1). HINT: kappa must be <= 1 / (1 - beta) = {max_kappa:.6g} "
                "for these betas; use a smaller batch factor or larger betas"
            )
    root = math.sqrt(kappa)
    return AdamHyperparams(lr=lr * root, betas=(scaled[0], scaled[1]), eps=eps / root)


def sgdm_effective_lr(lr: float, momentum: float) -> float:
    """Learning rate of plain SGD that SGD with heavy-ball momentum behaves like: ``lr / (1 - momentum)``.

    SGDM(gamma, beta) ~ SGD(eta = gamma / (1 - beta)) for small learning rates: Wang et al., "The Marginal
    Value of Momentum for Small Learning Rate SGD" (arXiv 2307.15196). Assumes ``torch.optim.SGD``'s
    default ``dampening=0``.
    """
    _check_lr("lr", lr)
    _check_momentum(momentum)
    return lr / (1 - momentum)


def sgdm_lr_for_effective(effective_lr: float, momentum: float) -> float:
    """Inverse of :func:`sgdm_effective_lr`: the SGDM lr, ``effective_lr * (1 - momentum)``.

    Same source (arXiv 2307.15196).
    """
    _check_lr("effective_lr", effective_lr)
    _check_momentum(momentum)
    return effective_lr * (1 - momentum)


def intrinsic_lr(lr: float, weight_decay: float) -> float:
    """Intrinsic learning rate ``lr * weight_decay`` of a scale-invariant (normalized) network.

    Li, Lyu & Arora, "Reconciling Modern Deep Learning with Traditional Optimization Analyses: The Intrinsic
    Learning Rate", NeurIPS 2020 (arXiv 2010.02916): the equilibrium is governed by this product.
    """
    _check_lr("lr", lr)
    if weight_decay < 0:
        raise ValueError(f"weight_decay ({weight_decay}) must be >= 0")
    return lr * weight_decay


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} ({value!r}) must be an integer >= {minimum}")


def _check_schedule(
    warmup: int, total: int, decay: str, ratio: float, milestones: Sequence[int], gamma: float
) -> None:
    _check_int("total_steps", total, 1)
    _check_int("warmup_steps", warmup, 0)
    if warmup > total:
        raise ValueError(f"warmup_steps ({warmup}) must be <= total_steps ({total})")
    allowed = get_args(Decay)
    if decay not in allowed:
        raise ValueError(f"decay ({decay!r}) must be one of {', '.join(repr(a) for a in allowed)}")
    if not 0 <= ratio <= 1:
        raise ValueError(f"final_lr_ratio ({ratio}) must be in [0, 1]")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma ({gamma}) must be in (0, 1]")
    if milestones and decay != "step":
        raise ValueError(f"milestones ({list(milestones)}) only apply to decay='step', not decay={decay!r}")
    if decay == "step" and not milestones:
        raise ValueError("milestones must not be empty under decay='step'. HINT: or use decay='constant'")
    previous = warmup
    for m in milestones:
        if isinstance(m, bool) or not isinstance(m, int) or not previous < m <= total:
            raise ValueError(
                f"milestones ({list(milestones)}) must be increasing integers, each > warmup_steps "
                f"({warmup}) and <= total_steps ({total}); {m!r} is not"
            )
        previous = m


def _factor(
    step: int, warmup: int, total: int, decay: str, ratio: float, milestones: Sequence[int], gamma: float
) -> float:
    if step < warmup:
        return (step + 1) / warmup
    step = min(step, total)
    if decay == "constant":
        return 1.0
    if decay == "step":
        return gamma ** sum(1 for m in milestones if m <= step)
    span = total - warmup
    progress = (step - warmup) / span if span else 1.0
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return ratio + (1 - ratio) * shape


def warmup_decay_factor(
    step: int,
    *,
    warmup_steps: int = 0,
    total_steps: int,
    decay: Decay = "cosine",
    final_lr_ratio: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Factor applied to the base lr at ``step`` (0-based) by :class:`WarmupDecayLR` with the same arguments.

    ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (1 on the last warmup step, never 0), then by
    ``decay``, with ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` and ``r = final_lr_ratio``:
    cosine ``r + (1 - r) * (1 + cos(pi * p)) / 2``; linear ``r + (1 - r) * (1 - p)``; step ``gamma ** n``
    where n counts the milestones <= step; constant ``1``. Steps past ``total_steps`` keep the final factor.
    """
    _check_int("step", step, 0)
    milestones = tuple(milestones)
    _check_schedule(warmup_steps, total_steps, decay, final_lr_ratio, milestones, gamma)
    return _factor(step, warmup_steps, total_steps, decay, final_lr_ratio, milestones, gamma)


class WarmupDecayLR(LambdaLR):
    """Linear warmup, then cosine / linear / step / constant decay; see :func:`warmup_decay_factor`.

    Counts ``scheduler.step()`` calls. In Lightning, step it per optimizer step: return
    ``{"scheduler": s, "interval": "step"}`` from ``configure_optimizers``. The ``localsgd`` CLI does
    this for its ``lr_scheduler:`` key (plain LightningCLI would step it once per epoch).
    The arguments are kept in ``state_dict``, so loading a checkpoint restores the schedule it was saved with.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup_steps: int = 0,
        total_steps: int,
        decay: Decay = "cosine",
        final_lr_ratio: float = 0.0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        """Arguments as in :func:`warmup_decay_factor`; ``last_epoch`` as in ``LambdaLR``."""
        milestones = tuple(milestones)
        _check_schedule(warmup_steps, total_steps, decay, final_lr_ratio, milestones, gamma)
        self.warmup_steps = warmup_steps
        """Steps of linear warmup from ``1 / warmup_steps`` of the base lr to the base lr."""
        self.total_steps = total_steps
        """Step at which the decay ends; the factor stays at its final value afterwards."""
        self.decay: Decay = decay
        """Shape after the warmup: ``"cosine"``, ``"linear"``, ``"step"`` or ``"constant"``."""
        self.final_lr_ratio = final_lr_ratio
        """Final lr / base lr for cosine and linear decay."""
        self.milestones = milestones
        """Steps (from the start) at which step decay multiplies the lr by ``gamma``."""
        self.gamma = gamma
        """Factor of step decay at each milestone."""
        # A bound method reading the attributes above, not a closure: they go into state_dict as plain data
        # (loadable with weights_only=True), and load_state_dict restoring them restores the schedule.
        super().__init__(optimizer, self._lr_factor, last_epoch=last_epoch)

    def _lr_factor(self, step: int) -> float:
        return _factor(
            step,
            self.warmup_steps,
            self.total_steps,
            self.decay,
            self.final_lr_ratio,
            self.milestones,
            self.gamma,
        )
