"""Data: per-worker label noise, in-memory datamodules (sparse regression, CIFAR from a fake
archive written here), on-device augmentation, sampling with and without replacement."""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from common import make_trainer
from torch import Tensor, nn

from localsgd import LocalSGDStrategy
from localsgd.research.cifar import _CIFAR, CIFARDataModule, download_cifar, load_cifar, random_crop_flip
from localsgd.research.data import (
    DigitsDataModule,
    LabelNoise,
    SparseRegressionDataModule,
    TargetNoise,
    keyed_generator,
    per_worker,
)
from localsgd.research.models import DiagonalLinearNet, Regressor


# ---------------------------------------------------------------------------- label noise
def test_label_noise_keeps_the_clean_label_with_the_right_probability() -> None:
    n, num_classes, p = 100_000, 10, 0.3
    labels = torch.arange(n) % num_classes
    noisy = LabelNoise(p=p, num_classes=num_classes)(labels, keyed_generator(0, 0, 0))
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape

    def within_binomial(count: int, trials: int, q: float) -> bool:
        return abs(count / trials - q) <= 4 * math.sqrt(q * (1 - q) / trials)

    # a redraw may land on the clean class: it stays with probability 1 - p + p / C
    assert within_binomial(int((noisy == labels).sum()), n, 1 - p + p / num_classes)
    # and each other class is reached with probability p / C
    zeros = noisy[labels == 0]
    for c in range(1, num_classes):
        assert within_binomial(int((zeros == c).sum()), len(zeros), p / num_classes)


def test_label_noise_differs_across_workers_and_steps() -> None:
    labels = torch.zeros(1000, dtype=torch.long)
    noise = LabelNoise(p=0.5, num_classes=10)
    draws = {key: noise(labels, keyed_generator(0, *key)) for key in [(0, 0), (1, 0), (0, 1), (1, 1)]}
    for a in draws:
        for b in draws:
            assert a == b or not torch.equal(draws[a], draws[b])
    # the same key draws the same noise (a resumed run repeats an uninterrupted one)
    assert torch.equal(noise(labels, keyed_generator(0, 1, 1)), draws[(1, 1)])


def fake_trainer(*, rank: int, draw: int, simulated: bool) -> Any:
    progress = SimpleNamespace(total=SimpleNamespace(ready=draw))
    return SimpleNamespace(
        global_rank=rank,
        strategy=SimpleNamespace(replicas=object() if simulated else None),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )


def test_per_worker_keys_by_global_worker_and_draw() -> None:
    def seed_of(batch: Any, generator: torch.Generator) -> int:
        return generator.initial_seed()

    def expected(worker: int, draw: int) -> int:
        return keyed_generator(3, worker, draw).initial_seed()

    # one worker per process: the worker is the rank
    trainer = fake_trainer(rank=2, draw=5, simulated=False)
    assert per_worker(trainer, "batch", seed_of, seed=3, device="cpu") == expected(2, 5)
    # simulation: the list of this process's k workers' batches, workers rank * k + i
    trainer = fake_trainer(rank=1, draw=5, simulated=True)
    assert per_worker(trainer, ["b0", "b1"], seed_of, seed=3, device="cpu") == [
        expected(2, 5),
        expected(3, 5),
    ]
    assert len({expected(w, d) for w in range(4) for d in range(4)}) == 16


def test_noise_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"label_noise \(1.5\) must be a probability in \[0, 1\]"):
        LabelNoise(p=1.5, num_classes=10)
    with pytest.raises(ValueError, match=r"label_noise \(1.5\) must be a probability in \[0, 1\]"):
        DigitsDataModule(label_noise=1.5)
    with pytest.raises(ValueError, match=r"label_noise \(-1\) must be a standard deviation >= 0"):
        TargetNoise(std=-1)
    with pytest.raises(ValueError, match=r"noise_distribution \('uniform'\) must be one of"):
        TargetNoise(std=1, distribution="uniform")  # type: ignore[arg-type]


