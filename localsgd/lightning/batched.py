"""The batched path of simulated workers: one ``vmap``-ed forward/backward and one optimizer step
over the stacked tensors of all of a process's workers (for GPUs, where per-worker batches are
too small to fill the device), with exactly the math of the sequential path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from localsgd.core.optim_state import fresh_optimizer_state
from localsgd.core.replicas import WorkerReplicas

ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


class _TrainingStep(nn.Module):
    """The LightningModule's ``training_step`` as a ``forward``, for ``torch.func.functional_call``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self.module.training_step(batch, batch_idx)  # type: ignore[operator]


def _stack(batches: Sequence[Any]) -> Any:
    """The workers' batches as one batch with a leading worker dimension."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.stack(list(batches))
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _stack([b[key] for b in batches]) for key in first}
    raise ValueError(f"the batched simulation path cannot stack batches of type {type(first).__name__}")


class BatchedWorkers:
    """The batched path: every local worker's forward and backward in one ``vmap`` call, and
    one optimizer step over stacked tensors.

    The workers' parameters and buffers are seen as stacked views ``(workers, *shape)`` of
    the averager's storage (one row per worker), so no copy is made. ``training_step``
    runs under ``torch.func.vmap(torch.func.grad(...))`` through ``functional_call``; what
    it logs is recorded per worker and logged as the mean over this process's workers.
    Random ops draw different numbers per worker (``randomness="different"``), not the
    streams K processes would draw. The optimizer must be elementwise
    (:data:`ELEMENTWISE_OPTIMIZERS`): one step over stacked tensors is then exactly one
    step per worker.

    Args:
        module: the LightningModule.
        optimizer: its single optimizer.
        replicas: the simulated workers.
        stacked: :meth:`localsgd.core.averager.Averager.stacked_views` over ``replicas``.
    """

    def __init__(
        self, module: nn.Module, optimizer: Optimizer, replicas: WorkerReplicas, stacked: dict[int, Tensor]
    ) -> None:
        if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
            names = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
            raise ValueError(
                f"the batched simulation path steps all workers with one optimizer over stacked tensors, "
                f"which is exact only for elementwise optimizers ({names}); got {type(optimizer).__name__}. "
                "HINT: simulation='sequential'"
            )
        self.module, self.optimizer, self.replicas = module, optimizer, replicas
        self.adapter = _TrainingStep(module)
        k = replicas.num_workers
        self.tensors: dict[str, Tensor] = {}
        self.trainable: dict[str, nn.Parameter] = {}
        stacked_of: dict[int, Tensor] = {}  # id(module tensor) -> stacked tensor
        named = list(module.named_parameters()) + list(module.named_buffers())
        per_worker = [list(r.parameters()) + list(r.buffers()) for r in replicas.replicas]
        for i, (name, t) in enumerate(named):
            view = stacked.get(id(per_worker[0][i]))
            if view is None:  # not averaged (a buffer under buffers="local", an integer tensor)
                view = torch.stack([w[i].detach() for w in per_worker])
                for w, worker_tensors in enumerate(per_worker):
                    worker_tensors[i].data = view[w]
            if isinstance(t, nn.Parameter) and t.requires_grad:
                param = nn.Parameter(view)  # a leaf over the same storage
                self.trainable["module." + name] = param
                stacked_of[id(t)] = param
            else:
                self.tensors["module." + name] = view
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [stacked_of[id(p)] for p in g["params"]],
            }
            for g in optimizer.param_groups
        ]
        replicas.point_at(0)  # the module sees worker 0, also where tensors were just stacked
        self.stacked_optimizer = type(optimizer)(groups)  # type: ignore[call-arg]
        self._index = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
        self._num_workers = k
        self.loss: Tensor | None = None

    def forward_backward(self, batches: Sequence[Any], batch_idx: int) -> Tensor:
        """Every worker's training_step and gradients; returns the mean loss (detached)."""
        from torch.func import functional_call, grad, vmap

        logged: dict[str, tuple[Tensor, dict[str, Any]]] = {}
        module = self.module

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            logged[name] = (torch.as_tensor(value), kwargs)

        def log_dict(values: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            for name, value in values.items():
                log(name, value, **kwargs)

        def loss_fn(trainable: dict[str, Tensor], tensors: dict[str, Tensor], batch: Any) -> Any:
            logged.clear()
            out = functional_call(self.adapter, {**trainable, **tensors}, (batch, batch_idx))
            loss = out["loss"] if isinstance(out, dict) else out
            return loss, (loss.detach(), {name: value for name, (value, _) in logged.items()})

        # in-place updates (BatchNorm statistics) under vmap reach only contiguous inputs
        work = {name: t.contiguous() for name, t in self.tensors.items()}
        module.log, module.log_dict = log, log_dict  # type: ignore[assignment]
        try:
            grads, (losses, aux) = vmap(grad(loss_fn, has_aux=True), randomness="different")(
                dict(self.trainable), work, _stack(batches)
            )
        finally:
            del module.log, module.log_dict
        for name, t in self.tensors.items():
            if work[name] is not t:
                t.copy_(work[name])
        options = {name: kwargs for name, (_, kwargs) in logged.items()}
        for name, param in self.trainable.items():
            param.grad = grads[name]
        for name, values in aux.items():  # what training_step logged: the mean over the workers
            module.log(name, values.float().mean(), **options[name])  # type: ignore[operator]
        return losses.mean()

    def step(self) -> None:
        """Step every worker: the stacked optimizer, with the user optimizer's current hyperparameters."""
        for mine, theirs in zip(self.stacked_optimizer.param_groups, self.optimizer.param_groups):
            mine.update({k: v for k, v in theirs.items() if k != "params"})
        self.stacked_optimizer.step()
        self.stacked_optimizer.zero_grad(set_to_none=True)
        self._share_state()

    def reset_state(self) -> None:
        """Every worker's optimizer state as a freshly created optimizer's (step counts included)."""
        fresh_optimizer_state([self.stacked_optimizer])
        self._share_state()

    def _share_state(self) -> None:
        """Point each worker's optimizer-state dict at its row of the stacked state (views)."""
        stacked_params = [p for g in self.stacked_optimizer.param_groups for p in g["params"]]
        module_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for sp, p in zip(stacked_params, module_params):
            state = self.stacked_optimizer.state.get(sp, {})
            for w in range(self._num_workers):
                worker_state = self.replicas._states[w][0][p]
                for key, value in state.items():
                    batched = (
                        isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == self._num_workers
                    )
                    worker_state[key] = value[w] if batched else value


# ---------------------------------------------------------------------- Lightning glue
