"""The Lightning side of simulated workers: the sequential path's logging, the batched path
(one ``vmap``-ed forward/backward and optimizer step over stacked workers), each simulated
worker's data shard, and the checks of what a simulated run supports. The workers themselves
are :class:`localsgd.core.replicas.WorkerReplicas`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from localsgd.core.gradients import gradients_of
from localsgd.core.replicas import WorkerReplicas
from localsgd.lightning.batched import BatchedWorkers


class WorkerLogs:
    """What ``training_step`` logs on the sequential path, recorded for each simulated worker and
    logged once, after the last, as the mean over this process's workers (as the batched path
    does). Without it each worker's value would overwrite the previous one's: the step's row
    would show the last worker's loss. Values that are not numbers or tensors (a torchmetrics
    ``Metric``, which accumulates every worker's update itself) are logged as given."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self._values: dict[str, list[Any]] = {}
        self._options: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            self._values.setdefault(name, []).append(value)
            self._options[name] = (args, kwargs)

        def log_dict(values: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            for name, value in values.items():
                log(name, value, *args, **kwargs)

        self.module.log, self.module.log_dict = log, log_dict
        try:
            yield
        finally:
            del self.module.log, self.module.log_dict

    def flush(self) -> None:
        """Log the mean of every recorded name over the workers that logged it."""
        values, self._values = self._values, {}
        for name, logged in values.items():
            args, kwargs = self._options[name]
            if all(isinstance(v, (Tensor, int, float)) for v in logged):
                value: Any = torch.stack([torch.as_tensor(v).detach().float() for v in logged]).mean()
            else:
                value = logged[-1]
            self.module.log(name, value, *args, **kwargs)


class _SetEpoch:
    """What Lightning calls ``set_epoch`` on: forwards to every worker's sampler."""

    def __init__(self, samplers: Sequence[Any]) -> None:
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)


class WorkerLoader:
    """Zips one dataloader per simulated worker: each item is the list of their batches.

    Args:
        loaders: worker ``i``'s dataloader at index ``i``, each with the shard that rank
            ``first_worker + i`` would get in a run of as many processes as workers.
    """

    def __init__(self, loaders: Sequence[Any]) -> None:
        self.loaders = list(loaders)
        self.sampler = _SetEpoch([loader.sampler for loader in self.loaders])

    def __len__(self) -> int:
        return min(len(loader) for loader in self.loaders)

    def __iter__(self) -> Iterator[list[Any]]:
        return (list(batches) for batches in zip(*self.loaders))


# Optimizers whose update is elementwise: stepping one over stacked tensors of shape
# (workers, *shape) is exactly stepping one per worker.
def check_simulation(trainer: Any, module: Any, workers_per_device: int) -> None:
    """What the simulator cannot simulate fails here, before training."""
    rule = f"workers_per_device ({workers_per_device}) > 1"
    if not module.automatic_optimization:
        raise ValueError(f"{rule} needs automatic optimization: each simulated worker takes the step itself")
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"{rule} does not support accumulate_grad_batches ({trainer.accumulate_grad_batches}); "
            "HINT: raise the local batch instead"
        )
    if not trainer._accelerator_connector.use_distributed_sampler:
        raise ValueError(
            f"{rule} needs Trainer(use_distributed_sampler=True): it deals each simulated worker the "
            "DistributedSampler shard that its rank would get in a run of that many processes"
        )


def check_batched(trainer: Any, optimizers: Sequence[Optimizer]) -> None:
    if len(optimizers) != 1:
        raise ValueError(f"simulation='batched' needs exactly one optimizer, got {len(optimizers)}")
    if trainer.gradient_clip_val:
        raise ValueError(
            f"simulation='batched' does not clip gradients (gradient_clip_val={trainer.gradient_clip_val}): "
            "Lightning would clip the stacked workers' gradients together. HINT: simulation='sequential'"
        )


def deal_shards(dataloader: Any, *, num_processes: int, rank: int, workers_per_process: int) -> WorkerLoader:
    """One loader per simulated worker of process ``rank``, each over the DistributedSampler shard
    that rank ``rank * workers_per_process + i`` of a ``num_processes * workers_per_process``-process
    run would get (same seed, shuffle and drop_last as Lightning's sampler)."""
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = getattr(dataloader, "sampler", None)
    if not isinstance(dataloader, DataLoader) or not isinstance(sampler, DistributedSampler):
        raise ValueError(
            f"workers_per_device ({workers_per_process}) > 1 needs a training DataLoader that Lightning "
            f"shards with a DistributedSampler; got {type(dataloader).__name__} with sampler "
            f"{type(sampler).__name__}"
        )
    k = workers_per_process
    shards: list[DistributedSampler[Any]] = [
        DistributedSampler(
            sampler.dataset,
            num_replicas=num_processes * k,
            rank=rank * k + i,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
            drop_last=sampler.drop_last,
        )
        for i in range(k)
    ]
    return WorkerLoader([_update_dataloader(dataloader, shard) for shard in shards])


