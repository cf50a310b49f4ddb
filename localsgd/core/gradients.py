"""Rounds of one step through the gradients: synchronous SGD for every optimizer.

Averaging parameters (and optimizer state) after every step from a common start is
synchronous SGD for SGD with momentum and weight decay, whose update is linear in the
gradient, but not for Adam and the like: the average of K Adam updates is not the Adam
update of the averaged gradient. The H = 1 phase of post-local SGD (and ``sync_every=1``)
therefore all-reduces the gradients before the step for such optimizers, as DDP does, and
every worker then takes the same step from the same parameters.
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
        on every worker."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i, g in enumerate(grads[0]):
            groups.setdefault((str(g.device), str(g.dtype)), []).append(i)
        plan = []
        for (device, dtype), index in sorted(groups.items()):
            numel = sum(grads[0][i].numel() for i in index)
            key = (device, dtype, numel)
            flats = self._flats.get(key)
            if flats is None or len(flats) != len(grads):
                first = grads[0][index[0]]
                flats = [torch.empty(numel, dtype=first.dtype, device=first.device) for _ in grads]
                self._flats[key] = flats
            for flat, worker in zip(flats, grads):
                torch.cat([worker[i].reshape(-1) for i in index], out=flat)
            plan.append((index, flats))
        with self.comm.round(tag):
            for _, flats in plan:
                self.comm.all_reduce_(flats, op="mean")
        for index, flats in plan:
            for flat, worker in zip(flats, grads):
                offset = 0
                for i in index:
                    g = worker[i]
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()


def gradients_of(params: Sequence[torch.nn.Parameter]) -> list[Tensor]:
    """The gradients of ``params`` (zeros where a parameter got none this step, so that every
    worker contributes the same layout)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]  # type: ignore[misc]
