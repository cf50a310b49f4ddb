"""Sync schedules: when the workers average.

A schedule is asked once after every optimizer step, ``should_sync(step, lr)``, with
``step`` the number of optimizer steps taken so far (1 after the first) and ``lr``
the learning rate that step used. A truthy answer ends a round. Schedules are pure
Python state machines (no Lightning, no torch.distributed), so every rank, fed the
same rank-consistent step count, takes the same decision (DESIGN pitfall 2), and
they checkpoint through ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer >= 1 (bools excluded), else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
    return value


class SyncSchedule(ABC):
    """Decides after each optimizer step whether the workers average now."""

    @property
    @abstractmethod
    def period(self) -> int:
        """The current number of optimizer steps per round (H)."""

    @abstractmethod
    def should_sync(self, step: int, lr: float) -> bool | str:
        """Called once after every optimizer step; truthy ends a round."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class Constant(SyncSchedule):
    """Average every ``every`` optimizer steps (H = ``every``; H = 1 is synchronous SGD)."""

    def __init__(self, every: int) -> None:
        self.every = check_positive_int("every", every)

    @property
    def period(self) -> int:
        return self.every

    def should_sync(self, step: int, lr: float) -> bool:
        return step % self.every == 0

    def __repr__(self) -> str:
        return f"Constant(every={self.every})"
