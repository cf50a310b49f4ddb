"""Averaging of model parameters, buffers and optimizer state across workers.

Parameters (trainable or frozen, with or without a gradient) and, under
``buffers="average"``, floating-point buffers are re-pointed once into one flat
tensor per (device, dtype): each ``p.data`` becomes a view of that storage. A
round is then a single collective per bucket on memory the model already uses,
with no gather/scatter copy and no allocation (DESIGN pitfall 5). If something
re-points a tensor later (``module.to(dtype)``, a buffer re-assigned by its
module), the bucket notices at the next round and rebuilds itself.

Integer buffers (``num_batches_tracked``) are never averaged: they count steps,
which are equal on all workers anyway.

Optimizer state is created lazily by the optimizer and may be replaced by
``load_state_dict``, so it is not re-pointed: under ``optimizer_state="average"``
it is copied into a persistent bucket, reduced, and copied back.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar, get_args

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedTensorMixin as _Uninitialized
from torch.optim import Optimizer

from localsgd.comm import Communicator
from localsgd.outer import OuterOptimizer

log = logging.getLogger(__name__)

_Choice = TypeVar("_Choice", bound=str)
BufferPolicy = Literal["average", "local"]
NonfinitePolicy = Literal["raise", "skip_worker"]
OptimizerStatePolicy = Literal["local", "average", "reset"]
NUM_FLAGS = 4
"""Slots for flags (stop requests) in every control message: one layout at every control point."""

_registrations = 0
"""Parameters, buffers and submodules registered on any module in this process so far, counted by
torch's global registration hooks: while it stands still, no model can have grown a tensor."""


def _count_registration(*_: object) -> None:
    global _registrations
    _registrations += 1


@functools.cache
def _watch_registrations() -> None:
    """Install the counting hooks, once per process (at the first averager)."""
    for register in (
        nn.modules.module.register_module_parameter_registration_hook,
        nn.modules.module.register_module_buffer_registration_hook,
        nn.modules.module.register_module_module_registration_hook,
    ):
        register(_count_registration)


def check_choice(name: str, value: object, allowed: tuple[_Choice, ...]) -> _Choice:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} ({value!r}) must be one of {choices}")
    return value


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


def _float_tensors(module: nn.Module, buffers: BufferPolicy) -> list[Tensor]:
    tensors: list[Tensor] = [p for p in module.parameters() if p.is_floating_point()]
    if buffers == "average":
        tensors += [b for b in module.buffers() if b.is_floating_point()]
    return tensors


