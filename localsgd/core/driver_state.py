"""What a checkpoint holds of the driver: the global sync state (equal on every rank) and each
rank's own part (its workers' models and optimizer states, error-feedback residuals, a round in
flight), so that a resumed run continues as if never stopped, mid-round included."""

from __future__ import annotations

from typing import Any

from localsgd.core.comm import Communicator
from localsgd.core.delayed import DelayedRound
from localsgd.core.options import Options


class DriverState:
    """The checkpoint part of :class:`~localsgd.core.driver.LocalSGD`."""

    # the driver's, used here
    options: Options
    num_steps: int
    dirty: bool
    comm: Communicator
    node_comm: Communicator | None
    schedule: Any
    averager: Any
    models: list[Any]
    optimizers: list[list[Any]]
    in_flight: DelayedRound | None
    _worker_steps: list[int]

    def _node_comm(self) -> Communicator: ...

    def sync_state_dict(self) -> dict[str, Any]:
        """The global sync state, equal on every rank: step count, schedule, counters, outer optimizer."""
        return sync_state(self.options, self.num_steps, self.comm, self.node_comm)

    def load_sync_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.schedule.load_state_dict(state["schedule"])
        self.comm.load_state_dict(state["comm"])
        if state.get("node_comm"):
            self._node_comm().load_state_dict(state["node_comm"])
        outer = self.options.outer_optimizer
        if outer is not None and state.get("outer"):
            outer.load_state_dict(state["outer"])
        self.dirty = False  # the averaged model; a rank's own state (if any) says otherwise

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume this rank exactly: the sync state and its workers' own models and
        optimizer states (not the average), mid-round included."""
        with self.averager.own_models():
            workers = [
                {
                    "model": {k: v.clone() for k, v in m.state_dict().items()},
                    "optimizers": [o.state_dict() for o in opts],
                }
                for m, opts in zip(self.models, self.optimizers)
            ]
        # a round in flight first: waiting for it may advance the error-feedback residuals
        in_flight = self.in_flight.state_dict() if self.in_flight is not None else None
        wire = self.averager.wire
        return {
            "sync": self.sync_state_dict(),
            "workers": workers,
            "dirty": self.dirty,
            "wire": wire.state_dict() if wire is not None else {},
            "in_flight": in_flight,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["workers"]) != len(self.models):
            raise ValueError(
                f"the state holds {len(state['workers'])} workers, this driver {len(self.models)}: "
                "resume with as many models per process"
            )
        self.load_sync_state_dict(state["sync"])
        for m, opts, saved in zip(self.models, self.optimizers, state["workers"]):
            m.load_state_dict(saved["model"])  # copies into the flat buckets
            for o, o_state in zip(opts, saved["optimizers"]):
                o.load_state_dict(o_state)
        self.dirty = bool(state["dirty"])
        if state.get("wire") and self.averager.wire is not None:
            self.averager.wire.load_state_dict(state["wire"])  # error-feedback residuals
        in_flight = state.get("in_flight")
        self.in_flight = DelayedRound.from_state_dict(in_flight) if in_flight else None
        self._worker_steps = [self.num_steps] * len(self.models)


def sync_state(
    options: Options, num_steps: int, comm: Communicator | None, node_comm: Communicator | None
) -> dict[str, Any]:
    """The layout of :meth:`LocalSGD.sync_state_dict` (also before a driver exists)."""
    outer = options.outer_optimizer
    return {
        "num_steps": num_steps,
        "schedule": options.schedule.state_dict(),
        "comm": comm.state_dict() if comm is not None else {},
        "node_comm": node_comm.state_dict() if node_comm is not None else {},
        "outer": outer.state_dict() if outer is not None else {},
        "schedule_type": type(options.schedule).__name__,
    }
