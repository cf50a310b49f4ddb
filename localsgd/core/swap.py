"""Holding a global model in every worker for a while (evaluation, a checkpoint file), and each
worker's own model back afterwards, without allocating on every call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

Session = Callable[[], contextlib.AbstractContextManager[None]]
"""The averager's :meth:`~localsgd.core.averager.Averager.session`: the buckets hold the models
while it is open (copied buckets take the models in, and write them back on closing)."""


class EvaluationSwap:
    """Swaps what the local workers' flat buckets hold: :meth:`hold` puts a global model in
    (computed by a callable) and each worker's own model back on exit; :meth:`own_models` shows
    the workers' own models inside a hold. The buckets are re-given after every rebuild."""

    def __init__(self) -> None:
        self._buckets: list[list[Any]] = []
        self._backup: list[list[Tensor]] = []
        self._holding = False

    def rebind(self, buckets: list[list[Any]]) -> None:
        """The averager's buckets (per local worker), after a (re)build."""
        self._buckets, self._backup = buckets, []

    def save_backup(self) -> list[list[Tensor]]:
        """Copy every local worker's flat tensors into persistent buffers (allocated once)."""
        if not self._backup:
            self._backup = [[torch.empty_like(b.flat) for b in w] for w in self._buckets]
        for w, backup in zip(self._buckets, self._backup):
            for b, copy in zip(w, backup):
                copy.copy_(b.flat)
        return self._backup

    def fill(self, flats: list[Tensor]) -> None:
        """Every worker holds ``flats`` (one tensor per bucket)."""
        for w in self._buckets:
            for b, flat in zip(w, flats):
                b.flat.copy_(flat)

    @contextlib.contextmanager
    def hold(self, put_in: Callable[[str], None], tag: str, session: Session) -> Iterator[None]:
        """``put_in(tag)`` makes the workers hold a global model; their own back on exit."""
        with session():
            self.save_backup()
            try:
                put_in(tag)
            except BaseException:
                self._copy_backup_in()
                raise
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            with session():
                self._copy_backup_in()

    def _copy_backup_in(self) -> None:
        for w, backup in zip(self._buckets, self._backup):
            for b, copy in zip(w, backup):
                b.flat.copy_(copy)

    @contextlib.contextmanager
    def own_models(self, session: Session) -> Iterator[None]:
        """Each worker's own model, also inside :meth:`hold`; what was held comes back on exit.
        Outside a hold the models are their own already."""
        if not self._holding:
            yield
            return
        with session():
            held = [[b.flat.clone() for b in w] for w in self._buckets]
            self._copy_backup_in()
        try:
            yield
        finally:
            with session():
                for w, saved in zip(self._buckets, held):
                    for b, copy in zip(w, saved):
                        b.flat.copy_(copy)
