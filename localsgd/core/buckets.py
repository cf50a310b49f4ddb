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


def local_tensor(t: Tensor) -> Tensor:
    """This process's part of ``t``: a DTensor's local shard (a view of its storage), else ``t``."""
    to_local = getattr(t, "to_local", None)
    if to_local is None:
        return t
    with torch.no_grad():  # the local tensor itself, not an autograd view of it
        return to_local()


def local_numel(t: Tensor) -> int:
    """How many of ``t``'s elements this process holds."""
    return local_tensor(t).numel()


def sharded(tensors: Sequence[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (a parameter of an FSDP2-sharded model)."""
    return any(hasattr(t, "to_local") for t in tensors)


class FlatBucket:
    """Tensors of one (device, dtype) whose ``.data`` are views into one flat tensor."""

    def __init__(self, tensors: Sequence[Tensor], flat: Tensor | None = None) -> None:
        assert tensors, "a bucket holds at least one tensor"
        self.tensors = list(tensors)
        self.numels = [local_numel(t) for t in self.tensors]
        """Each tensor's elements in the flat tensor (a DTensor's: its local shard's)."""
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        # parameters come first: the outer optimizer steps this prefix, never the buffers after it
        self.param_numel = sum(n for t, n in zip(self.tensors, self.numels) if isinstance(t, nn.Parameter))
        first = local_tensor(self.tensors[0])
        numel = sum(self.numels)
        self.flat = torch.empty(numel, dtype=first.dtype, device=first.device) if flat is None else flat
        assert self.flat.shape == (numel,) and self.flat.is_contiguous()
        self._take_in()
        self._ptrs = self._places()

    def _take_in(self) -> None:
        """The tensors' values into the flat tensor, and each tensor re-pointed to its place there."""
        for t, offset in zip(self.tensors, self.offsets):
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

    def _places(self) -> list[int]:
        return list(map(Tensor.data_ptr, self.tensors))

    def intact(self) -> bool:
        """Whether every tensor still lives where the bucket put it (or found it)."""
        return self._places() == self._ptrs

    @property
    def params(self) -> Tensor:
        """The parameter part of the flat tensor."""
        return self.flat[: self.param_numel]

    def pull(self) -> None:
        """The flat tensor takes the tensors' current values (views: it holds them already)."""

    def push(self) -> None:
        """The tensors take the flat tensor's values (views: they are them already)."""


class CopiedBucket(FlatBucket):
    """Tensors whose storage another library owns (an FSDP2 parameter's local shard, which its
    all-gather reads): the flat tensor holds a copy, in the same layout as a :class:`FlatBucket`.
    :meth:`pull` fills it from the tensors, :meth:`push` writes it back: the averager does both
    around every round (:meth:`~localsgd.core.averager.Averager.session`)."""

    def _take_in(self) -> None:
        self.pull()

    def _places(self) -> list[int]:
        return [local_tensor(t).data_ptr() for t in self.tensors]

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(local tensor, its place in the flat tensor), per tensor."""
        pairs = []
        for t, offset, n in zip(self.tensors, self.offsets, self.numels):
            local = local_tensor(t)
            pairs.append((local, self.flat[offset : offset + n].view(local.shape)))
        return pairs

    @torch.no_grad()
    def pull(self) -> None:
        for local, place in self._pairs():
            place.copy_(local)

    @torch.no_grad()
    def push(self) -> None:
        for local, place in self._pairs():
            local.copy_(place)


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


def fsdp_units(module: nn.Module, tensors: Sequence[Tensor]) -> list[int] | None:
    """The FSDP2 unit of each of ``tensors``: the nearest module around it that ``fully_shard``
    was applied to, numbered in module order (FSDP2 gathers and frees a unit's parameters
    together); a tensor outside every unit is a unit of its own. ``None`` when ``module`` is not
    FSDP2-sharded."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    owner: dict[int, int | None] = {}
    count = 0

    def walk(sub: nn.Module, unit: int | None) -> None:
        nonlocal count
        if isinstance(sub, FSDPModule):
            unit, count = count, count + 1
        for t in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)):
            owner.setdefault(id(t), unit)  # a shared tensor: its first place
        for child in sub.children():
            walk(child, unit)

    walk(module, None)
    if count == 0:
        return None
    units = [owner.get(id(t)) for t in tensors]
    return [count + i if unit is None else unit for i, unit in enumerate(units)]


def split_fragments(
    tensors: Sequence[Tensor], num_fragments: int, units: Sequence[int] | None = None
) -> list[list[Tensor]]:
    """``tensors`` cut in their order into ``num_fragments`` non-empty runs of whole tensors, the
    largest run as small as it can be (near-equal bytes; a tensor bigger than an equal share is a
    fragment of its own). Every rank cuts the same model the same way (sizes are the global ones,
    also for a sharded model's DTensors). ``units`` (one per tensor, e.g. :func:`fsdp_units`): the
    tensors of one unit stay in one fragment, the units taken in the order of their first tensor."""
    if units is None:
        items = [[t] for t in tensors]
    else:
        groups: dict[int, list[Tensor]] = {}
        for t, unit in zip(tensors, units, strict=True):
            groups.setdefault(unit, []).append(t)
        items = list(groups.values())
    if num_fragments == 1:
        return [list(tensors)]
    if len(items) < num_fragments:
        what = "the model's averaged tensors" if units is None else "the model's FSDP units"
        raise ValueError(
            f"num_fragments ({num_fragments}) must be at most the number of {what} ({len(items)}): "
            "a fragment holds whole ones. HINT: fewer fragments"
            + ("" if units is None else ", or fully_shard smaller submodules (e.g. each block)")
        )
    sizes = [sum(t.numel() * t.element_size() for t in item) for item in items]

    def cut(capacity: int) -> list[int]:
        """Where each run starts, filling runs up to ``capacity`` bytes; a run also ends where the
        items left are just enough for one per fragment left."""
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
    return [[t for item in items[a:b] for t in item] for a, b in zip(starts, [*starts[1:], len(items)])]


def by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[str, str], list[Tensor]]:
    groups: dict[tuple[str, str], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((str(t.device), str(t.dtype)), []).append(t)
    return dict(sorted(groups.items()))