def _group(tensors: Sequence[Tensor]) -> dict[tuple[str, str], list[Tensor]]:
    groups: dict[tuple[str, str], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((str(t.device), str(t.dtype)), []).append(t)
    return dict(sorted(groups.items()))


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
    ) -> None:
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
        self._backup: list[list[Tensor]] = []
        self._holding_average = False
        self.agreed_flags: list[float] = [0.0] * NUM_FLAGS
        """The flags of the last control message, max over all workers."""
        self.after_reset: Callable[[], None] | None = None
        """Called after every worker's optimizer state was reset (the batched path's stacked state)."""
        self._state_buckets: dict[tuple[object, ...], list[list[Tensor]]] = {}
        self.outer = outer
        self._build()
        self._bind_outer()

    # ------------------------------------------------------------------ layout
    def _structure(self) -> int:
        """How many parameters, buffers and children the modules' submodules hold: a tensor or
        module added since the buckets were built changes it. Counting takes no traversal of the
        module tree (~0.015 ms for a ResNet-56, against 0.17 ms for listing its tensors), and runs
        only when some module registered something since the last round."""
        self._seen_registrations = _registrations
        return sum(len(m._parameters) + len(m._buffers) + len(m._modules) for m in self._submodules)

    def _build(self) -> None:
        _watch_registrations()
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
        per_worker = [_group(_float_tensors(m, self.buffers)) for m in self.modules]
        keys = list(per_worker[0])
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
        grown = _registrations != self._seen_registrations and self._structure() != self._built_structure
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
        """
        self._ensure_intact()
        comm = comm or self.comm
        policy = optimizer_state or self.optimizer_state
        bad: list[int] = []
        if step is not None or nonfinite is not None or digests is not None or flags:
            bad, _ = self.agree(step, comm=comm, nonfinite=nonfinite, digests=digests, flags=flags)
        if bad and nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite parameters or buffers (NaN/Inf) on worker(s) {bad} of {comm.num_workers} at "
                f"optimizer step {step}: refusing to average them into the others. HINT: lower the "
                "learning rate or clip gradients, or LocalSGDStrategy(nonfinite='skip_worker')"
            )
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
        divergence = divergence and not bad and parameters
        if divergence:
            before = self._save_backup()
        with comm.round(tag):
            for i in range(len(self._buckets[0])):
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
                self._average_optimizer_state(comm, num_good)
        result = None
        if divergence:
            # distances of small differences: exact enough in the model's own dtype
            sq = []
            for w, backup in zip(self._buckets, before):
                total = torch.zeros((), dtype=torch.float64)
                for b, copy in zip(w, backup):
                    diff = copy[: b.param_numel].sub_(b.params)
                    total += torch.dot(diff, diff).double().cpu()
                sq.append(total.reshape(1).to(self._device))
            comm.all_reduce_(sq, op="mean", counted=False)
            result = float(sq[0])
        if outer and self.outer is not None:
            averages = [b.params for b in self._buckets[0]]
            anchors = self.outer.preview(averages) if outer == "preview" else self.outer.step(averages)
            for worker in self._buckets:
                for b, anchor in zip(worker, anchors):
                    b.params.copy_(anchor)
        if policy == "reset":
            for opts in self.optimizers:
                fresh_optimizer_state(opts)
            if self.after_reset is not None:
                self.after_reset()
        return result

    def _save_backup(self) -> list[list[Tensor]]:
        """Copy every local worker's flat tensors into persistent buffers (allocated once)."""
        if not self._backup:
            self._backup = [[torch.empty_like(b.flat) for b in w] for w in self._buckets]
        for w, backup in zip(self._buckets, self._backup):
            for b, copy in zip(w, backup):
                copy.copy_(b.flat)
        return self._backup

    @contextlib.contextmanager
    def averaged(self, tag: str = "eval") -> Iterator[None]:
        """Temporarily hold the global model a sync at this step would produce: the average, and
        with an outer optimizer its step from that average (its state is not advanced). Each
        worker's own model comes back on exit."""
        self._ensure_intact()
        self._save_backup()
        try:
            self.average(tag, optimizer_state="local", outer="preview")
            self._holding_average = True
            yield
        finally:
            self._holding_average = False
            self._copy_backup_in()

    def _copy_backup_in(self) -> None:
        for w, backup in zip(self._buckets, self._backup):
            for b, copy in zip(w, backup):
                b.flat.copy_(copy)

    @contextlib.contextmanager
    def own_models(self) -> Iterator[None]:
        """Each worker's own model, also inside :meth:`averaged` (a checkpoint saved during
        validation must store the workers' models, not the average evaluated at that moment);
        the average comes back on exit. Outside :meth:`averaged` the models are their own already."""
        if not self._holding_average:
            yield
            return
        average = [[b.flat.clone() for b in w] for w in self._buckets]
        self._copy_backup_in()
        try:
            yield
        finally:
            for w, saved in zip(self._buckets, average):
                for b, copy in zip(w, saved):
                    b.flat.copy_(copy)

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
    ) -> tuple[list[int], float]:
        """One small control all-reduce: the workers check that they are all at optimizer step
        ``step`` (a RuntimeError on every rank otherwise), learn which of them hold NaN/Inf
        (if ``nonfinite``), and reduce ``value`` with max. Returns (workers with NaN/Inf, max value).

        ``digests`` (one per local worker, see :func:`batch_digest`; 0 for none) are compared
        across all workers: two workers that drew the same first training batch read the same
        data stream, which makes averaging a no-op (DESIGN pitfall 10), and every rank raises a
        ValueError naming them. ``flags`` (at most :data:`NUM_FLAGS`, e.g. stop requests) are
        max-reduced into ``self.agreed_flags``.

        Every control message has this one layout, so that two ranks that reach different
        control points (one at a sync, one at the end of its epoch) still meet in a collective
        of one size, see the step mismatch and both fail, instead of both waiting for a timeout.
        """
        comm = comm or self.comm
        n = comm.num_workers
        messages = []
        for i, worker in enumerate(self._buckets):
            t = torch.zeros(2 * n + 3 + NUM_FLAGS, dtype=torch.float64, device=self._device)
            if nonfinite is not None and not all(_finite(b.flat) for b in worker):
                t[comm.first_local_worker + i] = 1.0
            if step is not None:
                t[n], t[n + 1] = step, -step
            t[n + 2] = value
            if digests is not None:
                t[n + 3 + comm.first_local_worker + i] = digests[i]
            for j, flag in enumerate(flags):
                t[2 * n + 3 + j] = flag
            messages.append(t)
        comm.all_reduce_(messages, op="max", counted=False)
        f = messages[0].cpu()
        _check_distinct_streams(f[n + 3 : 2 * n + 3].tolist(), step)
        self.agreed_flags = f[2 * n + 3 :].tolist()
        if step is not None and (int(f[n]) != step or int(-f[n + 1]) != step):
            raise RuntimeError(
                f"workers are out of step: this one is at optimizer step {step}, others between "
                f"{int(-f[n + 1])} and {int(f[n])}. Every worker must take the same number of optimizer "
                "steps (HINT: uneven dataloaders or a custom sampler that gives ranks different numbers "
                "of batches; let Lightning's DistributedSampler shard the data)"
            )
        return [w for w in range(n) if f[w] > 0], float(f[n + 2])

    def _average_optimizer_state(self, comm: Communicator, num_good: int | None = None) -> None:
        per_worker = [_state_tensors(opts, include_step=False) for opts in self.optimizers]
        signature = tuple((t.shape, t.dtype, t.device) for t in per_worker[0])
        for i, ts in enumerate(per_worker[1:], start=1):
            if tuple((t.shape, t.dtype, t.device) for t in ts) != signature:
                raise RuntimeError(f"optimizer state of local worker {i} does not match worker 0's")
        # Lazily created state can differ across processes (a parameter that got no
        # gradient on one rank has no momentum there): check before the collective,
        # so a mismatch is an error on every rank rather than a hang or garbage.
        count = sum(t.numel() for t in per_worker[0])
        checks = [torch.tensor([count, -count], dtype=torch.float64, device=self._device) for _ in per_worker]
        comm.all_reduce_(checks, op="max", counted=False)
        if int(checks[0][0]) != count or int(-checks[0][1]) != count:
            raise RuntimeError(
                "optimizer_state='average': workers hold optimizer state of different sizes "
                f"(this worker {count} elements, others between {int(-checks[0][1])} "
                f"and {int(checks[0][0])}); "
                "HINT: every parameter must receive a gradient on every worker before the first sync, "
                "or use optimizer_state='local'"
            )
        buckets = self._state_buckets.get(signature)
        if buckets is None:
            # one flat per (device, dtype) group and local worker, kept while the layout holds
            buckets = [
                [
                    torch.empty(sum(t.numel() for t in group), dtype=group[0].dtype, device=group[0].device)
                    for _ in per_worker
                ]
                for group in _group(per_worker[0]).values()
            ]
            self._state_buckets = {signature: buckets}
        for g, group_ts in enumerate(zip(*[_group(ts).values() for ts in per_worker])):
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


