"""Overlapped syncs (``sync_delay=tau``): a round's all-reduce runs while the workers go on training.

At a sync step every worker's parameters and averaged buffers are snapshotted and their mean
is started in the background; ``tau`` steps later it is waited on and applied keeping the local
progress made meanwhile (DESIGN pitfall 14): ``theta <- theta_new + (theta_now - theta_snapshot)``,
where ``theta_new`` is the mean of the snapshots, or with an outer optimizer its step from that
mean. The control message (step agreement, NaN/Inf check, stop flags) travels with the mean and
is read when the round lands, so that no worker waits for the others at the round's start: a
worker up to tau steps behind costs nothing. A failed check raises at the landing, before
anything is applied. A checkpoint in flight waits for the mean and stores it with the snapshots
and the control message's result, so that a resumed run applies the same numbers at the same
step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from localsgd.core.comm import Communicator, Pending
from localsgd.core.control import ControlMessage
from localsgd.core.rounds import ExactRound, Round, RoundKind
from localsgd.core.wire import CompressedMean, StagedMean


class DelayedRound:
    """One round in flight over ``buckets`` (per local worker, its flat buckets), applied at ``due``.

    ``indices``: the buckets of this round (one fragment's; ``None``: all). With a compressed
    ``wire``, what travels is each snapshot's delta from ``anchors`` (the global model), in the
    wire's two collectives: the all-to-all starts with the round, the all-gather at
    :attr:`reduce_at`, halfway to ``due``.
    """

    def __init__(
        self,
        buckets: list[list[Any]],
        comm: Communicator,
        tag: str,
        due: int,
        *,
        indices: Sequence[int] | None = None,
        wire: CompressedMean | None = None,
        anchors: Sequence[Tensor] = (),
        start: int | None = None,
        control: ControlMessage | None = None,
    ) -> None:
        self.due = due
        self.started = due if start is None else start
        """The step at which the round started."""
        self._control = control
        self.agreed: tuple[list[int], list[float]] | None = None
        """The control message's result once read: (workers with NaN/Inf, the agreed flags)."""
        self.indices = list(range(len(buckets[0]))) if indices is None else list(indices)
        chosen = [[w[i] for i in self.indices] for w in buckets]
        self.snapshots = [[b.flat.detach().clone() for b in w] for w in chosen]
        self.means = [[s.clone() for s in w] for w in self.snapshots]
        self._pending: list[Pending] = []
        self._compressed: list[StagedMean] = []
        self.reduce_at: int | None = None
        """The step at which a compressed round's second collective starts (``None``: fp32)."""
        if control is not None:
            control.start()
        with comm.round(tag):
            for j, i in enumerate(self.indices):
                k = chosen[0][j].param_numel
                if wire is None:
                    self._pending.append(comm.all_reduce_start_([w[j] for w in self.means], op="mean"))
                    continue
                deltas = [w[j][:k] - anchors[i] for w in self.snapshots]
                self._compressed.append(wire.start(deltas, key=i))
                if self.means[0][j].numel() > k:  # the buffers travel exactly
                    self._pending.append(comm.all_reduce_start_([w[j][k:] for w in self.means], op="mean"))
        if wire is not None:
            assert start is not None
            self.reduce_at = start + (due - start + 1) // 2
            self._anchors = [anchors[i] for i in self.indices]

    def reduce(self) -> None:
        """A compressed round's second stage (its all-gather) starts."""
        for c in self._compressed:
            c.reduce()

    def agreement(self) -> tuple[list[int], list[float]]:
        """The control message's result: (workers with NaN/Inf, the agreed flags); raises if the
        workers were out of step."""
        if self.agreed is None:
            bad: list[int] = []
            flags: list[float] = []
            if self._control is not None:
                bad, _, flags = self._control.read()
            self.agreed = (bad, flags)
        return self.agreed

    @torch.no_grad()
    def wait(self) -> None:
        """Everything has arrived: :attr:`means` holds the round's mean of every bucket."""
        self.agreement()
        for p in self._pending:
            p.wait()
        self._pending = []
        for j, c in enumerate(self._compressed):
            k = c.numel
            mean = torch.add(self._anchors[j], c.result())
            for w in self.means:
                w[j][:k].copy_(mean)
        self._compressed = []

    @torch.no_grad()
    def apply(self, buckets: list[list[Any]], outer: Any) -> None:
        """Wait for the mean, take the outer step from it, and move every worker by ``new - snapshot``."""
        self.wait()
        new = self.means[0]  # the round is over: its mean becomes the new global model in place
        if outer is not None:
            param_numel = [buckets[0][i].param_numel for i in self.indices]
            averages = list(outer.anchors)
            for n, i, k in zip(new, self.indices, param_numel):
                averages[i] = n[:k]
            anchors = outer.step(averages, only=self.indices)
            for n, i, k in zip(new, self.indices, param_numel):
                n[:k].copy_(anchors[i])
        for w, snaps in zip(buckets, self.snapshots):
            for i, n, snap in zip(self.indices, new, snaps):
                w[i].flat.add_(n - snap)

    def state_dict(self) -> dict[str, Any]:
        self.wait()  # the mean is what the uninterrupted run will apply: the same numbers later
        return {
            "due": self.due,
            "started": self.started,
            "indices": self.indices,
            "snapshots": self.snapshots,
            "means": self.means,
            "agreed": self.agreed,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DelayedRound:
        round_ = cls.__new__(cls)
        round_.due = int(state["due"])
        round_.started = int(state.get("started", round_.due))
        round_.snapshots = [[t.clone() for t in w] for w in state["snapshots"]]
        round_.means = [[t.clone() for t in w] for w in state["means"]]
        round_.indices = list(state.get("indices", range(len(round_.means[0]))))
        round_._pending, round_._compressed, round_.reduce_at = [], [], None
        round_._control = None
        agreed = state.get("agreed")
        round_.agreed = (list(agreed[0]), list(agreed[1])) if agreed is not None else None
        return round_


class OverlappedRound(RoundKind):
    """Rounds of ``blocking``'s kind (exact or compressed) whose mean travels for ``delay`` steps
    while the workers go on; the control message travels with it and is read at the landing."""

    def __init__(self, blocking: ExactRound, delay: int) -> None:
        super().__init__(blocking.averager, blocking.comm)
        self.blocking_kind = blocking
        self.delay = delay
        self.wire: CompressedMean | None = getattr(blocking, "wire", None)

    @property
    def blocking(self) -> RoundKind:
        return self.blocking_kind

    def agree(self, r: Round) -> None:
        # sent now with the mean, read at the landing: no worker waits for the others here
        r.pending = ControlMessage(
            self.control,
            self.averager.worker_flats(),
            r.step,
            nonfinite="raise",
            digests=r.digests,
            flags=r.flags,
        )

    def reduce(self, r: Round) -> None:
        assert r.step is not None
        averager, outer = self.averager, self.averager.outer
        r.due = r.step + self.delay
        r.pending = DelayedRound(
            averager.worker_buckets(),
            self.comm,
            r.tag,
            r.due,
            indices=averager.fragment_buckets(r.fragment),
            wire=self.wire,
            anchors=outer.anchors if self.wire is not None and outer is not None else (),
            start=r.step,
            control=r.pending,
        )

    def tick(self, r: Round, step: int) -> None:
        if r.pending.reduce_at == step:
            r.pending.reduce()  # a compressed round's second collective

    def wait(self, r: Round) -> None:
        bad, flags = r.pending.agreement()
        if flags:
            r.agreed_flags = flags
        if bad:
            raise FloatingPointError(
                f"non-finite parameters or buffers (NaN/Inf) on worker(s) {bad} of {self.comm.num_workers} "
                f"at optimizer step {r.pending.started} (an overlapped round's start, found at its landing): "
                "refusing to average them into the others. HINT: lower the learning rate or clip gradients"
            )
        r.pending.wait()

    def outer_step(self, r: Round) -> None:
        # the outer step from the snapshots' mean, each worker keeping its progress since
        r.pending.apply(self.averager.worker_buckets(), self.averager.outer)


def in_flight_round(state: dict[str, Any]) -> Round:
    """A round in flight, from :meth:`DelayedRound.state_dict` (a checkpoint)."""
    pending = DelayedRound.from_state_dict(state)
    return Round(tag="sync", step=pending.started, due=pending.due, pending=pending)
