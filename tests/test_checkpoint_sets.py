"""A checkpoint is whole or absent: a writer killed at any point of a save leaves the previous
checkpoint loadable, and the new one complete or not there at all (issue: chaos, part 2).

Two gloo processes train with ``LocalSGDStrategy`` and ``ModelCheckpoint`` (``last.ckpt`` and
the newest ``epoch=0-step=N.ckpt``) saving at steps 2 and 4. During the save at step 4 one rank
SIGKILLs itself at a seeded point of its writes: before any chunk of a file's bytes (the rest of
the file is never written), an fsync, a rename or a deletion. The points are counted in a run
with no kill, so the draws cover every stage: the rank files, the main files, the removal of
the step-2 checkpoint and of the sets before.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import signal
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from common import ToyModule, make_trainer
from distributed import _entry, free_port

from localsgd import LocalSGDStrategy
from localsgd.core import files

pytestmark = pytest.mark.distributed

POINTS = 24  # seeded kill points (the issue asks for at least 20)


class _Writes:
    """Counts this process's writes once armed, and SIGKILLs it at write number ``kill_at``."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at, self.armed, self.count = kill_at, False, 0

    def point(self) -> None:
        if not self.armed:
            return
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.count += 1

    def install(self) -> None:
        save = torch.save

        def chunked_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            quarter = -(-len(data) // 4)
            if isinstance(f, (str, os.PathLike)):  # a file on disk: killed mid-file, it stays cut short
                with open(f, "wb") as out:
                    for i in range(0, len(data), quarter):
                        self.point()
                        out.write(data[i : i + quarter])
                        out.flush()
            else:
                self.point()
                f.write(data)

        torch.save = chunked_save  # type: ignore[assignment]
        for name in ("fsync", "replace", "remove", "unlink", "rmdir"):
            original = getattr(os, name)

            def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.point()
                return _original(*args, **kwargs)

            setattr(os, name, wrapped)


def _train(rank: int, folder: str, victim: int, kill_at: int | None) -> int:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    writes = _Writes(kill_at if rank == victim else None)
    writes.install()

    class Arm(pl.Callback):  # the save at step 4 is the one killed
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            writes.armed = trainer.global_step == 4

    pl.seed_everything(0, verbose=False)
    keep = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_last=True)
    trainer = make_trainer(
        LocalSGDStrategy(sync_every=3, timeout=timedelta(seconds=20)),
        max_steps=4,
        callbacks=[Arm(), keep],
        enable_checkpointing=True,
    )
    trainer.fit(ToyModule(lr=0.1, momentum=0.9))
    writes.armed = False
    return writes.count


def _launch(folder: Path, victim: int, kill_at: int | None) -> list[int | None]:
    """Both ranks, each in its own process; a rank that died returns None."""
    ctx = multiprocessing.get_context("forkserver")
    with tempfile.TemporaryDirectory() as out:
        env, port = dict(os.environ), free_port()
        procs = [
            ctx.Process(
                target=_entry,
                args=(r, 2, 1, port, out, env, os.getcwd(), _train, (str(folder), victim, kill_at)),
            )
            for r in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=90)
        for p in procs:
            if p.is_alive():  # waiting on a dead peer past its timeout
                p.kill()
                p.join()
        return [
            torch.load(Path(out) / f"rank{r}.pt") if (Path(out) / f"rank{r}.pt").exists() else None
            for r in range(2)
        ]


def _whole(path: Path) -> int:
    """The step of the checkpoint at ``path``, after checking that it and its whole set load."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    saved = checkpoint["localsgd"]
    for rank in (0, 1):
        own = files.load(files.rank_file(path, rank, saved["rank_files"]), f"rank {rank}'s state file")
        assert own["num_steps"] == saved["num_steps"] == checkpoint["global_step"], path
    return int(checkpoint["global_step"])


def test_a_writer_killed_anywhere_in_a_save_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    counts = _launch(tmp_path / "dry", victim=0, kill_at=None)
    assert all(isinstance(c, int) and c > 4 for c in counts), counts
    assert _whole(tmp_path / "dry" / "last.ckpt") == 4
    # one set per checkpoint is left: the step-2 sets went with the save at step 4
    assert sorted(p.name for p in (tmp_path / "dry" / "last.ckpt.ranks").iterdir()) == ["step4"]

    rng = random.Random(0)
    draws = [(victim, rng.randrange(counts[victim])) for victim in (rng.randrange(2) for _ in range(POINTS))]
    outcomes = []
    for i, (victim, point) in enumerate(draws):
        folder = tmp_path / f"kill{i}"
        _launch(folder, victim, point)
        last = _whole(folder / "last.ckpt")  # always there: the step-2 one, or the new one whole
        steps = [_whole(p) for p in sorted(folder.glob("epoch=*.ckpt"))]
        assert steps and set(steps) <= {2, 4}, (victim, point, steps)
        assert last in (2, 4), (victim, point, last)
        outcomes.append(last)
    # the kills landed before and after the new last.ckpt was committed
    assert outcomes.count(2) and outcomes.count(4), outcomes


@pytest.mark.integration
def test_a_checkpoint_in_the_flat_layout_of_earlier_versions_still_resumes_exactly(tmp_path: Path) -> None:
    from common import make_trainer as trainer_of
    from common import max_diff, snapshot

    def fit(ckpt: Path | None, steps: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = ToyModule(lr=0.1, momentum=0.9)
        trainer = trainer_of(LocalSGDStrategy(sync_every=3, workers_per_device=2), max_steps=steps)
        trainer.fit(module, ckpt_path=str(ckpt) if ckpt else None)
        if ckpt is None:
            trainer.save_checkpoint(tmp_path / "new.ckpt")
        return snapshot(module)

    fit(None, 4)  # mid-round: the two workers differ, so the rank file matters
    new = fit(tmp_path / "new.ckpt", 6)
    # the same checkpoint as an earlier version wrote it: rank files beside it, no set folder
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    folder = checkpoint["localsgd"]["rank_files"]
    assert folder == "step4"
    checkpoint["localsgd"]["rank_files"] = True
    torch.save(checkpoint, tmp_path / "flat.ckpt")
    (tmp_path / "flat.ckpt.ranks").mkdir()
    os.replace(tmp_path / "new.ckpt.ranks" / folder / "rank0.pt", tmp_path / "flat.ckpt.ranks" / "rank0.pt")
    flat = fit(tmp_path / "flat.ckpt", 6)
    assert max_diff(flat, new) == 0.0
    # and the rank file mattered: without one, every worker restarts from the average
    checkpoint["localsgd"]["rank_files"] = False
    torch.save(checkpoint, tmp_path / "average.ckpt")
    assert max_diff(fit(tmp_path / "average.ckpt", 6), new) > 1e-6


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_sharded_checkpoint_folder_is_swapped_in_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    from localsgd import sharding

    if not exchange:
        monkeypatch.setattr(sharding, "_exchange", lambda a, b: False)
    final = tmp_path / "last.ckpt"
    for step in (1, 2, 3):
        new = tmp_path / "last.ckpt.partial"
        new.mkdir()
        (new / "step").write_text(str(step))
        sharding.swap_in(new, final)
        assert (final / "step").read_text() == str(step)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # nothing else is left