class Recorder(pl.LightningModule):
    """Records what each simulated worker's training step sees."""

    def __init__(self, net: nn.Module, loss: str) -> None:
        super().__init__()
        self.net, self.kind = net, loss
        self.seen: list[tuple[int, int, Tensor, Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        worker = self.trainer.strategy.replicas.active  # type: ignore[attr-defined]
        self.seen.append((self.trainer.global_step, worker, x.clone(), y.clone()))
        out = self.net(x.flatten(1) if self.kind == "ce" else x)
        return F.cross_entropy(out, y) if self.kind == "ce" else F.mse_loss(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_digits_label_noise_is_drawn_per_simulated_worker_and_step() -> None:
    pl.seed_everything(7, verbose=False)  # noise_seed=None: the run's seed
    data = DigitsDataModule(batch_size=32, label_noise=0.5)
    module = Recorder(nn.Linear(64, 10), "ce")
    make_trainer(LocalSGDStrategy(sync_every=2, workers_per_device=2), 3).fit(module, data)
    assert data.train_set is not None
    clean = {x.numpy().tobytes(): int(y) for x, y in zip(*data.train_set.tensors)}
    noise = LabelNoise(p=0.5, num_classes=10)
    changed = {}
    assert [(step, worker) for step, worker, _, _ in module.seen] == [
        (s, w) for s in range(3) for w in range(2)
    ]
    for step, worker, x, y in module.seen:
        y_clean = torch.tensor([clean[row.numpy().tobytes()] for row in x])
        # exactly the draw keyed by (run seed, worker, step)
        torch.testing.assert_close(y, noise(y_clean, keyed_generator(7, worker, step)))
        changed[step, worker] = y != y_clean
        assert 0 < changed[step, worker].sum() < len(y)
    assert not torch.equal(changed[0, 0], changed[0, 1])
    assert not torch.equal(changed[0, 0], changed[1, 0])


# ---------------------------------------------------------------------------- sparse regression
def test_sparse_regression_data() -> None:
    data = SparseRegressionDataModule(dim=30, num_nonzero=4, num_train=20, num_test=50, label_noise=0.5)
    data.setup()
    assert data.w_star is not None and data.train_x is not None and data.test_x is not None
    assert int((data.w_star != 0).sum()) == 4 and set(data.w_star.unique().tolist()) == {0.0, 1.0}
    assert data.train_x.shape == (20, 30) and data.test_x.shape == (50, 30)
    torch.testing.assert_close(data.train_y, data.train_x @ data.w_star)
    torch.testing.assert_close(data.test_y, data.test_x @ data.w_star)
    # training targets: +-0.5 Rademacher noise; test targets clean
    idx = torch.arange(20)
    x, y = data.train_batch(idx, worker=0, draw=0)
    assert torch.equal(x, data.train_x)
    noise = y - data.train_y
    torch.testing.assert_close(noise.abs(), torch.full_like(noise, 0.5))
    assert 0 < int((noise > 0).sum()) < 20
    other = data.train_batch(idx, worker=1, draw=0)[1] - data.train_y
    assert not torch.equal(noise, other)
    assert torch.equal(data.on_after_batch_transfer(torch.arange(5), 0)[1], data.test_y[:5])
    # the same data for the same data_seed, other data for another
    again = SparseRegressionDataModule(dim=30, num_nonzero=4, num_train=20, num_test=50)
    again.setup()
    assert torch.equal(again.train_x, data.train_x)
    other_seed = SparseRegressionDataModule(dim=30, num_nonzero=4, num_train=20, num_test=50, data_seed=1)
    other_seed.setup()
    assert not torch.equal(other_seed.train_x, data.train_x)


def test_gaussian_target_noise_has_the_given_std() -> None:
    targets = torch.zeros(50_000)
    noisy = TargetNoise(std=0.3, distribution="gaussian")(targets, keyed_generator(0, 0, 0))
    assert abs(noisy.mean().item()) < 4 * 0.3 / math.sqrt(50_000)
    assert noisy.std().item() == pytest.approx(0.3, rel=0.02)


def fit_regression(sampling: str) -> tuple[SparseRegressionDataModule, Recorder]:
    pl.seed_everything(0, verbose=False)
    data = SparseRegressionDataModule(
        dim=10, num_nonzero=2, num_train=16, num_test=8, batch_size=2, sampling=sampling, label_noise=0.5
    )
    module = Recorder(DiagonalLinearNet(dim=10, alpha=0.5), "mse")
    # 16 samples / (2 workers x 2) = 4 steps per epoch; two epochs
    make_trainer(LocalSGDStrategy(sync_every=2, workers_per_device=2), 8).fit(module, data)
    return data, module


def epochs_of_indices(data: SparseRegressionDataModule, module: Recorder) -> list[list[list[int]]]:
    """Per epoch, per worker: the training-set indices its batches held."""
    assert data.train_x is not None
    rows = {x.numpy().tobytes(): i for i, x in enumerate(data.train_x)}
    out = [[[], []], [[], []]]
    for step, worker, x, _ in module.seen:
        out[step // 4][worker] += [rows[r.numpy().tobytes()] for r in x]
    return out


def test_sampling_without_replacement_shards_the_training_set() -> None:
    data, module = fit_regression("without_replacement")
    for w0, w1 in epochs_of_indices(data, module):
        assert sorted(w0 + w1) == list(range(16))  # each sample once per epoch, across workers


def test_sampling_with_replacement_draws_iid_per_worker() -> None:
    data, module = fit_regression("with_replacement")
    epochs = epochs_of_indices(data, module)
    all_draws = [i for epoch in epochs for w in epoch for i in w]
    assert len(all_draws) == 32
    # 16 i.i.d. draws from 16 are all distinct with probability 16!/16^16 ~ 1e-6
    assert any(len(set(w0 + w1)) < 16 for w0, w1 in epochs)
    assert epochs[0][0] != epochs[0][1] and epochs[0][0] != epochs[1][0]


def test_in_memory_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"sampling \('sometimes'\) must be one of"):
        SparseRegressionDataModule(sampling="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_nonzero \(8\) must be <= dim \(4\)"):
        SparseRegressionDataModule(dim=4, num_nonzero=8)
    with pytest.raises(ValueError, match=r"num_train \(2\) must be >= batch_size \(4\)"):
        SparseRegressionDataModule(num_train=2, batch_size=4)
    with pytest.raises(ValueError, match=r"batch_size \(0\) must be an integer >= 1"):
        SparseRegressionDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"has no data yet. HINT: call setup\(\) first"):
        SparseRegressionDataModule().train_dataloader()


# ---------------------------------------------------------------------------- CIFAR
def write_cifar(root: Path, dataset: str = "cifar10", per_file: int = 3) -> dict[str, np.ndarray]:
    """A tiny archive in the real format: pickled dicts with a (N, 3072) uint8 ``data`` array."""
    spec = _CIFAR[dataset]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in spec["train"] + spec["test"]:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, spec["num_classes"], per_file).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, spec["labels"]: labels, b"batch_label": name.encode()}, f)
        written[name] = data
    return written


