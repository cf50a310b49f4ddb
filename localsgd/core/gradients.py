"""Rounds of one step through the gradients: synchronous SGD for every optimizer.

Averaging parameters (and optimizer state) after every step from a common start is
synchronous SGD for SGD with momentum and weight decay, whose update is linear in the
gradient, but not for Adam and the like: the average of K Adam updates is not the Adam
update of the averaged gradient. The H = 1 phase of post-local SGD (and ``sync_every=1``)
therefore all-reduces the gradients before the step for such optimizers, as DDP does, and
every worker then takes the same step from the same parameters.

A parameter that got no gradient is left as DDP (``find_unused_parameters=True``) leaves it: if no
worker has a gradient for it, its ``.grad`` stays ``None`` (the optimizer skips it: no weight
decay, no momentum), and if some do, the others count zeros in the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from localsgd.core.comm import Communicator


class GradientAverager:
    """Replaces every local worker's gradients by their mean over all workers, in place, with one
    collective per (device, dtype) into flat buffers that are allocated once.

    Args:
        comm: the communicator over all workers; the collectives count under the tag ``"grad"``.
    """

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self._flats: dict[tuple[str, str, int], list[Tensor]] = {}

    @torch.no_grad()
    def all_reduce(self, grads: Sequence[Sequence[Tensor]], tag: str = "grad") -> None:
        """``grads[w]``: local worker ``w``'s gradient tensors, in one order with one set of shapes
        on every worker. Lists made by :func:`gradients_of` also say which tensors are zeros filled
        in for a missing gradient: where no worker had one, the parameter's ``.grad`` and the list's
        entry become ``None`` again."""
        # every worker's lists come from the same caller, so all of them carry the flags or none do
        flagged = all(isinstance(worker, Gradients) for worker in grads)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, g in enumerate(grads[0]):
            groups.setdefault((str(g.device), str(g.dtype)), []).append(i)
        plan = []
        for (device, dtype), index in sorted(groups.items()):
            size = sum(grads[0][i].numel() for i in index)
            # one flag per parameter rides at the end of its group's flat, in the same collective:
            # its mean is > 0 exactly where some worker had a gradient (the agreement DDP makes)
            numel = size + (len(index) if flagged else 0)
            key = (device, dtype, numel)
            flats = self._flats.get(key)
            if flats is None or len(flats) != len(grads):
                first = grads[0][index[0]]
                flats = [torch.empty(numel, dtype=first.dtype, device=first.device) for _ in grads]
                self._flats[key] = flats
            for flat, worker in zip(flats, grads):
                torch.cat([worker[i].reshape(-1) for i in index], out=flat[:size])
                if flagged:
                    had = [0.0 if worker.filled[i] else 1.0 for i in index]  # type: ignore[attr-defined]
                    flat[size:].copy_(torch.tensor(had, dtype=flat.dtype))
            plan.append((index, flats, size))
        with self.comm.round(tag):
            for _, flats, _ in plan:
                self.comm.all_reduce_(flats, op="mean")
        for index, flats, size in plan:
            for flat, worker in zip(flats, grads):
                offset = 0
                for i in index:
                    g = worker[i]
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
            if flagged:
                # one small read back per group and round: whether a .grad is None is Python's to know
                had_any = (flats[0][size:] > 0).tolist()
                for i, had in zip(index, had_any):
                    if not had:
                        for worker in grads:
                            worker.params[i].grad = None  # type: ignore[attr-defined]
                            worker[i] = None  # type: ignore[index]


class Gradients(list[Tensor]):
    """The gradient tensors of some parameters, as :func:`gradients_of` gives them: a list that
    also holds the parameters and, per parameter, whether its tensor is zeros filled in for a
    missing gradient (``filled``)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], grads: list[Tensor], filled: list[bool]) -> None:
        super().__init__(grads)
        self.params = list(params)
        self.filled = filled


def gradients_of(params: Sequence[torch.nn.Parameter]) -> Gradients:
    """The gradients of ``params``: zeros where a parameter got none this step, so that every
    worker contributes the same layout; :meth:`GradientAverager.all_reduce` puts ``None`` back
    where no worker had one (DDP's rule)."""
    grads, filled = [], []
    for p in params:
        filled.append(p.grad is None)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    return Gradients(params, grads, filled)
