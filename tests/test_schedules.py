"""Sync schedules: the exact sync steps each produces, state round trips, bad input."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import pytest
import torch

from localsgd.core.schedules import (
    QSR,
    Constant,
    FunctionSchedule,
    Hierarchical,
    PostLocal,
    SyncSchedule,
    as_schedule,
)

STEPS = 1000


def cosine_lr(step: int, lr_max: float = 0.1, lr_min: float = 0.001, total: int = STEPS) -> float:
    """The lr used in optimizer step ``step`` (1-based), cosine from lr_max to lr_min."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * (step - 1) / (total - 1)))


def decisions(schedule: SyncSchedule, steps: int = STEPS, lr: Callable[[int], float] = cosine_lr) -> list:
    return [schedule.should_sync(t, lr(t)) for t in range(1, steps + 1)]


def sync_steps(schedule: SyncSchedule, steps: int = STEPS) -> list[int]:
    return [t for t, d in enumerate(decisions(schedule, steps), start=1) if d]


def test_constant() -> None:
    assert sync_steps(Constant(1), 5) == [1, 2, 3, 4, 5]
    assert sync_steps(Constant(4), 18) == [4, 8, 12, 16]


def test_post_local_is_constant_1_before_the_switch_then_every_h_from_it() -> None:
    schedule = PostLocal(5, switch_step=12)
    steps = sync_steps(schedule, 40)
    assert steps[:12] == sync_steps(Constant(1), 12)
    assert steps[12:] == [17, 22, 27, 32, 37]
    # synchronous SGD before the switch means averaged optimizer state
    assert [schedule.optimizer_state_policy(t) for t in (1, 12, 13)] == ["average", "average", None]
    assert schedule.period == 5


def test_post_local_switch_in_epochs() -> None:
    schedule = PostLocal(3, switch_epoch=2)
    schedule.configure(total_steps=None, steps_per_epoch=5)
    assert schedule.switch_step == 10
    assert sync_steps(schedule, 16) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 16]
    unknown = PostLocal(3, switch_epoch=2)
    with pytest.raises(ValueError, match=r"needs the number of steps per epoch.*HINT: give switch_step"):
        unknown.configure(total_steps=None, steps_per_epoch=None)


def qsr_reference(base: int, alpha: float, power: float, total: int | None, warmup: int = 0) -> list[int]:
    """The rule written as a loop over rounds: each round's H from the lr of its first step."""
    syncs, start = [], 0
    while start < STEPS:
        lr = cosine_lr(start + 1)
        h = base if start < warmup else max(base, math.floor((alpha / lr) ** power))
        if total is not None:
            h = min(h, total - start)
        start += h
        if start <= STEPS:
            syncs.append(start)
    return syncs


@pytest.mark.parametrize(("total", "warmup"), [(None, 0), (STEPS, 0), (STEPS, 200)])
def test_qsr_matches_the_rule_over_cosine_decay(total: int | None, warmup: int) -> None:
    schedule = QSR(2, 0.01, warmup_steps=warmup, total_steps=total)
    got = sync_steps(schedule)
    assert got == qsr_reference(2, 0.01, 2.0, total, warmup)
    periods = [b - a for a, b in zip([0, *got], got)]
    assert periods[0] == 2 and max(periods) >= 20  # H grows from base as lr decays
    if total is not None:
        assert got[-1] == STEPS  # the last round is cut to end with the run
    if warmup:
        assert all(p == 2 for s, p in zip([0, *got], periods) if s < warmup)


def test_qsr_changes_h_only_at_sync_boundaries() -> None:
    schedule = QSR(2, 0.01, total_steps=STEPS)
    round_periods: list[int] = []
    for t in range(1, STEPS + 1):
        synced = schedule.should_sync(t, cosine_lr(t))
        round_periods.append(schedule.period)
        if synced:
            assert len(set(round_periods)) == 1, f"H changed inside the round ending at step {t}"
            assert round_periods[0] == len(round_periods)
            round_periods = []


def test_qsr_configure_fills_the_total_only_when_missing() -> None:
    schedule = QSR(2, 0.01)
    schedule.configure(total_steps=STEPS, steps_per_epoch=None)
    assert schedule.total_steps == STEPS
    fixed = QSR(2, 0.01, total_steps=500)
    fixed.configure(total_steps=STEPS, steps_per_epoch=None)
    assert fixed.total_steps == 500


