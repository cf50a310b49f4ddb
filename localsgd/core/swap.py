"""The evaluation swap: the global model held in place for an evaluation or a checkpoint, each
worker's own model back afterwards (and on demand inside, for a checkpoint's rank files)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


class EvaluationSwap:
    """The part of :class:`~localsgd.core.averager.Averager` that swaps the average in and out."""

    # the averager's, used here
    _buckets: list[list[Any]]
    _backup: list[list[Tensor]]
    _holding_average: bool

    def _ensure_intact(self) -> None: ...

    def average(self, tag: str = "sync", **kwargs: Any) -> float | None: ...

    def _save_backup(self) -> list[list[Tensor]]:
        """Copy every local worker's flat tensors into persistent buffers (allocated once)."""
        if not self._backup:
            self._backup = [[torch.empty_like(b.flat) for b in w] for w in self._buckets]
        for w, backup in zip(self._buckets, self._backup):
            for b, copy in zip(w, backup):
                copy.copy_(b.flat)
        return self._backup

    @contextlib.contextmanager
    def averaged(self, tag: str = "eval") -> Iterator[None]:
        """Temporarily hold the global model a sync at this step would produce: the average, and
        with an outer optimizer its step from that average (its state is not advanced). Each
        worker's own model comes back on exit."""
        self._ensure_intact()
        self._save_backup()
        try:
            self.average(tag, optimizer_state="local", outer="preview")
            self._holding_average = True
            yield
        finally:
            self._holding_average = False
            self._copy_backup_in()

    @contextlib.contextmanager
    def holding(self, flats: list[Tensor]) -> Iterator[None]:
        """Temporarily hold ``flats`` (one tensor per bucket: a global model kept elsewhere, such as
        the last committed round's) in every worker; each worker's own model back on exit."""
        self._ensure_intact()
        self._save_backup()
        try:
            for w in self._buckets:
                for b, flat in zip(w, flats):
                    b.flat.copy_(flat)
            self._holding_average = True
            yield
        finally:
            self._holding_average = False
            self._copy_backup_in()

    def _copy_backup_in(self) -> None:
        for w, backup in zip(self._buckets, self._backup):
            for b, copy in zip(w, backup):
                b.flat.copy_(copy)

    @contextlib.contextmanager
    def own_models(self) -> Iterator[None]:
        """Each worker's own model, also inside :meth:`averaged` (a checkpoint saved during
        validation must store the workers' models, not the average evaluated at that moment);
        the average comes back on exit. Outside :meth:`averaged` the models are their own already."""
        if not self._holding_average:
            yield
            return
        average = [[b.flat.clone() for b in w] for w in self._buckets]
        self._copy_backup_in()
        try:
            yield
        finally:
            for w, saved in zip(self._buckets, average):
                for b, copy in zip(w, saved):
                    b.flat.copy_(copy)
