"""The optimizer hooks a plain PyTorch loop reaches the driver through: every ``optimizer.step()``
of every local worker counts, and once all of them have stepped the driver's step ends (and may
sync).

The hooks hold the driver weakly: a driver that is dropped without :meth:`OptimizerHooks.close`
(or leaving its ``with`` block) takes its hooks off the user's optimizers when it is collected,
so an optimizer never keeps stepping a driver nobody holds.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

from torch.optim import Optimizer


class OptimizerHooks:
    """Pre- and post-step hooks on every local worker's optimizers, calling ``driver.before_step``
    once before the first worker steps and ``driver.after_step`` once all of them have."""

    def __init__(self, driver: Any, optimizers: list[list[Any]]) -> None:
        self.worker_steps = [0] * len(optimizers)
        """Steps each local worker's optimizer took (the driver's step ends when all have)."""
        self._driver = weakref.ref(driver)
        self._handles: list[Any] = []
        for worker, opts in enumerate(optimizers):
            for opt in opts:
                if not isinstance(opt, Optimizer):
                    raise ValueError(f"optimizer ({opt!r}) must be a torch.optim.Optimizer")
                self._handles.append(opt.register_step_pre_hook(self._pre_step_hook(worker)))
                self._handles.append(opt.register_step_post_hook(self._post_step_hook(worker)))
        # a driver never closed: its hooks leave the optimizers when it is collected
        self._finalizer = weakref.finalize(driver, _remove, self._handles)

    def align(self, num_steps: int) -> None:
        """Every worker is at ``num_steps`` (a resume, or a heal from a peer)."""
        self.worker_steps = [num_steps] * len(self.worker_steps)

    def _pre_step_hook(self, worker: int) -> Callable[..., None]:
        def pre_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            driver = self._driver()
            if driver is not None and worker == 0 and self.worker_steps[0] == driver.num_steps:
                driver.before_step()

        return pre_step

    def _post_step_hook(self, worker: int) -> Callable[..., None]:
        def post_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            driver = self._driver()
            if driver is None:
                return
            self.worker_steps[worker] += 1
            if min(self.worker_steps) > driver.num_steps:
                driver.after_step(float(optimizer.param_groups[0]["lr"]))

        return post_step

    def close(self) -> None:
        """Remove the hooks from the optimizers."""
        self._finalizer()


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


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
