"""Averaging of model parameters, buffers and optimizer state across workers.

An :class:`Averager` holds the local workers' models as views of flat buckets (see
:mod:`localsgd.core.buckets`); a round is one collective per bucket. If something re-points a
tensor later (``module.to(dtype)``, a buffer re-assigned by its module) or adds one, the
averager notices at the next round and rebuilds its buckets. It also holds the evaluation swap
(:meth:`Averager.averaged`: the average in, each worker's own model back afterwards).

A model sharded by FSDP2 (its parameters DTensors) is held in :class:`~localsgd.core.buckets.CopiedBucket`s:
copies of this process's shards, taken in before each round and written back after it
(:meth:`Averager.session`); everything else is the same, on 1/S of the model.

It holds the parts of a round that touch the models (a bucket's mean, the optimizer state's
mean and reset, the outer step, the divergence); the round itself, and its kinds, are in
:mod:`localsgd.core.rounds`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import get_args

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedTensorMixin as _Uninitialized  # type: ignore[attr-defined]
from torch.optim import Optimizer

from localsgd.core import buckets
from localsgd.core.buckets import (
    CopiedBucket,
    FlatBucket,
    by_device_and_dtype,
    float_tensors,
    fsdp_units,
    local_numel,
    sharded,
    split_fragments,
)
from localsgd.core.comm import Communicator
from localsgd.core.optim_state import StateAverager, fresh_optimizer_state
from localsgd.core.options import BufferPolicy, OptimizerStatePolicy, check_choice
from localsgd.core.outer import OuterOptimizer
from localsgd.core.swap import EvaluationSwap

log = logging.getLogger(__name__)


class Averager:
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
        num_fragments: the model's tensors cut into that many fragments of near-equal bytes
            (:func:`~localsgd.core.buckets.split_fragments`), along FSDP2 units for a sharded
            model; a round may average one of them.
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
        num_fragments: int = 1,
    ) -> None:
        self.num_fragments = num_fragments
        self.buffers = check_choice("buffers", buffers, get_args(BufferPolicy))
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
        self.swap = EvaluationSwap()
        """Holds the global model in every worker for a while (evaluation, checkpoints)."""
        self.after_reset: Callable[[], None] | None = None
        """Called after every worker's optimizer state was reset (the batched path's stacked state)."""
        self._state_averager = StateAverager()
        self._in_session = False
        self._copied = False
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
        # where each tensor is registered: a module that re-assigns a buffer (an EMA written as
        # ``self.ema = 0.9 * self.ema + ...``) or a user who replaces a parameter puts a new
        # object there, which the buckets must take in (checked by identity, DESIGN pitfall 15)
        self._registered = [
            (slots, name, t)
            for sub in self._submodules
            for slots in (sub._parameters, sub._buffers)
            for name, t in slots.items()
            if t is not None
        ]
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
                for f, fragment in enumerate(split_fragments(ts, self.num_fragments, fsdp_units(m, ts)))
                for key, group in by_device_and_dtype(fragment).items()
            }
            for m in self.modules
            for ts in [float_tensors(m, self.buffers)]
        ]
        keys = list(per_worker[0])
        # an FSDP2-sharded model's shards live in FSDP2's storage: copied in and out around a round
        params = [t for m in self.modules for t in m.parameters()]
        bucket_type = CopiedBucket if sharded(params) else FlatBucket
        self._copied = bucket_type is CopiedBucket
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
            numel = sum(local_numel(t) for t in first)
            self._storage.append(
                torch.empty(len(per_worker), numel, dtype=first[0].dtype, device=first[0].device)
            )
        self._buckets = [
            [bucket_type(groups[k], flat=storage[w]) for k, storage in zip(keys, self._storage)]
            for w, groups in enumerate(per_worker)
        ]
        self.swap.rebind(self._buckets)
        if anchors is not None:
            self._rebind_outer(anchors)

    def _bind_outer(self) -> None:
        if self.outer is not None:
            self.outer.bind([b.params for b in self._buckets[0]])

    def restart_outer(self) -> None:
        """The outer optimizer starts afresh (no momentum) from worker 0's current model."""
        with self.session():
            self._bind_outer()

    def _anchors_by_tensor(self) -> dict[int, Tensor] | None:
        """The outer optimizer's anchor of each parameter, by ``id`` of worker 0's parameter."""
        if self.outer is None or not self.outer.anchors or not self._buckets:
            return None
        out: dict[int, Tensor] = {}
        for bucket, anchor in zip(self._buckets[0], self.outer.anchors):
            for t, offset, n in zip(bucket.tensors, bucket.offsets, bucket.numels):
                if isinstance(t, nn.Parameter):
                    out[id(t)] = anchor[offset : offset + n].clone()
        return out

    def _rebind_outer(self, anchors: dict[int, Tensor]) -> None:
        """After a rebuild, the global model carried into the new layout: the old anchor of every
        parameter that had one (identical on every rank), rank 0's current value for a new one."""
        assert self.outer is not None
        new = []
        for bucket in self._buckets[0]:
            anchor = bucket.params.detach().clone()
            for t, offset, n in zip(bucket.tensors, bucket.offsets, bucket.numels):
                old = anchors.get(id(t))
                if old is not None and old.numel() == n:
                    anchor[offset : offset + n].copy_(old)
            new.append(anchor)
        for anchor in new:  # one tensor per local worker: the same anchor for all of them
            self.comm.broadcast_([anchor] * self.comm.num_local_workers, src=0)
        if [a.shape for a in self.outer.anchors] != [a.shape for a in new]:
            log.warning("the model's layout changed: the outer optimizer's state (momentum) restarts")
        self.outer.bind(new)

    def _ensure_intact(self) -> None:
        moved = not all(b.intact() for worker in self._buckets for b in worker)
        # re-assigning a buffer or a parameter fires torch's registration hooks too: while their
        # count stands still, no tensor was replaced or added, and nothing else needs looking at
        changed = buckets.registrations() != self._seen_registrations and (
            self._structure() != self._built_structure
            or any(slots.get(name) is not t for slots, name, t in self._registered)
        )
        if moved or changed:
            # a tensor re-pointed (module.to(...)), replaced by another object (a buffer re-assigned
            # by its module, a parameter swapped by the user) or added since the last round:
            # rebuilt, so that it is averaged from now on, never silently left out
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

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """While it is open, the flat buckets hold the models: a round reads and writes them, and
        the models take what they hold when it closes. The models are what a training step
        changes, so every use of the buckets opens one (nested: only the outermost acts). For
        views (the usual buckets) it costs nothing; copied buckets (FSDP2 shards) copy the
        shards in on opening and back on closing."""
        if self._in_session or not self._copied:  # views hold the models already: nothing to do
            yield
            return
        self._ensure_intact()
        for w in self._buckets:
            for b in w:
                b.pull()
        self._in_session = True
        try:
            yield
        finally:
            self._in_session = False
            for w in self._buckets:
                for b in w:
                    b.push()

    # ------------------------------------------------------------------ collectives
    def broadcast(self, src: int = 0) -> None:
        """Make every worker's model equal to worker ``src``'s (all buffers included)."""
        with self.session():
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

    # ------------------------------------------------------------------ a round's parts
    def worker_flats(self) -> list[list[Tensor]]:
        """Every local worker's flat tensors (what a control message checks for NaN/Inf)."""
        self._ensure_intact()
        return [[b.flat for b in w] for w in self._buckets]

    def worker_buckets(self) -> list[list[FlatBucket]]:
        """Every local worker's buckets (rebuilt first if the model's tensors changed)."""
        self._ensure_intact()
        return self._buckets

    def buckets_at(self, i: int) -> list[FlatBucket]:
        """Bucket ``i`` of every local worker."""
        return [w[i] for w in self._buckets]

    def leave_out(self, workers: Sequence[int], comm: Communicator) -> None:
        """``workers`` (global indices over ``comm``) contribute nothing to the coming mean and
        receive it: this process's among them send zeros, and restart their optimizer state."""
        for i in range(len(self._buckets)):
            if comm.first_local_worker + i in workers:
                for b in self._buckets[i]:
                    b.flat.zero_()
                fresh_optimizer_state(self.optimizers[i])  # restarts as with a new optimizer

    def mean_bucket_(self, i: int, comm: Communicator, *, parameters: bool = True, num_good: int) -> None:
        """Bucket ``i``'s mean over ``comm``'s ``num_good`` contributing workers, into every worker
        (``parameters=False``: its buffers only)."""
        flats = [w[i].flat if parameters else w[i].flat[w[i].param_numel :] for w in self._buckets]
        if not flats[0].numel():
            return
        if num_good == comm.num_workers:
            comm.all_reduce_(flats, op="mean")
            return
        comm.all_reduce_(flats, op="sum")
        for f in flats:
            f.div_(num_good)

    def average_state(self, comm: Communicator, num_good: int) -> None:
        """The optimizer state's mean over ``comm``'s ``num_good`` contributing workers."""
        self._state_averager.average(comm, self.optimizers, self._device, num_good)

    def divergence_from(self, before: list[list[Tensor]], comm: Communicator) -> float:
        """``mean_k ||theta_k - mean(theta)||^2`` over the parameters, from each worker's model
        ``before`` the mean that the buckets now hold (one small extra all-reduce; over sharded
        workers, over every process: each holds a part of its worker's distance)."""
        sq = []
        for w, backup in zip(self._buckets, before):
            total = torch.zeros((), dtype=torch.float64)
            for b, copy in zip(w, backup):
                # distances of small differences: exact enough in the model's own dtype
                diff = copy[: b.param_numel].sub_(b.params)
                total += torch.dot(diff, diff).double().cpu()
            sq.append(total.reshape(1).to(self._device))
        if comm.control is None:
            comm.all_reduce_(sq, op="mean", counted=False)
            return float(sq[0])
        # the mean over all K x S processes, times S: the mean over workers of their shards' sum
        comm.control.all_reduce_(sq, op="mean", counted=False)
        return float(sq[0]) * comm.control.num_workers / comm.num_workers

    def outer_step(self, fragment: int | None = None) -> None:
        """The outer optimizer's step from the mean the buckets hold (of ``fragment``'s tensors),
        and every worker takes the new global model; plain averaging (no outer optimizer): the mean."""
        if self.outer is None:
            return
        indices = self.fragment_buckets(fragment)
        anchors = self.outer.step(
            [b.params for b in self._buckets[0]], only=None if fragment is None else indices
        )
        for worker in self._buckets:
            for i in indices:
                worker[i].params.copy_(anchors[i])

    def apply_state_policy(self, policy: OptimizerStatePolicy | None = None) -> None:
        """After a round: ``"reset"`` restarts every worker's optimizer state (``"average"`` was
        part of the round's collectives; ``None``: this averager's policy)."""
        if (policy or self.optimizer_state) != "reset":
            return
        for opts in self.optimizers:
            fresh_optimizer_state(opts)
        if self.after_reset is not None:
            self.after_reset()

    def on_reset(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every reset of the optimizer state (the batched path's stacked state)."""
        self.after_reset = callback

    def save_backup(self) -> list[list[Tensor]]:
        """Every local worker's flat tensors, copied into buffers kept from call to call."""
        self._ensure_intact()
        return self.swap.save_backup()

    # ------------------------------------------------------------------ the global model, held
    def averaged(self, tag: str = "eval") -> contextlib.AbstractContextManager[None]:
        """Temporarily hold the global model a sync at this step would produce: the mean, and with
        an outer optimizer its step from it (its state is not advanced); each worker's own model
        back on exit. No control message, and not counted as a round under ``tag``'s name only."""
        self._ensure_intact()
        return self.swap.hold(self._preview_global, tag, self.session)

    def _preview_global(self, tag: str) -> None:
        with self.comm.round(tag):
            for i in range(len(self._buckets[0])):
                self.mean_bucket_(i, self.comm, num_good=self.comm.num_workers)
        if self.outer is not None:
            anchors = self.outer.preview([b.params for b in self._buckets[0]])
            for worker in self._buckets:
                for b, anchor in zip(worker, anchors):
                    b.params.copy_(anchor)

    def holding(self, flats: list[Tensor]) -> contextlib.AbstractContextManager[None]:
        """Temporarily hold ``flats`` (one tensor per bucket: a global model kept elsewhere, such as
        the last committed round's) in every worker; each worker's own model back on exit."""
        self._ensure_intact()
        return self.swap.hold(lambda _: self.swap.fill(flats), "hold", self.session)

    def own_models(self) -> contextlib.AbstractContextManager[None]:
        """Each worker's own model, also inside :meth:`averaged` (a checkpoint saved during
        validation stores the workers' models, not the average evaluated at that moment)."""
        return self.swap.own_models(self.session)

    @property
    def _device(self) -> torch.device:
        """Where control messages live (NCCL only reduces tensors on the GPU)."""
        return self._buckets[0][0].flat.device if self._buckets[0] else torch.device("cpu")
