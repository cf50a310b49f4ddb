"""Flat storage per (device, dtype) that a model's parameters and buffers are views of.

Parameters (trainable or frozen, with or without a gradient) and, under
``buffers="average"``, floating-point buffers are re-pointed once into one flat
tensor per (device, dtype): each ``p.data`` becomes a view of that storage. A
round is then a single collective per bucket on memory the model already uses,
with no gather/scatter copy and no allocation (DESIGN pitfall 5). Integer buffers
(``num_batches_tracked``) are never averaged: they count steps, which are equal on
all workers anyway.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from localsgd.core.options import BufferPolicy

_registrations = 0
"""Parameters, buffers and submodules registered on any module in this process so far, counted by
torch's global registration hooks: while it stands still, no model can have grown a tensor."""


def _count_registration(*_: object) -> None:
    global _registrations
    _registrations += 1


def registrations() -> int:
    """How many registrations torch's hooks counted so far (after :func:`watch_registrations`)."""
    return _registrations


@functools.cache
def watch_registrations() -> None:
    """Install the counting hooks, once per process (at the first averager)."""
    for register in (
        nn.modules.module.register_module_parameter_registration_hook,
        nn.modules.module.register_module_buffer_registration_hook,
        nn.modules.module.register_module_module_registration_hook,
    ):
        register(_count_registration)


class FlatBucket:
    """Tensors of one (device, dtype) whose ``.data`` are views into one flat tensor."""

    def __init__(self, tensors: Sequence[Tensor], flat: Tensor | None = None) -> None:
        assert tensors, "a bucket holds at least one tensor"
        self.tensors = list(tensors)
        # parameters come first: the outer optimizer steps this prefix, never the buffers after it
        self.param_numel = sum(t.numel() for t in self.tensors if isinstance(t, nn.Parameter))
        first = self.tensors[0]
        numel = sum(t.numel() for t in self.tensors)
        self.flat = torch.empty(numel, dtype=first.dtype, device=first.device) if flat is None else flat
        assert self.flat.shape == (numel,) and self.flat.is_contiguous()
        self.offsets: list[int] = []
        self._ptrs: list[int] = []
        offset = 0
        for t in self.tensors:
            n = t.numel()
            if not _dense(t):
                raise ValueError(
                    f"a parameter or buffer of shape {tuple(t.shape)} has strides {t.stride()}, which "
                    "overlap or leave gaps: it cannot be a view of flat storage. HINT: make it "
                    "contiguous (or channels_last) before fit"
                )
            # same strides as before: a channels_last weight stays channels_last
            view = self.flat.as_strided(t.shape, t.stride(), self.flat.storage_offset() + offset)
            view.copy_(t.data)
            # keeps the Parameter object (and every optimizer reference to it)
            t.data = view
            self._ptrs.append(view.data_ptr())
            self.offsets.append(offset)
            offset += n

    def intact(self) -> bool:
        """Whether every tensor still lives where the bucket put it."""
        return list(map(Tensor.data_ptr, self.tensors)) == self._ptrs

    @property
    def params(self) -> Tensor:
        """The parameter part of the flat tensor."""
        return self.flat[: self.param_numel]


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive places (in any dimension order)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def float_tensors(module: nn.Module, buffers: BufferPolicy) -> list[Tensor]:
    tensors: list[Tensor] = [p for p in module.parameters() if p.is_floating_point()]
    if buffers == "average":
        tensors += [b for b in module.buffers() if b.is_floating_point()]
    return tensors


def split_fragments(tensors: Sequence[Tensor], num_fragments: int) -> list[list[Tensor]]:
    """``tensors`` cut in their order into ``num_fragments`` non-empty runs of whole tensors, the
    largest run as small as it can be (near-equal bytes; a tensor bigger than an equal share is a
    fragment of its own). Every rank cuts the same model the same way."""
    if num_fragments == 1:
        return [list(tensors)]
    if len(tensors) < num_fragments:
        raise ValueError(
            f"num_fragments ({num_fragments}) must be at most the number of the model's averaged "
            f"tensors ({len(tensors)}): a fragment holds whole tensors. HINT: fewer fragments"
        )
    sizes = [t.numel() * t.element_size() for t in tensors]

    def cut(capacity: int) -> list[int]:
        """Where each run starts, filling runs up to ``capacity`` bytes; a run also ends where the
        tensors left are just enough for one per fragment left."""
        starts, run = [0], 0
        for i, size in enumerate(sizes):
            left = len(sizes) - i
            if i and (run + size > capacity or left == num_fragments - len(starts)):
                starts.append(i)
                run = 0
            run += size
        return starts

    low, high = max(sizes), sum(sizes)  # the smallest capacity that needs no more runs than fragments
    while low < high:
        mid = (low + high) // 2
        if len(cut(mid)) <= num_fragments:
            high = mid
        else:
            low = mid + 1
    starts = cut(low)
    return [list(tensors[a:b]) for a, b in zip(starts, [*starts[1:], len(tensors)])]


def by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[str, str], list[Tensor]]:
    groups: dict[tuple[str, str], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((str(t.device), str(t.dtype)), []).append(t)
    return dict(sorted(groups.items()))
