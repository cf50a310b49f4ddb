"""The layout of the global sync state a checkpoint holds (equal on every rank), also before a
driver exists: step count, schedule, ``comm/*`` counters, outer optimizer."""

from __future__ import annotations

from typing import Any

from localsgd.core.comm import Communicator
from localsgd.core.options import Options


def sync_state(
    options: Options, num_steps: int, comm: Communicator | None, node_comm: Communicator | None
) -> dict[str, Any]:
    """The layout of :meth:`LocalSGD.sync_state_dict <localsgd.core.driver.LocalSGD.sync_state_dict>`."""
    outer = options.outer_optimizer
    return {
        "num_steps": num_steps,
        "schedule": options.schedule.state_dict(),
        "comm": comm.state_dict() if comm is not None else {},
        "node_comm": node_comm.state_dict() if node_comm is not None else {},
        "outer": outer.state_dict() if outer is not None else {},
        "schedule_type": type(options.schedule).__name__,
    }