def test_load_cifar_reads_the_pickle_archive(tmp_path: Path) -> None:
    written = write_cifar(tmp_path)
    train_x, train_y, test_x, test_y = load_cifar(tmp_path, "cifar10")
    assert train_x.shape == (15, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (3, 3, 32, 32) and train_y.shape == (15,) and test_y.shape == (3,)
    # rows are channel-major: 1024 red, 1024 green, 1024 blue, each row by row
    row = torch.from_numpy(written["data_batch_2"][1])
    assert torch.equal(train_x[4, 1].reshape(-1), row[1024:2048])
    assert torch.equal(test_x[2].reshape(-1), torch.from_numpy(written["test_batch"][2]))


def test_cifar100_uses_the_fine_labels(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100", per_file=4)
    data = CIFARDataModule(str(tmp_path), dataset="cifar100", batch_size=2)
    data.setup()
    assert data.num_classes == 100 and data.train_y is not None and len(data.train_y) == 4


def test_cifar_datamodule_normalizes_and_augments_on_device(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    data = CIFARDataModule(str(tmp_path), batch_size=4, device="cpu")
    data.setup()
    assert data.train_x is not None and data.train_y is not None
    every = torch.arange(15)
    x, y = data.eval_batch(every, split="train")
    assert torch.equal(y, data.train_y)
    # training-set statistics: each channel has mean 0 and std 1
    per_channel = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    # each augmented image is a 32x32 window of the image zero-padded by 4, maybe mirrored
    assert data.mean is not None and data.std is not None
    x, y = data.train_batch(every, worker=0, draw=0)
    pixels = ((x * data.std + data.mean) * 255).round().to(torch.uint8)
    padded = F.pad(data.train_x, (4, 4, 4, 4))
    shifts, flips = set(), set()
    for i in range(15):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(pixels[i], _window(padded[i], dy, dx, flip))
        ]
        assert matches, f"image {i} is not a crop of its padded original"
        shifts.add(matches[0][:2])
        flips.add(matches[0][2])
    assert len(shifts) > 1 and flips == {False, True}
    assert not torch.equal(x, data.train_batch(every, worker=1, draw=0)[0])
    assert torch.equal(_plain(tmp_path), data.eval_batch(every, split="train")[0])  # augment=False


def _window(image: Tensor, dy: int, dx: int, flip: bool) -> Tensor:
    crop = image[:, dy : dy + 32, dx : dx + 32]
    return crop.flip(-1) if flip else crop


def _plain(root: Path) -> Tensor:
    data = CIFARDataModule(str(root), augment=False)
    data.setup()
    return data.train_batch(torch.arange(15), worker=0, draw=0)[0]


def test_random_crop_flip_on_a_batch() -> None:
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5) + 1
    out = random_crop_flip(images, padding=1, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    padded = F.pad(images, (1, 1, 1, 1))
    for i in range(2):
        candidates = [
            padded[i, :, dy : dy + 4, dx : dx + 5].flip(-1)
            if flip
            else padded[i, :, dy : dy + 4, dx : dx + 5]
            for dy in range(3)
            for dx in range(3)
            for flip in (False, True)
        ]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_missing_cifar_names_the_path_and_the_manual_step(tmp_path: Path) -> None:
    data = CIFARDataModule(str(tmp_path / "data"))
    data.prepare_data()  # download=False: nothing to do
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py is missing data_batch_1") as err:
        data.setup()
    message = str(err.value)
    assert str(tmp_path / "data") in message
    assert "download=True" in message and "tar -xzf cifar-10-python.tar.gz" in message


def test_offline_download_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = CIFARDataModule(str(tmp_path), dataset="cifar100", download=True)
    with pytest.raises(
        RuntimeError, match=r"could not download CIFAR-100 from https://www\.cs\.toronto\.edu"
    ) as err:
        data.prepare_data()
    assert "no network" in str(err.value) and "by hand" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_download_checks_and_extracts_the_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path / "source")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "source" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = buffer.getvalue()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(archive))
    monkeypatch.setitem(_CIFAR["cifar10"], "md5", "0" * 32)
    with pytest.raises(RuntimeError, match="MD5"):
        download_cifar(tmp_path / "bad")
    monkeypatch.setitem(_CIFAR["cifar10"], "md5", hashlib.md5(archive).hexdigest())
    data = CIFARDataModule(str(tmp_path / "good"), download=True)
    data.prepare_data()
    data.setup()
    assert data.train_x is not None and data.train_x.shape == (15, 3, 32, 32)
    assert [p.name for p in (tmp_path / "good").iterdir()] == ["cifar-10-batches-py"]


def test_cifar_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset \('cifar5'\) must be one of 'cifar10', 'cifar100'"):
        CIFARDataModule(str(tmp_path), dataset="cifar5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"label_noise \(2\) must be a probability"):
        CIFARDataModule(str(tmp_path), label_noise=2)


def test_regressor_trains_the_diagonal_network_on_the_toy() -> None:
    pl.seed_everything(0, verbose=False)
    data = SparseRegressionDataModule(dim=10, num_nonzero=2, num_train=32, num_test=64, label_noise=0.0)
    module = Regressor(DiagonalLinearNet(dim=10, alpha=0.5), lr=0.05)
    trainer = make_trainer("auto", 200, limit_val_batches=None)
    data.setup()
    assert data.w_star is not None
    before = (module.net.weight - data.w_star).norm().item()  # type: ignore[operator]
    trainer.fit(module, data)
    after = (module.net.weight - data.w_star).norm().item()  # type: ignore[operator]
    assert after < 0.1 * before
    assert trainer.callback_metrics["val/loss"] < 0.01