def fresh_optimizer_state(optimizers: Sequence[Any]) -> None:
    """Put each parameter's optimizer state back to what a newly created optimizer of the same type
    and hyperparameters holds before its first step: nothing for most torch optimizers (their
    first step creates it: SGD's momentum buffer is then the gradient, NAdam's mu_product 1),
    Adagrad's accumulators at ``initial_accumulator_value``. Zeroing tensors instead is wrong
    for those, and keeping ``step`` while zeroing Adam's moments breaks its bias correction.

    The state dicts are cleared and refilled in place: a simulated worker's are shared with
    the optimizer that runs it. ``optimizers`` may be a simulated worker's views (their ``source``
    is the optimizer they stand for)."""
    for opt in optimizers:
        source = getattr(opt, "source", opt)
        groups = [
            {**{k: v for k, v in theirs.items() if k != "params"}, "params": list(mine["params"])}
            for mine, theirs in zip(opt.param_groups, source.param_groups)
        ]
        fresh: dict[Any, dict[str, Any]] = {}  # if it cannot be rebuilt: start empty, as torch's do
        # the constructor's arguments too: Adagrad fills its accumulators from its own argument
        for kwargs in (getattr(source, "defaults", {}), {}):
            try:
                fresh = type(source)(groups, **kwargs).state
                break
            except TypeError:
                continue
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p)
                if state is not None:
                    state.clear()
                    state.update(fresh.get(p, {}))


def _state_tensors(optimizers: Sequence[Optimizer], *, include_step: bool) -> list[Tensor]:
    """Floating-point state tensors in a rank-independent order (groups, params, sorted keys)."""
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
                    out.append(value)
    return out
