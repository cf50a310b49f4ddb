"""Sync schedules: when the workers average.

A schedule is asked once after every optimizer step, ``should_sync(step, lr)``, with
``step`` the number of optimizer steps taken so far (1 after the first) and ``lr``
the learning rate that step used. A truthy answer ends a round: ``True`` averages all
workers; a hierarchical schedule answers ``"inner"`` (average inside each node) or
``"outer"`` (average across all workers). Schedules are pure Python state machines
(no Lightning, no torch.distributed), so every rank, fed the same rank-consistent
step count and learning rate, takes the same decision (DESIGN pitfall 2). They change
H only at a sync boundary (pitfall 8) and checkpoint through ``state_dict`` /
``load_state_dict``.

=================  =========================================  =====================================
schedule           H                                          source
=================  =========================================  =====================================
``Constant``       ``every``                                  Local SGD (Stich, ICLR 2019)
``PostLocal``      1 (optimizer state averaged) until         Lin et al., ICLR 2020,
                   ``switch_step``, then ``every``            arXiv 1808.07217
``QSR``            ``max(base, floor((alpha / lr) ** power))``  Gu et al., ICLR 2024,
                   from the lr at the start of each round     arXiv 2310.14423
``Hierarchical``   ``inner`` within a node, ``outer`` across   Lin et al., ICLR 2020
=================  =========================================  =====================================
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal

Decision = bool | Literal["inner", "outer"]

log = logging.getLogger(__name__)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer >= 1 (bools excluded), else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
    return value


def _check_optional_steps(name: str, value: object, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} ({value!r}) must be None or an integer >= {minimum}")
    return value


def _check_positive_number(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} ({value!r}) must be a finite number > 0")
    return float(value)


class SyncSchedule(ABC):
    """Decides after each optimizer step whether the workers average now.

    Subclasses implement ``should_sync`` and ``period``; those with state override
    ``state_dict`` / ``load_state_dict``. ``configure`` receives what the trainer knows
    about the run before the first step (a schedule may ignore it).
    """

    @property
    @abstractmethod
    def period(self) -> int:
        """The current number of optimizer steps per round (H)."""

    @abstractmethod
    def should_sync(self, step: int, lr: float) -> Decision:
        """Called once after every optimizer step; truthy ends a round."""

    def configure(self, *, total_steps: int | None, steps_per_epoch: int | None) -> None:
        """What the trainer knows before the first step: the planned number of optimizer steps
        (``None`` if unbounded) and the optimizer steps per epoch (``None`` if unknown)."""
        del total_steps, steps_per_epoch

    def optimizer_state_policy(self, step: int) -> str | None:
        """An optimizer-state policy that overrides the strategy's for the sync after ``step``
        (``None``: the strategy's own)."""
        del step
        return None

    def synchronous_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` (called before it) is a round of its own, H = 1, as
        synchronous SGD: the strategy may then all-reduce the gradients before the step instead
        of averaging the parameters after it (the same for SGD, not for Adam and the like)."""
        del step
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class Constant(SyncSchedule):
    """Average every ``every`` optimizer steps (H = ``every``; H = 1 is synchronous SGD).

    Args:
        every: H, optimizer steps per round.
    """

    def __init__(self, every: int) -> None:
        self.every = check_positive_int("every", every)

    @property
    def period(self) -> int:
        return self.every

    def should_sync(self, step: int, lr: float) -> bool:
        return step % self.every == 0

    def synchronous_at(self, step: int) -> bool:
        return self.every == 1

    # H is configuration, not state, and a resumed run may choose another one; it is saved only to
    # say so, since the only other sign of it is a different number of syncs from here on
    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("every")  # absent in checkpoints written before it was saved
        if saved is not None and saved != self.every:
            log.warning(
                f"resumed with sync_every={self.every}; the checkpoint was written with {saved}: "
                f"rounds from here have {self.every} steps"
            )

    def __repr__(self) -> str:
        return f"Constant(every={self.every})"


class PostLocal(SyncSchedule):
    """Post-local SGD: synchronous SGD (H = 1, optimizer state averaged) up to ``switch_step``,
    then Local SGD with H = ``every``, counted from the switch.

    Args:
        every: H after the switch.
        switch_step: optimizer steps of synchronous SGD before the switch. Give this or
            ``switch_epoch``.
        switch_epoch: the switch as a number of epochs; turned into steps when the trainer
            knows the steps per epoch.
    """

    def __init__(
        self, every: int, *, switch_step: int | None = None, switch_epoch: int | None = None
    ) -> None:
        self.every = check_positive_int("every", every)
        _check_optional_steps("switch_step", switch_step)
        _check_optional_steps("switch_epoch", switch_epoch)
        if (switch_step is None) == (switch_epoch is None):
            raise ValueError(
                f"PostLocal takes exactly one of switch_step ({switch_step!r}) "
                f"and switch_epoch ({switch_epoch!r})"
            )
        self.switch_step = switch_step
        self.switch_epoch = switch_epoch
        self._last_step = 0

    def configure(self, *, total_steps: int | None, steps_per_epoch: int | None) -> None:
        if self.switch_epoch is not None:
            if steps_per_epoch is None:
                raise ValueError(
                    f"PostLocal(switch_epoch={self.switch_epoch}) needs the number of steps per epoch, which "
                    "this run does not know (an iterable dataset?). HINT: give switch_step instead"
                )
            self.switch_step = self.switch_epoch * steps_per_epoch

    def _switch(self) -> int:
        if self.switch_step is None:
            raise RuntimeError(
                "PostLocal(switch_epoch=...) is used before configure() turned epochs into steps"
            )
        return self.switch_step

    @property
    def period(self) -> int:
        return self.every if self._last_step >= self._switch() else 1

    def should_sync(self, step: int, lr: float) -> bool:
        self._last_step = step
        switch = self._switch()
        if step <= switch:
            return True
        return (step - switch) % self.every == 0

    def optimizer_state_policy(self, step: int) -> str | None:
        return "average" if step <= self._switch() else None

    def synchronous_at(self, step: int) -> bool:
        return step <= self._switch()

    def state_dict(self) -> dict[str, Any]:
        return {"switch_step": self.switch_step, "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switch_step = state["switch_step"]
        self._last_step = state["last_step"]

    def __repr__(self) -> str:
        when = (
            f"switch_step={self.switch_step}"
            if self.switch_epoch is None
            else f"switch_epoch={self.switch_epoch}"
        )
        return f"PostLocal(every={self.every}, {when})"


class QSR(SyncSchedule):
    """The Quadratic Synchronization Rule: each round lasts
    ``H = max(base, floor((alpha / lr) ** power))`` steps, with ``lr`` the learning rate of
    the round's first step, so H grows as the learning rate decays.

    Args:
        base: H_base, the smallest period (and the period during warmup).
        alpha: the rule's growth coefficient (> 0).
        power: the exponent (2 in the paper).
        warmup_steps: the first rounds that start before this step use H = base.
        total_steps: if known, the last round is cut to end exactly at this step. The
            strategy fills it in from the trainer when left ``None``.
    """

    def __init__(
        self,
        base: int,
        alpha: float,
        *,
        power: float = 2.0,
        warmup_steps: int = 0,
        total_steps: int | None = None,
    ) -> None:
        self.base = check_positive_int("base", base)
        self.alpha = _check_positive_number("alpha", alpha)
        self.power = _check_positive_number("power", power)
        self.warmup_steps = _check_optional_steps("warmup_steps", warmup_steps) or 0
        self.total_steps = _check_optional_steps("total_steps", total_steps, minimum=1)
        self._round_start = 0  # step count when the current round began
        self._period = self.base  # H of the current round (of the last one until the next is sized)
        self._sized = False  # whether the current round's H is decided (at its first step)

    def configure(self, *, total_steps: int | None, steps_per_epoch: int | None) -> None:
        if self.total_steps is None:
            self.total_steps = total_steps

    def period_for(self, lr: float, round_start: int) -> int:
        """H for a round that starts after ``round_start`` steps at learning rate ``lr``."""
        if not lr > 0:
            raise ValueError(
                f"QSR needs a learning rate > 0 to size a round, got lr={lr!r} at step {round_start + 1}"
            )
        if round_start < self.warmup_steps:
            h = self.base
        else:
            h = max(self.base, math.floor((self.alpha / lr) ** self.power))
        if self.total_steps is not None and round_start < self.total_steps:
            h = min(h, self.total_steps - round_start)
        return h

    @property
    def period(self) -> int:
        return self._period

    def should_sync(self, step: int, lr: float) -> bool:
        if not self._sized:
            self._period, self._sized = self.period_for(lr, self._round_start), True
        if step - self._round_start < self._period:
            return False
        self._round_start, self._sized = step, False
        return True

    def state_dict(self) -> dict[str, Any]:
        # total_steps is configuration, not state: a resumed run may plan a different total
        return {"round_start": self._round_start, "period": self._period, "sized": self._sized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._round_start = state["round_start"]
        self._period = state["period"]
        self._sized = state["sized"]

    def __repr__(self) -> str:
        return (
            f"QSR(base={self.base}, alpha={self.alpha}, power={self.power}, "
            f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps})"
        )


class Hierarchical(SyncSchedule):
    """Average inside each node every ``inner`` steps and across all workers every ``outer``
    steps (an outer sync replaces the inner one that falls on the same step).

    Args:
        inner: steps between averagings inside a node.
        outer: steps between averagings across all workers; a multiple of ``inner``.
    """

    def __init__(self, inner: int, outer: int) -> None:
        self.inner = check_positive_int("inner", inner)
        self.outer = check_positive_int("outer", outer)
        if outer % inner != 0:
            raise ValueError(f"inner ({inner}) must divide outer ({outer})")

    @property
    def period(self) -> int:
        return self.inner

    def should_sync(self, step: int, lr: float) -> Decision:
        if step % self.outer == 0:
            return "outer"
        if step % self.inner == 0:
            return "inner"
        return False

    def __repr__(self) -> str:
        return f"Hierarchical(inner={self.inner}, outer={self.outer})"


class FunctionSchedule(SyncSchedule):
    """A plain callable ``fn(step, lr) -> bool`` as a schedule. It must be a pure function of
    its arguments (it is not checkpointed); ``period`` reports the length of the last round.

    Args:
        fn: the decision function.
    """

    def __init__(self, fn: Callable[[int, float], Decision]) -> None:
        if not callable(fn):
            raise ValueError(f"fn ({fn!r}) must be callable as fn(step, lr)")
        self.fn = fn
        self._last_sync = 0
        self._last_period = 1

    @property
    def period(self) -> int:
        return self._last_period

    def should_sync(self, step: int, lr: float) -> Decision:
        decision = self.fn(step, lr)
        if decision not in (True, False, "inner", "outer"):
            raise ValueError(
                f"the sync schedule function returned {decision!r} at step {step}; it must return "
                "True, False, 'inner' or 'outer'"
            )
        if decision:
            self._last_period, self._last_sync = step - self._last_sync, step
        return decision

    def state_dict(self) -> dict[str, Any]:
        return {"last_sync": self._last_sync, "last_period": self._last_period}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_sync = state["last_sync"]
        self._last_period = state["last_period"]


def as_schedule(value: object, name: str = "sync_every") -> SyncSchedule:
    """An int means ``Constant``; a ``SyncSchedule`` is used as is; a callable is wrapped."""
    if isinstance(value, SyncSchedule):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return Constant(value)
    if callable(value) and not isinstance(value, type):
        return FunctionSchedule(value)
    raise ValueError(
        f"{name} ({value!r}) must be an integer >= 1 (the number of optimizer steps between averagings), "
        "a localsgd.core.schedules.SyncSchedule, or a function (step, lr) -> bool"
    )
