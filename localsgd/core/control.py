"""The control message: one small all-reduce before each sync that every worker must agree on.

Before the parameters travel, the workers check that they are all at the same optimizer step
(a rank that ran out of batches would otherwise wait forever), learn which of them hold NaN/Inf,
compare fingerprints of their first batches (identical data streams make averaging a no-op), and
exchange stop requests (SIGTERM, preemption: no collective runs between syncs, DESIGN pitfall 11).
Every control message has one layout, so that two ranks at different control points still meet
in a collective of one size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from localsgd.core.comm import Communicator, Pending, WorkersApart

NUM_FLAGS = 4
"""Slots for flags (stop requests) in every control message: one layout at every control point."""
FLAGS = ("sigterm", "preempt")
"""The stop requests a control message carries, one slot each."""
ABSENT = 2.0
"""A worker's NaN/Inf slot when it takes no part in the round (it heals from a peer meanwhile)."""


def agree(
    comm: Communicator, workers: Sequence[Sequence[Tensor]], step: int | None, **options: Any
) -> tuple[list[int], float, list[float], list[int]]:
    """One small control all-reduce over ``comm`` (a :class:`ControlMessage` with ``options``:
    ``nonfinite``, ``value``, ``digests``, ``flags``, ``absent``), sent and read at once. Returns
    (workers with NaN/Inf, max value, the flags' max over all workers, the absent workers)."""
    message = ControlMessage(comm, workers, step, **options)
    message.start().wait()
    return (*message.read(), message.absent)


class ControlMessage:
    """One control message over ``comm``: the workers check that they are all at optimizer step
    ``step`` (a RuntimeError on every rank otherwise), learn which of them hold NaN/Inf in their
    tensors ``workers[i]`` (if ``nonfinite``), and reduce ``value`` with max.

    ``digests`` (one per local worker, see :func:`batch_digest`; 0 for none) are compared across
    all workers: two workers that drew the same first training batch read the same data stream,
    which makes averaging a no-op (DESIGN pitfall 10), and every rank raises a ValueError naming
    them. ``flags`` (at most :data:`NUM_FLAGS`, e.g. stop requests) are max-reduced. ``absent``:
    this process's workers take no part in the round (they heal from a peer), see :attr:`absent`.

    In two halves: :meth:`start` sends it (an overlapped round lets it travel with its mean, so
    that no worker waits for the others at the round's start), :meth:`read` checks and returns
    what all workers sent.
    """

    def __init__(
        self,
        comm: Communicator,
        workers: Sequence[Sequence[Tensor]],
        step: int | None,
        *,
        nonfinite: str | None = None,
        value: float = 0.0,
        digests: Sequence[float] | None = None,
        flags: Sequence[float] = (),
        absent: bool = False,
    ) -> None:
        if len(flags) > NUM_FLAGS:
            raise ValueError(f"a control message carries at most {NUM_FLAGS} flags, got {len(flags)}")
        self.comm, self.step = comm, step
        n = comm.num_workers
        device = next((t.device for w in workers for t in w), torch.device("cpu"))
        self._messages = []
        for i, tensors in enumerate(workers):
            t = torch.zeros(2 * n + 3 + NUM_FLAGS, dtype=torch.float64, device=device)
            if absent:  # no contribution: its model is a peer's, not its own
                t[comm.first_local_worker + i] = ABSENT
            elif nonfinite is not None and not all(_finite(x) for x in tensors):
                t[comm.first_local_worker + i] = 1.0
            if step is not None:
                t[n], t[n + 1] = step, -step
            t[n + 2] = value
            if digests is not None:
                t[n + 3 + comm.first_local_worker + i] = digests[i]
            for j, flag in enumerate(flags):
                t[2 * n + 3 + j] = flag
            self._messages.append(t)
        self._pending: Pending | None = None
        self.absent: list[int] = []
        """Once read: the workers that take no part in this round (``absent``)."""

    def start(self) -> Pending:
        """Send it (in the background where the communicator can)."""
        self._pending = self.comm.all_reduce_start_(self._messages, op="max", counted=False)
        return self._pending

    def read(self) -> tuple[list[int], float, list[float]]:
        """Wait for it; raise if the workers are out of step or share a data stream; return
        (workers with NaN/Inf, max value, the flags' max)."""
        assert self._pending is not None, "read() before start()"
        self._pending.wait()
        n, step = self.comm.num_workers, self.step
        f = self._messages[0].cpu()
        _check_distinct_streams(f[n + 3 : 2 * n + 3].tolist(), step)
        if step is not None and (int(f[n]) != step or int(-f[n + 1]) != step):
            raise WorkersApart(
                f"workers are out of step: this one is at optimizer step {step}, others between "
                f"{int(-f[n + 1])} and {int(f[n])}. Every worker must take the same number of optimizer "
                "steps (HINT: uneven dataloaders or a custom sampler that gives ranks different numbers "
                "of batches; let Lightning's DistributedSampler shard the data)"
            )
        self.absent = [w for w in range(n) if f[w] == ABSENT]
        return [w for w in range(n) if 0 < f[w] < ABSENT], float(f[n + 2]), f[2 * n + 3 :].tolist()


