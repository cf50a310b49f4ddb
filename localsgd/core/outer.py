"""Outer optimizers: what a sync does with the workers' average.

At a sync the workers' parameters are averaged; an outer optimizer then treats
``anchor - average`` as a gradient (the *pseudo-gradient*: how far the round moved
the model, with the sign of a gradient) and steps the *anchor*, the global model
of the previous sync, with an ordinary ``torch.optim`` optimizer. Every worker then
starts the next round from the new anchor (DESIGN pitfall 9: the step is taken from
the anchor, not from the workers' models).

* plain averaging (no outer optimizer) is SGD with lr 1 and no momentum: the anchor
  moves exactly to the average;
* SlowMo (Wang et al., ICLR 2020, arXiv 1910.00643): SGD with momentum on the
  pseudo-gradient, lr ``alpha`` ("slow learning rate") and momentum ``beta``;
* DiLoCo (Douillard et al. 2023, arXiv 2311.08105): Nesterov SGD, lr 0.7, momentum 0.9;
* any other ``torch.optim`` optimizer through :class:`OuterOptimizer`.

Every worker holds the same anchor and takes the same outer step on the same average,
so the anchors stay identical without extra communication. The anchors and the
optimizer's state are part of ``state_dict``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

OptimizerFactory = Callable[[Iterable[Tensor]], Optimizer]


def _check_lr_momentum(lr: float, momentum: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr ({lr!r}) must be a number > 0")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum ({momentum!r}) must be a number in [0, 1)")


class OuterOptimizer:
    """Steps the anchor with ``optimizer`` on the pseudo-gradient ``anchor - average``.

    Args:
        optimizer: builds a ``torch.optim`` optimizer from a list of tensors, e.g.
            ``functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)``
            (from YAML: ``class_path: torch.optim.SGD`` with ``init_args``).
    """

    def __init__(self, optimizer: OptimizerFactory) -> None:
        if not callable(optimizer):
            raise ValueError(f"optimizer ({optimizer!r}) must build a torch optimizer from a list of tensors")
        self._factory = optimizer
        self.anchors: list[Tensor] = []
        self.optimizer: Optimizer | None = None

    def bind(self, initial: Sequence[Tensor]) -> None:
        """Start from ``initial`` (the global model after the first broadcast), copied."""
        self.anchors = [t.detach().clone() for t in initial]
        for a in self.anchors:
            a.grad = torch.zeros_like(a)
        self.optimizer = self._factory(self.anchors)
        if not isinstance(self.optimizer, Optimizer):
            raise ValueError(f"optimizer built {type(self.optimizer).__name__}, not a torch.optim.Optimizer")

    def step(self, averages: Sequence[Tensor], only: Sequence[int] | None = None) -> list[Tensor]:
        """One outer step from this round's ``averages``; returns the new anchors (the new global
        model). ``only``: the anchors of this round's fragment; the others, and their optimizer
        state, are left as they are (each fragment has its own outer state)."""
        if self.optimizer is None:
            raise RuntimeError("OuterOptimizer.step() before bind()")
        if [a.shape for a in averages] != [a.shape for a in self.anchors]:
            raise RuntimeError("the averaged model no longer has the anchor's layout")
        stepped = set(range(len(self.anchors)) if only is None else only)
        grads = [a.grad for a in self.anchors]
        for i, (anchor, average) in enumerate(zip(self.anchors, averages)):
            assert anchor.grad is not None
            if i in stepped:
                torch.sub(anchor, average, out=anchor.grad)
            else:
                anchor.grad = None  # torch optimizers skip a tensor without a gradient
        try:
            self.optimizer.step()
        finally:
            for anchor, grad in zip(self.anchors, grads):
                anchor.grad = grad
        return self.anchors

    def preview(self, averages: Sequence[Tensor]) -> list[Tensor]:
        """What :meth:`step` would return for ``averages``, leaving the anchors and the optimizer's
        state as they are (what evaluation and checkpoints see mid-round)."""
        if self.optimizer is None:
            raise RuntimeError("OuterOptimizer.preview() before bind()")
        anchors = [a.detach().clone() for a in self.anchors]
        for anchor, average in zip(anchors, averages):
            anchor.grad = torch.sub(anchor, average)
        optimizer = self._factory(anchors)
        # deep: loading a state dict may keep its tensors, and the step updates them in place
        optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        optimizer.step()
        return anchors

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {}
        return {"anchors": [a.clone() for a in self.anchors], "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.optimizer is None:
            self.bind(state["anchors"])
        shapes = [tuple(a.shape) for a in state["anchors"]]
        if shapes != [tuple(a.shape) for a in self.anchors]:
            raise ValueError(
                f"outer optimizer state has anchors of shapes {shapes}, this model's are "
                f"{[tuple(a.shape) for a in self.anchors]}"
            )
        for a, saved in zip(self.anchors, state["anchors"]):
            a.copy_(saved)
        assert self.optimizer is not None
        self.optimizer.load_state_dict(state["optimizer"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._factory!r})"


class SlowMo(OuterOptimizer):
    """Slow momentum: SGD with momentum ``momentum`` and learning rate ``lr`` on the pseudo-gradient.
    ``SlowMo(lr=1, momentum=0)`` is plain averaging.

    Args:
        lr: the slow learning rate (alpha in the paper).
        momentum: the slow momentum (beta in the paper).
    """

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.5) -> None:
        _check_lr_momentum(lr, momentum)
        self.lr, self.momentum = lr, momentum
        super().__init__(functools.partial(torch.optim.SGD, lr=lr, momentum=momentum))

    def __repr__(self) -> str:
        return f"SlowMo(lr={self.lr}, momentum={self.momentum})"


class DiLoCo(OuterOptimizer):
    """DiLoCo's outer step: Nesterov SGD on the pseudo-gradient (lr 0.7, momentum 0.9).

    Args:
        lr: outer learning rate.
        momentum: outer momentum.
        nesterov: Nesterov momentum, as in the paper.
    """

    def __init__(self, *, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        _check_lr_momentum(lr, momentum)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        super().__init__(functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov))

    def __repr__(self) -> str:
        return f"DiLoCo(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov})"
