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
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from localsgd.core.comm import RoundFailed
from localsgd.core.optim_state import fresh_optimizer_state
from localsgd.core.options import Options
from localsgd.core.schedules import Hierarchical, PostLocal

if TYPE_CHECKING:
    from localsgd.core.driver import LocalSGD

log = logging.getLogger(__name__)


def check_elastic(options: Options, workers_per_process: int = 1) -> None:
    """A ValueError naming the first option that fault-tolerant rounds do not support."""
    rules = (
        ("sync_delay", options.sync_delay, 0, "a round must start and land in one membership"),
        ("num_fragments", options.num_fragments, 1, "a healed worker takes the whole global model at once"),
        ("wire", options.wire, "fp32", "a healed worker has no delta of its own to send"),
        ("nonfinite", options.nonfinite, "raise", "a lost worker's slot is taken by membership instead"),
        ("workers_per_device", workers_per_process, 1, "a worker is a replica group of processes"),
    )
    for name, value, allowed, why in rules:
        if value != allowed:
            raise ValueError(
                f"fault tolerance with {name}={value!r} is not supported: {why}. HINT: {name}={allowed!r}"
            )
    if options.optimizer_state == "average":
        raise ValueError(
            "fault tolerance with optimizer_state='average' is not supported: a healed worker starts "
            "from a fresh optimizer state, which has nothing to average. HINT: optimizer_state='local'"
        )
    if options.h1_sync == "gradients":
        raise ValueError(
            "fault tolerance with h1_sync='gradients' is not supported: every step would be a round. "
            "HINT: h1_sync='parameters'"
        )
    if isinstance(options.schedule, PostLocal):
        raise ValueError(
            "fault tolerance with a PostLocal schedule is not supported: its synchronous phase averages "
            "the optimizer state, which a healed worker starts without. HINT: sync_every=<int> or QSR"
        )
    if isinstance(options.schedule, Hierarchical):
        raise ValueError(
            "fault tolerance with a Hierarchical schedule is not supported: inside a replica group the "
            "gradients are all-reduced every step already. HINT: sync_every=<int>, PostLocal or QSR"
        )


class ElasticRounds:
    """The syncs of ``driver`` as rounds of its elastic communicator (see the module docstring)."""

    def __init__(self, driver: LocalSGD) -> None:
        check_elastic(driver.options, len(driver.models))
        self.driver = driver
        self.comm = driver.comm
        self.global_model: list[Tensor] = []
        """Worker 0's flat tensors after the last committed round (parameters and averaged buffers)."""
        self._own: list[list[Tensor]] = []
        """Each worker's flat tensors before the current round, put back if it is not committed."""
        self.skipped = 0
        """Rounds skipped because a collective failed."""
        self.healed_at: int | None = None
        """The optimizer step at which this worker last healed from a peer."""
        self.comm.serve_state(self.healing_state)

    # ------------------------------------------------------------------ rounds
    def join(self) -> None:
        """On creation: a fresh start takes a peer's initial model (all at step 0); a worker that
        (re)joins a run in progress heals and takes part, absent, in the round the others are in."""
        self._keep_global()
        while True:
            state = self.comm.begin_round()
            if state is not None:
                self._heal(state)
            if self.driver.num_steps == 0:  # nobody has trained yet: no round to take part in
                if self.comm.commit_round(self._meet(absent=state is not None)):
                    return
            elif self.round("sync", absent=state is not None)[0]:
                return

    def _meet(self, absent: bool) -> bool:
        """The control message alone: the step check, and a wait for the workers that heal (a peer
        serves its state until it commits)."""
        try:
            self.driver.averager.agree(self.driver.num_steps, absent=absent)
        except RoundFailed as err:
            log.warning("LocalSGD: the first meeting of the workers failed: %s", err)
            return False
        return True

    def sync(self, tag: str = "sync", **options: Any) -> tuple[bool, float | None]:
        """One round at a sync; returns (committed, the divergence if measured)."""
        state = self.comm.begin_round()
        if state is not None:
            self._heal(state)
        return self.round(tag, absent=state is not None, **options)

    def round(
        self,
        tag: str,
        *,
        absent: bool = False,
        divergence: bool = False,
        digests: Sequence[float] | None = None,
        flags: Sequence[float] = (),
    ) -> tuple[bool, float | None]:
        driver, averager = self.driver, self.driver.averager
        policy = driver._schedule_policy() or driver.options.optimizer_state
        if policy == "average":
            raise ValueError(
                f"the schedule asks optimizer_state='average' at step {driver.num_steps}: "
                "not supported with fault tolerance (see localsgd.core.elastic)"
            )
        own = self._snapshot()
        ok, result = True, None
        try:
            result = averager.average(
                tag,
                optimizer_state="local",
                outer=False,
                divergence=divergence,
                step=driver.num_steps,
                nonfinite="raise",
                digests=digests,
                flags=flags,
                absent=absent,
            )
        except RoundFailed as err:
            ok = False
            log.warning("LocalSGD: the %s round at optimizer step %d failed: %s", tag, driver.num_steps, err)
        if not self.comm.commit_round(ok):
            for w, saved in enumerate(own):  # the round is skipped: every worker keeps its own model
                for flat, mine in zip(averager.flat_tensors(w), saved):
                    flat.copy_(mine)
            self.skipped += 1
            log.warning("LocalSGD: the round at optimizer step %d not committed: skipped", driver.num_steps)
            return False, None
        averager.conclude(outer=True, optimizer_state=policy)
        self._keep_global()
        return True, result

    # ------------------------------------------------------------------ healing
    def healing_state(self) -> dict[str, Any]:
        """What a peer that heals receives from this worker: the checkpoint's sync state and the
        global model of the last committed round (copies: the round goes on while it travels)."""
        return {
            "sync": copy.deepcopy(self.driver.sync_state_dict()),
            "global": [t.clone() for t in self.global_model],
        }

    def _heal(self, state: dict[str, Any]) -> None:
        driver = self.driver
        driver.load_sync_state_dict(state["sync"])  # step count, schedule, counters, outer optimizer
        for w in range(len(driver.models)):
            for flat, value in zip(driver.averager.flat_tensors(w), state["global"]):
                flat.copy_(value)
            fresh_optimizer_state(driver.optimizers[w])
        self.global_model = [t.clone() for t in state["global"]]
        driver._worker_steps = [driver.num_steps] * len(driver.models)
        self.healed_at = driver.num_steps
        log.info("LocalSGD: healed from a peer at optimizer step %d", driver.num_steps)

    def _snapshot(self) -> list[list[Tensor]]:
        """Every worker's own model before the round, into buffers kept from round to round."""
        averager = self.driver.averager
        flats = [averager.flat_tensors(w) for w in range(len(self.driver.models))]
        if [len(f) for f in flats] != [len(o) for o in self._own]:
            self._own = [[t.clone() for t in f] for f in flats]
            return self._own
        for saved, current in zip(self._own, flats):
            for kept, flat in zip(saved, current):
                kept.copy_(flat)
        return self._own

    def _keep_global(self) -> None:
        flats = self.driver.averager.flat_tensors(0)
        if len(self.global_model) != len(flats):
            self.global_model = [t.clone() for t in flats]
            return
        for kept, flat in zip(self.global_model, flats):
            kept.copy_(flat)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The global model of the last committed round in every worker; their own back on exit."""
        with self.driver.averager.holding(self.global_model):
            yield
