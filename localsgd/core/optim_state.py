"""Optimizer state at a sync: averaged across workers, or reset to a fresh optimizer's."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from localsgd.core.buckets import by_device_and_dtype, local_tensor
from localsgd.core.comm import Communicator


class StateAverager:
    """Averages the floating-point optimizer state of the local workers over a communicator.

    Optimizer state is created lazily by the optimizer and may be replaced by ``load_state_dict``,
    so it is not re-pointed like the parameters: it is copied into flat buckets (allocated once
    while the layout holds), reduced, and copied back."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[object, ...], list[list[Tensor]]] = {}

    def average(
        self,
        comm: Communicator,
        optimizers: Sequence[Sequence[Optimizer]],
        device: torch.device,
        num_good: int | None = None,
    ) -> None:
        """``optimizers[w]``: local worker ``w``'s optimizers; ``device``: where the control
        message lives (NCCL reduces GPU tensors only); ``num_good``: how many workers contribute
        (the others sent zeros), by default all."""
        per_worker = [state_tensors(opts, include_step=False) for opts in optimizers]
        signature = tuple((t.shape, t.dtype, t.device) for t in per_worker[0])
        for i, ts in enumerate(per_worker[1:], start=1):
            if tuple((t.shape, t.dtype, t.device) for t in ts) != signature:
                raise RuntimeError(f"optimizer state of local worker {i} does not match worker 0's")
        # Lazily created state can differ across processes (a parameter that got no
        # gradient on one rank has no momentum there): check before the collective,
        # so a mismatch is an error on every rank rather than a hang or garbage.
        count = sum(t.numel() for t in per_worker[0])
        checks = [torch.tensor([count, -count], dtype=torch.float64, device=device) for _ in per_worker]
        comm.all_reduce_(checks, op="max", counted=False)
        if int(checks[0][0]) != count or int(-checks[0][1]) != count:
            raise RuntimeError(
                "optimizer_state='average': workers hold optimizer state of different sizes "
                f"(this worker {count} elements, others between {int(-checks[0][1])} "
                f"and {int(checks[0][0])}); "
                "HINT: every parameter must receive a gradient on every worker before the first sync, "
                "or use optimizer_state='local'"
            )
        buckets = self._buckets.get(signature)
        if buckets is None:
            # one flat per (device, dtype) group and local worker, kept while the layout holds
            buckets = [
                [
                    torch.empty(sum(t.numel() for t in group), dtype=group[0].dtype, device=group[0].device)
                    for _ in per_worker
                ]
                for group in by_device_and_dtype(per_worker[0]).values()
            ]
            self._buckets = {signature: buckets}
        for g, group_ts in enumerate(zip(*[by_device_and_dtype(ts).values() for ts in per_worker])):
            flats = buckets[g]
            for flat, ts in zip(flats, group_ts):
                torch.cat([t.reshape(-1) for t in ts], out=flat)
            if num_good is None or num_good == comm.num_workers:
                comm.all_reduce_(flats, op="mean")
            else:
                comm.all_reduce_(flats, op="sum")
                for flat in flats:
                    flat.div_(num_good)
            for flat, ts in zip(flats, group_ts):
                offset = 0
                for t in ts:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()


def fresh_optimizer_state(optimizers: Sequence[Any]) -> None:
    """Put each parameter's optimizer state back to what a newly created optimizer of the same type
    and hyperparameters holds before its first step: nothing for most torch optimizers (their
    first step creates it: SGD's momentum buffer is then the gradient, NAdam's mu_product 1),
    Adagrad's accumulators at ``initial_accumulator_value``. Zeroing tensors instead is wrong
    for those, and keeping ``step`` while zeroing Adam's moments breaks its bias correction.

    The user's optimizer class is never constructed again: its constructor may take arguments
    this library cannot know or have side effects (counting, logging, registering hooks). What a
    fresh one holds comes from the torch optimizer it derives from (see :func:`_fresh_state`).

    The state dicts are cleared and refilled in place: a simulated worker's are shared with
    the optimizer that runs it. ``optimizers`` may be a simulated worker's views (their ``source``
    is the optimizer they stand for)."""
    for opt in optimizers:
        source = getattr(opt, "source", opt)
        groups = [
            {**{k: v for k, v in theirs.items() if k != "params"}, "params": list(mine["params"])}
            for mine, theirs in zip(opt.param_groups, source.param_groups)
        ]
        fresh = _fresh_state(source, groups)
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p)
                if state is not None:
                    state.clear()
                    state.update(fresh.get(p, {}))


def _torch_base(cls: type) -> type:
    """The first class of ``cls``'s MRO that torch defines (``Optimizer`` for one written from scratch)."""
    return next(c for c in cls.__mro__ if c.__module__.split(".")[0] == "torch")


def _fresh_state(source: Any, groups: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """The state a fresh ``type(source)`` over ``groups`` holds before its first step.

    Torch optimizers create their state at their first step, except those that fill it in
    ``__init__`` (Adagrad, from its ``initial_accumulator_value`` argument): for a torch optimizer,
    or a subclass of one, the torch class itself is built over the groups (cheap, no side effects),
    never the user's subclass. An optimizer written from scratch on ``torch.optim.Optimizer`` is
    taken to follow torch's convention (no state before the first step)."""
    base = _torch_base(type(source))
    if base is Optimizer:
        return {}
    # the constructor's arguments too: Adagrad fills its accumulators from its own argument, not
    # from the group's copy; a subclass's extra hyperparameters are no argument of the torch class
    accepted = inspect.signature(base).parameters
    kwargs = {k: v for k, v in getattr(source, "defaults", {}).items() if k in accepted and k != "params"}
    try:
        return base(groups, **kwargs).state
    except Exception as err:
        raise ValueError(
            f"optimizer_state='reset' cannot tell what a fresh {type(source).__name__} holds: building "
            f"{base.__module__}.{base.__name__}, the torch optimizer it derives from, over its parameter "
            f"groups failed ({type(err).__name__}: {err}). HINT: use optimizer_state='local' or 'average'"
        ) from err


def state_tensors(optimizers: Sequence[Optimizer], *, include_step: bool) -> list[Tensor]:
    """Floating-point state tensors in a rank-independent order (groups, params, sorted keys); of
    an FSDP2-sharded parameter's state (a DTensor), this process's shard."""
    out: list[Tensor] = []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p, {})
                for key in sorted(state):
                    value = state[key]
                    if not isinstance(value, Tensor) or not value.is_floating_point():
                        continue
                    if key == "step" and not include_step:
                        continue
                    out.append(local_tensor(value))
    return out
