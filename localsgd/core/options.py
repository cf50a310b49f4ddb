"""The choices a Local SGD run makes, and the one check that every front end applies to them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

from localsgd.core.delayed import check_delay
from localsgd.core.outer import OuterOptimizer, SlowMo
from localsgd.core.schedules import Constant, SyncSchedule, as_schedule
from localsgd.core.wire import Wire

_Choice = TypeVar("_Choice", bound=str)
BufferPolicy = Literal["average", "local"]
NonfinitePolicy = Literal["raise", "skip_worker"]
OptimizerStatePolicy = Literal["local", "average", "reset"]


def check_choice(name: str, value: object, allowed: tuple[_Choice, ...]) -> _Choice:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} ({value!r}) must be one of {choices}")
    return value


H1Sync = Literal["auto", "gradients", "parameters"]
SyncEvery = int | SyncSchedule | Callable[[int, float], bool]


@dataclass(kw_only=True)
class Options:
    """The algorithm's settings, checked once, as every front end takes them (see :class:`LocalSGD`)."""

    schedule: SyncSchedule
    buffers: BufferPolicy = "average"
    optimizer_state: OptimizerStatePolicy = "local"
    outer_optimizer: OuterOptimizer | None = None
    nonfinite: NonfinitePolicy = "raise"
    log_divergence: bool = False
    h1_sync: H1Sync = "auto"
    wire: Wire = "fp32"
    error_feedback: bool = False
    sync_delay: int = 0
    num_fragments: int = 1

    @classmethod
    def checked(
        cls,
        *,
        sync_every: SyncEvery = 8,
        buffers: str = "average",
        optimizer_state: str = "local",
        outer_optimizer: object = None,
        nonfinite: str = "raise",
        log_divergence: object = False,
        h1_sync: str = "auto",
        wire: str = "fp32",
        error_feedback: object = False,
        sync_delay: object = 0,
        num_fragments: object = 1,
    ) -> Options:
        """The options, or a ValueError naming the first bad one and its rule."""
        if not isinstance(log_divergence, bool):
            raise ValueError(f"log_divergence ({log_divergence!r}) must be True or False")
        nonfinite_ = check_choice("nonfinite", nonfinite, get_args(NonfinitePolicy))
        h1 = check_choice("h1_sync", h1_sync, get_args(H1Sync))
        schedule = as_schedule(sync_every, "sync_every")
        if outer_optimizer is not None and not isinstance(outer_optimizer, OuterOptimizer):
            raise ValueError(
                f"outer_optimizer ({outer_optimizer!r}) must be None (plain averaging) or a "
                "localsgd.outer.OuterOptimizer such as SlowMo or DiLoCo"
            )
        wire_ = check_choice("wire", wire, get_args(Wire))
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback ({error_feedback!r}) must be True or False")
        if error_feedback and wire_ == "fp32":
            raise ValueError(
                "error_feedback=True needs a lossy wire: wire='bf16' or 'int8' (fp32 loses nothing)"
            )
        period = schedule.period if isinstance(schedule, Constant) else None
        fragments = check_fragments(num_fragments, schedule)
        if fragments == 1:
            delay = check_delay(sync_delay, period)
        else:  # fragments > 1 means a Constant schedule
            assert period is not None
            delay = check_delay(sync_delay, period // fragments, "H / num_fragments")
        for knob, on, why in (
            (f"sync_delay ({delay}) > 0", delay > 0, "an overlapped round keeps each worker's own progress"),
            (
                f"num_fragments ({fragments}) > 1",
                fragments > 1,
                "a fragment's round averages only its tensors",
            ),
        ):
            for name, value, allowed in (
                ("optimizer_state", optimizer_state, "local"),
                ("nonfinite", nonfinite_, "raise"),
            ):
                if on and value != allowed:
                    raise ValueError(
                        f"{knob} with {name}={value!r} is not supported: {why}. HINT: {name}={allowed!r}"
                    )
        if wire_ != "fp32" and outer_optimizer is None:
            # deltas from the global model need the global model: plain averaging as an outer step
            outer_optimizer = SlowMo(lr=1.0, momentum=0.0)
        return cls(
            schedule=schedule,
            buffers=check_choice("buffers", buffers, get_args(BufferPolicy)),
            optimizer_state=check_choice("optimizer_state", optimizer_state, get_args(OptimizerStatePolicy)),
            outer_optimizer=outer_optimizer,
            nonfinite=nonfinite_,
            log_divergence=log_divergence,
            h1_sync=h1,
            wire=wire_,
            error_feedback=error_feedback,
            sync_delay=delay,
            num_fragments=fragments,
        )


def check_fragments(num_fragments: object, schedule: SyncSchedule) -> int:
    """``num_fragments`` as an int >= 1; above 1 only with a constant H that it divides."""
    if isinstance(num_fragments, bool) or not isinstance(num_fragments, int) or num_fragments < 1:
        raise ValueError(f"num_fragments ({num_fragments!r}) must be an integer >= 1")
    if num_fragments == 1:
        return 1
    if not isinstance(schedule, Constant):
        raise ValueError(
            f"num_fragments ({num_fragments}) > 1 needs a constant H (sync_every=<int> or Constant), "
            f"not {schedule!r}: fragment f syncs every H steps, offset by f*H/F"
        )
    if schedule.period % num_fragments:
        raise ValueError(
            f"num_fragments ({num_fragments}) must divide H ({schedule.period}): fragment f syncs every "
            "H steps, offset by f*H/F steps"
        )
    return num_fragments