def test_hierarchical() -> None:
    got = decisions(Hierarchical(2, 6), 12)
    assert got == [False, "inner", False, "inner", False, "outer"] * 2


def test_function_schedule() -> None:
    schedule = as_schedule(lambda step, lr: step in (3, 7))
    assert isinstance(schedule, FunctionSchedule)
    assert sync_steps(schedule, 10) == [3, 7]
    assert schedule.period == 4
    with pytest.raises(ValueError, match=r"returned 'yes' at step 1; it must return True, False"):
        as_schedule(lambda step, lr: "yes").should_sync(1, 0.1)


SCHEDULES: list[Callable[[], SyncSchedule]] = [
    lambda: Constant(7),
    lambda: PostLocal(6, switch_step=40),
    lambda: PostLocal(6, switch_epoch=4),
    lambda: QSR(2, 0.01, total_steps=STEPS, warmup_steps=50),
    lambda: QSR(3, 0.02, power=1.5),
    lambda: Hierarchical(3, 12),
    lambda: FunctionSchedule(lambda step, lr: step % 9 == 0 or lr < 0.002),
]


@pytest.mark.parametrize("make", SCHEDULES)
def test_state_round_trip_at_any_step(make: Callable[[], SyncSchedule]) -> None:
    def fresh() -> SyncSchedule:
        s = make()
        s.configure(total_steps=STEPS, steps_per_epoch=10)
        return s

    reference = decisions(fresh())
    for stop in (1, 2, 13, 37, 38, 100, 555, 999):
        first = fresh()
        head = [first.should_sync(t, cosine_lr(t)) for t in range(1, stop + 1)]
        buffer = io.BytesIO()
        torch.save(copy.deepcopy(first.state_dict()), buffer)  # state is checkpointable
        buffer.seek(0)
        second = fresh()
        second.load_state_dict(torch.load(buffer, weights_only=True))
        tail = [second.should_sync(t, cosine_lr(t)) for t in range(stop + 1, STEPS + 1)]
        assert head + tail == reference, f"stopped at step {stop}"


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Constant(0), r"every \(0\) must be an integer >= 1"),
        (lambda: PostLocal(0, switch_step=3), r"every \(0\) must be an integer >= 1"),
        (lambda: PostLocal(2, switch_step=-1), r"switch_step \(-1\) must be None or an integer >= 0"),
        (lambda: PostLocal(2), r"exactly one of switch_step \(None\) and switch_epoch \(None\)"),
        (lambda: PostLocal(2, switch_step=3, switch_epoch=1), r"exactly one of switch_step"),
        (lambda: QSR(0, 0.01), r"base \(0\) must be an integer >= 1"),
        (lambda: QSR(2, 0.0), r"alpha \(0.0\) must be a finite number > 0"),
        (lambda: QSR(2, -1), r"alpha \(-1\) must be a finite number > 0"),
        (lambda: QSR(2, 0.1, power=0), r"power \(0\) must be a finite number > 0"),
        (lambda: QSR(2, 0.1, warmup_steps=-5), r"warmup_steps \(-5\) must be None or an integer >= 0"),
        (lambda: QSR(2, 0.1, total_steps=0), r"total_steps \(0\) must be None or an integer >= 1"),
        (lambda: QSR(2, 0.01).should_sync(1, 0.0), r"QSR needs a learning rate > 0.*lr=0.0 at step 1"),
        (lambda: QSR(2, 0.01).should_sync(1, -0.1), r"QSR needs a learning rate > 0"),
        (lambda: Hierarchical(3, 8), r"inner \(3\) must divide outer \(8\)"),
        (lambda: Hierarchical(0, 8), r"inner \(0\) must be an integer >= 1"),
        (lambda: as_schedule("x"), r"sync_every \('x'\) must be an integer >= 1"),
        (lambda: as_schedule(2.5), r"sync_every \(2.5\) must be an integer >= 1"),
        (lambda: as_schedule(0), r"sync_every \(0\) must be an integer >= 1"),
    ],
)
def test_bad_input(build: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()
