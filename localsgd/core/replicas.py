"""K logical workers on one device, with exactly the math of K processes.

The Local SGD papers use 16 to 256 workers; this module lets one process (or a few)
stand in for them. Each simulated worker has its own parameters, buffers (BatchNorm
statistics), optimizer state, torch RNG stream and data shard; averaging, schedules
and outer optimizers are the library's own code, run through a communicator whose
local workers are these simulated ones.

How: the model's tensors are *re-pointed* at one worker's storage at a time
(``p.data = worker_p``), and the optimizer's per-parameter state dicts are swapped
the same way, so the user's LightningModule, optimizer, LR scheduler, gradient
clipping and precision plugin all run unchanged, once per worker. Swapping is
pointer assignment: no copies. :class:`WorkerReplicas` holds the workers;
:class:`localsgd.lightning.simulation.WorkerLoader` deals each of them the shard that its
rank would get in a K-process run; :class:`LocalSGDStrategy(workers_per_device=k)
<localsgd.lightning.strategy.LocalSGDStrategy>` drives both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer


class _Replica(nn.Module):
    """One worker's tensors, as an ``nn.Module`` so that the Averager can flatten it."""

    def __init__(self, params: Sequence[nn.Parameter], buffers: Sequence[Tensor]) -> None:
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for i, b in enumerate(buffers):
            self.register_buffer(f"b{i}", b.detach().clone())


class _OptimizerView:
    """One worker's optimizer state, shaped like an optimizer (``param_groups``, ``state``)
    over that worker's replica parameters, for the Averager's optimizer-state policies."""

    def __init__(
        self, param_groups: list[dict[str, Any]], state: dict[Tensor, dict[str, Any]], source: Optimizer
    ) -> None:
        self.param_groups = param_groups
        self.state = state
        self.source = source
        """The optimizer every worker runs (its type and hyperparameters make a fresh state)."""


class WorkerReplicas:
    """``num_workers`` workers for ``module`` and ``optimizers``, swapped into them one at a time.

    Args:
        module: the model every worker trains (its tensors are re-pointed by :meth:`activate`).
        optimizers: the optimizers over ``module``'s parameters.
        num_workers: workers held in this process.
        rng_seeds: per worker, a seed for its own torch RNG stream; ``None`` gives every
            worker the current RNG state (as K processes seeded alike would have).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[Optimizer],
        num_workers: int,
        *,
        rng_seeds: Sequence[int] | None = None,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"workers_per_device ({num_workers!r}) must be an integer >= 1")
        self.module = module
        self.optimizers = list(optimizers)
        self.params = list(module.parameters())
        self.buffers = list(module.buffers())
        self.replicas = [_Replica(self.params, self.buffers) for _ in range(num_workers)]
        index: dict[Tensor, int] = {p: i for i, p in enumerate(self.params)}
        # per worker, per optimizer: the state dict of each parameter (shared with the view)
        self._states: list[list[dict[Tensor, dict[str, Any]]]] = []
        self.optimizer_views: list[list[_OptimizerView]] = []
        for replica in self.replicas:
            rparams = list(replica.parameters())
            states, views = [], []
            for opt in self.optimizers:
                state: dict[Tensor, dict[str, Any]] = {
                    p: {} for group in opt.param_groups for p in group["params"]
                }
                groups = [{"params": [rparams[index[p]] for p in g["params"]]} for g in opt.param_groups]
                view_state: dict[Tensor, dict[str, Any]] = {rparams[index[p]]: s for p, s in state.items()}
                states.append(state)
                views.append(_OptimizerView(groups, view_state, opt))
            self._states.append(states)
            self.optimizer_views.append(views)
        device = self.params[0].device if self.params else torch.device("cpu")
        self._cuda = device if device.type == "cuda" else None
        self._rng: list[tuple[Tensor, Tensor | None]] = []
        for w in range(num_workers):
            if rng_seeds is not None:
                with torch.random.fork_rng(devices=[self._cuda] if self._cuda else []):
                    torch.manual_seed(rng_seeds[w])
                    self._rng.append(self._get_rng())
            else:
                self._rng.append(self._get_rng())
        self.active: int | None = None

    @property
    def num_workers(self) -> int:
        return len(self.replicas)

    def _get_rng(self) -> tuple[Tensor, Tensor | None]:
        cuda = torch.cuda.get_rng_state(self._cuda) if self._cuda is not None else None
        return torch.get_rng_state(), cuda

    def _set_rng(self, state: tuple[Tensor, Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if self._cuda is not None and state[1] is not None:
            torch.cuda.set_rng_state(state[1], self._cuda)

    def check_unchanged(self) -> None:
        """A parameter or buffer added to the model after setup has no copy in the simulated
        workers: a clear error rather than training it outside Local SGD."""
        params, buffers = list(self.module.parameters()), list(self.module.buffers())
        if len(params) != len(self.params) or len(buffers) != len(self.buffers):
            raise ValueError(
                f"the model has {len(params)} parameters and {len(buffers)} buffers, {len(self.params)} and "
                f"{len(self.buffers)} when fit started: simulated workers (workers_per_device > 1) cannot "
                "take in tensors added later. HINT: create every parameter before fit (lazy modules: run "
                "one forward pass in LightningModule.setup())"
            )

    def point_at(self, worker: int) -> None:
        """Make ``module``'s tensors and the optimizers' state those of ``worker`` (no RNG change)."""
        replica = self.replicas[worker]
        for p, q in zip(self.params, replica.parameters()):
            p.data = q.data
            p.grad = None
        for b, rb in zip(self.buffers, replica.buffers()):
            b.data = rb.data
        for opt, state in zip(self.optimizers, self._states[worker]):
            for tensor, s in state.items():
                opt.state[tensor] = s

    def activate(self, worker: int) -> None:
        """Switch to ``worker``: its tensors, optimizer state and RNG stream."""
        if self.active is not None:
            self._rng[self.active] = self._get_rng()
        self.point_at(worker)
        self._set_rng(self._rng[worker])
        self.active = worker

    def deactivate(self) -> None:
        """Keep the active worker's RNG stream; the module stays pointed at it."""
        if self.active is not None:
            self._rng[self.active] = self._get_rng()
        self.active = None

    def state_dict(self) -> dict[str, Any]:
        """Every worker's tensors, optimizer state and RNG state (for an exact resume)."""
        return {
            "replicas": [{k: v.clone() for k, v in r.state_dict().items()} for r in self.replicas],
            "optimizers": [
                [
                    [
                        {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
                        for s in st.values()
                    ]
                    for st in states
                ]
                for states in self._states
            ],
            "rng": [(cpu.clone(), None if cuda is None else cuda.clone()) for cpu, cuda in self._rng],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["replicas"]) != self.num_workers:
            raise ValueError(
                f"the checkpoint holds {len(state['replicas'])} simulated workers per device, this run "
                f"{self.num_workers}"
            )
        for replica, saved in zip(self.replicas, state["replicas"]):
            with torch.no_grad():
                for t, v in zip(replica.state_dict().values(), saved.values()):
                    t.copy_(v)
        for states, saved_states in zip(self._states, state["optimizers"]):
            for st, saved in zip(states, saved_states):
                for s, saved_s in zip(st.values(), saved):
                    s.clear()
                    s.update(saved_s)
        self._rng = [(cpu, cuda) for cpu, cuda in state["rng"]]
