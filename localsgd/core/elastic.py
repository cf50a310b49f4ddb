"""Rounds over an elastic communicator: workers that are lost and come back (:mod:`localsgd.ft`).

Every sync is one round of the communicator's membership protocol:

1. :meth:`~localsgd.core.comm.Communicator.begin_round` forms the round's workers. A worker that
   rejoined (or fell behind after a failed round) receives from a live peer the state a checkpoint
   holds: the global model of the last committed round, the step count, the schedule, the
   ``comm/*`` counters and the outer optimizer. It takes them, with a fresh optimizer state, and
   takes part in the round *absent*: it contributes nothing and receives the others' average, so
   it continues at the same round as they do.
2. The round's collectives: the control message (step check, NaN/Inf, absent workers, stop flags),
   then the mean over the workers that contribute.
3. :meth:`~localsgd.core.comm.Communicator.commit_round`: if a collective failed (a peer was lost
   mid-round), every worker puts its own model back and the round is skipped; the step count goes
   on, and a worker that did not commit heals at the next round.
4. Committed: the outer optimizer's step, and the new global model, kept for healing, for
   evaluation and for the checkpoint file.

Between rounds no collective crosses workers: evaluation and checkpoints see the global model
of the last committed round (an average of the workers' models now would need a round).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

from localsgd.core import control
from localsgd.core.averager import Averager
from localsgd.core.comm import RoundFailed
from localsgd.core.optim_state import fresh_optimizer_state
from localsgd.core.rounds import ExactRound, Round, run_round

log = logging.getLogger(__name__)


class ElasticRound(ExactRound):
    """Exact rounds over an elastic communicator (see the module docstring).

    Args:
        averager: the local workers' models (their communicator is the elastic one).
        sync_state: the driver's sync state (served to a peer that heals, copied).
        take_sync_state: makes the driver take a peer's sync state; returns its step count.
    """

    def __init__(
        self,
        averager: Averager,
        *,
        sync_state: Callable[[], dict[str, Any]],
        take_sync_state: Callable[[dict[str, Any]], int],
    ) -> None:
        super().__init__(averager)
        self._sync_state, self._take_sync_state = sync_state, take_sync_state
        self.global_model: list[Tensor] = []
        """Worker 0's flat tensors after the last committed round (parameters and averaged buffers)."""
        self._own: list[list[Tensor]] = []
        """Each worker's flat tensors before the current round, put back if it is not committed."""
        self.skipped = 0
        """Rounds skipped because a collective failed."""
        self.healed_at: int | None = None
        """The optimizer step at which this worker last healed from a peer."""
        self._formed: Round | None = None
        self.comm.serve_state(self.healing_state)

    # ------------------------------------------------------------------ rounds
    def join(self, num_steps: int) -> None:
        """On creation: a fresh start takes a peer's initial model (all at step 0); a worker that
        (re)joins a run in progress heals and takes part, absent, in the round the others are in."""
        self._keep_global()
        while True:
            r = Round(tag="sync", step=num_steps, nonfinite="raise", optimizer_state="local")
            self._form(r)
            self._formed = r
            if r.step == 0:  # nobody has trained yet: no round to take part in
                if self.comm.commit_round(self._meet(r)):
                    return
            elif run_round(self, r):
                return

    def _meet(self, r: Round) -> bool:
        """The control message alone: the step check, and a wait for the workers that heal (a peer
        serves its state until it commits)."""
        try:
            control.agree(self.comm, self.averager.worker_flats(), r.step, absent=r.absent)
        except RoundFailed as err:
            log.warning("LocalSGD: the first meeting of the workers failed: %s", err)
            return False
        return True

    def _form(self, r: Round) -> None:
        """The round's membership; a worker that rejoined or fell behind heals first, absent."""
        state = self.comm.begin_round()
        if state is not None:
            r.step, r.absent = self._heal(state), True

    def agree(self, r: Round) -> None:
        if (r.optimizer_state or self.averager.optimizer_state) == "average":
            raise ValueError(
                f"the schedule asks optimizer_state='average' at step {r.step}: not supported with fault "
                "tolerance (a healed worker starts from a fresh optimizer state)"
            )
        if self._formed is not r:  # join() forms its rounds itself
            self._form(r)
        self._formed = None
        self._snapshot()
        try:
            super().agree(r)
        except RoundFailed as err:
            r.failed = True
            log.warning("LocalSGD: the %s round at optimizer step %s failed: %s", r.tag, r.step, err)

    def reduce(self, r: Round) -> None:
        if r.failed:
            return
        try:
            super().reduce(r)
        except RoundFailed as err:
            r.failed = True
            log.warning("LocalSGD: the %s round at optimizer step %s failed: %s", r.tag, r.step, err)

    def commit(self, r: Round) -> bool:
        if self.comm.commit_round(not r.failed):
            return True
        for w, saved in enumerate(self._own):  # the round is skipped: every worker keeps its own model
            for flat, mine in zip(self.averager.flat_tensors(w), saved):
                flat.copy_(mine)
        self.skipped += 1
        log.warning("LocalSGD: the round at optimizer step %s not committed: skipped", r.step)
        return False

    def outer_step(self, r: Round) -> None:
        super().outer_step(r)
        self._keep_global()

    # ------------------------------------------------------------------ healing
    def healing_state(self) -> dict[str, Any]:
        """What a peer that heals receives from this worker: the checkpoint's sync state and the
        global model of the last committed round (copies: the round goes on while it travels)."""
        return {"sync": copy.deepcopy(self._sync_state()), "global": [t.clone() for t in self.global_model]}

    def _heal(self, state: dict[str, Any]) -> int:
        step = self._take_sync_state(state["sync"])  # step count, schedule, counters, outer optimizer
        averager = self.averager
        for w in range(len(averager.optimizers)):
            for flat, value in zip(averager.flat_tensors(w), state["global"]):
                flat.copy_(value)
            fresh_optimizer_state(averager.optimizers[w])
        self.global_model = [t.clone() for t in state["global"]]
        self.healed_at = step
        log.info("LocalSGD: healed from a peer at optimizer step %d", step)
        return step

    def _snapshot(self) -> None:
        """Every worker's own model before the round, into buffers kept from round to round."""
        averager = self.averager
        flats = [averager.flat_tensors(w) for w in range(len(averager.optimizers))]
        if [len(f) for f in flats] != [len(o) for o in self._own]:
            self._own = [[t.clone() for t in f] for f in flats]
            return
        for saved, current in zip(self._own, flats):
            for kept, flat in zip(saved, current):
                kept.copy_(flat)

    def _keep_global(self) -> None:
        flats = self.averager.flat_tensors(0)
        if len(self.global_model) != len(flats):
            self.global_model = [t.clone() for t in flats]
            return
        for kept, flat in zip(self.global_model, flats):
            kept.copy_(flat)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The global model of the last committed round in every worker; their own back on exit."""
        with self.averager.holding(self.global_model):
            yield
