"""Averaging of model parameters, buffers and optimizer state across workers.

An :class:`Averager` holds the local workers' models as views of flat buckets (see
:mod:`localsgd.core.buckets`); a round is one collective per bucket. If something re-points a
tensor later (``module.to(dtype)``, a buffer re-assigned by its module) or adds one, the
averager notices at the next round and rebuilds its buckets. It also holds the evaluation swap
(:meth:`Averager.averaged`: the average in, each worker's own model back afterwards).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedTensorMixin as _Uninitialized
from torch.optim import Optimizer

from localsgd.core import buckets, control
from localsgd.core.buckets import FlatBucket, by_device_and_dtype, float_tensors, split_fragments
from localsgd.core.comm import Communicator
from localsgd.core.control import NUM_FLAGS
from localsgd.core.optim_state import StateAverager, fresh_optimizer_state
from localsgd.core.options import BufferPolicy, NonfinitePolicy, OptimizerStatePolicy, check_choice
from localsgd.core.outer import OuterOptimizer
from localsgd.core.round_kinds import OverlappedAndCompressed
from localsgd.core.swap import EvaluationSwap
from localsgd.core.wire import CompressedMean, Wire

log = logging.getLogger(__name__)


class Averager(OverlappedAndCompressed, EvaluationSwap):
    """Averages ``modules`` (one per local worker of ``comm``) and their optimizers' state.

    Args:
        modules: the local workers' models, ``comm.num_local_workers`` of them, all with
            the same architecture.
        comm: the communicator that reaches the other workers.
        buffers: ``"average"`` averages floating-point buffers (BatchNorm running mean and
            variance) with the parameters; ``"local"`` leaves every buffer as each worker has it.
        optimizer_state: at a sync, ``"local"`` leaves each worker's optimizer state as it is,
            ``"average"`` averages its floating-point tensors (momentum, Adam moments; not the
            step count), ``"reset"`` zeroes every state tensor, step count included, as if
            the optimizer had just been created.
        optimizers: per local worker, the optimizers whose state the policy applies to.
        outer: an outer optimizer stepping the global model on ``anchor - average`` at each
            sync (``None``: plain averaging). Buffers are always plainly averaged.
        wire: what a sync sends (``"fp32"``, or deltas in ``"bf16"``/``"int8"``; needs ``outer``).
        error_feedback: with a lossy wire, carry each encoding's loss into the next sync.
        num_fragments: the model's tensors cut into that many fragments of near-equal bytes
            (:func:`~localsgd.core.buckets.split_fragments`); a round may average one of them.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        comm: Communicator,
        *,
        buffers: BufferPolicy = "average",
        optimizer_state: OptimizerStatePolicy = "local",
        optimizers: Sequence[Sequence[Optimizer]] = (),
        outer: OuterOptimizer | None = None,
        wire: Wire = "fp32",
        error_feedback: bool = False,
        num_fragments: int = 1,
    ) -> None:
        self.num_fragments = num_fragments
        self.buffers = check_choice("buffers", buffers, get_args(BufferPolicy))
        self.wire = None if wire == "fp32" else CompressedMean(comm, wire, error_feedback=error_feedback)
        """The compressed wire of the syncs (``None``: fp32, exact)."""
        if self.wire is not None and outer is None:
            raise ValueError(f"wire={wire!r} sends deltas from the global model: it needs an outer optimizer")
        self.optimizer_state = check_choice(
            "optimizer_state", optimizer_state, get_args(OptimizerStatePolicy)
        )
        if len(modules) != comm.num_local_workers:
            raise ValueError(
                f"modules ({len(modules)}) must hold one model per local worker ({comm.num_local_workers})"
            )
        if optimizers and len(optimizers) != len(modules):
            raise ValueError(f"optimizers ({len(optimizers)}) must hold one list per model ({len(modules)})")
        self.modules = list(modules)
        self.comm = comm
        self.optimizers = [list(opts) for opts in optimizers] or [[] for _ in modules]
        self._buckets: list[list[FlatBucket]] = []
        self._backup: list[list[Tensor]] = []
        self._holding_average = False
        self.agreed_flags: list[float] = [0.0] * NUM_FLAGS
        """The flags of the last control message, max over all workers."""
        self.agreed_absent: list[int] = []
        """The workers that took no part in the last control message's round (they healed)."""
        self.after_reset: Callable[[], None] | None = None
        """Called after every worker's optimizer state was reset (the batched path's stacked state)."""
        self._state_averager = StateAverager()
        self.outer = outer
        self._build()
        self._bind_outer()

    # ------------------------------------------------------------------ layout
    def _structure(self) -> int:
        """How many parameters, buffers and children the modules' submodules hold: a tensor or
        module added since the buckets were built changes it. Counting takes no traversal of the
        module tree (~0.015 ms for a ResNet-56, against 0.17 ms for listing its tensors), and runs
        only when some module registered something since the last round."""
        self._seen_registrations = buckets.registrations()
        return sum(len(m._parameters) + len(m._buffers) + len(m._modules) for m in self._submodules)

    def _build(self) -> None:
        buckets.watch_registrations()
        self._submodules = [sub for m in self.modules for sub in m.modules()]
        self._built_structure = self._structure()
        for m in self.modules:
            lazy = [
                n for n, t in (*m.named_parameters(), *m.named_buffers()) if isinstance(t, _Uninitialized)
            ]
            if lazy:
                raise ValueError(
                    f"the model has uninitialized (lazy) parameters or buffers {lazy}: their shapes are not "
                    "known yet, so they cannot be averaged. HINT: run one forward pass on a sample batch in "
                    "LightningModule.setup() (or configure_model) so that lazy modules materialize before fit"
                )
        anchors = self._anchors_by_tensor()
        # buckets by (fragment, device, dtype); one fragment: the (device, dtype) order as ever
        per_worker = [
            {
                (f, *key): group
                for f, fragment in enumerate(
                    split_fragments(float_tensors(m, self.buffers), self.num_fragments)
                )
                for key, group in by_device_and_dtype(fragment).items()
            }
            for m in self.modules
        ]
        keys = list(per_worker[0])
        self.bucket_fragments = [key[0] for key in keys]
        """The fragment of each bucket."""
        for i, groups in enumerate(per_worker[1:], start=1):
            shapes0 = {k: [t.shape for t in v] for k, v in per_worker[0].items()}
            if {k: [t.shape for t in v] for k, v in groups.items()} != shapes0:
                raise ValueError(f"modules[{i}] does not have the same tensors as modules[0]")
        # The local workers' flat tensors of one group are the rows of one storage, so that
        # the simulator's batched path can see each tensor of all workers as one stacked view.
        self._storage: list[Tensor] = []
        for k in keys:
            first = per_worker[0][k]
            numel = sum(t.numel() for t in first)
            self._storage.append(
                torch.empty(len(per_worker), numel, dtype=first[0].dtype, device=first[0].device)
            )
        self._buckets = [
            [FlatBucket(groups[k], flat=storage[w]) for k, storage in zip(keys, self._storage)]
            for w, groups in enumerate(per_worker)
        ]
        self._backup = []
        if anchors is not None:
            self._rebind_outer(anchors)

    def _bind_outer(self) -> None:
        if self.outer is not None:
            self.outer.bind([b.params for b in self._buckets[0]])

    def _anchors_by_tensor(self) -> dict[int, Tensor] | None:
        """The outer optimizer's anchor of each parameter, by ``id`` of worker 0's parameter."""
        if self.outer is None or not self.outer.anchors or not self._buckets:
            return None
        out: dict[int, Tensor] = {}
        for bucket, anchor in zip(self._buckets[0], self.outer.anchors):
            for t, offset in zip(bucket.tensors, bucket.offsets):
                if isinstance(t, nn.Parameter):
                    out[id(t)] = anchor[offset : offset + t.numel()].clone()
        return out

    def _rebind_outer(self, anchors: dict[int, Tensor]) -> None:
        """After a rebuild, the global model carried into the new layout: the old anchor of every
        parameter that had one (identical on every rank), rank 0's current value for a new one."""
        assert self.outer is not None
        new = []
        for bucket in self._buckets[0]:
            anchor = bucket.params.detach().clone()
            for t, offset in zip(bucket.tensors, bucket.offsets):
                old = anchors.get(id(t))
                if old is not None and old.numel() == t.numel():
                    anchor[offset : offset + t.numel()].copy_(old)
            new.append(anchor)
        for anchor in new:  # one tensor per local worker: the same anchor for all of them
            self.comm.broadcast_([anchor] * self.comm.num_local_workers, src=0)
        if [a.shape for a in self.outer.anchors] != [a.shape for a in new]:
            log.warning("the model's layout changed: the outer optimizer's state (momentum) restarts")
        self.outer.bind(new)

    def _ensure_intact(self) -> None:
        moved = not all(b.intact() for worker in self._buckets for b in worker)
        grown = (
            buckets.registrations() != self._seen_registrations and self._structure() != self._built_structure
        )
        if moved or grown:
            # a tensor re-pointed (module.to(...), a buffer re-assigned) or one added since the
            # last round: rebuilt, so that it is averaged from now on, never silently left out
            log.debug("the model's tensors changed since the last round; rebuilding buckets")
            self._build()

    def stacked_views(self) -> dict[int, Tensor]:
        """For each tensor in the buckets, by ``id`` of local worker 0's tensor: a view of shape
        ``(num_local_workers, *shape)`` over all local workers' copies."""
        self._ensure_intact()
        views: dict[int, Tensor] = {}
        for bucket, storage in zip(self._buckets[0], self._storage):
            for t, offset in zip(bucket.tensors, bucket.offsets):
                views[id(t)] = storage.as_strided(
                    (storage.shape[0], *t.shape),
                    (storage.stride(0), *t.stride()),
                    storage.storage_offset() + offset,
                )
        return views

    @property
    def num_bytes(self) -> int:
        """Bytes one worker contributes to a round of parameter (and buffer) averaging."""
        return sum(b.flat.numel() * b.flat.element_size() for b in self._buckets[0])

    def fragment_buckets(self, fragment: int | None) -> list[int]:
        """The indices of ``fragment``'s buckets (``None``: every bucket)."""
        if fragment is None:
            return list(range(len(self._buckets[0])))
        return [i for i, f in enumerate(self.bucket_fragments) if f == fragment]

    def flat_tensors(self, worker: int = 0) -> list[Tensor]:
        """The flat buckets of local ``worker``: its parameters (and averaged buffers), by (device, dtype)."""
        self._ensure_intact()
        return [b.flat for b in self._buckets[worker]]

    # ------------------------------------------------------------------ collectives
    def broadcast(self, src: int = 0) -> None:
        """Make every worker's model equal to worker ``src``'s (all buffers included)."""
        self._ensure_intact()
        for i in range(len(self._buckets[0])):
            self.comm.broadcast_([w[i].flat for w in self._buckets], src=src)
        # integer buffers (and float buffers under buffers="local") are not in the buckets
        rest = [
            [b for b in m.buffers() if not (self.buffers == "average" and b.is_floating_point())]
            for m in self.modules
        ]
        for j in range(len(rest[0])):
            self.comm.broadcast_([r[j] for r in rest], src=src)
        self._bind_outer()  # the global model is now the broadcast one

    def average(
        self,
        tag: str = "sync",
        *,
        comm: Communicator | None = None,
        optimizer_state: OptimizerStatePolicy | None = None,
        outer: bool | Literal["preview"] = True,
        divergence: bool = False,
        step: int | None = None,
        nonfinite: NonfinitePolicy | None = None,
        digests: Sequence[float] | None = None,
        flags: Sequence[float] = (),
        parameters: bool = True,
        fragment: int | None = None,
        absent: bool = False,
    ) -> float | None:
        """One round: average the models over ``comm`` (default: all workers), take the outer
        optimizer's step if ``outer`` (``"preview"``: its result, without advancing its state),
        then apply the optimizer-state policy (``optimizer_state`` overrides the averager's for
        this round). ``parameters=False``: the parameters are already equal on every worker (their
        gradients were all-reduced before the step); only the buffers are averaged, and the
        optimizer states, equal too, are left as they are.

        With ``divergence``, returns the workers' mean squared distance to their average just
        before it, ``mean_k ||theta_k - mean(theta)||^2`` over the parameters (it costs a copy
        of the model and one small extra all-reduce); otherwise ``None``.

        With ``step`` or ``nonfinite``, one small all-reduce first makes the workers agree that
        they are all at optimizer step ``step`` (else a RuntimeError on every rank, instead of
        a hang or a silently wrong average) and which of them hold NaN/Inf in their flat
        tensors: ``"raise"`` raises on every rank naming them; ``"skip_worker"`` leaves them
        out of this average, resets them to it and zeroes their optimizer state.

        ``fragment``: only that fragment's tensors are averaged, and only their outer state steps
        (the control message still checks the whole model).

        ``absent``: this process's workers take no part (they just healed from a peer, see
        :mod:`localsgd.core.elastic`): like skipped workers they contribute nothing and receive the
        others' average, their optimizer state fresh.
        """
        self._ensure_intact()
        indices = self.fragment_buckets(fragment)
        comm = comm or self.comm
        policy = optimizer_state or self.optimizer_state
        bad: list[int] = []
        away: list[int] = []
        if step is not None or nonfinite is not None or digests is not None or flags or absent:
            bad, _ = self.agree(
                step, comm=comm, nonfinite=nonfinite, digests=digests, flags=flags, absent=absent
            )
            away = self.agreed_absent
        if bad and nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite parameters or buffers (NaN/Inf) on worker(s) {bad} of {comm.num_workers} at "
                f"optimizer step {step}: refusing to average them into the others. HINT: lower the "
                "learning rate or clip gradients, or LocalSGDStrategy(nonfinite='skip_worker')"
            )
        if away:  # absent workers, like skipped ones, contribute nothing and receive the average
            bad = sorted({*bad, *away})
        num_good = comm.num_workers - len(bad)
        if num_good == 0:
            raise FloatingPointError(f"every worker holds NaN/Inf parameters at optimizer step {step}")
        if bad:
            parameters = True  # a worker's buffers went bad: average everything over the healthy ones
        local_bad = [i for i in range(len(self._buckets)) if comm.first_local_worker + i in bad]
        for i in local_bad:  # contribute nothing; receive the healthy workers' average
            for b in self._buckets[i]:
                b.flat.zero_()
            fresh_optimizer_state(self.optimizers[i])  # restarts as with a new optimizer
        divergence = divergence and not bad and parameters and fragment is None  # not of one fragment
        if divergence:
            before = self._save_backup()
        # a compressed wire carries the syncs' deltas from the global model; other rounds are exact
        compressed = self.wire is not None and comm is self.comm and outer is True and parameters and not bad
        with comm.round(tag):
            for i in indices:
                if compressed:
                    self._compressed_round(i, comm)
                    continue
                flats = [w[i].flat if parameters else w[i].flat[w[i].param_numel :] for w in self._buckets]
                if not flats[0].numel():
                    continue
                if bad:
                    comm.all_reduce_(flats, op="sum")
                    for f in flats:
                        f.div_(num_good)
                else:
                    comm.all_reduce_(flats, op="mean")
            if policy == "average" and parameters:
                self._state_averager.average(comm, self.optimizers, self._device, num_good)
        result = None
        if divergence:
            # distances of small differences: exact enough in the model's own dtype
            sq = []
            for w, backup in zip(self._buckets, before):
                total = torch.zeros((), dtype=torch.float64)
                for b, copy in ((w[i], backup[i]) for i in indices):
                    diff = copy[: b.param_numel].sub_(b.params)
                    total += torch.dot(diff, diff).double().cpu()
                sq.append(total.reshape(1).to(self._device))
            comm.all_reduce_(sq, op="mean", counted=False)
            result = float(sq[0])
        self.conclude(outer=outer, optimizer_state=policy, fragment=fragment)
        return result

    def conclude(
        self,
        *,
        outer: bool | Literal["preview"] = True,
        optimizer_state: OptimizerStatePolicy | None = None,
        fragment: int | None = None,
    ) -> None:
        """A round's end, once its average is in every worker: the outer optimizer's step from it
        (``"preview"``: its result, without advancing its state), then the optimizer-state policy's
        reset (averaging the state is part of the round's collectives)."""
        indices = self.fragment_buckets(fragment)
        if outer and self.outer is not None:
            averages = [b.params for b in self._buckets[0]]
            if outer == "preview":
                anchors = self.outer.preview(averages)
            else:
                anchors = self.outer.step(averages, only=None if fragment is None else indices)
            for worker in self._buckets:
                for i in indices:
                    worker[i].params.copy_(anchors[i])
        if (optimizer_state or self.optimizer_state) == "reset":
            for opts in self.optimizers:
                fresh_optimizer_state(opts)
            if self.after_reset is not None:
                self.after_reset()

    @property
    def _device(self) -> torch.device:
        """Where control messages live (NCCL only reduces tensors on the GPU)."""
        return self._buckets[0][0].flat.device if self._buckets[0] else torch.device("cpu")

    def agree(
        self,
        step: int | None,
        *,
        comm: Communicator | None = None,
        nonfinite: str | None = None,
        value: float = 0.0,
        digests: Sequence[float] | None = None,
        flags: Sequence[float] = (),
        absent: bool = False,
    ) -> tuple[list[int], float]:
        """The control message over ``comm`` (default: all workers), see :func:`localsgd.core.control.agree`;
        the agreed flags go to ``self.agreed_flags``, the absent workers to ``self.agreed_absent``.
        Returns (workers with NaN/Inf, max value)."""
        bad, reduced, self.agreed_flags, self.agreed_absent = control.agree(
            comm or self.comm,
            [[b.flat for b in w] for w in self._buckets],
            step,
            nonfinite=nonfinite,
            value=value,
            digests=digests,
            flags=flags,
            absent=absent,
        )
        return bad, reduced
