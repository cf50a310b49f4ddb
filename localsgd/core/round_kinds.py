"""The averager's overlapped rounds (started at a sync, landing ``sync_delay`` steps later, see
:mod:`localsgd.core.delayed`) and its blocking compressed rounds (see :mod:`localsgd.core.wire`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from localsgd.core.comm import Communicator
from localsgd.core.control import ControlMessage
from localsgd.core.delayed import DelayedRound


class OverlappedAndCompressed:
    """The part of :class:`~localsgd.core.averager.Averager` that starts and lands overlapped
    rounds, and runs a bucket's compressed round."""

    # the averager's, used here
    _buckets: list[list[Any]]
    comm: Communicator
    wire: Any
    outer: Any
    agreed_flags: list[float]

    def _ensure_intact(self) -> None: ...

    def fragment_buckets(self, fragment: int | None) -> list[int]: ...

    def start_delayed(
        self,
        tag: str,
        due: int,
        *,
        step: int,
        digests: Sequence[float] | None = None,
        flags: Sequence[float] = (),
        fragment: int | None = None,
    ) -> DelayedRound:
        """The control message and this round's mean (of ``fragment``'s tensors, or all) in the
        background, to be applied at step ``due`` (see :mod:`localsgd.core.delayed`)."""
        self._ensure_intact()
        control = ControlMessage(
            self.comm,
            [[b.flat for b in w] for w in self._buckets],
            step,
            nonfinite="raise",
            digests=digests,
            flags=flags,
        )
        return DelayedRound(
            self._buckets,
            self.comm,
            tag,
            due,
            indices=self.fragment_buckets(fragment),
            wire=self.wire,
            anchors=self.outer.anchors if self.wire is not None and self.outer is not None else (),
            start=step,
            control=control,
        )

    def apply_delayed(self, round_: DelayedRound) -> None:
        """A delayed round's result, keeping each worker's progress since its snapshot; its control
        message's flags go to ``self.agreed_flags`` (NaN/Inf at its start raises, nothing applied)."""
        self._ensure_intact()
        bad, flags = round_.agreement()
        if flags:
            self.agreed_flags = flags
        if bad:
            raise FloatingPointError(
                f"non-finite parameters or buffers (NaN/Inf) on worker(s) {bad} of {self.comm.num_workers} "
                f"at optimizer step {round_.started} (an overlapped round's start, found at its landing): "
                "refusing to average them into the others. HINT: lower the learning rate or clip gradients"
            )
        round_.apply(self._buckets, self.outer)

    def _compressed_round(self, i: int, comm: Communicator) -> None:
        """Bucket ``i``'s parameters become anchor + the mean of the workers' deltas from the anchor
        (the global model of the last sync), through the wire; its buffers are averaged exactly."""
        assert self.wire is not None and self.outer is not None
        anchor = self.outer.anchors[i]
        deltas = [w[i].params - anchor for w in self._buckets]
        self.wire.mean_(deltas, key=i)
        for w, delta in zip(self._buckets, deltas):
            torch.add(anchor, delta, out=w[i].params)
        rest = [w[i].flat[w[i].param_numel :] for w in self._buckets]
        if rest[0].numel():
            comm.all_reduce_(rest, op="mean")
