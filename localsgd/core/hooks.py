"""The optimizer hooks a plain PyTorch loop reaches the driver through: every ``optimizer.step()``
of every local worker counts, and once all of them have stepped the driver's step ends (and may
sync); the driver is also a context manager that ends with the final average."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.optim import Optimizer


class OptimizerHooks:
    """The hook part of :class:`~localsgd.core.driver.LocalSGD`."""

    # the driver's, used here
    optimizers: list[list[Any]]
    num_steps: int
    _handles: list[Any]
    _worker_steps: list[int]

    def before_step(self) -> None: ...

    def after_step(self, lr: float | None = None) -> str | bool: ...

    def finish(self) -> None: ...

    def _register_hooks(self) -> None:
        for worker, opts in enumerate(self.optimizers):
            for opt in opts:
                if not isinstance(opt, Optimizer):
                    raise ValueError(f"optimizer ({opt!r}) must be a torch.optim.Optimizer")
                self._handles.append(opt.register_step_pre_hook(self._pre_step_hook(worker)))
                self._handles.append(opt.register_step_post_hook(self._post_step_hook(worker)))

    def _pre_step_hook(self, worker: int) -> Callable[..., None]:
        def pre_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            if worker == 0 and self._worker_steps[0] == self.num_steps:
                self.before_step()

        return pre_step

    def _post_step_hook(self, worker: int) -> Callable[..., None]:
        def post_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            self._worker_steps[worker] += 1
            if min(self._worker_steps) > self.num_steps:
                self.after_step(float(optimizer.param_groups[0]["lr"]))

        return post_step

    def close(self) -> None:
        """Remove the hooks (the models keep their current, possibly unaveraged, parameters)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.finish()
        finally:
            self.close()


def per_worker(optimizer: Any, num_models: int) -> list[list[Any]]:
    """Each worker's optimizers, from one optimizer, a list for one model, or one entry per model."""
    if isinstance(optimizer, Optimizer):
        entries: list[Any] = [optimizer]
    elif isinstance(optimizer, Sequence) and not isinstance(optimizer, str):
        entries = list(optimizer)
    else:
        raise ValueError(f"optimizer ({optimizer!r}) must be a torch.optim.Optimizer or a list of them")
    if num_models == 1 and all(isinstance(e, Optimizer) for e in entries):
        return [entries]
    if len(entries) != num_models:
        raise ValueError(f"optimizer ({len(entries)} entries) must hold one entry per model ({num_models})")
    return [list(e) if isinstance(e, Sequence) else [e] for e in entries]
