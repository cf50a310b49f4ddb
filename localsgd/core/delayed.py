"""Overlapped syncs (``sync_delay=tau``): a round's all-reduce runs while the workers go on training.

At a sync step every worker's parameters and averaged buffers are snapshotted and their mean
is started in the background; ``tau`` steps later it is waited on and applied keeping the local
progress made meanwhile (DESIGN pitfall 14): ``theta <- theta_new + (theta_now - theta_snapshot)``,
where ``theta_new`` is the mean of the snapshots, or with an outer optimizer its step from that
mean. The step agreement, NaN/Inf check and stop flags still travel in a small blocking control
message at the round's start. A checkpoint in flight waits for the mean and stores it with the
snapshots, so that a resumed run applies the same numbers at the same step.
"""

from __future__ import annotations

from typing import Any

import torch

from localsgd.core.comm import Communicator, Pending


class DelayedRound:
    """One round in flight over ``buckets`` (per local worker, its flat buckets), applied at ``due``."""

    def __init__(self, buckets: list[list[Any]], comm: Communicator, tag: str, due: int) -> None:
        self.due = due
        self.snapshots = [[b.flat.detach().clone() for b in w] for w in buckets]
        self.means = [[b.flat.detach().clone() for b in w] for w in buckets]
        with comm.round(tag):
            self._pending: list[Pending] = [
                comm.all_reduce_start_([w[i] for w in self.means], op="mean") for i in range(len(buckets[0]))
            ]

    @torch.no_grad()
    def apply(self, buckets: list[list[Any]], outer: Any) -> None:
        """Wait for the mean, take the outer step from it, and move every worker by ``new - snapshot``."""
        self.wait()
        new = [m.clone() for m in self.means[0]]
        if outer is not None:
            param_numel = [b.param_numel for b in buckets[0]]
            anchors = outer.step([n[:k] for n, k in zip(new, param_numel)])
            for n, a, k in zip(new, anchors, param_numel):
                n[:k].copy_(a)
        for w, snaps in zip(buckets, self.snapshots):
            for b, n, snap in zip(w, new, snaps):
                b.flat.add_(n - snap)

    def wait(self) -> None:
        for p in self._pending:
            p.wait()

    def state_dict(self) -> dict[str, Any]:
        self.wait()  # the mean is what the uninterrupted run will apply: the same numbers later
        return {"due": self.due, "snapshots": self.snapshots, "means": self.means}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DelayedRound:
        round_ = cls.__new__(cls)
        round_.due = int(state["due"])
        round_.snapshots = [[t.clone() for t in w] for w in state["snapshots"]]
        round_.means = [[t.clone() for t in w] for w in state["means"]]
        round_._pending = []
        return round_


def check_delay(sync_delay: object, period: int | None = None) -> int:
    """``sync_delay`` as an int >= 0 (and below the round's H, where it is known)."""
    if isinstance(sync_delay, bool) or not isinstance(sync_delay, int) or sync_delay < 0:
        raise ValueError(f"sync_delay ({sync_delay!r}) must be an integer >= 0")
    if period is not None and sync_delay >= period:
        raise ValueError(
            f"sync_delay ({sync_delay}) must be below the round's H ({period}): a round's result must "
            "arrive before the next round starts"
        )
    return sync_delay