def batch_digest(batch: Any) -> float:
    """A 52-bit fingerprint of a batch's tensors, exact in a float64 control message, never 0."""
    h = hashlib.blake2b(digest_size=8)

    def feed(x: Any) -> None:
        if isinstance(x, Tensor):
            h.update(str((x.dtype, tuple(x.shape))).encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, (list, tuple)):
            for item in x:
                feed(item)
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                feed(x[key])

    feed(batch)
    return float(int.from_bytes(h.digest(), "little") >> 12) + 1.0


def _check_distinct_streams(digests: list[float], step: int | None) -> None:
    seen: dict[float, list[int]] = {}
    for worker, d in enumerate(digests):
        if d:
            seen.setdefault(d, []).append(worker)
    same = [workers for workers in seen.values() if len(workers) > 1]
    if same:
        raise ValueError(
            f"workers {same[0]} trained on identical first batches (checked at the first sync, optimizer "
            f"step {step}): they read the same data stream, and averaging identical models does nothing. "
            "Lightning shards only map-style datasets, through its DistributedSampler; an IterableDataset, "
            "or use_distributed_sampler=False with a loader that ignores the rank, gives every worker the "
            "same data. HINT: shard the stream by rank (torch.distributed.get_rank() and get_world_size() "
            "in the dataset's __iter__), or use a map-style dataset with use_distributed_sampler=True"
        )


def _finite(flat: Tensor) -> bool:
    # one read pass and no model-sized temporary; a sum that overflows is checked element-wise
    return bool(torch.isfinite(flat.sum())) or bool(torch.isfinite(flat).all())


def check_equal_lengths(comm: Communicator, dataloader: object, device: torch.device, rank: int) -> None:
    """Every rank's training loader must have as many batches (DESIGN pitfall 2): ranks with
    different numbers would stop taking steps at different times, and the one still stepping
    would wait for a sync forever. A ValueError on every rank otherwise; a loader without a
    length is left to the step check before each sync."""
    try:
        count = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return
    counts = [
        torch.tensor([count, -count], dtype=torch.float64, device=device)
        for _ in range(comm.num_local_workers)
    ]
    comm.all_reduce_(counts, op="max", counted=False)
    most, fewest = int(counts[0][0]), int(-counts[0][1])
    if most != fewest:
        raise ValueError(
            f"the training dataloader has {count} batches on rank {rank}, and between "
            f"{fewest} and {most} across ranks: every worker must take the same number of optimizer "
            "steps per epoch. HINT: let Lightning shard the data (use_distributed_sampler=True), or "
            "give every rank a sampler with the same length (drop_last)"
        )


class StopRequests:
    """This rank's stop requests (``local``) and what all ranks agreed on at the last sync."""

    def __init__(self) -> None:
        self.local = dict.fromkeys(FLAGS, False)
        self.agreed = dict.fromkeys(FLAGS, False)

    def request(self, name: str, value: bool = True) -> None:
        """Ask for a stop at the next sync (``value=False`` asks nothing)."""
        if name not in self.local:
            raise ValueError(f"stop request {name!r} must be one of {', '.join(FLAGS)}")
        self.local[name] = self.local[name] or bool(value)

    def message(self) -> list[float]:
        return [float(self.local[name]) for name in FLAGS]

    def record(self, reduced: Sequence[float]) -> None:
        """The control message's max over all ranks: a request of any rank is everyone's."""
        for name, value in zip(FLAGS, reduced):
            self.agreed[name] = self.agreed[name] or value > 0