class Simulation:
    """The ``workers_per_device`` > 1 simulated workers of one process under the Trainer: their
    models and optimizers, and each step's forward/backward and optimizer step on the sequential
    or the batched path. :class:`~localsgd.LocalSGDStrategy` holds one and calls it from its
    Lightning hooks.

    Args:
        trainer: the Trainer (checked: what simulated workers support).
        module: the LightningModule (every simulated worker's architecture).
        optimizers: its optimizers (unwrapped).
        workers_per_device: k.
        precision_plugin: the strategy's (loss scaling is refused; autocast wraps the batched step).
    """

    def __init__(
        self,
        trainer: Any,
        module: Any,
        optimizers: list[Optimizer],
        workers_per_device: int,
        precision_plugin: Any,
    ) -> None:
        k = workers_per_device
        check_simulation(trainer, module, k)
        if getattr(precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"precision={trainer.precision!r} with workers_per_device ({k}) > 1 is not supported: "
                "its loss scaling would need one GradScaler per simulated worker, as K processes have. "
                "HINT: precision='bf16-mixed' (no loss scaling), or one worker per process"
            )
        self.module, self.precision_plugin = module, precision_plugin
        self.replicas = WorkerReplicas(module, optimizers, k)
        """The simulated workers' tensors and optimizer states."""
        self.batched: BatchedWorkers | None = None
        """The batched path, when it is the one in use."""
        self.batched_step = False
        """Whether the batched path is inside its step (the closure runs the batched forward/backward)."""
        self._logs = WorkerLogs(module)

    @property
    def models(self) -> list[nn.Module]:
        return list(self.replicas.replicas)

    @property
    def optimizers(self) -> list[list[Any]]:
        return [list(v) for v in self.replicas.optimizer_views]

    def choose_path(
        self, trainer: Any, optimizers: list[Optimizer], driver: Any, path: str, device: torch.device
    ) -> None:
        """Point the module at worker 0 and set up the batched path if it is the one in use."""
        self.replicas.point_at(0)
        if path == "auto":
            path = "batched" if device.type == "cuda" else "sequential"
        if path != "batched":
            return
        check_batched(trainer, optimizers)
        if driver.options.nonfinite == "skip_worker" and type(optimizers[0]) is not torch.optim.SGD:
            raise ValueError(
                f"nonfinite='skip_worker' with simulation='batched' cannot restart one worker's "
                f"{type(optimizers[0]).__name__} state alone: the stacked optimizer keeps one step "
                "count for all workers. HINT: simulation='sequential', or nonfinite='raise'"
            )
        averager = driver.averager
        self.batched = BatchedWorkers(self.module, optimizers[0], self.replicas, averager.stacked_views())
        averager.on_reset(self.batched.reset_state)

    def backward(self, closure_loss: torch.Tensor) -> Any:
        """The batched path computed every worker's gradients already; the hooks still run."""
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.module)
        return self.precision_plugin.post_backward(closure_loss, self.module)

    @property
    def in_step(self) -> bool:
        """Whether a training_step now runs for a simulated worker (or the batched path)."""
        return self.batched_step or self.replicas.active is not None

    def training_step(self, step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.batched is not None and self.batched_step:
            batch, batch_idx = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs.get("batch_idx", 0))
            with self.precision_plugin.train_step_context():  # autocast under bf16-mixed, as K processes
                return self.batched.forward_backward(batch, batch_idx)
        batch = args[0] if args else kwargs.pop("batch")
        args = (batch[self.replicas.active], *args[1:])
        with self._logs.recording():
            output = step(*args, **kwargs)
        if self.replicas.active == self.replicas.num_workers - 1:
            self._logs.flush()  # the step's metrics: the mean over the simulated workers
        return output

    def fingerprint(self, driver: Any, batch: Any) -> None:
        """Pitfall 10: each worker's first batch of the fit, compared across workers at the first sync."""
        if self.batched is not None and self.batched_step:
            for i, worker_batch in enumerate(batch):
                driver.note_batch(worker_batch, i)
        elif self.replicas.active is None:
            driver.note_batch(batch[0], 0)
        else:
            driver.note_batch(batch[self.replicas.active], self.replicas.active)

    def step(self, step: Callable[[], Any], through_gradients: bool, driver: Any) -> Any:
        """Every simulated worker's step; ``step`` runs the user's optimizer step (closure included)."""
        if self.batched is not None:
            # the closure runs the batched forward/backward; the module's own parameters have
            # no gradients, so the user's optimizer step is a no-op, and the stacked one steps
            self.batched_step = True
            try:
                output = step()
            finally:
                self.batched_step = False
            if through_gradients:
                stacked = gradients_of(list(self.batched.trainable.values()))
                driver.gradients.all_reduce(
                    [[g[w] for g in stacked] for w in range(self.replicas.num_workers)]
                )
            self.batched.step()
            return output
        # every simulated worker runs the closure (its training_step, backward) and the step
        for worker in range(self.replicas.num_workers):
            self.replicas.activate(worker)
            output = step()
        self.replicas.deactivate()
        return output

    def gradient_step(
        self, closure: Callable[[], Any], step: Callable[[Callable[[], Any]], Any], driver: Any
    ) -> Any:
        """Simulated workers, one after another, in a round of one step through the gradients:
        every worker's forward and backward, the all-reduce, then every worker's step."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        outputs, grads = [], []
        for worker in range(self.replicas.num_workers):
            self.replicas.activate(worker)
            outputs.append(closure())
            grads.append(gradients_of(params))  # kept: the next activation clears .grad
        driver.gradients.all_reduce(grads)
        for worker, (out, worker_grads) in enumerate(zip(outputs, grads)):
            self.replicas.activate(worker)
            for p, g in zip(params, worker_grads):
                p.grad = g
            output = step(functools.partial(_identity, out))
        self.replicas.deactivate()
        return output


def _identity(value: Any) -> Any:
    """A closure for an optimizer step whose loss was computed already."""
    return value
