"""A round, the one pipeline every sync runs through, and the kinds of round behind it.

A sync is one round: **agree** (the control message: step, NaN/Inf, data streams, stop flags)
-> **reduce** (the mean of the workers' models) -> **commit** (may the result be applied?) ->
**outer step** (the global model steps on ``anchor - mean``; plain averaging is SGD with lr 1)
-> **state policy** (the optimizer state reset, where asked). :func:`run_round` and
:func:`land_round` are that pipeline, for every kind of round.

What differs between blocking, compressed, overlapped and fault-tolerant rounds is a
:class:`RoundKind`, chosen once when the driver is made:

* :class:`ExactRound`: the blocking fp32 mean (also inner rounds inside a node, and fragments);
* :class:`CompressedRound`: deltas from the global model through a lossy wire (:mod:`~localsgd.core.wire`);
* :class:`~localsgd.core.delayed.OverlappedRound`: the mean travels while the workers go on;
* :class:`~localsgd.core.elastic.ElasticRound`: workers may be lost, and heal from a peer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from localsgd.core import control
from localsgd.core.averager import Averager
from localsgd.core.comm import Communicator
from localsgd.core.options import NonfinitePolicy, OptimizerStatePolicy, Wire
from localsgd.core.wire import CompressedMean


@dataclass(kw_only=True)
class Round:
    """One round: what the driver decided before it runs, and what it found out while running."""

    tag: str = "sync"
    """Its ``comm/*`` counter (``"sync"``, ``"inner"``, ``"final"``)."""
    step: int | None = None
    """The optimizer step every worker must be at (``None``: not checked)."""
    nonfinite: NonfinitePolicy | None = None
    """Workers holding NaN/Inf: ``"raise"``, ``"skip_worker"`` (``None``: not checked)."""
    optimizer_state: OptimizerStatePolicy | None = None
    """The optimizer-state policy of this round (``None``: the averager's)."""
    fragment: int | None = None
    """Only this fragment's tensors (``None``: all)."""
    parameters: bool = True
    """``False``: the parameters are equal already (their gradients were all-reduced before the
    step): only the buffers are averaged, and the optimizer states, equal too, are left alone."""
    divergence: bool = False
    """Measure the workers' mean squared distance to their mean before it (:attr:`measured`)."""
    digests: Sequence[float] | None = None
    """Fingerprints of the local workers' first batches, compared across workers (pitfall 10)."""
    flags: Sequence[float] = ()
    """This rank's stop requests, max-reduced in the control message."""
    absent: bool = False
    """This process's workers take no part: they just healed from a peer (elastic rounds)."""

    # ---- found out while it runs
    bad: list[int] = field(default_factory=list)
    """Workers that contribute nothing (NaN/Inf under ``skip_worker``, or absent)."""
    agreed_flags: list[float] = field(default_factory=list)
    """The flags' max over all workers."""
    measured: float | None = None
    """The divergence, if measured."""
    due: int | None = None
    """An overlapped round: the step at which it lands (``None``: it lands at once)."""
    failed: bool = False
    """A collective failed (a peer was lost): the round is not committed."""
    pending: Any = None
    """A kind's own state for a round in flight."""

    @property
    def checked(self) -> bool:
        """Whether the round starts with a control message."""
        return bool(
            self.step is not None
            or self.nonfinite is not None
            or self.digests is not None
            or self.flags
            or self.absent
        )


def run_round(kind: RoundKind, r: Round) -> bool:
    """One round through ``kind``: agree -> reduce, then (at once, or at ``r.due`` for a round in
    flight) :func:`land_round`. Returns whether it was applied now."""
    with kind.averager.session():  # the buckets hold the models (FSDP2 shards: copied in, and back)
        kind.agree(r)  # the control message: step, NaN/Inf, data streams, stop flags
        kind.reduce(r)  # the mean: exact, compressed, of one fragment, or started in the background
        if r.due is not None:
            return False  # in flight: the driver lands it at step r.due
        return land_round(kind, r)


def land_round(kind: RoundKind, r: Round) -> bool:
    """The rest of a round, once its mean can be had: commit -> outer step -> state policy."""
    with kind.averager.session():
        kind.wait(r)  # a round in flight: its mean and its control message arrive (checked)
        if not kind.commit(r):
            return False  # a collective failed: every worker keeps its own model
        kind.outer_step(r)  # the global model from the mean; every worker takes it
        kind.averager.apply_state_policy(r.optimizer_state)  # "reset": a fresh optimizer state
        return True


class RoundKind(ABC):
    """How a round's collectives run (see the module docstring). A new kind of round is a new
    subclass: it implements :meth:`reduce`, and overrides the other stages it changes."""

    def __init__(self, averager: Averager, comm: Communicator | None = None) -> None:
        self.averager = averager
        self.comm = comm or averager.comm
        self.control = self.comm.control or self.comm
        """Where the control message goes: every process of a sharded worker must agree too."""

    def agree(self, r: Round) -> None:
        """The control message, blocking: the workers that contribute nothing go to ``r.bad``;
        NaN/Inf under ``"raise"`` raises on every rank."""
        if not r.checked:
            return
        bad, _, r.agreed_flags, absent = control.agree(
            self.control,
            self.averager.worker_flats(),
            r.step,
            nonfinite=r.nonfinite,
            digests=r.digests,
            flags=r.flags,
            absent=r.absent,
        )
        if bad and r.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite parameters or buffers (NaN/Inf) on worker(s) {bad} of "
                f"{self.control.num_workers} at optimizer step {r.step}: refusing to average them into "
                "the others. HINT: lower the learning rate or clip gradients, or "
                "LocalSGDStrategy(nonfinite='skip_worker')"
            )
        r.bad = sorted({*bad, *absent})  # absent workers, like skipped ones, contribute nothing
        if len(r.bad) == self.comm.num_workers:
            raise FloatingPointError(f"every worker holds NaN/Inf parameters at optimizer step {r.step}")
        self.averager.leave_out(r.bad, self.comm)

    @abstractmethod
    def reduce(self, r: Round) -> None:
        """The mean of the workers' models (``r.fragment``'s tensors) into every worker, or started
        in the background with ``r.due`` set."""

    def tick(self, r: Round, step: int) -> None:  # noqa: B027
        """Optimizer step ``step`` was taken while ``r`` is in flight."""

    def wait(self, r: Round) -> None:  # noqa: B027
        """A round in flight: everything has arrived."""

    def commit(self, r: Round) -> bool:
        """Whether every worker may apply the round."""
        return not r.failed

    def outer_step(self, r: Round) -> None:
        """The outer optimizer's step from the mean, into every worker (plain averaging: none)."""
        self.averager.outer_step(r.fragment)

    @property
    def blocking(self) -> RoundKind:
        """This kind's blocking form (the final average, a round whose parameters are equal)."""
        return self


class ExactRound(RoundKind):
    """The blocking fp32 mean: one collective per bucket, the optimizer state averaged with it
    under ``"average"``, the divergence measured where asked."""

    def reduce(self, r: Round) -> None:
        averager, comm = self.averager, self.comm
        averager.worker_buckets()  # rebuilt first if a tensor was re-pointed or added since the last round
        policy = r.optimizer_state or averager.optimizer_state
        parameters = r.parameters or bool(r.bad)  # a bad worker's buffers too: average everything
        measure = r.divergence and not r.bad and parameters and r.fragment is None
        before = averager.save_backup() if measure else None
        num_good = comm.num_workers - len(r.bad)
        with comm.round(r.tag):
            for i in averager.fragment_buckets(r.fragment):
                self.mean_bucket(i, parameters=parameters, num_good=num_good)
            if policy == "average" and parameters:
                averager.average_state(comm, num_good)
        if before is not None:
            r.measured = averager.divergence_from(before, comm)

    def mean_bucket(self, i: int, *, parameters: bool, num_good: int) -> None:
        """Bucket ``i``'s mean over the ``num_good`` workers that contribute (the others sent zeros)."""
        self.averager.mean_bucket_(i, self.comm, parameters=parameters, num_good=num_good)


class InnerRound(ExactRound):
    """A round inside a node (``Hierarchical``): the exact mean over the node's workers, no outer
    step (the outer optimizer steps on the rounds across nodes)."""

    def outer_step(self, r: Round) -> None:
        pass


class CompressedRound(ExactRound):
    """Each worker's delta from the global model (the outer optimizer's anchor) through a lossy
    wire; the buffers, and rounds with a worker left out, stay exact."""

    def __init__(self, averager: Averager, wire: Wire, *, error_feedback: bool) -> None:
        super().__init__(averager)
        if averager.outer is None:
            raise ValueError(f"wire={wire!r} sends deltas from the global model: it needs an outer optimizer")
        self.wire = CompressedMean(self.comm, wire, error_feedback=error_feedback)
        self._exact = False

    def reduce(self, r: Round) -> None:
        self._exact = bool(r.bad) or not r.parameters
        super().reduce(r)

    def mean_bucket(self, i: int, *, parameters: bool, num_good: int) -> None:
        if self._exact:
            super().mean_bucket(i, parameters=parameters, num_good=num_good)
            return
        averager = self.averager
        assert averager.outer is not None
        anchor = averager.outer.anchors[i]
        workers = averager.buckets_at(i)
        deltas = [b.params - anchor for b in workers]
        self.wire.mean_(deltas, key=i)
        for b, delta in zip(workers, deltas):
            torch.add(anchor, delta, out=b.params)
        rest = [b.flat[b.param_numel :] for b in workers]
        if rest[0].numel():  # the buffers travel exactly
            self.comm.all_reduce_(rest, op="mean")


def average(averager: Averager, *, outer: bool = True, **facts: Any) -> float | None:
    """One blocking exact round of ``averager``'s workers (its communicator), with the
    :class:`Round` ``facts`` (``outer=False``: no outer step, as inside a node); returns the
    divergence if measured. For tools and tests: the driver runs its own kind of round."""
    r = Round(**facts)
    run_round(ExactRound(averager) if outer else InnerRound(averager), r)
    return r.measured
